//! The operator surface end to end: the CLI's table and JSON output against a running agent
//! and with the agent stopped, the metrics and health endpoints, and the events stream.

mod common;

use std::time::Duration;

use circuit_tests::ChildProcess;
use common::{Scenario, Setup};
use nix::sys::signal::Signal;
use serde_json::Value;

/// `circuit-agent VERB ARGS --pin-dir … --socket …`, asserting the exit code.
fn cli(s: &Scenario, args: &[&str], code: i32) -> (String, String) {
    let (pins, socket) = (s.pins.0.to_str().unwrap(), s.socket());
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--pin-dir", pins, "--socket", socket.to_str().unwrap()]);
    let out = s.cli(&all);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

fn json(s: &Scenario, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cli(s, &all, 0).0).unwrap()
}

/// A GET against the agent's endpoint (127.0.0.1:9464 in its namespace).
fn http_get(s: &Scenario, path: &str) -> (u16, String) {
    circuit_tests::http_get(&s.sandbox.upstream, ([127, 0, 0, 1], 9464).into(), path).unwrap()
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn status_and_inspect_in_table_and_json_from_a_running_agent() {
    let mut s = Scenario::start(Setup::default());
    s.trip();
    let target = s.target.to_string();

    let status = json(&s, &["status"]);
    assert_eq!(status["source"], "agent");
    let row = common::entry_for(&status["breakers"], &target);
    assert_eq!(row["state"], "OPEN");
    assert!(row["next_probe_seconds"].as_f64().unwrap() > 0.0);
    assert!(row["counts"]["refused"].as_u64().unwrap() >= 3);
    let verdict = common::entry_for(&status["verdicts"], &target);
    assert_eq!(verdict["state"], "OPEN");
    assert!(status["counters"]["xdp_frames"].as_u64().unwrap() > 0);

    let (table, _) = cli(&s, &["status"], 0);
    assert!(
        table.contains("UPSTREAM") && table.contains("NEXT PROBE"),
        "{table}"
    );
    let line = table.lines().find(|l| l.contains(&target)).unwrap();
    assert!(line.contains("OPEN"), "{line}");

    let inspect = json(&s, &["inspect", &target]);
    assert_eq!(inspect["source"], "agent");
    assert_eq!(inspect["breaker"]["state"], "OPEN");
    assert_eq!(inspect["kernel_verdict"]["state"], "OPEN");
    assert!(inspect["kernel_counts"]["refused"].as_u64().unwrap() >= 3);
    let recent = inspect["recent_transitions"].as_array().unwrap();
    assert!(recent.iter().any(|e| {
        e["to"] == "OPEN"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("consecutive failures")
    }));
    assert_eq!(inspect["policy"]["failure_threshold"], 3, "{inspect}");
    assert!(
        inspect["policy"]["open_duration"].is_string(),
        "durations as the config writes them: {inspect}"
    );
    let (text, _) = cli(&s, &["inspect", &target], 0);
    assert!(
        text.contains("state: OPEN") && text.contains("kernel verdict: OPEN"),
        "{text}"
    );

    // Unknown upstream and malformed upstream.
    let (_, err) = cli(&s, &["inspect", "192.0.2.77:1"], 2);
    assert!(err.contains("unknown upstream"), "{err}");
    let (_, err) = cli(&s, &["inspect", "not-an-ip"], 2);
    assert!(err.contains("not an upstream"), "{err}");
}

#[test]
fn metrics_and_health_are_served() {
    let mut s = Scenario::start(Setup::default());
    assert_eq!(http_get(&s, "/healthz").0, 200);
    let (code, body) = http_get(&s, "/readyz");
    assert_eq!((code, body.trim()), (200, "ready"));
    s.trip();
    s.assert_rejected_fast();
    let (code, metrics) = http_get(&s, "/metrics");
    assert_eq!(code, 200);
    let target = s.target;
    assert_eq!(
        sample(
            &metrics,
            &format!("circuit_breaker_state{{upstream=\"{target}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "circuit_transitions_total{from=\"CLOSED\",to=\"OPEN\",reason=\"consecutive_failures\",scope=\"node\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        sample(
            &metrics,
            "circuit_rejects_total{point=\"xdp\",reason=\"open\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(sample(&metrics, "circuit_outcomes_total{kind=\"refused\"}").unwrap() >= 3.0);
    assert!(sample(&metrics, "circuit_tracked_upstreams").unwrap() >= 1.0);
    assert!(metrics.contains("circuit_detect_to_verdict_seconds_bucket"));
    assert!(sample(&metrics, "circuit_ringbuf_drops_total").is_some());
    for counted in [
        "circuit_xdp_unjudged_total",
        "circuit_tc_unjudged_total",
        "circuit_xdp_resets_suppressed_total",
        "circuit_xdp_resets_rate_limited_total",
        "circuit_outcomes_throttled_total",
        "circuit_engine_events_total{event=\"evicted_for_room\"}",
        "circuit_engine_events_total{event=\"evictions_refused\"}",
    ] {
        assert_eq!(sample(&metrics, counted), Some(0.0), "{counted}");
    }
    assert!(metrics.trim_end().ends_with("# EOF"));
    // The engine's counters follow it (brought up to date every 250 ms).
    circuit_tests::wait_until(
        "the engine's counters",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let metrics = http_get(&s, "/metrics").1;
            (sample(&metrics, "circuit_engine_events_total{event=\"created\"}")? >= 1.0)
                .then_some(())
        },
    )
    .unwrap();
}

/// `--health-addr` serves the probes' endpoints and nothing that names an upstream; with
/// `--metrics-upstream-cap 0` (the DaemonSet's) no series names one either.
#[test]
fn a_health_only_endpoint_and_an_upstream_cap_of_zero_name_no_upstream() {
    let mut s = Scenario::start(Setup {
        agent_args: &[
            "--health-addr",
            "127.0.0.1:9465",
            "--metrics-upstream-cap",
            "0",
        ],
        ..Setup::default()
    });
    s.trip();
    let health = |path| {
        circuit_tests::http_get(&s.sandbox.upstream, ([127, 0, 0, 1], 9465).into(), path).unwrap()
    };
    assert_eq!(health("/healthz").0, 200);
    assert_eq!(health("/readyz").0, 200);
    assert_eq!(health("/metrics").0, 404);
    let (code, metrics) = http_get(&s, "/metrics");
    assert_eq!(code, 200);
    assert!(!metrics.contains(&s.target.ip().to_string()), "{metrics}");
    assert!(
        sample(&metrics, "circuit_metrics_upstreams_unlabelled_total").unwrap() >= 1.0,
        "{metrics}"
    );
}

#[test]
fn events_follow_streams_transitions_as_they_happen() {
    let mut s = Scenario::start(Setup::default());
    let (pins, socket) = (s.pins.0.clone(), s.socket());
    let mut cmd = std::process::Command::new(circuit_tests::agent_binary().unwrap());
    cmd.args(["events", "--follow", "-o", "json", "--pin-dir"])
        .arg(&pins)
        .arg("--socket")
        .arg(&socket);
    let follower = ChildProcess::spawn("events", cmd).unwrap();
    // No wait for the subscription: a follower that connects after the transition gets it
    // in its replay of the recent ones.
    s.trip();
    let line = follower
        .wait_for_lines(
            &["\"to\":\"OPEN\"", &s.target.to_string()],
            1,
            Duration::from_secs(5),
        )
        .unwrap()
        .remove(0);
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["from"], "CLOSED");
    assert_eq!(event["reason_kind"], "consecutive_failures");
    assert!(event["detect_to_verdict_us"].as_u64().is_some());
    // Without --follow: the transitions the agent remembers, then exit.
    let (recent, _) = cli(&s, &["events"], 0);
    assert!(
        recent.contains(&s.target.to_string()) && recent.contains("CLOSED → OPEN"),
        "{recent}"
    );
}

#[test]
fn read_commands_work_from_the_pins_with_the_agent_stopped() {
    let mut s = Scenario::start(Setup {
        open_duration: "60s",
        lease: "60s",
        ..Setup::default()
    });
    s.trip();
    assert!(s.socket().exists());
    s.stop_agent(Signal::SIGTERM);
    assert!(
        !s.socket().exists(),
        "the agent removes its control socket when it stops"
    );
    let target = s.target.to_string();

    let status = json(&s, &["status"]);
    assert_eq!(status["source"], "kernel");
    assert_eq!(status["breakers"].as_array().unwrap().len(), 0);
    assert!(
        status["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["upstream"] == target.as_str() && v["state"] == "OPEN")
    );
    let (table, _) = cli(&s, &["status"], 0);
    assert!(table.contains("no agent answered"), "{table}");

    let inspect = json(&s, &["inspect", &target]);
    assert_eq!(inspect["source"], "kernel");
    assert_eq!(inspect["kernel_verdict"]["state"], "OPEN");

    let (_, err) = cli(&s, &["events"], 1);
    assert!(err.contains("no agent running"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn operator_commands_go_through_the_agent_and_nothing_outlives_every_agent_unbounded() {
    let mut s = Scenario::start(Setup {
        lease: "1s",
        ..Setup::default()
    });
    let target = s.target.to_string();
    let overrides = |s: &Scenario| {
        circuit_agent::kernel::OverrideTable::open_pinned(&s.pins.0)
            .unwrap()
            .list()
            .unwrap()
    };

    // With the agent: a trip without an end holds while the agent renews it...
    let (out, _) = cli(&s, &["trip", &target], 0);
    assert!(out.contains("FORCED_OPEN"), "{out}");
    assert_eq!(s.connect().result, s.rejected());
    assert_eq!(s.verdict(), Some(circuit_common::VerdictState::Open));
    // ...and --offline is refused while an agent runs: it alone writes verdicts.
    let (_, err) = cli(&s, &["trip", &target, "--offline", "--for", "1m"], 2);
    assert!(err.contains("an agent is running"), "{err}");

    // Every agent gone (killed, no clean exit): the trip ends with the last lease.
    s.stop_agent(Signal::SIGKILL);
    circuit_tests::wait_until(
        "the lease to end",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || (s.connect().result == circuit_tests::ConnectResult::Connected).then_some(()),
    )
    .unwrap();

    // With no agent, a bare command fails (exit 1) and writes nothing.
    let (_, err) = cli(&s, &["reset", &target], 1);
    assert!(err.contains("no agent running"), "{err}");
    let (_, err) = cli(&s, &["trip", &target], 1);
    assert!(
        err.contains("no agent running") && err.contains("--offline --for"),
        "{err}"
    );
    // The record the agent kept for the next agent is still there, untouched.
    assert_eq!(overrides(&s).len(), 1);
    // Offline, a trip must carry its end.
    let (_, err) = cli(&s, &["trip", &target, "--offline"], 2);
    assert!(err.contains("--for"), "{err}");
    // Long enough for the checks below under emulation (a VM of the kernel matrix).
    let (out, _) = cli(&s, &["trip", &target, "--offline", "--for", "6s"], 0);
    assert!(out.contains("FORCED_OPEN for 6s"), "{out}");
    let verdict = circuit_agent::kernel::VerdictTable::open_pinned(&s.pins.0)
        .unwrap()
        .get(s.target)
        .unwrap()
        .expect("written to the kernel");
    let now = circuit_agent::time::Clock::now(&circuit_agent::time::MonotonicClock);
    assert!(verdict.lease_expires.since(now) <= Duration::from_secs(6));
    assert_eq!(s.connect().result, s.rejected());
    circuit_tests::wait_until(
        "the offline trip to end",
        Duration::from_secs(9),
        Duration::from_millis(100),
        || (s.connect().result == circuit_tests::ConnectResult::Connected).then_some(()),
    )
    .unwrap();

    // The next agent drops the expired record, and answers commands again.
    s.start_agent();
    assert!(overrides(&s).is_empty());
    let (out, _) = cli(&s, &["disable", &target], 0);
    assert!(out.contains("DISABLED"), "{out}");
    let (out, _) = cli(&s, &["enable", &target], 0);
    assert!(out.contains("CLOSED"), "{out}");
}

/// A CLI run inside a time namespace reads a CLOCK_MONOTONIC a day ahead of the kernel's:
/// an offline trip still ends on the kernel's clock, when it says.
#[test]
fn an_offline_trip_from_a_time_namespace_ends_on_the_kernels_clock() {
    let mut s = Scenario::start(Setup::default());
    s.stop_agent(Signal::SIGTERM);
    let target = s.target.to_string();
    let out = std::process::Command::new("unshare")
        .args(["--time", "--monotonic", "86400"])
        .arg(circuit_tests::agent_binary().unwrap())
        .args(["trip", &target, "--offline", "--for", "10s", "--pin-dir"])
        .arg(&s.pins.0)
        .arg("--socket")
        .arg(s.socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let verdict = circuit_agent::kernel::VerdictTable::open_pinned(&s.pins.0)
        .unwrap()
        .get(s.target)
        .unwrap()
        .expect("written to the kernel");
    let now = circuit_agent::time::Clock::now(&circuit_agent::time::MonotonicClock);
    let left = verdict.lease_expires.since(now);
    // Not a day: the kernel's clock, not the namespace's.
    assert!(
        left <= Duration::from_secs(10) && left > Duration::ZERO,
        "the trip ends in {left:?}"
    );
}

/// A whole-host trip isolates every port of the host but its never-isolated ones (DNS on
/// port 53 by default), through the agent and offline alike; offline, a never_isolate rule
/// for any port of the host refuses the trip, as the agent would.
#[test]
fn a_whole_host_trip_spares_the_hosts_never_isolated_ports() {
    use circuit_tests::{ConnectResult::Connected, Upstream};
    let mut s = Scenario::start(Setup::default());
    let host = s.target.ip().to_string();
    let dns = std::net::SocketAddr::new(s.target.ip(), 53);
    let _dns = Upstream::start(&s.sandbox.upstream, dns).unwrap();
    let spared = |s: &Scenario| {
        circuit_agent::kernel::VerdictTable::open_pinned(&s.pins.0)
            .unwrap()
            .spared()
            .unwrap()
    };

    let (out, _) = cli(&s, &["trip", &host], 0);
    assert!(out.contains("FORCED_OPEN"), "{out}");
    assert_eq!(s.connect().result, s.rejected());
    assert_eq!(s.connect_to(dns).result, Connected, "DNS stays reachable");
    assert_eq!(spared(&s), [dns].into());
    cli(&s, &["reset", &host], 0);
    assert_eq!(s.connect().result, Connected);
    assert!(spared(&s).is_empty());

    // Offline: the same rules, from the built-in defaults or the agent's file.
    s.stop_agent(Signal::SIGTERM);
    let (out, _) = cli(&s, &["trip", &host, "--offline", "--for", "1m"], 0);
    assert!(out.contains("FORCED_OPEN"), "{out}");
    assert_eq!(s.connect().result, s.rejected());
    assert_eq!(s.connect_to(dns).result, Connected);
    cli(&s, &["reset", &host, "--offline"], 0);
    assert!(spared(&s).is_empty());
    let config = s.scratch.0.join("never.toml");
    std::fs::write(
        &config,
        format!("[never_isolate]\nupstreams = [{{ cidr = \"{host}/32\" }}]\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (_, err) = cli(
        &s,
        &[
            "trip",
            &host,
            "--offline",
            "--for",
            "1m",
            "--config",
            config,
        ],
        2,
    );
    assert!(err.contains("never-isolate"), "{err}");
    assert_eq!(s.connect().result, Connected, "nothing written");
}
