//! The README's Kubernetes node layout with a running agent, shared by the recovery and the
//! witness suites: a "node" namespace with the host side of each pod's veth and the agent
//! (`--iface` on every host veth), two client pods and an upstream pod.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use circuit_agent::kernel::{Stats, VerdictTable};
use circuit_common::{Stat, VerdictState};
use circuit_tests::{
    ChildProcess, Client, ConnectResult, NetNs, Node, RemoveOnDrop, UnprivilegedClient, Upstream,
    agent_binary, require_root, unique_name,
};

use super::{Event, PORT, follow_events, isolated_config, nth_transition, spawn_agent, transition};

/// The open duration the scenarios run with.
pub fn open_duration() -> Duration {
    // Under emulation a client process takes a second or two to start, more on the slowest
    // kernel with the suite's tests in parallel (5.10 under TCG took over 6 s between OPEN
    // and a raw SYN's answer): with 2 s, the breaker would be HALF_OPEN before a test's
    // check that it rejects, and its connect the probe. 12 s in a VM, 2 s on the host.
    Duration::from_secs(2) * circuit_tests::wait_scale()
}
/// The default `failure_threshold`.
pub const THRESHOLD: usize = 5;
/// How often a client retries while the breaker is open, like a client with a retry loop.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// A node with two client pods and an upstream pod, and the agent attached in the node.
pub struct NodeScenario {
    // Field order is drop order: the event follower and the agent, sockets, pins and
    // scratch files, then namespaces.
    /// `circuit-agent events --follow -o json` on the agent's socket.
    pub events: ChildProcess,
    pub agent: ChildProcess,
    /// In the first client pod: this test process's threads.
    pub client: Client,
    /// In the second client pod: an unprivileged process in a cgroup of its own.
    pub second: UnprivilegedClient,
    pub upstream: Upstream,
    pub target: SocketAddr,
    /// How circuit's rejects look to the clients here (see [`super::rejected_by`]).
    pub rejected: ConnectResult,
    pub pins: RemoveOnDrop,
    scratch: RemoveOnDrop,
    pub node: Node,
}

impl NodeScenario {
    /// Runs the CLI with `args` against this agent (its pins and socket); its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        super::agent_cli(&self.pins.0, &self.scratch.0.join("agent.sock"), args)
    }

    /// The agent attached with `--enforce enforce`, and `config` (TOML) in its file.
    pub fn start(enforce: &str, config: &str) -> Self {
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
        let own = [
            format!("{}/32", target.ip()),
            format!("{}/128", node.pods[1].addr6),
        ];
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
            .args([
                "--open-duration",
                &format!("{}s", open_duration().as_secs()),
            ]);
        let agent = spawn_agent(cmd);
        let events = follow_events(&scratch.0.join("agent.sock"));
        Self {
            events,
            agent,
            client,
            second,
            upstream,
            target,
            rejected: super::rejected_by(enforce),
            pins,
            scratch,
            node,
        }
    }

    pub fn connect(&self) -> circuit_tests::Attempt {
        self.client
            .connect(self.target, Duration::from_secs(2))
            .unwrap()
    }

    pub fn transition(&self, from: &str, to: &str, timeout: Duration) -> Event {
        transition(&self.events, self.target, from, to, timeout)
    }

    /// The `n`-th transition from `from` to `to` (1-based), waited for.
    pub fn nth_transition(&self, n: usize, from: &str, to: &str, timeout: Duration) -> Event {
        nth_transition(&self.events, n, self.target, from, to, timeout)
    }

    /// How many transitions of our upstream from `from` to `to` the agent remembers, asked
    /// of it directly (see [`NodeScenario::recent_events`]).
    pub fn transitions(&self, from: &str, to: &str) -> usize {
        self.recent_events(self.target)
            .iter()
            .filter(|e| e.from.as_str() == from && e.to.as_str() == to)
            .count()
    }

    /// The transitions of `upstream` the agent remembers (`events -o json`, one request):
    /// everything it did before it answered. A follower may lag behind the agent, so
    /// "nothing happened" is asked here rather than of the follower.
    pub fn recent_events(&self, upstream: SocketAddr) -> Vec<Event> {
        self.cli(&["events", "-o", "json"])
            .lines()
            .map(|l| serde_json::from_str::<Event>(l).unwrap())
            .filter(|e| e.upstream == upstream)
            .collect()
    }

    pub fn stat(&self, stat: Stat) -> u64 {
        Stats::open_pinned(&self.pins.0).unwrap().get(stat).unwrap()
    }

    pub fn verdict(&self) -> Option<VerdictState> {
        VerdictTable::open_pinned(&self.pins.0)
            .unwrap()
            .get(self.target)
            .unwrap()
            .map(|v| v.state)
    }

    /// A connect from the second client pod.
    pub fn connect_second(&self) -> circuit_tests::Attempt {
        self.second
            .connect(self.target, Duration::from_secs(2))
            .unwrap()
    }

    /// The upstream refuses both clients until the breaker opens; returns when it did.
    pub fn trip(&mut self) -> Instant {
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
    pub fn assert_rejected_fast(&mut self) {
        let (client, target) = (&self.client, self.target);
        super::assert_rejected_fast(&mut self.upstream, self.rejected, || {
            client.connect(target, Duration::from_secs(2)).unwrap()
        });
    }
    /// Retries like a client would until a connect succeeds; the time since `opened`.
    pub fn retry_until_connected(&self, opened: Instant) -> Duration {
        let deadline = opened + open_duration() + Duration::from_secs(10);
        loop {
            if self.connect().result == ConnectResult::Connected {
                return opened.elapsed();
            }
            assert!(Instant::now() < deadline, "never admitted again");
            std::thread::sleep(RETRY_EVERY);
        }
    }
}

/// What answered a SYN sent by hand.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    SynAck,
    Reset,
    Nothing,
}

/// A peer whose SYN arrives from outside the node's sockets: a SYN written by hand on a
/// raw socket in `ns`, so no connect() hook, no socket and no outcome tracepoint sees it,
/// only XDP and TC. Returns what came back.
pub fn outside_peer_syn(ns: &NetNs, from: std::net::Ipv4Addr, to: SocketAddr) -> Answer {
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

/// An nftables table in a namespace that drops SYNs to a port, removed on drop.
pub struct Nft {
    ns_path: std::path::PathBuf,
    table: String,
}

impl Nft {
    /// Drops what arrives in `ns` for TCP `port`.
    pub fn drop_syns(ns: &NetNs, port: u16) -> Self {
        Self::rule(ns, "input", &format!("tcp dport {port} drop"))
    }

    /// Drops what arrives in `ns` from `from` for TCP `port`.
    pub fn drop_from(ns: &NetNs, from: std::net::Ipv4Addr, port: u16) -> Self {
        Self::rule(
            ns,
            "input",
            &format!("ip saddr {from} tcp dport {port} drop"),
        )
    }

    /// Drops what leaves `ns` for `to`, TCP `port`: the namespace's own egress policy.
    pub fn drop_to(ns: &NetNs, to: std::net::IpAddr, port: u16) -> Self {
        let family = if to.is_ipv4() { "ip" } else { "ip6" };
        Self::rule(
            ns,
            "output",
            &format!("{family} daddr {to} tcp dport {port} drop"),
        )
    }

    /// Drops IPv4 (`ip`) or IPv6 (`ip6`) arriving in `ns` for TCP `port`.
    fn drop_family(ns: &NetNs, family: &str, port: u16) -> Self {
        Self::rule(
            ns,
            "input",
            &format!("meta nfproto {family} tcp dport {port} drop"),
        )
    }

    pub fn drop_ip4(ns: &NetNs, port: u16) -> Self {
        Self::drop_family(ns, "ipv4", port)
    }

    pub fn drop_ip6(ns: &NetNs, port: u16) -> Self {
        Self::drop_family(ns, "ipv6", port)
    }

    /// A table of its own with one rule in a `hook` chain.
    fn rule(ns: &NetNs, hook: &str, rule: &str) -> Self {
        let table = unique_name("cbdrop");
        let script = format!(
            "table inet {table} {{\n chain {hook} {{\n type filter hook {hook} priority 0;\n {rule}\n }}\n}}\n"
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
