//! A dataplane in memory, for the daemon's unit tests: the ports' contracts without the
//! kernel (probe tokens are never taken here, so a verdict's budget is what was written).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use circuit_common::OverrideKind;

use crate::{
    kernel::{Route, StoredOverride, StoredVerdict, VerdictSpec},
    ports::{OverrideStore, VerdictStore},
    time::MonoTime,
};

#[derive(Default)]
pub struct MemoryVerdicts {
    pub verdicts: BTreeMap<SocketAddr, StoredVerdict>,
    /// (upstream, client) → (dry run, lease end).
    pub clients: BTreeMap<(SocketAddr, u64), (bool, MonoTime)>,
    pub spared: BTreeSet<SocketAddr>,
    /// Every `set`, in order: what the daemon wrote, not only what is left.
    pub writes: Vec<(SocketAddr, VerdictSpec)>,
    pub routes: BTreeMap<SocketAddr, (Route, MonoTime)>,
}

impl VerdictStore for MemoryVerdicts {
    fn set_route(
        &mut self,
        service: SocketAddr,
        route: &Route,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        self.routes.insert(service, (route.clone(), lease_expires));
        Ok(())
    }

    fn clear_route(&mut self, service: SocketAddr) -> anyhow::Result<()> {
        self.routes.remove(&service);
        Ok(())
    }

    fn routes(&self) -> anyhow::Result<Vec<(SocketAddr, Route, MonoTime)>> {
        Ok(self
            .routes
            .iter()
            .map(|(s, (r, l))| (*s, r.clone(), *l))
            .collect())
    }

    fn set(
        &mut self,
        upstream: SocketAddr,
        spec: VerdictSpec,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        self.writes.push((upstream, spec));
        self.verdicts.insert(
            upstream,
            StoredVerdict {
                upstream,
                state: spec.state,
                probe_budget: spec.probe_budget,
                probes_admitted: 0,
                reject_fraction: spec.reject_fraction,
                dry_run: spec.dry_run,
                lease_expires,
            },
        );
        Ok(())
    }

    fn renew(&mut self, upstream: SocketAddr, lease_expires: MonoTime) -> anyhow::Result<bool> {
        Ok(self
            .verdicts
            .get_mut(&upstream)
            .map(|v| v.lease_expires = lease_expires)
            .is_some())
    }

    fn clear(&mut self, upstream: SocketAddr) -> anyhow::Result<()> {
        self.verdicts.remove(&upstream);
        Ok(())
    }

    fn get(&self, upstream: SocketAddr) -> anyhow::Result<Option<StoredVerdict>> {
        Ok(self.verdicts.get(&upstream).copied())
    }

    fn list(&self) -> anyhow::Result<Vec<StoredVerdict>> {
        Ok(self.verdicts.values().copied().collect())
    }

    fn spare(&mut self, wanted: &BTreeSet<SocketAddr>) -> anyhow::Result<()> {
        self.spared.clone_from(wanted);
        Ok(())
    }

    fn set_client(
        &mut self,
        upstream: SocketAddr,
        client: u64,
        dry_run: bool,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        self.clients
            .insert((upstream, client), (dry_run, lease_expires));
        Ok(())
    }

    fn clear_client(&mut self, upstream: SocketAddr, client: u64) -> anyhow::Result<()> {
        self.clients.remove(&(upstream, client));
        Ok(())
    }
}

#[derive(Default)]
pub struct MemoryOverrides(pub BTreeMap<SocketAddr, StoredOverride>);

impl OverrideStore for MemoryOverrides {
    fn set(
        &mut self,
        upstream: SocketAddr,
        kind: OverrideKind,
        until: Option<MonoTime>,
        now: MonoTime,
    ) -> anyhow::Result<()> {
        self.0.insert(
            upstream,
            StoredOverride {
                upstream,
                kind,
                until,
                set_at: now,
            },
        );
        Ok(())
    }

    fn remove(&mut self, upstream: SocketAddr) -> anyhow::Result<()> {
        self.0.remove(&upstream);
        Ok(())
    }

    fn list(&self) -> anyhow::Result<Vec<StoredOverride>> {
        Ok(self.0.values().copied().collect())
    }
}
