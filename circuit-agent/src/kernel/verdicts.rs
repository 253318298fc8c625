//! The pinned VERDICTS map: what every enforcement point enforces, per upstream.

use std::{net::SocketAddr, path::Path};

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use circuit_common::{Control, UpstreamKey, Verdict, VerdictFilter, VerdictState, map_names};

use super::{is_not_found, open_pinned, socket_addr, upstream_key};
use crate::time::MonoTime;

/// The verdicts, with the two structures the kernel consults before them: the fast-path
/// switch (does any verdict exist?) and the filter (may this key have one?).
pub struct VerdictTable {
    map: HashMap<MapData, UpstreamKey, Verdict>,
    control: Array<MapData, Control>,
    filter: Array<MapData, u64>,
}

/// What to enforce for one upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictSpec {
    pub state: VerdictState,
    /// New connections admitted in HALF_OPEN.
    pub probe_budget: u32,
    /// For PARTIAL: rejected share of new connections, in 1/65536.
    pub reject_fraction: u16,
    /// Count would-be rejects, reject nothing.
    pub dry_run: bool,
}

impl VerdictSpec {
    pub const fn reject() -> Self {
        Self {
            state: VerdictState::Open,
            probe_budget: 0,
            reject_fraction: 0,
            dry_run: false,
        }
    }

    pub const fn probe(budget: u32) -> Self {
        Self {
            state: VerdictState::HalfOpen,
            probe_budget: budget,
            ..Self::reject()
        }
    }

    pub const fn partial(reject_fraction: u16) -> Self {
        Self {
            state: VerdictState::Partial,
            reject_fraction,
            ..Self::reject()
        }
    }

    pub const fn dry_run(self) -> Self {
        Self {
            dry_run: true,
            ..self
        }
    }
}

/// A verdict as read back from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredVerdict {
    pub upstream: SocketAddr,
    pub state: VerdictState,
    pub probe_budget: u32,
    pub probes_admitted: u64,
    pub reject_fraction: u16,
    pub dry_run: bool,
    pub lease_expires: MonoTime,
}

impl VerdictTable {
    /// Opens the maps a running (or previous) agent pinned, without loading any program.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let map = HashMap::try_from(Map::HashMap(open_pinned(pin_dir, map_names::VERDICTS)?))
            .context("VERDICTS is not the expected hash map")?;
        let control = Array::try_from(Map::Array(open_pinned(pin_dir, map_names::CONTROL)?))
            .context("CONTROL is not the expected array")?;
        let filter = Array::try_from(Map::Array(open_pinned(pin_dir, map_names::VERDICT_FILTER)?))
            .context("VERDICT_FILTER is not the expected array")?;
        Ok(Self {
            map,
            control,
            filter,
        })
    }

    /// Rebuilds the filter and the switch from the verdicts, e.g. after adopting maps that
    /// an older agent wrote.
    pub fn rebuild(&mut self) -> anyhow::Result<()> {
        let mut words = vec![0u64; VerdictFilter::WORDS as usize];
        for key in self.map.keys().filter_map(Result::ok) {
            let (word, mask) = VerdictFilter::slot(&key);
            words[word as usize] |= mask;
        }
        for (word, bits) in words.into_iter().enumerate() {
            self.filter
                .set(word as u32, bits, 0)
                .context("cannot write the verdict filter")?;
        }
        self.sync_control(None)
    }

    /// Rejects every new connection to `upstream` until `lease_expires`.
    pub fn reject(&mut self, upstream: SocketAddr, lease_expires: MonoTime) -> anyhow::Result<()> {
        self.set(upstream, VerdictSpec::reject(), lease_expires)
    }

    /// Admits `budget` new connections to `upstream` as probes (a fresh budget), rejects the
    /// rest, until `lease_expires`.
    pub fn probe(
        &mut self,
        upstream: SocketAddr,
        budget: u32,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        self.set(upstream, VerdictSpec::probe(budget), lease_expires)
    }

    /// Enforces `spec` for `upstream` (a fresh probe budget) until `lease_expires`. An
    /// upstream with port 0 stands for the whole host.
    pub fn set(
        &mut self,
        upstream: SocketAddr,
        spec: VerdictSpec,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        let mut verdict = Verdict::new(spec.state, spec.probe_budget, lease_expires.as_nanos());
        verdict.reject_fraction = spec.reject_fraction;
        if spec.dry_run {
            verdict.flags |= Verdict::DRY_RUN;
        }
        let key = upstream_key(upstream);
        // The filter bit goes first: a verdict must never hide behind a clear bit.
        let (word, mask) = VerdictFilter::slot(&key);
        let bits = self
            .filter
            .get(&word, 0)
            .context("cannot read the verdict filter")?;
        if bits & mask == 0 {
            self.filter
                .set(word, bits | mask, 0)
                .context("cannot write the verdict filter")?;
        }
        self.map
            .insert(key, verdict, 0)
            .with_context(|| format!("cannot write the verdict for {upstream}"))?;
        self.sync_control(None)
    }

    /// Keeps the kernel's fast-path switch equal to the verdict counts, and rebuilds the
    /// filter word `rebuild_word` (after a removal) from the verdicts left. Recomputed from
    /// the map, so it stays right when several processes (agent, CLI) write verdicts.
    fn sync_control(&mut self, rebuild_word: Option<u32>) -> anyhow::Result<()> {
        // exempt_cgroups belongs to ExemptCgroups: keep it.
        let exempt_cgroups = self.control.get(&0, 0).map_or(0, |c| c.exempt_cgroups);
        let mut control = Control {
            exempt_cgroups,
            ..Control::default()
        };
        let mut word_bits = 0u64;
        for key in self.map.keys().filter_map(Result::ok) {
            control.active_verdicts += 1;
            control.host_verdicts += u32::from(key.port == 0);
            let (word, mask) = VerdictFilter::slot(&key);
            if Some(word) == rebuild_word {
                word_bits |= mask;
            }
        }
        if let Some(word) = rebuild_word {
            self.filter
                .set(word, word_bits, 0)
                .context("cannot write the verdict filter")?;
        }
        self.control
            .set(0, control, 0)
            .context("cannot update the fast-path switch")
    }

    /// Moves the lease of an existing verdict, keeping the probes the kernel has admitted.
    /// Returns false when there is no verdict for `upstream`.
    ///
    /// This is a read-modify-write: a probe admitted between the read and the write is
    /// forgotten, so at worst one more probe gets through than the budget in that window.
    pub fn renew(&mut self, upstream: SocketAddr, lease_expires: MonoTime) -> anyhow::Result<bool> {
        let key = upstream_key(upstream);
        let mut verdict = match self.map.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(e).context("cannot read verdict"),
        };
        verdict.lease_expires_ns = lease_expires.as_nanos();
        self.map
            .insert(key, verdict, 0)
            .with_context(|| format!("cannot renew the verdict for {upstream}"))?;
        Ok(true)
    }

    /// Admits everything to `upstream` again.
    pub fn clear(&mut self, upstream: SocketAddr) -> anyhow::Result<()> {
        let key = upstream_key(upstream);
        match self.map.remove(&key) {
            Ok(()) => self.sync_control(Some(VerdictFilter::slot(&key).0)),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot clear the verdict for {upstream}")),
        }
    }

    pub fn get(&self, upstream: SocketAddr) -> anyhow::Result<Option<StoredVerdict>> {
        let key = upstream_key(upstream);
        match self.map.get(&key, 0) {
            Ok(v) => Ok(stored(&key, &v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("cannot read verdict"),
        }
    }

    /// Every verdict in the map, in upstream order.
    pub fn list(&self) -> anyhow::Result<Vec<StoredVerdict>> {
        let mut all = Vec::new();
        for entry in self.map.iter() {
            let (key, value) = entry.context("cannot iterate the verdict map")?;
            all.extend(stored(&key, &value));
        }
        all.sort_by_key(|v| (v.upstream.ip(), v.upstream.port()));
        Ok(all)
    }
}

fn stored(key: &UpstreamKey, v: &Verdict) -> Option<StoredVerdict> {
    Some(StoredVerdict {
        upstream: socket_addr(key),
        state: v.state()?,
        probe_budget: v.probe_budget,
        probes_admitted: v.probes_admitted,
        reject_fraction: v.reject_fraction,
        dry_run: v.is_dry_run(),
        lease_expires: MonoTime::from_nanos(v.lease_expires_ns),
    })
}
