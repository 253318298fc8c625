//! The pinned VERDICTS map: what every enforcement point enforces, per upstream.

use std::{net::SocketAddr, path::Path};

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData, MapError};
use circuit_common::{UpstreamKey, Verdict, VerdictState, map_names};

use super::{socket_addr, upstream_key};
use crate::time::MonoTime;

pub struct VerdictTable {
    map: HashMap<MapData, UpstreamKey, Verdict>,
}

/// A verdict as read back from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredVerdict {
    pub upstream: SocketAddr,
    pub state: VerdictState,
    pub probe_budget: u32,
    pub probes_admitted: u64,
    pub lease_expires: MonoTime,
}

impl VerdictTable {
    pub(super) fn from_map(map: Map) -> anyhow::Result<Self> {
        Ok(Self {
            map: HashMap::try_from(map).context("VERDICTS is not the expected hash map")?,
        })
    }

    /// Opens the map a running (or previous) agent pinned, without loading any program.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(map_names::VERDICTS);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "no verdict map at {} (has `circuit-agent attach` run with this pin directory?)",
                path.display()
            )
        })?;
        Self::from_map(Map::HashMap(data))
    }

    /// Rejects every new connection to `upstream` until `lease_expires`.
    pub fn reject(&mut self, upstream: SocketAddr, lease_expires: MonoTime) -> anyhow::Result<()> {
        self.write(
            upstream,
            Verdict::new(VerdictState::Open, 0, lease_expires.as_nanos()),
        )
    }

    /// Admits `budget` new connections to `upstream` as probes (a fresh budget), rejects the
    /// rest, until `lease_expires`.
    pub fn probe(
        &mut self,
        upstream: SocketAddr,
        budget: u32,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        self.write(
            upstream,
            Verdict::new(VerdictState::HalfOpen, budget, lease_expires.as_nanos()),
        )
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
        match self.map.remove(&upstream_key(upstream)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot clear the verdict for {upstream}")),
        }
    }

    fn write(&mut self, upstream: SocketAddr, verdict: Verdict) -> anyhow::Result<()> {
        self.map
            .insert(upstream_key(upstream), verdict, 0)
            .with_context(|| format!("cannot write the verdict for {upstream}"))
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
        lease_expires: MonoTime::from_nanos(v.lease_expires_ns),
    })
}
