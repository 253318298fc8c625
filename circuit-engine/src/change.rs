//! What a breaker's changes are made of: its states as operators see them, the reasons it
//! changes, the change itself and the outcomes counted until then.

use std::{fmt, time::Duration};

use circuit_common::ConnectOutcome;

use super::{
    backoff::OpenPeriod,
    policy::Mode,
    units::{Percent, format_millis},
};
use crate::clock::MonoTime;

/// The state an upstream's breaker shows to operators (in JSON as in logs: `HALF_OPEN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
    /// Held open by an operator.
    ForcedOpen,
    /// Never trips: by an operator, or by the policy's mode.
    Disabled,
    /// Dry run (the policy's mode): the circuit runs, its decisions are not enforced.
    MetricsOnly,
}

impl BreakerState {
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "CLOSED",
            BreakerState::Open => "OPEN",
            BreakerState::HalfOpen => "HALF_OPEN",
            BreakerState::ForcedOpen => "FORCED_OPEN",
            BreakerState::Disabled => "DISABLED",
            BreakerState::MetricsOnly => "METRICS_ONLY",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManualAction {
    /// Reject everything, for `duration` or until enabled or reset.
    ForceOpen {
        duration: Option<Duration>,
    },
    /// Back to CLOSED with every counter cleared.
    Reset,
    Disable,
    Enable,
}

impl fmt::Display for ManualAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManualAction::ForceOpen { duration: Some(d) } => {
                write!(f, "force-open for {}", format_millis(*d))
            }
            ManualAction::ForceOpen { duration: None } => {
                f.write_str("force-open until enabled or reset")
            }
            ManualAction::Reset => f.write_str("reset"),
            ManualAction::Disable => f.write_str("disable"),
            ManualAction::Enable => f.write_str("enable"),
        }
    }
}

/// Why a breaker changed state, with the numbers behind the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ConsecutiveFailures {
        failures: u32,
        threshold: u32,
    },
    /// The window's failure rate reached the threshold.
    FailureRate {
        failures: u32,
        calls: u32,
        threshold: Percent,
    },
    /// The window's rate of connects at or above `latency` reached the threshold.
    SlowConnects {
        slow: u32,
        calls: u32,
        latency: Duration,
        threshold: Percent,
    },
    /// The window's failure rate reached `max(baseline + margin, floor)`.
    AboveBaseline {
        failures: u32,
        calls: u32,
        baseline: Percent,
        margin: Percent,
        floor: Percent,
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
    /// A probe connected, but no faster than the slow-connect latency.
    SlowProbe {
        latency: Duration,
        threshold: Duration,
    },
    /// No outcome came for the probes of this round within `probe_timeout`: their tokens
    /// are given back (HALF_OPEN → HALF_OPEN).
    ProbeTimedOut {
        waited: Duration,
    },
    /// A probe's client closed it before any answer, too soon for evidence: its token is
    /// given back (HALF_OPEN → HALF_OPEN).
    ProbeAbandoned {
        waited: Option<Duration>,
    },
    /// HALF_OPEN ran out of time and nobody had tried to connect for `idle_for`: the breaker
    /// closes (and becomes evictable) rather than cycling for an upstream nobody uses.
    IdleReleased {
        idle_for: Duration,
    },
    /// The agent found this verdict in the kernel when it started (left by a previous agent).
    Adopted,
    Manual {
        action: ManualAction,
    },
    /// A timed force-open ran out.
    ForceExpired {
        held_for: Duration,
    },
    /// A configuration reload changed the policy's mode.
    Reconfigured {
        mode: Mode,
    },
    /// The upstream is on the never-isolate list.
    NeverIsolated,
    /// A client's own hold (see [`super::Scope`]) ran its course.
    ClientHoldEnded,
}

impl Reason {
    /// A short stable name for the kind of reason, without its numbers (a metric label).
    pub const fn kind(&self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures { .. } => "consecutive_failures",
            Reason::FailureRate { .. } => "failure_rate",
            Reason::SlowConnects { .. } => "slow_connects",
            Reason::AboveBaseline { .. } => "above_baseline",
            Reason::OpenDurationElapsed { .. } => "open_duration_elapsed",
            Reason::ProbesSucceeded { .. } => "probes_succeeded",
            Reason::ProbeFailed { .. } => "probe_failed",
            Reason::SlowProbe { .. } => "slow_probe",
            Reason::ProbeTimedOut { .. } => "probe_timed_out",
            Reason::ProbeAbandoned { .. } => "probe_abandoned",
            Reason::IdleReleased { .. } => "idle_released",
            Reason::Adopted => "adopted",
            Reason::Manual { .. } => "manual",
            Reason::ForceExpired { .. } => "force_expired",
            Reason::Reconfigured { .. } => "reconfigured",
            Reason::NeverIsolated => "never_isolated",
            Reason::ClientHoldEnded => "client_hold_ended",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::ConsecutiveFailures {
                failures,
                threshold,
            } => write!(f, "{failures} consecutive failures (threshold {threshold})"),
            Reason::FailureRate {
                failures,
                calls,
                threshold,
            } => write!(
                f,
                "failure rate {} over {calls} connects ({failures} failed, threshold {threshold})",
                Percent::of(failures.into(), calls.into())
            ),
            Reason::SlowConnects {
                slow,
                calls,
                latency,
                threshold,
            } => write!(
                f,
                "slow-connect rate {} over {calls} connects ({slow} took {} or more, threshold {threshold})",
                Percent::of(slow.into(), calls.into()),
                format_millis(latency)
            ),
            Reason::AboveBaseline {
                failures,
                calls,
                baseline,
                margin,
                floor,
            } => write!(
                f,
                "failure rate {} over {calls} connects ({failures} failed) reached baseline {baseline} + margin {margin} (floor {floor})",
                Percent::of(failures.into(), calls.into())
            ),
            Reason::OpenDurationElapsed { open_for } => {
                write!(f, "open for {}", format_millis(open_for))
            }
            Reason::ProbesSucceeded {
                successes,
                threshold,
            } => write!(f, "{successes} successful probes (threshold {threshold})"),
            Reason::ProbeFailed { outcome } => {
                write!(f, "probe failed: {}", outcome_name(outcome))
            }
            Reason::SlowProbe { latency, threshold } => write!(
                f,
                "probe connected in {} (slow: threshold {})",
                format_millis(latency),
                format_millis(threshold)
            ),
            Reason::ProbeTimedOut { waited } => write!(
                f,
                "no probe outcome within {}: tokens given back",
                format_millis(waited)
            ),
            Reason::ProbeAbandoned {
                waited: Some(waited),
            } => write!(
                f,
                "probe abandoned by its client after {}: token given back",
                format_millis(waited)
            ),
            Reason::ProbeAbandoned { waited: None } => {
                f.write_str("probe abandoned by its client: token given back")
            }
            Reason::IdleReleased { idle_for } => {
                write!(
                    f,
                    "released: no connection attempt for {}",
                    format_millis(idle_for)
                )
            }
            Reason::Adopted => f.write_str("adopted from the kernel"),
            Reason::Manual { action } => write!(f, "manual {action}"),
            Reason::ForceExpired { held_for } => {
                write!(f, "forced open for {}, expired", format_millis(held_for))
            }
            Reason::Reconfigured { mode } => {
                write!(f, "configuration set mode {}", mode.as_str())
            }
            Reason::NeverIsolated => f.write_str("on the never-isolate list"),
            Reason::ClientHoldEnded => f.write_str("the client's own hold ended"),
        }
    }
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
        ConnectOutcome::Aborted => "aborted",
    }
}

/// A state change of one breaker.
///
/// For the automatic circuit `from` and `to` are circuit states (CLOSED, OPEN, HALF_OPEN),
/// also for a METRICS_ONLY breaker's would-be transitions; manual and configuration changes
/// use the states operators see (e.g. FORCED_OPEN, DISABLED, METRICS_ONLY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: Reason,
    pub at: MonoTime,
    /// When `to` is OPEN: how long, and why that long.
    pub open: Option<OpenPeriod>,
}

/// Outcomes seen by one breaker since it was created (or reset).
///
/// `repr(C)`: the most frequent outcomes first, so that they share a cache line with the
/// breaker's other per-outcome fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(C)]
pub struct OutcomeCounts {
    pub connected: u64,
    pub refused: u64,
    pub timed_out: u64,
    pub rejected: u64,
    pub syn_retransmits: u64,
    pub resets: u64,
    pub unreachable: u64,
    /// Connects their application closed before any answer (see [`Signal::of`]).
    #[serde(default)]
    pub aborted: u64,
}

impl OutcomeCounts {
    pub(crate) fn add(&mut self, outcome: ConnectOutcome) {
        let counter = match outcome {
            ConnectOutcome::Connected => &mut self.connected,
            ConnectOutcome::Refused => &mut self.refused,
            ConnectOutcome::TimedOut => &mut self.timed_out,
            ConnectOutcome::Rejected => &mut self.rejected,
            ConnectOutcome::SynRetransmit => &mut self.syn_retransmits,
            ConnectOutcome::Reset => &mut self.resets,
            ConnectOutcome::Unreachable => &mut self.unreachable,
            ConnectOutcome::Aborted => &mut self.aborted,
        };
        *counter += 1;
    }
}
