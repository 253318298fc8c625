//! Client connection outcomes from `sock:inet_sock_set_state` and `tcp:tcp_receive_reset`.
//!
//! A client socket goes CLOSE → SYN_SENT on connect(); from SYN_SENT it reaches ESTABLISHED
//! (connected, with the time it took) or CLOSE (failed). A failure is "refused" when a RST
//! arrived while in SYN_SENT, "rejected" when that RST was one of ours, and "timed out"
//! otherwise. Field offsets come from the agent (read from tracefs), never from this file.

use aya_ebpf::{
    Global, helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext,
};
use circuit_common::{
    AF_INET, AF_INET6, ConnectOutcome, FlowKey, IPPROTO_TCP, OutcomeEvent, SockFieldOffsets, Stat,
    SynSent, TracepointLayout, UpstreamKey, tcp_state, v4_mapped,
};

use crate::maps::{OUTCOMES, REJECTED, SYN_SENT, count};

#[unsafe(no_mangle)]
static TRACEPOINT_LAYOUT: Global<TracepointLayout> = Global::new(TracepointLayout {
    set_state: UNSET,
    receive_reset: UNSET,
});

/// All-zero offsets: the agent always overrides them; an unset layout reads the common
/// header, whose protocol field is never IPPROTO_TCP, so nothing is reported.
const UNSET: SockFieldOffsets = SockFieldOffsets {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    sport: 0,
    dport: 0,
    family: 0,
    protocol: 0,
    saddr: 0,
    daddr: 0,
    saddr_v6: 0,
    daddr_v6: 0,
    _pad: 0,
};

#[tracepoint]
pub fn tp_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = on_set_state(&ctx);
    0
}

#[tracepoint]
pub fn tp_tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = on_receive_reset(&ctx);
    0
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    unsafe { ctx.read_at::<T>(offset as usize) }
}

/// Both ends of the socket, addresses v4-mapped.
struct Endpoints {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    remote_port: u16,
}

#[inline(always)]
fn endpoints(ctx: &TracePointContext, f: &SockFieldOffsets) -> Result<Endpoints, i32> {
    let family: u16 = read(ctx, f.family)?;
    let (local, remote) = match family {
        AF_INET => (
            v4_mapped(read(ctx, f.saddr)?),
            v4_mapped(read(ctx, f.daddr)?),
        ),
        AF_INET6 => (read(ctx, f.saddr_v6)?, read(ctx, f.daddr_v6)?),
        _ => return Err(0),
    };
    Ok(Endpoints {
        local,
        remote,
        local_port: read(ctx, f.sport)?,
        remote_port: read(ctx, f.dport)?,
    })
}

fn on_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().set_state;
    let protocol: u16 = read(ctx, f.protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let old: i32 = read(ctx, f.oldstate)?;
    let new: i32 = read(ctx, f.newstate)?;
    if old != tcp_state::SYN_SENT && new != tcp_state::SYN_SENT {
        return Ok(());
    }
    let sk: u64 = read(ctx, f.skaddr)?;
    let now = unsafe { bpf_ktime_get_ns() };
    if new == tcp_state::SYN_SENT {
        let entry = SynSent {
            start_ns: now,
            flags: 0,
            _pad: 0,
        };
        return SYN_SENT.insert(sk, entry, 0);
    }
    let (start_ns, flags) = match unsafe { SYN_SENT.get(sk) } {
        Some(entry) => (entry.start_ns, entry.flags),
        // connect() happened before the programs were loaded: classify without a latency.
        None => (0, 0),
    };
    let _ = SYN_SENT.remove(sk);
    let outcome = if new == tcp_state::ESTABLISHED {
        ConnectOutcome::Connected
    } else if new != tcp_state::CLOSE {
        return Ok(());
    } else if flags & SynSent::REJECTED != 0 {
        ConnectOutcome::Rejected
    } else if flags & SynSent::RESET != 0 {
        ConnectOutcome::Refused
    } else {
        ConnectOutcome::TimedOut
    };
    let ends = endpoints(ctx, &f)?;
    let latency_ns = if start_ns == 0 { 0 } else { now - start_ns };
    emit(OutcomeEvent {
        timestamp_ns: now,
        latency_ns,
        upstream: UpstreamKey::new(ends.remote, ends.remote_port),
        outcome: outcome as u8,
        _pad: [0; 3],
    });
    Ok(())
}

fn on_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().receive_reset;
    let sk: u64 = read(ctx, f.skaddr)?;
    // Only resets that answer a connect() matter here.
    let Some(entry) = SYN_SENT.get_ptr_mut(sk) else {
        return Ok(());
    };
    let ends = endpoints(ctx, &f)?;
    let flow = FlowKey {
        client_addr: ends.local,
        upstream_addr: ends.remote,
        client_port: ends.local_port,
        upstream_port: ends.remote_port,
    };
    let mut flags = SynSent::RESET;
    if unsafe { REJECTED.get(flow) }.is_some() {
        flags |= SynSent::REJECTED;
        let _ = REJECTED.remove(flow);
    }
    unsafe { (*entry).flags |= flags };
    Ok(())
}

#[inline(always)]
fn emit(event: OutcomeEvent) {
    match OUTCOMES.reserve::<OutcomeEvent>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(0);
        }
        // A full ring buffer is counted, never silent.
        None => count(Stat::OutcomeDrops),
    }
}
