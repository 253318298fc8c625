//! Scenarios on the simulated clock: documented behaviour of Envoy's outlier detection and
//! resilience4j's circuit breaker, and the manager's guards, bounds, manual control and
//! reload.

use std::{net::SocketAddr, time::Duration};

use circuit_common::ConnectOutcome::{self, Connected, Refused, TimedOut};

use super::*;
use crate::settings::{EngineConfig as Config, from_toml};

const START: MonoTime = MonoTime::from_nanos(1_000_000_000);

fn config(toml: &str) -> Config {
    from_toml(toml)
}

fn breakers(config: &Config) -> (Breakers<ManualClock>, ManualClock) {
    let clock = ManualClock::new(START);
    let breakers = Breakers::with_config(config, clock.clone())
        .unwrap()
        .with_jitter_seed(7);
    (breakers, clock)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The node's clients take turns connecting to each upstream, as two pods would: an upstream that fails,
/// fails them both, so trips have the two witnesses a node-wide verdict needs (see
/// `witness.rs` and `witnesses_decide_the_scope_of_a_trip` for one client alone).
fn record(
    set: &mut Breakers<ManualClock>,
    upstream: SocketAddr,
    outcome: ConnectOutcome,
) -> Option<Transition> {
    record_with(set, upstream, outcome, None)
}

fn record_with_latency(
    set: &mut Breakers<ManualClock>,
    upstream: SocketAddr,
    outcome: ConnectOutcome,
    latency: Duration,
) -> Option<Transition> {
    record_with(set, upstream, outcome, Some(latency))
}

fn record_with(
    set: &mut Breakers<ManualClock>,
    upstream: SocketAddr,
    outcome: ConnectOutcome,
    latency: Option<Duration>,
) -> Option<Transition> {
    thread_local! {
        static TURNS: std::cell::RefCell<std::collections::HashMap<SocketAddr, u64>> =
            std::cell::RefCell::default();
    }
    let turn = TURNS.with(|turns| {
        let mut turns = turns.borrow_mut();
        let turn = turns.entry(upstream).or_default();
        *turn += 1;
        *turn
    });
    set.observe(
        upstream,
        Observation::new(outcome, latency, ClientId(1 + turn % 2)),
    )
}

fn feed(
    set: &mut Breakers<ManualClock>,
    upstream: SocketAddr,
    outcomes: &[ConnectOutcome],
) -> Vec<Transition> {
    outcomes
        .iter()
        .filter_map(|&outcome| record(set, upstream, outcome))
        .collect()
}

fn suppressions(set: &mut Breakers<ManualClock>) -> Vec<Suppressed> {
    set.drain_notices()
        .filter_map(|notice| match notice {
            Notice::Suppressed(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// Envoy: `consecutive_5xx` 5 ejects at once; the n-th ejection lasts `base_ejection_time`
/// (30 s) × n, capped at `max_ejection_time` (300 s). Our HALF_OPEN probe stands in for
/// Envoy's un-ejection: a failed probe is the next ejection.
#[test]
fn envoy_five_consecutive_failures_eject_for_30s_times_n_capped_at_300s() {
    let (mut set, clock) = breakers(&Config::default());
    let host = addr("10.0.0.1:8080");
    assert!(feed(&mut set, host, &[Refused; 4]).is_empty());
    assert!(
        record(&mut set, host, Connected).is_none(),
        "a success resets the count"
    );
    assert!(feed(&mut set, host, &[Refused; 4]).is_empty());
    let eject = record(&mut set, host, TimedOut).expect("fifth consecutive failure ejects");
    assert_eq!(
        eject.change.reason,
        Reason::ConsecutiveFailures {
            failures: 5,
            threshold: 5
        }
    );
    let mut durations = vec![eject.change.open.unwrap().duration.as_secs()];
    for _ in 0..11 {
        clock.set(set.next_deadline().unwrap());
        let probing = set.tick();
        assert_eq!(probing[0].change.to, BreakerState::HalfOpen);
        let reopen = record(&mut set, host, Refused).expect("the probe fails");
        durations.push(reopen.change.open.unwrap().duration.as_secs());
    }
    assert_eq!(
        durations,
        [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
    );
}

/// Envoy decrements the ejection multiplier for every healthy `interval` (10 s).
#[test]
fn envoy_ejection_multiplier_decays_while_healthy() {
    let (mut set, clock) = breakers(&Config::default());
    let host = addr("10.0.0.1:8080");
    feed(&mut set, host, &[Refused; 5]);
    for _ in 0..2 {
        clock.set(set.next_deadline().unwrap());
        set.tick();
        record(&mut set, host, Refused);
    }
    assert_eq!(set.get(&host).unwrap().ejections(), 3);
    clock.set(set.next_deadline().unwrap());
    set.tick();
    assert_eq!(
        record(&mut set, host, Connected).unwrap().change.to,
        BreakerState::Closed
    );
    // 25 s healthy forgets two ejections: the next one is the second (60 s).
    clock.advance(secs(25));
    let eject = feed(&mut set, host, &[Refused; 5]).pop().unwrap();
    let open = eject.change.open.unwrap();
    assert_eq!((open.ejection, open.duration), (2, secs(60)));
}

fn group_config(members: usize, max_percent: u32, always_eject_one: bool) -> Config {
    config(&format!(
        r#"
[[groups]]
name = "web"
upstreams = [{{ cidr = "10.1.0.0/24", ports = [80] }}]
max_ejection_percent = {max_percent}
always_eject_one = {always_eject_one}
[groups.guard]
enabled = false
[guard]
min_active = {}
"#,
        members + 1
    ))
}

fn group_member(i: usize) -> SocketAddr {
    addr(&format!("10.1.0.{}:80", i + 1))
}

/// Envoy's strict `max_ejection_percent` (10 %): a group of 10 ejects one host, not two.
#[test]
fn envoy_max_ejection_percent_caps_a_group() {
    let (mut set, clock) = breakers(&group_config(10, 10, false));
    for i in 0..10 {
        record(&mut set, group_member(i), Connected);
    }
    assert!(!feed(&mut set, group_member(0), &[Refused; 5]).is_empty());
    assert!(feed(&mut set, group_member(1), &[Refused; 5]).is_empty());
    let suppressed = suppressions(&mut set);
    assert_eq!(suppressed.len(), 1, "reported once, not per failure");
    assert_eq!(
        suppressed[0].cause,
        SuppressionCause::MaxEjection {
            group: "web".into(),
            isolated: 1,
            members: 10,
            max: Percent::new(10)
        }
    );
    assert_eq!(
        suppressed[0].to_string(),
        "trip of 10.1.0.2:80 on 5 consecutive failures (threshold 5) suppressed: \
         group web already isolates 1 of 10 upstreams (max 10%)"
    );
    assert_eq!(set.groups().next().unwrap().isolated, 1);
    // Once the first host recovers, the second may go.
    clock.set(set.next_deadline().unwrap());
    set.tick();
    record(&mut set, group_member(0), Connected);
    let eject = record(&mut set, group_member(1), Refused).expect("room again");
    assert_eq!(eject.upstream, group_member(1));
    assert_eq!(set.stats().suppressed_trips, 1);
}

/// Envoy's strict cap isolates nothing in a group smaller than 100 / max; `always_eject_one`
/// (Envoy 1.31's `always_eject_one_host`, our default) allows exactly one.
#[test]
fn always_eject_one_allows_a_single_isolation_in_small_groups() {
    for (always_eject_one, expected) in [(false, 0), (true, 1)] {
        let (mut set, _) = breakers(&group_config(3, 10, always_eject_one));
        for i in 0..3 {
            record(&mut set, group_member(i), Connected);
        }
        for i in 0..3 {
            feed(&mut set, group_member(i), &[Refused; 5]);
        }
        assert_eq!(set.groups().next().unwrap().isolated, expected);
        assert_eq!(set.enforcements().count(), expected as usize);
    }
}

/// resilience4j COUNT_BASED: the rate is judged over the last `slidingWindowSize` calls once
/// `minimumNumberOfCalls` were made, and trips at `failureRateThreshold` or above.
#[test]
fn resilience4j_count_window_with_minimum_calls() {
    let (mut set, _) = breakers(&config(
        r#"
[defaults]
failure_threshold = 0
[defaults.window]
kind = "count"
calls = 10
minimum_calls = 5
[defaults.failure_rate]
enabled = true
threshold_percent = 50
"#,
    ));
    let a = addr("192.0.2.1:443");
    assert!(
        feed(&mut set, a, &[Refused; 4]).is_empty(),
        "4 calls < minimum 5"
    );
    let trip = record(&mut set, a, Refused).expect("5 of 5 failed");
    assert_eq!(
        trip.change.reason,
        Reason::FailureRate {
            failures: 5,
            calls: 5,
            threshold: Percent::new(50)
        }
    );
    let b = addr("192.0.2.2:443");
    assert!(
        feed(
            &mut set,
            b,
            &[Connected, Connected, Connected, Refused, Refused]
        )
        .is_empty()
    );
    let trip = record(&mut set, b, Refused).expect("3 of 6 is 50 %");
    assert!(matches!(
        trip.change.reason,
        Reason::FailureRate {
            failures: 3,
            calls: 6,
            ..
        }
    ));
    // Only the last 10 count: later successes push old failures out.
    let c = addr("192.0.2.3:443");
    assert!(feed(&mut set, c, &[Connected; 6]).is_empty());
    assert!(feed(&mut set, c, &[Refused; 4]).is_empty(), "4 of 10");
    assert!(feed(&mut set, c, &[Connected; 10]).is_empty());
    assert!(
        feed(&mut set, c, &[Refused; 4]).is_empty(),
        "the first four slid out: 4 of 10"
    );
    assert!(record(&mut set, c, Refused).is_some(), "5 of 10");
}

/// resilience4j TIME_BASED: the calls of the last window (in one-second buckets) are judged.
#[test]
fn resilience4j_time_window_forgets_old_calls() {
    let (mut set, clock) = breakers(&config(
        r#"
[defaults]
failure_threshold = 0
[defaults.window]
kind = "time"
length = "10s"
buckets = 10
minimum_calls = 5
[defaults.failure_rate]
enabled = true
threshold_percent = 50
"#,
    ));
    let a = addr("192.0.2.1:443");
    feed(&mut set, a, &[Refused, Refused]);
    clock.advance(secs(5));
    assert!(feed(&mut set, a, &[Connected; 3]).is_empty(), "2 of 5");
    clock.advance(secs(6));
    // The two failures are 11 s old: out of the 10 s window.
    assert!(
        record(&mut set, a, Refused).is_none(),
        "1 failure in 4 calls, below the minimum"
    );
    assert!(record(&mut set, a, Refused).is_none(), "2 of 5");
    let trip = record(&mut set, a, Refused).expect("3 of 6");
    assert!(matches!(
        trip.change.reason,
        Reason::FailureRate {
            failures: 3,
            calls: 6,
            ..
        }
    ));
}

/// resilience4j `permittedNumberOfCallsInHalfOpenState`: N probes; here any failure re-opens
/// and `success_threshold` successes close (resilience4j judges their rate instead).
#[test]
fn resilience4j_half_open_probes() {
    let (mut set, clock) = breakers(&config(
        "[defaults]\nhalf_open_probes = 3\nsuccess_threshold = 3\nopen_duration = \"60s\"\n",
    ));
    let a = addr("192.0.2.1:443");
    feed(&mut set, a, &[Refused; 5]);
    clock.advance(secs(60));
    set.tick();
    assert_eq!(
        set.enforcement(&a),
        Some(Enforcement::Probe {
            budget: 3,
            round: 0
        })
    );
    assert!(feed(&mut set, a, &[Connected, Connected]).is_empty());
    let close = record(&mut set, a, Connected).expect("third success closes");
    assert_eq!(
        close.change.reason,
        Reason::ProbesSucceeded {
            successes: 3,
            threshold: 3
        }
    );
    // Again, and a failure among the probes re-opens at once.
    feed(&mut set, a, &[Refused; 5]);
    clock.set(set.next_deadline().unwrap());
    set.tick();
    record(&mut set, a, Connected);
    let reopen = record(&mut set, a, TimedOut).expect("a failed probe re-opens");
    assert_eq!(reopen.change.to, BreakerState::Open);
}

#[test]
fn slow_connects_trip_on_their_rate() {
    let (mut set, _) = breakers(&config(
        r#"
[defaults]
failure_threshold = 0
[defaults.window]
calls = 4
minimum_calls = 4
[defaults.slow_connects]
enabled = true
latency = "500ms"
threshold_percent = 50
"#,
    ));
    let a = addr("192.0.2.1:443");
    let fast = Duration::from_millis(2);
    let slow = Duration::from_millis(700);
    assert!(record_with_latency(&mut set, a, Connected, slow).is_none());
    assert!(record_with_latency(&mut set, a, Connected, fast).is_none());
    assert!(
        record(&mut set, a, Connected).is_none(),
        "unknown latency is not slow"
    );
    let trip = record_with_latency(&mut set, a, Connected, slow).expect("2 of 4 slow");
    assert_eq!(
        trip.change.reason.to_string(),
        "slow-connect rate 50% over 4 connects (2 took 500ms or more, threshold 50%)"
    );
}

/// A node-wide failure spike (the node's own network) suppresses new trips.
#[test]
fn the_panic_guard_suppresses_trips_during_a_node_wide_spike() {
    let (mut set, clock) = breakers(&Config::default());
    let upstreams: Vec<SocketAddr> = (1..=8).map(|i| addr(&format!("10.9.0.{i}:443"))).collect();
    for &u in &upstreams {
        record(&mut set, u, Connected);
    }
    // Everything fails at once, for both clients: the first upstream trips before most
    // have failed...
    for round in 0..5 {
        for &u in &upstreams {
            record(&mut set, u, Refused);
        }
        if round == 0 {
            // One client's word so far: failing for that client, not yet for the node.
            assert_eq!(
                set.node_activity().0,
                Activity {
                    active: 8,
                    failing: 0
                }
            );
        }
        if round == 1 {
            assert_eq!(
                set.node_activity().0,
                Activity {
                    active: 8,
                    failing: 8
                }
            );
        }
    }
    assert_eq!(
        set.enforcements().count(),
        0,
        "more than half failing: no trip"
    );
    let suppressed = suppressions(&mut set);
    assert_eq!(suppressed.len(), 8);
    assert!(matches!(
        suppressed[0].cause,
        SuppressionCause::Panic {
            scope: GuardScope::Node,
            failing: 8,
            active: 8,
            ..
        }
    ));
    // The network recovers; later a single upstream fails on its own and trips.
    clock.advance(secs(1));
    for &u in &upstreams {
        record(&mut set, u, Connected);
    }
    let trips = feed(&mut set, upstreams[0], &[Refused; 5]);
    assert_eq!(trips.len(), 1);
    // Upstreams that fall silent stop counting as active after the activity window.
    clock.advance(secs(11));
    assert_eq!(record(&mut set, upstreams[1], Connected), None);
    assert_eq!(
        set.node_activity().0,
        Activity {
            active: 1,
            failing: 0
        }
    );
}

/// One process failing against every upstream it can name (20 refusals a second from an
/// unprivileged pod) spends the panic guard for nobody: the failures count for the guard only
/// on the word of enough clients, so a real failure elsewhere still trips for the node.
#[test]
fn one_client_failing_everywhere_does_not_spend_the_panic_guard() {
    let (mut set, clock) = breakers(&Config::default());
    let noise: Vec<SocketAddr> = (1..=40).map(|i| addr(&format!("10.9.2.{i}:9"))).collect();
    for _ in 0..5 {
        for &u in &noise {
            from(&mut set, 66, u, Refused);
        }
        clock.advance(Duration::from_millis(50));
    }
    // Never connected to: a port scan, not even activity that dilutes the guard's share.
    assert_eq!(active_and_failing(&set), (0, 0));
    // Upstreams nobody has connected to yet (a restarted agent's) that two clients see fail
    // are activity and failing: the guard still sees a node-wide spike after a restart.
    let fresh = addr("10.9.8.1:443");
    from(&mut set, 1, fresh, Refused);
    from(&mut set, 2, fresh, Refused);
    assert_eq!(active_and_failing(&set), (1, 1));
    // The noisy client is failed fast on its own at each of them...
    assert!(set.client_holds().all(|h| h.client == ClientId(66)));
    assert!(set.client_holds().count() > 0);
    // ...and a real outage two pods see still isolates for the node.
    let real = addr("10.9.3.1:443");
    from(&mut set, 1, real, Connected);
    let mut tripped = None;
    for _ in 0..3 {
        tripped = tripped.or(from(&mut set, 1, real, Refused));
        tripped = tripped.or(from(&mut set, 2, real, Refused));
    }
    let tripped = tripped.expect("a node-wide trip");
    assert_eq!(
        (tripped.change.to, tripped.client),
        (BreakerState::Open, None)
    );
    assert!(suppressions(&mut set).is_empty());
    assert_eq!(active_and_failing(&set), (2, 2));
}

/// A failure of `upstream`, which had connected, that two clients witness: failing, for
/// the panic guard.
fn failed_for_node(set: &mut Breakers<ManualClock>, upstream: SocketAddr) {
    from(set, 1, upstream, Connected);
    from(set, 1, upstream, Refused);
    from(set, 2, upstream, Refused);
}

/// The panic guard's node-wide counts: upstreams active, and of those, failing.
fn active_and_failing(set: &Breakers<ManualClock>) -> (u32, u32) {
    let (activity, _) = set.node_activity();
    (activity.active, activity.failing)
}

/// The guard's "active" marks end exactly one activity window after an upstream's last
/// signal: a signal just before the end renews the mark, and the marks end in the order of
/// their last signals, whichever upstream signalled first.
#[test]
fn an_active_mark_lasts_one_window_from_the_last_signal() {
    let (mut set, clock) = breakers(&Config::default());
    let (a, b) = (addr("10.9.1.1:443"), addr("10.9.1.2:443"));
    failed_for_node(&mut set, a);
    record(&mut set, b, Connected);
    assert_eq!(active_and_failing(&set), (2, 1));
    // `a` renews its mark a nanosecond before the window ends, now as a success.
    clock.advance(secs(10) - Duration::from_nanos(1));
    record(&mut set, a, Connected);
    assert_eq!(active_and_failing(&set), (2, 0));
    // `b`, signalled first, ends first: exactly at the end of its window.
    clock.advance(Duration::from_nanos(1));
    set.tick();
    assert_eq!(active_and_failing(&set), (1, 0));
    clock.advance(secs(10) - Duration::from_nanos(2));
    set.tick();
    assert_eq!(active_and_failing(&set), (1, 0));
    clock.advance(Duration::from_nanos(1));
    set.tick();
    assert_eq!(active_and_failing(&set), (0, 0));
}

/// An upstream evicted for room while active takes its mark with it; the upstream that
/// reuses its slot starts with a mark of its own, which ends on its own schedule.
#[test]
fn an_evicted_active_upstream_leaves_no_mark_behind() {
    let (mut set, clock) = breakers(&config("[tracking]\nmax_upstreams = 2\n"));
    let (a, b, c) = (
        addr("10.9.2.1:443"),
        addr("10.9.2.2:443"),
        addr("10.9.2.3:443"),
    );
    failed_for_node(&mut set, b);
    // `a` failed lately too (one client's word: active, not failing for the node), so
    // neither is spared for being clean.
    from(&mut set, 1, a, Connected);
    from(&mut set, 1, a, Refused);
    assert_eq!(active_and_failing(&set), (2, 1));
    // `c` needs room: `b`, the least recently active, goes, failing mark and all.
    clock.advance(secs(5));
    set.drain_notices().for_each(drop);
    record(&mut set, c, Connected);
    assert!(set.get(&b).is_none());
    assert_eq!(set.stats().evicted_for_room, 1);
    assert_eq!(
        set.drain_notices().collect::<Vec<_>>(),
        vec![Notice::Evicted {
            upstream: b,
            cause: EvictionCause::Room
        }],
        "the caller hears of it, to drop what it keeps for `b`"
    );
    assert_eq!(active_and_failing(&set), (2, 0));
    // `a`'s mark ends 10 s after its signal, `c`'s 5 s later, in `b`'s old slot.
    clock.advance(secs(5));
    set.tick();
    assert_eq!(active_and_failing(&set), (1, 0));
    clock.advance(secs(5));
    set.tick();
    assert_eq!(active_and_failing(&set), (0, 0));
    // A signal from `b` again is a new upstream's first.
    failed_for_node(&mut set, b);
    assert_eq!(active_and_failing(&set), (1, 1));
}

#[test]
fn flapping_upstreams_get_longer_open_durations() {
    let (mut set, clock) = breakers(&config(
        "[defaults]\nopen_duration = \"10s\"\nbackoff_decay = \"1s\"\n",
    ));
    let a = addr("192.0.2.1:443");
    let mut opens = Vec::new();
    for _ in 0..3 {
        let trip = feed(&mut set, a, &[Refused; 5]).pop().unwrap();
        opens.push(trip.change.open.unwrap());
        clock.set(set.next_deadline().unwrap());
        set.tick();
        record(&mut set, a, Connected);
        // Healthy long enough that the ejection multiplier decays fully.
        clock.advance(secs(60));
    }
    let durations: Vec<u64> = opens.iter().map(|o| o.duration.as_secs()).collect();
    assert_eq!(
        durations,
        [10, 10, 20],
        "third trip within 10 min: flapping x2"
    );
    assert_eq!(opens[2].flapping_trips, Some(3));
    assert_eq!(opens[2].to_string(), "20s (ejection 1, flapping: 3 trips)");
}

#[test]
fn partial_breaking_and_dry_runs_reach_the_decision() {
    let (mut set, _) = breakers(&config(
        r#"
[[overrides]]
upstreams = [{ cidr = "192.0.2.1" }]
policy = { reject_percent = 25 }
[[overrides]]
upstreams = [{ cidr = "192.0.2.2" }]
policy = { mode = "metrics_only" }
"#,
    ));
    let partial = addr("192.0.2.1:443");
    let dry = addr("192.0.2.2:443");
    feed(&mut set, partial, &[Refused; 5]);
    let decision = set.decision(&partial).unwrap();
    assert_eq!(decision.reject_percent, Percent::new(25));
    assert_eq!(decision.reject_percent.scaled_to(65_536), 16_384);
    assert!(!decision.dry_run);
    let trip = feed(&mut set, dry, &[Refused; 5])
        .pop()
        .expect("would-be transition");
    assert!(trip.dry_run);
    assert_eq!(
        (trip.change.from, trip.change.to),
        (BreakerState::Closed, BreakerState::Open)
    );
    assert_eq!(set.get(&dry).unwrap().state(), BreakerState::MetricsOnly);
    assert!(set.decision(&dry).unwrap().dry_run);
    assert_eq!(set.enforcement(&dry), None, "nothing enforced");
    assert_eq!(set.enforcements().count(), 1);
    assert_eq!(set.decisions().count(), 2);
}

#[test]
fn operators_force_reset_disable_and_enable() {
    let (mut set, clock) = breakers(&Config::default());
    let a = addr("192.0.2.1:443");
    let t = set.force_open(a, Some(secs(120))).unwrap();
    assert_eq!(
        (t.change.from, t.change.to),
        (BreakerState::Closed, BreakerState::ForcedOpen)
    );
    assert_eq!(
        t.change.reason,
        Reason::Manual {
            action: ManualAction::ForceOpen {
                duration: Some(secs(120))
            }
        }
    );
    assert_eq!(set.enforcement(&a), Some(Enforcement::Reject));
    clock.advance(secs(120));
    let expired = set.tick();
    assert_eq!(expired[0].change.to, BreakerState::Closed);
    assert_eq!(set.enforcement(&a), None);
    let until = clock.now().saturating_add(secs(30));
    let t = set.force_open_until(a, Some(until)).unwrap();
    assert_eq!(t.change.reason.to_string(), "manual force-open for 30s");
    assert_eq!(set.next_deadline(), Some(until));
    clock.set(until);
    assert_eq!(set.tick()[0].change.from, BreakerState::ForcedOpen);

    assert_eq!(set.disable(a).unwrap().change.to, BreakerState::Disabled);
    assert!(feed(&mut set, a, &[Refused; 50]).is_empty());
    assert_eq!(set.enable(a).unwrap().change.to, BreakerState::Closed);
    feed(&mut set, a, &[Refused; 5]);
    let t = set.reset(a).unwrap();
    assert_eq!(
        (t.change.from, t.change.to),
        (BreakerState::Open, BreakerState::Closed)
    );
    assert_eq!(t.counts, OutcomeCounts::default());
    assert_eq!(set.next_deadline().map(|d| d > clock.now()), Some(true));

    assert_eq!(
        set.force_open(addr("10.0.0.10:53"), None),
        Err(ControlError::NeverIsolated {
            upstream: addr("10.0.0.10:53")
        })
    );
}

#[test]
fn dns_is_never_isolated_by_default() {
    let (mut set, _) = breakers(&Config::default());
    let dns = addr("10.96.0.10:53");
    assert!(feed(&mut set, dns, &[Refused; 100]).is_empty());
    assert!(set.is_empty());
    assert_eq!(set.stats().never_isolated_outcomes, 100);
}

#[test]
fn reload_keeps_states_and_counters() {
    let (mut set, clock) = breakers(&Config::default());
    let counting = addr("192.0.2.1:443");
    let open = addr("192.0.2.2:443");
    let exempted = addr("192.0.2.3:443");
    feed(&mut set, counting, &[Refused; 3]);
    feed(&mut set, open, &[Refused; 5]);
    feed(&mut set, exempted, &[Refused; 5]);
    let open_deadline = set
        .get(&open)
        .unwrap()
        .deadline(set.policy_of(&open).unwrap());

    let reloaded = config(
        r#"
[defaults]
failure_threshold = 4
[[overrides]]
upstreams = [{ cidr = "192.0.2.2" }]
policy = { mode = "metrics_only" }
[never_isolate]
upstreams = [{ cidr = "192.0.2.3" }]
"#,
    );
    clock.advance(secs(1));
    let changes = set.apply_config(&reloaded).unwrap();
    let summary: Vec<_> = changes
        .iter()
        .map(|t| (t.upstream, t.change.from, t.change.to))
        .collect();
    assert_eq!(
        summary,
        [
            (open, BreakerState::Open, BreakerState::MetricsOnly),
            (exempted, BreakerState::Open, BreakerState::Closed),
        ]
    );
    assert_eq!(changes[1].change.reason, Reason::NeverIsolated);
    assert!(set.get(&exempted).is_none());
    // The open breaker kept its open period; it is now a dry run.
    let breaker = set.get(&open).unwrap();
    assert_eq!(
        breaker.deadline(set.policy_of(&open).unwrap()),
        open_deadline
    );
    assert!(set.decision(&open).unwrap().dry_run);
    // The counter kept its 3 failures: the new threshold of 4 is one away.
    assert_eq!(set.get(&counting).unwrap().consecutive_failures(), 3);
    let trip = record(&mut set, counting, Refused).expect("4th failure under the new policy");
    assert_eq!(
        trip.change.reason,
        Reason::ConsecutiveFailures {
            failures: 4,
            threshold: 4
        }
    );
}

#[test]
fn the_tracking_bound_evicts_closed_breakers_first_and_never_open_ones() {
    let (mut set, _) = breakers(&config(
        "[tracking]\nmax_upstreams = 3\n[guard]\nenabled = false\n",
    ));
    let u = |i: u8| addr(&format!("192.0.2.{i}:443"));
    for i in 1..=3 {
        record(&mut set, u(i), Connected);
    }
    record(&mut set, u(1), Connected); // u(2) is now the least recently active
    record(&mut set, u(4), Connected);
    assert_eq!(set.len(), 3);
    assert!(set.get(&u(2)).is_none());
    assert_eq!(set.stats().evicted_for_room, 1);
    // Open all three: nothing is evictable, a new upstream is not tracked.
    for i in [1, 3, 4] {
        feed(&mut set, u(i), &[Refused; 5]);
    }
    assert_eq!(set.enforcements().count(), 3);
    assert_eq!(record(&mut set, u(5), Refused), None);
    assert_eq!(record(&mut set, u(5), Refused), None);
    assert!(set.get(&u(5)).is_none());
    assert_eq!(set.stats().untracked_outcomes, 2);
    let notices: Vec<_> = set.drain_notices().collect();
    assert!(
        matches!(
            notices.as_slice(),
            [
                Notice::Evicted {
                    cause: EvictionCause::Room,
                    ..
                },
                Notice::Saturated { tracked: 3, .. }
            ]
        ),
        "{notices:?}"
    );
    assert_eq!(
        set.enforcements().count(),
        3,
        "open breakers are never evicted"
    );
    assert_eq!(
        set.force_open(u(5), None),
        Err(ControlError::AtCapacity {
            upstream: u(5),
            tracked: 3
        })
    );
}

#[test]
fn idle_breakers_are_evicted_and_memory_is_measurable() {
    let (mut set, clock) = breakers(&Config::default());
    for i in 0..100u32 {
        let upstream = SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80));
        record(&mut set, upstream, Connected);
    }
    let per_upstream = set.approx_bytes_per_upstream();
    assert!(per_upstream > 0 && per_upstream < 2_048, "{per_upstream}");
    assert!(set.memory().bytes >= 100 * estimated_bytes_per_upstream(set.policy()) / 2);
    clock.advance(secs(599));
    set.tick();
    assert_eq!(set.len(), 100);
    clock.advance(secs(1));
    set.tick();
    assert!(set.is_empty());
    assert_eq!(set.stats().evicted_idle, 100);
    let idle = set
        .drain_notices()
        .filter(|n| {
            matches!(
                n,
                Notice::Evicted {
                    cause: EvictionCause::Idle,
                    ..
                }
            )
        })
        .count();
    assert_eq!(idle, 100, "one notice per evicted breaker");
}

#[test]
fn groups_and_overrides_resolve_by_specificity() {
    let (set_config, upstream) = (
        config(
            r#"
[[groups]]
name = "db"
upstreams = [{ cidr = "10.2.0.0/16", ports = [5432] }]
[groups.policy]
failure_threshold = 2
[[overrides]]
upstreams = [{ cidr = "10.2.0.7" }]
policy = { half_open_probes = 3 }
"#,
        ),
        addr("10.2.0.7:5432"),
    );
    let (mut set, _) = breakers(&set_config);
    record(&mut set, upstream, Connected);
    assert_eq!(set.group_of(&upstream), Some("db"));
    let policy = set.policy_of(&upstream).unwrap();
    assert_eq!((policy.failure_threshold, policy.half_open_probes), (2, 3));
    assert!(feed(&mut set, upstream, &[Refused; 2]).len() == 1);
}

fn from(
    set: &mut Breakers<ManualClock>,
    client: u64,
    upstream: SocketAddr,
    outcome: ConnectOutcome,
) -> Option<Transition> {
    set.observe(upstream, Observation::new(outcome, None, ClientId(client)))
}

/// One client failing alone (its own NetworkPolicy, a hostile process) is failed fast on its
/// own: the upstream stays CLOSED for everyone else, and the hold ends after the open
/// duration. A second witness makes it the node's.
#[test]
fn witnesses_decide_the_scope_of_a_trip() {
    let (mut set, clock) = breakers(&Config::default());
    let up = addr("10.7.0.1:8080");
    for _ in 0..5 {
        assert_eq!(from(&mut set, 1, up, TimedOut), None, "never node-wide");
    }
    assert_eq!(set.enforcement(&up), None);
    let held: Vec<Transition> = set.drain_client_changes().collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].client, Some(ClientId(1)));
    assert_eq!(
        (held[0].change.from, held[0].change.to),
        (BreakerState::Closed, BreakerState::Open)
    );
    assert!(matches!(
        held[0].change.reason,
        Reason::ConsecutiveFailures { .. }
    ));
    let holds: Vec<ClientHold> = set.client_holds().copied().collect();
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0].until, START.saturating_add(secs(30)));
    // Another failure of the same client holds nothing new.
    from(&mut set, 1, up, TimedOut);
    assert_eq!(set.drain_client_changes().count(), 0);

    // The hold runs its course.
    assert_eq!(set.next_deadline(), Some(START.saturating_add(secs(30))));
    clock.advance(secs(30));
    set.tick();
    let released: Vec<Transition> = set.drain_client_changes().collect();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].change.reason, Reason::ClientHoldEnded);
    assert_eq!(set.client_holds().count(), 0);

    // A second client failing too: the node's.
    from(&mut set, 1, up, TimedOut);
    let t = from(&mut set, 2, up, TimedOut).expect("two witnesses");
    assert_eq!(t.change.to, BreakerState::Open);
    assert_eq!(t.client, None);
    assert_eq!(set.enforcement(&up), Some(Enforcement::Reject));
}

/// A client that keeps connecting is counter-evidence: two failing clients are held on their
/// own while a third succeeds; once it fails too, the node isolates.
#[test]
fn a_client_that_keeps_connecting_keeps_a_trip_from_the_node() {
    let (mut set, _) = breakers(&Config::default());
    let up = addr("10.7.0.2:8080");
    for _ in 0..3 {
        from(&mut set, 1, up, Refused);
        from(&mut set, 3, up, Connected);
        from(&mut set, 2, up, Refused);
    }
    // Consecutive failures never reach 5 while 3 succeeds: its success resets the count...
    assert_eq!(set.enforcement(&up), None);
    // ...and once they do, 3's successes since the failures began keep it from the node.
    from(&mut set, 1, up, Refused);
    from(&mut set, 2, up, Refused);
    from(&mut set, 1, up, Refused);
    from(&mut set, 2, up, Refused);
    assert_eq!(from(&mut set, 1, up, Refused), None);
    assert_eq!(set.enforcement(&up), None);
    let mut held: Vec<u64> = set
        .drain_client_changes()
        .map(|t| t.client.unwrap().0)
        .collect();
    held.sort();
    assert_eq!(held, [1, 2]);
    // Now 3 fails as well: nobody contradicts, the node isolates.
    let t = from(&mut set, 3, up, Refused).expect("node-wide");
    assert_eq!((t.change.to, t.client), (BreakerState::Open, None));
}

/// `min_witnesses = 1` restores isolation on one client's word; a reset lifts client holds.
#[test]
fn one_witness_is_enough_when_configured_and_a_reset_lifts_client_holds() {
    let (mut set, _) = breakers(&config("[defaults]\nmin_witnesses = 1\n"));
    let up = addr("10.7.0.3:8080");
    let trips = (0..5)
        .filter_map(|_| from(&mut set, 1, up, Refused))
        .count();
    assert_eq!(trips, 1);
    assert_eq!(set.enforcement(&up), Some(Enforcement::Reject));

    let (mut set, _) = breakers(&Config::default());
    for _ in 0..5 {
        from(&mut set, 1, up, Refused);
    }
    assert_eq!(set.drain_client_changes().count(), 1);
    set.reset(up).unwrap();
    let lifted: Vec<Transition> = set.drain_client_changes().collect();
    assert_eq!(lifted.len(), 1);
    assert_eq!(lifted[0].change.to, BreakerState::Closed);
    assert_eq!(set.client_holds().count(), 0);
}

/// A whole-host trip isolates every port of the host but its never-isolated ones, which its
/// verdict must spare (DNS on port 53 by default); a rule for any port of the host refuses
/// the trip instead.
#[test]
fn a_whole_host_trip_spares_the_hosts_never_isolated_ports() {
    let (mut set, _) = breakers(&Config::default());
    let host = addr("10.9.4.1:0");
    set.force_open(host, None).unwrap();
    assert_eq!(set.enforcement(&host), Some(Enforcement::Reject));
    assert_eq!(
        set.spared().into_iter().collect::<Vec<_>>(),
        [addr("10.9.4.1:53")]
    );
    set.reset(host).unwrap();
    assert!(
        set.spared().is_empty(),
        "spared only while the host is isolated"
    );

    let (mut set, _) = breakers(&config(
        "[never_isolate]\nupstreams = [\n  { cidr = \"10.9.5.0/24\" },\n  { cidr = \"10.9.4.0/24\", ports = [53, 443] },\n  { cidr = \"::/0\", ports = [53] },\n]\n",
    ));
    set.force_open(host, None).unwrap();
    let v6 = addr("[fd00::7]:0");
    set.force_open(v6, None).unwrap();
    assert_eq!(
        set.spared().into_iter().collect::<Vec<_>>(),
        [
            addr("10.9.4.1:53"),
            addr("10.9.4.1:443"),
            addr("[fd00::7]:53")
        ]
    );
    assert_eq!(
        set.force_open(addr("10.9.5.9:0"), None),
        Err(ControlError::NeverIsolated {
            upstream: addr("10.9.5.9:0")
        })
    );
}

/// Churn through the tracking bound does not reset a breaker part way to its trip: clean
/// breakers go first, and one client pushes out at most its budget of breakers (F18).
#[test]
fn churn_through_the_bound_spares_partly_failed_breakers() {
    let (mut set, clock) = breakers(&config(
        "[tracking]\nmax_upstreams = 4\nclient_evictions_per_second = 1\n",
    ));
    let victim = addr("10.9.6.1:443");
    from(&mut set, 1, victim, Connected);
    for client in [1, 2, 1] {
        assert_eq!(from(&mut set, client, victim, TimedOut), None);
    }
    // Another client names 50 new upstreams, each once, successfully.
    let mut evicted_before = 0;
    for i in 0..50 {
        clock.advance(Duration::from_millis(10));
        from(&mut set, 9, addr(&format!("10.9.7.{i}:80")), Connected);
        evicted_before = set.stats().evicted_for_room;
    }
    assert!(
        set.get(&victim).is_some(),
        "the partly failed breaker stays"
    );
    assert_eq!(
        evicted_before, 10,
        "a burst of ten seconds' worth, at 1 a second"
    );
    assert_eq!(set.stats().evictions_refused, 50 - 3 - 10);
    // Two more failures make five in a row: the count survived the churn.
    assert_eq!(from(&mut set, 2, victim, TimedOut), None);
    let t = from(&mut set, 1, victim, TimedOut).expect("the victim trips");
    assert_eq!(t.change.to, BreakerState::Open);
}

/// Behind a virtual address: one breaker per endpoint, learned from the NAT decisions;
/// `[services] max_ejection_percent` caps isolation per service; an outcome that names the
/// virtual address itself (its endpoint unresolved) is no evidence.
#[test]
fn endpoints_behind_a_service_break_alone_and_the_service_caps_their_ejection() {
    let mut config = Config::with_policy(BreakerPolicy {
        min_witnesses: 1,
        ..BreakerPolicy::default()
    });
    config.services.max_ejection_percent = Percent::new(50);
    let (mut set, _clock) = breakers(&config);
    let vip = addr("10.96.0.10:80");
    let endpoints = [
        addr("10.1.0.1:8080"),
        addr("10.1.0.2:8080"),
        addr("10.1.0.3:8080"),
    ];
    let via = |outcome| Observation::new(outcome, None, ClientId(1)).via(Some(vip));
    // Before any NAT decision is seen the virtual address is an upstream like any other
    // (e.g. kube-proxy refused a Service with no endpoints); once it is known as a service,
    // that breaker goes (its verdict with it), since it would never hear an outcome again.
    set.record(vip, ConnectOutcome::Refused);
    assert!(set.get(&vip).is_some());
    for e in endpoints {
        set.observe(e, via(ConnectOutcome::Connected));
    }
    assert!(set.get(&vip).is_none());
    assert!(set.drain_notices().any(|n| n
        == Notice::Evicted {
            upstream: vip,
            cause: EvictionCause::BecameService
        }));
    assert_eq!(set.services().endpoints(&vip).count(), 3);
    assert_eq!(set.service_state(&vip), ServiceState::Healthy);

    // Unresolved outcomes naming the VIP: no breaker for it, nothing trips.
    for _ in 0..10 {
        assert!(set.record(vip, ConnectOutcome::Refused).is_none());
    }
    assert!(set.get(&vip).is_none());
    assert_eq!(set.stats().unresolved_service_outcomes, 10);

    let trip = |set: &mut Breakers<ManualClock>, e| {
        (0..5)
            .filter_map(|_| set.observe(e, via(ConnectOutcome::Refused)))
            .last()
    };
    let t = trip(&mut set, endpoints[0]).expect("the first endpoint trips");
    assert_eq!(t.change.to, BreakerState::Open);
    assert_eq!(set.service_state(&vip), ServiceState::Degraded);
    // 1 of 3 isolated is 33 %; a second would be 67 %, over the service's 50 %.
    assert!(trip(&mut set, endpoints[1]).is_none(), "capped per service");
    assert!(
        set.drain_notices().any(|n| matches!(
            n,
            Notice::Suppressed(Suppressed {
                cause: SuppressionCause::MaxEjection { .. },
                ..
            })
        )),
        "the suppression is told"
    );
}
