//! XDP enforcement: a SYN (without ACK) to an upstream whose verdict is OPEN, or HALF_OPEN
//! with its probe budget spent, is answered with a RST built in place and sent back out of
//! the interface it came in on (XDP_TX), so the client's connect() fails with ECONNREFUSED
//! at once. Everything else (established flows, other protocols, anything malformed or
//! unexpected) is passed untouched.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::size_of,
};

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
};
use circuit_common::{FlowKey, Stat, UpstreamKey, VerdictState, v4_mapped};

use crate::{
    maps::{REJECTED, VERDICTS, count},
    rst,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IP_PROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// IPv4 header + TCP header of the reset we send.
const RST_L3_LEN: usize = 40;

#[xdp]
pub fn xdp_enforce(ctx: XdpContext) -> u32 {
    count(Stat::XdpFrames);
    match inspect(&ctx) {
        Inspection::Pass => XDP_PASS,
        Inspection::Malformed => {
            count(Stat::XdpParseFailures);
            XDP_PASS
        }
        Inspection::Syn(syn) => enforce(&ctx, &syn),
    }
}

enum Inspection {
    Pass,
    Malformed,
    Syn(SynV4),
}

/// What the reset needs from the SYN it answers.
struct SynV4 {
    l3: usize,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    /// SEG.SEQ + SEG.LEN: the SYN counts one, plus any payload.
    ack: u32,
}

#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

#[inline(always)]
fn load_be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

#[inline(always)]
fn inspect(ctx: &XdpContext) -> Inspection {
    let Some(mut ethertype) = load_be16(ctx, 12) else {
        return Inspection::Malformed;
    };
    let mut l3 = ETH_HLEN;
    // 802.1Q and QinQ: up to two tags.
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(inner) = load_be16(ctx, l3 + 2) else {
                return Inspection::Malformed;
            };
            ethertype = inner;
            l3 += 4;
        }
    }
    if ethertype != ETH_P_IP {
        return Inspection::Pass;
    }
    let Some(ip) = load::<[u8; 20]>(ctx, l3) else {
        return Inspection::Malformed;
    };
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Inspection::Malformed;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    // Only whole datagrams: a fragment (offset or more-fragments set) is passed.
    if ip[9] != IP_PROTO_TCP || frag & 0x3fff != 0 {
        return Inspection::Pass;
    }
    let l4 = l3 + ihl;
    let Some(tcp) = load::<[u8; 20]>(ctx, l4) else {
        return Inspection::Malformed;
    };
    if tcp[13] & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Inspection::Pass;
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let doff = ((tcp[12] >> 4) as usize) * 4;
    if doff < 20 || total_len < ihl + doff {
        return Inspection::Malformed;
    }
    let payload = (total_len - ihl - doff) as u32;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Inspection::Syn(SynV4 {
        l3,
        src: [ip[12], ip[13], ip[14], ip[15]],
        dst: [ip[16], ip[17], ip[18], ip[19]],
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        ack: seq.wrapping_add(1).wrapping_add(payload),
    })
}

#[inline(always)]
fn enforce(ctx: &XdpContext, syn: &SynV4) -> u32 {
    count(Stat::XdpSynsChecked);
    let key = UpstreamKey::v4(syn.dst, syn.dport);
    let Some(verdict) = VERDICTS.get_ptr_mut(key) else {
        return XDP_PASS;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let verdict = unsafe { &mut *verdict };
    if now >= verdict.lease_expires_ns {
        // Nobody renewed this verdict: fail open.
        count(Stat::LeaseExpired);
        return XDP_PASS;
    }
    match VerdictState::from_u8(verdict.state) {
        Some(VerdictState::Open) => {}
        Some(VerdictState::HalfOpen) => {
            // Count first, decide on the count we see afterwards. The increment is atomic
            // across CPUs (BPF XADD), so k admitted SYNs each saw a count >= k: never more
            // than the budget. Under an exact race two SYNs may both see a count over budget
            // and both be rejected; that errs towards protecting the upstream.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &mut verdict.probes_admitted,
                    1,
                );
            }
            let seen = unsafe { core::ptr::read_volatile(&verdict.probes_admitted) };
            if seen <= u64::from(verdict.probe_budget) {
                count(Stat::XdpProbesAdmitted);
                return XDP_PASS;
            }
        }
        None => return XDP_PASS,
    }
    reply_rst(ctx, syn)
}

#[inline(always)]
fn reply_rst(ctx: &XdpContext, syn: &SynV4) -> u32 {
    let Some(macs) = load::<[u8; 12]>(ctx, 0) else {
        return XDP_PASS;
    };
    let frame_len = ctx.data_end() - ctx.data();
    let new_len = syn.l3 + RST_L3_LEN;
    // Shrink first: if the kernel refuses, the SYN is still intact and passes.
    if frame_len > new_len {
        let delta = new_len as i32 - frame_len as i32;
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return XDP_PASS;
        }
    }
    let start = ctx.data();
    if start + syn.l3 + RST_L3_LEN > ctx.data_end() {
        return XDP_PASS;
    }
    let flow = FlowKey {
        client_addr: v4_mapped(syn.src),
        upstream_addr: v4_mapped(syn.dst),
        client_port: syn.sport,
        upstream_port: syn.dport,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = REJECTED.insert(flow, now, 0);

    let mut eth_addrs = [0u8; 12];
    eth_addrs[..6].copy_from_slice(&macs[6..]);
    eth_addrs[6..].copy_from_slice(&macs[..6]);
    let ip = rst::ipv4_header(syn.dst, syn.src);
    let tcp = rst::tcp_rst(
        syn.dport,
        syn.sport,
        syn.ack,
        rst::pseudo_sum_v4(syn.dst, syn.src),
    );
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; 12], eth_addrs);
        core::ptr::write_unaligned((start + syn.l3) as *mut [u8; 20], ip);
        core::ptr::write_unaligned((start + syn.l3 + 20) as *mut [u8; 20], tcp);
    }
    count(Stat::XdpRejects);
    XDP_TX
}
