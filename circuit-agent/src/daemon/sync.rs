//! Keeps the dataplane's verdicts equal to what the engine decides, and tells the surfaces
//! (logs, metrics, the event stream) of every transition.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Duration,
};

use circuit_common::{MAX_SERVICE_ENDPOINTS, VerdictState};
use tracing::{error, info};

use super::verdict_spec;
use crate::{
    engine::{BreakerState, Breakers, Clock, Enforcement, Transition},
    kernel::{CgroupNames, Outcome, Route, StoredVerdict},
    ports::VerdictStore,
    surfaces::{
        control::{EventHub, EventScope},
        metrics::Metrics,
    },
    time::MonoTime,
};

/// Keeps the kernel's verdicts equal to what the engine decides, and tells the surfaces.
pub(super) struct VerdictSync<'a, V> {
    pub(super) table: &'a mut V,
    pub(super) lease: Duration,
    pub(super) metrics: &'a Metrics,
    pub(super) events: &'a EventHub,
    /// One span per breaker lifecycle: opened when a breaker leaves CLOSED, closed when it
    /// returns; its transitions are events inside it.
    pub(super) lifecycles: HashMap<SocketAddr, tracing::Span>,
    /// Client cgroups by name, for people (None without a cgroup v2 hierarchy).
    pub(super) names: Option<CgroupNames>,
    /// The routes written for services, by virtual address.
    pub(super) routes: BTreeMap<SocketAddr, Route>,
}

impl<V: VerdictStore> VerdictSync<'_, V> {
    fn lease_from(&self, now: MonoTime) -> MonoTime {
        now.saturating_add(self.lease)
    }

    /// Takes over the verdicts a previous agent left whose leases are still running.
    pub(super) fn adopt<C: Clock>(&mut self, breakers: &mut Breakers<C>) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let now = breakers.now();
        let stored = self.table.list()?;
        let (expired, live): (Vec<StoredVerdict>, Vec<StoredVerdict>) =
            stored.into_iter().partition(|v| v.lease_expires <= now);
        let mut cleared: Vec<SocketAddr> = expired.iter().map(|v| v.upstream).collect();
        let mut adopted = 0usize;
        for stored in live {
            let enforcement = match stored.state {
                VerdictState::Open => Enforcement::Reject,
                VerdictState::HalfOpen => Enforcement::Probe {
                    budget: stored.probe_budget,
                    round: 0,
                },
                // Partial verdicts come from configuration, which the new agent re-derives.
                VerdictState::Partial => continue,
            };
            let t = breakers.adopt(stored.upstream, enforcement);
            if !t.dry_run && matches!(t.change.to, BreakerState::Open | BreakerState::HalfOpen) {
                self.table.renew(stored.upstream, self.lease_from(now))?;
                adopted += 1;
            } else if breakers.decision(&stored.upstream).is_none() {
                // The configuration no longer isolates it (disabled, never isolated): the
                // kernel follows the engine, not the older agent.
                cleared.push(stored.upstream);
            } else {
                // A dry run now: its verdict says so.
                self.write(breakers, stored.upstream, now)?;
            }
            // One line each would be tens of thousands after a full map: each is a debug
            // line, an event and a metric; the summary below is the log's.
            tracing::debug!(upstream = %t.upstream, from = %t.change.from, to = %t.change.to, reason = %t.change.reason, "adopted");
            self.tell_surfaces(&t, None, None, service_of(breakers, t.upstream));
        }
        self.table.clear_many(&cleared)?;
        self.spare_all(breakers)?;
        if !cleared.is_empty() || adopted > 0 {
            info!(
                adopted,
                cleared = cleared.len(),
                expired = expired.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "took over the verdicts a previous agent left (expired ones and those the configuration no longer isolates cleared)"
            );
        }
        Ok(())
    }

    /// Writes the verdict a transition calls for. A failed write is logged, not fatal: the
    /// next renewal writes it again, and the agent keeps protecting everything else.
    pub(super) fn apply<C: Clock>(
        &mut self,
        breakers: &Breakers<C>,
        t: &Transition,
        cause: Option<&Outcome>,
    ) -> anyhow::Result<()> {
        let now = breakers.now();
        let new_round = t.change.from == t.change.to;
        let budget_before = if new_round {
            self.probe_budget(t.upstream)
        } else {
            None
        };
        if let Err(err) = self.write(breakers, t.upstream, now) {
            error!(upstream = %t.upstream, error = %format!("{err:#}"), "verdict not written");
        }
        if new_round && self.probe_budget(t.upstream) == budget_before {
            // A probe round that gave nothing back (no token had been taken): nothing to tell.
            tracing::debug!(upstream = %t.upstream, reason = %t.change.reason, "probe round: no token to give back");
            return Ok(());
        }
        self.announce(
            t,
            cause.map(|o| breakers.now().since(o.observed_at)),
            service_of(breakers, t.upstream),
        );
        Ok(())
    }

    fn probe_budget(&self, upstream: SocketAddr) -> Option<u32> {
        self.table
            .get(upstream)
            .ok()
            .flatten()
            .map(|v| v.probe_budget)
    }

    fn announce(
        &mut self,
        t: &Transition,
        detect_to_verdict: Option<Duration>,
        service: Option<SocketAddr>,
    ) {
        let client_path = t.client.and_then(|c| self.names.as_mut()?.path(c.0));
        if t.client.is_some() {
            log_transition(t, detect_to_verdict, client_path.as_deref(), service);
        } else {
            let span = self
                .lifecycles
                .entry(t.upstream)
                .or_insert_with(|| tracing::info_span!("breaker", upstream = %t.upstream))
                .clone();
            span.in_scope(|| log_transition(t, detect_to_verdict, None, service));
            if t.change.to == BreakerState::Closed {
                // Dropping the last handle closes the span: the lifecycle is over.
                self.lifecycles.remove(&t.upstream);
            }
        }
        self.tell_surfaces(t, detect_to_verdict, client_path, service);
    }

    /// The transition's metric and event (`events`, `inspect`), without its log line.
    fn tell_surfaces(
        &self,
        t: &Transition,
        detect_to_verdict: Option<Duration>,
        client_path: Option<String>,
        service: Option<SocketAddr>,
    ) {
        self.metrics.transition(t, detect_to_verdict);
        self.events
            .publish(t, detect_to_verdict, client_path, service);
    }

    /// Writes the engine's decision for `upstream`. A whole host's never-isolated ports are
    /// spared before its verdict exists and until after it is gone.
    fn write<C: Clock>(
        &mut self,
        breakers: &Breakers<C>,
        upstream: SocketAddr,
        now: MonoTime,
    ) -> anyhow::Result<()> {
        let whole_host = upstream.port() == 0;
        match breakers.decision(&upstream) {
            None => {
                self.table.clear(upstream)?;
                if whole_host {
                    self.spare_all(breakers)?;
                }
                Ok(())
            }
            Some(d) => {
                if whole_host {
                    let spared = breakers.spared();
                    let ports: Vec<String> = spared
                        .iter()
                        .filter(|a| a.ip() == upstream.ip())
                        .map(|a| a.port().to_string())
                        .collect();
                    if !ports.is_empty() {
                        info!(host = %upstream.ip(), ports = %ports.join(","), "a whole-host verdict spares the host's never-isolated ports");
                    }
                    self.table.spare(&spared)?;
                }
                self.table
                    .set(upstream, verdict_spec(d), self.lease_from(now))
            }
        }
    }

    /// Makes the spared ports follow the configuration (after a reload) and heals them.
    pub(super) fn spare_all<C: Clock>(&mut self, breakers: &Breakers<C>) -> anyhow::Result<()> {
        self.table.spare(&breakers.spared())
    }

    /// Writes (or lifts) the client-scoped verdicts the engine decided since last time.
    pub(super) fn apply_client_changes<C: Clock>(&mut self, breakers: &mut Breakers<C>) {
        let now = breakers.now();
        let changes: Vec<Transition> = breakers.drain_client_changes().collect();
        for t in changes {
            let Some(client) = t.client else { continue };
            let written = if t.change.to == BreakerState::Open {
                self.table
                    .set_client(t.upstream, client.0, t.dry_run, self.lease_from(now))
            } else {
                self.table.clear_client(t.upstream, client.0)
            };
            if let Err(err) = written {
                error!(upstream = %t.upstream, %client, error = %format!("{err:#}"), "client verdict not written");
            }
            let service = service_of(breakers, t.upstream);
            self.announce(&t, None, service);
        }
    }

    /// Makes each service's route follow its endpoints' breakers: re-route while some are
    /// isolated (for every client, or held for some), fail fast when every one is OPEN and
    /// the service is not re-routed, else leave its connects to the NAT.
    pub(super) fn route_services<C: Clock>(&mut self, breakers: &Breakers<C>) {
        let book = breakers.services();
        let mut wanted: BTreeMap<SocketAddr, Route> = BTreeMap::new();
        for service in book.services() {
            if let Some(route) = wanted_route(breakers, service) {
                wanted.insert(service, route);
            }
        }
        if wanted == self.routes {
            return;
        }
        let lease = self.lease_from(breakers.now());
        let gone: Vec<SocketAddr> = self
            .routes
            .keys()
            .filter(|s| !wanted.contains_key(s))
            .copied()
            .collect();
        for service in gone {
            match self.table.clear_route(service) {
                Ok(()) => {
                    info!(%service, "service route lifted: connects go to its NAT again");
                    self.routes.remove(&service);
                }
                Err(err) => error!(%service, error = %format!("{err:#}"), "route not lifted"),
            }
        }
        for (service, route) in wanted {
            if self.routes.get(&service) == Some(&route) {
                continue;
            }
            match self.table.set_route(service, &route, lease) {
                Ok(()) => {
                    match &route {
                        Route::Reroute(endpoints) => {
                            info!(%service, endpoints = %join(endpoints), "service route: connects re-routed among these endpoints, isolated ones skipped")
                        }
                        Route::FailFast => {
                            info!(%service, "service route: every endpoint is OPEN, connects fail fast")
                        }
                    }
                    self.routes.insert(service, route);
                }
                Err(err) => error!(%service, error = %format!("{err:#}"), "route not written"),
            }
        }
    }

    /// Learns the services of the routes a previous agent left (their endpoints), so that
    /// re-routing carries on across a restart.
    pub(super) fn adopt_routes<C: Clock>(
        &mut self,
        breakers: &mut Breakers<C>,
    ) -> anyhow::Result<()> {
        let now = breakers.now();
        for (service, route, lease) in self.table.routes()? {
            match route {
                Route::Reroute(endpoints) if lease > now => {
                    for endpoint in &endpoints {
                        breakers.learn_endpoint(service, *endpoint);
                    }
                    self.routes.insert(service, Route::Reroute(endpoints));
                }
                // Nothing to learn from (or lapsed): the new agent decides afresh.
                _ => self.table.clear_route(service)?,
            }
        }
        self.route_services(breakers);
        Ok(())
    }

    pub(super) fn renew_all<C: Clock>(&mut self, breakers: &Breakers<C>) -> anyhow::Result<()> {
        let now = breakers.now();
        let lease = self.lease_from(now);
        for (service, route) in &self.routes {
            if let Err(err) = self.table.set_route(*service, route, lease) {
                error!(%service, error = %format!("{err:#}"), "route lease not renewed");
            }
        }
        for hold in breakers.client_holds() {
            let (upstream, client) = (hold.upstream, hold.client);
            if let Err(err) = self
                .table
                .set_client(upstream, client.0, hold.dry_run, lease)
            {
                error!(%upstream, %client, error = %format!("{err:#}"), "client lease not renewed");
            }
        }
        if let Err(err) = self.spare_all(breakers) {
            error!(error = %format!("{err:#}"), "spared ports not written");
        }
        for (upstream, _) in breakers.decisions() {
            // A verdict removed behind our back (by an operator, say) is written again.
            let renewed = match self.table.renew(upstream, lease) {
                Ok(true) => Ok(()),
                Ok(false) => self.write(breakers, upstream, now),
                Err(err) => Err(err),
            };
            if let Err(err) = renewed {
                error!(%upstream, error = %format!("{err:#}"), "lease not renewed");
            }
        }
        Ok(())
    }
}

/// The route `service` needs now, if any (see [`VerdictSync::route_services`]). Only
/// enforced decisions count: a dry run re-routes nothing.
fn wanted_route<C: Clock>(breakers: &Breakers<C>, service: SocketAddr) -> Option<Route> {
    let mut endpoints: Vec<SocketAddr> = breakers.services().endpoints(&service).collect();
    let enforced = |e: &SocketAddr| breakers.enforcement(e);
    if !breakers.reroutes(&service) {
        // Every endpoint rejects every connect (not a partial share, not a dry run).
        let all_open = !endpoints.is_empty()
            && endpoints.iter().all(|e| {
                breakers.decision(e).is_some_and(|d| {
                    !d.dry_run && !d.is_partial() && d.action == Enforcement::Reject
                })
            });
        return all_open.then_some(Route::FailFast);
    }
    let held = |e: &SocketAddr| breakers.client_holds_of(*e).any(|h| !h.dry_run);
    if !endpoints.iter().any(|e| enforced(e).is_some() || held(e)) {
        return None;
    }
    // The hook tries at most MAX_SERVICE_ENDPOINTS: admitting ones first, then those
    // waiting for probes (HALF_OPEN), isolated ones last.
    endpoints.sort_by_key(|e| match enforced(e) {
        None => 0,
        Some(Enforcement::Probe { .. }) => 1,
        Some(Enforcement::Reject) => 2,
    });
    endpoints.truncate(MAX_SERVICE_ENDPOINTS);
    Some(Route::Reroute(endpoints))
}

fn join(endpoints: &[SocketAddr]) -> String {
    endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The service `upstream` is an endpoint of (the first, when it is behind several).
fn service_of<C: Clock>(breakers: &Breakers<C>, upstream: SocketAddr) -> Option<SocketAddr> {
    breakers.services().services_of(&upstream).first().copied()
}

fn log_transition(
    t: &Transition,
    detect_to_verdict: Option<Duration>,
    client_path: Option<&str>,
    service: Option<SocketAddr>,
) {
    let c = t.counts;
    info!(
        upstream = %t.upstream,
        service = service.map(|s| s.to_string()),
        from = %t.change.from,
        to = %t.change.to,
        reason = %t.change.reason,
        scope = EventScope::of(t).as_str(),
        client = t.client.map(|c| c.0),
        client_path,
        dry_run = t.dry_run,
        connected = c.connected,
        refused = c.refused,
        timed_out = c.timed_out,
        rejected = c.rejected,
        syn_retransmits = c.syn_retransmits,
        resets = c.resets,
        unreachable = c.unreachable,
        aborted = c.aborted,
        detect_to_verdict_us = detect_to_verdict.map(|d| d.as_micros() as u64),
        "breaker transition"
    );
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use circuit_common::{ConnectOutcome, VerdictState};

    use super::*;
    use crate::{
        daemon::memory::MemoryVerdicts,
        engine::{BreakerPolicy, ClientId, EngineConfig, ManualClock, Observation, Selector},
        kernel::VerdictSpec,
    };

    const LEASE: Duration = Duration::from_secs(15);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 2,
            open_duration: Duration::from_secs(5),
            min_witnesses: 1,
            ..BreakerPolicy::default()
        }
    }

    /// The glue's collaborators: engine on a manual clock, a dataplane in memory, the real
    /// surfaces.
    struct Rig {
        clock: ManualClock,
        breakers: Breakers<ManualClock>,
        store: MemoryVerdicts,
        metrics: Metrics,
        events: EventHub,
    }

    impl Rig {
        fn new(config: EngineConfig) -> Self {
            let clock = ManualClock::new(MonoTime::from_nanos(1_000_000_000));
            Self {
                breakers: Breakers::with_config(&config, clock.clone()).unwrap(),
                clock,
                store: MemoryVerdicts::default(),
                metrics: Metrics::new(None, 100),
                events: EventHub::default(),
            }
        }

        fn sync(&mut self) -> (VerdictSync<'_, MemoryVerdicts>, &mut Breakers<ManualClock>) {
            (
                VerdictSync {
                    table: &mut self.store,
                    lease: LEASE,
                    metrics: &self.metrics,
                    events: &self.events,
                    lifecycles: HashMap::new(),
                    names: None,
                    routes: BTreeMap::new(),
                },
                &mut self.breakers,
            )
        }

        /// Feeds one outcome from `client` and applies what it changes, as the loop does.
        fn outcome(&mut self, upstream: SocketAddr, outcome: ConnectOutcome, client: u64) {
            let (mut sync, breakers) = self.sync();
            let t = breakers.observe(upstream, Observation::new(outcome, None, ClientId(client)));
            if let Some(t) = t {
                sync.apply(breakers, &t, None).unwrap();
            }
            sync.apply_client_changes(breakers);
        }

        fn tick(&mut self) {
            let (mut sync, breakers) = self.sync();
            for t in breakers.tick() {
                sync.apply(breakers, &t, None).unwrap();
            }
        }

        fn lease_end(&self) -> MonoTime {
            self.breakers.now().saturating_add(LEASE)
        }
    }

    #[test]
    fn a_breakers_life_is_written_to_the_dataplane_and_told_to_the_surfaces() {
        let mut rig = Rig::new(EngineConfig::with_policy(policy()));
        let up = addr("192.0.2.1:443");
        rig.outcome(up, ConnectOutcome::Refused, 1);
        assert!(rig.store.verdicts.is_empty(), "one failure trips nothing");
        rig.outcome(up, ConnectOutcome::Refused, 1);
        let open = rig.store.verdicts[&up];
        assert_eq!(open.state, VerdictState::Open);
        assert_eq!(open.lease_expires, rig.lease_end());

        rig.clock.advance(Duration::from_secs(5));
        rig.tick();
        let half_open = rig.store.verdicts[&up];
        assert_eq!(half_open.state, VerdictState::HalfOpen);
        assert_eq!(half_open.probe_budget, policy().half_open_probes);

        rig.outcome(up, ConnectOutcome::Connected, 1);
        assert!(
            rig.store.verdicts.is_empty(),
            "closed: the verdict is cleared"
        );

        let seen: Vec<(BreakerState, BreakerState)> = rig
            .events
            .recent(up)
            .iter()
            .map(|e| (e.from, e.to))
            .collect();
        assert_eq!(
            seen,
            [
                (BreakerState::Closed, BreakerState::Open),
                (BreakerState::Open, BreakerState::HalfOpen),
                (BreakerState::HalfOpen, BreakerState::Closed),
            ]
        );
        let text = rig.metrics.encode();
        assert!(
            text.contains(r#"circuit_transitions_total{from="CLOSED",to="OPEN",reason="consecutive_failures",scope="node"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn adoption_takes_over_live_verdicts_and_clears_the_rest() {
        let mut config = EngineConfig::with_policy(policy());
        let exempt = addr("192.0.2.9:443");
        config.never_isolate.upstreams = vec![Selector::any_port("192.0.2.9".parse().unwrap())];
        let mut rig = Rig::new(config);
        let now = rig.breakers.now();
        let (live, expired, partial) = (
            addr("192.0.2.1:443"),
            addr("192.0.2.2:443"),
            addr("192.0.2.3:443"),
        );
        let later = now.saturating_add(Duration::from_secs(3));
        rig.store.set(live, VerdictSpec::reject(), later).unwrap();
        rig.store.set(expired, VerdictSpec::reject(), now).unwrap();
        rig.store
            .set(partial, VerdictSpec::partial(100), later)
            .unwrap();
        rig.store.set(exempt, VerdictSpec::reject(), later).unwrap();

        let (mut sync, breakers) = rig.sync();
        sync.adopt(breakers).unwrap();

        assert_eq!(rig.breakers.get(&live).unwrap().state(), BreakerState::Open);
        let kept: Vec<SocketAddr> = rig.store.verdicts.keys().copied().collect();
        // A partial verdict comes from configuration: the new agent derives its own.
        assert_eq!(
            kept,
            [live, partial],
            "expired and never-isolated verdicts cleared"
        );
        assert_eq!(
            rig.store.verdicts[&live].lease_expires,
            rig.lease_end(),
            "the adopted verdict's lease is renewed"
        );
    }

    #[test]
    fn renewal_moves_leases_and_rewrites_a_verdict_removed_behind_the_agents_back() {
        let mut rig = Rig::new(EngineConfig::with_policy(policy()));
        let up = addr("[2001:db8::1]:80");
        rig.outcome(up, ConnectOutcome::TimedOut, 1);
        rig.outcome(up, ConnectOutcome::TimedOut, 1);
        rig.clock.advance(Duration::from_secs(4));
        rig.store.verdicts.clear();
        let (mut sync, breakers) = rig.sync();
        sync.renew_all(breakers).unwrap();
        let v = rig.store.verdicts[&up];
        assert_eq!(v.state, VerdictState::Open);
        assert_eq!(v.lease_expires, rig.lease_end());
    }

    #[test]
    fn a_whole_host_verdict_spares_the_hosts_never_isolated_ports() {
        let mut config = EngineConfig::with_policy(policy());
        let host = addr("198.51.100.7:0");
        config.never_isolate.upstreams = vec![Selector {
            cidr: "198.51.100.7".parse().unwrap(),
            ports: vec![53],
        }];
        let mut rig = Rig::new(config);
        let t = rig.breakers.force_open(host, None).unwrap();
        let (mut sync, breakers) = rig.sync();
        sync.apply(breakers, &t, None).unwrap();
        assert_eq!(rig.store.verdicts[&host].state, VerdictState::Open);
        assert_eq!(
            rig.store.spared,
            BTreeSet::from([addr("198.51.100.7:53")]),
            "port 53 stays reachable while the host is isolated"
        );
    }

    #[test]
    fn one_clients_own_failures_fail_that_client_fast_and_nobody_else() {
        // Two witnesses for a node-wide verdict: one client alone is held on its own.
        let mut rig = Rig::new(EngineConfig::with_policy(BreakerPolicy {
            min_witnesses: 2,
            ..policy()
        }));
        let up = addr("192.0.2.5:8080");
        for _ in 0..2 {
            rig.outcome(up, ConnectOutcome::Refused, 7);
        }
        assert!(rig.store.verdicts.is_empty(), "nothing for everyone");
        assert_eq!(
            rig.store.clients.keys().collect::<Vec<_>>(),
            [&(up, 7)],
            "client 7 alone fails fast"
        );
        let events = rig.events.recent(up);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].scope, EventScope::Client);
        assert_eq!(events[0].client, Some(7));
    }
}
