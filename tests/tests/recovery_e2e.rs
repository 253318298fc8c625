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

use std::time::{Duration, Instant};

use circuit_agent::kernel::Stats;
use circuit_common::Stat;
use circuit_tests::{ConnectResult, UnprivilegedClient, unique_name};
use common::{
    PORT, fast,
    node::{Answer, Nft, NodeScenario, RETRY_EVERY, THRESHOLD, open_duration, outside_peer_syn},
    transition,
};

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
        time_to_close <= open_duration() + Duration::from_secs(1) * circuit_tests::wait_scale(),
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
    let rejected = s.rejected;
    let mut upstream = s.upstream;
    upstream.set_healthy(false).unwrap();
    for i in 0..THRESHOLD {
        assert_eq!(connect(i).result, ConnectResult::Refused);
    }
    transition(
        &s.events,
        s.target,
        "CLOSED",
        "OPEN",
        Duration::from_secs(5),
    );
    let opened = Instant::now();
    upstream.set_healthy(true).unwrap();
    assert_eq!(connect(1).result, rejected, "failed fast");
    let deadline = opened + open_duration() + Duration::from_secs(10);
    while connect(0).result != ConnectResult::Connected {
        assert!(Instant::now() < deadline, "never admitted again");
        std::thread::sleep(RETRY_EVERY);
    }
    let time_to_close = opened.elapsed();
    transition(
        &s.events,
        s.target,
        "HALF_OPEN",
        "CLOSED",
        Duration::from_secs(5),
    );
    eprintln!(
        "recovery matrix: unprivileged clients, cgroup,xdp,tc time_to_close_ms={}",
        time_to_close.as_millis()
    );
    assert!(
        time_to_close <= open_duration() + Duration::from_secs(1) * circuit_tests::wait_scale()
    );
    let stat = |stat| Stats::open_pinned(&s.pins.0).unwrap().get(stat).unwrap();
    assert_eq!(stat(Stat::ProbesAdmitted), 1);
    assert_eq!(stat(Stat::AdmittedFollowed), 2);
}

#[test]
fn a_probe_its_client_abandons_gives_its_token_back_without_reopening() {
    let mut s = NodeScenario::start("cgroup,xdp,tc", "");
    s.trip();
    s.transition(
        "OPEN",
        "HALF_OPEN",
        open_duration() + Duration::from_secs(5),
    );
    // The upstream swallows SYNs; the client gives up after 50 ms, before any answer.
    s.upstream.set_healthy(true).unwrap();
    let drop_syns = Nft::drop_syns(&s.node.pods[1].ns, PORT);
    let attempt = s
        .client
        .connect(s.target, Duration::from_millis(50))
        .unwrap();
    assert_eq!(attempt.result, ConnectResult::TimedOut);
    let given_back = s.transition("HALF_OPEN", "HALF_OPEN", Duration::from_secs(5));
    assert!(
        given_back.reason.contains("probe abandoned"),
        "{given_back:?}"
    );
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
    s.transition(
        "OPEN",
        "HALF_OPEN",
        open_duration() + Duration::from_secs(5),
    );
    // Still refusing: the probe reaches the upstream, which refuses it.
    assert_eq!(s.connect().result, ConnectResult::Refused);
    let reopened = s.transition("HALF_OPEN", "OPEN", Duration::from_secs(5));
    assert!(
        reopened.reason.contains("probe failed: refused"),
        "{reopened:?}"
    );
    let reopened_at = Instant::now();
    // Linear backoff (Envoy's): the second ejection lasts twice the open duration.
    s.upstream.set_healthy(true).unwrap();
    let half_open = s.nth_transition(
        2,
        "OPEN",
        "HALF_OPEN",
        2 * open_duration() + Duration::from_secs(5),
    );
    let doubled = format!("open for {}s", 2 * open_duration().as_secs());
    assert!(half_open.reason.contains(&doubled), "{half_open:?}");
    let time_to_close = s.retry_until_connected(reopened_at);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert!(
        time_to_close <= 2 * open_duration() + Duration::from_secs(1) * circuit_tests::wait_scale(),
        "closed after {time_to_close:?}"
    );
    assert_eq!(s.transitions("HALF_OPEN", "OPEN"), 1, "re-opened once");
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
    assert!(
        time_to_close <= open_duration() + Duration::from_secs(1) * circuit_tests::wait_scale()
    );
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
    // Long enough for a slow (emulated) machine to try another connect within it.
    let probe_timeout = circuit_tests::wait_scale();
    let mut s = NodeScenario::start(
        "xdp,tc",
        &format!("[defaults]\nprobe_timeout = \"{probe_timeout}s\"\n"),
    );
    s.trip();
    s.transition(
        "OPEN",
        "HALF_OPEN",
        open_duration() + Duration::from_secs(5),
    );
    s.upstream.set_healthy(true).unwrap();
    let peer = s.node.pods[0].addr;
    // The peer takes the token; its connection's fate is not ours to see.
    assert_eq!(
        outside_peer_syn(&s.node.pods[0].ns, peer, s.target),
        Answer::SynAck
    );
    let attempt = s.connect();
    assert_eq!(attempt.result, s.rejected, "the budget is spent");
    assert!(attempt.elapsed < fast());
    let round = s.transition("HALF_OPEN", "HALF_OPEN", Duration::from_secs(5));
    assert!(
        round
            .reason
            .contains(&format!("no probe outcome within {probe_timeout}s")),
        "{round:?}"
    );
    assert_eq!(s.connect().result, ConnectResult::Connected);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert_eq!(s.transitions("HALF_OPEN", "OPEN"), 0, "no re-open");
}
