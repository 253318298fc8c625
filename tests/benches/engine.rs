//! Cost of the breaker engine (`circuit_agent::engine::Breakers`) per recorded outcome and
//! per decision, and its heap per tracked upstream, each next to the `failsafe` crate (one
//! failsafe breaker per upstream in a HashMap, the usual way to use a Rust circuit-breaker
//! library) measured in the same run on the same seeded workload.
//!
//! Run through `cargo xtask bench [--quick]`, which also collects the results. Prints a
//! markdown table and writes JSON to $CIRCUIT_BENCH_JSON (default target/bench/engine.json).

#[path = "report.rs"]
mod report;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use circuit_agent::engine::{
    BreakerPolicy, BreakerState, Breakers, Decision, EngineConfig, ManualClock, MonoTime,
    Transition, WindowKind, estimated_bytes_per_upstream,
};
use circuit_common::ConnectOutcome;
use failsafe::{
    CircuitBreaker, FailurePolicy, StateMachine,
    backoff::{self, Exponential},
    clock::MockClock,
    failure_policy::{
        ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow, consecutive_failures,
        success_rate_over_time_window,
    },
};
use report::{Row, median};

/// Heap bytes currently allocated by the process, as requested (the allocator's own
/// per-chunk overhead is not counted, so failsafe's one `Arc` per breaker costs a little
/// more in reality than reported here).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// `System`, counting live bytes, so that both engines' heap is measured the same way.
struct CountingAlloc;

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (i.e. `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static HEAP: CountingAlloc = CountingAlloc;

/// Upstreams in the timed workload.
const UPSTREAMS: u32 = 1_000;
/// Upstreams that take half of all connections: a node talks mostly to a few services.
const HOT: u32 = 100;
/// Simulated time between two outcomes: 1,000 connects/s on the node, so outcome `i`
/// happens at `i` ms.
const STEP: Duration = Duration::from_millis(1);
/// Per mille of upstreams that have one outage (30 s to 3 min) during the run: enough trips
/// for the OPEN and HALF_OPEN paths, far below the node panic guard's 50 %.
const OUTAGE_PER_MILLE: u64 = 50;
/// Per mille of connects that fail during an outage, and outside one (noise that never
/// reaches five in a row).
const OUTAGE_FAILURES: u64 = 950;
const NOISE_FAILURES: u64 = 2;
/// Outcomes one engine takes before the other gets the same ones: about a millisecond of
/// work, short enough for both to see the same machine state (frequency, caches, the other
/// core's load), long enough for reading the timer not to matter.
const CHUNK: usize = 10_000;
/// Upstreams tracked for the memory figures: the most an agent tracks (`tracking.max_upstreams`
/// is bounded by the kernel's verdict map).
const MANY: u32 = circuit_common::VERDICTS_CAPACITY;

/// xorshift64: a reproducible workload without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `0..n`; the modulo bias is irrelevant for n ≪ 2⁶⁴.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1_000) < per_mille
    }
}

/// The `i`-th upstream: IPv4 in 10/8, every tenth one IPv6, on a few service ports (never
/// 53, which is not tracked by default).
fn upstream_addr(i: u32) -> SocketAddr {
    let port = [443, 8080, 5432, 6379][i as usize % 4];
    let ip = if i % 10 == 9 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
    };
    SocketAddr::new(ip, port)
}

#[derive(Clone, Copy)]
struct Event {
    upstream: u32,
    outcome: ConnectOutcome,
    /// Connect latency; 0 when the kernel did not see one (failures), as the daemon gets it.
    latency_us: u32,
}

/// The outcome stream every engine is fed, generated once.
struct Workload {
    addrs: Vec<SocketAddr>,
    stream: Vec<Event>,
}

impl Workload {
    fn generate(outcomes: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let outages: Vec<Option<Range<usize>>> = (0..UPSTREAMS)
            .map(|_| {
                rng.chance(OUTAGE_PER_MILLE).then(|| {
                    let start = rng.below(outcomes as u64) as usize;
                    start..start + 30_000 + rng.below(150_000) as usize
                })
            })
            .collect();
        let stream = (0..outcomes)
            .map(|i| {
                let upstream = if rng.chance(500) {
                    rng.below(HOT.into())
                } else {
                    rng.below(UPSTREAMS.into())
                } as u32;
                let in_outage = outages[upstream as usize]
                    .as_ref()
                    .is_some_and(|o| o.contains(&i));
                let failures = if in_outage {
                    OUTAGE_FAILURES
                } else {
                    NOISE_FAILURES
                };
                if rng.chance(failures) {
                    let outcome = if rng.next() & 1 == 0 {
                        ConnectOutcome::Refused
                    } else {
                        ConnectOutcome::TimedOut
                    };
                    Event {
                        upstream,
                        outcome,
                        latency_us: 0,
                    }
                } else {
                    Event {
                        upstream,
                        outcome: ConnectOutcome::Connected,
                        latency_us: 100 + rng.below(4_900) as u32,
                    }
                }
            })
            .collect();
        Self {
            addrs: (0..UPSTREAMS).map(upstream_addr).collect(),
            stream,
        }
    }
}

/// A breaker implementation as the harness drives it.
trait Engine {
    type Answer;
    /// Takes one connection outcome, with everything the caller must do about it.
    fn record(&mut self, upstream: SocketAddr, outcome: ConnectOutcome, latency_us: u32);
    /// Whether, or how, new connections to `upstream` may go ahead.
    fn decide(&self, upstream: &SocketAddr) -> Self::Answer;
}

/// circuit's engine, driven the way the daemon drives it.
struct Circuit {
    breakers: Breakers<ManualClock>,
    trips: u64,
    half_opens: u64,
    closes: u64,
}

impl Circuit {
    fn new(breakers: Breakers<ManualClock>) -> Self {
        Self {
            breakers,
            trips: 0,
            half_opens: 0,
            closes: 0,
        }
    }

    /// What the daemon does with a transition: read the upstream's decision for the kernel.
    fn publish(&mut self, transition: Transition) {
        match transition.change.to {
            BreakerState::Open => self.trips += 1,
            BreakerState::HalfOpen => self.half_opens += 1,
            BreakerState::Closed => self.closes += 1,
            _ => {}
        }
        black_box(self.breakers.decision(&transition.upstream));
    }
}

impl Engine for Circuit {
    type Answer = Option<Decision>;

    fn record(&mut self, upstream: SocketAddr, outcome: ConnectOutcome, latency_us: u32) {
        // The daemon sleeps until `next_deadline`; time moves before every outcome here, so
        // that is when the deadline is checked (failsafe checks in `is_call_permitted`).
        if self
            .breakers
            .next_deadline()
            .is_some_and(|at| at <= self.breakers.now())
        {
            for transition in self.breakers.tick() {
                self.publish(transition);
            }
        }
        let transition = if latency_us == 0 {
            self.breakers.record(upstream, outcome)
        } else {
            let latency = Duration::from_micros(latency_us.into());
            self.breakers
                .record_with_latency(upstream, outcome, latency)
        };
        if let Some(transition) = transition {
            self.publish(transition);
        }
    }

    fn decide(&self, upstream: &SocketAddr) -> Option<Decision> {
        self.breakers.decision(upstream)
    }
}

/// One failsafe breaker per upstream, created on its first outcome like circuit's.
struct Failsafe<P, F> {
    breakers: HashMap<SocketAddr, StateMachine<P, ()>>,
    build: F,
    rejected: u64,
}

impl<P, F> Failsafe<P, F> {
    fn new(build: F) -> Self {
        Self {
            breakers: HashMap::new(),
            build,
            rejected: 0,
        }
    }
}

impl<P: FailurePolicy, F: Fn() -> StateMachine<P, ()>> Engine for Failsafe<P, F> {
    type Answer = bool;

    fn record(&mut self, upstream: SocketAddr, outcome: ConnectOutcome, _latency_us: u32) {
        let breaker = self.breakers.entry(upstream).or_insert_with(&self.build);
        let connected = outcome == ConnectOutcome::Connected;
        // `call` asks for permission first, as an application does before connecting; the
        // outcome of a rejected call is not recorded (the connect would not have happened).
        let result = breaker.call(|| if connected { Ok(()) } else { Err(()) });
        if let Err(failsafe::Error::Rejected) = result {
            self.rejected += 1;
        }
    }

    fn decide(&self, upstream: &SocketAddr) -> bool {
        self.breakers
            .get(upstream)
            .is_some_and(|breaker| breaker.is_call_permitted())
    }
}

type FailsafeWindowed =
    OrElse<SuccessRateOverTimeWindow<Exponential>, ConsecutiveFailures<Exponential>>;

/// What failsafe can express of a circuit policy, to build its nearest equivalent.
#[derive(Clone, Copy)]
struct FailsafeParams {
    threshold: u32,
    open: Duration,
    max_open: Duration,
    required_success: f64,
    minimum_calls: u32,
    window: Duration,
}

impl FailsafeParams {
    fn of(policy: &BreakerPolicy) -> Self {
        Self {
            threshold: policy.failure_threshold,
            open: policy.open_duration,
            max_open: policy.max_open_duration,
            required_success: 1.0 - policy.failure_rate.threshold_percent.as_fraction(),
            minimum_calls: policy.window.minimum_calls,
            window: policy.window.length,
        }
    }

    /// Open durations from `open_duration` up to `max_open_duration`, growing exponentially
    /// (failsafe has no linear backoff).
    fn backoff(self) -> Exponential {
        backoff::exponential(self.open, self.max_open)
    }

    /// The consecutive-failure detector, with the same threshold.
    fn consecutive(self) -> ConsecutiveFailures<Exponential> {
        consecutive_failures(self.threshold, self.backoff())
    }

    /// The failure-rate detector next to the consecutive-failure one, as circuit's policy has
    /// them: the success rate over the same time window with the same threshold and minimum
    /// calls (failsafe weighs the window with a moving average).
    fn windowed(self) -> FailsafeWindowed {
        success_rate_over_time_window(
            self.required_success,
            self.minimum_calls,
            self.window,
            self.backoff(),
        )
        .or_else(self.consecutive())
    }
}

/// The default policy, judged on one witness: the workload has one client, and failsafe's
/// breakers trip on anyone's failures (with the default two witnesses circuit would hold that
/// client on its own instead of tripping, which is not the path compared).
fn consecutive_policy() -> BreakerPolicy {
    BreakerPolicy {
        min_witnesses: 1,
        ..BreakerPolicy::default()
    }
}

/// The default policy with the failure-rate detector on, over a 30 s time window in 1 s
/// buckets: the closest to failsafe's success rate over 30 s.
fn windowed_policy() -> BreakerPolicy {
    let mut policy = consecutive_policy();
    policy.failure_rate.enabled = true;
    policy.window.kind = WindowKind::Time;
    policy.window.length = Duration::from_secs(30);
    policy.window.buckets = 30;
    policy
}

/// Feeds `events` to `engine`, moving its clock one [`STEP`] before each.
fn feed(
    engine: &mut impl Engine,
    events: &[Event],
    addrs: &[SocketAddr],
    mut advance: impl FnMut(Duration),
) {
    for event in events {
        advance(STEP);
        let upstream = addrs[event.upstream as usize];
        engine.record(upstream, event.outcome, event.latency_us);
    }
}

/// Looks up the upstream of each of `events`.
fn lookups(engine: &impl Engine, events: &[Event], addrs: &[SocketAddr]) {
    for event in events {
        black_box(engine.decide(&addrs[event.upstream as usize]));
    }
}

/// ns per event of (baseline, candidate) over `stream`, which each takes chunk by chunk in
/// turn so that both see the same machine state.
fn alternate(
    stream: &[Event],
    mut baseline: impl FnMut(&[Event]),
    mut candidate: impl FnMut(&[Event]),
) -> (f64, f64) {
    let (mut b, mut c) = (Duration::ZERO, Duration::ZERO);
    for chunk in stream.chunks(CHUNK) {
        let start = Instant::now();
        baseline(chunk);
        b += start.elapsed();
        let start = Instant::now();
        candidate(chunk);
        c += start.elapsed();
    }
    let per_event = |d: Duration| d.as_nanos() as f64 / stream.len() as f64;
    (per_event(b), per_event(c))
}

/// Medians of (baseline, candidate) over `rounds` measurements.
fn median_pair(rounds: usize, mut measure: impl FnMut() -> (f64, f64)) -> (f64, f64) {
    let (b, c) = (0..rounds).map(|_| measure()).unzip();
    (median(b), median(c))
}

/// Median ns per outcome of (failsafe, circuit) under `policy`, and both engines after an
/// untimed first run (which warms the caches up and shows which paths the workload took).
///
/// Each engine has its own simulated time line, so that their runs can interleave: circuit
/// a `ManualClock`, failsafe its thread-local mock clock (`mock`, which only
/// `failsafe::clock::freeze` hands out; on the real clock no failsafe breaker would reach
/// HALF_OPEN in a sub-second run).
fn compare_recording<P: FailurePolicy, F: Fn() -> StateMachine<P, ()> + Copy>(
    label: &str,
    policy: &BreakerPolicy,
    failsafe: F,
    workload: &Workload,
    mock: &mut MockClock,
    rounds: usize,
) -> ((f64, f64), Failsafe<P, F>, Circuit) {
    let addrs = &workload.addrs;
    let mut run = || {
        let mut baseline = Failsafe::new(failsafe);
        let clock = ManualClock::new(MonoTime::from_nanos(1));
        let breakers = Breakers::new(policy.clone(), clock.clone()).expect("valid policy");
        let mut candidate = Circuit::new(breakers);
        // Moving circuit's clock is an atomic add; failsafe's side moves a ManualClock
        // nobody reads as well, so that the harness costs both sides the same.
        let parity = ManualClock::default();
        let ns = alternate(
            &workload.stream,
            |events| {
                feed(&mut baseline, events, addrs, |by| {
                    mock.advance(by);
                    parity.advance(by);
                });
            },
            |events| feed(&mut candidate, events, addrs, |by| clock.advance(by)),
        );
        (ns, baseline, candidate)
    };
    let (_, warm_failsafe, warm_circuit) = run();
    eprintln!(
        "{label}: circuit {} trips, {} half-opens, {} closes; failsafe {} calls rejected",
        warm_circuit.trips, warm_circuit.half_opens, warm_circuit.closes, warm_failsafe.rejected
    );
    let ns = median_pair(rounds, || run().0);
    (ns, warm_failsafe, warm_circuit)
}

/// Heap bytes that `make`'s engine and tracking each of `addrs` (one successful connect
/// each) take, and the engine.
fn heap_growth<E: Engine>(make: impl FnOnce() -> E, addrs: &[SocketAddr]) -> (E, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut engine = make();
    for &upstream in addrs {
        engine.record(upstream, ConnectOutcome::Connected, 0);
    }
    (engine, LIVE.load(Ordering::Relaxed) - before)
}

struct HeapFigures {
    failsafe: usize,
    circuit: usize,
    /// What circuit's `Breakers::memory` says of itself.
    circuit_reported: usize,
}

/// Heap of [`MANY`] upstreams tracked by failsafe and by circuit under `policy`.
fn compare_heap<P: FailurePolicy>(
    policy: &BreakerPolicy,
    failsafe: impl Fn() -> StateMachine<P, ()>,
) -> HeapFigures {
    let addrs: Vec<SocketAddr> = (0..MANY).map(upstream_addr).collect();
    // Raise the tracking bound (65,536 by default) so that nothing is evicted; built before
    // measuring, like `addrs`, as it is not part of the engine.
    let mut config = EngineConfig::with_policy(policy.clone());
    config.tracking.max_upstreams = MANY;
    let (_, failsafe) = heap_growth(|| Failsafe::new(failsafe), &addrs);
    let (circuit, counted) = heap_growth(
        || Circuit::new(Breakers::with_config(&config, ManualClock::default()).expect("valid")),
        &addrs,
    );
    let reported = circuit.breakers.memory();
    assert_eq!(reported.tracked, addrs.len(), "every upstream is tracked");
    HeapFigures {
        failsafe,
        circuit: counted,
        circuit_reported: reported.bytes,
    }
}

fn measure(workload: &Workload, mock: &mut MockClock, rounds: usize) -> Vec<Row> {
    let consecutive = consecutive_policy();
    let windowed = windowed_policy();
    let (consecutive_fs, windowed_fs) = (
        FailsafeParams::of(&consecutive),
        FailsafeParams::of(&windowed),
    );
    let build_consecutive = move || StateMachine::new(consecutive_fs.consecutive(), ());
    let build_windowed = move || StateMachine::new(windowed_fs.windowed(), ());

    let ((record_fs, record), failsafe, circuit) = compare_recording(
        "consecutive failures",
        &consecutive,
        build_consecutive,
        workload,
        mock,
        rounds,
    );
    let ((windowed_record_fs, windowed_record), ..) = compare_recording(
        "failure-rate window",
        &windowed,
        build_windowed,
        workload,
        mock,
        rounds,
    );
    let (decide_fs, decide) = median_pair(rounds, || {
        alternate(
            &workload.stream,
            |events| lookups(&failsafe, events, &workload.addrs),
            |events| lookups(&circuit, events, &workload.addrs),
        )
    });
    drop((failsafe, circuit));
    let heap = compare_heap(&consecutive, build_consecutive);
    let windowed_heap = compare_heap(&windowed, build_windowed);

    let per_upstream = |bytes: usize| bytes as f64 / f64::from(MANY);
    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    vec![
        Row {
            name: "record an outcome: consecutive failures, vs failsafe",
            value: record,
            baseline: record_fs,
            unit: "ns/outcome",
            target: Some(1.0),
        },
        Row {
            name: "record an outcome: + failure-rate window (30 s), vs failsafe",
            value: windowed_record,
            baseline: windowed_record_fs,
            unit: "ns/outcome",
            target: Some(1.0),
        },
        Row {
            name: "decision for an upstream, vs failsafe is_call_permitted",
            value: decide,
            baseline: decide_fs,
            unit: "ns/decision",
            target: Some(1.0),
        },
        Row {
            name: "heap per upstream (65,536 tracked), vs failsafe",
            value: per_upstream(heap.circuit),
            baseline: per_upstream(heap.failsafe),
            unit: "bytes/upstream",
            target: None,
        },
        Row {
            name: "heap in total (65,536 tracked), vs failsafe",
            value: mib(heap.circuit),
            baseline: mib(heap.failsafe),
            unit: "MiB",
            target: None,
        },
        Row {
            name: "heap per upstream with the failure-rate window, vs failsafe",
            value: per_upstream(windowed_heap.circuit),
            baseline: per_upstream(windowed_heap.failsafe),
            unit: "bytes/upstream",
            target: None,
        },
        Row {
            name: "Breakers::memory() per upstream, vs counted heap",
            value: per_upstream(heap.circuit_reported),
            baseline: per_upstream(heap.circuit),
            unit: "bytes/upstream",
            target: None,
        },
        Row {
            name: "estimated_bytes_per_upstream(), vs counted heap per upstream",
            value: estimated_bytes_per_upstream(&consecutive) as f64,
            baseline: per_upstream(heap.circuit),
            unit: "bytes/upstream",
            target: None,
        },
    ]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (outcomes, rounds) = if quick { (200_000, 5) } else { (1_000_000, 11) };
    let workload = Workload::generate(outcomes, 0x9e37_79b9_7f4a_7c15);
    let rows = failsafe::clock::freeze(|mock| measure(&workload, mock, rounds));
    report::publish("engine", ["measure", "circuit", "baseline"], &rows);
}
