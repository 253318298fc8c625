//! The daemon's ports: what it needs of the dataplane, as traits. The kernel's pinned maps
//! ([`VerdictTable`], [`OverrideTable`]) are the production adapters; the daemon's unit
//! tests plug in memory instead, so the glue between engine and kernel is tested without
//! root. The real kernel keeps its end-to-end tests.

use std::{collections::BTreeSet, net::SocketAddr};

use circuit_common::OverrideKind;

use crate::{
    kernel::{OverrideTable, Route, StoredOverride, StoredVerdict, VerdictSpec, VerdictTable},
    time::MonoTime,
};

/// Where verdicts are enforced: the upstreams' own verdicts (every process, XDP, TC), the
/// client-scoped ones (one cgroup fails fast) and the ports a whole-host verdict spares.
pub trait VerdictStore {
    /// Enforces `spec` for `upstream` (a fresh probe budget) until `lease_expires`. Port 0
    /// stands for the whole host.
    fn set(
        &mut self,
        upstream: SocketAddr,
        spec: VerdictSpec,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()>;
    /// Moves an existing verdict's lease; false when there is none.
    fn renew(&mut self, upstream: SocketAddr, lease_expires: MonoTime) -> anyhow::Result<bool>;
    /// Admits everything to `upstream` again.
    fn clear(&mut self, upstream: SocketAddr) -> anyhow::Result<()>;
    /// [`VerdictStore::clear`] for many upstreams at once (an adapter may batch the work).
    fn clear_many(&mut self, upstreams: &[SocketAddr]) -> anyhow::Result<()> {
        upstreams.iter().try_for_each(|&u| self.clear(u))
    }
    fn get(&self, upstream: SocketAddr) -> anyhow::Result<Option<StoredVerdict>>;
    /// Every verdict, in upstream order.
    fn list(&self) -> anyhow::Result<Vec<StoredVerdict>>;
    /// Spares `wanted` (host, port) pairs from their hosts' whole-host verdicts.
    fn spare(&mut self, wanted: &BTreeSet<SocketAddr>) -> anyhow::Result<()>;
    /// Fails `client` (a cgroup) fast at `upstream` until `lease_expires`.
    fn set_client(
        &mut self,
        upstream: SocketAddr,
        client: u64,
        dry_run: bool,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()>;
    fn clear_client(&mut self, upstream: SocketAddr, client: u64) -> anyhow::Result<()>;
    /// Re-routes (or fails) connects to the virtual address `service` until `lease_expires`.
    fn set_route(
        &mut self,
        service: SocketAddr,
        route: &Route,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()>;
    /// Leaves connects to `service` to its NAT again.
    fn clear_route(&mut self, service: SocketAddr) -> anyhow::Result<()>;
    /// Every route, with its lease.
    fn routes(&self) -> anyhow::Result<Vec<(SocketAddr, Route, MonoTime)>>;
}

/// Where standing operator commands are recorded for the next agent.
pub trait OverrideStore {
    fn set(
        &mut self,
        upstream: SocketAddr,
        kind: OverrideKind,
        until: Option<MonoTime>,
        now: MonoTime,
    ) -> anyhow::Result<()>;
    fn remove(&mut self, upstream: SocketAddr) -> anyhow::Result<()>;
    fn list(&self) -> anyhow::Result<Vec<StoredOverride>>;
}

impl VerdictStore for VerdictTable {
    fn set(
        &mut self,
        upstream: SocketAddr,
        spec: VerdictSpec,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        VerdictTable::set(self, upstream, spec, lease_expires)
    }

    fn renew(&mut self, upstream: SocketAddr, lease_expires: MonoTime) -> anyhow::Result<bool> {
        VerdictTable::renew(self, upstream, lease_expires)
    }

    fn clear(&mut self, upstream: SocketAddr) -> anyhow::Result<()> {
        VerdictTable::clear(self, upstream)
    }

    fn clear_many(&mut self, upstreams: &[SocketAddr]) -> anyhow::Result<()> {
        VerdictTable::clear_many(self, upstreams)
    }

    fn get(&self, upstream: SocketAddr) -> anyhow::Result<Option<StoredVerdict>> {
        VerdictTable::get(self, upstream)
    }

    fn list(&self) -> anyhow::Result<Vec<StoredVerdict>> {
        VerdictTable::list(self)
    }

    fn spare(&mut self, wanted: &BTreeSet<SocketAddr>) -> anyhow::Result<()> {
        VerdictTable::spare(self, wanted)
    }

    fn set_client(
        &mut self,
        upstream: SocketAddr,
        client: u64,
        dry_run: bool,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        VerdictTable::set_client(self, upstream, client, dry_run, lease_expires)
    }

    fn clear_client(&mut self, upstream: SocketAddr, client: u64) -> anyhow::Result<()> {
        VerdictTable::clear_client(self, upstream, client)
    }

    fn set_route(
        &mut self,
        service: SocketAddr,
        route: &Route,
        lease_expires: MonoTime,
    ) -> anyhow::Result<()> {
        VerdictTable::set_route(self, service, route, lease_expires)
    }

    fn clear_route(&mut self, service: SocketAddr) -> anyhow::Result<()> {
        VerdictTable::clear_route(self, service)
    }

    fn routes(&self) -> anyhow::Result<Vec<(SocketAddr, Route, MonoTime)>> {
        VerdictTable::routes(self)
    }
}

impl OverrideStore for OverrideTable {
    fn set(
        &mut self,
        upstream: SocketAddr,
        kind: OverrideKind,
        until: Option<MonoTime>,
        now: MonoTime,
    ) -> anyhow::Result<()> {
        OverrideTable::set(self, upstream, kind, until, now)
    }

    fn remove(&mut self, upstream: SocketAddr) -> anyhow::Result<()> {
        OverrideTable::remove(self, upstream)
    }

    fn list(&self) -> anyhow::Result<Vec<StoredOverride>> {
        OverrideTable::list(self)
    }
}
