//! The pinned VERDICTS map: what every enforcement point enforces, per upstream.
//!
//! The agent is the only writer of verdicts, so this table keeps the fast-path switch and
//! the filter up to date from its own record of the keys, without rescanning the map on
//! every write. The kernel's one write, the probe tokens it takes, goes to PROBE_COUNTS.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap, HashSet},
    net::SocketAddr,
    path::Path,
};

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use circuit_common::{
    ClientUpstreamKey, Control, MAX_SERVICE_ENDPOINTS, ServiceRoute, UpstreamKey, Verdict,
    VerdictFilter, VerdictState, map_names,
};

use super::{is_not_found, open_pinned, socket_addr, upstream_key};
use crate::time::MonoTime;

/// The verdicts, with the two structures the kernel consults before them: the fast-path
/// switch (does any verdict exist?) and the filter (may this key have one?).
pub struct VerdictTable {
    map: HashMap<MapData, UpstreamKey, Verdict>,
    control: Array<MapData, Control>,
    filter: Array<MapData, u64>,
    probes: HashMap<MapData, UpstreamKey, u64>,
    /// The keys in `map`, and how many of them set each filter bit.
    keys: HashSet<UpstreamKey>,
    filter_refs: StdHashMap<(u32, u64), u32>,
    /// Each filter word's bits, as `filter_refs` sets them: a write costs the same however
    /// many verdicts there are.
    word_bits: StdHashMap<u32, u64>,
    /// How many keys are whole-host verdicts (port 0).
    host_verdicts: u32,
    /// The probe round last written for each HALF_OPEN verdict (see [`VerdictSpec`]).
    probe_rounds: StdHashMap<UpstreamKey, u32>,
    /// Client-scoped verdicts (the cgroup hook's alone), and their keys.
    clients: HashMap<MapData, ClientUpstreamKey, Verdict>,
    client_keys: HashSet<ClientUpstreamKey>,
    /// (host, port) pairs whole-host verdicts leave alone (see [`VerdictTable::spare`]).
    spared: HashMap<MapData, UpstreamKey, u8>,
    /// The cgroup hook's routes around isolated endpoints, by virtual address.
    routes: HashMap<MapData, UpstreamKey, ServiceRoute>,
}

/// What the cgroup hook does with connects to a service's virtual address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Re-route each to one of these endpoints that admits it (at most
    /// [`MAX_SERVICE_ENDPOINTS`]; the kernel rechecks each endpoint's verdict).
    Reroute(Vec<SocketAddr>),
    /// Fail every connect: all endpoints are OPEN and the service is not re-routed.
    FailFast,
}

/// A client-scoped verdict as read back from the kernel: `client` (a cgroup id) is failed
/// fast at `upstream`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredClientVerdict {
    pub upstream: SocketAddr,
    pub client: u64,
    pub dry_run: bool,
    pub lease_expires: MonoTime,
}

/// What to enforce for one upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictSpec {
    pub state: VerdictState,
    /// New connections admitted in HALF_OPEN.
    pub probe_budget: u32,
    /// HALF_OPEN: each new round tops the free probe tokens up to `probe_budget` again,
    /// keeping those taken: probes that will never report (abandoned, or lost) give their
    /// tokens back. Writes within one round keep the kernel's budget as it is.
    pub probe_round: u32,
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
            probe_round: 0,
            reject_fraction: 0,
            dry_run: false,
        }
    }

    pub const fn probe(budget: u32, round: u32) -> Self {
        Self {
            state: VerdictState::HalfOpen,
            probe_budget: budget,
            probe_round: round,
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
    /// Probe tokens the kernel handed out in this HALF_OPEN period (at most the budget).
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
        let probes =
            HashMap::try_from(Map::HashMap(open_pinned(pin_dir, map_names::PROBE_COUNTS)?))
                .context("PROBE_COUNTS is not the expected hash map")?;
        let clients = HashMap::try_from(Map::HashMap(open_pinned(
            pin_dir,
            map_names::CLIENT_VERDICTS,
        )?))
        .context("CLIENT_VERDICTS is not the expected hash map")?;
        let spared =
            HashMap::try_from(Map::HashMap(open_pinned(pin_dir, map_names::SPARED_PORTS)?))
                .context("SPARED_PORTS is not the expected hash map")?;
        let routes = HashMap::try_from(Map::HashMap(open_pinned(
            pin_dir,
            map_names::SERVICE_ROUTES,
        )?))
        .context("SERVICE_ROUTES is not the expected hash map")?;
        let client_keys = clients.keys().filter_map(Result::ok).collect();
        let mut table = Self {
            map,
            control,
            filter,
            probes,
            keys: HashSet::new(),
            filter_refs: StdHashMap::new(),
            word_bits: StdHashMap::new(),
            host_verdicts: 0,
            probe_rounds: StdHashMap::new(),
            clients,
            client_keys,
            spared,
            routes,
        };
        let keys: Vec<UpstreamKey> = table.map.keys().filter_map(Result::ok).collect();
        for key in keys {
            table.note_key(key);
        }
        Ok(table)
    }

    /// Records `key` as present; true when it is new.
    fn note_key(&mut self, key: UpstreamKey) -> bool {
        if !self.keys.insert(key) {
            return false;
        }
        if key.port == 0 {
            self.host_verdicts += 1;
        }
        let (word, mask) = VerdictFilter::slot(&key);
        let refs = self.filter_refs.entry((word, mask)).or_default();
        *refs += 1;
        if *refs == 1 {
            *self.word_bits.entry(word).or_default() |= mask;
        }
        true
    }

    /// Records `key` as gone; the filter word whose bit it no longer holds, if any, with
    /// the bits that word keeps.
    fn forget_key(&mut self, key: &UpstreamKey) -> Option<(u32, u64)> {
        if !self.keys.remove(key) {
            return None;
        }
        if key.port == 0 {
            self.host_verdicts -= 1;
        }
        self.probe_rounds.remove(key);
        let slot = VerdictFilter::slot(key);
        let refs = self.filter_refs.get_mut(&slot)?;
        *refs -= 1;
        if *refs > 0 {
            return None;
        }
        self.filter_refs.remove(&slot);
        let (word, mask) = slot;
        let bits = self.word_bits.entry(word).or_default();
        *bits &= !mask;
        let bits = *bits;
        if bits == 0 {
            self.word_bits.remove(&word);
        }
        Some((word, bits))
    }

    /// Rebuilds the filter and the switch from the verdicts, e.g. after adopting maps that
    /// an older agent wrote.
    pub fn rebuild(&mut self) -> anyhow::Result<()> {
        let mut words = vec![0u64; VerdictFilter::WORDS as usize];
        for (word, mask) in self.filter_refs.keys() {
            words[*word as usize] |= mask;
        }
        for (word, bits) in words.into_iter().enumerate() {
            self.filter
                .set(word as u32, bits, 0)
                .context("cannot write the verdict filter")?;
        }
        self.sync_control()
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
        self.set(upstream, VerdictSpec::probe(budget, 0), lease_expires)
    }

    /// Enforces `spec` for `upstream` (a fresh probe budget) until `lease_expires`. An
    /// upstream with port 0 stands for the whole host.
    pub fn set(
        &mut self,
        upstream: SocketAddr,
        spec: VerdictSpec,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        let key = upstream_key(upstream);
        let probe_budget = self.probe_budget(&key, &spec)?;
        let mut verdict = Verdict::new(spec.state, probe_budget, lease_expires.as_nanos());
        verdict.reject_fraction = spec.reject_fraction;
        if spec.dry_run {
            verdict.flags |= Verdict::DRY_RUN;
        }
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
        if self.note_key(key) {
            self.sync_control()?;
        }
        Ok(())
    }

    /// The kernel budget for `spec`: fresh when a HALF_OPEN period starts (its token count
    /// removed), kept within a round, and on a new round topped up so that `probe_budget`
    /// more connections can probe, whatever was taken before.
    fn probe_budget(&mut self, key: &UpstreamKey, spec: &VerdictSpec) -> anyhow::Result<u32> {
        if spec.state != VerdictState::HalfOpen {
            if self.probe_rounds.remove(key).is_some() {
                self.remove_probe_count(key)?;
            }
            return Ok(spec.probe_budget);
        }
        let current = match self.map.get(key, 0) {
            Ok(v) if v.state() == Some(VerdictState::HalfOpen) => Some(v.probe_budget),
            Ok(_) | Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(e).context("cannot read verdict"),
        };
        let last_round = self.probe_rounds.insert(*key, spec.probe_round);
        Ok(match (current, last_round) {
            (None, _) => {
                // A new period: nothing taken yet. The count goes before the verdict exists,
                // and nothing takes tokens from an OPEN verdict in between.
                self.remove_probe_count(key)?;
                spec.probe_budget
            }
            // Adopted from a previous agent, or the same round: keep what the kernel has.
            (Some(current), None) => current.max(spec.probe_budget),
            (Some(current), Some(last)) if spec.probe_round <= last => current,
            (Some(current), Some(_)) => {
                // The count includes attempts rejected over budget, so the next `budget`
                // attempts are admitted only above it.
                let taken = self.probes.get(key, 0).unwrap_or(0);
                let topped = taken.saturating_add(u64::from(spec.probe_budget));
                current.max(u32::try_from(topped).unwrap_or(u32::MAX))
            }
        })
    }

    fn remove_probe_count(&mut self, key: &UpstreamKey) -> anyhow::Result<()> {
        match self.probes.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e).context("cannot reset the probe count"),
        }
    }

    /// Keeps the kernel's fast-path switch equal to the verdict counts.
    fn sync_control(&mut self) -> anyhow::Result<()> {
        // exempt_cgroups belongs to ExemptCgroups: keep it.
        let exempt_cgroups = self.control.get(&0, 0).map_or(0, |c| c.exempt_cgroups);
        let control = Control {
            exempt_cgroups,
            active_verdicts: self.keys.len() as u32,
            host_verdicts: self.host_verdicts,
            client_verdicts: self.client_keys.len() as u32,
        };
        self.control
            .set(0, control, 0)
            .context("cannot update the fast-path switch")
    }

    /// Moves the lease of an existing verdict. Returns false when there is no verdict for
    /// `upstream`. (Only the agent writes verdicts, so reading and writing back loses
    /// nothing; the kernel counts its probes elsewhere.)
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
        self.clear_many(&[upstream])
    }

    /// Admits everything to each of `upstreams` again, writing each filter word and the
    /// fast-path switch once at the end: taking over a full map clears tens of thousands of
    /// verdicts at start.
    pub fn clear_many(&mut self, upstreams: &[SocketAddr]) -> anyhow::Result<()> {
        let mut words = std::collections::BTreeMap::new();
        for &upstream in upstreams {
            let key = upstream_key(upstream);
            match self.map.remove(&key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot clear the verdict for {upstream}"));
                }
            }
            self.remove_probe_count(&key)?;
            if let Some((word, bits)) = self.forget_key(&key) {
                words.insert(word, bits);
            }
        }
        // A word's last value is what forget_key left for it: the bits it keeps.
        for (word, bits) in words {
            self.filter
                .set(word, bits, 0)
                .context("cannot write the verdict filter")?;
        }
        self.sync_control()
    }

    /// The (host, port) pairs whole-host verdicts leave alone.
    pub fn spared(&self) -> anyhow::Result<BTreeSet<SocketAddr>> {
        self.spared
            .keys()
            .map(|key| {
                key.map(|key| socket_addr(&key))
                    .context("cannot read the spared ports")
            })
            .collect()
    }

    /// Spares `wanted` (host, port) pairs from their hosts' whole-host verdicts, and stops
    /// sparing the others whose host has no whole-host verdict left. A pair whose host is
    /// still isolated stays spared even if not wanted (an older agent's verdict not taken
    /// over yet, say): a never-isolated port is never rejected, not even for a moment.
    /// Call it before writing a whole-host verdict and after clearing one.
    pub fn spare(&mut self, wanted: &BTreeSet<SocketAddr>) -> anyhow::Result<()> {
        // Compared as kernel keys: [::ffff:a.b.c.d]:p and a.b.c.d:p are one pair.
        let wanted: HashSet<UpstreamKey> = wanted.iter().map(|&a| upstream_key(a)).collect();
        let current: HashSet<UpstreamKey> = self.spared.keys().filter_map(Result::ok).collect();
        for key in wanted.difference(&current) {
            self.spared.insert(key, 1, 0).with_context(|| {
                format!("cannot spare {} from its host's verdict", socket_addr(key))
            })?;
        }
        for key in current.difference(&wanted) {
            if self.keys.contains(&UpstreamKey::new(key.addr, 0)) {
                continue;
            }
            match self.spared.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot unspare {}", socket_addr(key)));
                }
            }
        }
        Ok(())
    }

    /// Fails `client` (a cgroup id, with everything below it) fast at `upstream` until
    /// `lease_expires`; nobody else is touched.
    pub fn set_client(
        &mut self,
        upstream: SocketAddr,
        client: u64,
        dry_run: bool,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        let key = ClientUpstreamKey::new(client, upstream_key(upstream));
        let mut verdict = Verdict::new(VerdictState::Open, 0, lease_expires.as_nanos());
        if dry_run {
            verdict.flags |= Verdict::DRY_RUN;
        }
        self.clients
            .insert(key, verdict, 0)
            .with_context(|| format!("cannot write the client verdict for {upstream}"))?;
        if self.client_keys.insert(key) {
            self.sync_control()?;
        }
        Ok(())
    }

    /// Lifts `client`'s own verdict at `upstream`.
    pub fn clear_client(&mut self, upstream: SocketAddr, client: u64) -> anyhow::Result<()> {
        let key = ClientUpstreamKey::new(client, upstream_key(upstream));
        match self.clients.remove(&key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot clear the client verdict for {upstream}"));
            }
        }
        if self.client_keys.remove(&key) {
            self.sync_control()?;
        }
        Ok(())
    }

    /// Every client-scoped verdict, in upstream then client order.
    pub fn list_clients(&self) -> anyhow::Result<Vec<StoredClientVerdict>> {
        let mut all = Vec::new();
        for entry in self.clients.iter() {
            let (key, v) = entry.context("cannot iterate the client verdicts")?;
            all.push(StoredClientVerdict {
                upstream: socket_addr(&key.upstream),
                client: key.client,
                dry_run: v.is_dry_run(),
                lease_expires: MonoTime::from_nanos(v.lease_expires_ns),
            });
        }
        all.sort_by_key(|v| (v.upstream.ip(), v.upstream.port(), v.client));
        Ok(all)
    }

    pub fn get(&self, upstream: SocketAddr) -> anyhow::Result<Option<StoredVerdict>> {
        let key = upstream_key(upstream);
        match self.map.get(&key, 0) {
            Ok(v) => Ok(stored(&key, &v, self.probes.get(&key, 0).unwrap_or(0))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("cannot read verdict"),
        }
    }

    /// Every verdict in the map, in upstream order.
    pub fn list(&self) -> anyhow::Result<Vec<StoredVerdict>> {
        let mut all = Vec::new();
        for entry in self.map.iter() {
            let (key, value) = entry.context("cannot iterate the verdict map")?;
            all.extend(stored(&key, &value, self.probes.get(&key, 0).unwrap_or(0)));
        }
        all.sort_by_key(|v| (v.upstream.ip(), v.upstream.port()));
        Ok(all)
    }
}

impl VerdictTable {
    /// Writes `route` for the virtual address `service` until `lease_expires`.
    pub fn set_route(
        &mut self,
        service: SocketAddr,
        route: &Route,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        let mut value = ServiceRoute {
            lease_expires_ns: lease_expires.as_nanos(),
            endpoint_count: 0,
            flags: 0,
            endpoints: [UpstreamKey::new([0; 16], 0); MAX_SERVICE_ENDPOINTS],
        };
        match route {
            Route::FailFast => value.flags = ServiceRoute::FAIL_FAST,
            Route::Reroute(endpoints) => {
                for (slot, endpoint) in value.endpoints.iter_mut().zip(endpoints) {
                    *slot = upstream_key(*endpoint);
                    value.endpoint_count += 1;
                }
            }
        }
        self.routes
            .insert(upstream_key(service), value, 0)
            .with_context(|| format!("cannot write the route of {service}"))
    }

    pub fn clear_route(&mut self, service: SocketAddr) -> anyhow::Result<()> {
        match self.routes.remove(&upstream_key(service)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove the route of {service}")),
        }
    }

    /// Every route in the map, with its lease.
    pub fn routes(&self) -> anyhow::Result<Vec<(SocketAddr, Route, MonoTime)>> {
        let mut all = Vec::new();
        for entry in self.routes.iter() {
            let (key, value) = entry.context("cannot iterate the route map")?;
            let route = if value.flags & ServiceRoute::FAIL_FAST != 0 {
                Route::FailFast
            } else {
                let n = (value.endpoint_count as usize).min(MAX_SERVICE_ENDPOINTS);
                Route::Reroute(value.endpoints[..n].iter().map(socket_addr).collect())
            };
            all.push((
                socket_addr(&key),
                route,
                MonoTime::from_nanos(value.lease_expires_ns),
            ));
        }
        all.sort_by_key(|(service, ..)| (service.ip(), service.port()));
        Ok(all)
    }
}

fn stored(key: &UpstreamKey, v: &Verdict, probe_count: u64) -> Option<StoredVerdict> {
    let state = v.state()?;
    Some(StoredVerdict {
        upstream: socket_addr(key),
        state,
        probe_budget: v.probe_budget,
        // The count also holds attempts rejected over budget.
        probes_admitted: if state == VerdictState::HalfOpen {
            probe_count.min(u64::from(v.probe_budget))
        } else {
            0
        },
        reject_fraction: v.reject_fraction,
        dry_run: v.is_dry_run(),
        lease_expires: MonoTime::from_nanos(v.lease_expires_ns),
    })
}
