//! End to end, the decision side: groups and their ejection cap, live reload, operator
//! overrides, priority clients and check-config, with the real agent in a sandbox.

mod common;

use std::{net::SocketAddr, os::unix::fs::MetadataExt, time::Duration};

use circuit_common::VerdictState;
use circuit_tests::{
    ConnectResult, RemoveOnDrop, UnprivilegedClient, Upstream, unique_name, wait_until,
};
use common::{PORT, Scenario, Setup};
use nix::sys::signal::Signal;

fn str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn verdict_of(s: &Scenario, upstream: SocketAddr) -> Option<VerdictState> {
    circuit_agent::kernel::VerdictTable::open_pinned(&s.pins.0)
        .unwrap()
        .get(upstream)
        .unwrap()
        .map(|v| v.state)
}

#[test]
fn a_group_never_has_more_than_its_max_ejection_percent_isolated() {
    let mut s = Scenario::start(Setup::default());
    let ip = s.target.ip();
    s.write_config(&format!(
        r#"[[groups]]
name = "svc"
upstreams = [{{ cidr = "{ip}", ports = [{PORT}, {}, {}] }}]
max_ejection_percent = 34
always_eject_one = false
"#,
        PORT + 1,
        PORT + 2
    ));
    s.agent()
        .wait_for_line("configuration reloaded", Duration::from_secs(5))
        .unwrap();
    let members: Vec<SocketAddr> = (0..3).map(|i| SocketAddr::new(ip, PORT + i)).collect();
    let extra: Vec<Upstream> = members[1..]
        .iter()
        .map(|m| Upstream::start(&s.sandbox.upstream, *m).unwrap())
        .collect();
    for m in &members {
        assert_eq!(s.connect_to(*m).result, ConnectResult::Connected);
    }
    // Two of the three fail; 34 % of three allows one isolation.
    s.upstream.set_healthy(false).unwrap();
    drop(extra); // the listener on PORT + 1 closes (PORT + 2 with it; it stays unused)
    for _ in 0..common::THRESHOLD {
        for m in &members[..2] {
            assert_eq!(s.connect_to(*m).result, ConnectResult::Refused);
        }
    }
    s.agent()
        .wait_for_line("trip suppressed", Duration::from_secs(5))
        .unwrap();
    let open: Vec<_> = members[..2]
        .iter()
        .filter(|m| verdict_of(&s, **m) == Some(VerdictState::Open))
        .collect();
    assert_eq!(
        open.len(),
        1,
        "exactly one of the two failing members is isolated"
    );
}

#[test]
fn a_reload_changes_thresholds_and_keeps_breaker_state() {
    let mut s = Scenario::start(Setup {
        failure_threshold: 0, // from the file
        ..Setup::default()
    });
    s.write_config("[defaults]\nfailure_threshold = 5\n");
    s.agent()
        .wait_for_line("configuration reloaded", Duration::from_secs(5))
        .unwrap();
    s.upstream.set_healthy(false).unwrap();
    for _ in 0..2 {
        assert_eq!(s.connect().result, ConnectResult::Refused);
    }
    // Two failures counted so far; lower the threshold to 3.
    s.write_config("[defaults]\nfailure_threshold = 3\n");
    s.agent()
        .wait_for_lines(&["configuration reloaded"], 2, Duration::from_secs(5))
        .unwrap();
    assert_eq!(verdict_of(&s, s.target), None);
    // One more failure makes three in a row: the count survived the reload.
    assert_eq!(s.connect().result, ConnectResult::Refused);
    let line = s.transition("CLOSED", "OPEN", Duration::from_secs(5));
    assert_eq!(line.reason, "3 consecutive failures (threshold 3)");

    // A broken file is rejected; the running configuration and the verdict stay.
    std::fs::write(
        s.config_path(),
        "[defaults]\nfailure_threshold = \"many\"\n",
    )
    .unwrap();
    let rejected = s
        .agent()
        .wait_for_line("configuration rejected", Duration::from_secs(5))
        .unwrap();
    assert!(rejected.contains("circuit.toml:2:"), "{rejected}");
    s.assert_rejected_fast();
    assert_eq!(verdict_of(&s, s.target), Some(VerdictState::Open));
    // SIGHUP reloads too (and rejects the same file again).
    s.agent().signal(Signal::SIGHUP).unwrap();
    s.agent()
        .wait_for_lines(&["configuration rejected"], 2, Duration::from_secs(5))
        .unwrap();
    assert_eq!(verdict_of(&s, s.target), Some(VerdictState::Open));
}

/// The [agent] section applies only at start: a reload that changes it says so every time
/// (the running configuration keeps what is in force) and applies the rest.
#[test]
fn an_agent_section_change_warns_at_every_reload_and_the_rest_applies() {
    let mut s = Scenario::start(Setup {
        failure_threshold: 0, // from the file
        ..Setup::default()
    });
    let agent_section = "[agent]\nmetrics_address = \"127.0.0.1:9999\"\n";
    s.write_config(&format!(
        "{agent_section}[defaults]\nfailure_threshold = 4\n"
    ));
    s.agent()
        .wait_for_line("restart the agent to apply it", Duration::from_secs(5))
        .unwrap();
    s.write_config(&format!(
        "{agent_section}[defaults]\nfailure_threshold = 2\n"
    ));
    s.agent()
        .wait_for_lines(
            &["restart the agent to apply it"],
            2,
            Duration::from_secs(5),
        )
        .unwrap();
    s.agent()
        .wait_for_lines(&["configuration reloaded"], 2, Duration::from_secs(5))
        .unwrap();
    // The policy part did apply: two refusals trip.
    s.upstream.set_healthy(false).unwrap();
    for _ in 0..2 {
        assert_eq!(s.connect().result, ConnectResult::Refused);
    }
    let line = s.transition("CLOSED", "OPEN", Duration::from_secs(5));
    assert!(line.reason.contains("(threshold 2)"), "{line:?}");
}

#[test]
fn operators_trip_reset_disable_and_enable_upstreams() {
    let mut s = Scenario::start(Setup::default());
    let (pins, target) = (str(&s.pins.0).to_owned(), s.target.to_string());
    let socket = str(&s.socket()).to_owned();
    let pin_args = ["--pin-dir", pins.as_str(), "--socket", socket.as_str()];
    let run = |s: &Scenario, verb: &str| {
        let mut args = vec![verb, target.as_str()];
        args.extend(pin_args);
        let out = s.cli(&args);
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    run(&s, "trip");
    // The agent answers once the verdict is in the kernel: enforced at once.
    let attempt = s.connect();
    assert_eq!(attempt.result, ConnectResult::Refused);
    s.transition("CLOSED", "FORCED_OPEN", Duration::from_secs(5));

    // A trip survives an agent restart: the next agent re-applies it.
    s.stop_agent(Signal::SIGTERM);
    s.start_agent();
    // The new agent adopts the kernel's verdict, then applies the pinned override.
    s.events()
        .wait_for_lines(
            &[
                &format!("\"upstream\":\"{target}\""),
                "\"to\":\"FORCED_OPEN\"",
            ],
            1,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(s.connect().result, ConnectResult::Refused);
    let status = s.cli(&[
        "status",
        "--pin-dir",
        &pins,
        "--socket",
        &socket,
        "-o",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["source"], "agent");
    let row = common::entry_for(&json["breakers"], &target);
    assert_eq!(row["state"], "FORCED_OPEN");
    assert_eq!(json["overrides"][0]["kind"], "FORCED_OPEN");

    run(&s, "reset");
    assert_eq!(s.connect().result, ConnectResult::Connected);
    s.transition("FORCED_OPEN", "CLOSED", Duration::from_secs(5));

    // Disabled: failures never trip it.
    run(&s, "disable");
    s.transition("CLOSED", "DISABLED", Duration::from_secs(5));
    s.upstream.set_healthy(false).unwrap();
    for _ in 0..common::THRESHOLD + 2 {
        assert_eq!(s.connect().result, ConnectResult::Refused);
    }
    assert_eq!(verdict_of(&s, s.target), None);
    run(&s, "enable");
    s.transition("DISABLED", "CLOSED", Duration::from_secs(5));
    for _ in 0..common::THRESHOLD {
        assert_eq!(s.connect().result, ConnectResult::Refused);
    }
    s.transition("CLOSED", "OPEN", Duration::from_secs(5));

    // The never-isolate list (port 53 everywhere by default) holds against operators too:
    // refused, exit 1, nothing written.
    let out = s.cli(&[
        "trip",
        "127.0.0.53:53",
        "--pin-dir",
        &pins,
        "--socket",
        &socket,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("never-isolate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A malformed upstream is a usage error.
    let out = s.cli(&["trip", "10.0.0.300:80", "--pin-dir", &pins]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an upstream"));
}

/// A priority cgroup is followed by its path: configured before it exists (a service not
/// started yet), and re-created with a new id (a restarted service), it stays exempt.
#[test]
fn priority_clients_are_never_rejected() {
    let cgroup_root = circuit_agent::kernel::ensure_cgroup2_root().unwrap();
    let name = unique_name("cbprio");
    let mut s = Scenario::start(Setup {
        enforce: "cgroup",
        config: format!("[priority]\ncgroups = [\"/{name}\"]\n"),
        // Long enough to outlast slow starts of the priority client (python3 in a VM).
        open_duration: "60s",
        ..Setup::default()
    });
    s.agent()
        .wait_for_line("priority cgroup not found", Duration::from_secs(5))
        .unwrap();
    s.trip();
    s.upstream.set_healthy(true).unwrap();
    assert_eq!(
        s.connect().result,
        s.rejected(),
        "ordinary clients are rejected"
    );

    let mut ids = Vec::new();
    for _service_start in 0..2 {
        // The service (re)starts: its cgroup is a new one at the configured path.
        let client = UnprivilegedClient::new(&s.sandbox.client, &cgroup_root, &name).unwrap();
        ids.push(std::fs::metadata(client.cgroup()).unwrap().ino());
        wait_until(
            "the priority client to be admitted",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let attempt = client.connect(s.target, Duration::from_secs(2)).unwrap();
                (attempt.result == ConnectResult::Connected).then_some(())
            },
        )
        .unwrap();
    }
    assert_ne!(ids[0], ids[1], "a re-created cgroup has a new id");
    assert!(s.stat(circuit_common::Stat::ExemptAdmitted) >= 2);
    // The kernel's own log record of it, forwarded by the agent into its log.
    s.agent()
        .wait_for_line(
            "priority client admitted to isolated upstream",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(
        s.connect().result,
        s.rejected(),
        "ordinary clients are still rejected"
    );
}

fn check_config(file: &std::path::Path) -> std::process::Output {
    std::process::Command::new(circuit_tests::agent_binary().unwrap())
        .args(["check-config", str(file)])
        .output()
        .unwrap()
}

#[test]
fn check_config_names_the_file_line_column_and_field() {
    let dir = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbchk")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("bad.toml");
    std::fs::write(&file, "[defaults]\nfailure_threshold = 3\n\n[[groups]]\nname = \"a\"\nmax_ejection_percent = 140\n").unwrap();
    let out = check_config(&file);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:6:"), "{err}");
    assert!(err.contains("max_ejection_percent"), "{err}");

    std::fs::write(&file, "[defaults]\nfailure_treshold = 3\n").unwrap();
    let out = check_config(&file);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failure_treshold"));

    std::fs::write(&file, circuit_agent::config::EXAMPLE_CONFIG).unwrap();
    let out = check_config(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
