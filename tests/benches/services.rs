//! Breakers behind a Kubernetes Service VIP: a client connects to a VIP that nftables DNATs
//! at random to one of three endpoints (kube-proxy's nftables mode, in the client's own
//! namespace: `circuit_tests::service::ServiceTopology`, HostClient placement, IPv4), while
//! some endpoints are dead.
//!
//! 1. Partial outage. For each case (1 of 3 endpoints refusing, 1 of 3 black-holed, 2 of 3
//!    refusing, 3 of 3 refusing), 400 sequential requests (a connect and a read of "ok",
//!    1 s timeout for both), counted ok / refused or failed / timed out, with the time the
//!    400 took, under three variants:
//!    - no breaker: the client connects to the VIP, the DNAT picks the endpoint;
//!    - circuit: the same with the real agent attached (a fresh one per case, default
//!      configuration but for the overrides that confine it to the topology's CIDRs and the
//!      panic guard off; `--iface` the client's veth);
//!    - HAProxy: the client connects to HAProxy in its own namespace (TCP mode, `balance
//!      random` over the three endpoints, passive layer-4 checks that mark a server down
//!      after 3 errors, `retries 2`, `option redispatch`, active checks every second).
//!
//!    Each run starts from healthy endpoints and a fresh breaker (a new agent with a new
//!    pin directory; a new HAProxy whose active checks have brought every server to full
//!    health), makes 30 healthy requests through it, then turns the case's endpoints dead
//!    (one nftables transaction) and makes the 400 requests: the outage begins while the
//!    breaker runs, as it would in production. Which endpoint every connection reached
//!    comes from conntrack's NEW events in the client's namespace, so the failures each
//!    dead endpoint caused are counted too.
//! 2. Healthy path cost. nginx on each endpoint behind the same VIP, wrk in the client
//!    namespace with a new connection per request; requests/s and the whole machine's CPU
//!    time per request (/proc/stat), without and with the agent, alternating runs, medians.
//!
//! Run through `cargo xtask bench [--quick]`, which builds the agent and collects the
//! results. Prints markdown tables and writes JSON to $CIRCUIT_BENCH_JSON (default
//! target/bench/services.json). Benchmarks report: goals are printed as met or missed,
//! never asserted.

// The shared `report.rs` tables (a figure next to one baseline) do not fit a matrix of
// variants; this bench prints its own tables and writes JSON objects of its own (with the
// same "group" field, which `cargo xtask bench` collects). It shares report.rs's choice of
// the agent binary.
#[allow(dead_code)]
#[path = "report.rs"]
mod report;

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use circuit_tests::service::{
    EndpointMode, Family, Placement, RequestOutcome, RequestResult, ServiceTopology,
};
use circuit_tests::{ChildProcess, RemoveOnDrop, require_root, unique_name, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const ENDPOINTS: usize = 3;
/// Requests per cell of the partial-outage table, also with --quick.
const REQUESTS: usize = 400;
/// Each request's timeout, connect and read together.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long conntrack keeps an unanswered connect's translation in the client's namespace.
const SYN_SENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Healthy requests through the breaker before each run's outage begins (not counted).
const WARMUP: usize = 30;
/// The agent's default `failure_threshold` (deploy/config/circuit.toml): what "failures per
/// dead endpoint" is held against.
const DEFAULT_FAILURE_THRESHOLD: u64 = 5;
/// HAProxy's frontend, on loopback in the client's namespace.
const HAPROXY_PORT: u16 = 18080;
const AGENT_START: Duration = Duration::from_secs(30);
const PROCESS_START: Duration = Duration::from_secs(10);
const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";
const WRK: &str = "/usr/bin/wrk";

use EndpointMode::{BlackHoled, Refusing, Serving};

const CASES: [(&str, [EndpointMode; ENDPOINTS]); 4] = [
    ("1 of 3 refusing", [Refusing, Serving, Serving]),
    ("1 of 3 black-holed", [BlackHoled, Serving, Serving]),
    ("2 of 3 refusing", [Refusing, Refusing, Serving]),
    ("3 of 3 refusing", [Refusing, Refusing, Refusing]),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    NoBreaker,
    Circuit,
    HaProxy,
}

const VARIANTS: [Variant; 3] = [Variant::NoBreaker, Variant::Circuit, Variant::HaProxy];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::NoBreaker => "no breaker",
            Variant::Circuit => "circuit",
            Variant::HaProxy => "HAProxy",
        }
    }
}

struct Params {
    /// wrk's duration per run.
    wrk: Duration,
    /// Runs per variant of the healthy-path table.
    reps: usize,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                wrk: Duration::from_secs(3),
                reps: 2,
            }
        } else {
            Self {
                wrk: Duration::from_secs(10),
                reps: 3,
            }
        }
    }
}

fn main() -> Result<()> {
    require_root()?;
    let quick = std::env::args().any(|a| a == "--quick");
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
    for tool in [NGINX, HAPROXY, WRK, "/usr/sbin/conntrack", "/usr/sbin/nft"] {
        ensure!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install nginx-light haproxy wrk conntrack nftables"
        );
    }
    let start = Instant::now();
    let mut topology = ServiceTopology::new("cbsvb", Placement::HostClient, Family::V4, ENDPOINTS)?;
    // A connect that gave up (after TIMEOUT) leaves a SYN_SENT translation that conntrack
    // keeps 120 s by default: a later connect that draws the same source port follows it to
    // the same (dead) endpoint, without a NEW event, so the per-endpoint counts would miss
    // it (a few in 400 did). Kept just longer than the clients wait instead.
    topology
        .nat_ns()
        .run(|| {
            std::fs::write(
                "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_syn_sent",
                SYN_SENT_TIMEOUT.as_secs().to_string(),
            )
        })?
        .context("setting conntrack's SYN_SENT timeout in the client's namespace")?;
    let mut json = Vec::new();
    let cells = partial_outage(&bin, &topology)?;
    print_partial_outage(&topology, &cells, &mut json);
    topology.set_modes(&[Serving; ENDPOINTS])?;
    let healthy = healthy_path(&bin, &mut topology, &params)?;
    print_healthy_path(&healthy, &params, &mut json);
    println!("\nservices bench: {:.0} s", start.elapsed().as_secs_f64());

    let out = std::env::var("CIRCUIT_BENCH_JSON")
        .unwrap_or_else(|_| "target/bench/services.json".to_owned());
    if let Some(dir) = Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lines: Vec<String> = json.iter().map(Value::to_string).collect();
    std::fs::write(&out, format!("[{}]\n", lines.join(",\n")))
        .with_context(|| format!("writing {out}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The agent

/// A running `circuit-agent attach` in the client's namespace with the default
/// configuration, confined to the topology's CIDRs, with its own pins, socket and config
/// file. Fields drop in order: the agent is stopped, then its pins and files are removed.
struct Agent {
    process: Option<ChildProcess>,
    pins: RemoveOnDrop,
    scratch: RemoveOnDrop,
    bin: PathBuf,
}

impl Agent {
    fn start(bin: &Path, topology: &ServiceTopology) -> Result<Agent> {
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbsvb")));
        let scratch = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbsvb")));
        std::fs::create_dir_all(&scratch.0)?;
        let config = scratch.0.join("circuit.toml");
        std::fs::write(&config, agent_config(&topology.cidrs()))?;
        let mut cmd = topology.client_command(bin)?;
        cmd.arg("attach")
            .arg("--config")
            .arg(&config)
            .arg("--pin-dir")
            .arg(&pins.0)
            .arg("--socket")
            .arg(scratch.0.join("agent.sock"))
            .args(["--iface", &topology.client_if])
            // Transitions are logged at info; debug would log every outcome.
            .env("RUST_LOG", "circuit_agent=info");
        let process = ChildProcess::spawn_silent("agent", cmd)?;
        process.wait_for_line("circuit-agent ready", AGENT_START)?;
        Ok(Agent {
            process: Some(process),
            pins,
            scratch,
            bin: bin.to_owned(),
        })
    }

    /// `circuit-agent status -o json` of this agent.
    fn status(&self) -> Result<Value> {
        let out = Command::new(&self.bin)
            .args(["status", "-o", "json", "--pin-dir"])
            .arg(&self.pins.0)
            .arg("--socket")
            .arg(self.scratch.0.join("agent.sock"))
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "circuit-agent status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// What the agent holds at the end of a run for the topology's upstreams (the VIP and
    /// the endpoints): breakers not CLOSED, clients held.
    fn summary(&self, topology: &ServiceTopology) -> String {
        let ours: Vec<String> = std::iter::once(topology.vip)
            .chain(topology.endpoints.iter().copied())
            .map(|a| a.to_string())
            .collect();
        let ours = |v: &Value| {
            v["upstream"]
                .as_str()
                .is_some_and(|u| ours.iter().any(|o| o == u))
        };
        let status = match self.status() {
            Ok(status) => status,
            Err(err) => return format!("status failed: {err:#}"),
        };
        let mut parts: Vec<String> = status["breakers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| ours(b) && b["state"].as_str() != Some("CLOSED"))
            .map(|b| {
                format!(
                    "{} {}",
                    b["upstream"].as_str().unwrap_or("?"),
                    b["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        parts.extend(
            status["client_holds"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| ours(h))
                .map(|h| {
                    format!(
                        "{} held for one client",
                        h["upstream"].as_str().unwrap_or("?")
                    )
                }),
        );
        if parts.is_empty() {
            "every breaker of the VIP and the endpoints CLOSED, no client held".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// SIGTERM, and a clean exit within 10 s.
    fn stop(mut self) -> Result<()> {
        let mut process = self.process.take().expect("running");
        process.signal(Signal::SIGTERM)?;
        let status = process.wait(Duration::from_secs(10))?;
        ensure!(status.success(), "the agent exited with {status}");
        Ok(())
    }
}

/// The default configuration (every field of deploy/config/circuit.toml at its default),
/// but for two overrides that leave every upstream outside `cidrs` alone (as the end-to-end
/// tests' `isolated_config` does: another agent's failures are none of this bench's
/// business) and the panic guard off.
fn agent_config(cidrs: &[String]) -> String {
    let own: Vec<String> = cidrs
        .iter()
        .map(|c| format!("{{ cidr = \"{c}\" }}"))
        .collect();
    format!(
        "[[overrides]]\nupstreams = [{{ cidr = \"0.0.0.0/0\" }}, {{ cidr = \"::/0\" }}]\npolicy = {{ mode = \"disabled\" }}\n\n\
         [[overrides]]\nupstreams = [{}]\npolicy = {{ mode = \"enforce\" }}\n\n\
         [guard]\nenabled = false\n",
        own.join(", ")
    )
}

// ---------------------------------------------------------------------------------------
// HAProxy

/// HAProxy in the client's namespace, in the foreground, with its config and stats socket
/// in a directory of its own.
struct HaProxy {
    process: ChildProcess,
    dir: RemoveOnDrop,
    frontend: SocketAddr,
}

impl HaProxy {
    fn start(topology: &ServiceTopology) -> Result<HaProxy> {
        let dir = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbsvbh")));
        std::fs::create_dir_all(&dir.0)?;
        let frontend = SocketAddr::from((Ipv4Addr::LOCALHOST, HAPROXY_PORT));
        let servers: String = topology
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| format!("    server ep{i} {e}\n"))
            .collect();
        let config = format!(
            "global\n\
             \x20   nbthread 1\n\
             \x20   maxconn 4096\n\
             \x20   stats socket {socket} mode 600 level admin\n\
             \n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 1s\n\
             \x20   timeout check 1s\n\
             \x20   timeout client 5s\n\
             \x20   timeout server 5s\n\
             \x20   retries 2\n\
             \x20   option redispatch\n\
             \n\
             frontend service\n\
             \x20   bind {frontend}\n\
             \x20   default_backend endpoints\n\
             \n\
             backend endpoints\n\
             \x20   balance random\n\
             \x20   default-server check inter 1s fall 3 rise 2 observe layer4 error-limit 3 on-error mark-down\n\
             {servers}",
            socket = dir.0.join("stats.sock").display(),
        );
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, &config)?;
        let check = Command::new(HAPROXY)
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()?;
        ensure!(
            check.status.success(),
            "haproxy -c rejected its config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = topology.client_command(HAPROXY)?;
        cmd.arg("-db").arg("-f").arg(&path);
        let process = ChildProcess::spawn_silent("haproxy", cmd)?;
        wait_listening(&process, frontend)?;
        let haproxy = HaProxy {
            process,
            dir,
            frontend,
        };
        // HAProxy starts its servers UP at the lowest health (one failed check takes them
        // down); a running HAProxy has them at full health ("UP"), after `rise` checks.
        wait_until(
            "HAProxy's servers at full health",
            PROCESS_START,
            Duration::from_millis(100),
            || {
                let servers = haproxy.servers().ok()?;
                (servers.len() == topology.endpoints.len()
                    && servers.iter().all(|(_, status)| status == "UP"))
                .then_some(())
            },
        )
        .with_context(|| haproxy.summary())?;
        Ok(haproxy)
    }

    /// `show stat` on the stats socket: a header and a map from column name to value for
    /// every proxy and server line.
    fn show_stat(&self) -> Result<Vec<std::collections::HashMap<String, String>>> {
        let mut socket = UnixStream::connect(self.dir.0.join("stats.sock"))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.write_all(b"show stat\n")?;
        let mut csv = String::new();
        socket.read_to_string(&mut csv)?;
        let mut lines = csv.lines();
        let header: Vec<String> = lines
            .next()
            .context("empty show stat")?
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_owned)
            .collect();
        Ok(lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                header
                    .iter()
                    .cloned()
                    .zip(l.split(',').map(str::to_owned))
                    .collect()
            })
            .collect())
    }

    /// Each server's name and status ("UP", "UP 1/3" going down, "DOWN", ...).
    fn servers(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .show_stat()?
            .into_iter()
            .filter(|row| row.get("svname").is_some_and(|s| s.starts_with("ep")))
            .map(|row| (row["svname"].clone(), row["status"].clone()))
            .collect())
    }

    /// Per server: status, retries, redispatches, connection errors (`show stat`).
    fn summary(&self) -> String {
        match self.stats() {
            Ok(summary) => summary,
            Err(err) => format!("show stat failed: {err:#}"),
        }
    }

    fn stats(&self) -> Result<String> {
        let rows = self.show_stat()?;
        let mut parts = Vec::new();
        for row in &rows {
            let field = |name: &str| row.get(name).map_or("?", String::as_str);
            if field("svname").starts_with("ep") {
                parts.push(format!("{} {}", field("svname"), field("status")));
            } else if field("svname") == "BACKEND" {
                parts.push(format!(
                    "connect errors {}, retries {}, redispatches {}",
                    field("econ"),
                    field("wretr"),
                    field("wredis")
                ));
            }
        }
        Ok(parts.join(", "))
    }

    fn stop(self) -> Result<()> {
        let HaProxy { mut process, .. } = self;
        process.signal(Signal::SIGTERM)?;
        process.wait(Duration::from_secs(10))?;
        Ok(())
    }
}

/// Waits until `process` (in whatever namespace) has a TCP socket listening on `addr`:
/// /proc/PID/net/tcp{,6} lists the sockets of the process's namespace. No connection is
/// made, so nothing is counted by the server or an agent.
fn wait_listening(process: &ChildProcess, addr: SocketAddr) -> Result<()> {
    let (file, local) = match addr.ip() {
        IpAddr::V4(ip) => (
            "tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(ip.octets()),
                addr.port()
            ),
        ),
        IpAddr::V6(ip) => {
            let words: String = ip
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("tcp6", format!("{words}:{:04X}", addr.port()))
        }
    };
    let path = format!("/proc/{}/net/{file}", process.pid());
    wait_until(
        &format!("a listener on {addr}"),
        PROCESS_START,
        Duration::from_millis(20),
        || {
            let table = std::fs::read_to_string(&path).ok()?;
            table
                .lines()
                .any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // State 0A: LISTEN.
                    f.len() > 3 && f[1] == local && f[3] == "0A"
                })
                .then_some(())
        },
    )
    .with_context(|| format!("output so far:\n{}", process.lines().join("\n")))
}

// ---------------------------------------------------------------------------------------
// 1. Partial outage

/// One cell of the partial-outage table.
struct Cell {
    case: &'static str,
    modes: [EndpointMode; ENDPOINTS],
    variant: Variant,
    ok: usize,
    /// Refused, reset, closed without an answer, any other error.
    failed: usize,
    timeouts: usize,
    elapsed: Duration,
    /// Successful requests whose getpeername() was not the address connected to.
    peer_changed: usize,
    /// New connections that reached each endpoint (conntrack), for the VIP variants.
    reached: Option<Vec<u64>>,
    /// What the breaker (agent or HAProxy) held at the end.
    note: Option<String>,
}

impl Cell {
    fn failures(&self) -> usize {
        self.failed + self.timeouts
    }

    /// Connections that reached each dead endpoint: `(endpoint, mode, count)`.
    fn dead(&self) -> Vec<(usize, EndpointMode, u64)> {
        let Some(reached) = &self.reached else {
            return Vec::new();
        };
        self.modes
            .iter()
            .enumerate()
            .filter(|(_, m)| **m != Serving)
            .map(|(i, m)| (i, *m, reached[i]))
            .collect()
    }

    /// Failed requests that reached no endpoint (rejected before a packet left).
    fn failed_unsent(&self) -> Option<u64> {
        self.reached.as_ref()?;
        let at_dead: u64 = self.dead().iter().map(|(_, _, n)| n).sum();
        Some((self.failures() as u64).saturating_sub(at_dead))
    }
}

fn partial_outage(bin: &Path, topology: &ServiceTopology) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    for (case, modes) in CASES {
        topology.set_modes(&modes)?;
        for variant in VARIANTS {
            eprintln!("services bench: {case}, {}", variant.name());
            cells.push(run_cell(bin, topology, case, modes, variant)?);
        }
    }
    Ok(cells)
}

fn run_cell(
    bin: &Path,
    topology: &ServiceTopology,
    case: &'static str,
    modes: [EndpointMode; ENDPOINTS],
    variant: Variant,
) -> Result<Cell> {
    let mut cell = Cell {
        case,
        modes,
        variant,
        ok: 0,
        failed: 0,
        timeouts: 0,
        elapsed: Duration::ZERO,
        peer_changed: 0,
        reached: None,
        note: None,
    };
    // Every run starts healthy, with no translation left from an earlier run.
    topology.set_modes(&[Serving; ENDPOINTS])?;
    topology.flush_conntrack()?;
    let (agent, haproxy) = match variant {
        Variant::NoBreaker => (None, None),
        Variant::Circuit => (Some(Agent::start(bin, topology)?), None),
        Variant::HaProxy => (None, Some(HaProxy::start(topology)?)),
    };
    let target = haproxy.as_ref().map_or(topology.vip, |h| h.frontend);
    // The breaker has seen the endpoints healthy before the outage begins.
    for _ in 0..WARMUP {
        let outcome = topology.request_to(target, TIMEOUT)?;
        ensure!(
            outcome.result == RequestResult::Ok,
            "{case}, {}: a warm-up request, before the outage, gave {outcome:?}",
            variant.name()
        );
    }
    topology.set_modes(&modes)?;
    let mut watch = match variant {
        Variant::HaProxy => None,
        _ => Some(topology.watch_connections()?),
    };
    run_requests(topology, target, &mut cell)?;
    if let Some(watch) = &mut watch {
        cell.reached = Some(watch.per_endpoint()?);
    }
    if let Some(agent) = agent {
        cell.note = Some(agent.summary(topology));
        agent.stop()?;
    }
    if let Some(haproxy) = haproxy {
        cell.note = Some(haproxy.summary());
        haproxy.stop()?;
    }
    Ok(cell)
}

/// REQUESTS sequential requests to `to`, counted into `cell`.
fn run_requests(topology: &ServiceTopology, to: SocketAddr, cell: &mut Cell) -> Result<()> {
    let start = Instant::now();
    for _ in 0..REQUESTS {
        let RequestOutcome { result, peer, .. } = topology.request_to(to, TIMEOUT)?;
        match result {
            RequestResult::Ok => {
                cell.ok += 1;
                if peer != Some(to) {
                    cell.peer_changed += 1;
                }
            }
            RequestResult::TimedOut => cell.timeouts += 1,
            RequestResult::Refused
            | RequestResult::Reset
            | RequestResult::Closed
            | RequestResult::Other(_) => cell.failed += 1,
        }
    }
    cell.elapsed = start.elapsed();
    Ok(())
}

fn cell<'a>(cells: &'a [Cell], case: &str, variant: Variant) -> &'a Cell {
    cells
        .iter()
        .find(|c| c.case == case && c.variant == variant)
        .expect("every case ran every variant")
}

fn mode_name(mode: EndpointMode) -> &'static str {
    match mode {
        Serving => "serving",
        Refusing => "refusing",
        BlackHoled => "black-holed",
    }
}

fn print_partial_outage(topology: &ServiceTopology, cells: &[Cell], json: &mut Vec<Value>) {
    println!(
        "### Partial outage: {REQUESTS} sequential requests per cell (connect + read, {} s timeout), {ENDPOINTS} endpoints behind a VIP (kube-proxy nftables DNAT, random)\n",
        TIMEOUT.as_secs()
    );
    println!(
        "each cell: ok / refused or failed / timed out, of {REQUESTS} (time the {REQUESTS} took)\n"
    );
    let header: Vec<&str> = VARIANTS.iter().map(|v| v.name()).collect();
    println!("| case | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(VARIANTS.len()));
    for (case, _) in CASES {
        let row: Vec<String> = VARIANTS
            .iter()
            .map(|v| {
                let c = cell(cells, case, *v);
                format!(
                    "{} / {} / {} ({:.2} s)",
                    c.ok,
                    c.failed,
                    c.timeouts,
                    c.elapsed.as_secs_f64()
                )
            })
            .collect();
        println!("| {case} | {} |", row.join(" | "));
    }

    println!(
        "\nFailures per dead endpoint: connections that reached each dead endpoint (conntrack NEW events in the client's namespace; each is a failed request), and failed requests that reached no endpoint (rejected before a packet left)\n"
    );
    println!("| case | no breaker | circuit | circuit: failed without reaching an endpoint |");
    println!("|---|---|---|---:|");
    for (case, _) in CASES {
        let per_dead = |c: &Cell| {
            c.dead()
                .iter()
                .map(|(i, m, n)| format!("ep{i} ({}) {n}", mode_name(*m)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (none, circuit) = (
            cell(cells, case, Variant::NoBreaker),
            cell(cells, case, Variant::Circuit),
        );
        println!(
            "| {case} | {} | {} | {} |",
            per_dead(none),
            per_dead(circuit),
            circuit.failed_unsent().unwrap_or(0)
        );
    }

    println!("\nAt the end of each run:\n");
    for c in cells.iter().filter(|c| c.note.is_some()) {
        println!(
            "- {}, {}: {}",
            c.case,
            c.variant.name(),
            c.note.as_deref().unwrap_or_default()
        );
    }
    let changed: Vec<String> = cells
        .iter()
        .filter(|c| c.peer_changed > 0)
        .map(|c| format!("{}, {}: {}", c.case, c.variant.name(), c.peer_changed))
        .collect();
    println!(
        "- successful requests whose getpeername() was not the address connected to (the VIP or HAProxy): {}",
        if changed.is_empty() {
            "none".to_owned()
        } else {
            changed.join("; ")
        }
    );

    // Goals: reported, not asserted. Each: its name and, per case, (met, the figures).
    let slack = REQUESTS / 100;
    let per_case = |check: &dyn Fn(&str) -> (bool, String)| -> Vec<(bool, String)> {
        CASES.iter().map(|(case, _)| check(case)).collect()
    };
    let goals = [
        (
            format!("circuit ok ≥ HAProxy ok − {slack} (1 % of the requests)"),
            per_case(&|case| {
                let (c, h) = (
                    cell(cells, case, Variant::Circuit).ok,
                    cell(cells, case, Variant::HaProxy).ok,
                );
                (c + slack >= h, format!("{c} vs {h}"))
            }),
        ),
        (
            "circuit ok ≥ no breaker ok".to_owned(),
            per_case(&|case| {
                let (c, n) = (
                    cell(cells, case, Variant::Circuit).ok,
                    cell(cells, case, Variant::NoBreaker).ok,
                );
                (c >= n, format!("{c} vs {n}"))
            }),
        ),
        (
            format!(
                "circuit: failures per dead endpoint ≤ failure_threshold ({DEFAULT_FAILURE_THRESHOLD})"
            ),
            per_case(&|case| {
                let worst = cell(cells, case, Variant::Circuit)
                    .dead()
                    .iter()
                    .map(|(_, _, n)| *n)
                    .max()
                    .unwrap_or(0);
                (worst <= DEFAULT_FAILURE_THRESHOLD, format!("worst {worst}"))
            }),
        ),
    ];
    println!("\nGoals (reported, not asserted):\n");
    let cases: Vec<&str> = CASES.iter().map(|(c, _)| *c).collect();
    println!("| goal | {} | overall |", cases.join(" | "));
    println!("|---|{}---|", "---|".repeat(cases.len()));
    for (goal, results) in &goals {
        let all = results.iter().all(|(met, _)| *met);
        let shown: Vec<String> = results
            .iter()
            .map(|(met, what)| format!("{} ({what})", if *met { "met" } else { "MISSED" }))
            .collect();
        println!(
            "| {goal} | {} | goal {} |",
            shown.join(" | "),
            if all { "met" } else { "missed" }
        );
        for (case, (met, what)) in cases.iter().zip(results) {
            json.push(json!({
                "group": "services",
                "table": "goals",
                "goal": goal,
                "case": case,
                "met": met,
                "figures": what,
            }));
        }
    }

    for c in cells {
        json.push(json!({
            "group": "services",
            "table": "partial outage",
            "topology": format!("{:?}, {:?}, {ENDPOINTS} endpoints", topology.placement, topology.family),
            "case": c.case,
            "modes": c.modes.iter().map(|m| mode_name(*m)).collect::<Vec<_>>(),
            "variant": c.variant.name(),
            "requests": REQUESTS,
            "timeout_s": TIMEOUT.as_secs_f64(),
            "ok": c.ok,
            "refused_or_failed": c.failed,
            "timeouts": c.timeouts,
            "seconds": (c.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "peer_changed": c.peer_changed,
            "connections_per_endpoint": c.reached,
            "failures_per_dead_endpoint": c.dead().iter().map(|(i, m, n)| json!({
                "endpoint": i, "mode": mode_name(*m), "failures": n,
            })).collect::<Vec<_>>(),
            "failed_without_reaching_an_endpoint": c.failed_unsent(),
            "note": c.note,
        }));
    }
}

// ---------------------------------------------------------------------------------------
// 2. Healthy path cost

/// nginx on one endpoint address, in the endpoints' namespace, from a prefix of its own.
struct Nginx {
    _process: ChildProcess,
    _prefix: RemoveOnDrop,
}

impl Nginx {
    fn start(topology: &ServiceTopology, addr: SocketAddr) -> Result<Nginx> {
        let prefix = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbsvbn")));
        std::fs::create_dir_all(&prefix.0)?;
        let p = prefix.0.display();
        let config = format!(
            "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {p}/nginx.pid;\n\
             error_log stderr warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {p}/body;\n\
             \x20   proxy_temp_path {p}/proxy;\n\
             \x20   fastcgi_temp_path {p}/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/uwsgi;\n\
             \x20   scgi_temp_path {p}/scgi;\n\
             \x20   server {{\n\
             \x20       listen {addr};\n\
             \x20       location / {{ return 200 \"ok\"; }}\n\
             \x20   }}\n\
             }}\n"
        );
        let path = prefix.0.join("nginx.conf");
        std::fs::write(&path, config)?;
        let mut cmd = topology.endpoints_ns.command(NGINX)?;
        cmd.arg("-p")
            .arg(&prefix.0)
            .arg("-c")
            .arg(&path)
            .args(["-e", "stderr"]);
        let process = ChildProcess::spawn_silent("nginx", cmd)?;
        wait_listening(&process, addr)?;
        Ok(Nginx {
            _process: process,
            _prefix: prefix,
        })
    }
}

/// One wrk run: requests/s and the machine's CPU time per request.
struct WrkRun {
    requests: u64,
    rps: f64,
    cpu_us_per_request: f64,
    errors: String,
}

struct Healthy {
    without: Vec<WrkRun>,
    with: Vec<WrkRun>,
}

fn healthy_path(bin: &Path, topology: &mut ServiceTopology, p: &Params) -> Result<Healthy> {
    eprintln!("services bench: healthy path");
    topology.stop_servers();
    let _nginx = topology
        .endpoints
        .clone()
        .into_iter()
        .map(|addr| Nginx::start(topology, addr))
        .collect::<Result<Vec<_>>>()?;
    // Warm-up, not measured.
    wrk(topology, Duration::from_secs(1))?;
    let mut healthy = Healthy {
        without: Vec::new(),
        with: Vec::new(),
    };
    for rep in 0..p.reps {
        eprintln!(
            "services bench: healthy path, run {} of {}",
            rep + 1,
            p.reps
        );
        healthy.without.push(wrk(topology, p.wrk)?);
        let agent = Agent::start(bin, topology)?;
        // Let the agent's start-up work settle before measuring.
        thread::sleep(Duration::from_secs(1));
        let run = wrk(topology, p.wrk);
        agent.stop()?;
        healthy.with.push(run?);
    }
    Ok(healthy)
}

/// user + nice + system + irq + softirq of every CPU, from /proc/stat.
fn machine_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;
    ensure!(f.len() >= 7, "short cpu line: {line}");
    // user nice system idle iowait irq softirq ...
    let ticks = f[0] + f[1] + f[2] + f[5] + f[6];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz))
}

fn wrk(topology: &ServiceTopology, duration: Duration) -> Result<WrkRun> {
    // A fresh conntrack table for each run, so runs do not pile up each other's entries.
    let _ = topology
        .client_command("conntrack")?
        .arg("-F")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let url = format!("http://{}/", topology.vip);
    let mut cmd = topology.client_command(WRK)?;
    cmd.args(["-t1", "-c16", "-d"])
        .arg(format!("{}s", duration.as_secs()))
        .args(["-H", "Connection: close", &url])
        .stdin(Stdio::null());
    let before = machine_cpu()?;
    let out = cmd.output().context("running wrk")?;
    let cpu = machine_cpu()? - before;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let requests: u64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Socket errors") || l.starts_with("Non-2xx"))
        .collect();
    ensure!(requests > 0, "wrk made no request:\n{text}");
    Ok(WrkRun {
        requests,
        rps,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests as f64,
        errors: errors.join("; "),
    })
}

/// The median; the mean of the middle two for an even count.
fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn print_healthy_path(h: &Healthy, p: &Params, json: &mut Vec<Value>) {
    let what = format!(
        "wrk -t1 -c16 -d{}s -H \"Connection: close\" to the VIP, nginx `return 200` on each endpoint, median of {} alternating runs",
        p.wrk.as_secs(),
        p.reps
    );
    println!("\n### Healthy path cost: {what}\n");
    let rps = |runs: &[WrkRun]| median(&runs.iter().map(|r| r.rps).collect::<Vec<_>>());
    let cpu = |runs: &[WrkRun]| {
        median(
            &runs
                .iter()
                .map(|r| r.cpu_us_per_request)
                .collect::<Vec<_>>(),
        )
    };
    let (rps0, rps1, cpu0, cpu1) = (rps(&h.without), rps(&h.with), cpu(&h.without), cpu(&h.with));
    println!("| variant | requests/s | CPU per request (µs, whole machine) |");
    println!("|---|---:|---:|");
    println!("| without agent | {rps0:.0} | {cpu0:.1} |");
    println!("| with agent (default config) | {rps1:.0} | {cpu1:.1} |");
    println!(
        "| ratio with ÷ without | {:.3}× | {:.3}× |",
        rps1 / rps0,
        cpu1 / cpu0
    );
    let runs = |runs: &[WrkRun]| {
        runs.iter()
            .map(|r| {
                let errors = if r.errors.is_empty() {
                    String::new()
                } else {
                    format!(", {}", r.errors)
                };
                format!(
                    "{:.0}/s {:.1} µs ({} requests{errors})",
                    r.rps, r.cpu_us_per_request, r.requests
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    println!("\nruns without: {}", runs(&h.without));
    println!("runs with: {}", runs(&h.with));

    for (name, value, baseline, unit) in [
        (
            format!("healthy path: requests/s with the agent ({what})"),
            rps1,
            rps0,
            "requests/s",
        ),
        (
            format!("healthy path: CPU per request with the agent, whole machine ({what})"),
            cpu1,
            cpu0,
            "µs/request",
        ),
    ] {
        json.push(json!({
            "group": "services",
            "table": "healthy path",
            "name": name,
            "value": (value * 10.0).round() / 10.0,
            "unit": unit,
            "baseline": (baseline * 10.0).round() / 10.0,
            "baseline_name": "without the agent",
            "baseline_source": "same run",
            "ratio": value / baseline,
            "target": null,
            "runs_without": h.without.iter().map(|r| json!({"rps": r.rps, "cpu_us_per_request": r.cpu_us_per_request, "requests": r.requests, "errors": r.errors})).collect::<Vec<_>>(),
            "runs_with": h.with.iter().map(|r| json!({"rps": r.rps, "cpu_us_per_request": r.cpu_us_per_request, "requests": r.requests, "errors": r.errors})).collect::<Vec<_>>(),
        }));
    }
}
