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

use std::{net::SocketAddr, time::Duration};

use circuit_common::ConnectOutcome;

pub use super::change::{BreakerState, Change, ManualAction, OutcomeCounts, Reason, outcome_name};
use super::{
    Decision, Enforcement,
    backoff::{Backoff, FlapHistory, JitterRng, OpenPeriod},
    policy::{AdaptivePolicy, BreakerPolicy, Mode},
    units::Percent,
    window::{Window, WindowTotals},
    witness::{ClientId, ClientWitness, Scope, WitnessBook},
};
use crate::clock::MonoTime;

/// One connection outcome with its connect latency when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub outcome: ConnectOutcome,
    /// From connect() to the outcome; `None` when the kernel did not see the start.
    pub latency: Option<Duration>,
    /// Who connected ([`ClientId::UNKNOWN`] when not attributed).
    pub client: ClientId,
    /// The virtual address the client connected to, when a NAT picked the upstream (an
    /// endpoint behind a service); see [`crate::ServiceBook`].
    pub service: Option<SocketAddr>,
}

impl Observation {
    pub fn new(outcome: ConnectOutcome, latency: Option<Duration>, client: ClientId) -> Self {
        Self {
            outcome,
            latency,
            client,
            service: None,
        }
    }

    /// The same outcome, reached through `service`'s NAT.
    pub fn via(self, service: Option<SocketAddr>) -> Self {
        Self { service, ..self }
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
    /// Whether a trip now would isolate the upstream for the node ([`Breaker::trip_scope`]
    /// is [`Scope::Node`]), asked on every failure without allocating.
    pub(crate) fn trips_for_node(&self, policy: &BreakerPolicy, now: MonoTime) -> bool {
        self.witnesses
            .as_ref()
            .is_some_and(|book| book.is_node_wide(policy.min_witnesses, policy.witness_window, now))
    }

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
    pub fn is_isolating(&self) -> bool {
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
mod tests;
