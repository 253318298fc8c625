//! A running agent in a two-namespace sandbox, shared by the end-to-end tests.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod node;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use circuit_agent::kernel::{Stats, UpstreamCounts, VerdictTable};
pub use circuit_agent::surfaces::control::Event;
use circuit_common::{ConnectOutcome, Stat, VerdictState};
use circuit_tests::{
    Attempt, ChildProcess, Client, ConnectResult, NetNs, RemoveOnDrop, Sandbox, Upstream,
    agent_binary, require_root, unique_name,
};

pub const PORT: u16 = 8080;
pub const THRESHOLD: u32 = 3;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Generous bound for "fails fast": measured in the hundreds of microseconds, while a
/// black-holed connect would take the full CONNECT_TIMEOUT.
const FAST_ON_THE_HOST: Duration = Duration::from_millis(50);

/// What "fails fast" means here: 50 ms, stretched like every wait in a VM under emulation
/// (see [`circuit_tests::wait_scale`]); a connect that waits for a SYN retransmission takes
/// a second or more.
pub fn fast() -> Duration {
    FAST_ON_THE_HOST * circuit_tests::wait_scale()
}
/// An open duration for tests that wait for HALF_OPEN: long enough for a slow machine (a VM
/// under emulation) to check the rejects while OPEN, short enough to wait for.
pub const SHORT_OPEN: &str = "4s";
/// How long after OPEN a test waits for HALF_OPEN with [`SHORT_OPEN`].
pub const HALF_OPEN_WAIT: Duration = Duration::from_secs(15);
const AGENT_START: Duration = Duration::from_secs(30);

/// Where the agent runs and what it enforces with.
#[derive(Clone, Debug)]
pub struct Setup {
    /// `--enforce` value.
    pub enforce: &'static str,
    /// Run the agent in the client's namespace (for TC egress on the client's interface)
    /// instead of the upstream's (for XDP on the upstream's interface).
    pub agent_on_client_side: bool,
    pub ipv6: bool,
    /// Long by default: a breaker that went HALF_OPEN while a slow machine still checks that
    /// it rejects would admit a probe. Tests of HALF_OPEN use [`SHORT_OPEN`].
    pub open_duration: &'static str,
    pub lease: &'static str,
    pub failure_threshold: u32,
    /// Extra TOML appended to the scenario's config file.
    pub config: String,
    /// More `attach` flags.
    pub agent_args: &'static [&'static str],
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            enforce: "xdp",
            agent_on_client_side: false,
            ipv6: false,
            open_duration: "60s",
            lease: "10s",
            failure_threshold: THRESHOLD,
            config: String::new(),
            agent_args: &[],
        }
    }
}

pub struct Scenario {
    // Field order is drop order: the event follower and the agent first, then sockets,
    // then pins, then namespaces.
    /// `circuit-agent events --follow -o json` on the running agent's socket.
    pub events: Option<ChildProcess>,
    pub agent: Option<ChildProcess>,
    pub client: Client,
    pub upstream: Upstream,
    pub target: SocketAddr,
    pub pins: RemoveOnDrop,
    /// Holds the config file (`config_path`).
    pub scratch: RemoveOnDrop,
    pub sandbox: Sandbox,
    setup: Setup,
}

impl Scenario {
    pub fn start(setup: Setup) -> Self {
        require_root().unwrap();
        let sandbox = Sandbox::new("cbe2e").unwrap();
        let ip: IpAddr = if setup.ipv6 {
            sandbox.upstream_addr6.into()
        } else {
            sandbox.upstream_addr.into()
        };
        let target = SocketAddr::new(ip, PORT);
        let upstream = Upstream::start(&sandbox.upstream, target).unwrap();
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbpin")));
        let client = Client::new(&sandbox.client).unwrap();
        let scratch = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbcfg")));
        std::fs::create_dir_all(&scratch.0).unwrap();
        let mut scenario = Self {
            events: None,
            agent: None,
            client,
            upstream,
            target,
            pins,
            scratch,
            sandbox,
            setup,
        };
        scenario.write_config(&scenario.setup.config.clone());
        scenario.start_agent();
        scenario
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.scratch.0.join("circuit.toml")
    }

    /// (Re)writes the config file: only this sandbox's subnets enforced, on one witness (the
    /// one client these suites drive; the witness rules have suites of their own), and the
    /// panic guard off (see [`isolated_config`]), then `extra`. Written to a temporary name and renamed,
    /// as an operator's tooling would, so the agent never reads half a file.
    pub fn write_config(&self, extra: &str) {
        let v4 = self.sandbox.upstream_addr.octets();
        let v6 = self.sandbox.upstream_addr6.segments();
        let own = [
            format!("{}.{}.{}.0/24", v4[0], v4[1], v4[2]),
            format!("{:x}:{:x}:{:x}:{:x}::/64", v6[0], v6[1], v6[2], v6[3]),
        ];
        let text = format!("{}\n{extra}\n", isolated_config(&own, "min_witnesses = 1"));
        let tmp = self.scratch.0.join("circuit.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// The agent's control socket for this scenario.
    pub fn socket(&self) -> std::path::PathBuf {
        self.scratch.0.join("agent.sock")
    }

    /// Runs the agent binary with `args` (a CLI command) against this scenario's pins.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(agent_binary().unwrap())
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts the agent again, with `--enforce enforce` from now on.
    pub fn restart_enforcing(&mut self, enforce: &'static str) {
        self.setup.enforce = enforce;
        self.start_agent();
    }

    /// Starts (or restarts) the agent with this scenario's pin directory.
    pub fn start_agent(&mut self) {
        let (ns, iface): (&NetNs, &str) = if self.setup.agent_on_client_side {
            (&self.sandbox.client, &self.sandbox.client_if)
        } else {
            (&self.sandbox.upstream, &self.sandbox.upstream_if)
        };
        let mut cmd = ns.command(agent_binary().unwrap()).unwrap();
        cmd.args(["attach", "--enforce", self.setup.enforce, "--iface", iface])
            .arg("--config")
            .arg(self.config_path())
            .arg("--pin-dir")
            .arg(&self.pins.0)
            .arg("--socket")
            .arg(self.socket())
            .args([
                "--open-duration",
                self.setup.open_duration,
                "--lease",
                self.setup.lease,
            ]);
        cmd.args(self.setup.agent_args);
        // 0: leave the threshold to the config file.
        if self.setup.failure_threshold != 0 {
            cmd.args([
                "--failure-threshold",
                &self.setup.failure_threshold.to_string(),
            ]);
        }
        self.events = None;
        self.agent = Some(spawn_agent(cmd));
        self.events = Some(follow_events(&self.socket()));
    }

    /// Stops the agent with `signal` and waits for it; returns its exit status.
    pub fn stop_agent(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        self.events = None;
        let mut agent = self.agent.take().expect("agent running");
        agent.signal(signal).unwrap();
        agent.wait(Duration::from_secs(10)).unwrap()
    }

    pub fn agent(&self) -> &ChildProcess {
        self.agent.as_ref().expect("agent running")
    }

    pub fn connect(&self) -> Attempt {
        self.connect_to(self.target)
    }

    pub fn connect_to(&self, to: SocketAddr) -> Attempt {
        self.client.connect(to, CONNECT_TIMEOUT).unwrap()
    }

    /// Waits for the agent's event stream to carry a transition of our upstream from `from`
    /// to `to` (the first such, also one before the call).
    pub fn transition(&self, from: &str, to: &str, timeout: Duration) -> Event {
        transition(self.events(), self.target, from, to, timeout)
    }

    /// The running agent's event stream (see [`follow_events`]).
    pub fn events(&self) -> &ChildProcess {
        self.events.as_ref().expect("agent running")
    }

    pub fn verdict(&self) -> Option<VerdictState> {
        VerdictTable::open_pinned(&self.pins.0)
            .unwrap()
            .get(self.target)
            .unwrap()
            .map(|v| v.state)
    }

    pub fn stat(&self, stat: Stat) -> u64 {
        Stats::open_pinned(&self.pins.0).unwrap().get(stat).unwrap()
    }

    /// The kernel's count of `outcome` for `upstream`.
    pub fn kernel_count(&self, upstream: SocketAddr, outcome: ConnectOutcome) -> u64 {
        UpstreamCounts::open_pinned(&self.pins.0)
            .unwrap()
            .get(upstream)
            .unwrap()
            .into_iter()
            .find(|(o, _)| *o == outcome)
            .map_or(0, |(_, n)| n)
    }

    /// Makes the upstream refuse until the breaker opens; leaves it refusing.
    pub fn trip(&mut self) {
        assert_eq!(self.connect().result, ConnectResult::Connected);
        self.upstream.set_healthy(false).unwrap();
        for _ in 0..self.setup.failure_threshold {
            assert_eq!(self.connect().result, ConnectResult::Refused);
        }
        let event = self.transition("CLOSED", "OPEN", Duration::from_secs(5));
        assert_eq!(
            event.reason,
            format!(
                "{0} consecutive failures (threshold {0})",
                self.setup.failure_threshold
            ),
        );
        assert_eq!(self.verdict(), Some(VerdictState::Open));
    }

    /// How circuit's rejects look to the client here: a refusal, but from the cgroup hook an
    /// EPERM on kernels before 5.18.
    pub fn rejected(&self) -> ConnectResult {
        rejected_by(self.setup.enforce)
    }

    /// With the upstream healthy again, a refusal can only come from circuit: asserts that
    /// connects fail fast and that no SYN reaches the upstream.
    pub fn assert_rejected_fast(&mut self) {
        let expected = self.rejected();
        assert_rejected_fast(&mut self.upstream, expected, || {
            self.client.connect(self.target, CONNECT_TIMEOUT).unwrap()
        });
    }
}

/// The part of a test agent's configuration that keeps it to its own test: every agent on
/// the machine sees every connection, and cgroup hooks judge every process's connects, so
/// an agent breaks only for its `own` networks (CIDRs) and leaves the rest DISABLED. The
/// panic guard is off, since the failures of tests running in parallel would look like a
/// node-wide outage. `policy` adds fields (inline TOML) to the policy of the own networks.
pub fn isolated_config(own: &[String], policy: &str) -> String {
    let own: Vec<String> = own
        .iter()
        .map(|c| format!("{{ cidr = \"{c}\" }}"))
        .collect();
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!(", {policy}")
    };
    format!(
        "[[overrides]]\nupstreams = [{{ cidr = \"0.0.0.0/0\" }}, {{ cidr = \"::/0\" }}]\npolicy = {{ mode = \"disabled\" }}\n\n\
         [[overrides]]\nupstreams = [{}]\npolicy = {{ mode = \"enforce\"{policy} }}\n\n\
         [guard]\nenabled = false\n",
        own.join(", ")
    )
}

/// Runs the CLI with `args` against the agent of `pins` and `socket`, which must succeed;
/// its stdout.
pub fn agent_cli(pins: &Path, socket: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(agent_binary().unwrap())
        .args(args)
        .arg("--pin-dir")
        .arg(pins)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `cmd` (the agent binary with its `attach` arguments) with debug logs, and waits
/// until it is ready.
pub fn spawn_agent(mut cmd: std::process::Command) -> ChildProcess {
    cmd.env("RUST_LOG", "info,circuit_agent=debug");
    let agent = ChildProcess::spawn("agent", cmd).unwrap();
    agent
        .wait_for_line("circuit-agent ready", AGENT_START)
        .unwrap();
    agent
}

/// Follows a running agent's transitions as an operator would: `circuit-agent events
/// --follow -o json` on its control socket, one JSON [`Event`] a line. The stream replays
/// the transitions the agent remembers before the live ones, so a follower started after a
/// transition still sees it.
pub fn follow_events(socket: &Path) -> ChildProcess {
    let mut cmd = std::process::Command::new(agent_binary().unwrap());
    cmd.args(["events", "--follow", "-o", "json", "--socket"])
        .arg(socket);
    ChildProcess::spawn_silent("events", cmd).unwrap()
}

/// Waits for `events` (a [`follow_events`] stream) to carry the transition of `upstream`
/// from `from` to `to` (the first such, also one before the call) and returns it.
pub fn transition(
    events: &ChildProcess,
    upstream: SocketAddr,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Event {
    nth_transition(events, 1, upstream, from, to, timeout)
}

/// The `n`-th (1-based) transition of `upstream` from `from` to `to` in `events`, waited for.
pub fn nth_transition(
    events: &ChildProcess,
    n: usize,
    upstream: SocketAddr,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Event {
    let needles = event_needles(upstream, from, to);
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let lines = events.wait_for_lines(&needles, n, timeout).unwrap();
    serde_json::from_str(&lines[n - 1]).unwrap()
}

/// The JSON fields that pick a transition out of the event stream (compact serde_json).
fn event_needles(upstream: SocketAddr, from: &str, to: &str) -> [String; 3] {
    [
        format!("\"upstream\":\"{upstream}\""),
        format!("\"from\":\"{from}\""),
        format!("\"to\":\"{to}\""),
    ]
}

/// Makes `upstream` healthy again, so that a refusal can only come from circuit, and asserts
/// that `connect` fails fast three times with no SYN reaching the upstream.
pub fn assert_rejected_fast(
    upstream: &mut Upstream,
    expected: ConnectResult,
    connect: impl Fn() -> Attempt,
) {
    upstream.set_healthy(true).unwrap();
    let accepted_before = upstream.accepted();
    for _ in 0..3 {
        let attempt = connect();
        assert_eq!(attempt.result, expected);
        assert!(
            attempt.elapsed < fast(),
            "rejected in {:?}",
            attempt.elapsed
        );
    }
    assert_eq!(
        upstream.accepted(),
        accepted_before,
        "no SYN reached the upstream"
    );
}

/// How circuit's rejects look to a client on this node when it enforces at `enforce` (a
/// `--enforce` list): the cgroup hook judges a connect before any packet leaves.
pub fn rejected_by(enforce: &str) -> ConnectResult {
    if enforce.split(',').any(|point| point == "cgroup") {
        cgroup_reject()
    } else {
        ConnectResult::Refused
    }
}

/// What a connect rejected by the cgroup hook returns on this kernel: ECONNREFUSED where the
/// hook chooses the errno (`bpf_set_retval`, Linux 5.18), EPERM before.
pub fn cgroup_reject() -> ConnectResult {
    static RESULT: std::sync::OnceLock<ConnectResult> = std::sync::OnceLock::new();
    *RESULT.get_or_init(|| {
        if circuit_agent::kernel::features::has_set_retval() {
            ConnectResult::Refused
        } else {
            ConnectResult::Other(libc::EPERM)
        }
    })
}

/// The entry of `upstream` in a JSON list of the CLI's output (`breakers`, `verdicts`).
pub fn entry_for<'a>(list: &'a serde_json::Value, upstream: &str) -> &'a serde_json::Value {
    list.as_array()
        .expect("a JSON list")
        .iter()
        .find(|e| e["upstream"] == upstream)
        .unwrap_or_else(|| panic!("no entry for {upstream} in {list}"))
}
