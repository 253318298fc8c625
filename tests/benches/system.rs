//! System figures of the real agent binary in a namespace sandbox, each next to a baseline
//! measured in the same run:
//!
//! 1. fail-fast latency of a connect to an isolated upstream, rejected by the cgroup hook
//!    and by XDP, next to a healthy connect, the kernel's RST from a closed port, an
//!    nftables `reject with tcp reset` and an nftables `drop` (a client timeout);
//! 2. time to trip (kernel timestamp of the outcome that crosses the threshold → verdict
//!    written, as the agent logs it in `detect_to_verdict_us`), idle and under a background
//!    load of refused connects, next to the kernel's own refused-connect latency (and, for
//!    context only, Envoy's documented outlier-detection interval);
//! 3. ingest: outcomes per second the agent takes with no ring-buffer drops, and its CPU at
//!    3,000 outcomes/s next to the generator's, from one client (which its kernel budget of
//!    4,000 events/s bounds); then from 16 clients at once, each a process in a cgroup v2 of
//!    its own paced at 3,500/s (56,000/s offered), with the agent's CPU next to the
//!    clients' and the machine's, and more clients step by step for the highest rate taken
//!    with no drops;
//! 4. memory: agent RSS with 1,000 and 65,536 (the bound) tracked upstreams next to the idle
//!    agent.
//!
//! Run through `cargo xtask bench [--quick]`, which builds the agent and collects the
//! results; `--only fail-fast|trip|ingest|memory` runs one part. Prints a markdown table
//! and writes JSON to $CIRCUIT_BENCH_JSON (default target/bench/system.json). Method and
//! baselines: docs/BENCHMARKS.md.

// This bench prints `Compared` rows, not the shared `Row` table.
#[allow(dead_code)]
#[path = "report.rs"]
mod report;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use circuit_agent::kernel::{Stats, UpstreamCounts};
use circuit_common::{ConnectOutcome, Stat};
use circuit_tests::{
    ChildProcess, Client, ConnectResult, NetNs, RemoveOnDrop, Sandbox, Upstream, require_root,
    unique_name, wait_until,
};
use report::{Compared, Source, percentile};

/// A listener: the healthy baseline.
const HEALTHY_PORT: u16 = 8080;
/// Nothing listens: the kernel answers SYNs with a RST.
const CLOSED_PORT: u16 = 8081;
/// nftables rejects SYNs with a RST in the upstream namespace.
const NFT_REJECT_PORT: u16 = 8082;
/// nftables drops SYNs in the upstream namespace.
const NFT_DROP_PORT: u16 = 8083;
/// A listener, isolated with `circuit-agent trip` for the cgroup agent.
const CGROUP_PORT: u16 = 8090;
/// A listener, isolated with `circuit-agent trip` for the XDP agent.
const XDP_PORT: u16 = 8091;
/// Refused, with its breaker disabled: the target of background load and floods, which
/// must keep reaching the kernel's TCP stack (a tripped breaker would answer with XDP).
const LOAD_PORT: u16 = 9000;
/// Ports tripped one by one for the time-to-trip figures (one breaker each).
const TRIP_PORTS: u16 = 20_000;
/// Ports of the memory figures: every (address, port) is one tracked upstream.
const MANY_PORTS: std::ops::Range<u16> = 10_000..60_000;

/// The client timeout of the DROP baseline (a real client would wait for SYN retries,
/// 127 s with Linux defaults).
const DROP_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The agents' breaker threshold in the time-to-trip figures (the agent's default).
const THRESHOLD: u32 = 5;
/// Background load during the loaded time-to-trip figures and the CPU figure, from the
/// bench's own process: the
/// same client (cgroup) as the trips. It stays under the kernel's per-client outcome budget
/// (4 000 a second, `ClientBudget`): beyond it one client's outcomes are sampled, by design,
/// and the trips' own failures would be sampled with them.
const LOAD_RATE: f64 = 3_000.0;
const AGENT_START: Duration = Duration::from_secs(30);

struct Params {
    connects: usize,
    drops: usize,
    trips: u16,
    flood: Duration,
    cpu_window: Duration,
    many: usize,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                connects: 200,
                drops: 1,
                trips: 30,
                flood: Duration::from_secs(2),
                cpu_window: Duration::from_secs(3),
                many: 10_000,
            }
        } else {
            Self {
                connects: 1_000,
                drops: 3,
                trips: 100,
                flood: Duration::from_secs(5),
                cpu_window: Duration::from_secs(10),
                // The most an agent tracks: tracking.max_upstreams is bounded by the
                // kernel's verdict map.
                many: circuit_common::VERDICTS_CAPACITY as usize,
            }
        }
    }
}

/// The parts of the bench, each of which `--only PART` runs alone.
const PARTS: [&str; 4] = ["fail-fast", "trip", "ingest", "memory"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(INGEST_CLIENT_ARG) {
        return ingest_client(&args[2..]);
    }
    require_root()?;
    let quick = args.iter().any(|a| a == "--quick");
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => {
            let part = args.get(i + 1).map(String::as_str);
            ensure!(
                part.is_some_and(|p| PARTS.contains(&p)),
                "--only takes one of {PARTS:?}"
            );
            part
        }
        None => None,
    };
    let runs = |part: &str| only.is_none_or(|o| o == part);
    let params = Params::new(quick);
    let bin = report::agent_binary()?;
    let profile = if bin.components().any(|c| c.as_os_str() == "release") {
        "release build"
    } else if bin.components().any(|c| c.as_os_str() == "debug") {
        "debug build"
    } else {
        "build profile unknown"
    };
    println!(
        "agent: {} ({profile}; set CIRCUIT_AGENT_BIN to measure another)\n",
        bin.display()
    );
    let mut rows = Vec::new();
    if runs("fail-fast") {
        rows.extend(fail_fast(&bin, &params)?);
    }
    if runs("trip") || runs("ingest") {
        rows.extend(trip_and_ingest(
            &bin,
            &params,
            runs("trip"),
            runs("ingest"),
        )?);
    }
    if runs("memory") {
        rows.extend(memory(&bin, &params)?);
    }
    report::publish_compared("system", &rows);
    Ok(())
}

fn row(
    name: impl Into<String>,
    value: f64,
    baseline_name: impl Into<String>,
    baseline: f64,
    unit: &'static str,
) -> Compared {
    Compared {
        name: name.into(),
        value,
        baseline_name: baseline_name.into(),
        baseline,
        source: Source::SameRun,
        unit,
        target: None,
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `addr` with its last octet replaced.
fn sibling(addr: Ipv4Addr, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = addr.octets();
    Ipv4Addr::new(a, b, c, last)
}

// ---------------------------------------------------------------------------------------
// The agent

struct AgentSpec<'a> {
    enforce: &'a str,
    iface: Option<&'a str>,
    metrics_port: u16,
    args: &'a [&'a str],
    /// TOML appended to the config file (which turns the panic guard off).
    config: &'a str,
}

/// A running `circuit-agent attach` with its own pins, socket and config file. Fields drop
/// in order: the agent is stopped, then its pins (links included) and files are removed.
struct Agent {
    process: ChildProcess,
    pins: RemoveOnDrop,
    scratch: RemoveOnDrop,
    bin: PathBuf,
    metrics: SocketAddr,
}

impl Agent {
    fn start(bin: &Path, ns: &NetNs, spec: &AgentSpec<'_>) -> Result<Agent> {
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbsys")));
        let scratch = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbsys")));
        std::fs::create_dir_all(&scratch.0)?;
        // Every agent on the machine sees every connection's outcome, including other
        // sandboxes' failures: without the guard off that could look like a node outage.
        // The bench drives one client, whose word is enough here (by default a node-wide
        // trip wants two clients' failures, and one client alone is only held on its own).
        let config = scratch.0.join("circuit.toml");
        std::fs::write(
            &config,
            format!(
                "[guard]\nenabled = false\n\n[defaults]\nmin_witnesses = 1\n\n{}\n",
                spec.config
            ),
        )?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], spec.metrics_port));
        let mut cmd = ns.command(bin)?;
        cmd.args(["attach", "--enforce", spec.enforce])
            .arg("--config")
            .arg(&config)
            .arg("--pin-dir")
            .arg(&pins.0)
            .arg("--socket")
            .arg(scratch.0.join("agent.sock"))
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(spec.args)
            // Transitions are logged at info; debug would log every outcome.
            .env("RUST_LOG", "circuit_agent=info");
        if let Some(iface) = spec.iface {
            cmd.args(["--iface", iface]);
        }
        let process = ChildProcess::spawn_silent("agent", cmd)?;
        process.wait_for_line("circuit-agent ready", AGENT_START)?;
        Ok(Agent {
            process,
            pins,
            scratch,
            bin: bin.to_owned(),
            metrics,
        })
    }

    /// Runs `circuit-agent <args> --pin-dir <pins> [extra]` and returns its stdout.
    /// Runs a CLI command against this agent (its pins and its control socket).
    fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--pin-dir").arg(&self.pins.0);
        cmd.arg("--socket").arg(self.scratch.0.join("agent.sock"));
        let out = cmd.stdin(Stdio::null()).output()?;
        ensure!(
            out.status.success(),
            "circuit-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the agent reports `upstream` in `state`.
    fn wait_for_state(&self, upstream: SocketAddr, state: &str) -> Result<()> {
        let what = format!("{upstream} to be {state}");
        wait_until(
            &what,
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let out = self.cli(&["status", "-o", "json"]).ok()?;
                let json: serde_json::Value = serde_json::from_str(&out).ok()?;
                json["breakers"]
                    .as_array()?
                    .iter()
                    .any(|b| {
                        b["upstream"].as_str() == Some(&upstream.to_string())
                            && b["state"].as_str() == Some(state)
                    })
                    .then_some(())
            },
        )
    }

    fn drops(&self) -> Result<u64> {
        Stats::open_pinned(&self.pins.0)?.get(Stat::OutcomeDrops)
    }

    /// The sum of a metric's samples (all label sets) on the agent's `/metrics` page,
    /// fetched from inside its namespace.
    fn metric(&self, ns: &NetNs, name: &str) -> Result<f64> {
        let (_, page) = circuit_tests::http_get(ns, self.metrics, "/metrics")?;
        circuit_tests::metric_sum(&page, name).with_context(|| format!("no {name} in:\n{page}"))
    }

    /// The refused outcomes of `upstream` the agent has counted (its breaker's counts in
    /// `status`; the control socket is a Unix socket, so asking adds no outcome).
    fn refused_seen(&self, upstream: SocketAddr) -> Result<u64> {
        let out = self.cli(&["status", "-o", "json"])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        json["breakers"]
            .as_array()
            .context("no breakers in status")?
            .iter()
            .find(|b| b["upstream"].as_str() == Some(&upstream.to_string()))
            .and_then(|b| b["counts"]["refused"].as_u64())
            .with_context(|| format!("no breaker for {upstream} in status"))
    }

    /// [`Agent::refused_seen`] once the agent has caught up (the count stopped moving).
    fn refused_drained(&self, upstream: SocketAddr) -> Result<u64> {
        let mut last = self.refused_seen(upstream)?;
        loop {
            thread::sleep(Duration::from_millis(300));
            let now = self.refused_seen(upstream)?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// utime + stime of `pid` (all its threads).
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `nft <script>` inside `ns`; the rules go away with the namespace.
fn nft(ns: &NetNs, script: &str) -> Result<()> {
    let out = ns
        .command("nft")?
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .context("running nft (is nftables installed? `cargo xtask setup` installs it)")?;
    ensure!(
        out.status.success(),
        "nft {script:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Connect generators

/// What a generator run did.
#[derive(Default)]
struct Generated {
    connects: u64,
    refused: u64,
    /// Paced slots skipped to stay within a client's budget after falling behind.
    skipped: u64,
    cpu: Duration,
    wall: Duration,
}

impl Generated {
    fn rate(&self) -> f64 {
        self.connects as f64 / self.wall.as_secs_f64()
    }

    fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }
}

/// Blocking connects from `threads` threads inside `ns`, thread `t`'s `i`-th going to
/// `target(t, i)` until that is None, `stop` is set or `deadline` passes; paced to `rate`
/// connects/s in all when given, else as fast as they go. Returns the count and the
/// threads' own CPU time.
fn generate(
    ns: &NetNs,
    threads: usize,
    rate: Option<f64>,
    deadline: Option<Instant>,
    stop: &AtomicBool,
    target: impl Fn(usize, u64) -> Option<SocketAddr> + Sync,
) -> Result<Generated> {
    let start = Instant::now();
    let per_thread = rate.map(|r| r / threads as f64);
    let parts: Vec<Result<Generated>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let target = &target;
                scope.spawn(move || {
                    ns.run(move || {
                        let pace = per_thread.map(|rate| Pace {
                            rate,
                            max_behind: None,
                        });
                        connect_loop(start, pace, deadline, stop, |i| target(t, i))
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("generator thread panicked"))
            .collect()
    });
    let mut total = Generated {
        wall: start.elapsed(),
        ..Default::default()
    };
    for part in parts {
        let part = part?;
        total.connects += part.connects;
        total.refused += part.refused;
        total.cpu += part.cpu;
    }
    Ok(total)
}

/// Paced connects: `rate` a second, each due at `start + slot / rate`. A thread that fell
/// behind catches up; by at most `max_behind` when given, the slots further back being
/// skipped (and counted), so that it never makes more than a burst of that length.
#[derive(Clone, Copy)]
struct Pace {
    rate: f64,
    max_behind: Option<Duration>,
}

/// One generator thread: blocking connects to `target(i)` for its `i`-th, from `start`
/// until that is None, `stop` is set or `deadline` passes; paced when `pace` is given, else
/// made at once. Counts them and the thread's own CPU time.
fn connect_loop(
    start: Instant,
    pace: Option<Pace>,
    deadline: Option<Instant>,
    stop: &AtomicBool,
    target: impl Fn(u64) -> Option<SocketAddr>,
) -> Generated {
    let cpu = thread_cpu_time();
    let mut g = Generated::default();
    let mut slot = 0u64;
    for i in 0.. {
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let Some(to) = target(i) else { break };
        if let Some(Pace { rate, max_behind }) = pace {
            let now = Instant::now();
            if let Some(max) = max_behind {
                let oldest = now.saturating_duration_since(start + max).as_secs_f64() * rate;
                let oldest = oldest.ceil() as u64;
                if slot < oldest {
                    g.skipped += oldest - slot;
                    slot = oldest;
                }
            }
            let due = start + Duration::from_secs_f64(slot as f64 / rate);
            if due > now {
                thread::sleep(due - now);
            }
            slot += 1;
        }
        g.connects += 1;
        if let Err(err) = TcpStream::connect(to)
            && err.raw_os_error() == Some(libc::ECONNREFUSED)
        {
            g.refused += 1;
        }
    }
    g.cpu = thread_cpu_time() - cpu;
    g.wall = start.elapsed();
    g
}

// ---------------------------------------------------------------------------------------
// 1. Fail-fast latency

fn fail_fast(bin: &Path, p: &Params) -> Result<Vec<Compared>> {
    eprintln!("system bench: fail-fast latency");
    let sandbox = Sandbox::new("cbsys")?;
    let at = |port| SocketAddr::new(IpAddr::V4(sandbox.upstream_addr), port);
    let _listeners = [HEALTHY_PORT, CGROUP_PORT, XDP_PORT]
        .map(|port| Upstream::start(&sandbox.upstream, at(port)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    nft(
        &sandbox.upstream,
        &format!(
            "add table inet circuit_bench; \
             add chain inet circuit_bench input {{ type filter hook input priority 0; policy accept; }}; \
             add rule inet circuit_bench input tcp dport {NFT_REJECT_PORT} reject with tcp reset; \
             add rule inet circuit_bench input tcp dport {NFT_DROP_PORT} drop"
        ),
    )?;
    // Threshold 0: neither agent trips by itself on the refusals of the baselines; the
    // upstreams are isolated by the operator command alone.
    let cgroup = Agent::start(
        bin,
        &sandbox.upstream,
        &AgentSpec {
            enforce: "cgroup",
            iface: None,
            metrics_port: 9464,
            args: &["--failure-threshold", "0"],
            config: "",
        },
    )?;
    let xdp = Agent::start(
        bin,
        &sandbox.upstream,
        &AgentSpec {
            enforce: "xdp",
            iface: Some(&sandbox.upstream_if),
            metrics_port: 9465,
            args: &["--failure-threshold", "0"],
            config: "",
        },
    )?;
    let client = Client::new(&sandbox.client)?;
    for port in [CGROUP_PORT, XDP_PORT] {
        let attempt = client.connect(at(port), CONNECT_TIMEOUT)?;
        ensure!(
            attempt.result == ConnectResult::Connected,
            "{} before isolation: {attempt:?}",
            at(port)
        );
    }
    // For a bounded time: should this bench be killed before it cleans up, the verdicts
    // (and a leaked cgroup link with them) stop rejecting on their own.
    for (agent, port) in [(&cgroup, CGROUP_PORT), (&xdp, XDP_PORT)] {
        agent.cli(&["trip", &at(port).to_string(), "--for", "10m"])?;
    }

    let kinds = [
        (HEALTHY_PORT, ConnectResult::Connected),
        (CLOSED_PORT, ConnectResult::Refused),
        (NFT_REJECT_PORT, ConnectResult::Refused),
        (CGROUP_PORT, ConnectResult::Refused),
        (XDP_PORT, ConnectResult::Refused),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    // Interleaved, so every kind sees the same machine state; the first rounds warm up.
    for round in 0..p.connects + 20 {
        for (k, (port, expected)) in kinds.iter().enumerate() {
            let attempt = client.connect(at(*port), CONNECT_TIMEOUT)?;
            ensure!(
                attempt.result == *expected,
                "connect to {} gave {attempt:?}, expected {expected:?}",
                at(*port)
            );
            if round >= 20 {
                samples[k].push(micros(attempt.elapsed));
            }
        }
    }
    let mut dropped = Vec::new();
    for _ in 0..p.drops {
        let attempt = client.connect(at(NFT_DROP_PORT), DROP_TIMEOUT)?;
        ensure!(
            attempt.result == ConnectResult::TimedOut,
            "connect through the drop rule gave {attempt:?}"
        );
        dropped.push(micros(attempt.elapsed));
    }
    let rejects_seen = Stats::open_pinned(&cgroup.pins.0)?.get(Stat::CgroupRejectOpen)?;
    ensure!(
        rejects_seen >= p.connects as u64,
        "cgroup rejects not counted"
    );
    let xdp_seen = Stats::open_pinned(&xdp.pins.0)?.get(Stat::XdpRejectOpen)?;
    ensure!(xdp_seen >= p.connects as u64, "XDP rejects not counted");

    let q = |k: usize, q: f64| percentile(&samples[k], q);
    let (healthy, closed, nft_reject, by_cgroup, by_xdp) = (0, 1, 2, 3, 4);
    let drop_after = report::median(dropped.clone());
    let n = p.connects;
    let mut rows = Vec::new();
    for (what, k) in [("the cgroup hook", by_cgroup), ("an XDP RST", by_xdp)] {
        for (pname, pq) in [("p50", 0.5), ("p99", 0.99)] {
            rows.push(row(
                format!("fail-fast {pname} of {n} connects: rejected by {what}"),
                q(k, pq),
                format!("kernel RST from a closed port, {pname}"),
                q(closed, pq),
                "µs",
            ));
            rows.push(row(
                format!("fail-fast {pname} of {n} connects: rejected by {what}"),
                q(k, pq),
                format!("nftables `reject with tcp reset`, {pname}"),
                q(nft_reject, pq),
                "µs",
            ));
        }
        rows.push(row(
            format!("fail-fast p50 of {n} connects: rejected by {what}"),
            q(k, 0.5),
            "healthy connect to a listener, p50",
            q(healthy, 0.5),
            "µs",
        ));
        rows.push(Compared {
            target: Some(0.01),
            ..row(
                format!("fail-fast p50 of {n} connects: rejected by {what}"),
                q(k, 0.5),
                format!(
                    "nftables `drop`: timed out after {:.2} s (client timeout {} s, median of {})",
                    drop_after / 1e6,
                    DROP_TIMEOUT.as_secs(),
                    dropped.len()
                ),
                drop_after,
                "µs",
            )
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 2. Time to trip and 3. ingest

/// `detect_to_verdict_us` of the CLOSED → OPEN transitions of `ports`, with the refused
/// connects' own latencies.
struct Trips {
    detect_to_verdict: Vec<f64>,
    refused_connect: Vec<f64>,
}

/// Trips one breaker per port (THRESHOLD refused connects each, a pause between trips),
/// then collects each trip's `detect_to_verdict_us` from the agent's log.
fn trip_ports(
    agent: &Agent,
    client: &Client,
    addr: Ipv4Addr,
    ports: std::ops::Range<u16>,
) -> Result<Trips> {
    let mut refused_connect = Vec::new();
    for port in ports.clone() {
        for _ in 0..THRESHOLD {
            let to = SocketAddr::new(IpAddr::V4(addr), port);
            let attempt = client.connect(to, CONNECT_TIMEOUT)?;
            ensure!(
                attempt.result == ConnectResult::Refused,
                "trip connect to {to}: {attempt:?}"
            );
            refused_connect.push(micros(attempt.elapsed));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut detect_to_verdict = Vec::new();
    for port in ports {
        let upstream = SocketAddr::new(IpAddr::V4(addr), port).to_string();
        let line = wait_until(
            &format!("the trip of {upstream}"),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                agent.process.lines().into_iter().find(|l| {
                    l.contains("breaker transition")
                        && field(l, "upstream") == Some(&upstream)
                        && field(l, "from") == Some("CLOSED")
                        && field(l, "to") == Some("OPEN")
                })
            },
        )?;
        let us: f64 = field(&line, "detect_to_verdict_us")
            .with_context(|| format!("no detect_to_verdict_us in {line}"))?
            .parse()?;
        detect_to_verdict.push(us);
    }
    Ok(Trips {
        detect_to_verdict,
        refused_connect,
    })
}

/// Value of `key=` in a logfmt-style tracing line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

/// Time to trip (when `trip`) and ingest (when `ingest`), with one agent.
fn trip_and_ingest(bin: &Path, p: &Params, trip: bool, ingest: bool) -> Result<Vec<Compared>> {
    let sandbox = Sandbox::new("cbsys")?;
    let addr = sandbox.upstream_addr;
    let load = SocketAddr::new(IpAddr::V4(addr), LOAD_PORT);
    let open = "1h";
    let threshold = THRESHOLD.to_string();
    let agent = Agent::start(
        bin,
        &sandbox.upstream,
        &AgentSpec {
            enforce: "xdp",
            iface: Some(&sandbox.upstream_if),
            metrics_port: 9464,
            args: &["--failure-threshold", &threshold, "--open-duration", open],
            config: "",
        },
    )?;
    agent.cli(&["disable", &load.to_string()])?;
    agent.wait_for_state(load, "DISABLED")?;
    let mut rows = Vec::new();
    if trip {
        rows.extend(time_to_trip(&agent, &sandbox, p)?);
    }
    if ingest {
        rows.extend(ingest_one_client(&agent, &sandbox, p)?);
    }
    Ok(rows)
}

/// Time to trip, idle and under a background load from this process (one client).
fn time_to_trip(agent: &Agent, sandbox: &Sandbox, p: &Params) -> Result<Vec<Compared>> {
    let addr = sandbox.upstream_addr;
    let load = SocketAddr::new(IpAddr::V4(addr), LOAD_PORT);
    let client = Client::new(&sandbox.client)?;

    eprintln!("system bench: time to trip, idle");
    let idle = trip_ports(agent, &client, addr, TRIP_PORTS..TRIP_PORTS + p.trips)?;

    // Under a background load of refused connects to the disabled upstream.
    eprintln!("system bench: time to trip, under load");
    let stop = AtomicBool::new(false);
    let (loaded, load_run) = thread::scope(|scope| -> Result<_> {
        let background = scope.spawn(|| {
            generate(&sandbox.client, 2, Some(LOAD_RATE), None, &stop, |_, _| {
                Some(load)
            })
        });
        thread::sleep(Duration::from_millis(500));
        let first = TRIP_PORTS + p.trips;
        let trips = trip_ports(agent, &client, addr, first..first + p.trips);
        stop.store(true, Ordering::Relaxed);
        let load_run = background.join().expect("load thread panicked")?;
        Ok((trips?, load_run))
    })?;
    ensure!(
        load_run.refused == load_run.connects,
        "background load: only {} of {} connects refused",
        load_run.refused,
        load_run.connects
    );
    let achieved = load_run.rate();

    let t = p.trips;
    let mut rows = Vec::new();
    for (phase, trips) in [
        (format!("idle, {t} trips"), &idle),
        (
            format!("under {achieved:.0} outcomes/s background load, {t} trips"),
            &loaded,
        ),
    ] {
        for (pname, pq) in [("p50", 0.5), ("p99", 0.99)] {
            rows.push(row(
                format!("time to trip {pname}, {phase}: kernel event → verdict written"),
                percentile(&trips.detect_to_verdict, pq),
                format!("the kernel's refused-connect latency, {pname}"),
                percentile(&trips.refused_connect, pq),
                "µs",
            ));
        }
    }
    rows.push(Compared {
        source: Source::Documented,
        ..row(
            format!("time to trip p99, idle, {t} trips"),
            percentile(&idle.detect_to_verdict, 0.99),
            "Envoy outlier detection: ejections are evaluated every `interval`, default 10 s",
            10e6,
            "µs",
        )
    });

    Ok(rows)
}

/// Ingest from one client (this process): a flood, the highest rate without drops if the
/// flood had some, and the agent's CPU at LOAD_RATE; then from many clients.
fn ingest_one_client(agent: &Agent, sandbox: &Sandbox, p: &Params) -> Result<Vec<Compared>> {
    let load = SocketAddr::new(IpAddr::V4(sandbox.upstream_addr), LOAD_PORT);
    let no_stop = AtomicBool::new(false);
    let mut rows = Vec::new();

    // Ingest: refused connects as fast as 4 threads make them.
    eprintln!("system bench: ingest");
    let drops_before = agent.drops()?;
    let seen_before = agent.refused_drained(load)?;
    let flood = generate(
        &sandbox.client,
        4,
        None,
        Some(Instant::now() + p.flood),
        &no_stop,
        |_, _| Some(load),
    )?;
    let handled = (agent.refused_drained(load)? - seen_before) as f64;
    let drops = agent.drops()? - drops_before;
    let secs = flood.wall.as_secs_f64();
    rows.push(row(
        format!(
            "ingest: outcomes/s taken by the agent, flood from 4 threads for {secs:.0} s ({drops} ring-buffer drops)"
        ),
        handled / secs,
        "refused connects/s generated",
        flood.rate(),
        "outcomes/s",
    ));
    rows.push(row(
        "ingest: ring-buffer drops during the flood",
        drops as f64,
        "outcomes generated",
        flood.connects as f64,
        "outcomes",
    ));
    if drops > 0 {
        // The highest paced rate without drops, stepping down from the flood's rate.
        let mut clean = None;
        for fraction in [0.8, 0.6, 0.4, 0.2, 0.1] {
            let before = agent.drops()?;
            let run = generate(
                &sandbox.client,
                4,
                Some(flood.rate() * fraction),
                Some(Instant::now() + p.flood),
                &no_stop,
                |_, _| Some(load),
            )?;
            agent.refused_drained(load)?;
            if agent.drops()? == before {
                clean = Some(run.rate());
                break;
            }
        }
        rows.push(row(
            "ingest: highest paced rate with no ring-buffer drops",
            clean.unwrap_or(0.0),
            "flood rate (with drops)",
            flood.rate(),
            "outcomes/s",
        ));
    }

    // CPU at about 10,000 outcomes/s.
    eprintln!("system bench: CPU");
    let cpu_before = cpu_time(agent.pid())?;
    let paced = generate(
        &sandbox.client,
        2,
        Some(LOAD_RATE),
        Some(Instant::now() + p.cpu_window),
        &no_stop,
        |_, _| Some(load),
    )?;
    let agent_cpu = cpu_time(agent.pid())? - cpu_before;
    rows.push(row(
        format!(
            "agent CPU at {:.0} outcomes/s (target {LOAD_RATE:.0}/s, {:.0} s)",
            paced.rate(),
            paced.wall.as_secs_f64()
        ),
        100.0 * agent_cpu.as_secs_f64() / paced.wall.as_secs_f64(),
        "the generator's own CPU (2 threads making the refused connects)",
        paced.cpu_percent(),
        "% of a core",
    ));
    rows.extend(ingest_many_clients(agent, sandbox, p, handled / secs)?);
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 3b. Ingest from many clients

/// The first argument that makes this bench binary a client of the many-client figure
/// instead (see [`ingest_client`]).
const INGEST_CLIENT_ARG: &str = "--ingest-client";
/// Clients of the many-client figure: each a process of its own (this binary, re-executed)
/// in a cgroup v2 of its own, so each has a kernel budget of its own (`ClientBudget`).
const INGEST_CLIENTS: usize = 16;
/// Each client's paced rate: under its budget (4,000 outcome events a second after a burst
/// of 1,024), with room to catch up after being descheduled without spending the burst.
/// 16 × 3,500 = 56,000 outcomes/s offered.
const CLIENT_RATE: f64 = 3_500.0;
/// How far behind its pace a client may catch up: 350 connects at 3,500/s, well within the
/// 1,024 of its budget's burst, which refills faster (4,000/s) than it paces.
const CLIENT_MAX_BEHIND: Duration = Duration::from_millis(100);
/// The search for the highest rate without drops adds this many clients a step …
const MORE_CLIENTS: usize = 8;
/// … for at most this many steps (64 clients, 224,000/s offered).
const MORE_CLIENTS_STEPS: usize = 6;
/// Clients that make less than this fraction of the offered rate have saturated the
/// machine: offering more measures the generators, not the agent.
const MADE_ENOUGH: f64 = 0.95;
/// How long after being spawned the clients start, all at once (CLOCK_MONOTONIC).
const CLIENTS_START: Duration = Duration::from_secs(1);

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` reads, the same in every process.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The bench binary as a client of the many-client figure, already in the client namespace
/// and its own cgroup (`--ingest-client ADDR RATE START_NS SECONDS`): says `ready`, waits
/// for START_NS (CLOCK_MONOTONIC), makes refused connects to ADDR paced at RATE a second
/// for SECONDS from one thread (catching up by at most CLIENT_MAX_BEHIND), and prints
/// `generated CONNECTS REFUSED SKIPPED CPU_NS WALL_NS`.
fn ingest_client(args: &[String]) -> Result<()> {
    let [to, rate, start_ns, secs] = args else {
        anyhow::bail!("{INGEST_CLIENT_ARG} ADDR RATE START_NS SECONDS, got {args:?}");
    };
    let to: SocketAddr = to.parse()?;
    let rate: f64 = rate.parse()?;
    let start_ns: u64 = start_ns.parse()?;
    let duration = Duration::from_secs_f64(secs.parse()?);
    let now = monotonic_ns();
    ensure!(
        now < start_ns,
        "ingest client ready {:.1} ms after the start",
        (now - start_ns) as f64 / 1e6
    );
    let start = Instant::now() + Duration::from_nanos(start_ns - now);
    println!("ready");
    thread::sleep(start.saturating_duration_since(Instant::now()));
    let pace = Pace {
        rate,
        max_behind: Some(CLIENT_MAX_BEHIND),
    };
    let g = connect_loop(
        start,
        Some(pace),
        Some(start + duration),
        &AtomicBool::new(false),
        |_| Some(to),
    );
    println!(
        "generated {} {} {} {} {}",
        g.connects,
        g.refused,
        g.skipped,
        g.cpu.as_nanos(),
        g.wall.as_nanos()
    );
    Ok(())
}

/// A directory of client cgroups under the cgroup v2 mount, removed (clients first) on drop,
/// once their processes have exited.
struct ClientCgroups {
    dir: PathBuf,
    clients: Vec<PathBuf>,
}

impl ClientCgroups {
    fn new(n: usize) -> Result<ClientCgroups> {
        let root = circuit_agent::kernel::ensure_cgroup2_root()?;
        let dir = root.join(unique_name("cbing"));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cgroups = ClientCgroups {
            dir,
            clients: Vec::new(),
        };
        for i in 0..n {
            let client = cgroups.dir.join(format!("c{i:02}"));
            std::fs::create_dir(&client)
                .with_context(|| format!("creating {}", client.display()))?;
            cgroups.clients.push(client);
        }
        Ok(cgroups)
    }

    /// CPU time of every process that ran in the client cgroups (`usage_usec` of
    /// cpu.stat, which cgroup v2 keeps with or without the cpu controller).
    fn cpu(&self) -> Result<Duration> {
        let mut usec = 0;
        for client in &self.clients {
            let path = client.join("cpu.stat");
            let stat = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            usec += stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .with_context(|| format!("no usage_usec in {}", path.display()))?;
        }
        Ok(Duration::from_micros(usec))
    }
}

impl Drop for ClientCgroups {
    fn drop(&mut self) {
        // An empty cgroup is removed with rmdir, which says EBUSY for a moment while the
        // last exited process is still being released.
        for dir in self.clients.iter().chain([&self.dir]) {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut removed = std::fs::remove_dir(dir);
            while matches!(&removed, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(20));
                removed = std::fs::remove_dir(dir);
            }
            if let Err(err) = removed
                && err.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("warning: cannot remove cgroup {}: {err}", dir.display());
            }
        }
    }
}

/// The machine's CPU time by kind, from the first line of /proc/stat.
#[derive(Clone, Copy, Default)]
struct MachineCpu {
    /// user + nice
    user: Duration,
    system: Duration,
    /// irq + softirq: the network stack's receive path, mostly.
    softirq: Duration,
    /// idle + iowait
    idle: Duration,
    steal: Duration,
}

impl MachineCpu {
    fn now() -> Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(ticks.len() >= 8, "short cpu line in /proc/stat");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let t = |n: u64| Duration::from_secs_f64(n as f64 / hz);
        Ok(MachineCpu {
            user: t(ticks[0] + ticks[1]),
            system: t(ticks[2]),
            idle: t(ticks[3] + ticks[4]),
            softirq: t(ticks[5] + ticks[6]),
            steal: t(ticks[7]),
        })
    }

    fn since(&self, then: &MachineCpu) -> MachineCpu {
        MachineCpu {
            user: self.user - then.user,
            system: self.system - then.system,
            softirq: self.softirq - then.softirq,
            idle: self.idle - then.idle,
            steal: self.steal - then.steal,
        }
    }
}

/// What one many-client flood did, as the clients, the kernel and the agent saw it.
struct ManyClients {
    clients: usize,
    /// The paced rate asked of each client.
    per_client: f64,
    generated: Generated,
    /// The flood's window (the clients' common start to its end).
    window: Duration,
    /// Refused outcomes of the load upstream the kernel counted (UPSTREAM_COUNTS, which
    /// nothing is lost from), the agent had taken by the window's end, and in all once it
    /// had caught up.
    kernel_counted: u64,
    taken_in_window: u64,
    taken: u64,
    /// The agent's `outcome_drops` and `outcomes_throttled` over the flood: its programs
    /// see every connect on the machine, so these count other clients' outcomes too (the
    /// root cgroup of a concurrent bench, say); `kernel_counted - taken` is this
    /// upstream's alone.
    drops: u64,
    throttled: u64,
    agent_cpu: Duration,
    clients_cpu: Duration,
    machine: MachineCpu,
}

impl ManyClients {
    fn offered(&self) -> f64 {
        self.clients as f64 * self.per_client
    }

    fn percent(&self, cpu: Duration) -> f64 {
        100.0 * cpu.as_secs_f64() / self.window.as_secs_f64()
    }

    /// This upstream's outcomes the kernel counted but the agent never took (throttled or
    /// dropped).
    fn missed(&self) -> u64 {
        self.kernel_counted.saturating_sub(self.taken)
    }

    fn taken_rate(&self) -> f64 {
        self.taken as f64 / self.generated.wall.as_secs_f64()
    }

    fn summary(&self) -> String {
        let m = &self.machine;
        format!(
            "{} clients × {:.0}/s for {:.1} s: offered {:.0}/s, made {:.0}/s ({} connects, {} refused, {} paced slots skipped), \
             kernel counted {}, agent took {} by the end of the window and {} in all ({:.0}/s), \
             {} ring-buffer drops and {} throttled (any client on the machine); CPU in % of one core: agent {:.1}, clients {:.1}, \
             machine user {:.1}, system {:.1}, softirq {:.1}, idle {:.1}, steal {:.1}",
            self.clients,
            self.per_client,
            self.window.as_secs_f64(),
            self.offered(),
            self.generated.rate(),
            self.generated.connects,
            self.generated.refused,
            self.generated.skipped,
            self.kernel_counted,
            self.taken_in_window,
            self.taken,
            self.taken_rate(),
            self.drops,
            self.throttled,
            self.percent(self.agent_cpu),
            self.percent(self.clients_cpu),
            self.percent(m.user),
            self.percent(m.system),
            self.percent(m.softirq),
            self.percent(m.idle),
            self.percent(m.steal),
        )
    }
}

/// `clients` processes, each in a cgroup of its own in the client namespace, make refused
/// connects to the disabled load upstream at `per_client` a second each for `duration`, all
/// starting at once.
fn flood_from_clients(
    agent: &Agent,
    sandbox: &Sandbox,
    clients: usize,
    per_client: f64,
    duration: Duration,
) -> Result<ManyClients> {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};

    let load = SocketAddr::new(IpAddr::V4(sandbox.upstream_addr), LOAD_PORT);
    let exe = std::env::current_exe().context("cannot locate the bench executable")?;
    let stats = Stats::open_pinned(&agent.pins.0)?;
    let counts = UpstreamCounts::open_pinned(&agent.pins.0)?;
    let refused_counted = || -> Result<u64> {
        Ok(counts
            .get(load)?
            .into_iter()
            .find(|(o, _)| *o == ConnectOutcome::Refused)
            .map_or(0, |(_, n)| n))
    };
    // Declared before the processes, so dropped after them.
    let cgroups = ClientCgroups::new(clients)?;
    let taken_before = agent.refused_drained(load)?;
    let kernel_before = refused_counted()?;
    let drops_before = stats.get(Stat::OutcomeDrops)?;
    let throttled_before = stats.get(Stat::OutcomesThrottled)?;

    let start_ns = monotonic_ns() + CLIENTS_START.as_nanos() as u64;
    let start = Instant::now() + CLIENTS_START;
    let mut processes = Vec::new();
    for (i, cgroup) in cgroups.clients.iter().enumerate() {
        let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
        let mut cmd = sandbox.client.command(&exe)?;
        cmd.arg(INGEST_CLIENT_ARG)
            .arg(load.to_string())
            .arg(per_client.to_string())
            .arg(start_ns.to_string())
            .arg(duration.as_secs_f64().to_string());
        // SAFETY: between fork and exec, only open/write/close on a path built before the
        // fork, no allocation: the child joins its cgroup ("0" writes the calling process).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        processes.push(ChildProcess::spawn_silent(&format!("client {i}"), cmd)?);
    }
    for process in &processes {
        process.wait_for_line("ready", CLIENTS_START)?;
    }
    thread::sleep(start.saturating_duration_since(Instant::now()));
    let agent_cpu = cpu_time(agent.pid())?;
    let clients_cpu = cgroups.cpu()?;
    let machine = MachineCpu::now()?;
    let window_start = Instant::now();
    thread::sleep((start + duration).saturating_duration_since(Instant::now()));
    let agent_cpu = cpu_time(agent.pid())? - agent_cpu;
    let clients_cpu = cgroups.cpu()? - clients_cpu;
    let machine = MachineCpu::now()?.since(&machine);
    let window = window_start.elapsed();
    let taken_in_window = agent.refused_seen(load)? - taken_before;

    let mut generated = Generated::default();
    for process in &processes {
        let line = process.wait_for_line("generated", Duration::from_secs(10))?;
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad client report {line:?}"))?;
        ensure!(n.len() == 5, "bad client report {line:?}");
        generated.connects += n[0];
        generated.refused += n[1];
        generated.skipped += n[2];
        generated.cpu += Duration::from_nanos(n[3]);
        generated.wall = generated.wall.max(Duration::from_nanos(n[4]));
    }
    drop(processes);
    ensure!(
        generated.refused == generated.connects,
        "many-client flood: only {} of {} connects refused",
        generated.refused,
        generated.connects
    );
    let taken = agent.refused_drained(load)? - taken_before;
    Ok(ManyClients {
        clients,
        per_client,
        generated,
        window,
        kernel_counted: refused_counted()? - kernel_before,
        taken_in_window,
        taken,
        drops: stats.get(Stat::OutcomeDrops)? - drops_before,
        throttled: stats.get(Stat::OutcomesThrottled)? - throttled_before,
        agent_cpu,
        clients_cpu,
        machine,
    })
}

/// Ingest from many clients at once, each under its own budget; `one_client` is the
/// single-client figure (that client's budget).
fn ingest_many_clients(
    agent: &Agent,
    sandbox: &Sandbox,
    p: &Params,
    one_client: f64,
) -> Result<Vec<Compared>> {
    eprintln!("system bench: ingest from {INGEST_CLIENTS} clients");
    let run = flood_from_clients(agent, sandbox, INGEST_CLIENTS, CLIENT_RATE, p.flood)?;
    eprintln!("system bench: {}", run.summary());
    let n = run.clients;
    let secs = run.window.as_secs_f64();
    let what = format!(
        "ingest from {n} clients (a process and a cgroup each, {:.0}/s each) for {secs:.0} s",
        run.per_client
    );
    let mut rows = vec![
        row(
            format!(
                "{what}: outcomes/s taken by the agent ({} ring-buffer drops; of the kernel's count, {} not taken)",
                run.drops,
                run.missed()
            ),
            run.taken_rate(),
            format!(
                "refused connects/s the clients made (offered {:.0}/s)",
                run.offered()
            ),
            run.generated.rate(),
            "outcomes/s",
        ),
        row(
            format!("{what}: outcomes/s taken by the agent"),
            run.taken_rate(),
            "outcomes/s taken from one flooding client (the ingest row above)",
            one_client,
            "outcomes/s",
        ),
        row(
            format!("{what}: ring-buffer drops"),
            run.drops as f64,
            "outcomes generated",
            run.generated.connects as f64,
            "outcomes",
        ),
        row(
            format!("{what}: agent CPU at {:.0} outcomes/s", run.taken_rate()),
            run.percent(run.agent_cpu),
            format!("the {n} clients' own CPU (their cgroups' usage)"),
            run.percent(run.clients_cpu),
            "% of a core",
        ),
        row(
            format!(
                "{what}: machine CPU busy (user {:.0}, system {:.0}, softirq {:.0}, steal {:.0})",
                run.percent(run.machine.user),
                run.percent(run.machine.system),
                run.percent(run.machine.softirq),
                run.percent(run.machine.steal),
            ),
            run.percent(run.machine.user + run.machine.system + run.machine.softirq),
            "all the machine's CPUs",
            run.percent(
                run.machine.user
                    + run.machine.system
                    + run.machine.softirq
                    + run.machine.idle
                    + run.machine.steal,
            ),
            "% of a core",
        ),
    ];

    // The highest paced rate with no drops: more clients (or fewer, had there been drops),
    // each at the same rate, until the ring drops outcomes or the clients no longer make
    // what is asked of them (the machine is saturated).
    let mut clean = (run.drops == 0).then(|| (run.clients, run.taken_rate()));
    let up = run.drops == 0;
    let steps: Vec<usize> = if up {
        (1..=MORE_CLIENTS_STEPS)
            .map(|k| n + k * MORE_CLIENTS)
            .collect()
    } else {
        [n * 3 / 4, n / 2, n / 4]
            .into_iter()
            .filter(|&c| c > 0)
            .collect()
    };
    let mut limit = match steps.last() {
        Some(last) if up => format!("no limit up to {last} clients"),
        Some(last) => format!("{n} clients dropped {}, and so did {last}", run.drops),
        None => "no steps".to_owned(),
    };
    for clients in steps {
        eprintln!("system bench: ingest from {clients} clients");
        let step = flood_from_clients(agent, sandbox, clients, CLIENT_RATE, p.flood)?;
        eprintln!("system bench: {}", step.summary());
        let (offered, made) = (step.offered(), step.generated.rate());
        if step.drops > 0 {
            if up {
                limit = format!(
                    "{clients} clients, offered {offered:.0}/s, made {made:.0}/s: {} drops",
                    step.drops
                );
                break;
            }
            continue;
        }
        if clean.is_none_or(|(_, rate)| step.taken_rate() > rate) {
            clean = Some((clients, step.taken_rate()));
        }
        if !up {
            limit = format!("{n} clients dropped {}", run.drops);
            break;
        }
        if made < MADE_ENOUGH * offered {
            limit = format!(
                "{clients} clients, offered {offered:.0}/s, made only {made:.0}/s: the generators' limit"
            );
            break;
        }
    }
    rows.push(row(
        format!(
            "ingest from many clients ({CLIENT_RATE:.0}/s each): highest rate taken with no ring-buffer drops, from {} clients ({limit})",
            clean.map_or(0, |(clients, _)| clients)
        ),
        clean.map_or(0.0, |(_, rate)| rate),
        format!("outcomes/s taken from {n} clients (the rows above)"),
        run.taken_rate(),
        "outcomes/s",
    ));
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 4. Memory

fn memory(bin: &Path, p: &Params) -> Result<Vec<Compared>> {
    eprintln!("system bench: memory");
    let sandbox = Sandbox::new("cbsys")?;
    // A second address on the upstream side: 2 × 50,000 ports give up to 100,000 upstreams.
    let second = sibling(sandbox.upstream_addr, 3);
    sandbox.upstream.ip(&[
        "addr",
        "add",
        &format!("{second}/24"),
        "dev",
        &sandbox.upstream_if,
    ])?;
    let addrs = [sandbox.upstream_addr, second];
    let per_addr = MANY_PORTS.len();
    let upstream = |i: usize| {
        SocketAddr::new(
            IpAddr::V4(addrs[i / per_addr]),
            MANY_PORTS.start + (i % per_addr) as u16,
        )
    };
    assert!(p.many <= 2 * per_addr);
    let agent = Agent::start(
        bin,
        &sandbox.upstream,
        &AgentSpec {
            enforce: "xdp",
            iface: Some(&sandbox.upstream_if),
            metrics_port: 9464,
            args: &[],
            // Room for every upstream; the agent's own metrics scrapes (loopback) are not
            // tracked, so the count is the sandbox's upstreams alone.
            config: "[tracking]\nmax_upstreams = 65536\n\n[never_isolate]\nupstreams = [\n  \
                     { cidr = \"0.0.0.0/0\", ports = [53] },\n  { cidr = \"::/0\", ports = [53] },\n  \
                     { cidr = \"127.0.0.0/8\" },\n]\n",
        },
    )?;
    thread::sleep(Duration::from_secs(1));
    let idle_tracked = agent.metric(&sandbox.upstream, "circuit_tracked_upstreams")?;
    let idle = rss_kib(agent.pid())?;
    let mut rows = Vec::new();
    let mut done = 0;
    for n in [1_000, p.many] {
        // One refused connect per new upstream, from 2 threads, within the per-client
        // outcome budget (see LOAD_RATE); swept again if the agent missed some.
        let threads = 2;
        let chunk = (n - done).div_ceil(threads);
        for _ in 0..3 {
            generate(
                &sandbox.client,
                threads,
                Some(LOAD_RATE),
                None,
                &AtomicBool::new(false),
                |t, i| {
                    let i = done + t * chunk + i as usize;
                    (i < n && (i - done) / chunk == t).then(|| upstream(i))
                },
            )?;
            let tracked = wait_until(
                &format!("{n} tracked upstreams"),
                Duration::from_secs(10),
                Duration::from_millis(100),
                || {
                    let t = agent
                        .metric(&sandbox.upstream, "circuit_tracked_upstreams")
                        .ok()?;
                    (t >= (n as f64 + idle_tracked)).then_some(t)
                },
            );
            if tracked.is_ok() {
                break;
            }
        }
        let tracked = agent.metric(&sandbox.upstream, "circuit_tracked_upstreams")?;
        ensure!(
            tracked >= n as f64,
            "the agent tracks {tracked} upstreams, wanted {n}"
        );
        done = n;
        // Let the allocator settle and the housekeeping run.
        thread::sleep(Duration::from_millis(500));
        let rss = rss_kib(agent.pid())?;
        let capped = if n < circuit_common::VERDICTS_CAPACITY as usize && n == p.many {
            " (--quick: capped at 10,000)"
        } else {
            ""
        };
        rows.push(row(
            format!("memory: agent RSS with {n} tracked upstreams{capped}"),
            rss as f64 / 1024.0,
            format!("agent RSS idle ({idle_tracked:.0} upstreams tracked)"),
            idle as f64 / 1024.0,
            "MiB",
        ));
    }
    Ok(rows)
}
