//! The TCP RST that answers a rejected SYN (RFC 9293 §3.10.7.1: the SYN carried no ACK, so
//! the reset has SEQ 0, ACK = SEG.SEQ + SEG.LEN, flags RST|ACK), with the headers built in
//! registers and both checksums computed from the values, not read back from the packet.

const TCP_LEN: u16 = 20;
const PROTO_TCP: u8 = 6;
const HOP_LIMIT: u8 = 64;
/// IPv4 header + TCP header of the reset.
pub const V4_LEN: usize = 40;
/// IPv6 header + TCP header of the reset.
pub const V6_LEN: usize = 60;

/// An IPv4 header of 20 bytes (no options, DF) for a 40-byte IP+TCP reset.
#[inline(always)]
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
    const TOTAL_LEN: u16 = V4_LEN as u16;
    let sum = 0x4500u32
        + TOTAL_LEN as u32
        + 0x4000 // DF
        + ((HOP_LIMIT as u32) << 8 | PROTO_TCP as u32)
        + words(&src)
        + words(&dst);
    let c = (!fold(sum)).to_be_bytes();
    #[rustfmt::skip]
    let header = [
        0x45, 0, 0, TOTAL_LEN as u8,       // version/IHL, TOS, total length
        0, 0, 0x40, 0,                     // id, DF, fragment offset
        HOP_LIMIT, PROTO_TCP, c[0], c[1],  // TTL, protocol, checksum
        src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    header
}

/// An IPv6 header of 40 bytes (no extension headers) for a reset.
#[inline(always)]
pub fn ipv6_header(src: &[u8; 16], dst: &[u8; 16]) -> [u8; 40] {
    let mut header = [0u8; 40];
    header[0] = 0x60;
    header[5] = TCP_LEN as u8;
    header[6] = PROTO_TCP;
    header[7] = HOP_LIMIT;
    header[8..24].copy_from_slice(src);
    header[24..40].copy_from_slice(dst);
    header
}

/// A 20-byte TCP RST|ACK header; `pseudo_sum` is the unfolded pseudo-header sum.
#[inline(always)]
pub fn tcp_rst(sport: u16, dport: u16, ack: u32, pseudo_sum: u32) -> [u8; 20] {
    const DOFF_FLAGS: u16 = 0x5000 | 0x04 /* RST */ | 0x10 /* ACK */;
    let sum =
        pseudo_sum + sport as u32 + dport as u32 + (ack >> 16) + (ack & 0xffff) + DOFF_FLAGS as u32;
    let c = (!fold(sum)).to_be_bytes();
    let (a, sp, dp, fl) = (
        ack.to_be_bytes(),
        sport.to_be_bytes(),
        dport.to_be_bytes(),
        DOFF_FLAGS.to_be_bytes(),
    );
    #[rustfmt::skip]
    let header = [
        sp[0], sp[1], dp[0], dp[1],     // ports
        0, 0, 0, 0,                     // SEQ 0
        a[0], a[1], a[2], a[3],         // ACK
        fl[0], fl[1], 0, 0,             // data offset + flags, window 0
        c[0], c[1], 0, 0,               // checksum, urgent pointer
    ];
    header
}

/// Pseudo-header sum for a 20-byte TCP segment over IPv4.
#[inline(always)]
pub fn pseudo_sum_v4(src: [u8; 4], dst: [u8; 4]) -> u32 {
    words(&src) + words(&dst) + PROTO_TCP as u32 + TCP_LEN as u32
}

/// Pseudo-header sum for a 20-byte TCP segment over IPv6.
#[inline(always)]
pub fn pseudo_sum_v6(src: &[u8; 16], dst: &[u8; 16]) -> u32 {
    words(src) + words(dst) + PROTO_TCP as u32 + TCP_LEN as u32
}

/// Sum of the big-endian 16-bit words of an address.
#[inline(always)]
fn words<const N: usize>(addr: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([addr[i], addr[i + 1]]) as u32;
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
