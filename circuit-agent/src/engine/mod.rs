//! The breaker engine: pure decision logic, one state machine per upstream.
//!
//! No I/O and no kernel types here: outcomes come in, state changes and the enforcement
//! each upstream needs come out, and time comes from an injected [`Clock`].

mod breaker;

use std::{collections::HashMap, net::SocketAddr};

pub use crate::time::{Clock, ManualClock, MonoTime, MonotonicClock};
pub use breaker::{
    Breaker, BreakerPolicy, BreakerState, Change, OutcomeCounts, PolicyError, Reason, outcome_name,
};
use circuit_common::ConnectOutcome;

/// What the enforcement points must do for an upstream. No enforcement means admit all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Reject every new connection.
    Reject,
    /// Admit `budget` new connections in total as probes, reject the rest.
    Probe { budget: u32 },
}

/// A state change of one upstream's breaker, with what the breaker had seen by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub upstream: SocketAddr,
    pub change: Change,
    pub counts: OutcomeCounts,
}

/// All breakers of the node, created on an upstream's first outcome.
pub struct Breakers<C> {
    clock: C,
    policy: BreakerPolicy,
    breakers: HashMap<SocketAddr, Breaker>,
}

impl<C: Clock> Breakers<C> {
    pub fn new(policy: BreakerPolicy, clock: C) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(Self {
            clock,
            policy,
            breakers: HashMap::new(),
        })
    }

    pub fn now(&self) -> MonoTime {
        self.clock.now()
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    pub fn record(&mut self, upstream: SocketAddr, outcome: ConnectOutcome) -> Option<Transition> {
        let now = self.clock.now();
        let breaker = self
            .breakers
            .entry(upstream)
            .or_insert_with(|| Breaker::new(now));
        let change = breaker.record(outcome, now, &self.policy)?;
        Some(Transition {
            upstream,
            change,
            counts: breaker.counts(),
        })
    }

    /// Takes over an upstream whose enforcement a previous agent left in the kernel, so a
    /// restart keeps isolating it instead of re-learning. An open breaker restarts its open
    /// period: the time already spent is unknown.
    pub fn adopt(&mut self, upstream: SocketAddr, enforcement: Enforcement) -> Transition {
        let now = self.clock.now();
        let to = match enforcement {
            Enforcement::Reject => BreakerState::Open,
            Enforcement::Probe { .. } => BreakerState::HalfOpen,
        };
        let breaker = Breaker::adopted(to, now);
        let counts = breaker.counts();
        self.breakers.insert(upstream, breaker);
        Transition {
            upstream,
            change: Change {
                from: BreakerState::Closed,
                to,
                reason: Reason::Adopted,
                at: now,
            },
            counts,
        }
    }

    /// Applies every time-driven transition that is due.
    pub fn tick(&mut self) -> Vec<Transition> {
        let now = self.clock.now();
        let policy = &self.policy;
        self.breakers
            .iter_mut()
            .filter_map(|(upstream, breaker)| {
                let change = breaker.tick(now, policy)?;
                Some(Transition {
                    upstream: *upstream,
                    change,
                    counts: breaker.counts(),
                })
            })
            .collect()
    }

    /// The earliest time at which [`Breakers::tick`] has work.
    pub fn next_deadline(&self) -> Option<MonoTime> {
        self.breakers
            .values()
            .filter_map(|b| b.deadline(&self.policy))
            .min()
    }

    pub fn enforcement(&self, upstream: &SocketAddr) -> Option<Enforcement> {
        self.breakers
            .get(upstream)
            .and_then(|b| enforcement_for(b.state(), &self.policy))
    }

    /// Every upstream that currently needs enforcing.
    pub fn enforcements(&self) -> impl Iterator<Item = (SocketAddr, Enforcement)> + '_ {
        self.breakers
            .iter()
            .filter_map(|(u, b)| Some((*u, enforcement_for(b.state(), &self.policy)?)))
    }

    pub fn get(&self, upstream: &SocketAddr) -> Option<&Breaker> {
        self.breakers.get(upstream)
    }

    pub fn len(&self) -> usize {
        self.breakers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.breakers.is_empty()
    }
}

fn enforcement_for(state: BreakerState, policy: &BreakerPolicy) -> Option<Enforcement> {
    match state {
        BreakerState::Closed => None,
        BreakerState::Open => Some(Enforcement::Reject),
        BreakerState::HalfOpen => Some(Enforcement::Probe {
            budget: policy.half_open_probes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn setup() -> (Breakers<ManualClock>, ManualClock) {
        let clock = ManualClock::new(MonoTime::from_nanos(1_000));
        let policy = BreakerPolicy {
            failure_threshold: 2,
            open_duration: Duration::from_secs(5),
            half_open_probes: 1,
            success_threshold: 1,
            half_open_max_wait: Duration::from_secs(5),
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
        assert_eq!(set.enforcement(&a), Some(Enforcement::Probe { budget: 1 }));
        let t = set
            .record(a, ConnectOutcome::Connected)
            .expect("probe closes");
        assert_eq!(t.change.to, BreakerState::Closed);
        assert_eq!(set.enforcement(&a), None);
        assert_eq!(set.next_deadline(), None);
    }

    #[test]
    fn adoption_keeps_isolating_after_a_restart() {
        let (mut set, clock) = setup();
        let a = addr("10.0.0.9:5432");
        let t = set.adopt(a, Enforcement::Reject);
        assert_eq!(t.change.reason, Reason::Adopted);
        assert_eq!(set.enforcement(&a), Some(Enforcement::Reject));
        clock.advance(Duration::from_secs(5));
        assert_eq!(set.tick()[0].change.to, BreakerState::HalfOpen);
    }

    #[test]
    fn an_invalid_policy_is_refused() {
        let policy = BreakerPolicy {
            half_open_probes: 0,
            ..BreakerPolicy::default()
        };
        assert!(matches!(
            Breakers::new(policy, ManualClock::default()),
            Err(PolicyError::ZeroProbes)
        ));
    }
}
