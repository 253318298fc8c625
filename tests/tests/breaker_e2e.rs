//! End to end: the real agent binary, real sockets, two network namespaces joined by a veth
//! pair, XDP on the upstream side's veth. Each test makes (and removes) its own sandbox.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use circuit_agent::kernel::VerdictTable;
use circuit_common::VerdictState;
use circuit_tests::{
    ChildProcess, Client, ConnectResult, RemoveOnDrop, Sandbox, Upstream, agent_binary,
    require_root, unique_name,
};

const PORT: u16 = 8080;
const THRESHOLD: u32 = 3;
const OPEN_DURATION: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Generous bound for "fails fast": measured in the hundreds of microseconds, while a
/// black-holed connect would take the full CONNECT_TIMEOUT.
const FAST: Duration = Duration::from_millis(50);
const AGENT_START: Duration = Duration::from_secs(30);

struct Scenario {
    // Field order is drop order: agent first, then sockets, then namespaces and pins.
    agent: ChildProcess,
    client: Client,
    upstream: Upstream,
    target: SocketAddr,
    pins: RemoveOnDrop,
    _sandbox: Sandbox,
}

impl Scenario {
    fn start() -> Self {
        require_root().unwrap();
        let sandbox = Sandbox::new("cbe2e").unwrap();
        let target = SocketAddr::new(sandbox.upstream_addr.into(), PORT);
        let upstream = Upstream::start(&sandbox.upstream, target).unwrap();
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbpin")));
        let mut cmd = sandbox.upstream.command(agent_binary().unwrap()).unwrap();
        cmd.args([
            "attach",
            "--enforce",
            "xdp",
            "--iface",
            &sandbox.upstream_if,
        ])
        .arg("--pin-dir")
        .arg(&pins.0)
        .args([
            "--failure-threshold",
            &THRESHOLD.to_string(),
            "--open-duration",
            "2s",
            "--lease",
            "10s",
        ]);
        let agent = ChildProcess::spawn("agent", cmd).unwrap();
        let ready = agent
            .wait_for_line("circuit-agent ready", AGENT_START)
            .unwrap();
        // `--xdp-mode auto` detects the veth driver and uses generic mode, where XDP_TX works.
        assert!(
            ready.contains(&format!("{} (generic)", sandbox.upstream_if)),
            "{ready}"
        );
        let client = Client::new(&sandbox.client).unwrap();
        Self {
            agent,
            client,
            upstream,
            target,
            pins,
            _sandbox: sandbox,
        }
    }

    fn connect(&self) -> circuit_tests::Attempt {
        self.client.connect(self.target, CONNECT_TIMEOUT).unwrap()
    }

    /// Waits for the agent to log the transition of our upstream from `from` to `to`.
    fn transition(&self, from: &str, to: &str, timeout: Duration) -> String {
        let upstream = format!("upstream={}", self.target);
        let from = format!("from={from}");
        let to = format!("to={to}");
        let lines = self
            .agent
            .wait_for_lines(&["breaker transition", &upstream, &from, &to], 1, timeout)
            .unwrap();
        lines.into_iter().next().unwrap()
    }

    fn verdict(&self) -> Option<VerdictState> {
        VerdictTable::open_pinned(&self.pins.0)
            .unwrap()
            .get(self.target)
            .unwrap()
            .map(|v| v.state)
    }

    fn trip(&mut self) {
        assert_eq!(self.connect().result, ConnectResult::Connected);
        self.upstream.set_healthy(false).unwrap();
        for _ in 0..THRESHOLD {
            assert_eq!(self.connect().result, ConnectResult::Refused);
        }
        let line = self.transition("CLOSED", "OPEN", Duration::from_secs(5));
        assert!(
            line.contains("3 consecutive failures (threshold 3)"),
            "{line}"
        );
        assert_eq!(self.verdict(), Some(VerdictState::Open));
    }
}

/// Value of `key=` in a logfmt-style tracing line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

#[test]
fn refusing_upstream_trips_fails_fast_and_heals_after_a_probe() {
    let mut s = Scenario::start();
    s.trip();

    // The upstream is healthy again, so a refusal now can only come from the breaker.
    s.upstream.set_healthy(true).unwrap();
    let accepted_before = s.upstream.accepted();
    for _ in 0..5 {
        let attempt = s.connect();
        assert_eq!(attempt.result, ConnectResult::Refused);
        assert!(attempt.elapsed < FAST, "rejected in {:?}", attempt.elapsed);
    }
    assert_eq!(
        s.upstream.accepted(),
        accepted_before,
        "no SYN reached the upstream while OPEN"
    );

    // `status` reads the kernel's view from the pins.
    let status = Command::new(agent_binary().unwrap())
        .args(["status", "--pin-dir"])
        .arg(&s.pins.0)
        .output()
        .unwrap();
    assert!(status.status.success());
    let table = String::from_utf8_lossy(&status.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(&s.target.to_string()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("OPEN"), "{row}");

    let half_open = s.transition("OPEN", "HALF_OPEN", OPEN_DURATION + Duration::from_secs(5));
    // Our own rejects were recognised as such, not mistaken for a refusing upstream.
    let rejected: u64 = field(&half_open, "rejected").unwrap().parse().unwrap();
    assert!(rejected >= 5, "{half_open}");
    assert_eq!(s.verdict(), Some(VerdictState::HalfOpen));

    assert_eq!(s.connect().result, ConnectResult::Connected, "the probe");
    let closed = s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert!(closed.contains("1 successful probes"), "{closed}");
    assert_eq!(s.verdict(), None);
    assert_eq!(s.connect().result, ConnectResult::Connected);

    s.agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = s.agent.wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "agent exit: {status}");
}

#[test]
fn a_probe_to_a_still_refusing_upstream_reopens_the_breaker() {
    let mut s = Scenario::start();
    s.trip();
    s.transition("OPEN", "HALF_OPEN", OPEN_DURATION + Duration::from_secs(5));
    // The probe is admitted by the kernel and refused by the upstream itself.
    assert_eq!(s.connect().result, ConnectResult::Refused);
    let reopened = s.transition("HALF_OPEN", "OPEN", Duration::from_secs(5));
    assert!(reopened.contains("probe failed: refused"), "{reopened}");
    assert_eq!(s.verdict(), Some(VerdictState::Open));
    // Back to rejecting in the kernel.
    let attempt = s.connect();
    assert_eq!(attempt.result, ConnectResult::Refused);
    assert!(attempt.elapsed < FAST);
}
