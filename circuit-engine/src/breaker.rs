//! One breaker: the state machine of a single upstream.
//!
//! The automatic *circuit*:
//!
//! ```text
//! CLOSED ──a detector trips──► OPEN ──open period──► HALF_OPEN
//!   ▲                           ▲                        │
//!   └──── enough probes succeed ─┼────────────────────────┤
//!                                └─ a probe fails (with backoff)
//! ```
//!
//! Only an observed failure re-opens a HALF_OPEN breaker. A probe that ends without an
//! answer (its client gave up at once) or never reports (`probe_timeout`) gives its token
//! back: the breaker stays HALF_OPEN and starts a new probe round (a HALF_OPEN → HALF_OPEN
//! change that tops up the kernel's probe budget).
//!
//! On top of it, the policy's mode (METRICS_ONLY runs the circuit as a dry run, DISABLED
//! never trips) and a manual hold (FORCED_OPEN, DISABLED) that overrides both.
//!
//! A breaker never decides a trip alone: [`Breaker::observe`] says a detector *wants* to
//! trip, and the manager ([`super::Breakers`]) applies its group and panic guards before
//! calling [`Breaker::trip`].

use std::{fmt, time::Duration};

use circuit_common::ConnectOutcome;

use super::{
    Decision, Enforcement,
    backoff::{Backoff, FlapHistory, JitterRng, OpenPeriod},
    policy::{AdaptivePolicy, BreakerPolicy, Mode},
    units::{Percent, format_millis},
    window::{Window, WindowTotals},
    witness::{ClientId, ClientWitness, Scope, WitnessBook},
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
    fn add(&mut self, outcome: ConnectOutcome) {
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

/// One connection outcome with its connect latency when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub outcome: ConnectOutcome,
    /// From connect() to the outcome; `None` when the kernel did not see the start.
    pub latency: Option<Duration>,
    /// Who connected ([`ClientId::UNKNOWN`] when not attributed).
    pub client: ClientId,
}

impl Observation {
    pub fn new(outcome: ConnectOutcome, latency: Option<Duration>, client: ClientId) -> Self {
        Self {
            outcome,
            latency,
            client,
        }
    }
}

impl From<ConnectOutcome> for Observation {
    fn from(outcome: ConnectOutcome) -> Self {
        Self::new(outcome, None, ClientId::UNKNOWN)
    }
}

/// What an outcome says about the upstream under a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Success {
        slow: bool,
    },
    Failure,
    /// Nothing about the upstream: our own reject, or a class the policy does not count.
    Ignored,
    /// An attempt that ended without an answer and without evidence: its application gave
    /// up too soon to say anything of the upstream. A probe's token comes back.
    Abandoned,
}

impl Signal {
    /// `usual_connect` is the upstream's usual connect latency, if learned.
    pub fn of(
        observation: Observation,
        policy: &BreakerPolicy,
        usual_connect: Option<Duration>,
    ) -> Self {
        match observation.outcome {
            ConnectOutcome::Aborted => {
                // Evidence only when the attempt waited long enough that an answer was due.
                let due = usual_connect
                    .map_or(Duration::ZERO, |usual| usual * policy.abort_latency_factor)
                    .max(policy.abort_min_wait);
                match observation.latency {
                    Some(waited) if waited >= due => Signal::Failure,
                    _ => Signal::Abandoned,
                }
            }
            ConnectOutcome::Connected => Signal::Success {
                slow: observation
                    .latency
                    .is_some_and(|latency| latency >= policy.slow_connects.latency),
            },
            ConnectOutcome::Refused | ConnectOutcome::TimedOut | ConnectOutcome::Unreachable => {
                Signal::Failure
            }
            ConnectOutcome::SynRetransmit if policy.syn_retransmit_is_failure => Signal::Failure,
            ConnectOutcome::Reset if policy.reset_is_failure => Signal::Failure,
            ConnectOutcome::SynRetransmit | ConnectOutcome::Reset | ConnectOutcome::Rejected => {
                Signal::Ignored
            }
        }
    }
}

/// What an observation did to a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Quiet,
    Changed(Change),
    /// A detector wants CLOSED → OPEN; the caller decides (see [`Breaker::trip`]).
    WantsTrip(Reason),
}

/// The automatic state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    const fn state(self) -> BreakerState {
        match self {
            Circuit::Closed => BreakerState::Closed,
            Circuit::Open => BreakerState::Open,
            Circuit::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

/// An operator's override of the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    ForcedOpen { until: Option<MonoTime> },
    Disabled,
}

/// The upstream's usual failure rate: an EWMA over connects while CLOSED.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Baseline {
    failure_rate: f64,
    calls: u32,
}

impl Baseline {
    fn learn(&mut self, failed: bool, policy: &AdaptivePolicy) {
        self.calls = self.calls.saturating_add(1);
        // A running mean until the EWMA's memory is filled, so the first connects are not
        // weighed against an arbitrary starting value.
        let ewma_weight = 2.0 / (f64::from(policy.baseline_calls) + 1.0);
        let weight = (1.0 / f64::from(self.calls)).max(ewma_weight);
        self.failure_rate += weight * (f64::from(u8::from(failed)) - self.failure_rate);
    }

    fn trusted(&self, policy: &AdaptivePolicy) -> Option<Percent> {
        (self.calls >= policy.warmup_calls).then(|| Percent::from_fraction(self.failure_rate))
    }
}

/// One upstream's breaker. The manager owns them; this is the read side plus the state
/// machine it drives.
///
/// `repr(C)` keeps the fields every outcome reads or writes together at the start, with the
/// usual outcomes' counters last among them (see [`OutcomeCounts`]), and the fields only
/// transitions use after them: recording is bound by cache misses on these fields.
#[derive(Clone, Debug, PartialEq)]
#[repr(C)]
pub struct Breaker {
    /// The last outcome of any kind.
    last_seen: MonoTime,
    hold: Option<Hold>,
    /// Only allocated when the policy has a rate detector.
    window: Option<Box<Window>>,
    consecutive_failures: u32,
    circuit: Circuit,
    mode: Mode,
    /// A wanted trip was vetoed and not yet reported again (cleared once no detector fires).
    trip_suppressed: bool,
    counts: OutcomeCounts,
    /// The usual latency of a successful connect, in µs (an EWMA; 0 before the first).
    usual_connect_us: u32,
    // Read and written per outcome only in HALF_OPEN, or on transitions.
    probe_successes: u32,
    /// Probe outcomes counted in this HALF_OPEN period, never more than the budget.
    probe_outcomes: u32,
    /// Probe rounds in this HALF_OPEN period: each gives back the tokens of probes that
    /// will not report.
    probe_round: u32,
    /// When the current probe round began.
    probe_round_at: MonoTime,
    /// When the breaker entered its current state.
    since: MonoTime,
    /// Set on entering OPEN.
    open_period: Option<OpenPeriod>,
    baseline: Baseline,
    backoff: Backoff,
    /// Allocated on the first trip: most breakers never trip, and the ring would take a
    /// fifth of every slot.
    flaps: Option<Box<FlapHistory>>,
    /// Who failed and who succeeded lately; allocated on the first failure, dropped once
    /// nobody has failed for `witness_window`.
    witnesses: Option<Box<WitnessBook>>,
}

impl Breaker {
    /// Bytes from the start of a breaker up to the end of the counters of the usual outcomes
    /// (connected, refused): what a usual outcome reads or writes.
    #[cfg(test)]
    pub(crate) const HOT_BYTES: usize =
        std::mem::offset_of!(Breaker, counts) + std::mem::offset_of!(OutcomeCounts, timed_out);

    /// A CLOSED breaker in `enforce` mode.
    pub fn new(now: MonoTime) -> Self {
        Self {
            circuit: Circuit::Closed,
            hold: None,
            mode: Mode::Enforce,
            since: now,
            open_period: None,
            consecutive_failures: 0,
            probe_successes: 0,
            probe_outcomes: 0,
            probe_round: 0,
            probe_round_at: now,
            usual_connect_us: 0,
            counts: OutcomeCounts::default(),
            window: None,
            baseline: Baseline::default(),
            backoff: Backoff::default(),
            flaps: None,
            witnesses: None,
            trip_suppressed: false,
            last_seen: now,
        }
    }

    /// A CLOSED breaker in `policy`'s mode.
    pub fn for_policy(policy: &BreakerPolicy, now: MonoTime) -> Self {
        Self {
            mode: policy.mode,
            ..Self::new(now)
        }
    }

    /// A breaker that starts OPEN or HALF_OPEN, as when adopting a verdict left in the
    /// kernel. An open breaker restarts its open period (as its first ejection): the time
    /// already spent is unknown.
    pub(crate) fn adopted(
        half_open: bool,
        policy: &BreakerPolicy,
        now: MonoTime,
        rng: &mut JitterRng,
    ) -> Self {
        let mut breaker = Self::for_policy(policy, now);
        if policy.mode == Mode::Disabled {
            return breaker;
        }
        if half_open {
            breaker.circuit = Circuit::HalfOpen;
        } else {
            let period = breaker.backoff.next_period(policy, now, false, None, rng);
            breaker.circuit = Circuit::Open;
            breaker.open_period = Some(period);
        }
        breaker
    }

    /// The state operators see: a hold first, then the mode, then the circuit.
    pub fn state(&self) -> BreakerState {
        match (self.hold, self.mode) {
            (Some(Hold::ForcedOpen { .. }), _) => BreakerState::ForcedOpen,
            (Some(Hold::Disabled), _) | (None, Mode::Disabled) => BreakerState::Disabled,
            (None, Mode::MetricsOnly) => BreakerState::MetricsOnly,
            (None, Mode::Enforce) => self.circuit.state(),
        }
    }

    /// The automatic circuit's state (CLOSED, OPEN or HALF_OPEN): for a METRICS_ONLY
    /// breaker, what it would enforce.
    pub fn circuit_state(&self) -> BreakerState {
        self.circuit.state()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the breaker's decisions are a dry run (METRICS_ONLY without a manual hold).
    pub fn is_dry_run(&self) -> bool {
        self.hold.is_none() && self.mode == Mode::MetricsOnly
    }

    /// When the breaker entered its current state.
    pub fn since(&self) -> MonoTime {
        self.since
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// The upstream's usual connect latency, once a connect has succeeded.
    pub fn usual_connect_latency(&self) -> Option<Duration> {
        (self.usual_connect_us > 0).then(|| Duration::from_micros(self.usual_connect_us.into()))
    }

    /// Records who failed or succeeded, for [`Breaker::trip_scope`].
    fn witness(&mut self, client: ClientId, failed: bool, now: MonoTime, policy: &BreakerPolicy) {
        if self.witnesses.is_none() && !failed {
            // Nobody failing lately: a success contradicts nothing.
            return;
        }
        let book = self.witnesses.get_or_insert_default();
        if book.expire(policy.witness_window, now) && !failed {
            self.witnesses = None;
            return;
        }
        book.record(client, failed, now);
    }

    /// The clients that failed or succeeded here lately (empty when nobody failed).
    pub fn witnesses(&self) -> Vec<ClientWitness> {
        self.witnesses
            .as_deref()
            .map(WitnessBook::clients)
            .unwrap_or_default()
    }

    /// Whom a trip wanted now applies to (see [`WitnessBook::scope`]).
    pub(crate) fn trip_scope(&self, policy: &BreakerPolicy, now: MonoTime) -> Scope {
        match &self.witnesses {
            Some(book) => book.scope(policy.min_witnesses, policy.witness_window, now),
            None => Scope::Clients {
                witnesses: Vec::new(),
                contradicted: false,
            },
        }
    }

    /// Learns the usual connect latency from a successful connect (an EWMA weighing the
    /// newest connect 1/8, as TCP's smoothed RTT does).
    fn learn_connect_latency(&mut self, latency: Duration) {
        let sample = u32::try_from(latency.as_micros())
            .unwrap_or(u32::MAX)
            .max(1);
        self.usual_connect_us = if self.usual_connect_us == 0 {
            sample
        } else {
            let usual = i64::from(self.usual_connect_us);
            (usual + (i64::from(sample) - usual) / 8).clamp(1, i64::from(u32::MAX)) as u32
        };
    }

    pub fn counts(&self) -> OutcomeCounts {
        self.counts
    }

    /// Ejections that still count towards the open duration (after decay up to the last
    /// trip).
    pub fn ejections(&self) -> u32 {
        self.backoff.ejections()
    }

    /// The current open period, while OPEN.
    pub fn open_period(&self) -> Option<OpenPeriod> {
        self.open_period.filter(|_| self.circuit == Circuit::Open)
    }

    /// Probe outcomes counted in the current HALF_OPEN period.
    pub fn probe_outcomes(&self) -> u32 {
        self.probe_outcomes
    }

    /// The learned failure-rate baseline, once trusted.
    pub fn baseline(&self, policy: &BreakerPolicy) -> Option<Percent> {
        self.baseline.trusted(&policy.adaptive)
    }

    /// The window's totals at `now`, when the policy has one.
    pub fn window_totals(&mut self, now: MonoTime) -> Option<WindowTotals> {
        self.window.as_mut().map(|w| w.totals(now))
    }

    /// The last outcome of any kind.
    pub fn last_seen(&self) -> MonoTime {
        self.last_seen
    }

    /// Heap memory held (the sliding window, the trip history).
    pub fn heap_bytes(&self) -> usize {
        let flaps = self.flaps.as_ref().map_or(0, |_| size_of::<FlapHistory>());
        self.window.as_deref().map_or(0, Window::heap_bytes) + flaps
    }

    /// What the enforcement points must do; `None` means admit everything.
    pub fn decision(&self, policy: &BreakerPolicy) -> Option<Decision> {
        let dry_run = match self.hold {
            Some(Hold::ForcedOpen { .. }) => {
                return Some(Decision {
                    action: Enforcement::Reject,
                    reject_percent: Percent::HUNDRED,
                    dry_run: false,
                });
            }
            Some(Hold::Disabled) => return None,
            None => self.mode == Mode::MetricsOnly,
        };
        let action = match self.circuit {
            Circuit::Closed => return None,
            Circuit::Open => Enforcement::Reject,
            Circuit::HalfOpen => Enforcement::Probe {
                budget: policy.half_open_probes,
                round: self.probe_round,
            },
        };
        Some(Decision {
            action,
            reject_percent: policy.reject_percent,
            dry_run,
        })
    }

    /// Whether the breaker isolates its upstream (or would, in a dry run): counts towards its
    /// group's ejection cap. Disabled breakers keep the circuit CLOSED.
    pub(crate) fn is_isolating(&self) -> bool {
        matches!(self.hold, Some(Hold::ForcedOpen { .. })) || self.circuit != Circuit::Closed
    }

    /// Whether it has failures to remember: consecutive ones, or any a client witnessed
    /// within the witness window.
    pub(crate) fn has_failure_history(&self) -> bool {
        self.consecutive_failures > 0 || self.witnesses.is_some()
    }

    /// Whether dropping the breaker loses nothing an operator or the kernel relies on.
    pub(crate) fn is_evictable(&self) -> bool {
        self.hold.is_none() && self.circuit == Circuit::Closed
    }

    /// When the breaker has a time-driven transition due next (see [`Breakers::tick`]), if
    /// ever.
    ///
    /// [`Breakers::tick`]: super::Breakers::tick
    pub fn deadline(&self, policy: &BreakerPolicy) -> Option<MonoTime> {
        match self.hold {
            Some(Hold::ForcedOpen { until }) => until,
            Some(Hold::Disabled) => None,
            None => match self.circuit {
                Circuit::Closed => None,
                Circuit::Open => self
                    .open_period
                    .map(|period| self.since.saturating_add(period.duration)),
                Circuit::HalfOpen => Some(self.probe_round_at.saturating_add(policy.probe_timeout)),
            },
        }
    }

    /// Feeds one outcome, classified as `signal` under `policy`, to the breaker.
    pub(crate) fn observe(
        &mut self,
        observation: Observation,
        signal: Signal,
        now: MonoTime,
        policy: &BreakerPolicy,
        rng: &mut JitterRng,
    ) -> Step {
        self.counts.add(observation.outcome);
        self.last_seen = now;
        if let (ConnectOutcome::Connected, Some(latency)) =
            (observation.outcome, observation.latency)
        {
            self.learn_connect_latency(latency);
        }
        if self.hold.is_some() || self.mode == Mode::Disabled {
            return Step::Quiet;
        }
        let (failed, slow) = match signal {
            Signal::Ignored => return Step::Quiet,
            Signal::Abandoned if self.circuit == Circuit::HalfOpen => {
                return Step::Changed(self.next_probe_round(
                    Reason::ProbeAbandoned {
                        waited: observation.latency,
                    },
                    now,
                ));
            }
            Signal::Abandoned => return Step::Quiet,
            Signal::Failure => (true, false),
            Signal::Success { slow } => (false, slow),
        };
        // A slow connect is evidence where slowness trips the breaker.
        let evidence = failed || (slow && policy.slow_connects.enabled);
        self.witness(observation.client, evidence, now, policy);
        match self.circuit {
            Circuit::Closed => self.observe_closed(failed, slow, now, policy),
            // Connections in flight when the breaker opened, or admitted by partial
            // breaking: the open period is time-based.
            Circuit::Open => Step::Quiet,
            Circuit::HalfOpen => self.observe_probe(observation, failed, slow, now, policy, rng),
        }
    }

    fn observe_closed(
        &mut self,
        failed: bool,
        slow: bool,
        now: MonoTime,
        policy: &BreakerPolicy,
    ) -> Step {
        self.consecutive_failures = if failed {
            self.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        let totals = self.record_in_window(failed, slow, now, policy);
        let wanted = self.wanted_trip(totals, policy);
        if policy.adaptive.enabled {
            // After the check, so the outcome under test is not part of its own baseline.
            self.baseline.learn(failed, &policy.adaptive);
        }
        match wanted {
            Some(reason) => Step::WantsTrip(reason),
            None => {
                self.trip_suppressed = false;
                Step::Quiet
            }
        }
    }

    fn record_in_window(
        &mut self,
        failed: bool,
        slow: bool,
        now: MonoTime,
        policy: &BreakerPolicy,
    ) -> Option<WindowTotals> {
        if !policy.needs_window() {
            self.window = None;
            return None;
        }
        if self
            .window
            .as_ref()
            .is_some_and(|w| !w.fits(&policy.window))
        {
            // A reload changed the window's shape: its contents cannot be carried over.
            self.window = None;
        }
        let window = self
            .window
            .get_or_insert_with(|| Box::new(Window::new(&policy.window, now)));
        window.record(now, failed, slow);
        Some(window.totals(now))
    }

    /// The first detector that fires, in the order: consecutive failures, failure rate, slow
    /// connects, adaptive baseline.
    fn wanted_trip(&self, totals: Option<WindowTotals>, policy: &BreakerPolicy) -> Option<Reason> {
        if policy.failure_threshold > 0 && self.consecutive_failures >= policy.failure_threshold {
            return Some(Reason::ConsecutiveFailures {
                failures: self.consecutive_failures,
                threshold: policy.failure_threshold,
            });
        }
        let totals = totals.filter(|t| t.calls >= policy.window_minimum_calls())?;
        let (calls, failures, slow) = (totals.calls, totals.failures, totals.slow);
        let rate = &policy.failure_rate;
        if rate.enabled
            && rate
                .threshold_percent
                .is_reached_by(failures.into(), calls.into())
        {
            return Some(Reason::FailureRate {
                failures,
                calls,
                threshold: rate.threshold_percent,
            });
        }
        let slow_connects = &policy.slow_connects;
        if slow_connects.enabled
            && slow_connects
                .threshold_percent
                .is_reached_by(slow.into(), calls.into())
        {
            return Some(Reason::SlowConnects {
                slow,
                calls,
                latency: slow_connects.latency,
                threshold: slow_connects.threshold_percent,
            });
        }
        let adaptive = &policy.adaptive;
        if adaptive.enabled
            && let Some(baseline) = self.baseline.trusted(adaptive)
        {
            let threshold = baseline
                .saturating_add(adaptive.margin_percent)
                .max(adaptive.floor_percent);
            if threshold.is_reached_by(failures.into(), calls.into()) {
                return Some(Reason::AboveBaseline {
                    failures,
                    calls,
                    baseline,
                    margin: adaptive.margin_percent,
                    floor: adaptive.floor_percent,
                });
            }
        }
        None
    }

    fn observe_probe(
        &mut self,
        observation: Observation,
        failed: bool,
        slow: bool,
        now: MonoTime,
        policy: &BreakerPolicy,
        rng: &mut JitterRng,
    ) -> Step {
        if self.probe_outcomes >= policy.half_open_probes {
            // Beyond the budget: not a probe (in flight from before, or let through by
            // partial breaking). Only the budget's outcomes decide.
            return Step::Quiet;
        }
        self.probe_outcomes += 1;
        let failure = if failed {
            Some(Reason::ProbeFailed {
                outcome: observation.outcome,
            })
        } else if slow && policy.slow_connects.enabled {
            Some(Reason::SlowProbe {
                latency: observation.latency.unwrap_or_default(),
                threshold: policy.slow_connects.latency,
            })
        } else {
            None
        };
        if let Some(reason) = failure {
            return Step::Changed(self.reopen(reason, now, policy, rng));
        }
        self.probe_successes += 1;
        let threshold = policy.probes_to_close();
        if self.probe_successes < threshold {
            return Step::Quiet;
        }
        let reason = Reason::ProbesSucceeded {
            successes: self.probe_successes,
            threshold,
        };
        Step::Changed(self.enter(Circuit::Closed, reason, now, None))
    }

    /// Records that a wanted trip was vetoed; true the first time since the detectors last
    /// fired (so the veto is reported once, not on every failure).
    pub(crate) fn suppress(&mut self) -> bool {
        !std::mem::replace(&mut self.trip_suppressed, true)
    }

    /// CLOSED → OPEN, for a trip the caller allowed.
    pub(crate) fn trip(
        &mut self,
        reason: Reason,
        now: MonoTime,
        policy: &BreakerPolicy,
        rng: &mut JitterRng,
    ) -> Change {
        self.flaps.get_or_insert_default().record_trip(now);
        let flapping = self.flapping_trips(policy, now);
        let period = self.backoff.next_period(policy, now, true, flapping, rng);
        self.enter(Circuit::Open, reason, now, Some(period))
    }

    fn reopen(
        &mut self,
        reason: Reason,
        now: MonoTime,
        policy: &BreakerPolicy,
        rng: &mut JitterRng,
    ) -> Change {
        let flapping = self.flapping_trips(policy, now);
        let period = self.backoff.next_period(policy, now, false, flapping, rng);
        self.enter(Circuit::Open, reason, now, Some(period))
    }

    fn flapping_trips(&self, policy: &BreakerPolicy, now: MonoTime) -> Option<u32> {
        let flaps = self.flaps.as_deref().unwrap_or(&FlapHistory::EMPTY);
        flaps.flapping_trips(policy, now)
    }

    /// Applies the time-driven transition due at `now`, if any. `idle_after` is how long
    /// without any outcome makes a HALF_OPEN breaker close (an upstream nobody uses) at its
    /// next probe round.
    pub(crate) fn tick(
        &mut self,
        now: MonoTime,
        policy: &BreakerPolicy,
        idle_after: Duration,
    ) -> Option<Change> {
        if now < self.deadline(policy)? {
            return None;
        }
        if let Some(Hold::ForcedOpen { .. }) = self.hold {
            let (from, held_for) = (self.state(), now.since(self.since));
            self.hold = None;
            self.restart_closed(now);
            return Some(self.manual_change(from, Reason::ForceExpired { held_for }, now));
        }
        let open_for = now.since(self.since);
        let idle_for = now.since(self.last_seen);
        Some(match self.circuit {
            Circuit::Closed => return None,
            Circuit::Open => self.enter(
                Circuit::HalfOpen,
                Reason::OpenDurationElapsed { open_for },
                now,
                None,
            ),
            Circuit::HalfOpen if idle_for >= idle_after => self.enter(
                Circuit::Closed,
                Reason::IdleReleased { idle_for },
                now,
                None,
            ),
            Circuit::HalfOpen => {
                let waited = now.since(self.probe_round_at);
                self.next_probe_round(Reason::ProbeTimedOut { waited }, now)
            }
        })
    }

    /// HALF_OPEN → HALF_OPEN: the tokens of probes that will not report come back.
    fn next_probe_round(&mut self, reason: Reason, now: MonoTime) -> Change {
        self.probe_round = self.probe_round.wrapping_add(1);
        self.probe_round_at = now;
        Change {
            from: BreakerState::HalfOpen,
            to: BreakerState::HalfOpen,
            reason,
            at: now,
            open: None,
        }
    }

    fn enter(
        &mut self,
        to: Circuit,
        reason: Reason,
        now: MonoTime,
        open: Option<OpenPeriod>,
    ) -> Change {
        let change = Change {
            from: self.circuit.state(),
            to: to.state(),
            reason,
            at: now,
            open,
        };
        if to == Circuit::Closed && self.circuit != Circuit::Closed {
            self.backoff.closed(now);
        }
        if open.is_some() {
            self.open_period = open;
        }
        self.circuit = to;
        self.clear_detection(now);
        change
    }

    /// Fresh detection state for a new state: counters and window (as resilience4j starts
    /// new metrics on each transition). The baseline, backoff and flapping history stay.
    fn clear_detection(&mut self, now: MonoTime) {
        self.since = now;
        self.consecutive_failures = 0;
        self.probe_successes = 0;
        self.probe_outcomes = 0;
        self.probe_round = 0;
        self.probe_round_at = now;
        self.trip_suppressed = false;
        if let Some(window) = &mut self.window {
            window.clear();
        }
    }

    fn restart_closed(&mut self, now: MonoTime) {
        if self.circuit != Circuit::Closed {
            self.backoff.closed(now);
        }
        self.circuit = Circuit::Closed;
        self.clear_detection(now);
    }

    fn manual_change(&self, from: BreakerState, reason: Reason, now: MonoTime) -> Change {
        Change {
            from,
            to: self.state(),
            reason,
            at: now,
            open: None,
        }
    }

    /// Holds the breaker open until `until` (`None`: until enabled or reset).
    pub(crate) fn force_open(&mut self, now: MonoTime, until: Option<MonoTime>) -> Change {
        let from = self.state();
        self.restart_closed(now);
        self.hold = Some(Hold::ForcedOpen { until });
        let action = ManualAction::ForceOpen {
            duration: until.map(|until| until.since(now)),
        };
        self.manual_change(from, Reason::Manual { action }, now)
    }

    /// Back to CLOSED (in the policy's mode) with every counter and all history cleared.
    pub(crate) fn reset(&mut self, now: MonoTime) -> Change {
        let from = self.state();
        *self = Self {
            mode: self.mode,
            ..Self::new(now)
        };
        let action = ManualAction::Reset;
        self.manual_change(from, Reason::Manual { action }, now)
    }

    pub(crate) fn disable(&mut self, now: MonoTime) -> Change {
        let from = self.state();
        self.restart_closed(now);
        self.hold = Some(Hold::Disabled);
        let action = ManualAction::Disable;
        self.manual_change(from, Reason::Manual { action }, now)
    }

    /// Lifts a manual hold: back to CLOSED in the policy's mode.
    pub(crate) fn enable(&mut self, now: MonoTime) -> Change {
        let from = self.state();
        self.hold = None;
        self.restart_closed(now);
        let action = ManualAction::Enable;
        self.manual_change(from, Reason::Manual { action }, now)
    }

    /// Takes a reloaded policy's mode; the counters stay. Returns the change operators see,
    /// if any.
    pub(crate) fn reconfigure(&mut self, policy: &BreakerPolicy, now: MonoTime) -> Option<Change> {
        if policy.mode == self.mode {
            return None;
        }
        let from = self.state();
        let leaves_or_enters_disabled =
            Mode::Disabled == self.mode || Mode::Disabled == policy.mode;
        self.mode = policy.mode;
        if leaves_or_enters_disabled && self.hold.is_none() {
            self.restart_closed(now);
        }
        let to = self.state();
        (from != to)
            .then(|| self.manual_change(from, Reason::Reconfigured { mode: policy.mode }, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{WindowKind, WindowPolicy};

    const FAIL: ConnectOutcome = ConnectOutcome::Refused;
    const OK: ConnectOutcome = ConnectOutcome::Connected;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 3,
            open_duration: Duration::from_secs(10),
            half_open_probes: 2,
            success_threshold: 2,
            probe_timeout: Duration::from_secs(5),
            ..BreakerPolicy::default()
        }
    }

    fn t(secs: u64) -> MonoTime {
        MonoTime::from_nanos(secs * 1_000_000_000)
    }

    /// Feeds an outcome and allows any wanted trip, as a manager without guards would.
    fn record(
        b: &mut Breaker,
        observation: impl Into<Observation>,
        now: MonoTime,
        p: &BreakerPolicy,
    ) -> Option<Change> {
        let observation = observation.into();
        let mut rng = JitterRng::seeded(0);
        match b.observe(
            observation,
            Signal::of(observation, p, b.usual_connect_latency()),
            now,
            p,
            &mut rng,
        ) {
            Step::Quiet => None,
            Step::Changed(change) => Some(change),
            Step::WantsTrip(reason) => Some(b.trip(reason, now, p, &mut rng)),
        }
    }

    fn tick(b: &mut Breaker, now: MonoTime, p: &BreakerPolicy) -> Option<Change> {
        b.tick(now, p, Duration::from_secs(600))
    }

    fn opened(p: &BreakerPolicy) -> Breaker {
        let mut b = Breaker::for_policy(p, t(0));
        for _ in 0..p.failure_threshold {
            record(&mut b, FAIL, t(1), p);
        }
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        assert_eq!(record(&mut b, FAIL, t(1), &p), None);
        assert_eq!(record(&mut b, ConnectOutcome::TimedOut, t(1), &p), None);
        let change = record(&mut b, FAIL, t(2), &p).expect("third failure trips");
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
        assert_eq!(
            change.open.map(|o| (o.duration, o.ejection)),
            Some((Duration::from_secs(10), 1))
        );
        assert_eq!(b.since(), t(2));
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        record(&mut b, FAIL, t(1), &p);
        record(&mut b, FAIL, t(1), &p);
        record(&mut b, OK, t(1), &p);
        assert_eq!(b.consecutive_failures(), 0);
        record(&mut b, FAIL, t(1), &p);
        record(&mut b, FAIL, t(1), &p);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn own_rejects_are_counted_but_never_trip() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        for _ in 0..10 {
            assert_eq!(record(&mut b, ConnectOutcome::Rejected, t(1), &p), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.counts().rejected, 10);
    }

    #[test]
    fn outcome_classes_follow_the_policy() {
        let mut p = policy();
        let retransmit = Observation::from(ConnectOutcome::SynRetransmit);
        let reset = Observation::from(ConnectOutcome::Reset);
        assert_eq!(Signal::of(retransmit, &p, None), Signal::Ignored);
        assert_eq!(Signal::of(reset, &p, None), Signal::Ignored);
        assert_eq!(
            Signal::of(ConnectOutcome::Unreachable.into(), &p, None),
            Signal::Failure
        );
        p.syn_retransmit_is_failure = true;
        p.reset_is_failure = true;
        assert_eq!(Signal::of(retransmit, &p, None), Signal::Failure);
        assert_eq!(Signal::of(reset, &p, None), Signal::Failure);
        let slow = Observation {
            outcome: OK,
            latency: Some(Duration::from_secs(1)),
            client: ClientId::UNKNOWN,
        };
        assert_eq!(Signal::of(slow, &p, None), Signal::Success { slow: true });
        // SYN retransmits counted as failures trip the consecutive detector early.
        let mut b = Breaker::new(t(0));
        for _ in 0..3 {
            record(&mut b, retransmit, t(1), &p);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.counts().syn_retransmits, 3);
    }

    #[test]
    fn half_opens_exactly_when_the_open_duration_has_elapsed() {
        let p = policy();
        let mut b = opened(&p);
        assert_eq!(b.deadline(&p), Some(t(11)));
        // Outcomes while open do not move the breaker.
        assert_eq!(record(&mut b, OK, t(5), &p), None);
        assert_eq!(tick(&mut b, t(10), &p), None);
        let change = tick(&mut b, t(11), &p).expect("half-opens at the deadline");
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
        tick(&mut b, t(11), &p);
        assert_eq!(record(&mut b, OK, t(12), &p), None);
        let change = record(&mut b, OK, t(12), &p).expect("second success closes");
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
    fn a_failed_probe_reopens_with_backoff() {
        let p = policy();
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        record(&mut b, OK, t(12), &p);
        let change =
            record(&mut b, ConnectOutcome::TimedOut, t(13), &p).expect("a failed probe reopens");
        assert_eq!(change.to, BreakerState::Open);
        assert_eq!(
            change.reason,
            Reason::ProbeFailed {
                outcome: ConnectOutcome::TimedOut
            }
        );
        // The second ejection lasts twice the base (linear backoff).
        assert_eq!(change.open.unwrap().ejection, 2);
        assert_eq!(b.deadline(&p), Some(t(33)));
    }

    #[test]
    fn probe_outcomes_beyond_the_budget_are_not_probes() {
        let p = BreakerPolicy {
            success_threshold: 3,
            ..policy()
        };
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        // Budget 2, threshold capped at 2: two successes close.
        record(&mut b, OK, t(12), &p);
        assert_eq!(b.probe_outcomes(), 1);
        assert!(record(&mut b, OK, t(12), &p).is_some());
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_slow_probe_counts_as_failed_when_slow_connects_trip() {
        let mut p = policy();
        p.slow_connects.enabled = true;
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        let slow = Observation {
            outcome: OK,
            latency: Some(Duration::from_secs(3)),
            client: ClientId::UNKNOWN,
        };
        let change = record(&mut b, slow, t(12), &p).unwrap();
        assert_eq!(change.to, BreakerState::Open);
        assert!(matches!(change.reason, Reason::SlowProbe { .. }));
    }

    fn probe_round(b: &Breaker, p: &BreakerPolicy) -> u32 {
        match b.decision(p).map(|d| d.action) {
            Some(Enforcement::Probe { round, .. }) => round,
            other => panic!("not probing: {other:?}"),
        }
    }

    #[test]
    fn half_open_without_outcomes_gives_tokens_back_and_never_reopens() {
        let p = policy();
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        let ejections = b.ejections();
        assert_eq!(tick(&mut b, t(15), &p), None);
        let change = tick(&mut b, t(16), &p).expect("probe timeout reached");
        assert_eq!(
            (change.from, change.to),
            (BreakerState::HalfOpen, BreakerState::HalfOpen)
        );
        assert_eq!(
            change.reason,
            Reason::ProbeTimedOut {
                waited: Duration::from_secs(5)
            }
        );
        assert_eq!(probe_round(&b, &p), 1);
        // Again and again, without growing anything: only a failure re-opens.
        for s in [21, 26, 31] {
            let change = tick(&mut b, t(s), &p).expect("next round");
            assert_eq!(change.to, BreakerState::HalfOpen);
        }
        assert_eq!(probe_round(&b, &p), 4);
        assert_eq!(b.ejections(), ejections);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    fn aborted_after(ms: u64) -> Observation {
        Observation {
            outcome: ConnectOutcome::Aborted,
            latency: Some(Duration::from_millis(ms)),
            client: ClientId::UNKNOWN,
        }
    }

    #[test]
    fn an_abandoned_probe_gives_its_token_back_at_once() {
        let p = policy();
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        let change = record(&mut b, aborted_after(1), t(12), &p).expect("token given back");
        assert_eq!(
            (change.from, change.to),
            (BreakerState::HalfOpen, BreakerState::HalfOpen)
        );
        assert_eq!(
            change.reason,
            Reason::ProbeAbandoned {
                waited: Some(Duration::from_millis(1))
            }
        );
        assert_eq!(probe_round(&b, &p), 1);
        // The round restarted: its timeout counts from the abandonment.
        assert_eq!(tick(&mut b, t(16), &p), None);
        // The probes that follow still decide (two successes close under this policy).
        assert_eq!(record(&mut b, OK, t(13), &p), None);
        let change = record(&mut b, OK, t(13), &p).expect("closes");
        assert_eq!(change.to, BreakerState::Closed);
    }

    #[test]
    fn a_probe_given_up_after_long_enough_is_a_failure() {
        let p = policy();
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        let change = record(&mut b, aborted_after(500), t(12), &p).expect("re-opens");
        assert_eq!(change.to, BreakerState::Open);
        assert_eq!(
            change.reason,
            Reason::ProbeFailed {
                outcome: ConnectOutcome::Aborted
            }
        );
    }

    #[test]
    fn aborts_are_evidence_only_after_the_floor_and_k_usual_latencies() {
        let p = policy();
        let usual = |ms| Some(Duration::from_millis(ms));
        let signal = |ms, learned| Signal::of(aborted_after(ms), &p, learned);
        // Immediate aborts never count; no start seen, no evidence.
        assert_eq!(signal(0, None), Signal::Abandoned);
        assert_eq!(signal(99, None), Signal::Abandoned);
        let unknown_start = Observation::from(ConnectOutcome::Aborted);
        assert_eq!(Signal::of(unknown_start, &p, None), Signal::Abandoned);
        // The floor (100 ms) with a fast upstream...
        assert_eq!(signal(100, usual(1)), Signal::Failure);
        // ...and four usual round trips with a slow one.
        assert_eq!(signal(300, usual(80)), Signal::Abandoned);
        assert_eq!(signal(320, usual(80)), Signal::Failure);
    }

    #[test]
    fn the_usual_connect_latency_is_learned_from_successes() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        assert_eq!(b.usual_connect_latency(), None);
        let ok = |ms| Observation {
            outcome: OK,
            latency: Some(Duration::from_millis(ms)),
            client: ClientId::UNKNOWN,
        };
        record(&mut b, ok(10), t(1), &p);
        assert_eq!(b.usual_connect_latency(), Some(Duration::from_millis(10)));
        record(&mut b, ok(90), t(2), &p);
        assert_eq!(b.usual_connect_latency(), Some(Duration::from_millis(20)));
        // Failures and aborts teach nothing about latency.
        record(&mut b, aborted_after(5000), t(3), &p);
        assert_eq!(b.usual_connect_latency(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn immediate_aborts_never_trip_and_long_ones_do() {
        let p = policy();
        let mut b = Breaker::new(t(0));
        for _ in 0..50 {
            assert_eq!(record(&mut b, aborted_after(0), t(1), &p), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.counts().aborted, 50);
        for _ in 1..p.failure_threshold {
            assert_eq!(record(&mut b, aborted_after(300), t(2), &p), None);
        }
        let change = record(&mut b, aborted_after(300), t(3), &p).expect("trips");
        assert_eq!(change.to, BreakerState::Open);
    }

    #[test]
    fn an_unused_upstream_is_released_instead_of_cycling() {
        let p = policy();
        let mut b = opened(&p);
        tick(&mut b, t(11), &p);
        let change = b.tick(t(16), &p, Duration::from_secs(10)).unwrap();
        assert_eq!(change.to, BreakerState::Closed);
        assert_eq!(
            change.reason,
            Reason::IdleReleased {
                idle_for: Duration::from_secs(15)
            }
        );
        assert!(b.is_evictable());
    }

    #[test]
    fn failure_rate_trips_on_the_window() {
        let mut p = policy();
        p.failure_threshold = 0;
        p.failure_rate.enabled = true;
        p.window = WindowPolicy {
            kind: WindowKind::Count,
            calls: 10,
            minimum_calls: 4,
            ..WindowPolicy::default()
        };
        let mut b = Breaker::new(t(0));
        for outcome in [FAIL, OK, FAIL] {
            assert_eq!(
                record(&mut b, outcome, t(1), &p),
                None,
                "below minimum calls"
            );
        }
        let change = record(&mut b, OK, t(1), &p).expect("2 of 4 is 50%");
        assert_eq!(
            change.reason,
            Reason::FailureRate {
                failures: 2,
                calls: 4,
                threshold: Percent::new(50)
            }
        );
        assert_eq!(
            change.reason.to_string(),
            "failure rate 50% over 4 connects (2 failed, threshold 50%)"
        );
    }

    #[test]
    fn adaptive_trips_above_the_learned_baseline_only() {
        let mut p = policy();
        p.failure_threshold = 0;
        p.adaptive.enabled = true;
        p.adaptive.warmup_calls = 100;
        p.window.calls = 20;
        p.window.minimum_calls = 20;
        let mut b = Breaker::new(t(0));
        // A usual 30 % failure rate: learned, never trips (30 % < 30 % + 20).
        for i in 0..500 {
            let outcome = if i % 10 < 3 { FAIL } else { OK };
            assert_eq!(record(&mut b, outcome, t(1), &p), None, "call {i}");
        }
        let baseline = b.baseline(&p).unwrap();
        assert!(
            (2_900..=3_100).contains(&baseline.basis_points()),
            "{baseline}"
        );
        // A jump to 80 %: trips once the window shows at least baseline + 20.
        let change = (0..20)
            .find_map(|i| record(&mut b, if i % 10 < 8 { FAIL } else { OK }, t(2), &p))
            .expect("trips");
        let Reason::AboveBaseline {
            failures, calls, ..
        } = change.reason
        else {
            panic!("{:?}", change.reason)
        };
        assert!(Percent::new(50).is_reached_by(failures.into(), calls.into()));
    }

    #[test]
    fn manual_holds_override_the_circuit() {
        let p = policy();
        let mut b = opened(&p);
        let change = b.force_open(t(2), Some(t(62)));
        assert_eq!(
            (change.from, change.to),
            (BreakerState::Open, BreakerState::ForcedOpen)
        );
        assert_eq!(change.reason.to_string(), "manual force-open for 1m");
        assert_eq!(b.decision(&p).unwrap().action, Enforcement::Reject);
        assert_eq!(record(&mut b, FAIL, t(3), &p), None);
        let change = tick(&mut b, t(62), &p).expect("expires");
        assert_eq!(
            (change.from, change.to),
            (BreakerState::ForcedOpen, BreakerState::Closed)
        );
        assert_eq!(
            change.reason,
            Reason::ForceExpired {
                held_for: Duration::from_secs(60)
            }
        );

        let change = b.disable(t(70));
        assert_eq!(change.to, BreakerState::Disabled);
        for _ in 0..10 {
            assert_eq!(record(&mut b, FAIL, t(71), &p), None);
        }
        assert_eq!(b.decision(&p), None);
        assert_eq!(b.enable(t(72)).to, BreakerState::Closed);

        let change = b.reset(t(80));
        assert_eq!(change.reason.to_string(), "manual reset");
        assert_eq!(b.counts(), OutcomeCounts::default());
        assert_eq!(b.ejections(), 0);
    }

    #[test]
    fn metrics_only_runs_the_circuit_as_a_dry_run() {
        let p = BreakerPolicy {
            mode: Mode::MetricsOnly,
            ..policy()
        };
        let b = opened_in(&p);
        assert_eq!(b.state(), BreakerState::MetricsOnly);
        assert_eq!(b.circuit_state(), BreakerState::Open);
        let decision = b.decision(&p).unwrap();
        assert!(decision.dry_run);
        assert_eq!(decision.action, Enforcement::Reject);
    }

    fn opened_in(p: &BreakerPolicy) -> Breaker {
        let mut b = Breaker::for_policy(p, t(0));
        for _ in 0..p.failure_threshold {
            record(&mut b, FAIL, t(1), p);
        }
        b
    }

    #[test]
    fn reconfiguring_the_mode_keeps_the_counters() {
        let p = policy();
        let mut b = opened(&p);
        let dry = BreakerPolicy {
            mode: Mode::MetricsOnly,
            ..policy()
        };
        let change = b.reconfigure(&dry, t(2)).unwrap();
        assert_eq!(
            (change.from, change.to),
            (BreakerState::Open, BreakerState::MetricsOnly)
        );
        assert_eq!(b.circuit_state(), BreakerState::Open);
        let off = BreakerPolicy {
            mode: Mode::Disabled,
            ..policy()
        };
        assert_eq!(
            b.reconfigure(&off, t(3)).unwrap().to,
            BreakerState::Disabled
        );
        assert_eq!(b.circuit_state(), BreakerState::Closed);
        assert_eq!(b.counts().refused, 3);
        assert_eq!(b.reconfigure(&off, t(4)), None);
    }

    #[test]
    fn existing_reason_texts_are_unchanged() {
        let texts = [
            (
                Reason::ConsecutiveFailures {
                    failures: 3,
                    threshold: 3,
                },
                "3 consecutive failures (threshold 3)",
            ),
            (
                Reason::ProbesSucceeded {
                    successes: 1,
                    threshold: 1,
                },
                "1 successful probes (threshold 1)",
            ),
            (
                Reason::ProbeFailed { outcome: FAIL },
                "probe failed: refused",
            ),
            (
                Reason::OpenDurationElapsed {
                    open_for: Duration::from_secs(2),
                },
                "open for 2s",
            ),
            (
                Reason::ProbeTimedOut {
                    waited: Duration::from_secs(5),
                },
                "no probe outcome within 5s: tokens given back",
            ),
            (
                Reason::ProbeAbandoned {
                    waited: Some(Duration::from_millis(3)),
                },
                "probe abandoned by its client after 3ms: token given back",
            ),
            (Reason::Adopted, "adopted from the kernel"),
        ];
        for (reason, text) in texts {
            assert_eq!(reason.to_string(), text);
        }
        let states = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::ForcedOpen,
            BreakerState::Disabled,
            BreakerState::MetricsOnly,
        ]
        .map(|s| s.to_string());
        assert_eq!(
            states,
            [
                "CLOSED",
                "OPEN",
                "HALF_OPEN",
                "FORCED_OPEN",
                "DISABLED",
                "METRICS_ONLY"
            ]
        );
    }
}
