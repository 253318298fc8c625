//! Evidence: what counts as a failure, and whose. No client can isolate a healthy upstream
//! for the others.
//!
//! The README's Kubernetes node (see `common/node.rs`) with the real agent on its defaults
//! (two witnesses), and two client pods A and B: unprivileged processes (`nobody`), each in
//! a cgroup of its own and its pod's network namespace. Each test prints the counts the
//! issue asks for: B's successes, and the verdicts with their scope.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use circuit_agent::kernel::{UpstreamCounts, VerdictTable};
use circuit_agent::surfaces::control::EventScope;
use circuit_common::{ConnectOutcome, VerdictState};
use circuit_tests::{ConnectResult, UnprivilegedClient, Upstream, unique_name};
use common::{
    PORT, fast,
    node::{Answer, Nft, NodeScenario, outside_peer_syn},
};

/// The node, and client A as an unprivileged pod in pod 0 (B is the scenario's second).
fn start() -> (NodeScenario, UnprivilegedClient) {
    let s = NodeScenario::start("cgroup,xdp", "");
    let cgroup_root = circuit_agent::kernel::ensure_cgroup2_root().unwrap();
    let a =
        UnprivilegedClient::new(&s.node.pods[0].ns, &cgroup_root, &unique_name("cbpodA")).unwrap();
    (s, a)
}

/// B's connects to `to` that succeed, of `n`.
fn successes_of(client: &UnprivilegedClient, to: SocketAddr, n: usize) -> usize {
    (0..n)
        .filter(|_| {
            client.connect(to, Duration::from_secs(2)).unwrap().result == ConnectResult::Connected
        })
        .count()
}

/// The cgroup id of a client: its directory's inode number.
fn cgroup_id(client: &UnprivilegedClient) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(client.cgroup()).unwrap().ino()
}

/// 30 connects closed by their application at once, before any answer (hedging, Happy
/// Eyeballs losers, cancellation, or a hostile process): no evidence, nothing trips.
#[test]
fn immediate_aborts_trip_nothing_and_others_are_unaffected() {
    let (s, a) = start();
    // A's SYNs go unanswered (dropped at the upstream pod), so each close comes before any
    // answer, as it would over a real round trip; the veth would otherwise answer in µs.
    let _drop = Nft::drop_from(&s.node.pods[1].ns, s.node.pods[0].addr, PORT);
    const ABORTS: &str = "
import socket, sys
for _ in range(30):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((sys.argv[1], int(sys.argv[2])))
    s.close()
print('done')
";
    let args = [s.target.ip().to_string(), PORT.to_string()];
    assert_eq!(a.python(ABORTS, &args).unwrap().trim(), "done");
    let aborted = || {
        UpstreamCounts::open_pinned(&s.pins.0)
            .unwrap()
            .get(s.target)
            .unwrap()
            .into_iter()
            .find(|(o, _)| *o == ConnectOutcome::Aborted)
            .map_or(0, |(_, n)| n)
    };
    circuit_tests::wait_until(
        "30 aborted connects",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (aborted() >= 30).then_some(()),
    )
    .unwrap();
    let b_ok = successes_of(&s.second, s.target, 20);
    eprintln!(
        "witness: immediate aborts: B {b_ok}/20 connected, transitions {:?}",
        s.recent_events(s.target)
    );
    assert_eq!(b_ok, 20);
    assert!(s.recent_events(s.target).is_empty(), "nothing trips");
    let table = VerdictTable::open_pinned(&s.pins.0).unwrap();
    assert!(table.list().unwrap().is_empty());
    assert!(table.list_clients().unwrap().is_empty());
}

/// A's own namespace drops its SYNs (a NetworkPolicy of its own): its 300 ms timeouts are
/// evidence, but only A's. A is failed fast on its own; B never notices.
#[test]
fn a_clients_own_egress_drop_fails_only_that_client() {
    let (s, a) = start();
    let _drop = Nft::drop_to(&s.node.pods[0].ns, s.target.ip(), PORT);
    // A's SYNs never leave its namespace: a refusal can only be A's own hold, at connect().
    // One client process retrying at its own pace (300 ms timeouts), as a pod would.
    let mut a_fast = 0;
    for attempt in a
        .connect_times(s.target, Duration::from_millis(300), 30)
        .unwrap()
    {
        if attempt.result == s.rejected {
            assert!(attempt.elapsed < fast(), "{attempt:?}");
            a_fast += 1;
        }
    }
    let b_ok = successes_of(&s.second, s.target, 20);
    let table = VerdictTable::open_pinned(&s.pins.0).unwrap();
    let transitions = s.recent_events(s.target);
    eprintln!(
        "witness: A's own drop: A failed fast {a_fast}/30, B {b_ok}/20 connected, node verdicts {}, transitions {}",
        table.list().unwrap().len(),
        transitions.len()
    );
    // Five timeouts to trip, then A's own hold answers at once (and holds it again on its
    // next failure whenever the hold's open duration ends).
    assert!(a_fast >= 20, "A failed fast {a_fast} times");
    assert_eq!(b_ok, 20);
    assert!(table.list().unwrap().is_empty(), "no node-wide verdict");
    let a_id = cgroup_id(&a);
    assert!(!transitions.is_empty());
    for event in &transitions {
        assert_eq!(event.scope, EventScope::Client, "{event:?}");
        assert_eq!(event.client, Some(a_id), "only A is held: {event:?}");
    }
    // Events say whom, by cgroup path too.
    let events = s.cli(&["events", "-o", "json"]);
    let held = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["scope"] == "client" && e["to"] == "OPEN")
        .unwrap_or_else(|| panic!("{events}"));
    assert_eq!(held["client"], cgroup_id(&a));
    let path = held["client_path"].as_str().unwrap();
    let name = a.cgroup().file_name().unwrap().to_str().unwrap();
    assert!(path.ends_with(name), "{path}");
}

/// The upstream fails A and B alike: two witnesses, a node-wide verdict, which XDP enforces
/// for a peer whose SYNs come from outside the node's sockets too.
#[test]
fn two_failing_clients_isolate_for_the_node_and_xdp_stops_remote_peers() {
    let (mut s, a) = start();
    s.upstream.set_healthy(false).unwrap();
    for i in 0..5 {
        let client = if i % 2 == 0 { &a } else { &s.second };
        let attempt = client.connect(s.target, Duration::from_secs(2)).unwrap();
        assert_eq!(attempt.result, ConnectResult::Refused);
    }
    s.transition("CLOSED", "OPEN", Duration::from_secs(5));
    s.upstream.set_healthy(true).unwrap();
    let table = VerdictTable::open_pinned(&s.pins.0).unwrap();
    assert_eq!(
        table.get(s.target).unwrap().map(|v| v.state),
        Some(VerdictState::Open)
    );
    let answer = outside_peer_syn(&s.node.pods[0].ns, s.node.pods[0].addr, s.target);
    let b = s.second.connect(s.target, Duration::from_secs(2)).unwrap();
    eprintln!(
        "witness: both failing: node verdict OPEN, remote peer {answer:?}, B {:?}",
        b.result
    );
    assert_eq!(answer, Answer::Reset);
    assert_eq!(b.result, s.rejected);
    assert!(b.elapsed < fast() * 20);
}

/// Happy Eyeballs: the upstream's IPv6 address black-holed, its IPv4 address healthy, a
/// client racing both (IPv6 first, IPv4 after 250 ms, the loser closed): the IPv6 losers
/// waited long enough to be evidence, the IPv4 upstream is never touched.
#[test]
fn happy_eyeballs_trips_only_the_black_holed_family() {
    let (s, a) = start();
    let v6 = SocketAddr::new(s.node.pods[1].addr6.into(), PORT);
    let _v6_upstream = Upstream::start(&s.node.pods[1].ns, v6).unwrap();
    let _drop = Nft::drop_ip6(&s.node.pods[1].ns, PORT);
    const RACE: &str = "
import errno, select, socket, sys
v6, v4, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
won = []
for _ in range(8):
    a = socket.socket(socket.AF_INET6)
    a.setblocking(False)
    if a.connect_ex((v6, port)) == errno.EINPROGRESS:
        _, w, _ = select.select([], [a], [], 0.25)
        if w and a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            won.append('v6'); a.close(); continue
    b = socket.create_connection((v4, port), 2)
    won.append('v4')
    a.close()
    b.close()
print(' '.join(won))
";
    let args = [
        v6.ip().to_string(),
        s.target.ip().to_string(),
        PORT.to_string(),
    ];
    let won = a.python(RACE, &args).unwrap();
    let clients = VerdictTable::open_pinned(&s.pins.0)
        .unwrap()
        .list_clients()
        .unwrap();
    eprintln!(
        "witness: happy eyeballs: winners {}, client verdicts {:?}, v4 transitions {:?}",
        won.trim(),
        clients,
        s.recent_events(s.target)
    );
    assert!(won.split_whitespace().all(|w| w == "v4"), "{won}");
    assert!(s.recent_events(s.target).is_empty(), "IPv4 untouched");
    assert_eq!(clients.len(), 1, "the IPv6 upstream, for A");
    assert_eq!(clients[0].upstream, v6);
}

/// Clients with a 300 ms connect timeout against a black hole: their aborts waited long
/// enough, and with two of them the node isolates.
#[test]
fn short_client_timeouts_against_a_black_hole_still_trip() {
    let (s, a) = start();
    let _drop = Nft::drop_ip4(&s.node.pods[1].ns, PORT);
    let started = Instant::now();
    for i in 0..5 {
        let client = if i % 2 == 0 { &a } else { &s.second };
        let attempt = client
            .connect(s.target, Duration::from_millis(300))
            .unwrap();
        assert_eq!(attempt.result, ConnectResult::TimedOut);
    }
    let line = s.transition("CLOSED", "OPEN", Duration::from_secs(5));
    eprintln!(
        "witness: black hole with 300 ms timeouts: node-wide OPEN after {:?}",
        started.elapsed()
    );
    assert!(line.reason.contains("consecutive failures"), "{line:?}");
    assert_eq!(line.scope, EventScope::Node, "{line:?}");
}

/// A connect deferred by TCP_FASTOPEN_CONNECT sends no SYN until its first write: closed
/// before one, it was no attempt at all. The same wait after a SYN is an aborted attempt.
#[test]
fn a_connect_that_never_sent_a_syn_is_no_evidence() {
    let (s, a) = start();
    // Fast Open on the client side without a cookie (1 | 4), so connect() defers its SYN.
    s.node.pods[0]
        .ns
        .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "5"))
        .unwrap()
        .unwrap();
    let _drop = Nft::drop_from(&s.node.pods[1].ns, s.node.pods[0].addr, PORT);
    const DEFERRED: &str = "
import socket, sys, time
fast_open = sys.argv[3] == 'deferred'
for _ in range(int(sys.argv[4])):
    s = socket.socket()
    if fast_open:
        s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT
        s.connect((sys.argv[1], int(sys.argv[2])))  # returns at once, nothing sent
    else:
        s.setblocking(False)
        s.connect_ex((sys.argv[1], int(sys.argv[2])))
    time.sleep(0.4)
    s.close()
print('done')
";
    let args = |mode: &str, n: u32| {
        [
            s.target.ip().to_string(),
            PORT.to_string(),
            mode.to_owned(),
            n.to_string(),
        ]
    };
    let aborted = || {
        UpstreamCounts::open_pinned(&s.pins.0)
            .unwrap()
            .get(s.target)
            .unwrap()
            .into_iter()
            .find(|(o, _)| *o == ConnectOutcome::Aborted)
            .map_or(0, |(_, n)| n)
    };
    a.python(DEFERRED, &args("deferred", 6)).unwrap();
    // The same client, the same wait, with a SYN sent: one aborted attempt is counted...
    a.python(DEFERRED, &args("sent", 1)).unwrap();
    circuit_tests::wait_until(
        "the aborted attempt",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (aborted() >= 1).then_some(()),
    )
    .unwrap();
    // ...and none of the six deferred ones.
    eprintln!(
        "witness: TCP_FASTOPEN_CONNECT: 6 deferred connects closed unwritten, aborted counted {}",
        aborted()
    );
    assert_eq!(aborted(), 1);
    assert!(s.recent_events(s.target).is_empty());
}
