//! Frame parsing shared by XDP and TC, and the in-place RST reply.
//!
//! The parser looks for a TCP SYN (without ACK) in Ethernet, optionally behind one or two
//! VLAN tags (802.1Q, QinQ), over IPv4 (with options) or IPv6 (with extension headers).
//! Anything else is passed; anything cut short or inconsistent is reported as malformed and
//! passed too.

use core::mem::size_of;

use circuit_common::{FlowKey, UpstreamKey};

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

/// `len` bytes of the frame at `offset`, bounds-checked once; fields are then read one by
/// one, so a frame that is not a SYN costs only the bytes needed to tell.
#[derive(Clone, Copy)]
struct View {
    at: usize,
}

impl View {
    #[inline(always)]
    fn u8(self, i: usize) -> u8 {
        // SAFETY: in bounds: `view` checked `at + len <= end`, and every caller reads below
        // the `len` it asked for; a byte load needs no alignment.
        unsafe { *((self.at + i) as *const u8) }
    }

    /// One 16-bit load (an unaligned read would be split into byte loads).
    #[inline(always)]
    fn be16(self, i: usize) -> u16 {
        // SAFETY: in bounds (checked by `view`). Aligned on an assumption: the frame starts
        // 2-byte aligned, as the kernel lays out Ethernet frames (an earlier program's
        // bpf_xdp_adjust_head by an odd amount would break it, and x86-64, the JIT's
        // target here, reads it all the same), and every 16-bit field sits at an even
        // offset (headers are multiples of 2, 4 or 8 bytes long).
        u16::from_be(unsafe { core::ptr::read((self.at + i) as *const u16) })
    }

    #[inline(always)]
    fn be32(self, i: usize) -> u32 {
        u32::from_be_bytes([self.u8(i), self.u8(i + 1), self.u8(i + 2), self.u8(i + 3)])
    }

    /// The 4 bytes at `i` (even) in memory order, from two 16-bit loads (see [`View::be16`]).
    #[inline(always)]
    fn word(self, i: usize) -> u32 {
        // SAFETY: as in `be16`.
        let [a, b] = unsafe { core::ptr::read((self.at + i) as *const u16) }.to_ne_bytes();
        // SAFETY: as in `be16`; bytes i + 2 .. i + 4 lie in the view too.
        let [c, d] = unsafe { core::ptr::read((self.at + i + 2) as *const u16) }.to_ne_bytes();
        u32::from_ne_bytes([a, b, c, d])
    }

    /// The 4 bytes at `I` in memory order, in one 32-bit load at whatever alignment the
    /// frame has.
    #[inline(always)]
    fn word_at<const I: usize>(self) -> u32 {
        let word: u64;
        // SAFETY: in bounds (checked by `view`), and read-only. Written as the instruction
        // itself because Rust has no unaligned load that stays one load on BPF (LLVM splits
        // `read_unaligned` into bytes), and `ptr::read` would promise an alignment this
        // address need not have. The verifier checks packet alignment only in strict mode
        // (BPF_F_STRICT_ALIGNMENT, which the agent never sets) or on CPUs without efficient
        // unaligned access; x86-64 and arm64, the targets of this little-endian program,
        // read a word at any address.
        unsafe {
            core::arch::asm!(
                "{word} = *(u32 *)({at} + {offset})",
                word = lateout(reg) word,
                at = in(reg) self.at,
                offset = const I,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        word as u32
    }

    /// The IPv4 address at `i`, v4-mapped, as the four words of an [`UpstreamKey`] address.
    #[inline(always)]
    fn v4_mapped(self, i: usize) -> [u32; 4] {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), self.word(i)]
    }

    /// The IPv6 address at `i`, as four words.
    #[inline(always)]
    fn v6(self, i: usize) -> [u32; 4] {
        [
            self.word(i),
            self.word(i + 4),
            self.word(i + 8),
            self.word(i + 12),
        ]
    }
}

#[inline(always)]
fn view(frame: &impl Frame, offset: usize, len: usize) -> Option<View> {
    let at = frame.start() + offset;
    (at + len <= frame.end()).then_some(View { at })
}

#[inline(always)]
fn load<T: Copy>(frame: &impl Frame, offset: usize) -> Option<T> {
    // SAFETY: `view` checked that the size_of::<T>() bytes at `v.at` lie in the frame; the
    // read is unaligned, and T is only ever a byte array, valid for any bits.
    view(frame, offset, size_of::<T>())
        .map(|v| unsafe { core::ptr::read_unaligned(v.at as *const T) })
}

pub enum Inspection {
    Pass,
    Malformed,
    /// TCP that may be a SYN but cannot be judged here (a first fragment, or IPv6 extension
    /// headers beyond [`MAX_IPV6_EXTENSIONS`]): passed, and counted.
    Unjudged,
    Syn(Syn),
}

/// What a reset needs from the SYN it answers. Addresses are v4-mapped for IPv4.
pub struct Syn {
    /// Offset of the IP header (after Ethernet and any VLAN tags).
    pub l3: usize,
    pub v6: bool,
    /// The sender's address and port.
    pub client: UpstreamKey,
    /// The destination: the upstream whose verdict counts.
    pub upstream: UpstreamKey,
    /// SEG.SEQ + SEG.LEN: the SYN counts one, plus any payload.
    pub ack: u32,
}

impl Syn {
    pub fn flow(&self) -> FlowKey {
        FlowKey {
            client_addr: self.client.addr,
            upstream_addr: self.upstream.addr,
            client_port: self.client.port,
            upstream_port: self.upstream.port,
        }
    }

    /// Length of the frame that carries the reset.
    pub fn reply_len(&self) -> usize {
        self.l3 + if self.v6 { rst::V6_LEN } else { rst::V4_LEN }
    }
}

#[inline(always)]
pub fn inspect(frame: &impl Frame) -> Inspection {
    let Some(eth) = view(frame, 0, ETH_HLEN) else {
        return Inspection::Malformed;
    };
    let mut ethertype = eth.be16(12);
    let mut l3 = ETH_HLEN;
    // Untagged IP first: the common frame pays no VLAN checks.
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        for _ in 0..2 {
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                let Some(tag) = view(frame, l3, 4) else {
                    return Inspection::Malformed;
                };
                ethertype = tag.be16(2);
                l3 += 4;
            }
        }
    }
    match ethertype {
        ETH_P_IP => inspect_v4(frame, l3),
        ETH_P_IPV6 => inspect_v6(frame, l3),
        _ => Inspection::Pass,
    }
}

/// Whether the frame is the most common kind, untagged IPv4 without options carrying TCP,
/// and not a SYN: told with one bounds check and three loads, where [`inspect`] takes several
/// of each. The enforcement points ask it first. Only ever a shortcut to the answer
/// `inspect` gives (a pass); anything else, a SYN included, takes the walk.
#[inline(always)]
pub fn is_plain_non_syn(frame: &impl Frame) -> bool {
    // The EtherType and the IPv4 version and header length are adjacent: one load, with the
    // type of service masked off.
    const IPV4_NO_OPTIONS: u32 = {
        let [hi, lo] = ETH_P_IP.to_be_bytes();
        u32::from_ne_bytes([hi, lo, 0x45, 0])
    };
    const BUT_TYPE_OF_SERVICE: u32 = u32::from_ne_bytes([0xff, 0xff, 0xff, 0]);
    const L4: usize = ETH_HLEN + 20;
    let Some(v) = view(frame, 0, L4 + 20) else {
        return false;
    };
    v.word_at::<12>() & BUT_TYPE_OF_SERVICE == IPV4_NO_OPTIONS
        && v.u8(ETH_HLEN + 9) == PROTO_TCP
        && !is_connection_request(v.u8(L4 + 13))
}

/// A SYN without ACK or RST: the first segment of a new connection, the only one rejected.
#[inline(always)]
fn is_connection_request(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

#[inline(always)]
fn inspect_v4(frame: &impl Frame, l3: usize) -> Inspection {
    let Some(ip) = view(frame, l3, 20) else {
        return Inspection::Malformed;
    };
    let version_ihl = ip.u8(0);
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Inspection::Malformed;
    }
    if ip.u8(9) != PROTO_TCP {
        return Inspection::Pass;
    }
    // The flags are checked before the fragment bits: most frames stop here, and a SYN
    // "seen" in a non-first fragment's payload is still passed just below.
    let l4 = l3 + ihl;
    let flags = syn_flags(frame, l4);
    if flags == SynFlags::NotSyn {
        return Inspection::Pass;
    }
    // Only whole datagrams are judged. A later fragment holds no TCP header at all; a
    // first one with SYN flags is a fragmented SYN, passed and counted.
    let fragment = ip.be16(6);
    if fragment & 0x1fff != 0 {
        return Inspection::Pass;
    }
    if fragment & 0x2000 != 0 {
        return Inspection::Unjudged;
    }
    let Some(ip_payload) = (ip.be16(2) as usize).checked_sub(ihl) else {
        return Inspection::Malformed;
    };
    if flags == SynFlags::Cut {
        return Inspection::Malformed;
    }
    match tcp_syn(frame, l4, ip_payload) {
        Err(()) => Inspection::Malformed,
        Ok(tcp) => Inspection::Syn(tcp.syn(l3, false, ip.v4_mapped(12), ip.v4_mapped(16))),
    }
}

#[inline(always)]
fn inspect_v6(frame: &impl Frame, l3: usize) -> Inspection {
    let Some(ip) = view(frame, l3, 40) else {
        return Inspection::Malformed;
    };
    if ip.u8(0) >> 4 != 6 {
        return Inspection::Malformed;
    }
    let mut next = ip.u8(6);
    let mut l4 = l3 + 40;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            PROTO_TCP => break,
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let Some(ext) = view(frame, l4, 2) else {
                    return Inspection::Malformed;
                };
                next = ext.u8(0);
                l4 += (ext.u8(1) as usize + 1) * 8;
            }
            // Fragment header: only an unfragmented datagram (offset 0, no M flag) is parsed.
            44 => {
                let Some(ext) = view(frame, l4, 4) else {
                    return Inspection::Malformed;
                };
                let fragment = ext.be16(2);
                if fragment & 0xfff8 != 0 {
                    // A later fragment: no TCP header in it.
                    return Inspection::Pass;
                }
                if fragment & 0x0001 != 0 {
                    // A first fragment: of TCP (or behind more headers) it may start a
                    // SYN, not judged whole; of anything else (large UDP answers) it
                    // passes like the rest of that protocol.
                    return match ext.u8(0) {
                        PROTO_TCP | 0 | 43 | 51 | 60 => Inspection::Unjudged,
                        _ => Inspection::Pass,
                    };
                }
                next = ext.u8(0);
                l4 += 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let Some(ext) = view(frame, l4, 2) else {
                    return Inspection::Malformed;
                };
                next = ext.u8(0);
                l4 += (ext.u8(1) as usize + 2) * 4;
            }
            _ => return Inspection::Pass,
        }
    }
    match next {
        PROTO_TCP => {}
        // Still an extension header after the last one walked: a SYN may lie beyond.
        0 | 43 | 44 | 51 | 60 => return Inspection::Unjudged,
        _ => return Inspection::Pass,
    }
    let Some(tcp_len) = (ip.be16(4) as usize).checked_sub(l4 - l3 - 40) else {
        return Inspection::Malformed;
    };
    match syn_flags(frame, l4) {
        SynFlags::NotSyn => return Inspection::Pass,
        SynFlags::Cut => return Inspection::Malformed,
        SynFlags::Syn => {}
    }
    match tcp_syn(frame, l4, tcp_len) {
        Err(()) => Inspection::Malformed,
        Ok(tcp) => Inspection::Syn(tcp.syn(l3, true, ip.v6(8), ip.v6(24))),
    }
}

/// What the flags of the TCP header at some offset say, and nothing else: the fields of a
/// SYN are read by [`tcp_syn`] once every reason to pass or refuse the frame has been
/// checked. Read earlier, a field lives on (spilled to the stack) across branches where it
/// was never read, and older verifiers (6.1.176, 5.10) reject the read of a stack slot a
/// path did not write, where newer ones let privileged programs read it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SynFlags {
    /// Not a SYN without ACK or RST: passed.
    NotSyn,
    /// The header is cut short.
    Cut,
    Syn,
}

#[inline(always)]
fn syn_flags(frame: &impl Frame, l4: usize) -> SynFlags {
    match view(frame, l4, 20) {
        None => SynFlags::Cut,
        Some(tcp) if is_connection_request(tcp.u8(13)) => SynFlags::Syn,
        Some(_) => SynFlags::NotSyn,
    }
}

/// The TCP part of a SYN.
struct TcpSyn {
    sport: u16,
    dport: u16,
    /// SEG.SEQ + SEG.LEN: the SYN counts one, plus any payload.
    ack: u32,
}

impl TcpSyn {
    /// The SYN between `src` and `dst`, addresses as four words in memory order.
    #[inline(always)]
    fn syn(self, l3: usize, v6: bool, src: [u32; 4], dst: [u32; 4]) -> Syn {
        // SAFETY: [u32; 4] and [u8; 16] have the same size, and every bit pattern is valid.
        let addr = |words: [u32; 4]| unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) };
        Syn {
            l3,
            v6,
            client: UpstreamKey::new(addr(src), self.sport),
            upstream: UpstreamKey::new(addr(dst), self.dport),
            ack: self.ack,
        }
    }
}

/// Reads the SYN (told by [`syn_flags`]) at `l4` whose segment, header included, is
/// `segment_len` bytes long according to the IP header; Err when the two disagree.
#[inline(always)]
fn tcp_syn(frame: &impl Frame, l4: usize, segment_len: usize) -> Result<TcpSyn, ()> {
    let tcp = view(frame, l4, 20).ok_or(())?;
    let doff = ((tcp.u8(12) >> 4) as usize) * 4;
    if doff < 20 || segment_len < doff {
        return Err(());
    }
    let payload = (segment_len - doff) as u32;
    Ok(TcpSyn {
        sport: tcp.be16(0),
        dport: tcp.be16(2),
        ack: tcp.be32(4).wrapping_add(1).wrapping_add(payload),
    })
}

/// Rewrites the frame, already trimmed to `syn.reply_len()`, into the reset: Ethernet
/// addresses swapped (VLAN tags kept), a fresh IP header, a bare TCP RST|ACK. Returns false
/// if the frame is too short (then nothing was written).
#[inline(always)]
pub fn write_rst(frame: &impl Frame, syn: &Syn) -> bool {
    let Some(macs) = load::<[u8; 12]>(frame, 0) else {
        return false;
    };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    // Each branch checks the bounds of exactly what it writes, so that the verifier sees
    // them whatever the compiler makes of `syn`.
    if syn.v6 {
        let Some(reply) = view(frame, syn.l3, rst::V6_LEN) else {
            return false;
        };
        let (upstream, client) = (&syn.upstream.addr, &syn.client.addr);
        let ip = rst::ipv6_header(upstream, client);
        let tcp = rst::tcp_rst(
            syn.upstream.port,
            syn.client.port,
            syn.ack,
            rst::pseudo_sum_v6(upstream, client),
        );
        // SAFETY: in bounds (`load` above checked bytes 0..12, `reply` the 60 from `l3`), and
        // unaligned writes need no alignment.
        unsafe {
            core::ptr::write_unaligned(frame.start() as *mut [u8; 12], swapped);
            core::ptr::write_unaligned(reply.at as *mut [u8; 40], ip);
            core::ptr::write_unaligned((reply.at + 40) as *mut [u8; 20], tcp);
        }
    } else {
        let Some(reply) = view(frame, syn.l3, rst::V4_LEN) else {
            return false;
        };
        let (src, dst) = (v4_tail(&syn.upstream.addr), v4_tail(&syn.client.addr));
        let ip = rst::ipv4_header(src, dst);
        let tcp = rst::tcp_rst(
            syn.upstream.port,
            syn.client.port,
            syn.ack,
            rst::pseudo_sum_v4(src, dst),
        );
        // SAFETY: in bounds (`load` above checked bytes 0..12, `reply` the 40 from `l3`), and
        // unaligned writes need no alignment.
        unsafe {
            core::ptr::write_unaligned(frame.start() as *mut [u8; 12], swapped);
            core::ptr::write_unaligned(reply.at as *mut [u8; 20], ip);
            core::ptr::write_unaligned((reply.at + 20) as *mut [u8; 20], tcp);
        }
    }
    true
}

#[inline(always)]
fn v4_tail(mapped: &[u8; 16]) -> [u8; 4] {
    [mapped[12], mapped[13], mapped[14], mapped[15]]
}
