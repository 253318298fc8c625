//! Maps shared by the programs. Names and capacities live in circuit-common, where the agent
//! reads them too.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use circuit_common::{
    FlowKey, OUTCOMES_BYTES, REJECTED_CAPACITY, SYN_SENT_CAPACITY, Stat, SynSent, UpstreamKey,
    VERDICTS_CAPACITY, Verdict,
};

/// Pinned: verdicts must outlive an agent restart (the next agent adopts them).
#[map(name = "VERDICTS")]
pub static VERDICTS: HashMap<UpstreamKey, Verdict> = HashMap::pinned(VERDICTS_CAPACITY, 0);

/// Pinned so counters survive agent restarts, like the verdicts they describe.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[map(name = "OUTCOMES")]
pub static OUTCOMES: RingBuf = RingBuf::with_byte_size(OUTCOMES_BYTES, 0);

/// Keyed by the kernel address of the socket; LRU so sockets we never see close cannot fill it.
#[map(name = "SYN_SENT")]
pub static SYN_SENT: LruHashMap<u64, SynSent> = LruHashMap::with_max_entries(SYN_SENT_CAPACITY, 0);

/// Flows an enforcement point answered with a RST, so the tracepoints can tell our own
/// rejects from a refusing upstream. Value: when the reject happened.
#[map(name = "REJECTED")]
pub static REJECTED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(REJECTED_CAPACITY, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other CPU writes it, so a plain increment is enough.
        unsafe { *counter += 1 };
    }
}
