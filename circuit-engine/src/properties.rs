//! Property tests: invariants that must hold for any stream of outcomes and clock moves.

use std::{net::SocketAddr, time::Duration};

use circuit_common::ConnectOutcome;
use proptest::prelude::*;

use super::{ClientId, window::Window, *};
use crate::settings::{EngineConfig as Config, GroupConfig};

/// One thing that happens to the engine.
#[derive(Clone, Debug)]
enum Action {
    Outcome {
        upstream: u8,
        outcome: ConnectOutcome,
        latency_ms: Option<u16>,
    },
    Advance {
        millis: u32,
    },
    Tick,
}

fn actions(upstreams: u8, len: usize) -> impl Strategy<Value = Vec<Action>> {
    let action = prop_oneof![
        8 => (0..upstreams, prop::sample::select(ConnectOutcome::ALL.to_vec()), prop::option::of(0u16..2_000))
            .prop_map(|(upstream, outcome, latency_ms)| Action::Outcome { upstream, outcome, latency_ms }),
        2 => (0u32..20_000).prop_map(|millis| Action::Advance { millis }),
        1 => Just(Action::Tick),
    ];
    prop::collection::vec(action, 1..len)
}

/// Policies over the whole space the invariants must hold in.
fn policies() -> impl Strategy<Value = BreakerPolicy> {
    (
        (0u32..6, 1u32..5, 1u32..6, 1u64..20, 1u64..20, 0u64..3),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (any::<bool>(), 1u32..30, 1u32..30, 1u32..100),
    )
        .prop_map(
            |(
                (failure_threshold, probes, successes, open_s, wait_s, jitter_s),
                (rate, slow, adaptive, retransmits, resets),
                (time_window, calls, minimum_calls, percent),
            )| {
                let mut policy = BreakerPolicy {
                    failure_threshold,
                    half_open_probes: probes,
                    success_threshold: successes,
                    open_duration: Duration::from_secs(open_s),
                    probe_timeout: Duration::from_secs(wait_s),
                    open_jitter: Duration::from_secs(jitter_s),
                    syn_retransmit_is_failure: retransmits,
                    reset_is_failure: resets,
                    ..BreakerPolicy::default()
                };
                policy.window = WindowPolicy {
                    kind: if time_window {
                        WindowKind::Time
                    } else {
                        WindowKind::Count
                    },
                    calls,
                    length: Duration::from_secs(u64::from(calls)),
                    buckets: calls,
                    minimum_calls,
                };
                policy.failure_rate.enabled = rate;
                policy.failure_rate.threshold_percent = Percent::new(percent);
                policy.slow_connects.enabled = slow;
                policy.slow_connects.latency = Duration::from_millis(500);
                policy.adaptive.enabled = adaptive;
                policy.adaptive.warmup_calls = 10;
                policy
            },
        )
}

fn member(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 1, 0, i + 1], 80))
}

/// Runs `actions`, calling `check` with every transition and after every action.
fn run(
    config: &Config,
    actions: &[Action],
    mut on_transition: impl FnMut(&Breakers<ManualClock>, &Transition) -> Result<(), TestCaseError>,
    mut after_each: impl FnMut(&mut Breakers<ManualClock>) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(MonoTime::from_nanos(1));
    let mut set = Breakers::with_config(config, clock.clone())
        .unwrap()
        .with_jitter_seed(3);
    for action in actions {
        let transitions = match *action {
            Action::Outcome {
                upstream,
                outcome,
                latency_ms,
            } => {
                let observation = Observation::new(
                    outcome,
                    latency_ms.map(|ms| Duration::from_millis(ms.into())),
                    ClientId::UNKNOWN,
                );
                set.observe(member(upstream), observation)
                    .into_iter()
                    .collect()
            }
            Action::Advance { millis } => {
                clock.advance(Duration::from_millis(millis.into()));
                Vec::new()
            }
            Action::Tick => {
                let early = set.next_deadline().is_none_or(|d| d > clock.now());
                let tracked = set.len();
                let transitions = set.tick();
                if early {
                    prop_assert!(transitions.is_empty(), "tick before the deadline moved");
                    prop_assert_eq!(set.len(), tracked, "tick before the deadline evicted");
                }
                transitions
            }
        };
        for transition in &transitions {
            on_transition(&set, transition)?;
        }
        after_each(&mut set)?;
    }
    Ok(())
}

fn config_with(policy: BreakerPolicy) -> Config {
    Config {
        defaults: policy,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A DISABLED breaker (by policy, or by an operator) never rejects and never moves.
    #[test]
    fn disabled_never_rejects(policy in policies(), manual in any::<bool>(), actions in actions(4, 300)) {
        let policy = BreakerPolicy {
            mode: if manual { Mode::Enforce } else { Mode::Disabled },
            ..policy
        };
        let clock = ManualClock::new(MonoTime::from_nanos(1));
        let mut set = Breakers::with_config(&config_with(policy), clock.clone()).unwrap();
        if manual {
            for i in 0..4 {
                set.disable(member(i)).unwrap();
            }
        }
        for action in &actions {
            let moved = match *action {
                Action::Outcome { upstream, outcome, .. } => set.record(member(upstream), outcome).is_some(),
                Action::Advance { millis } => {
                    clock.advance(Duration::from_millis(millis.into()));
                    false
                }
                Action::Tick => !set.tick().is_empty(),
            };
            prop_assert!(!moved);
            prop_assert_eq!(set.decisions().count(), 0);
            prop_assert_eq!(set.enforcements().count(), 0);
        }
    }

    /// HALF_OPEN never counts more probe outcomes than its budget, always offers exactly the
    /// budget, and never closes on more successes than the budget.
    #[test]
    fn half_open_stays_within_its_probe_budget(policy in policies(), actions in actions(3, 400)) {
        let budget = policy.half_open_probes;
        run(
            &config_with(policy),
            &actions,
            |_, transition| {
                if let Reason::ProbesSucceeded { successes, threshold } = transition.change.reason {
                    prop_assert!(successes <= budget && threshold <= budget);
                }
                Ok(())
            },
            |set| {
                for (upstream, breaker) in set.iter() {
                    if breaker.circuit_state() == BreakerState::HalfOpen {
                        prop_assert!(breaker.probe_outcomes() <= budget);
                        let probing = match set.decision(&upstream).map(|d| d.action) {
                            Some(Enforcement::Probe { budget: b, .. }) => Some(b),
                            _ => None,
                        };
                        prop_assert_eq!(probing, Some(budget));
                    }
                }
                Ok(())
            },
        )?;
    }

    /// A group never isolates more than its max ejection percent (or the one upstream
    /// `always_eject_one` allows), and its counters match a recount.
    #[test]
    fn max_ejection_percent_is_never_exceeded(
        policy in policies(),
        max_percent in 0u32..=100,
        always_eject_one in any::<bool>(),
        guarded in any::<bool>(),
        members in 1u8..12,
        actions in actions(12, 400),
    ) {
        let mut config = config_with(policy);
        // Long enough that no member goes idle: the group never shrinks under the test.
        config.tracking.idle_after = Duration::from_secs(1_000_000);
        config.guard.enabled = guarded;
        config.groups.push(GroupConfig {
            name: "web".into(),
            upstreams: vec![Selector::any_port("10.1.0.0/24".parse().unwrap())],
            max_ejection_percent: Percent::new(max_percent),
            always_eject_one,
            guard: GuardPatch::default(),
            policy: PolicyPatch::default(),
        });
        let actions: Vec<Action> = actions
            .into_iter()
            .map(|action| match action {
                Action::Outcome { upstream, outcome, latency_ms } => Action::Outcome {
                    upstream: upstream % members,
                    outcome,
                    latency_ms,
                },
                other => other,
            })
            .collect();
        run(&config, &actions, |_, _| Ok(()), |set| {
            let status = set.groups().next().unwrap();
            let isolating = set.iter().filter(|(_, b)| b.decision(set.policy()).is_some()).count();
            prop_assert_eq!(status.isolated as usize, isolating);
            prop_assert_eq!(status.members as usize, set.len());
            let within_cap = !Percent::new(max_percent)
                .is_exceeded_by(status.isolated.into(), status.members.into());
            prop_assert!(
                status.isolated == 0 || within_cap || (always_eject_one && status.isolated == 1),
                "{} of {} isolated, max {}%", status.isolated, status.members, max_percent
            );
            Ok(())
        })?;
    }

    /// Tracked upstreams never exceed the bound, whatever the traffic.
    #[test]
    fn tracking_stays_bounded(policy in policies(), bound in 1u32..6, actions in actions(20, 300)) {
        let mut config = config_with(policy);
        config.tracking.max_upstreams = bound;
        run(&config, &actions, |_, _| Ok(()), |set| {
            prop_assert!(set.len() <= bound as usize);
            Ok(())
        })?;
    }

    /// Count windows hold exactly the last `calls` outcomes.
    #[test]
    fn count_window_equals_brute_force(
        calls in 1u32..200,
        events in prop::collection::vec((any::<bool>(), any::<bool>()), 0..600),
    ) {
        let policy = WindowPolicy { kind: WindowKind::Count, calls, ..WindowPolicy::default() };
        let now = MonoTime::from_nanos(0);
        let mut window = Window::new(&policy, now);
        for (i, &(failed, slow)) in events.iter().enumerate() {
            window.record(now, failed, slow);
            let recent = &events[(i + 1).saturating_sub(calls as usize)..=i];
            prop_assert_eq!(window.totals(now), totals_of(recent.iter().copied()));
        }
    }

    /// Time windows hold exactly the outcomes whose bucket is one of the last `buckets`.
    #[test]
    fn time_window_equals_brute_force(
        length_ms in 1u64..5_000,
        buckets in 1u32..50,
        events in prop::collection::vec((0u64..2_000, any::<bool>(), any::<bool>()), 0..400),
        probe_gap_ms in 0u64..10_000,
    ) {
        let policy = WindowPolicy {
            kind: WindowKind::Time,
            length: Duration::from_millis(length_ms),
            buckets,
            ..WindowPolicy::default()
        };
        let width = (length_ms * 1_000_000 / u64::from(buckets)).max(1);
        let mut now = 7_000_000u64;
        let mut window = Window::new(&policy, MonoTime::from_nanos(now));
        let mut seen: Vec<(u64, bool, bool)> = Vec::new();
        let brute = |seen: &[(u64, bool, bool)], now: u64| {
            let current = now / width;
            totals_of(
                seen.iter()
                    .filter(|&&(at, _, _)| at / width + u64::from(buckets) > current)
                    .map(|&(_, failed, slow)| (failed, slow)),
            )
        };
        for &(gap_ms, failed, slow) in &events {
            now += gap_ms * 1_000_000;
            window.record(MonoTime::from_nanos(now), failed, slow);
            seen.push((now, failed, slow));
            prop_assert_eq!(window.totals(MonoTime::from_nanos(now)), brute(&seen, now));
        }
        now += probe_gap_ms * 1_000_000;
        prop_assert_eq!(window.totals(MonoTime::from_nanos(now)), brute(&seen, now));
    }

    /// A breaker's window (classification included) equals a recount of the outcomes it saw
    /// since it last changed state, and a failure-rate trip reports those numbers.
    #[test]
    fn breaker_window_rates_equal_brute_force(policy in policies(), actions in actions(1, 300)) {
        let mut policy = policy;
        policy.failure_threshold = 0;
        policy.failure_rate.enabled = true;
        policy.slow_connects.enabled = false;
        policy.adaptive.enabled = false;
        let mut config = config_with(policy.clone());
        // The breaker must not be evicted under the test: its window would start over.
        config.tracking.idle_after = Duration::from_secs(1_000_000);
        let clock = ManualClock::new(MonoTime::from_nanos(1));
        let mut set = Breakers::with_config(&config, clock.clone()).unwrap();
        let upstream = member(0);
        let mut since_change: Vec<(u64, bool, bool)> = Vec::new();
        for action in &actions {
            let now = clock.now().as_nanos();
            let transition = match *action {
                Action::Outcome { outcome, latency_ms, .. } => {
                    let observation = Observation::new(
                        outcome,
                        latency_ms.map(|ms| Duration::from_millis(ms.into())),
                        ClientId::UNKNOWN,
                    );
                    let closed = set.get(&upstream).is_none_or(|b| b.state() == BreakerState::Closed);
                    let usual = set.get(&upstream).and_then(|b| b.usual_connect_latency());
                    match Signal::of(observation, &policy, usual) {
                        _ if !closed => {}
                        Signal::Failure => since_change.push((now, true, false)),
                        Signal::Success { slow } => since_change.push((now, false, slow)),
                        Signal::Ignored | Signal::Abandoned => {}
                    }
                    set.observe(upstream, observation)
                }
                Action::Advance { millis } => {
                    clock.advance(Duration::from_millis(millis.into()));
                    None
                }
                Action::Tick => set.tick().pop(),
            };
            let now = clock.now().as_nanos();
            let expected = window_brute_force(&policy.window, &since_change, now);
            if let Some(transition) = transition {
                if let Reason::FailureRate { failures, calls, .. } = transition.change.reason {
                    prop_assert_eq!((failures, calls), (expected.failures, expected.calls));
                }
                since_change.clear();
            }
            if let Some(breaker) = set.get(&upstream).cloned().as_mut()
                && breaker.state() == BreakerState::Closed
                && let Some(totals) = breaker.window_totals(MonoTime::from_nanos(now))
            {
                prop_assert_eq!(totals, window_brute_force(&policy.window, &since_change, now));
            }
        }
    }
}

fn totals_of(events: impl Iterator<Item = (bool, bool)>) -> WindowTotals {
    let mut totals = WindowTotals::default();
    for (failed, slow) in events {
        totals.calls += 1;
        totals.failures += u32::from(failed);
        totals.slow += u32::from(slow);
    }
    totals
}

/// The window's contents by definition, from the raw events.
fn window_brute_force(
    policy: &WindowPolicy,
    events: &[(u64, bool, bool)],
    now: u64,
) -> WindowTotals {
    match policy.kind {
        WindowKind::Count => {
            let start = events.len().saturating_sub(policy.calls as usize);
            totals_of(events[start..].iter().map(|&(_, f, s)| (f, s)))
        }
        WindowKind::Time => {
            let width = (policy.length.as_nanos() as u64 / u64::from(policy.buckets)).max(1);
            let current = now / width;
            totals_of(
                events
                    .iter()
                    .filter(|&&(at, _, _)| at / width + u64::from(policy.buckets) > current)
                    .map(|&(_, f, s)| (f, s)),
            )
        }
    }
}
