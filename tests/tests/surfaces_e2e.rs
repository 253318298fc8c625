//! The agent's own surfaces cannot be turned against it: the HTTP endpoint and the control
//! socket bound their clients (connections, time, request size), a failing accept does not
//! spin, the socket replaces nothing but a stale socket, and one pin dir or socket serves
//! one agent at a time. Fuzz targets for the control socket and the reload path (200 and 40
//! cases by default; `PROPTEST_CASES` for more).

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    process::Command,
    time::{Duration, Instant},
};

use circuit_tests::{RemoveOnDrop, agent_binary, unique_name};
use common::{Scenario, Setup};

/// The agent's default metrics address, in its network namespace.
const METRICS: &str = "127.0.0.1:9464";

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// User and system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) are space-separated.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `n` connections to the metrics endpoint that never send a byte, from the agent's
/// namespace.
fn idle_connections(s: &Scenario, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = METRICS.parse().unwrap();
    s.sandbox
        .upstream
        .run(|| {
            (0..n)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap()
}

fn healthz(s: &Scenario) -> String {
    s.sandbox
        .upstream
        .run(|| {
            let mut c = TcpStream::connect(METRICS).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).unwrap();
            reply
        })
        .unwrap()
}

/// The agent still answers `status`.
fn assert_status_answers(s: &Scenario) {
    let out = status(s);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status(s: &Scenario) -> std::process::Output {
    s.cli(&[
        "status",
        "--pin-dir",
        s.pins.0.to_str().unwrap(),
        "--socket",
        s.socket().to_str().unwrap(),
    ])
}

/// Whether the server closed `c` (EOF or reset) within `within`.
fn closed_by_server(c: &mut TcpStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match c.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// 700 idle connections took the agent from 10 MB to 291 MB before: now at most 256 are
/// served, each with small buffers, and each must send its headers within 5 s.
#[test]
fn idle_http_connections_are_capped_and_timed_out() {
    let s = Scenario::start(Setup::default());
    let pid = s.agent().pid();
    let before = rss_kib(pid);
    let mut conns = idle_connections(&s, 700);
    // Those past the cap are closed at once.
    let last = conns.last_mut().unwrap();
    assert!(
        closed_by_server(last, Duration::from_secs(5)),
        "past the cap"
    );
    let during = rss_kib(pid);
    eprintln!(
        "surfaces: 700 idle HTTP connections: RSS {before} KiB before, {during} KiB with them"
    );
    assert!(during < before + 32 * 1024, "{before} KiB -> {during} KiB");
    // The first ones, never having sent headers, are closed by the header timeout.
    let first = conns.first_mut().unwrap();
    let started = Instant::now();
    assert!(
        closed_by_server(first, Duration::from_secs(30)),
        "the header timeout closes an idle connection"
    );
    eprintln!(
        "surfaces: the first idle connection closed {:?} after the check started",
        started.elapsed()
    );
    drop(conns);
    assert!(healthz(&s).contains("200 OK"));
}

/// With no descriptor left (EMFILE), a pending connection keeps accept failing: the agent
/// backs off instead of spinning a core.
#[test]
fn a_failing_accept_does_not_spin() {
    let s = Scenario::start(Setup::default());
    let pid = s.agent().pid();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // A few descriptors of headroom for the agent's own work, none for a new connection:
    // the soft limit only, put back afterwards.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_owned();
    let limit = (open_fds + 2).to_string();
    let set = |limit: &str| {
        let out = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set(&limit);
    let _pending = idle_connections(&s, 20);
    let ticks = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_ticks(pid) - ticks;
    set(&soft);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    eprintln!("surfaces: EMFILE on accept: {spent} ticks of CPU in 3 s ({hz} per second)");
    // A spinning loop spends all 3 s of a core; backing off, next to nothing.
    assert!(spent < hz, "{spent} ticks in 3 s");
    assert!(
        s.agent
            .as_ref()
            .unwrap()
            .lines()
            .iter()
            .any(|l| l.contains("cannot accept"))
    );
    assert!(healthz(&s).contains("200 OK"));
}

/// A control client must send its request line within 5 s and at most 4 KiB of it.
#[test]
fn control_clients_are_bounded_in_time_and_size() {
    let s = Scenario::start(Setup::default());
    let mut silent = UnixStream::connect(s.socket()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    silent.read_to_end(&mut buf).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed by the agent"
    );

    let mut huge = UnixStream::connect(s.socket()).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = huge.write_all(&vec![b'x'; 1 << 20]);
    let mut reply = String::new();
    let _ = huge.read_to_string(&mut reply);
    assert!(reply.contains("longer than 4096 bytes"), "{reply}");

    assert_status_answers(&s);
}

/// Another agent attached next to `s`'s (cgroup enforcement, in its upstream namespace)
/// on `pin_dir` and `socket`, run to its exit.
fn second_agent(
    s: &Scenario,
    pin_dir: &std::path::Path,
    socket: &std::path::Path,
) -> std::process::Output {
    s.sandbox
        .upstream
        .command(agent_binary().unwrap())
        .unwrap()
        .args([
            "attach",
            "--enforce",
            "cgroup",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

/// A second agent on a pin dir in use, or on a socket in use, stops with a clear error and
/// leaves the first running.
#[test]
fn one_agent_per_pin_dir_and_per_socket() {
    let mut s = Scenario::start(Setup::default());
    let other_socket = s.scratch.0.join("other.sock");
    let out = second_agent(&s, &s.pins.0, &other_socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another circuit agent"), "{err}");

    let other_pins = RemoveOnDrop(std::path::Path::new("/sys/fs/bpf").join(unique_name("cbpin")));
    let out = second_agent(&s, &other_pins.0, &s.socket());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another circuit agent"), "{err}");

    // An offline write, pointed at a socket nobody answers on, still finds the agent: by
    // its lock on the pins. Nothing is written.
    let target = s.target.to_string();
    let out = s.cli(&[
        "trip",
        &target,
        "--offline",
        "--for",
        "1m",
        "--pin-dir",
        s.pins.0.to_str().unwrap(),
        "--socket",
        other_socket.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("an agent holds"), "{err}");
    assert_eq!(s.verdict(), None);

    assert!(s.agent.as_mut().unwrap().try_wait().unwrap().is_none());
    assert_status_answers(&s);
}

/// `--socket` at a file that is not a socket: refused, the file kept; the directory it is in
/// keeps its mode (a sticky, world-writable /tmp stays so).
#[test]
fn the_socket_replaces_nothing_but_a_socket() {
    let s = Scenario::start(Setup::default());
    let shared = RemoveOnDrop(std::env::temp_dir().join(unique_name("cbshared")));
    std::fs::create_dir(&shared.0).unwrap();
    std::fs::set_permissions(&shared.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let precious = shared.0.join("precious");
    std::fs::write(&precious, "data").unwrap();
    let other_pins = RemoveOnDrop(std::path::Path::new("/sys/fs/bpf").join(unique_name("cbpin")));
    let out = second_agent(&s, &other_pins.0, &precious);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "data");
    let mode = std::fs::metadata(&shared.0).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777);
}

/// The config file replaced by a FIFO (nobody writing) or by a huge file: each is rejected
/// with a read error and the agent goes on answering; before, opening the FIFO hung the
/// event loop (health, SIGTERM).
#[test]
fn a_config_file_that_cannot_be_read_in_time_hangs_nothing() {
    let s = Scenario::start(Setup::default());
    let replace_with = |make: &dyn Fn(&std::path::Path)| {
        let tmp = s.scratch.0.join("replacement");
        make(&tmp);
        std::fs::rename(&tmp, s.config_path()).unwrap();
    };
    replace_with(&|p| {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
    });
    s.agent()
        .wait_for_line("not a regular file", Duration::from_secs(10))
        .unwrap();
    assert!(status(&s).status.success(), "the agent answers");
    replace_with(&|p| std::fs::write(p, "#".repeat(2 << 20)).unwrap());
    s.agent()
        .wait_for_line("a configuration is at most", Duration::from_secs(10))
        .unwrap();
    assert!(status(&s).status.success(), "the agent answers");
    assert!(healthz(&s).contains("200 OK"));
}

/// The valid requests the mutations below start from, one JSON line each.
fn seed_requests(s: &Scenario) -> Vec<Vec<u8>> {
    let target = s.target.to_string();
    [
        r#"{"cmd":"status"}"#.to_owned(),
        format!(r#"{{"cmd":"inspect","upstream":"{target}"}}"#),
        r#"{"cmd":"recent"}"#.to_owned(),
        format!(r#"{{"cmd":"trip","upstream":"{target}","duration_ms":1000}}"#),
        format!(r#"{{"cmd":"reset","upstream":"{target}"}}"#),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// One byte-level edit of a request.
#[derive(Clone, Debug)]
enum Edit {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Repeat(usize),
}

fn edit(mut bytes: Vec<u8>, e: &Edit) -> Vec<u8> {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
    match e {
        Edit::Truncate(i) => bytes.truncate(at(*i, bytes.len())),
        Edit::Flip(i, b) => {
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes[i] ^= b;
            }
        }
        Edit::Insert(i, more) => {
            let i = at(*i, bytes.len());
            bytes.splice(i..i, more.iter().copied());
        }
        Edit::Repeat(n) => bytes = bytes.repeat(1 + n % 300),
    }
    bytes
}

fn edits() -> impl proptest::strategy::Strategy<Value = Vec<Edit>> {
    use proptest::prelude::*;
    let one = prop_oneof![
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1u8..).prop_map(|(i, b)| Edit::Flip(i, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        any::<usize>().prop_map(Edit::Repeat),
    ];
    proptest::collection::vec(one, 0..4)
}

fn fuzz_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

/// A fuzz target for the control socket: mutated and random requests (garbage, cut, huge,
/// repeated lines) each get an answer or a close within the time limits, every answer is
/// JSON, and the agent keeps running and answering.
#[test]
fn fuzzed_control_requests_hurt_nothing() {
    use proptest::{prelude::*, test_runner::TestRunner};
    let mut s = Scenario::start(Setup::default());
    let seeds = seed_requests(&s);
    let requests = (
        0..seeds.len(),
        edits(),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(move |(seed, edits, random)| {
            if edits.is_empty() && seed == 0 {
                return random; // pure garbage now and then
            }
            edits.iter().fold(seeds[seed].clone(), edit)
        });
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: fuzz_cases(),
        failure_persistence: None,
        ..Default::default()
    });
    let socket = s.socket();
    runner
        .run(&requests, |mut request| {
            request.push(b'\n');
            let mut stream = UnixStream::connect(&socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            // A huge request may be cut off by the agent mid-write.
            let _ = stream.write_all(&request);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut reply = Vec::new();
            match stream.read_to_end(&mut reply) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => return Err(TestCaseError::fail(format!("no answer nor close: {e}"))),
            }
            for line in String::from_utf8_lossy(&reply).lines() {
                prop_assert!(
                    serde_json::from_str::<serde_json::Value>(line).is_ok(),
                    "not JSON: {line:?}"
                );
            }
            Ok(())
        })
        .unwrap();
    assert!(s.agent.as_mut().unwrap().try_wait().unwrap().is_none());
    assert_status_answers(&s);
}

/// A fuzz target for the reload path: mutated configuration files, each reloaded at once
/// (SIGHUP), are applied or rejected whole, and the agent keeps running; a valid file
/// afterwards applies.
#[test]
fn fuzzed_configuration_reloads_hurt_nothing() {
    use nix::sys::signal::Signal;
    use proptest::{prelude::*, test_runner::TestRunner};
    let mut s = Scenario::start(Setup {
        failure_threshold: 0, // from the file
        ..Setup::default()
    });
    let seed = std::fs::read(s.config_path()).unwrap();
    let mut seed = seed;
    seed.extend_from_slice(b"[defaults]\nfailure_threshold = 5\n");
    let outcomes = |s: &Scenario| {
        s.agent()
            .lines()
            .iter()
            .filter(|l| {
                l.contains("configuration reloaded") || l.contains("configuration rejected")
            })
            .count()
    };
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: fuzz_cases() / 5,
        failure_persistence: None,
        ..Default::default()
    });
    let tmp = s.scratch.0.join("fuzz.toml");
    runner
        .run(&edits(), |edits| {
            let text = edits.iter().fold(seed.clone(), edit);
            let before = outcomes(&s);
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, s.config_path()).unwrap();
            s.agent().signal(Signal::SIGHUP).unwrap();
            // Reloaded or rejected (the file watcher may have reloaded it first): each
            // change gets an answer.
            let deadline = Instant::now() + Duration::from_secs(10);
            while outcomes(&s) == before {
                prop_assert!(
                    Instant::now() < deadline,
                    "no reload outcome for {:?}",
                    String::from_utf8_lossy(&text)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
        .unwrap();
    // A valid file applies: the threshold it sets is the one that trips.
    let before = outcomes(&s);
    s.write_config("[defaults]\nfailure_threshold = 2\n");
    s.agent().signal(Signal::SIGHUP).unwrap();
    circuit_tests::wait_until(
        "the valid configuration",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (outcomes(&s) > before).then_some(()),
    )
    .unwrap();
    s.upstream.set_healthy(false).unwrap();
    for _ in 0..2 {
        s.connect();
    }
    let line = s.transition("CLOSED", "OPEN", Duration::from_secs(5));
    assert!(line.reason.contains("(threshold 2)"), "{line:?}");
}
