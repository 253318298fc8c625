//! The TCP RST that answers a rejected SYN (RFC 9293 §3.10.7.1: the SYN carried no ACK, so
//! the reset has SEQ 0, ACK = SEG.SEQ + SEG.LEN, flags RST|ACK), with the headers built in
//! registers and both checksums computed from the values, not read back from the packet.

/// An IPv4 header of 20 bytes (no options) for a 40-byte IP+TCP reset from `src` to `dst`.
#[inline(always)]
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
    const TOTAL_LEN: u16 = 40;
    const TTL: u8 = 64;
    const PROTO_TCP: u8 = 6;
    let mut sum =
        0x4500u32 + TOTAL_LEN as u32 + 0x4000 /* DF */ + ((TTL as u32) << 8 | PROTO_TCP as u32);
    sum += words(src) + words(dst);
    let csum = !fold(sum);
    let c = csum.to_be_bytes();
    #[rustfmt::skip]
    let header = [
        0x45, 0, 0, TOTAL_LEN as u8,     // version/IHL, TOS, total length
        0, 0, 0x40, 0,                   // id, DF, fragment offset
        TTL, PROTO_TCP, c[0], c[1],      // TTL, protocol, checksum
        src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    header
}

/// A 20-byte TCP RST|ACK header; `pseudo_sum` is the unfolded sum of the IP pseudo-header
/// (addresses, protocol, TCP length), see [`pseudo_sum_v4`].
#[inline(always)]
pub fn tcp_rst(sport: u16, dport: u16, ack: u32, pseudo_sum: u32) -> [u8; 20] {
    const DOFF_FLAGS: u16 = 0x5000 | 0x04 /* RST */ | 0x10 /* ACK */;
    let sum =
        pseudo_sum + sport as u32 + dport as u32 + (ack >> 16) + (ack & 0xffff) + DOFF_FLAGS as u32;
    let csum = !fold(sum);
    let (a, c) = (ack.to_be_bytes(), csum.to_be_bytes());
    let (sp, dp, fl) = (
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

/// Pseudo-header sum for a 20-byte TCP segment from `src` to `dst` over IPv4.
#[inline(always)]
pub fn pseudo_sum_v4(src: [u8; 4], dst: [u8; 4]) -> u32 {
    words(src) + words(dst) + 6 + 20
}

#[inline(always)]
fn words(addr: [u8; 4]) -> u32 {
    u16::from_be_bytes([addr[0], addr[1]]) as u32 + u16::from_be_bytes([addr[2], addr[3]]) as u32
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
