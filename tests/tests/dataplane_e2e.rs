//! End to end, per enforcement point and per outcome class: the real agent binary, real
//! sockets, namespaces joined by a veth pair; each test makes and removes its own.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use circuit_common::{ConnectOutcome, Stat, VerdictState};
use circuit_tests::{ConnectResult, wait_until};
use common::{HALF_OPEN_WAIT, PORT, SHORT_OPEN, Scenario, Setup};
use nix::sys::signal::Signal;

#[test]
fn cgroup_hook_refuses_connect_before_any_packet() {
    let mut s = Scenario::start(Setup {
        enforce: "cgroup",
        ..Setup::default()
    });
    s.trip();
    s.assert_rejected_fast();
    assert!(s.stat(Stat::CgroupRejectOpen) >= 3);
    // The socket never reached SYN_SENT: no outcome, so no "rejected" either.
    assert_eq!(s.kernel_count(s.target, ConnectOutcome::Rejected), 0);
}

#[test]
fn tc_egress_refuses_locally_originated_syns() {
    let mut s = Scenario::start(Setup {
        enforce: "tc",
        agent_on_client_side: true,
        ..Setup::default()
    });
    s.trip();
    s.assert_rejected_fast();
    assert!(s.stat(Stat::TcRejectOpen) >= 3);
    assert!(s.kernel_count(s.target, ConnectOutcome::Rejected) >= 3);
}

#[test]
fn ipv6_upstream_trips_and_is_rejected_by_xdp() {
    let mut s = Scenario::start(Setup {
        ipv6: true,
        open_duration: SHORT_OPEN,
        ..Setup::default()
    });
    assert!(s.target.is_ipv6());
    s.trip();
    s.assert_rejected_fast();
    assert!(s.stat(Stat::XdpRejectOpen) >= 3);
    s.transition("OPEN", "HALF_OPEN", HALF_OPEN_WAIT);
    assert_eq!(s.connect().result, ConnectResult::Connected);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
}

#[test]
fn every_outcome_class_is_classified_and_counted() {
    let s = Scenario::start(Setup {
        failure_threshold: 100,
        ..Setup::default()
    });
    // Refused: nothing listens on this port.
    let refused = SocketAddr::new(s.target.ip(), PORT + 1);
    assert_eq!(s.connect_to(refused).result, ConnectResult::Refused);

    // Reset after establishment: the upstream accepts, then aborts the connection.
    s.upstream.set_reset_after_accept(true);
    let read = s
        .client
        .connect_and_read(s.target, Duration::from_secs(5))
        .unwrap();
    assert_eq!(read, Some(libc::ECONNRESET));

    // Aborted, after SYN retransmits: a neighbour that swallows every frame, and a client
    // that gives up first (its own timeout).
    let black_hole = SocketAddr::from((s.sandbox.black_hole_addr(), PORT));
    let attempt = s
        .client
        .connect(black_hole, Duration::from_millis(1_500))
        .unwrap();
    assert_eq!(attempt.result, ConnectResult::TimedOut);

    // Timed out by the kernel: one SYN retry in the client's namespace gives up after ~3 s.
    s.sandbox
        .client
        .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_syn_retries", "1"))
        .unwrap()
        .unwrap();
    let kernel_timeout = SocketAddr::from((s.sandbox.black_hole_addr(), PORT + 2));
    let attempt = s
        .client
        .connect(kernel_timeout, Duration::from_secs(30))
        .unwrap();
    assert_eq!(attempt.result, ConnectResult::TimedOut);

    // Unreachable: nobody answers address resolution.
    let absent = SocketAddr::from((s.sandbox.absent_addr(), PORT));
    let attempt = s.client.connect(absent, Duration::from_secs(5)).unwrap();
    assert_eq!(attempt.result, ConnectResult::Other(libc::EHOSTUNREACH));

    // Before Linux 5.15 no tracepoint reports the error: a failure without a RST is
    // classified when its socket is destroyed, as aborted, and the agent judges it by how
    // long it waited.
    let error_report = circuit_agent::kernel::ensure_tracefs()
        .unwrap()
        .join("events/sock/inet_sk_error_report")
        .exists();
    let expected = [
        (refused, ConnectOutcome::Refused),
        (s.target, ConnectOutcome::Connected),
        (s.target, ConnectOutcome::Reset),
        (black_hole, ConnectOutcome::SynRetransmit),
        (black_hole, ConnectOutcome::Aborted),
        (
            kernel_timeout,
            if error_report {
                ConnectOutcome::TimedOut
            } else {
                ConnectOutcome::Aborted
            },
        ),
        (
            absent,
            if error_report {
                ConnectOutcome::Unreachable
            } else {
                ConnectOutcome::Aborted
            },
        ),
    ];
    for (upstream, outcome) in expected {
        // Counted by the kernel per upstream...
        wait_until(
            &format!("kernel count of {outcome:?} for {upstream}"),
            Duration::from_secs(5),
            Duration::from_millis(20),
            || (s.kernel_count(upstream, outcome) >= 1).then_some(()),
        )
        .unwrap();
        // ...and delivered to the agent.
        let name = circuit_agent::engine::outcome_name(outcome);
        s.agent()
            .wait_for_lines(
                &[
                    "connection outcome",
                    &format!("upstream={upstream}"),
                    &format!("outcome={name}"),
                ],
                1,
                Duration::from_secs(5),
            )
            .unwrap();
    }
    assert_eq!(s.stat(Stat::OutcomeDrops), 0);
}

#[test]
fn a_killed_agent_keeps_protecting_until_its_lease_ends_then_fails_open() {
    let mut s = Scenario::start(Setup {
        open_duration: "60s",
        lease: "3s",
        ..Setup::default()
    });
    s.trip();
    s.upstream.set_healthy(true).unwrap();
    s.stop_agent(Signal::SIGKILL);
    let killed = Instant::now();
    // The pinned XDP link outlives the agent: still rejecting.
    assert_eq!(s.connect().result, ConnectResult::Refused);
    // Once the lease ends the kernel treats the verdict as closed.
    wait_until(
        "connects to succeed after the lease",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (s.connect().result == ConnectResult::Connected).then_some(()),
    )
    .unwrap();
    let failed_open_after = killed.elapsed();
    assert!(
        failed_open_after >= Duration::from_millis(500)
            && failed_open_after < Duration::from_secs(8),
        "failed open {failed_open_after:?} after the kill (lease 3s, renewed every 1s)"
    );
    assert!(s.stat(Stat::LeaseExpired) >= 1);
}

#[test]
fn a_restarted_agent_adopts_the_verdicts_it_finds() {
    let mut s = Scenario::start(Setup {
        // Long enough for a slow machine to restart the agent while OPEN, and for the
        // verdict's lease to outlast the restart (loading takes seconds under emulation).
        open_duration: "10s",
        lease: "60s",
        ..Setup::default()
    });
    s.trip();
    assert!(s.stop_agent(Signal::SIGTERM).success());
    // SIGTERM left protection in place.
    s.assert_rejected_fast();

    s.start_agent();
    let adopted = s.transition("CLOSED", "OPEN", Duration::from_secs(5));
    assert!(
        adopted.reason.contains("adopted from the kernel"),
        "{adopted:?}"
    );
    assert!(
        s.agent()
            .lines()
            .iter()
            .any(|l| l.contains("ready") && l.contains("(taken over)")),
        "the XDP link is taken over, not re-attached"
    );
    s.assert_rejected_fast();
    assert_eq!(s.verdict(), Some(VerdictState::Open));
    // The adopted breaker carries on: half-open, a probe, closed.
    s.transition("OPEN", "HALF_OPEN", Duration::from_secs(20));
    assert_eq!(s.connect().result, ConnectResult::Connected);
    s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert_eq!(s.verdict(), None);
}

#[test]
fn detach_removes_programs_links_and_pins_at_once() {
    let mut s = Scenario::start(Setup {
        open_duration: "60s",
        lease: "60s",
        ..Setup::default()
    });
    s.trip();
    s.stop_agent(Signal::SIGTERM);
    s.assert_rejected_fast();

    let out = std::process::Command::new(circuit_tests::agent_binary().unwrap())
        .args(["detach", "--pin-dir"])
        .arg(&s.pins.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.pins.0.exists(), "pin directory removed");
    // No lease to wait for: the programs are gone.
    let result = s.connect().result;
    if result != ConnectResult::Connected {
        let link = std::process::Command::new("ip")
            .args([
                "-n",
                s.sandbox.upstream.name(),
                "-d",
                "link",
                "show",
                &s.sandbox.upstream_if,
            ])
            .output()
            .unwrap();
        panic!(
            "{result:?} after detach; detach said {}; link: {}; again: {:?}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&link.stdout),
            s.connect().result
        );
    }
}

/// One client's burst of connects cannot take the outcome ring from everyone: while the
/// agent does not read (stopped here), a client puts at most its budget of events on the
/// ring, and another client's failures that follow still reach the breakers.
#[test]
fn one_clients_burst_leaves_room_on_the_ring_for_the_others() {
    const BURST: &str = "
import socket, sys, time
n, end = 0, time.time() + float(sys.argv[1])
while time.time() < end:
    s = socket.socket()
    try:
        s.connect(('127.0.0.1', 1))
    except OSError:
        pass
    s.close()
    n += 1
print(n)
";
    let mut s = Scenario::start(Setup::default());
    let cgroup_root = circuit_agent::kernel::ensure_cgroup2_root().unwrap();
    let noisy = circuit_tests::UnprivilegedClient::new(
        &s.sandbox.client,
        &cgroup_root,
        &circuit_tests::unique_name("cbnoisy"),
    )
    .unwrap();
    assert_eq!(s.connect().result, ConnectResult::Connected);
    let throttled_before = s.stat(Stat::OutcomesThrottled);

    s.agent().signal(Signal::SIGSTOP).unwrap();
    let connects = noisy.python(BURST, &["2.5".to_owned()]);
    s.upstream.set_healthy(false).unwrap();
    for _ in 0..common::THRESHOLD {
        assert_eq!(s.connect().result, ConnectResult::Refused);
    }
    s.agent().signal(Signal::SIGCONT).unwrap();
    let connects = connects.unwrap();
    s.transition("CLOSED", "OPEN", Duration::from_secs(10));
    let throttled = s.stat(Stat::OutcomesThrottled) - throttled_before;
    eprintln!(
        "ring share: noisy client made {} connects in 2.5 s, {throttled} outcomes kept off the ring, {} dropped",
        connects.trim(),
        s.stat(Stat::OutcomeDrops)
    );
    // Under emulation (a VM of the kernel matrix) python may not even spend its budget.
    let budget = circuit_common::ClientBudget::BURST + circuit_common::ClientBudget::RATE * 5 / 2;
    if connects.trim().parse::<u64>().unwrap() > budget {
        assert!(throttled > 0, "the noisy client was held to its budget");
    }
}
