//! circuit's breaker engine: pure decision logic, one state machine per upstream.
//!
//! No I/O and no kernel types here: outcomes come in, state changes and the enforcement
//! each upstream needs come out, time comes from an injected [`Clock`] and jitter from a
//! seeded generator.
//!
//! # Entry points
//!
//! - Build: [`Breakers::with_config`]`(&EngineConfig, clock)` for a whole [`EngineConfig`]
//!   (groups, overrides, never-isolate list, guards, bounds), or [`Breakers::new`]`(policy,
//!   clock)` for one policy applied to every upstream. [`Breakers::with_jitter_seed`] makes
//!   jitter reproducible.
//! - Feed: [`Breakers::record`] (latency unknown), [`Breakers::record_with_latency`] (pass the
//!   kernel's connect latency when it saw the start; the slow-connect detector needs it), or
//!   [`Breakers::observe`] with an [`Observation`]. Each returns the [`Transition`] it caused.
//! - Time: call [`Breakers::tick`] at [`Breakers::next_deadline`]; it returns the time-driven
//!   transitions and evicts idle breakers.
//! - Enforce: after a transition, write [`Breakers::decision`] for its upstream (`None`:
//!   clear the verdict); renew from [`Breakers::decisions`]. A [`Decision`] has the action
//!   (reject / probe budget), the share of connections it applies to (partial breaking), and
//!   whether it is a dry run (METRICS_ONLY: count would-be rejects, reject nothing).
//!   [`Breakers::enforcement`] / [`Breakers::enforcements`] are the older all-or-nothing view
//!   without dry runs.
//! - Log: [`Breakers::drain_notices`] after feeding: suppressed trips (group ejection cap,
//!   panic guard) with their numbers, and tracking saturation. [`Breakers::stats`],
//!   [`Breakers::groups`], [`Breakers::node_activity`] and [`Breakers::memory`] are for
//!   metrics.
//! - Operate: [`Breakers::force_open`], [`Breakers::reset`], [`Breakers::disable`],
//!   [`Breakers::enable`]; each returns the [`Transition`] (reason [`Reason::Manual`]).
//! - Reload: [`Breakers::apply_config`] keeps states and counters, changes policies.
//! - Restart: [`Breakers::adopt`] each verdict a previous agent left in the kernel.

mod backoff;
mod breaker;
mod change;
mod clock;
mod eviction;
mod guard;
mod index;
mod lru;
mod manager;
pub mod policy;
mod rules;
mod selector;
mod services;
pub mod settings;
mod units;
mod window;
mod witness;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod scenarios;

use std::net::SocketAddr;

pub use backoff::{JitterRng, OpenPeriod};
pub use breaker::{
    Breaker, BreakerState, Change, ManualAction, Observation, OutcomeCounts, Reason, Signal,
    outcome_name,
};
pub use clock::{Clock, ManualClock, MonoTime, saturating_nanos};
pub use guard::{Activity, GuardPatch, GuardPolicy, GuardScope, Suppressed, SuppressionCause};
pub use manager::{
    Breakers, ControlError, EvictionCause, GroupStatus, ManagerStats, MemoryUsage, NOTICE_CAPACITY,
    Notice,
};
pub use policy::{
    AdaptivePatch, AdaptivePolicy, BackoffKind, BreakerPolicy, FailureRatePatch, FailureRatePolicy,
    FlappingPatch, FlappingPolicy, Layered, Mode, PolicyError, PolicyPatch, SlowConnectPatch,
    SlowConnectPolicy, WindowKind, WindowPatch, WindowPolicy,
};
pub use selector::{Cidr, Selector, Specificity};
pub use services::{ServiceBook, ServiceState, ServicesConfig, ServicesPatch, derive_state};
pub use settings::{
    BREAKER_MEMORY_BUDGET, EngineConfig, EnginePatch, FieldPath, GroupConfig, InvalidSetting,
    NeverIsolateConfig, NeverIsolatePatch, OverrideConfig, PathSegment, TrackingConfig,
    TrackingPatch,
};
pub use units::{Factor, HumanDuration, Percent};
pub use window::WindowTotals;
pub use witness::{ClientHold, ClientId, ClientWitness, Scope};

/// What the enforcement points must do for an upstream. No enforcement means admit all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Reject every new connection.
    Reject,
    /// Admit `budget` new connections as probes, reject the rest; each new `round` gives back the tokens of probes that will not
    /// report, topping the free ones up to `budget` again.
    Probe { budget: u32, round: u32 },
}

/// Everything the enforcement points need for one upstream.
///
/// `reject_percent` is the share of the connections `action` would reject that are actually
/// rejected, each chosen at random in the kernel: 100 % unless the policy configures partial
/// breaking. With `dry_run` (a METRICS_ONLY breaker) the kernel rejects nothing and counts
/// the connections it would have rejected. Suggested mapping to kernel verdicts: `Reject` at
/// 100 % → OPEN; `Reject` below 100 % → PARTIAL with that fraction; `Probe` → HALF_OPEN;
/// `dry_run` → the verdict's dry-run flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Enforcement,
    pub reject_percent: Percent,
    pub dry_run: bool,
}

impl Decision {
    /// The action when the decision is enforced, as an all-or-nothing [`Enforcement`] (a
    /// partial reject counts as a reject).
    pub fn enforced_action(self) -> Option<Enforcement> {
        (!self.dry_run).then_some(self.action)
    }

    /// Whether only part of the connections are rejected (partial breaking).
    pub fn is_partial(&self) -> bool {
        self.reject_percent < Percent::HUNDRED
    }
}

/// A state change of one upstream's breaker, with what the breaker had seen by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub upstream: SocketAddr,
    pub change: Change,
    pub counts: OutcomeCounts,
    /// A METRICS_ONLY breaker's would-be transition: nothing is enforced differently.
    pub dry_run: bool,
    /// For a client-scoped change (one client failed fast, or released): that client; None
    /// for the upstream's own breaker, which every process and XDP/TC obey.
    pub client: Option<ClientId>,
}

/// Planning estimate of the memory one tracked upstream costs under `policy` (slot, index
/// bucket, LRU and activity list links with the arrays' average spare capacity, timer, and
/// the sliding window if the policy has one). [`Breakers::approx_bytes_per_upstream`] measures a running instance instead.
pub fn estimated_bytes_per_upstream(policy: &BreakerPolicy) -> usize {
    let window = if policy.needs_window() {
        window::Window::heap_bytes_for(&policy.window)
    } else {
        0
    };
    manager::fixed_bytes_per_upstream() + window
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use circuit_common::ConnectOutcome;

    use super::*;
    use crate::EngineConfig;

    fn setup() -> (Breakers<ManualClock>, ManualClock) {
        let clock = ManualClock::new(MonoTime::from_nanos(1_000));
        let policy = BreakerPolicy {
            failure_threshold: 2,
            open_duration: Duration::from_secs(5),
            half_open_probes: 1,
            success_threshold: 1,
            probe_timeout: Duration::from_secs(5),
            // One witness, as before that rule: these tests are about the breakers.
            min_witnesses: 1,
            ..Default::default()
        };
        (Breakers::new(policy, clock.clone()).unwrap(), clock)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn breakers_are_independent_per_upstream() {
        let (mut set, _) = setup();
        let a = addr("10.0.0.1:80");
        let b = addr("10.0.0.1:81");
        set.record(a, ConnectOutcome::Refused);
        set.record(b, ConnectOutcome::Refused);
        set.record(b, ConnectOutcome::Connected);
        let t = set.record(a, ConnectOutcome::Refused).expect("a trips");
        assert_eq!(t.upstream, a);
        assert_eq!(t.counts.refused, 2);
        assert!(!t.dry_run);
        assert_eq!(set.enforcement(&a), Some(Enforcement::Reject));
        assert_eq!(set.enforcement(&b), None);
        assert_eq!(set.len(), 2);
        assert_eq!(
            set.enforcements().collect::<Vec<_>>(),
            vec![(a, Enforcement::Reject)]
        );
    }

    #[test]
    fn full_cycle_driven_by_the_injected_clock() {
        let (mut set, clock) = setup();
        let a = addr("[2001:db8::1]:443");
        set.record(a, ConnectOutcome::TimedOut);
        set.record(a, ConnectOutcome::TimedOut);
        let opened_at = clock.now();
        assert_eq!(
            set.next_deadline(),
            Some(opened_at.saturating_add(Duration::from_secs(5)))
        );
        clock.advance(Duration::from_millis(4_999));
        assert!(set.tick().is_empty());
        clock.advance(Duration::from_millis(1));
        let ts = set.tick();
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].change.to, BreakerState::HalfOpen);
        assert_eq!(
            set.enforcement(&a),
            Some(Enforcement::Probe {
                budget: 1,
                round: 0
            })
        );
        let t = set
            .record(a, ConnectOutcome::Connected)
            .expect("probe closes");
        assert_eq!(t.change.to, BreakerState::Closed);
        assert_eq!(set.enforcement(&a), None);
        // Only the idle eviction of the now CLOSED breaker is left.
        let idle_after = EngineConfig::default().tracking.idle_after;
        assert_eq!(
            set.next_deadline(),
            Some(clock.now().saturating_add(idle_after))
        );
        clock.advance(idle_after);
        assert!(set.tick().is_empty());
        assert!(set.is_empty());
        assert_eq!(set.next_deadline(), None);
    }

    #[test]
    fn adoption_keeps_isolating_after_a_restart() {
        let (mut set, clock) = setup();
        let a = addr("10.0.0.9:5432");
        let t = set.adopt(a, Enforcement::Reject);
        assert_eq!(t.change.reason, Reason::Adopted);
        assert_eq!(
            (t.change.from, t.change.to),
            (BreakerState::Closed, BreakerState::Open)
        );
        assert_eq!(set.enforcement(&a), Some(Enforcement::Reject));
        clock.advance(Duration::from_secs(5));
        assert_eq!(set.tick()[0].change.to, BreakerState::HalfOpen);
        let b = addr("10.0.0.9:5433");
        let t = set.adopt(
            b,
            Enforcement::Probe {
                budget: 1,
                round: 0,
            },
        );
        assert_eq!(t.change.to, BreakerState::HalfOpen);
        assert_eq!(
            set.enforcement(&b),
            Some(Enforcement::Probe {
                budget: 1,
                round: 0
            })
        );
    }

    #[test]
    fn an_invalid_policy_is_refused() {
        let policy = BreakerPolicy {
            half_open_probes: 0,
            ..BreakerPolicy::default()
        };
        let Err(err) = Breakers::new(policy, ManualClock::default()) else {
            panic!("accepted");
        };
        assert_eq!(err.field, "half_open_probes");
    }

    #[test]
    fn decisions_carry_dry_run_and_partial_shares() {
        let decision = Decision {
            action: Enforcement::Reject,
            reject_percent: Percent::new(30),
            dry_run: true,
        };
        assert_eq!(decision.enforced_action(), None);
        assert!(decision.is_partial());
        let enforced = Decision {
            dry_run: false,
            ..decision
        };
        assert_eq!(enforced.enforced_action(), Some(Enforcement::Reject));
    }

    #[test]
    fn the_memory_estimate_is_small_and_counts_the_window() {
        let plain = estimated_bytes_per_upstream(&BreakerPolicy::default());
        assert!(plain < 1_024, "{plain} bytes per upstream");
        let mut windowed = BreakerPolicy::default();
        windowed.failure_rate.enabled = true;
        assert_eq!(
            estimated_bytes_per_upstream(&windowed),
            plain + size_of::<window::Window>() + 2 * 2 * size_of::<u64>()
        );
    }
}
