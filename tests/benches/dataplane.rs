//! Per-packet cost of the XDP enforcement program, each path next to an empty XDP program
//! measured in the same run (BPF_PROG_TEST_RUN; the kernel reports ns per run).
//!
//! Run through `cargo xtask bench [--quick]`, which also collects the results. Prints a
//! markdown table and writes JSON to $CIRCUIT_BENCH_JSON (default target/bench/xdp.json).

#[path = "report.rs"]
mod report;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use circuit_agent::{
    kernel::ProgramsUnderTest,
    time::{Clock, MonotonicClock},
};
use circuit_common::program_names;
use circuit_tests::{
    RemoveOnDrop,
    frames::{CLOSED_PORT, OPEN_PORT, UPSTREAM, syn_v4, with_tcp_flags},
    require_root, unique_name,
};
use report::Row;

/// An upstream with an OPEN verdict, and one without a verdict (tracked, not open): the
/// fixtures' addressing plan (circuit_tests::frames).
const OPEN: SocketAddr = SocketAddr::new(
    IpAddr::V4(Ipv4Addr::new(
        UPSTREAM[0],
        UPSTREAM[1],
        UPSTREAM[2],
        UPSTREAM[3],
    )),
    OPEN_PORT,
);

/// One BPF_PROG_TEST_RUN call of `repeat` runs: ns per run, from the CPU time this thread
/// spent in the call. The kernel's own figure is whole nanoseconds (its total divided by
/// `repeat`), too coarse next to a ~25 ns baseline; CPU time, unlike wall time, leaves out
/// the moments another task had the CPU, as the kernel's timer does. The call's fixed cost
/// (copying the frame in) is spread over `repeat` runs and disappears.
fn run_ns(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let start = thread_cpu_time();
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })
    .unwrap();
    (thread_cpu_time() - start).as_nanos() as f64 / f64::from(repeat)
}

/// Pins this thread (and so the test runs it makes) to the CPU it is on: both programs of a
/// pair then run on the same core.
fn stay_on_this_cpu() {
    // SAFETY: plain libc calls on this thread; `set` is a valid, zeroed cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into; this clock exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// (baseline, candidate) from `rounds` rounds, each measuring both back to back so that they
/// see the same machine state (frequency, caches, the other core's load): the pair of the
/// round whose ratio is the median. A pair from one round, rather than the median of each
/// side from different rounds, keeps a round where only one side was disturbed out of the
/// ratio.
fn measure_pair(
    baseline: &Xdp,
    candidate: &Xdp,
    frame: &[u8],
    repeat: u32,
    rounds: usize,
) -> (f64, f64) {
    let mut pairs: Vec<(f64, f64)> = (0..rounds)
        .map(|_| {
            (
                run_ns(baseline, frame, repeat),
                run_ns(candidate, frame, repeat),
            )
        })
        .collect();
    pairs.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    pairs[pairs.len() / 2]
}

/// For a program that rewrites its frame (the RST path), `repeat` would re-run on the
/// rewritten frame, so each call runs once on a fresh copy; the mean over `calls` is taken.
fn measure_single(prog: &Xdp, frame: &[u8], calls: usize) -> f64 {
    let mut out = vec![0u8; 256];
    let total: u128 = (0..calls)
        .map(|_| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap()
            .duration
            .as_nanos()
        })
        .sum();
    total as f64 / calls as f64
}

fn main() {
    require_root().unwrap();
    stay_on_this_cpu();
    let quick = std::env::args().any(|a| a == "--quick");
    let (repeat, rounds, calls) = if quick {
        (500_000, 7, 20_000)
    } else {
        (2_000_000, 15, 200_000)
    };
    let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbbench")));
    let mut programs = ProgramsUnderTest::load(&pins.0).unwrap();
    let syn_open = syn_v4(OPEN_PORT);
    // The same connection's later segment: ACK only.
    let ack = with_tcp_flags(syn_v4(OPEN_PORT), 0x10);
    let tracked_syn = syn_v4(CLOSED_PORT);

    // Nothing open: no verdict at all, the fast path.
    let (empty_syn, nothing_open, empty_ack, non_syn_nothing_open) = {
        let baseline = programs.xdp(program_names::XDP_BASELINE);
        let enforce = programs.xdp(program_names::XDP_ENFORCE);
        let syn = measure_pair(baseline, enforce, &syn_open, repeat, rounds);
        let ack = measure_pair(baseline, enforce, &ack, repeat, rounds);
        (syn.0, syn.1, ack.0, ack.1)
    };

    // Some verdict exists (for OPEN), so every frame is parsed and SYNs are looked up.
    let lease = MonotonicClock
        .now()
        .saturating_add(Duration::from_secs(600));
    programs.verdicts.reject(OPEN, lease).unwrap();
    let baseline = programs.xdp(program_names::XDP_BASELINE);
    let enforce = programs.xdp(program_names::XDP_ENFORCE);
    let (empty_ack_2, non_syn) = measure_pair(baseline, enforce, &ack, repeat, rounds);
    let (empty_tracked, tracked) = measure_pair(baseline, enforce, &tracked_syn, repeat, rounds);
    let empty_single = measure_single(baseline, &syn_open, calls);
    let rst = measure_single(enforce, &syn_open, calls);

    let rows = [
        Row {
            name: "non-SYN frame, nothing open (fast path)",
            value: non_syn_nothing_open,
            baseline: empty_ack,
            unit: "ns/packet",
            target: Some(1.15),
        },
        Row {
            name: "non-SYN frame (verdicts present)",
            value: non_syn,
            baseline: empty_ack_2,
            unit: "ns/packet",
            target: Some(1.15),
        },
        Row {
            name: "SYN, nothing open (fast path)",
            value: nothing_open,
            baseline: empty_syn,
            unit: "ns/packet",
            target: Some(1.3),
        },
        Row {
            name: "SYN to a tracked, non-open upstream",
            value: tracked,
            baseline: empty_tracked,
            unit: "ns/packet",
            target: Some(2.5),
        },
        Row {
            name: "SYN to an OPEN upstream (RST reply, XDP_TX)",
            value: rst,
            baseline: empty_single,
            unit: "ns/packet",
            target: None,
        },
    ];
    report::publish("xdp", ["XDP path", "enforce", "empty XDP"], &rows);
}
