//! Frame parsing shared by XDP and TC, and the in-place RST reply.
//!
//! The parser looks for a TCP SYN (without ACK) in Ethernet, optionally behind one or two
//! VLAN tags (802.1Q, QinQ), over IPv4 (with options) or IPv6 (with extension headers).
//! Anything else is passed; anything cut short or inconsistent is reported as malformed and
//! passed too.

use core::mem::size_of;

use circuit_common::{FlowKey, UpstreamKey, v4_mapped};

use crate::rst;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const PROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers walked before giving up (and passing the frame).
const MAX_IPV6_EXTENSIONS: usize = 4;

/// Raw packet bounds, as XDP and TC both expose them.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Frame for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Frame for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

#[inline(always)]
fn load<T: Copy>(frame: &impl Frame, offset: usize) -> Option<T> {
    let start = frame.start();
    if start + offset + size_of::<T>() > frame.end() {
        return None;
    }
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

#[inline(always)]
fn load_be16(frame: &impl Frame, offset: usize) -> Option<u16> {
    load::<[u8; 2]>(frame, offset).map(u16::from_be_bytes)
}

pub enum Inspection {
    Pass,
    Malformed,
    Syn(Syn),
}

/// What a reset needs from the SYN it answers. Addresses are v4-mapped for IPv4.
pub struct Syn {
    /// Offset of the IP header (after Ethernet and any VLAN tags).
    pub l3: usize,
    pub v6: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// SEG.SEQ + SEG.LEN: the SYN counts one, plus any payload.
    pub ack: u32,
}

impl Syn {
    pub fn upstream(&self) -> UpstreamKey {
        UpstreamKey::new(self.dst, self.dport)
    }

    pub fn flow(&self) -> FlowKey {
        FlowKey {
            client_addr: self.src,
            upstream_addr: self.dst,
            client_port: self.sport,
            upstream_port: self.dport,
        }
    }

    /// Length of the frame that carries the reset.
    pub fn reply_len(&self) -> usize {
        self.l3 + if self.v6 { rst::V6_LEN } else { rst::V4_LEN }
    }
}

#[inline(always)]
pub fn inspect(frame: &impl Frame) -> Inspection {
    let Some(mut ethertype) = load_be16(frame, 12) else {
        return Inspection::Malformed;
    };
    let mut l3 = ETH_HLEN;
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(inner) = load_be16(frame, l3 + 2) else {
                return Inspection::Malformed;
            };
            ethertype = inner;
            l3 += 4;
        }
    }
    match ethertype {
        ETH_P_IP => inspect_v4(frame, l3),
        ETH_P_IPV6 => inspect_v6(frame, l3),
        _ => Inspection::Pass,
    }
}

#[inline(always)]
fn inspect_v4(frame: &impl Frame, l3: usize) -> Inspection {
    let Some(ip) = load::<[u8; 20]>(frame, l3) else {
        return Inspection::Malformed;
    };
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Inspection::Malformed;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    // Only whole datagrams: a fragment (offset or more-fragments set) is passed.
    if ip[9] != PROTO_TCP || frag & 0x3fff != 0 {
        return Inspection::Pass;
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let Some(ip_payload) = total_len.checked_sub(ihl) else {
        return Inspection::Malformed;
    };
    tcp_syn(
        frame,
        l3,
        l3 + ihl,
        ip_payload,
        false,
        v4_mapped([ip[12], ip[13], ip[14], ip[15]]),
        v4_mapped([ip[16], ip[17], ip[18], ip[19]]),
    )
}

#[inline(always)]
fn inspect_v6(frame: &impl Frame, l3: usize) -> Inspection {
    let Some(ip) = load::<[u8; 40]>(frame, l3) else {
        return Inspection::Malformed;
    };
    if ip[0] >> 4 != 6 {
        return Inspection::Malformed;
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let mut next = ip[6];
    let mut l4 = l3 + 40;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            PROTO_TCP => break,
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let Some(ext) = load::<[u8; 2]>(frame, l4) else {
                    return Inspection::Malformed;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            // Fragment header: only an unfragmented datagram (offset 0, no M flag) is parsed.
            44 => {
                let Some(ext) = load::<[u8; 4]>(frame, l4) else {
                    return Inspection::Malformed;
                };
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff9 != 0 {
                    return Inspection::Pass;
                }
                next = ext[0];
                l4 += 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let Some(ext) = load::<[u8; 2]>(frame, l4) else {
                    return Inspection::Malformed;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 2) * 4;
            }
            _ => return Inspection::Pass,
        }
    }
    if next != PROTO_TCP {
        return Inspection::Pass;
    }
    let Some(tcp_len) = payload_len.checked_sub(l4 - l3 - 40) else {
        return Inspection::Malformed;
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    tcp_syn(frame, l3, l4, tcp_len, true, src, dst)
}

/// Parses the TCP header at `l4`; `segment_len` is the TCP header plus payload per the IP header.
#[inline(always)]
fn tcp_syn(
    frame: &impl Frame,
    l3: usize,
    l4: usize,
    segment_len: usize,
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
) -> Inspection {
    let Some(tcp) = load::<[u8; 20]>(frame, l4) else {
        return Inspection::Malformed;
    };
    if tcp[13] & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Inspection::Pass;
    }
    let doff = ((tcp[12] >> 4) as usize) * 4;
    if doff < 20 || segment_len < doff {
        return Inspection::Malformed;
    }
    let payload = (segment_len - doff) as u32;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Inspection::Syn(Syn {
        l3,
        v6,
        src,
        dst,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        ack: seq.wrapping_add(1).wrapping_add(payload),
    })
}

/// Rewrites the frame, already trimmed to `syn.reply_len()`, into the reset: Ethernet
/// addresses swapped (VLAN tags kept), a fresh IP header, a bare TCP RST|ACK. Returns false
/// if the frame is too short (then nothing was written).
#[inline(always)]
pub fn write_rst(frame: &impl Frame, syn: &Syn) -> bool {
    let start = frame.start();
    if start + syn.reply_len() > frame.end() {
        return false;
    }
    let Some(macs) = load::<[u8; 12]>(frame, 0) else {
        return false;
    };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 12], swapped) };
    if syn.v6 {
        let ip = rst::ipv6_header(&syn.dst, &syn.src);
        let tcp = rst::tcp_rst(
            syn.dport,
            syn.sport,
            syn.ack,
            rst::pseudo_sum_v6(&syn.dst, &syn.src),
        );
        unsafe {
            core::ptr::write_unaligned((start + syn.l3) as *mut [u8; 40], ip);
            core::ptr::write_unaligned((start + syn.l3 + 40) as *mut [u8; 20], tcp);
        }
    } else {
        let (src, dst) = (v4_tail(&syn.dst), v4_tail(&syn.src));
        let ip = rst::ipv4_header(src, dst);
        let tcp = rst::tcp_rst(syn.dport, syn.sport, syn.ack, rst::pseudo_sum_v4(src, dst));
        unsafe {
            core::ptr::write_unaligned((start + syn.l3) as *mut [u8; 20], ip);
            core::ptr::write_unaligned((start + syn.l3 + 20) as *mut [u8; 20], tcp);
        }
    }
    true
}

#[inline(always)]
fn v4_tail(mapped: &[u8; 16]) -> [u8; 4] {
    [mapped[12], mapped[13], mapped[14], mapped[15]]
}
