//! The three enforcement points. Each makes the same decision (`verdict::decide`) and fails
//! open: whatever it cannot parse or look up goes through untouched.
//!
//! - XDP (ingress): a rejected SYN is answered with a RST built in place, sent back out of
//!   the interface it arrived on (XDP_TX).
//! - TC (egress): a rejected SYN leaving this host is turned into a RST and redirected to the
//!   interface's ingress, so the local socket gets ECONNREFUSED at once (a plain drop would
//!   leave it retransmitting SYNs).
//! - cgroup connect4/connect6: connect() to a rejected upstream fails with ECONNREFUSED
//!   before any packet exists.

use aya_ebpf::{
    Global,
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_ops,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        xdp_md,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_redirect, bpf_set_retval, bpf_skb_ancestor_cgroup_id,
        bpf_skb_change_tail, bpf_xdp_adjust_tail,
    },
    macros::{cgroup_sock_addr, classifier, sock_ops, xdp},
    programs::{SockAddrContext, SockOpsContext, TcContext, XdpContext},
};
const TC_ACT_OK: i32 = aya_ebpf::bindings::TC_ACT_OK;

use aya_log_ebpf::{info, warn};
use circuit_common::{
    Control, ECONNREFUSED, EnforcementPoint, FlowKey, Stat, UpstreamKey, flow_mark,
    may_receive_reset,
};

use crate::{
    maps::{ADMITTED_FLOWS, ADMITTED_SOCKETS, RESET_BUDGET, SYN_OUT, count, mark_flow},
    packet::{self, Inspection, Syn},
    services::{Reroute, remember_rerouted, reroute},
    verdict::{
        Connection, Decision, active, active_for_connect, any_verdict, client_decision,
        count_reject, decide, is_exempt, remember_admitted,
    },
};

/// Parses a frame for a SYN that must be rejected at `point`; `exempt` says whether the
/// sender is a priority client (asked only for SYNs).
#[inline(always)]
fn rejected_syn(
    frame: &impl packet::Frame,
    point: EnforcementPoint,
    malformed: Stat,
    exempt: impl FnOnce(&Control) -> bool,
) -> Option<Syn> {
    // The fast path: with no verdict anywhere, the headers are not walked.
    let control = active()?;
    match packet::inspect(frame) {
        Inspection::Pass => None,
        Inspection::Malformed => {
            count(malformed);
            None
        }
        Inspection::Unjudged => {
            count(match point {
                EnforcementPoint::Xdp => Stat::XdpUnjudged,
                _ => Stat::TcUnjudged,
            });
            None
        }
        Inspection::Syn(syn) => match decide(
            &syn.upstream,
            point,
            &control,
            Connection::Flow(&syn.flow()),
        ) {
            Decision::Admit => None,
            Decision::Reject(_) if exempt(&control) => {
                remember_admitted(Connection::Flow(&syn.flow()));
                None
            }
            Decision::Reject(reason) => {
                count_reject(point, reason);
                Some(syn)
            }
        },
    }
}

/// Notes the flow as rejected so the outcome tracepoints do not blame the upstream.
#[inline(always)]
fn remember_reject(syn: &Syn) {
    mark_flow(&syn.flow(), flow_mark::REJECTED);
}

/// The XDP entry point. Kept small on purpose: it passes (and counts) what needs no
/// judgement (a plain IPv4 segment that is not a SYN, or no verdict anywhere) itself, and
/// calls [`judge`] for the rest, which counts its own. Judging a SYN takes many registers
/// and a large stack, which the JIT saves and sets up on entry: inline, every frame would
/// pay for that; out of line, only the frames judged pay for the call.
#[xdp]
pub fn xdp_enforce(ctx: XdpContext) -> u32 {
    // The shortcut before the switch: the common frame is told by either alone, and with the
    // shortcut first it needs nothing else whether or not verdicts exist.
    if packet::is_plain_non_syn(&ctx) || !any_verdict() {
        // Counted last, once the context is no longer needed: a count before would make it
        // outlive the (inlined) map lookup in a register the JIT must save and restore.
        count(Stat::XdpFrames);
        return XDP_PASS;
    }
    judge(ctx.ctx)
}

/// The rest of [`xdp_enforce`]: a SYN to a rejected upstream is answered with a RST built
/// in place and sent back out of the interface it came in on.
#[inline(never)]
fn judge(raw: *mut xdp_md) -> u32 {
    count(Stat::XdpFrames);
    // The context goes over as the bare pointer, which the verifier tracks as the context.
    let ctx = &XdpContext::new(raw);
    // Frames arriving from the wire carry no cgroup: no priority clients at XDP.
    let Some(syn) = rejected_syn(ctx, EnforcementPoint::Xdp, Stat::XdpParseFailures, |_| {
        false
    }) else {
        return XDP_PASS;
    };
    // A source that may not get a RST, or a spent budget: the SYN is dropped, still rejected
    // (a real client retransmits into the same verdict), and no reflection leaves the host.
    if !may_receive_reset(&syn.client.addr) {
        count(Stat::XdpResetsSuppressed);
        remember_reject(&syn);
        return XDP_DROP;
    }
    if !reset_budget_allows() {
        count(Stat::XdpResetsRateLimited);
        remember_reject(&syn);
        return XDP_DROP;
    }
    let frame_len = ctx.data_end() - ctx.data();
    let reply_len = syn.reply_len();
    // Shrink first: if the kernel refuses, the SYN is still intact and passes.
    if frame_len > reply_len {
        let delta = reply_len as i32 - frame_len as i32;
        // SAFETY: the context pointer the kernel passed; the verifier checks the call, and
        // `write_rst` below re-derives every packet pointer from the context afterwards.
        let rc = unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) };
        if rc != 0 {
            // Rare (a driver without tail adjustment): say so, since the SYN then passes.
            warn!(
                ctx,
                "xdp: cannot trim a rejected SYN to a reset ({}); passing it", rc
            );
            return XDP_PASS;
        }
    }
    if !packet::write_rst(ctx, &syn) {
        return XDP_PASS;
    }
    remember_reject(&syn);
    XDP_TX
}

/// Takes a token from this CPU's budget of resets (see [`circuit_common::ResetBudget`]).
#[inline(always)]
fn reset_budget_allows() -> bool {
    match RESET_BUDGET.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot; XDP runs one frame at a time per CPU.
        Some(budget) => unsafe { (*budget).take(bpf_ktime_get_ns()) },
        // Cannot happen for index 0; fail towards answering, as before the budget existed.
        None => true,
    }
}

/// The same attach point with nothing in it: the baseline of per-packet cost benchmarks.
#[xdp]
pub fn xdp_baseline(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[classifier]
pub fn tc_enforce(ctx: TcContext) -> i32 {
    count(Stat::TcPackets);
    if !any_verdict() {
        return TC_ACT_OK;
    }
    // Egress packets may have their headers outside the linear area: pull enough for
    // Ethernet + VLANs + IPv6 with extension headers + TCP.
    let _ = ctx.pull_data(ctx.len().min(256));
    if packet::is_plain_non_syn(&ctx) {
        return TC_ACT_OK;
    }
    let skb = ctx.skb.skb;
    let exempt = |control: &Control| {
        // SAFETY: `skb` is the context pointer the kernel passed; the verifier checks the call.
        is_exempt(control, |level| unsafe {
            bpf_skb_ancestor_cgroup_id(skb, level)
        })
    };
    let Some(syn) = rejected_syn(&ctx, EnforcementPoint::Tc, Stat::TcParseFailures, exempt) else {
        return TC_ACT_OK;
    };
    // SAFETY: the context pointer the kernel passed; the verifier checks the call. No packet
    // pointer is held across it: `write_rst` re-derives them from the context afterwards.
    let rc = unsafe { bpf_skb_change_tail(skb, syn.reply_len() as u32, 0) };
    if rc != 0 {
        warn!(
            &ctx,
            "tc: cannot trim a rejected SYN to a reset ({}); passing it", rc
        );
        return TC_ACT_OK;
    }
    if !packet::write_rst(&ctx, &syn) {
        // write_rst checks bounds before writing anything; a SYN trimmed by change_tail whose
        // rewrite then failed is dropped by the receiver's checksum, and the client retries.
        return TC_ACT_OK;
    }
    remember_reject(&syn);
    // SAFETY: `skb` is the context the kernel passed, valid for the program's run.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: a BPF helper with no pointer arguments.
    unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) as i32 }
}

/// See `circuit_common::CGROUP_SET_RETVAL_GLOBAL`. Read-only data, so the verifier knows
/// its value and never visits the helper call where the agent cleared it.
#[unsafe(no_mangle)]
static CGROUP_SET_RETVAL: Global<u32> = Global::new(1);

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const CGROUP_PROCEED: i32 = 1;
const CGROUP_REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn cgroup_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed, valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip4 holds the address in network byte order: its in-memory bytes are the octets.
    let addr = circuit_common::v4_mapped(sa.user_ip4.to_ne_bytes());
    connect::<false>(&ctx, sa.type_, sa.protocol, addr, sa.user_port)
}

#[cgroup_sock_addr(connect6)]
pub fn cgroup_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed, valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    connect::<true>(
        &ctx,
        sa.type_,
        sa.protocol,
        words_to_bytes(&sa.user_ip6),
        sa.user_port,
    )
}

/// `V6`: the connect6 hook (each hook may write only its own family's address fields).
#[inline(always)]
fn connect<const V6: bool>(
    ctx: &SockAddrContext,
    sock_type: u32,
    protocol: u32,
    addr: [u8; 16],
    user_port: u32,
) -> i32 {
    count(Stat::CgroupConnects);
    if sock_type != SOCK_STREAM || (protocol != 0 && protocol != IPPROTO_TCP) {
        return CGROUP_PROCEED;
    }
    let Some(control) = active_for_connect() else {
        return CGROUP_PROCEED;
    };
    // The port is in network byte order in the low 16 bits.
    let port = u16::from_be(user_port as u16);
    let upstream = UpstreamKey::new(addr, port);
    let exempt = |control: &Control| {
        // SAFETY: a BPF helper with no pointer arguments.
        is_exempt(control, |level| unsafe {
            bpf_get_current_ancestor_cgroup_id(level)
        })
    };
    // The client's own hold first: a held client takes no probe token from the others.
    // SAFETY: a BPF helper with no pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: a BPF helper with no pointer arguments.
    if let Decision::Reject(_) = client_decision(&control, &upstream, own, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    }) && !exempt(&control)
    {
        count(Stat::CgroupRejectClient);
        return reject_connect();
    }
    // SAFETY: the helper takes this program type's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let socket = Connection::Socket(cookie);
    // The address's own verdict first: an operator's trip of a virtual address holds even
    // while its endpoints are re-routed around.
    if control.active_verdicts != 0
        && let Decision::Reject(reason) =
            decide(&upstream, EnforcementPoint::Cgroup, &control, socket)
    {
        if exempt(&control) {
            remember_admitted(socket);
            // An audit trail of who got through an isolation.
            info!(
                ctx,
                "priority client admitted to isolated upstream port {}", port
            );
            return CGROUP_PROCEED;
        }
        count_reject(EnforcementPoint::Cgroup, reason);
        return reject_connect();
    }
    match reroute(&upstream, own, &control, socket) {
        Reroute::Untouched => CGROUP_PROCEED,
        Reroute::To(endpoint) => {
            redirect::<V6>(ctx, &endpoint);
            remember_rerouted(cookie, &upstream);
            count(Stat::ServiceReroutes);
            CGROUP_PROCEED
        }
        // Nothing to re-route to: the service fails fast as a whole, for this client.
        Reroute::Refused if exempt(&control) => CGROUP_PROCEED,
        Reroute::Refused => {
            count(Stat::ServiceRejects);
            reject_connect()
        }
    }
}

/// Points the connect at `endpoint` instead of the address the application gave.
#[inline(always)]
fn redirect<const V6: bool>(ctx: &SockAddrContext, endpoint: &UpstreamKey) {
    // SAFETY: the context the kernel passed, valid and writable for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let a = endpoint.addr;
    if !V6 {
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    } else {
        // Each word is one 4-byte store, as the verifier wants for this context.
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    }
    sa.user_port = u32::from(endpoint.port.to_be());
}

/// Fails the connect: ECONNREFUSED where the kernel lets the hook choose (5.18+), else the
/// kernel's EPERM.
#[inline(always)]
fn reject_connect() -> i32 {
    if CGROUP_SET_RETVAL.load() != 0 {
        // SAFETY: a cgroup sock_addr program may set its return value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    CGROUP_REJECT
}

/// As `tcp_connect()` sends a socket's SYN (its 4-tuple now chosen; for a connect deferred
/// by TCP_FASTOPEN_CONNECT, at its first write): notes that the SYN went out, and turns the
/// cgroup hook's admission of the socket into an admission of its flow, which XDP and TC
/// look up: a probe admitted at connect() is not charged a second token, or rejected,
/// further along.
#[sock_ops]
pub fn sockops_connect(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 0;
    }
    let ops = ctx.ops;
    // Each context field is read by its own instruction, at a constant offset from the
    // context register: the verifier refuses a load through a moved context pointer, which
    // LLVM produces when it shares one address computation between nearby fields.
    macro_rules! field {
        ($name:ident $([$i:literal])?) => {
            sock_ops_u32::<
                {
                    core::mem::offset_of!(bpf_sock_ops, $name) $(+ $i * 4)?
                },
            >(ops)
        };
    }
    let (client_addr, upstream_addr) = match field!(family) {
        AF_INET_U32 => (
            circuit_common::v4_mapped(field!(local_ip4).to_ne_bytes()),
            circuit_common::v4_mapped(field!(remote_ip4).to_ne_bytes()),
        ),
        AF_INET6_U32 => (
            words_to_bytes(&[
                field!(local_ip6[0]),
                field!(local_ip6[1]),
                field!(local_ip6[2]),
                field!(local_ip6[3]),
            ]),
            words_to_bytes(&[
                field!(remote_ip6[0]),
                field!(remote_ip6[1]),
                field!(remote_ip6[2]),
                field!(remote_ip6[3]),
            ]),
        ),
        _ => return 0,
    };
    let flow = FlowKey {
        client_addr,
        upstream_addr,
        // local_port is in host byte order; remote_port is the 32-bit big-endian value of
        // the port (the kernel shifts it into the upper half on little-endian machines).
        client_port: field!(local_port) as u16,
        upstream_port: u32::from_be(field!(remote_port)) as u16,
    };
    // SAFETY: a BPF helper with no pointer arguments.
    let _ = SYN_OUT.insert(flow, unsafe { bpf_ktime_get_ns() }, 0);
    if !any_verdict() {
        return 0;
    }
    // SAFETY: the helper takes this program type's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    if let Some(at) = unsafe { ADMITTED_SOCKETS.get(cookie) }.copied() {
        let _ = ADMITTED_SOCKETS.remove(cookie);
        let _ = ADMITTED_FLOWS.insert(flow, at, 0);
    }
    0
}

/// The u32 at `OFFSET` in the sock_ops context, as one load from the context register.
#[inline(always)]
fn sock_ops_u32<const OFFSET: usize>(ops: *mut bpf_sock_ops) -> u32 {
    let value: u64;
    // SAFETY: `ops` is the program's context and OFFSET a u32 field of it (offset_of! on
    // the uapi struct); the load only reads.
    unsafe {
        core::arch::asm!(
            "{value} = *(u32 *)({ops} + {offset})",
            value = lateout(reg) value,
            ops = in(reg) ops,
            offset = const OFFSET,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    value as u32
}

const AF_INET_U32: u32 = circuit_common::AF_INET as u32;
const AF_INET6_U32: u32 = circuit_common::AF_INET6 as u32;

/// An IPv6 address held as four words in network byte order, as bytes.
#[inline(always)]
fn words_to_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    addr
}
