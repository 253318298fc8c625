//! One breaker: the state machine of a single upstream.
//!
//! CLOSED ──N consecutive failures──► OPEN ──open duration──► HALF_OPEN
//!   ▲                                  ▲                        │
//!   └──────── enough probes succeed ───┼────────────────────────┤
//!                                      └─ a probe fails, or none answers in time

use std::{fmt, time::Duration};

use circuit_common::ConnectOutcome;

use crate::time::MonoTime;

/// The rules one breaker follows. Validated by [`BreakerPolicy::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failed connects (refused or timed out) that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker rejects everything before it admits probes.
    pub open_duration: Duration,
    /// New connections admitted in HALF_OPEN (enforced by the kernel).
    pub half_open_probes: u32,
    /// Successful probes that close the breaker; at most `half_open_probes`.
    pub success_threshold: u32,
    /// How long HALF_OPEN waits for its probes' outcomes before it opens again.
    pub half_open_max_wait: Duration,
}

impl Default for BreakerPolicy {
    /// Envoy's outlier-detection defaults for the trip (5 consecutive connect failures,
    /// 30 s ejection) and resilience4j's single probe for the way back.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            half_open_probes: 1,
            success_threshold: 1,
            half_open_max_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("failure threshold must be at least 1")]
    ZeroFailureThreshold,
    #[error("half-open probes must be at least 1")]
    ZeroProbes,
    #[error("success threshold must be between 1 and half-open probes ({probes}), got {got}")]
    SuccessThreshold { got: u32, probes: u32 },
    #[error("open duration must be positive")]
    ZeroOpenDuration,
    #[error("half-open max wait must be positive")]
    ZeroHalfOpenWait,
}

impl BreakerPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.failure_threshold == 0 {
            return Err(PolicyError::ZeroFailureThreshold);
        }
        if self.half_open_probes == 0 {
            return Err(PolicyError::ZeroProbes);
        }
        if self.success_threshold == 0 || self.success_threshold > self.half_open_probes {
            return Err(PolicyError::SuccessThreshold {
                got: self.success_threshold,
                probes: self.half_open_probes,
            });
        }
        if self.open_duration.is_zero() {
            return Err(PolicyError::ZeroOpenDuration);
        }
        if self.half_open_max_wait.is_zero() {
            return Err(PolicyError::ZeroHalfOpenWait);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "CLOSED",
            BreakerState::Open => "OPEN",
            BreakerState::HalfOpen => "HALF_OPEN",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a breaker changed state, with the numbers behind the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ConsecutiveFailures {
        failures: u32,
        threshold: u32,
    },
    OpenDurationElapsed {
        open_for: Duration,
    },
    ProbesSucceeded {
        successes: u32,
        threshold: u32,
    },
    ProbeFailed {
        outcome: ConnectOutcome,
    },
    NoProbeOutcome {
        waited: Duration,
    },
    /// The agent found this verdict in the kernel when it started (left by a previous agent).
    Adopted,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ConsecutiveFailures {
                failures,
                threshold,
            } => write!(f, "{failures} consecutive failures (threshold {threshold})"),
            Reason::OpenDurationElapsed { open_for } => write!(f, "open for {}", millis(*open_for)),
            Reason::ProbesSucceeded {
                successes,
                threshold,
            } => write!(f, "{successes} successful probes (threshold {threshold})"),
            Reason::ProbeFailed { outcome } => {
                write!(f, "probe failed: {}", outcome_name(*outcome))
            }
            Reason::NoProbeOutcome { waited } => {
                write!(f, "no probe outcome within {}", millis(*waited))
            }
            Reason::Adopted => f.write_str("adopted from the kernel"),
        }
    }
}

/// A duration rounded to milliseconds, for humans.
fn millis(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

pub const fn outcome_name(outcome: ConnectOutcome) -> &'static str {
    match outcome {
        ConnectOutcome::Connected => "connected",
        ConnectOutcome::Refused => "refused",
        ConnectOutcome::TimedOut => "timed_out",
        ConnectOutcome::Rejected => "rejected",
        ConnectOutcome::SynRetransmit => "syn_retransmit",
        ConnectOutcome::Reset => "reset",
        ConnectOutcome::Unreachable => "unreachable",
    }
}

/// A state change of one breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: Reason,
    pub at: MonoTime,
}

/// Outcomes seen by one breaker since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub connected: u64,
    pub refused: u64,
    pub timed_out: u64,
    pub rejected: u64,
    pub syn_retransmits: u64,
    pub resets: u64,
    pub unreachable: u64,
}

impl OutcomeCounts {
    fn add(&mut self, outcome: ConnectOutcome) {
        match outcome {
            ConnectOutcome::Connected => self.connected += 1,
            ConnectOutcome::Refused => self.refused += 1,
            ConnectOutcome::TimedOut => self.timed_out += 1,
            ConnectOutcome::Rejected => self.rejected += 1,
            ConnectOutcome::SynRetransmit => self.syn_retransmits += 1,
            ConnectOutcome::Reset => self.resets += 1,
            ConnectOutcome::Unreachable => self.unreachable += 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
    since: MonoTime,
    consecutive_failures: u32,
    probe_successes: u32,
    counts: OutcomeCounts,
}

impl Breaker {
    pub fn new(now: MonoTime) -> Self {
        Self {
            state: BreakerState::Closed,
            since: now,
            consecutive_failures: 0,
            probe_successes: 0,
            counts: OutcomeCounts::default(),
        }
    }

    /// A breaker that starts in `state`, as when adopting a verdict left in the kernel.
    pub fn adopted(state: BreakerState, now: MonoTime) -> Self {
        Self {
            state,
            ..Self::new(now)
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// When the breaker entered its current state.
    pub fn since(&self) -> MonoTime {
        self.since
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn counts(&self) -> OutcomeCounts {
        self.counts
    }

    /// Feeds one connection outcome to the breaker.
    pub fn record(
        &mut self,
        outcome: ConnectOutcome,
        now: MonoTime,
        policy: &BreakerPolicy,
    ) -> Option<Change> {
        self.counts.add(outcome);
        let failed = match outcome {
            ConnectOutcome::Connected => false,
            ConnectOutcome::Refused
            | ConnectOutcome::TimedOut
            | ConnectOutcome::Reset
            | ConnectOutcome::Unreachable => true,
            // Our own reject says nothing about the upstream; a SYN retransmit is an early
            // warning, and its connect's final outcome follows.
            ConnectOutcome::Rejected | ConnectOutcome::SynRetransmit => return None,
        };
        match self.state {
            BreakerState::Closed if failed => {
                self.consecutive_failures += 1;
                (self.consecutive_failures >= policy.failure_threshold).then(|| {
                    self.enter(
                        BreakerState::Open,
                        Reason::ConsecutiveFailures {
                            failures: self.consecutive_failures,
                            threshold: policy.failure_threshold,
                        },
                        now,
                    )
                })
            }
            BreakerState::Closed => {
                self.consecutive_failures = 0;
                None
            }
            // Connections that were already in flight when the breaker opened; their
            // outcomes neither extend nor shorten the isolation.
            BreakerState::Open => None,
            BreakerState::HalfOpen if failed => {
                Some(self.enter(BreakerState::Open, Reason::ProbeFailed { outcome }, now))
            }
            BreakerState::HalfOpen => {
                self.probe_successes += 1;
                (self.probe_successes >= policy.success_threshold).then(|| {
                    self.enter(
                        BreakerState::Closed,
                        Reason::ProbesSucceeded {
                            successes: self.probe_successes,
                            threshold: policy.success_threshold,
                        },
                        now,
                    )
                })
            }
        }
    }

    /// When [`Breaker::tick`] has something to do next, if ever.
    pub fn deadline(&self, policy: &BreakerPolicy) -> Option<MonoTime> {
        match self.state {
            BreakerState::Closed => None,
            BreakerState::Open => Some(self.since.saturating_add(policy.open_duration)),
            BreakerState::HalfOpen => Some(self.since.saturating_add(policy.half_open_max_wait)),
        }
    }

    /// Applies the time-driven transitions due at `now`.
    pub fn tick(&mut self, now: MonoTime, policy: &BreakerPolicy) -> Option<Change> {
        if now < self.deadline(policy)? {
            return None;
        }
        let waited = now.since(self.since);
        Some(match self.state {
            BreakerState::Open => self.enter(
                BreakerState::HalfOpen,
                Reason::OpenDurationElapsed { open_for: waited },
                now,
            ),
            BreakerState::HalfOpen => {
                self.enter(BreakerState::Open, Reason::NoProbeOutcome { waited }, now)
            }
            BreakerState::Closed => return None,
        })
    }

    fn enter(&mut self, to: BreakerState, reason: Reason, now: MonoTime) -> Change {
        let change = Change {
            from: self.state,
            to,
            reason,
            at: now,
        };
        self.state = to;
        self.since = now;
        self.consecutive_failures = 0;
        self.probe_successes = 0;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: ConnectOutcome = ConnectOutcome::Refused;
    const OK: ConnectOutcome = ConnectOutcome::Connected;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 3,
            open_duration: Duration::from_secs(10),
            half_open_probes: 2,
            success_threshold: 2,
            half_open_max_wait: Duration::from_secs(5),
        }
    }

    fn t(secs: u64) -> MonoTime {
        MonoTime::from_nanos(secs * 1_000_000_000)
    }

    fn opened(p: &BreakerPolicy) -> Breaker {
        let mut b = Breaker::new(t(0));
        for _ in 0..p.failure_threshold {
            b.record(FAIL, t(1), p);
        }
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        assert_eq!(b.record(FAIL, t(1), &p), None);
        assert_eq!(b.record(ConnectOutcome::TimedOut, t(1), &p), None);
        let change = b.record(FAIL, t(2), &p).expect("third failure trips");
        assert_eq!(change.from, BreakerState::Closed);
        assert_eq!(change.to, BreakerState::Open);
        assert_eq!(
            change.reason,
            Reason::ConsecutiveFailures {
                failures: 3,
                threshold: 3
            }
        );
        assert_eq!(change.at, t(2));
        assert_eq!(b.since(), t(2));
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        b.record(FAIL, t(1), &p);
        b.record(FAIL, t(1), &p);
        b.record(OK, t(1), &p);
        assert_eq!(b.consecutive_failures(), 0);
        b.record(FAIL, t(1), &p);
        b.record(FAIL, t(1), &p);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn own_rejects_are_counted_but_never_trip() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        for _ in 0..10 {
            assert_eq!(b.record(ConnectOutcome::Rejected, t(1), &p), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.counts().rejected, 10);
    }

    #[test]
    fn half_opens_exactly_when_the_open_duration_has_elapsed() {
        let p = policy();
        let mut b = opened(&p);
        assert_eq!(b.deadline(&p), Some(t(11)));
        // Outcomes while open do not move the breaker.
        assert_eq!(b.record(OK, t(5), &p), None);
        assert_eq!(b.tick(t(10), &p), None);
        let change = b.tick(t(11), &p).expect("half-opens at the deadline");
        assert_eq!(change.to, BreakerState::HalfOpen);
        assert_eq!(
            change.reason,
            Reason::OpenDurationElapsed {
                open_for: Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn closes_after_enough_successful_probes() {
        let p = policy();
        let mut b = opened(&p);
        b.tick(t(11), &p);
        assert_eq!(b.record(OK, t(12), &p), None);
        let change = b.record(OK, t(12), &p).expect("second success closes");
        assert_eq!(change.to, BreakerState::Closed);
        assert_eq!(
            change.reason,
            Reason::ProbesSucceeded {
                successes: 2,
                threshold: 2
            }
        );
        assert_eq!(b.deadline(&p), None);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let p = policy();
        let mut b = opened(&p);
        b.tick(t(11), &p);
        b.record(OK, t(12), &p);
        let change = b
            .record(ConnectOutcome::TimedOut, t(13), &p)
            .expect("a failed probe reopens");
        assert_eq!(change.to, BreakerState::Open);
        assert_eq!(
            change.reason,
            Reason::ProbeFailed {
                outcome: ConnectOutcome::TimedOut
            }
        );
        // A fresh open period starts at the reopen.
        assert_eq!(b.deadline(&p), Some(t(23)));
    }

    #[test]
    fn half_open_without_outcomes_reopens_after_max_wait() {
        let p = policy();
        let mut b = opened(&p);
        b.tick(t(11), &p);
        assert_eq!(b.tick(t(15), &p), None);
        let change = b.tick(t(16), &p).expect("max wait reached");
        assert_eq!(change.to, BreakerState::Open);
        assert_eq!(
            change.reason,
            Reason::NoProbeOutcome {
                waited: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn policy_validation_names_the_problem() {
        assert_eq!(BreakerPolicy::default().validate(), Ok(()));
        let bad = BreakerPolicy {
            success_threshold: 3,
            half_open_probes: 2,
            ..BreakerPolicy::default()
        };
        assert_eq!(
            bad.validate(),
            Err(PolicyError::SuccessThreshold { got: 3, probes: 2 })
        );
        let bad = BreakerPolicy {
            failure_threshold: 0,
            ..BreakerPolicy::default()
        };
        assert_eq!(bad.validate(), Err(PolicyError::ZeroFailureThreshold));
    }
}
