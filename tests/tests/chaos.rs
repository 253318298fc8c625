//! Fault injection with the real agent binary in a namespace sandbox: an upstream that flaps
//! while a client keeps connecting, and a ring buffer flooded while the agent is stopped.
//!
//! Short by default (CI: about 20 s and a few seconds); `CIRCUIT_CHAOS_LONG=1` runs the long
//! form (2 minutes of flapping). See docs/BENCHMARKS.md, which also lists the faults covered
//! elsewhere: a configuration replaced by garbage (config_e2e.rs), SIGKILL while OPEN
//! (dataplane_e2e.rs) and randomized frames for the packet parser (xdp_fixtures.rs).

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use circuit_agent::kernel::VerdictTable;
use circuit_common::{ConnectOutcome, Stat};
use circuit_tests::{
    ChildProcess, ConnectResult, NetNs, UnprivilegedClient, unique_name, wait_until,
};
use common::{Scenario, Setup, transition};
use nix::sys::signal::Signal;

/// How long the upstream flaps: 20 s in CI, 2 minutes in the long form.
fn flapping_for() -> Duration {
    if std::env::var_os("CIRCUIT_CHAOS_LONG").is_some_and(|v| v == "1") {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(20)
    }
}

const FLAP: Duration = Duration::from_millis(200);
/// Between two connects of the flapping client.
const CONNECT_EVERY: Duration = Duration::from_millis(5);
/// Caps the grown open duration (linear backoff and the flapping multiplier would otherwise
/// make recovery take minutes).
const MAX_OPEN: Duration = Duration::from_secs(3);
/// Random time added to each open period, so that probes land in both phases of the flap
/// (open durations that are multiples of the 400 ms cycle would always probe the same one).
const JITTER: Duration = Duration::from_millis(500);

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `circuit-agent status -o json` for the scenario's agent.
fn status(s: &Scenario) -> serde_json::Value {
    let pins = s.pins.0.to_str().unwrap();
    let socket = s.socket();
    let out = s.cli(&[
        "status",
        "-o",
        "json",
        "--pin-dir",
        pins,
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The agent's breakers and the kernel's verdicts for upstreams on `ip`, as
/// (upstream, state) pairs.
fn held(s: &Scenario, ip: IpAddr) -> (Vec<(String, String)>, Vec<SocketAddr>) {
    let status = status(s);
    let breakers = status["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| {
            b["upstream"]
                .as_str()
                .and_then(|u| u.parse::<SocketAddr>().ok())
                .is_some_and(|u| u.ip() == ip)
        })
        .map(|b| {
            (
                b["upstream"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(_, state)| state != "CLOSED")
        .collect();
    let verdicts = VerdictTable::open_pinned(&s.pins.0)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|v| v.upstream)
        .filter(|u| u.ip() == ip)
        .collect();
    (breakers, verdicts)
}

#[test]
fn a_flapping_upstream_leaves_no_breaker_open_and_the_agent_memory_bounded() {
    let duration = flapping_for();
    let mut s = Scenario::start(Setup {
        open_duration: "1s",
        config: format!(
            "[defaults]\nmax_open_duration = \"{}ms\"\nopen_jitter = \"{}ms\"\n",
            MAX_OPEN.as_millis(),
            JITTER.as_millis()
        ),
        ..Setup::default()
    });
    let pid = s.agent().pid();
    let (mut connected, mut refused) = (0u64, 0u64);
    let mut rss_start = None;
    let mut healthy = true;
    let start = Instant::now();
    let mut next_flip = start + FLAP;
    while start.elapsed() < duration {
        if Instant::now() >= next_flip {
            healthy = !healthy;
            s.upstream.set_healthy(healthy).unwrap();
            next_flip += FLAP;
        }
        // Measured once the agent has seen a few trips, so start-up allocations are in.
        if rss_start.is_none() && start.elapsed() >= Duration::from_secs(3) {
            rss_start = Some(rss_kib(pid));
        }
        match s.connect().result {
            ConnectResult::Connected => connected += 1,
            ConnectResult::Refused => refused += 1,
            other => panic!("unexpected connect result while flapping: {other:?}"),
        }
        thread::sleep(CONNECT_EVERY);
    }
    let rss_start = rss_start.unwrap();
    let rss_end = rss_kib(pid);
    let transitions = |to: &str| {
        let (upstream, to) = (
            format!("\"upstream\":\"{}\"", s.target),
            format!("\"to\":\"{to}\""),
        );
        s.events()
            .lines()
            .iter()
            .filter(|l| l.contains(&upstream) && l.contains(&to))
            .count()
    };
    let (trips, closes) = (transitions("OPEN"), transitions("CLOSED"));
    eprintln!(
        "flapped for {duration:?}: {connected} connected, {refused} refused, {trips} times OPEN, \
         {closes} times CLOSED; agent RSS {rss_start} KiB → {rss_end} KiB"
    );
    assert!(connected > 0 && refused > 0, "the upstream did not flap");
    assert!(trips >= 2, "the breaker tripped only {trips} times");
    // Generous: a leak per outcome or per transition would grow with the run's length.
    assert!(
        rss_end <= rss_start + rss_start / 2 + 8 * 1024,
        "agent RSS grew from {rss_start} KiB to {rss_end} KiB"
    );

    // Recovery: healthy for good; at most MAX_OPEN until HALF_OPEN, then the next connect
    // is the probe that closes the breaker.
    s.upstream.set_healthy(true).unwrap();
    let ip = s.target.ip();
    wait_until(
        "every breaker of the upstream to close and its verdicts to go",
        MAX_OPEN + JITTER + Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let _ = s.connect();
            let (breakers, verdicts) = held(&s, ip);
            (breakers.is_empty() && verdicts.is_empty()).then_some(())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}: still held: {:?}", held(&s, ip)));
    assert_eq!(s.connect().result, ConnectResult::Connected);
    assert_eq!(s.verdict(), None);
    assert!(
        s.agent.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the agent exited"
    );
}

/// SIGSTOP on creation, SIGCONT on drop (also when the test fails).
struct Stopped<'a>(&'a ChildProcess);

impl<'a> Stopped<'a> {
    fn new(process: &'a ChildProcess) -> Self {
        process.signal(Signal::SIGSTOP).unwrap();
        Self(process)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.0.signal(Signal::SIGCONT) {
            eprintln!("warning: SIGCONT failed: {err:#}");
        }
    }
}

/// The sum of a metric's samples on the agent's /metrics page, fetched from inside the
/// agent's namespace (it serves 127.0.0.1:9464 there).
fn metric(ns: &NetNs, name: &str) -> f64 {
    let (_, page) = circuit_tests::http_get(ns, ([127, 0, 0, 1], 9464).into(), "/metrics").unwrap();
    circuit_tests::metric_sum(&page, name).unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

/// Each client's share of the ring is bounded (see `ClientBudget`), so filling it takes
/// many clients: a dozen, each an unprivileged process in a cgroup of its own.
#[test]
fn a_flooded_ring_buffer_counts_its_drops_and_the_kernel_keeps_every_outcome() {
    const FLOOD: &str = "
import errno, socket, sys, time
made, refused, end = 0, 0, time.time() + float(sys.argv[3])
while time.time() < end:
    s = socket.socket()
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
    except OSError as e:
        refused += e.errno == errno.ECONNREFUSED
    s.close()
    made += 1
print(made, refused)
";
    const CLIENTS: usize = 12;
    let s = Scenario::start(Setup::default());
    // Nothing listens there: every connect is refused by the kernel.
    let flood = SocketAddr::new(s.target.ip(), common::PORT + 1);
    assert_eq!(s.stat(Stat::OutcomeDrops), 0);
    let cgroup_root = circuit_agent::kernel::ensure_cgroup2_root().unwrap();
    let clients: Vec<UnprivilegedClient> = (0..CLIENTS)
        .map(|_| {
            UnprivilegedClient::new(&s.sandbox.client, &cgroup_root, &unique_name("cbflood"))
                .unwrap()
        })
        .collect();
    let made = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    {
        // The agent stops reading; the kernel keeps submitting until the ring is full.
        let _stopped = Stopped::new(s.agent());
        let args = [
            flood.ip().to_string(),
            flood.port().to_string(),
            "3".to_owned(),
        ];
        thread::scope(|scope| {
            for client in &clients {
                let (made, refused, args) = (&made, &refused, &args);
                scope.spawn(move || {
                    let out = client.python(FLOOD, args).unwrap();
                    let counts: Vec<u64> =
                        out.split_whitespace().map(|n| n.parse().unwrap()).collect();
                    made.fetch_add(counts[0], Ordering::Relaxed);
                    refused.fetch_add(counts[1], Ordering::Relaxed);
                });
            }
        });
    }
    let made = made.into_inner();
    assert_eq!(
        refused.into_inner(),
        made,
        "every flood connect was refused"
    );
    let drops = s.stat(Stat::OutcomeDrops);
    eprintln!("{made} refused connects while the agent was stopped: {drops} ring-buffer drops");
    assert!(drops > 0, "no drops after {made} connects");

    // Counted where operators look: `status` and the metrics endpoint.
    let counted = status(&s)["counters"]["outcome_drops"].as_u64().unwrap();
    assert!(counted >= drops, "status shows {counted} drops");
    let exported = metric(&s.sandbox.upstream, "circuit_ringbuf_drops_total");
    assert!(exported >= drops as f64, "metrics show {exported} drops");
    // The kernel's own per-upstream counters lose nothing.
    let kernel = s.kernel_count(flood, ConnectOutcome::Refused);
    assert!(
        kernel >= made,
        "the kernel counted {kernel} refusals of {made}"
    );

    // Resumed, the agent drains what the ring kept and trips on it.
    transition(s.events(), flood, "CLOSED", "OPEN", Duration::from_secs(10));
}

/// A full VERDICTS map (65 535 entries, half with leases long expired, as after an agent
/// outage) costs the next agent a start linear in the map, and the 65 535 verdict writes
/// that follow (expired ones cleared, adopted ones given up to their DISABLED policy) never
/// let an operator's trip lapse: each write costs the same whatever the number of verdicts.
#[test]
fn a_full_verdict_map_neither_slows_the_start_nor_lets_a_lease_lapse() {
    let mut s = Scenario::start(Setup {
        lease: "1s",
        open_duration: "3s",
        ..Setup::default()
    });
    s.stop_agent(Signal::SIGTERM);
    let mut table = VerdictTable::open_pinned(&s.pins.0).unwrap();
    let now = circuit_agent::time::Clock::now(&circuit_agent::time::MonotonicClock);
    let capacity = circuit_common::VERDICTS_CAPACITY;
    let expired = circuit_agent::engine::MonoTime::from_nanos(now.as_nanos() - 1_000_000_000);
    let live = now.saturating_add(Duration::from_secs(120));
    // Junk upstreams in 198.18.0.0/16 (the benchmarking range), enforced only by this
    // test's programs, on this test's interface.
    for i in 0..capacity - 1 {
        let [_, _, a, b] = i.to_be_bytes();
        let upstream = SocketAddr::from(([198, 18, a, b], 80));
        let lease = if i % 2 == 0 { expired } else { live };
        table
            .set(
                upstream,
                circuit_agent::kernel::VerdictSpec::reject(),
                lease,
            )
            .unwrap();
    }
    drop(table);

    let started = Instant::now();
    s.start_agent();
    let start = started.elapsed();
    eprintln!("full verdict map: agent ready in {start:?}");
    assert!(start < Duration::from_secs(30), "ready after {start:?}");

    // An operator's trip, renewed every third of its 1 s lease, holds throughout.
    let (target, pins) = (s.target.to_string(), s.pins.0.clone());
    let out = s.cli(&[
        "trip",
        &target,
        "--pin-dir",
        pins.to_str().unwrap(),
        "--socket",
        s.socket().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut admitted = 0;
    let mut checks = 0;
    while Instant::now() < deadline {
        checks += 1;
        if s.connect().result == ConnectResult::Connected {
            admitted += 1;
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Every junk verdict was written off meanwhile (expired, or adopted and then left to a
    // DISABLED policy, see `isolated_config`): the trip is all the kernel holds.
    let left = VerdictTable::open_pinned(&s.pins.0)
        .unwrap()
        .list()
        .unwrap();
    eprintln!(
        "full verdict map: trip admitted {admitted} of {checks} connects; {} verdicts left",
        left.len()
    );
    assert_eq!(admitted, 0, "the operator's trip lapsed");
    let junk = left.iter().filter(|v| v.upstream != s.target).count();
    assert_eq!(junk, 0, "{junk} junk verdicts left in the kernel");
    assert_eq!(left.len(), 1, "the trip is in the kernel");
}
