//! `cargo xtask demo`: a breaker trips and heals in a sandbox of two network namespaces.
//!
//! client ns ──veth──► upstream ns: a TCP upstream on :8080 and the agent, with XDP on the
//! upstream's veth. The upstream is healthy, then refuses, then heals; the client connects
//! every 100 ms and the demo narrates what the client sees and what the breaker does.
//! Everything it makes (namespaces, veth, pins, processes) is removed on exit, Ctrl-C or error.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use circuit_tests::{
    Attempt, ChildProcess, Client, ConnectResult, NAME_PREFIX, RemoveOnDrop, Sandbox, Upstream,
    unique_name,
};

const PORT: u16 = 8080;
const FAILURE_THRESHOLD: u32 = 3;
const OPEN_DURATION: Duration = Duration::from_secs(5);
const CONNECT_EVERY: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    circuit_tests::require_root()?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;

    let sandbox = Sandbox::new(&format!("{NAME_PREFIX}demo"))?;
    let upstream_addr = SocketAddr::new(sandbox.upstream_addr.into(), PORT);
    let pin_dir = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("circuit-demo-")));
    println!(
        "sandbox: client {} in netns {}  ──veth──►  upstream {upstream_addr} in netns {}",
        sandbox.client_addr,
        sandbox.client.name(),
        sandbox.upstream.name()
    );

    let mut upstream = Upstream::start(&sandbox.upstream, upstream_addr)?;
    // The demo has one client: its word is enough to isolate the upstream for everyone. By
    // default (min_witnesses = 2) one client alone is only failed fast on its own, by the
    // cgroup hook, which this XDP-only demo does not attach.
    let scratch = RemoveOnDrop(std::env::temp_dir().join(unique_name("circuit-demo-")));
    std::fs::create_dir_all(&scratch.0).context("cannot create the demo's config directory")?;
    let config = scratch.0.join("circuit.toml");
    std::fs::write(&config, "[defaults]\nmin_witnesses = 1\n")
        .context("cannot write the demo's config")?;
    let mut cmd = sandbox.upstream.command(agent_bin)?;
    cmd.args([
        "attach",
        "--enforce",
        "xdp",
        "--iface",
        &sandbox.upstream_if,
        "--pin-dir",
    ])
    .arg(&pin_dir.0)
    .arg("--config")
    .arg(&config)
    .args([
        "--failure-threshold",
        &FAILURE_THRESHOLD.to_string(),
        "--open-duration",
        &format!("{}s", OPEN_DURATION.as_secs()),
        "--lease",
        "10s",
    ]);
    let agent = ChildProcess::spawn_silent("agent", cmd)?;
    agent.wait_for_line("circuit-agent ready", Duration::from_secs(20))?;
    println!(
        "agent: attached XDP on {} (breaker opens after {FAILURE_THRESHOLD} consecutive failures, stays open {}s; one client's failures are enough here: min_witnesses = 1)\n",
        sandbox.upstream_if,
        OPEN_DURATION.as_secs()
    );

    let client = Client::new(&sandbox.client)?;
    let mut demo = Narrator {
        client,
        agent,
        upstream: upstream_addr,
        start: Instant::now(),
        transitions_seen: 0,
        interrupted,
    };

    println!("── phase 1: upstream healthy");
    demo.connect_for(Duration::from_secs(1))?;

    println!(
        "\n── phase 2: upstream refuses connections (listener closed: the kernel answers RST)"
    );
    upstream.set_healthy(false)?;
    demo.connect_until_transition("to=OPEN", Duration::from_secs(10))?;

    println!("\n── phase 3: upstream healthy again, but the breaker is OPEN: XDP answers the SYNs");
    upstream.set_healthy(true)?;
    let open =
        demo.connect_until_transition("to=HALF_OPEN", OPEN_DURATION + Duration::from_secs(5))?;
    let fast: Vec<Duration> = open
        .iter()
        .filter(|a| a.result == ConnectResult::Refused)
        .map(|a| a.elapsed)
        .collect();

    println!("\n── phase 4: HALF_OPEN admits one probe; it succeeds and the breaker closes");
    demo.connect_until_transition("to=CLOSED", Duration::from_secs(10))?;
    demo.connect_for(Duration::from_millis(500))?;

    println!("\nsummary:");
    if let Some(p50) = percentile(&fast, 50) {
        println!(
            "  while OPEN, {} connects failed with ECONNREFUSED in p50 {} µs / max {} µs, though the upstream was up",
            fast.len(),
            p50.as_micros(),
            fast.iter().max().unwrap_or(&p50).as_micros()
        );
    }
    println!(
        "  upstream accepted {} connections in total",
        upstream.accepted()
    );
    println!("  cleaning up: agent, namespaces, veth and pins");
    Ok(())
}

struct Narrator {
    client: Client,
    agent: ChildProcess,
    upstream: SocketAddr,
    start: Instant,
    transitions_seen: usize,
    interrupted: Arc<AtomicBool>,
}

impl Narrator {
    fn attempt(&mut self) -> anyhow::Result<Attempt> {
        if self.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let attempt = self.client.connect(self.upstream, CONNECT_TIMEOUT)?;
        let result = match attempt.result {
            ConnectResult::Connected => "connected".to_owned(),
            ConnectResult::Refused => "ECONNREFUSED".to_owned(),
            ConnectResult::TimedOut => "timed out".to_owned(),
            ConnectResult::Other(errno) => format!("errno {errno}"),
        };
        println!(
            "  +{:>6.2}s  client connect → {result:<12} in {:>6} µs",
            self.start.elapsed().as_secs_f64(),
            attempt.elapsed.as_micros()
        );
        std::thread::sleep(CONNECT_EVERY);
        Ok(attempt)
    }

    /// Prints our upstream's transitions logged since the last call (the agent sees every
    /// connection on the machine, not only the demo's); true if one matched `wanted`.
    fn show_transitions(&mut self, wanted: &str) -> bool {
        let ours = format!("upstream={}", self.upstream);
        let lines: Vec<String> = self
            .agent
            .lines()
            .into_iter()
            .filter(|l| l.contains("breaker transition") && l.contains(&ours))
            .collect();
        let mut matched = false;
        for line in &lines[self.transitions_seen..] {
            let fields = line
                .split_once("breaker transition")
                .map_or(line.as_str(), |(_, rest)| rest.trim());
            println!(
                "  +{:>6.2}s  BREAKER  {fields}",
                self.start.elapsed().as_secs_f64()
            );
            matched |= line.contains(wanted);
        }
        self.transitions_seen = lines.len();
        matched
    }

    fn connect_for(&mut self, how_long: Duration) -> anyhow::Result<Vec<Attempt>> {
        let until = Instant::now() + how_long;
        let mut attempts = Vec::new();
        while Instant::now() < until {
            attempts.push(self.attempt()?);
            self.show_transitions("");
        }
        Ok(attempts)
    }

    fn connect_until_transition(
        &mut self,
        wanted: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Attempt>> {
        let until = Instant::now() + timeout;
        let mut attempts = Vec::new();
        loop {
            attempts.push(self.attempt()?);
            if self.show_transitions(wanted) {
                return Ok(attempts);
            }
            if Instant::now() > until {
                bail!("the breaker did not go {wanted} within {timeout:?}");
            }
        }
    }
}

fn percentile(samples: &[Duration], p: usize) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted
        .get((sorted.len().saturating_sub(1)) * p / 100)
        .copied()
}
