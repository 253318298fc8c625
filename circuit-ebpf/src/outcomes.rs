//! Client connection outcomes from five tracepoints.
//!
//! - `sock:inet_sock_set_state`: a client socket goes CLOSE → SYN_SENT on connect(); from
//!   SYN_SENT it reaches ESTABLISHED (connected, with the time it took) or CLOSE (failed).
//!   A failure is "rejected" when one of our enforcement points answered it and "refused"
//!   when a RST arrived while connecting. Otherwise its cause is not known yet: the kernel
//!   sets the socket error before the close but reports it only after
//!   (tcp_done_with_error), so the failure waits in PENDING_CLOSE for:
//! - `sock:inet_sk_error_report`: ETIMEDOUT → timed out, ECONNREFUSED (ICMP port
//!   unreachable) → refused, any other error (EHOSTUNREACH, ENETUNREACH...) → unreachable;
//! - `tcp:tcp_destroy_sock`: no error was reported, the application closed the socket
//!   while connecting (Happy Eyeballs, cancellation, its own connect timeout) → aborted,
//!   with how long it waited; the agent judges whether that is evidence.
//! - `tcp:tcp_receive_reset`: a RST while connecting (refused), or after establishment (reset).
//! - `tcp:tcp_retransmit_skb`: SYN retransmits while connecting, the early sign of a black hole.
//!
//! Field offsets come from the agent (read from tracefs), never from this file.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use circuit_common::{
    AF_INET, AF_INET6, ClientBudget, ConnectOutcome, ECONNREFUSED, ETIMEDOUT,
    EstablishedConnection, FlowKey, IPPROTO_TCP, OutcomeCounters, OutcomeEvent, PendingConnect,
    SockFieldOffsets, Stat, SynSent, TracepointLayout, UpstreamKey, flow_mark, tcp_state,
    v4_mapped,
};

use crate::{
    maps::{
        ADMITTED_FLOWS, CLIENT_BUDGETS, ESTABLISHED, FLOW_MARKS, OUTCOMES, PENDING_CLOSE, SYN_OUT,
        SYN_SENT, SYN_TRACKING, UPSTREAM_COUNTS, count,
    },
    services::{forget_nat_endpoint, nat_endpoint},
    verdict::any_verdict,
};

/// All zero until the agent overrides it at load time. A zero layout reads the common header,
/// whose fields never look like a TCP socket in SYN_SENT, so nothing is reported.
#[unsafe(no_mangle)]
static TRACEPOINT_LAYOUT: Global<TracepointLayout> = Global::new(TracepointLayout {
    set_state: UNSET,
    receive_reset: UNSET,
    error_report: UNSET,
    retransmit: UNSET,
    destroy_sock: UNSET,
});

const UNSET: SockFieldOffsets = SockFieldOffsets {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    state: 0,
    error: 0,
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

#[tracepoint]
pub fn tp_inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = on_error_report(&ctx);
    0
}

#[tracepoint]
pub fn tp_tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = on_retransmit(&ctx);
    0
}

#[tracepoint]
pub fn tp_tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = on_destroy_sock(&ctx);
    0
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel reports a bad offset as Err instead of faulting, and
    // every T read here (integers, byte arrays) is valid for any bit pattern.
    unsafe { ctx.read_at::<T>(offset as usize) }
}

/// Both ends of a socket, addresses v4-mapped.
struct Endpoints {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    remote_port: u16,
}

impl Endpoints {
    fn upstream(&self) -> UpstreamKey {
        UpstreamKey::new(self.remote, self.remote_port)
    }

    /// Who the connection is with: the endpoint a NAT picked, with the virtual address
    /// the client asked for; else the address the socket names, with no service.
    fn resolved(&self) -> (UpstreamKey, UpstreamKey) {
        let named = self.upstream();
        match nat_endpoint(&self.flow()) {
            Some(endpoint) => (endpoint, named),
            None => (named, UpstreamKey::new([0; 16], 0)),
        }
    }

    fn flow(&self) -> FlowKey {
        FlowKey {
            client_addr: self.local,
            upstream_addr: self.remote,
            client_port: self.local_port,
            upstream_port: self.remote_port,
        }
    }
}

#[inline(always)]
fn endpoints(ctx: &TracePointContext, f: &SockFieldOffsets) -> Result<Endpoints, i32> {
    // Without a family field the IPv6 fields hold every address (IPv4 ones v4-mapped).
    let family: u16 = if f.family == SockFieldOffsets::ABSENT {
        AF_INET6
    } else {
        read(ctx, f.family)?
    };
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

/// Whether SYN_OUT is being filled (the sock_ops program is attached).
#[inline(always)]
fn syn_tracking() -> bool {
    SYN_TRACKING.get(0).is_some_and(|on| *on != 0)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a BPF helper with no pointer arguments.
    unsafe { bpf_ktime_get_ns() }
}

fn on_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().set_state;
    if read::<u16>(ctx, f.protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let old: i32 = read(ctx, f.oldstate)?;
    let new: i32 = read(ctx, f.newstate)?;
    let sk: u64 = read(ctx, f.skaddr)?;
    if new == tcp_state::SYN_SENT {
        // connect() runs in the connecting process: its cgroup is the client.
        let entry = SynSent {
            start_ns: now(),
            flags: 0,
            _pad: 0,
            // SAFETY: a BPF helper with no pointer arguments.
            client: unsafe { bpf_get_current_cgroup_id() },
        };
        return SYN_SENT.insert(sk, entry, 0);
    }
    if old != tcp_state::SYN_SENT {
        if new == tcp_state::CLOSE {
            let _ = ESTABLISHED.remove(sk);
        }
        return Ok(());
    }
    // SAFETY: the fields are copied out at once (the entry is removed just below), so no
    // reference outlives the lookup.
    let (attempt, flags) = match unsafe { SYN_SENT.get(sk) } {
        Some(entry) => (
            PendingConnect {
                start_ns: entry.start_ns,
                client: entry.client,
            },
            entry.flags,
        ),
        // connect() happened before the programs were loaded: classify without a latency
        // or a client.
        None => (PendingConnect::default(), 0),
    };
    let _ = SYN_SENT.remove(sk);
    let ends = endpoints(ctx, &f)?;
    let flow = ends.flow();
    if any_verdict() {
        // The connection is no longer new: its admission has served (see ADMITTED_FLOWS).
        let _ = ADMITTED_FLOWS.remove(flow);
    }
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    let syn_out = unsafe { SYN_OUT.get(flow) }.copied();
    if syn_out.is_some() {
        let _ = SYN_OUT.remove(flow);
    }
    let mut attempt = attempt;
    match syn_out {
        // Waiting counts from the SYN: a connect deferred by TCP_FASTOPEN_CONNECT sends it
        // at its first write.
        Some(sent_ns) => attempt.start_ns = sent_ns,
        // Closed without ever sending a SYN (deferred, never written): no attempt at all.
        None if new == tcp_state::CLOSE && syn_tracking() && flags & SynSent::RESET == 0 => {
            return Ok(());
        }
        None => {}
    }
    let (upstream, service) = ends.resolved();
    let outcome = if new == tcp_state::ESTABLISHED {
        let connection = EstablishedConnection {
            upstream,
            _pad: 0,
            client: attempt.client,
            service,
            _pad2: 0,
        };
        let _ = ESTABLISHED.insert(sk, connection, 0);
        ConnectOutcome::Connected
    } else if new == tcp_state::CLOSE {
        // SAFETY: the value is copied at once, so no reference outlives the lookup.
        let marks = unsafe { FLOW_MARKS.get(flow) }.copied().unwrap_or(0);
        if marks != 0 {
            let _ = FLOW_MARKS.remove(flow);
        }
        if marks & flow_mark::REJECTED != 0 {
            ConnectOutcome::Rejected
        } else if flags & SynSent::RESET != 0 {
            ConnectOutcome::Refused
        } else {
            // The cause comes later: an error report or the socket's destruction.
            return PENDING_CLOSE.insert(flow, attempt, 0);
        }
    } else {
        return Ok(());
    };
    // A final outcome: the endpoint lives on in ESTABLISHED, if anywhere. (A failure
    // waiting for its cause resolves it once more when the cause comes.)
    if service.port != 0 {
        forget_nat_endpoint(&flow);
    }
    emit(upstream, service, outcome, attempt);
    Ok(())
}

fn on_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().receive_reset;
    let sk: u64 = read(ctx, f.skaddr)?;
    if let Some(entry) = SYN_SENT.get_ptr_mut(sk) {
        // Classified when the socket closes, which follows at once.
        // SAFETY: a SYN_SENT value, in map memory valid for the program's run; a racing update
        // at worst loses the flag, and the error report that follows still says refused.
        unsafe { (*entry).flags |= SynSent::RESET };
        return Ok(());
    }
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    if let Some(connection) = unsafe { ESTABLISHED.get(sk) }.copied() {
        let _ = ESTABLISHED.remove(sk);
        let attempt = PendingConnect {
            start_ns: 0,
            client: connection.client,
        };
        emit(
            connection.upstream,
            connection.service,
            ConnectOutcome::Reset,
            attempt,
        );
    }
    Ok(())
}

fn on_error_report(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().error_report;
    if read::<u16>(ctx, f.protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let ends = endpoints(ctx, &f)?;
    let flow = ends.flow();
    // Only failed connects waiting for their cause; other sockets' errors are not ours.
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    let Some(attempt) = (unsafe { PENDING_CLOSE.get(flow) }).copied() else {
        return Ok(());
    };
    let _ = PENDING_CLOSE.remove(flow);
    let outcome = match read::<i32>(ctx, f.error)? {
        ETIMEDOUT => ConnectOutcome::TimedOut,
        ECONNREFUSED => ConnectOutcome::Refused,
        _ => ConnectOutcome::Unreachable,
    };
    let (upstream, service) = ends.resolved();
    if service.port != 0 {
        forget_nat_endpoint(&flow);
    }
    emit(upstream, service, outcome, attempt);
    Ok(())
}

fn on_destroy_sock(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().destroy_sock;
    let ends = endpoints(ctx, &f)?;
    let flow = ends.flow();
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    if let Some(attempt) = unsafe { PENDING_CLOSE.get(flow) }.copied() {
        let _ = PENDING_CLOSE.remove(flow);
        let (upstream, service) = ends.resolved();
        if service.port != 0 {
            forget_nat_endpoint(&flow);
        }
        emit(upstream, service, ConnectOutcome::Aborted, attempt);
    }
    Ok(())
}

fn on_retransmit(ctx: &TracePointContext) -> Result<(), i32> {
    let f = TRACEPOINT_LAYOUT.load().retransmit;
    if read::<i32>(ctx, f.state)? != tcp_state::SYN_SENT {
        return Ok(());
    }
    let sk: u64 = read(ctx, f.skaddr)?;
    // SAFETY: the two fields are copied out at once, so no reference outlives the lookup.
    let attempt =
        unsafe { SYN_SENT.get(sk) }.map_or(PendingConnect::default(), |e| PendingConnect {
            start_ns: e.start_ns,
            client: e.client,
        });
    let (upstream, service) = endpoints(ctx, &f)?.resolved();
    emit(upstream, service, ConnectOutcome::SynRetransmit, attempt);
    Ok(())
}

/// Counts the outcome for the upstream in the kernel, then sends it to the agent.
#[inline(always)]
fn emit(
    upstream: UpstreamKey,
    service: UpstreamKey,
    outcome: ConnectOutcome,
    attempt: PendingConnect,
) {
    let start_ns = attempt.start_ns;
    count_outcome(&upstream, outcome);
    let now = now();
    if !client_may_emit(attempt.client, now) {
        count(Stat::OutcomesThrottled);
        return;
    }
    let event = OutcomeEvent {
        timestamp_ns: now,
        latency_ns: if start_ns == 0 { 0 } else { now - start_ns },
        upstream,
        outcome: outcome as u8,
        _pad: [0; 3],
        client: attempt.client,
        service,
        _pad2: 0,
    };
    match OUTCOMES.reserve::<OutcomeEvent>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(0);
        }
        // A full ring buffer is counted, never silent; the per-upstream counters above still
        // have the outcome.
        None => count(Stat::OutcomeDrops),
    }
}

/// Takes a token from `client`'s budget of ring buffer events (see [`ClientBudget`]).
#[inline(always)]
fn client_may_emit(client: u64, now: u64) -> bool {
    match CLIENT_BUDGETS.get_ptr_mut(client) {
        // SAFETY: a pointer into the map's value; concurrent CPUs may race on it, which
        // at worst lets a token or two too many through.
        Some(budget) => unsafe { (*budget).take(now) },
        None => {
            let mut budget = ClientBudget::full(now);
            let admitted = budget.take(now);
            let _ = CLIENT_BUDGETS.insert(client, budget, 0);
            admitted
        }
    }
}

#[inline(always)]
fn count_outcome(upstream: &UpstreamKey, outcome: ConnectOutcome) {
    let mut counters = UPSTREAM_COUNTS.get_ptr_mut(upstream);
    if counters.is_none() {
        let _ = UPSTREAM_COUNTS.insert(
            upstream,
            OutcomeCounters::default(),
            1, /* BPF_NOEXIST */
        );
        counters = UPSTREAM_COUNTS.get_ptr_mut(upstream);
    }
    let Some(counters) = counters else { return };
    let index = OutcomeCounters::slot(outcome);
    // SAFETY: a value of UPSTREAM_COUNTS, valid for the program's run, and `slot` is below 8;
    // the add is atomic, so CPUs counting at once lose nothing.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &mut (*counters).counts[index],
            1,
        );
    }
}
