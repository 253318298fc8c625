//! The single breaker's state machine, on a manual clock.

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
        service: None,
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
        service: None,
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
        service: None,
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
        service: None,
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
