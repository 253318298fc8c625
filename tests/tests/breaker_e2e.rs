//! End to end: the real agent binary, real sockets, two network namespaces joined by a veth
//! pair, XDP on the upstream side's veth. Each test makes (and removes) its own sandbox.

mod common;

use std::time::Duration;

use circuit_common::VerdictState;
use circuit_tests::ConnectResult;
use common::{HALF_OPEN_WAIT, SHORT_OPEN, Scenario, Setup};

fn setup() -> Setup {
    Setup {
        open_duration: SHORT_OPEN,
        ..Setup::default()
    }
}

#[test]
fn refusing_upstream_trips_fails_fast_and_heals_after_a_probe() {
    let mut s = Scenario::start(setup());
    // `--xdp-mode auto` detects the veth driver and uses generic mode, where XDP_TX works.
    let ready = s
        .agent()
        .lines()
        .into_iter()
        .find(|l| l.contains("ready"))
        .unwrap();
    assert!(
        ready.contains(&format!("xdp {} (generic)", s.sandbox.upstream_if)),
        "{ready}"
    );
    s.trip();
    s.assert_rejected_fast();

    // `status` reads the kernel's view from the pins.
    let pins = s.pins.0.to_str().unwrap().to_owned();
    let socket = s.socket().to_str().unwrap().to_owned();
    let status = s.cli(&["status", "--pin-dir", &pins, "--socket", &socket]);
    assert!(status.status.success());
    let table = String::from_utf8_lossy(&status.stdout);
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with(&s.target.to_string()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("OPEN"), "{row}");

    let half_open = s.transition("OPEN", "HALF_OPEN", HALF_OPEN_WAIT);
    // Our own rejects were recognised as such, not mistaken for a refusing upstream.
    assert!(half_open.counts.rejected >= 3, "{half_open:?}");
    assert_eq!(s.verdict(), Some(VerdictState::HalfOpen));

    assert_eq!(s.connect().result, ConnectResult::Connected, "the probe");
    let closed = s.transition("HALF_OPEN", "CLOSED", Duration::from_secs(5));
    assert!(closed.reason.contains("1 successful probes"), "{closed:?}");
    assert_eq!(s.verdict(), None);
    assert_eq!(s.connect().result, ConnectResult::Connected);

    let status = s.stop_agent(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "agent exit: {status}");
}

#[test]
fn a_probe_to_a_still_refusing_upstream_reopens_the_breaker() {
    let mut s = Scenario::start(setup());
    s.trip();
    s.transition("OPEN", "HALF_OPEN", HALF_OPEN_WAIT);
    // The probe is admitted by the kernel and refused by the upstream itself.
    assert_eq!(s.connect().result, ConnectResult::Refused);
    let reopened = s.transition("HALF_OPEN", "OPEN", Duration::from_secs(5));
    assert!(
        reopened.reason.contains("probe failed: refused"),
        "{reopened:?}"
    );
    assert_eq!(s.verdict(), Some(VerdictState::Open));
    // Back to rejecting in the kernel.
    let attempt = s.connect();
    assert_eq!(attempt.result, ConnectResult::Refused);
    assert!(attempt.elapsed < common::fast());
}
