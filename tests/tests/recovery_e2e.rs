//! Recovery is always possible: a refused-then-healthy upstream closes again within the open
//! duration plus a second, whatever enforcement points its connections cross.
//!
//! The layout is the README's Kubernetes node: a "node" namespace with the host side of each
//! pod's veth, the agent attached there (`--iface` on every host veth), two client pods and
//! an upstream pod. A client's SYN crosses the cgroup hook at connect(), XDP as it arrives
//! on its pod's host veth, and TC egress as it leaves towards the upstream pod; each cell of
//! the matrix attaches a different set of those points. The upstream fails both clients, so
//! its breaker has the two witnesses a node-wide verdict needs by default. Every setting is
//! the default except the open duration (shortened), and each agent breaks only for its own
//! upstream with the panic guard off (the agents of tests running in parallel see each
//! other's connections).

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use circuit_agent::kernel::{Stats, VerdictTable};
use circuit_common::{Stat, VerdictState};
use circuit_tests::{
    ChildProcess, Client, ConnectResult, Node, RemoveOnDrop, UnprivilegedClient, Upstream,
    agent_binary, require_root, unique_name,
};
use common::{FAST, PORT, isolated_config, spawn_agent, transition};

const OPEN_DURATION: Duration = Duration::from_secs(2);
/// The default `failure_threshold`.
const THRESHOLD: usize = 5;
/// How often a client retries while the breaker is open, like a client with a retry loop.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// A node with a client pod and an upstream pod, and the agent attached in the node.
struct NodeScenario {
    // Field order is drop order: agent, sockets, pins and scratch files, then namespaces.
    agent: ChildProcess,
    /// In the first client pod: this test process's threads.
    client: Client,
    /// In the second client pod: an unprivileged process in a cgroup of its own.
    second: UnprivilegedClient,
    upstream: Upstream,
    target: SocketAddr,
    pins: RemoveOnDrop,
    _scratch: RemoveOnDrop,
    node: Node,
}

impl NodeScenario {
    /// The agent attached with `--enforce enforce`, and `config` (TOML) in its file.
    fn start(enforce: &str, config: &str) -> Self {
        require_root().unwrap();
        let node = Node::new("cbrec", 3).unwrap();
        let target = SocketAddr::from((node.pods[1].addr, PORT));
        let upstream = Upstream::start(&node.pods[1].ns, target).unwrap();
        let client = Client::new(&node.pods[0].ns).unwrap();
        let cgroup_root = circuit_agent::kernel::ensure_cgroup2_root().unwrap();
        let second =
            UnprivilegedClient::new(&node.pods[2].ns, &cgroup_root, &unique_name("cbpod")).unwrap();
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbpin")));
        let scratch = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbrec")));
        std::fs::create_dir_all(&scratch.0).unwrap();
        let config_path = scratch.0.join("circuit.toml");
        let own = [format!("{}/32", target.ip())];
        std::fs::write(
            &config_path,
            format!("{}\n{config}", isolated_config(&own, "")),
        )
        .unwrap();
        let mut cmd = node.node.command(agent_binary().unwrap()).unwrap();
        cmd.args(["attach", "--enforce", enforce])
            .args(["--iface", &node.pods[0].host_if])
            .args(["--iface", &node.pods[1].host_if])
            .args(["--iface", &node.pods[2].host_if])
            .arg("--config")
            .arg(&config_path)
            .arg("--pin-dir")
            .arg(&pins.0)
            .arg("--socket")
            .arg(scratch.0.join("agent.sock"))
            .args(["--open-duration", "2s"]);
        let agent = spawn_agent(cmd);
        Self {
            agent,
            client,
            second,
            upstream,
            target,
            pins,
            _scratch: scratch,
            node,
        }
    }

    fn connect(&self) -> circuit_tests::Attempt {
        self.client
            .connect(self.target, Duration::from_secs(2))
            .unwrap()
    }

    fn transition(&self, from: &str, to: &str, timeout: Duration) -> String {
        transition(&self.agent, self.target, from, to, timeout)
    }

    /// The `n`-th transition from `from` to `to` (1-based), waited for.
    fn nth_transition(&self, n: usize, from: &str, to: &str, timeout: Duration) -> String {
        let (from, to) = (format!("from={from} "), format!("to={to} "));
        let upstream = format!("upstream={} ", self.target);
        let needles = ["breaker transition", upstream.as_str(), &from, &to];
        let mut lines = self.agent.wait_for_lines(&needles, n, timeout).unwrap();
        lines.swap_remove(n - 1)
    }

    fn transitions(&self, from: &str, to: &str) -> usize {
        let (from, to) = (format!("from={from} "), format!("to={to} "));
        let upstream = format!("upstream={} ", self.target);
        self.agent
            .lines()
            .iter()
            .filter(|l| l.contains("breaker transition") && l.contains(&upstream))
            .filter(|l| l.contains(&from) && l.contains(&to))
            .count()
    }

    fn stat(&self, stat: Stat) -> u64 {
        Stats::open_pinned(&self.pins.0).unwrap().get(stat).unwrap()
    }

    fn verdict(&self) -> Option<VerdictState> {
        VerdictTable::open_pinned(&self.pins.0)
            .unwrap()
            .get(self.target)
            .unwrap()
            .map(|v| v.state)
    }

    /// A connect from the second client pod.
    fn connect_second(&self) -> circuit_tests::Attempt {
        self.second
            .connect(self.target, Duration::from_secs(2))
            .unwrap()
    }

    /// The upstream refuses both clients until the breaker opens; returns when it did.
    fn trip(&mut self) -> Instant {
        assert_eq!(self.connect().result, ConnectResult::Connected, "a route");
        assert_eq!(self.connect_second().result, ConnectResult::Connected);
        self.upstream.set_healthy(false).unwrap();
        for i in 0..THRESHOLD {
            let attempt = if i % 2 == 0 {
                self.connect()
            } else {
                self.connect_second()
            };
            assert_eq!(attempt.result, ConnectResult::Refused);
        }
        self.transition("CLOSED", "OPEN", Duration::from_secs(5));
        Instant::now()
    }

    /// With the upstream healthy again, connects fail fast and reach nobody.
    fn assert_rejected_fast(&mut self) {
        self.upstream.set_healthy(true).unwrap();
        let accepted = self.upstream.accepted();
        for _ in 0..3 {
            let attempt = self.connect();
            assert_eq!(attempt.result, ConnectResult::Refused);
            assert!(attempt.elapsed < FAST, "rejected in {:?}", attempt.elapsed);
        }
        assert_eq!(self.upstream.accepted(), accepted, "no SYN reached it");
    }

    /// Retries like a client would until a connect succeeds; the time since `opened`.
    fn retry_until_connected(&self, opened: Instant) -> Duration {
        let deadline = opened + OPEN_DURATION + Duration::from_secs(10);
        loop {
            if self.connect().result == ConnectResult::Connected {
                return opened.elapsed();
            }
            assert!(Instant::now() < deadline, "never admitted again");
            std::thread::sleep(RETRY_EVERY);
        }
    }
}

/// The whole cycle under `enforce`, crossing `points` enforcement points: trip, fail fast,
/// one probe admitted at every point it crosses, closed, connects succeed.
fn recovers(enforce: &str, points: u64) {
    let mut s = NodeScenario::start(enforce, "");
    let opened = s.trip();
    s.assert_rejected_fast();
    let time_to_close = s.retry_until_connected(opened);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    eprintln!(
        "recovery matrix: enforce={enforce} time_to_close_ms={}",
        time_to_close.as_millis()
    );
    assert!(
        time_to_close <= OPEN_DURATION + Duration::from_secs(1),
        "closed after {time_to_close:?}"
    );
    for _ in 0..3 {
        let result = s.connect().result;
        if result != ConnectResult::Connected {
            let stats: Vec<String> = Stat::ALL
                .iter()
                .map(|st| format!("{}={}", st.name(), s.stat(*st)))
                .collect();
            panic!(
                "{result:?} after closing; verdict {:?}; {}",
                s.verdict(),
                stats.join(" ")
            );
        }
    }
    assert_eq!(s.verdict(), None);
    assert_eq!(s.transitions("HALF_OPEN", "OPEN"), 0, "no re-open");
    // One token for the one probe; each later point recognised it.
    assert_eq!(s.stat(Stat::ProbesAdmitted), 1);
    assert_eq!(s.stat(Stat::AdmittedFollowed), points - 1);
}

#[test]
fn recovers_with_cgroup() {
    recovers("cgroup", 1);
}

#[test]
fn recovers_with_xdp() {
    recovers("xdp", 1);
}

#[test]
fn recovers_with_tc() {
    recovers("tc", 1);
}

#[test]
fn recovers_with_cgroup_and_xdp_the_default() {
    recovers("cgroup,xdp", 2);
}

#[test]
fn recovers_with_cgroup_and_tc() {
    recovers("cgroup,tc", 2);
}

#[test]
fn recovers_with_xdp_and_tc() {
    recovers("xdp,tc", 2);
}

#[test]
fn recovers_with_every_point() {
    recovers("cgroup,xdp,tc", 3);
}

/// The same cycle with the clients of a real node only: unprivileged processes, each in a
/// cgroup of its own, in their pods' namespaces.
#[test]
fn recovers_with_unprivileged_clients_in_their_own_cgroups() {
    let s = NodeScenario::start("cgroup,xdp,tc", "");
    let cgroup_root = circuit_agent::kernel::ensure_cgroup2_root().unwrap();
    let first =
        UnprivilegedClient::new(&s.node.pods[0].ns, &cgroup_root, &unique_name("cbpod")).unwrap();
    let pods = [&first, &s.second];
    let connect = |i: usize| {
        pods[i % 2]
            .connect(s.target, Duration::from_secs(2))
            .unwrap()
    };
    assert_eq!(connect(0).result, ConnectResult::Connected);
    let mut upstream = s.upstream;
    upstream.set_healthy(false).unwrap();
    for i in 0..THRESHOLD {
        assert_eq!(connect(i).result, ConnectResult::Refused);
    }
    transition(&s.agent, s.target, "CLOSED", "OPEN", Duration::from_secs(5));
    let opened = Instant::now();
    upstream.set_healthy(true).unwrap();
    assert_eq!(connect(1).result, ConnectResult::Refused, "failed fast");
    let deadline = opened + OPEN_DURATION + Duration::from_secs(10);
    while connect(0).result != ConnectResult::Connected {
        assert!(Instant::now() < deadline, "never admitted again");
        std::thread::sleep(RETRY_EVERY);
    }
    let time_to_close = opened.elapsed();
    transition(
        &s.agent,
        s.target,
        "HALF_OPEN",
        "CLOSED",
        Duration::from_secs(5),
    );
    eprintln!(
        "recovery matrix: unprivileged clients, cgroup,xdp,tc time_to_close_ms={}",
        time_to_close.as_millis()
    );
    assert!(time_to_close <= OPEN_DURATION + Duration::from_secs(1));
    let stat = |stat| Stats::open_pinned(&s.pins.0).unwrap().get(stat).unwrap();
    assert_eq!(stat(Stat::ProbesAdmitted), 1);
    assert_eq!(stat(Stat::AdmittedFollowed), 2);
}

#[test]
fn a_probe_its_client_abandons_gives_its_token_back_without_reopening() {
    let mut s = NodeScenario::start("cgroup,xdp,tc", "");
    s.trip();
    s.transition("OPEN", "HALF_OPEN", OPEN_DURATION + Duration::from_secs(5));
    // The upstream swallows SYNs; the client gives up after 50 ms, before any answer.
    s.upstream.set_healthy(true).unwrap();
    let drop_syns = Nft::drop_syns(&s.node.pods[1].ns, PORT);
    let attempt = s
        .client
        .connect(s.target, Duration::from_millis(50))
        .unwrap();
    assert_eq!(attempt.result, ConnectResult::TimedOut);
    let given_back = s.transition("HALF_OPEN", "HALF_OPEN", Duration::from_secs(5));
    assert!(given_back.contains("probe abandoned"), "{given_back}");
    drop(drop_syns);
    // The next connection probes, and closes the breaker.
    assert_eq!(s.connect().result, ConnectResult::Connected);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert_eq!(s.transitions("HALF_OPEN", "OPEN"), 0, "no re-open");
    assert_eq!(s.stat(Stat::ProbesAdmitted), 2);
}

#[test]
fn a_failing_probe_reopens_once_with_the_next_open_duration() {
    let mut s = NodeScenario::start("cgroup,xdp,tc", "");
    s.trip();
    s.transition("OPEN", "HALF_OPEN", OPEN_DURATION + Duration::from_secs(5));
    // Still refusing: the probe reaches the upstream, which refuses it.
    assert_eq!(s.connect().result, ConnectResult::Refused);
    let reopened = s.transition("HALF_OPEN", "OPEN", Duration::from_secs(5));
    assert!(reopened.contains("probe failed: refused"), "{reopened}");
    let reopened_at = Instant::now();
    // Linear backoff (Envoy's): the second ejection lasts twice the open duration.
    s.upstream.set_healthy(true).unwrap();
    let half_open = s.nth_transition(
        2,
        "OPEN",
        "HALF_OPEN",
        2 * OPEN_DURATION + Duration::from_secs(5),
    );
    assert!(half_open.contains("open for 4s"), "{half_open}");
    let time_to_close = s.retry_until_connected(reopened_at);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert!(
        time_to_close <= 2 * OPEN_DURATION + Duration::from_secs(1),
        "closed after {time_to_close:?}"
    );
    assert_eq!(s.transitions("HALF_OPEN", "OPEN"), 1, "re-opened once");
}

/// What answered a SYN sent by hand.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    SynAck,
    Reset,
    Nothing,
}

/// A peer whose SYN arrives from outside the node's sockets: a SYN written by hand on a
/// raw socket in `ns`, so no connect() hook, no socket and no outcome tracepoint sees it,
/// only XDP and TC. Returns what came back.
fn outside_peer_syn(ns: &circuit_tests::NetNs, from: std::net::Ipv4Addr, to: SocketAddr) -> Answer {
    const SCRIPT: &str = r#"
import random, socket, struct, sys, time
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
sport = random.randint(20000, 30000)
def checksum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.settimeout(0.2)
s.sendto(tcp, (dst, 0))
deadline = time.time() + 2
while time.time() < deadline:
    try:
        pkt = s.recv(65535)
    except socket.timeout:
        continue
    ihl = (pkt[0] & 15) * 4
    sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
    if (sp, dp) == (dport, sport):
        flags = pkt[ihl + 13]
        print("reset" if flags & 0x04 else "synack" if flags & 0x12 == 0x12 else "other")
        sys.exit(0)
print("nothing")
"#;
    let out = ns
        .command("python3")
        .unwrap()
        .args(["-c", SCRIPT, &from.to_string(), &to.ip().to_string()])
        .arg(to.port().to_string())
        .output()
        .unwrap();
    match String::from_utf8_lossy(&out.stdout).trim() {
        "synack" => Answer::SynAck,
        "reset" => Answer::Reset,
        "nothing" => Answer::Nothing,
        other => panic!("raw SYN: {other} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// An outside peer meets XDP and TC: rejected while OPEN, admitted once a local client's
/// probe closed the breaker.
fn outside_peer_is_rejected_while_open_and_admitted_after(enforce: &str) {
    let mut s = NodeScenario::start(enforce, "");
    let peer = s.node.pods[0].addr;
    assert_eq!(
        outside_peer_syn(&s.node.pods[0].ns, peer, s.target),
        Answer::SynAck
    );
    let opened = s.trip();
    s.upstream.set_healthy(true).unwrap();
    assert_eq!(
        outside_peer_syn(&s.node.pods[0].ns, peer, s.target),
        Answer::Reset
    );
    let rejects = s.stat(Stat::XdpRejectOpen) + s.stat(Stat::TcRejectOpen);
    assert!(rejects >= 1, "rejected by XDP or TC");
    let time_to_close = s.retry_until_connected(opened);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert!(time_to_close <= OPEN_DURATION + Duration::from_secs(1));
    assert_eq!(
        outside_peer_syn(&s.node.pods[0].ns, peer, s.target),
        Answer::SynAck
    );
}

#[test]
fn an_outside_peer_with_xdp() {
    outside_peer_is_rejected_while_open_and_admitted_after("xdp");
}

#[test]
fn an_outside_peer_with_tc() {
    outside_peer_is_rejected_while_open_and_admitted_after("tc");
}

#[test]
fn an_outside_peer_with_every_point() {
    outside_peer_is_rejected_while_open_and_admitted_after("cgroup,xdp,tc");
}

/// A probe whose outcome never reaches the agent (here: an outside peer's, which no socket
/// on the node reports) gives its token back after `probe_timeout`, without re-opening.
#[test]
fn a_probe_with_no_outcome_gives_its_token_back_after_the_probe_timeout() {
    let mut s = NodeScenario::start("xdp,tc", "[defaults]\nprobe_timeout = \"1s\"\n");
    s.trip();
    s.transition("OPEN", "HALF_OPEN", OPEN_DURATION + Duration::from_secs(5));
    s.upstream.set_healthy(true).unwrap();
    let peer = s.node.pods[0].addr;
    // The peer takes the token; its connection's fate is not ours to see.
    assert_eq!(
        outside_peer_syn(&s.node.pods[0].ns, peer, s.target),
        Answer::SynAck
    );
    let attempt = s.connect();
    assert_eq!(
        attempt.result,
        ConnectResult::Refused,
        "the budget is spent"
    );
    assert!(attempt.elapsed < FAST);
    let round = s.transition("HALF_OPEN", "HALF_OPEN", Duration::from_secs(5));
    assert!(round.contains("no probe outcome within 1s"), "{round}");
    assert_eq!(s.connect().result, ConnectResult::Connected);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert_eq!(s.transitions("HALF_OPEN", "OPEN"), 0, "no re-open");
}

/// An nftables table in a namespace that drops SYNs to a port, removed on drop.
struct Nft {
    ns_path: std::path::PathBuf,
    table: String,
}

impl Nft {
    fn drop_syns(ns: &circuit_tests::NetNs, port: u16) -> Self {
        let table = unique_name("cbdrop");
        let script = format!(
            "table inet {table} {{\n chain input {{\n type filter hook input priority 0;\n tcp dport {port} drop\n }}\n}}\n"
        );
        let nft = Self {
            ns_path: ns.path(),
            table,
        };
        nft.run(&["-f", "-"], Some(&script)).unwrap();
        nft
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
        use std::io::Write;
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path.display()))
            .arg("nft")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            return Err(format!(
                "nft {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let table = self.table.clone();
        if let Err(err) = self.run(&["delete", "table", "inet", &table], None) {
            eprintln!("warning: {err}");
        }
    }
}
