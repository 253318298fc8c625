//! Maps shared by the programs. Names and capacities live in circuit-common, where the agent
//! reads them too. Every map is pinned (by name, in the agent's pin directory): a restarted
//! agent's programs share them with the previous agent's, so verdicts, counters and
//! in-flight connection state survive the handover.

use aya_ebpf::{
    helpers::bpf_map_lookup_elem,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use circuit_common::{
    ADMITTED_FLOWS_CAPACITY, CLIENT_BUDGETS_CAPACITY, CLIENT_VERDICTS_CAPACITY, ClientBudget,
    ClientUpstreamKey, Control, ESTABLISHED_CAPACITY, EstablishedConnection, FLOW_MARKS_CAPACITY,
    FlowKey, NAT_ENDPOINTS_CAPACITY, OUTCOMES_BYTES, OutcomeCounters, Override, PendingConnect,
    REROUTED_CAPACITY, ResetBudget, SERVICE_ROUTES_CAPACITY, SPARED_PORTS_CAPACITY,
    SYN_SENT_CAPACITY, ServiceRoute, Stat, SynSent, UPSTREAM_COUNTS_CAPACITY, UpstreamKey,
    VERDICTS_CAPACITY, Verdict, VerdictFilter,
};

#[map(name = "VERDICTS")]
pub static VERDICTS: HashMap<UpstreamKey, Verdict> = HashMap::pinned(VERDICTS_CAPACITY, 0);

/// Probe tokens taken per upstream in its HALF_OPEN period. Only the kernel adds to it; the
/// agent removes an upstream's count when a new period starts or its verdict goes.
#[map(name = "PROBE_COUNTS")]
pub static PROBE_COUNTS: HashMap<UpstreamKey, u64> = HashMap::pinned(VERDICTS_CAPACITY, 0);

/// Connections admitted while their upstream had a verdict, valued by when: later points and
/// SYN retransmissions admit them without a second decision (see `verdict::Connection`).
#[map(name = "ADMITTED_FLOWS")]
pub static ADMITTED_FLOWS: LruHashMap<FlowKey, u64> =
    LruHashMap::pinned(ADMITTED_FLOWS_CAPACITY, 0);

/// Sockets the cgroup hook admitted, by socket cookie, until sock_ops learns their flow.
#[map(name = "ADMITTED_SOCKS")]
pub static ADMITTED_SOCKETS: LruHashMap<u64, u64> = LruHashMap::pinned(ADMITTED_FLOWS_CAPACITY, 0);

/// Connects whose SYN went out, by flow (see `circuit_common::map_names::SYN_OUT`).
#[map(name = "SYN_OUT")]
pub static SYN_OUT: LruHashMap<FlowKey, u64> = LruHashMap::pinned(SYN_SENT_CAPACITY, 0);

/// 1 while SYN_OUT is being filled (written by the agent).
#[map(name = "SYN_TRACKING")]
pub static SYN_TRACKING: Array<u32> = Array::pinned(1, 0);

/// Client-scoped verdicts, written by the agent, read by the cgroup hook alone.
#[map(name = "CLIENT_VERDICTS")]
pub static CLIENT_VERDICTS: HashMap<ClientUpstreamKey, Verdict> =
    HashMap::pinned(CLIENT_VERDICTS_CAPACITY, 0);

/// Each client's budget of outcome events, by cgroup id (LRU: a client unseen for long
/// starts again with a full burst).
/// Each CPU's budget of XDP resets (see [`ResetBudget`]). Not pinned: a restart refills it.
#[map(name = "RESET_BUDGET")]
pub static RESET_BUDGET: PerCpuArray<ResetBudget> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "CLIENT_BUDGETS")]
pub static CLIENT_BUDGETS: LruHashMap<u64, ClientBudget> =
    LruHashMap::pinned(CLIENT_BUDGETS_CAPACITY, 0);

#[map(name = "VERDICT_FILTER")]
pub static VERDICT_FILTER: Array<u64> = Array::pinned(VerdictFilter::WORDS, 0);

/// The fast-path switch, read directly (see `circuit_common::CONTROL_SECTION`, whose name
/// the attribute must repeat). Written only from userspace.
#[unsafe(link_section = ".bss.control")]
#[unsafe(no_mangle)]
pub static mut CONTROL: Control = Control {
    active_verdicts: 0,
    host_verdicts: 0,
    exempt_cgroups: 0,
    client_verdicts: 0,
};

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[map(name = "OUTCOMES")]
pub static OUTCOMES: RingBuf = RingBuf::pinned(OUTCOMES_BYTES, 0);

#[map(name = "UPSTREAM_COUNT")]
pub static UPSTREAM_COUNTS: LruHashMap<UpstreamKey, OutcomeCounters> =
    LruHashMap::pinned(UPSTREAM_COUNTS_CAPACITY, 0);

/// Keyed by the kernel address of the socket; LRU so sockets we never see close cannot fill it.
#[map(name = "SYN_SENT")]
pub static SYN_SENT: LruHashMap<u64, SynSent> = LruHashMap::pinned(SYN_SENT_CAPACITY, 0);

/// Client sockets that connected, keyed by socket address.
#[map(name = "ESTABLISHED")]
pub static ESTABLISHED: LruHashMap<u64, EstablishedConnection> =
    LruHashMap::pinned(ESTABLISHED_CAPACITY, 0);

/// `flow_mark` bits per connection, consumed when its socket leaves SYN_SENT.
#[map(name = "FLOW_MARKS")]
pub static FLOW_MARKS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(FLOW_MARKS_CAPACITY, 0);

/// Failed connects (SYN_SENT → CLOSE without a RST) awaiting their cause: the kernel reports
/// an error after the close, or the application closed the socket itself (it gave up).
#[map(name = "PENDING_CLOSE")]
pub static PENDING_CLOSE: LruHashMap<FlowKey, PendingConnect> =
    LruHashMap::pinned(FLOW_MARKS_CAPACITY, 0);

/// Operator overrides: read and written from userspace only, pinned with the rest.
#[map(name = "OVERRIDES")]
pub static OVERRIDES: HashMap<UpstreamKey, Override> = HashMap::pinned(4096, 0);

/// cgroup ids whose connections are never rejected (priority clients).
#[map(name = "EXEMPT_CGROUPS")]
pub static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(1024, 0);

/// Never-isolated ports of hosts with a whole-host verdict: looked up only when some host
/// has one, before that verdict.
#[map(name = "SPARED_PORTS")]
pub static SPARED_PORTS: HashMap<UpstreamKey, u8> = HashMap::pinned(SPARED_PORTS_CAPACITY, 0);

/// The endpoint a NAT picked, by the flow as its client sees it (see
/// `circuit_common::map_names::NAT_ENDPOINTS`). LRU: entries of finished connections age out.
#[map(name = "NAT_ENDPOINTS")]
pub static NAT_ENDPOINTS: LruHashMap<FlowKey, UpstreamKey> =
    LruHashMap::pinned(NAT_ENDPOINTS_CAPACITY, 0);

/// Re-routes for virtual addresses with isolated endpoints, written by the agent.
#[map(name = "SERVICE_ROUTES")]
pub static SERVICE_ROUTES: HashMap<UpstreamKey, ServiceRoute> =
    HashMap::pinned(SERVICE_ROUTES_CAPACITY, 0);

/// Re-routed sockets, by cookie: the virtual address getpeername() must keep returning.
#[map(name = "REROUTED")]
pub static REROUTED: LruHashMap<u64, UpstreamKey> = LruHashMap::pinned(REROUTED_CAPACITY, 0);

/// The keys of STATS, as read-only data: a lookup of a fixed counter reads its key from
/// here, where a key on the stack costs a store and a dependent reload on every packet.
static STAT_KEYS: [u32; Stat::COUNT as usize] = {
    let mut keys = [0; Stat::COUNT as usize];
    let mut i = 0;
    while i < keys.len() {
        keys[i] = i as u32;
        i += 1;
    }
    keys
};

#[inline(always)]
pub fn count(stat: Stat) {
    let key = &STAT_KEYS[stat as usize];
    // SAFETY: STATS is a map definition (the loader turns its address into the map), and
    // `key` points at a u32, the map's key type.
    let counter = unsafe {
        bpf_map_lookup_elem(
            (&raw const STATS).cast_mut().cast(),
            (key as *const u32).cast(),
        )
    };
    increment(counter.cast());
}

/// Counts at a computed index (a fixed [`Stat`] goes through [`count`]).
#[inline(always)]
pub fn count_index(index: u32) {
    increment(STATS.get_ptr_mut(index).unwrap_or_default());
}

#[inline(always)]
fn increment(counter: *mut u64) {
    if !counter.is_null() {
        // SAFETY: non-null, so a value of STATS. Per-CPU slot: no other CPU writes it, so a
        // plain increment is enough (a program nested on this CPU may at worst lose one).
        unsafe { *counter += 1 };
    }
}

/// Adds `flags` to the marks of `flow`.
#[inline(always)]
pub fn mark_flow(flow: &FlowKey, flags: u32) {
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    let old = unsafe { FLOW_MARKS.get(flow) }.copied().unwrap_or(0);
    let _ = FLOW_MARKS.insert(flow, old | flags, 0);
}
