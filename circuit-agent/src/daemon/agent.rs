//! The agent's reactions, one method per event source: outcomes from the kernel, the
//! engine's timer, lease renewal, a control request, a reloaded configuration. The event
//! loop in [`super::run`] only waits and dispatches; everything it dispatches to is here,
//! over the dataplane ports, so it runs in unit tests against memory.

use tracing::{error, info};

use super::{log_notices, operator::Operator, sync::VerdictSync};
use crate::{
    engine::{
        Breakers, ClientId, Clock, EngineConfig, InvalidSetting, Observation, Reason, outcome_name,
    },
    kernel::Outcome,
    ports::{OverrideStore, VerdictStore},
    surfaces::control::{self, ControlRequest, Query},
};

pub(super) struct Agent<'a, C, V, O> {
    pub(super) breakers: Breakers<C>,
    pub(super) sync: VerdictSync<'a, V>,
    pub(super) operator: Operator<O>,
}

impl<C: Clock, V: VerdictStore, O: OverrideStore> Agent<'_, C, V, O> {
    /// Takes over what an earlier agent left: its verdicts, then its operators' commands.
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        self.sync.adopt(&mut self.breakers)?;
        self.sync.adopt_routes(&mut self.breakers)?;
        self.operator.restore(&mut self.breakers, &mut self.sync)
    }

    /// A batch of connection outcomes from the kernel.
    pub(super) fn on_outcomes(
        &mut self,
        batch: impl IntoIterator<Item = Outcome>,
    ) -> anyhow::Result<()> {
        let metrics = self.sync.metrics;
        for outcome in batch {
            tracing::debug!(
                upstream = %outcome.upstream,
                service = outcome.service.map(|s| s.to_string()),
                outcome = %outcome_name(outcome.outcome),
                client = outcome.client_cgroup,
                latency_us = outcome.latency.as_micros() as u64,
                "connection outcome"
            );
            metrics.outcome(outcome.outcome);
            let latency = (!outcome.latency.is_zero()).then_some(outcome.latency);
            let client = ClientId(outcome.client_cgroup);
            let t = self.breakers.observe(
                outcome.upstream,
                Observation::new(outcome.outcome, latency, client).via(outcome.service),
            );
            if let Some(t) = t {
                self.sync.apply(&self.breakers, &t, Some(&outcome))?;
            }
        }
        self.settle();
        Ok(())
    }

    /// The engine's next deadline came: open periods end, probes time out, idle breakers go.
    pub(super) fn on_timer(&mut self) -> anyhow::Result<()> {
        for t in self.breakers.tick() {
            self.sync.apply(&self.breakers, &t, None)?;
            if matches!(t.change.reason, Reason::ForceExpired { .. }) {
                self.operator.forget(t.upstream);
            }
        }
        self.settle();
        Ok(())
    }

    /// Every third of a lease: the kernel's verdicts get a new lease.
    pub(super) fn on_renew(&mut self) -> anyhow::Result<()> {
        self.sync.renew_all(&self.breakers)
    }

    /// A request on the control socket: operator commands change breakers, the rest read.
    pub(super) fn on_request(&mut self, request: ControlRequest) {
        match request.query {
            Query::Operator(command) => {
                let reply = self
                    .operator
                    .handle(command, &mut self.breakers, &mut self.sync);
                self.settle();
                request.reply(&reply);
            }
            _ => control::answer(
                request,
                &mut self.breakers,
                &*self.sync.table,
                self.sync.events,
                self.sync.names.as_mut(),
            ),
        }
    }

    /// A new engine configuration (already checked by the caller's parser): states and
    /// counters are kept, policies change, and every verdict follows. An invalid one changes
    /// nothing.
    pub(super) fn on_reload(&mut self, engine: &EngineConfig) -> anyhow::Result<ReloadOutcome> {
        let transitions = match self.breakers.apply_config(engine) {
            Ok(t) => t,
            Err(invalid) => return Ok(ReloadOutcome::Rejected(invalid)),
        };
        // A whole host's never-isolated ports follow the new rules before anything else.
        if let Err(err) = self.sync.spare_all(&self.breakers) {
            error!(error = %format!("{err:#}"), "spared ports not written");
        }
        for t in &transitions {
            self.sync.apply(&self.breakers, t, None)?;
        }
        info!(
            groups = engine.groups.len(),
            transitions = transitions.len(),
            "configuration reloaded; breaker states kept"
        );
        // Routes follow at once (a service opted out of re-routing, say).
        self.settle();
        Ok(ReloadOutcome::Applied)
    }

    /// After any change: client-scoped verdicts, notices and the tracked count catch up.
    fn settle(&mut self) {
        self.sync.apply_client_changes(&mut self.breakers);
        self.sync.route_services(&self.breakers);
        for service in log_notices(&mut self.breakers, self.sync.metrics) {
            if let Err(err) = self.sync.table.clear(service) {
                error!(%service, error = %format!("{err:#}"), "verdict of a virtual address not cleared");
            }
        }
        self.sync.metrics.set_tracked(self.breakers.len());
    }
}

/// What a reload did.
#[derive(Debug)]
pub(super) enum ReloadOutcome {
    Applied,
    /// The engine refused it; nothing changed.
    Rejected(InvalidSetting),
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::SocketAddr, time::Duration};

    use circuit_common::{ConnectOutcome, VerdictState};

    use super::*;
    use crate::{
        daemon::memory::{MemoryOverrides, MemoryVerdicts},
        engine::{BreakerPolicy, BreakerState, ManualClock, Selector},
        surfaces::{control::EventHub, metrics::Metrics},
        time::MonoTime,
    };

    fn config() -> EngineConfig {
        EngineConfig::with_policy(BreakerPolicy {
            failure_threshold: 2,
            min_witnesses: 1,
            open_duration: Duration::from_secs(5),
            ..BreakerPolicy::default()
        })
    }

    fn outcome(upstream: SocketAddr, outcome: ConnectOutcome, at: MonoTime) -> Outcome {
        Outcome {
            upstream,
            outcome,
            latency: Duration::from_millis(1),
            observed_at: at,
            client_cgroup: 42,
            service: None,
        }
    }

    /// Runs `f` on an agent over `store`, with a manual clock and the real surfaces.
    fn with_agent<R>(
        store: &mut MemoryVerdicts,
        f: impl FnOnce(&mut Agent<'_, ManualClock, MemoryVerdicts, MemoryOverrides>, &ManualClock) -> R,
    ) -> (R, String) {
        let clock = ManualClock::new(MonoTime::from_nanos(1_000_000_000));
        let (metrics, events) = (Metrics::new(None, 100), EventHub::default());
        let mut agent = Agent {
            breakers: Breakers::with_config(&config(), clock.clone()).unwrap(),
            sync: VerdictSync {
                table: store,
                lease: Duration::from_secs(15),
                metrics: &metrics,
                events: &events,
                lifecycles: HashMap::new(),
                routes: Default::default(),
                names: None,
            },
            operator: Operator {
                table: MemoryOverrides::default(),
            },
        };
        let result = f(&mut agent, &clock);
        (result, metrics.encode())
    }

    #[test]
    fn outcomes_trip_and_the_timer_half_opens() {
        let up: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let mut store = MemoryVerdicts::default();
        let ((), metrics) = with_agent(&mut store, |agent, clock| {
            let now = clock.now();
            agent
                .on_outcomes([
                    outcome(up, ConnectOutcome::Refused, now),
                    outcome(up, ConnectOutcome::Refused, now),
                ])
                .unwrap();
            assert_eq!(agent.breakers.get(&up).unwrap().state(), BreakerState::Open);
            clock.advance(Duration::from_secs(5));
            agent.on_timer().unwrap();
        });
        assert_eq!(store.verdicts[&up].state, VerdictState::HalfOpen);
        assert!(
            metrics.contains(r#"circuit_outcomes_total{kind="refused"} 2"#),
            "{metrics}"
        );
        assert!(metrics.contains("circuit_tracked_upstreams 1"), "{metrics}");
    }

    #[test]
    fn a_reload_that_exempts_an_open_upstream_lifts_its_verdict_and_a_bad_one_changes_nothing() {
        let up: SocketAddr = "192.0.2.7:443".parse().unwrap();
        let mut store = MemoryVerdicts::default();
        with_agent(&mut store, |agent, clock| {
            let now = clock.now();
            let refused = outcome(up, ConnectOutcome::Refused, now);
            agent.on_outcomes([refused, refused]).unwrap();
            assert!(agent.sync.table.verdicts.contains_key(&up));

            let mut invalid = config();
            invalid.tracking.max_upstreams = 0;
            assert!(matches!(
                agent.on_reload(&invalid).unwrap(),
                ReloadOutcome::Rejected(_)
            ));
            assert!(
                agent.sync.table.verdicts.contains_key(&up),
                "nothing changed"
            );

            let mut exempting = config();
            exempting.never_isolate.upstreams =
                vec![Selector::any_port("192.0.2.7".parse().unwrap())];
            assert!(matches!(
                agent.on_reload(&exempting).unwrap(),
                ReloadOutcome::Applied
            ));
        });
        assert!(
            store.verdicts.is_empty(),
            "a never-isolated upstream is admitted"
        );
    }

    fn via(service: &str, endpoint: SocketAddr, kind: ConnectOutcome, at: MonoTime) -> Outcome {
        Outcome {
            service: Some(service.parse().unwrap()),
            ..outcome(endpoint, kind, at)
        }
    }

    #[test]
    fn a_dead_endpoint_behind_a_service_is_routed_around_and_the_service_fails_only_when_all_are() {
        let vip = "10.96.0.10:80";
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.1.0.1:8080".parse().unwrap(),
            "10.1.0.2:8080".parse().unwrap(),
        );
        let mut store = MemoryVerdicts::default();
        with_agent(&mut store, |agent, clock| {
            let now = clock.now();
            agent
                .on_outcomes([
                    via(vip, a, ConnectOutcome::Connected, now),
                    via(vip, b, ConnectOutcome::Connected, now),
                ])
                .unwrap();
            assert!(
                agent.sync.table.routes.is_empty(),
                "all healthy: the NAT decides"
            );
            // The service's own address is no upstream: an unresolved outcome is no evidence.
            let unresolved = outcome(vip.parse().unwrap(), ConnectOutcome::Refused, now);
            agent.on_outcomes([unresolved, unresolved]).unwrap();
            assert!(agent.breakers.get(&vip.parse().unwrap()).is_none());

            let refused = via(vip, a, ConnectOutcome::Refused, now);
            agent.on_outcomes([refused, refused]).unwrap();
            assert_eq!(agent.sync.table.verdicts[&a].state, VerdictState::Open);
            let (route, _) = &agent.sync.table.routes[&vip.parse().unwrap()];
            assert_eq!(
                route,
                &crate::kernel::Route::Reroute(vec![b, a]),
                "admitting first"
            );

            let refused = via(vip, b, ConnectOutcome::Refused, now);
            agent.on_outcomes([refused, refused]).unwrap();
            assert_eq!(
                agent.breakers.service_state(&vip.parse().unwrap()),
                crate::engine::ServiceState::Open
            );

            // Opted out of re-routing: the service fails fast once every endpoint is OPEN.
            let mut no_reroute = config();
            no_reroute.services.no_reroute =
                vec![Selector::any_port("10.96.0.10".parse().unwrap())];
            agent.on_reload(&no_reroute).unwrap();
            agent.on_outcomes([]).unwrap();
            let (route, _) = &agent.sync.table.routes[&vip.parse().unwrap()];
            assert_eq!(route, &crate::kernel::Route::FailFast);

            // Both endpoints half-open after their open duration: nothing is failed whole.
            clock.advance(Duration::from_secs(5));
            agent.on_timer().unwrap();
            assert!(
                agent.sync.table.routes.is_empty(),
                "probes go through the NAT"
            );
        });
    }

    #[test]
    fn a_routed_service_goes_back_to_its_nat_to_relearn_its_endpoints() {
        let vip = "10.96.0.10:80";
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.1.0.1:8080".parse().unwrap(),
            "10.1.0.2:8080".parse().unwrap(),
        );
        let mut store = MemoryVerdicts::default();
        with_agent(&mut store, |agent, clock| {
            let now = clock.now();
            let refused = via(vip, a, ConnectOutcome::Refused, now);
            agent
                .on_outcomes([
                    via(vip, b, ConnectOutcome::Connected, now),
                    refused,
                    refused,
                ])
                .unwrap();
            assert!(agent.sync.table.routes.contains_key(&vip.parse().unwrap()));
            // Re-routed connects name `b` directly: no NAT decision refreshes the service.
            let direct = outcome(b, ConnectOutcome::Connected, now);
            for _ in 0..3 {
                clock.advance(Duration::from_secs(20));
                agent.on_outcomes([direct]).unwrap();
                agent.on_timer().unwrap();
            }
            assert!(
                agent.sync.table.routes.is_empty(),
                "after relearn_after the service is forgotten and its route lifted"
            );
            assert_eq!(
                agent
                    .breakers
                    .services()
                    .endpoints(&vip.parse().unwrap())
                    .count(),
                0
            );
            // The NAT's next pick of the isolated endpoint brings it all back.
            let seen = via(vip, a, ConnectOutcome::Refused, clock.now());
            agent.on_outcomes([seen]).unwrap();
            assert!(agent.sync.table.routes.contains_key(&vip.parse().unwrap()));
        });
    }

    #[test]
    fn start_learns_the_services_of_the_routes_an_earlier_agent_left() {
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.1.0.1:8080".parse().unwrap(),
            "10.1.0.2:8080".parse().unwrap(),
        );
        let mut store = MemoryVerdicts::default();
        let lease = MonoTime::from_nanos(5_000_000_000);
        store
            .set(a, crate::kernel::VerdictSpec::reject(), lease)
            .unwrap();
        store
            .set_route(vip, &crate::kernel::Route::Reroute(vec![b, a]), lease)
            .unwrap();
        let lapsed: SocketAddr = "10.96.0.11:80".parse().unwrap();
        store
            .set_route(
                lapsed,
                &crate::kernel::Route::Reroute(vec![b]),
                MonoTime::from_nanos(1),
            )
            .unwrap();
        with_agent(&mut store, |agent, _| {
            agent.start().unwrap();
            let learned: Vec<SocketAddr> = agent.breakers.services().endpoints(&vip).collect();
            assert_eq!(learned, vec![a, b]);
            assert_eq!(
                agent.breakers.service_state(&vip),
                crate::engine::ServiceState::Degraded
            );
        });
        assert!(store.routes.contains_key(&vip), "re-routing carries on");
        assert!(
            !store.routes.contains_key(&lapsed),
            "a lapsed route is dropped"
        );
    }

    #[test]
    fn start_takes_over_an_earlier_agents_verdicts() {
        let up: SocketAddr = "[2001:db8::5]:80".parse().unwrap();
        let mut store = MemoryVerdicts::default();
        store
            .set(
                up,
                crate::kernel::VerdictSpec::reject(),
                MonoTime::from_nanos(5_000_000_000),
            )
            .unwrap();
        with_agent(&mut store, |agent, _| {
            agent.start().unwrap();
            assert_eq!(agent.breakers.get(&up).unwrap().state(), BreakerState::Open);
        });
        assert_eq!(store.verdicts[&up].state, VerdictState::Open);
    }
}
