//! Test frames for the enforcement programs, katran-style: one addressing plan and the
//! builders of its frames, shared by the BPF_PROG_TEST_RUN fixtures
//! (tests/tests/xdp_fixtures.rs) and the dataplane benchmark (tests/benches/dataplane.rs),
//! so that what is measured is what is tested. Frames come from etherparse, independently
//! of the programs' parser.

use etherparse::{
    IpHeaders, Ipv4Header, Ipv4Options, Ipv6Header, PacketBuilder, PacketBuilderStep, TcpHeader,
    VlanId, ip_number,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT: [u8; 4] = [10, 9, 0, 1];
pub const UPSTREAM: [u8; 4] = [10, 9, 0, 2];
/// Isolated as a whole host (a verdict with port 0).
pub const ISOLATED_HOST: [u8; 4] = [10, 9, 0, 3];
pub const CLIENT6: [u8; 16] = [0xfd, 0, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const UPSTREAM6: [u8; 16] = [0xfd, 0, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const OPEN_PORT: u16 = 8080;
pub const HALF_OPEN_PORT: u16 = 8081;
pub const EXPIRED_PORT: u16 = 8082;
pub const CLOSED_PORT: u16 = 9090;
pub const CLIENT_PORT: u16 = 40_000;
pub const SEQ: u32 = 0x1234_5678;

/// The layer-2 framing of a fixture.
#[derive(Clone, Copy, Debug)]
pub enum L2 {
    Plain,
    Vlan,
    QinQ,
}

/// Ethernet (with `l2`'s VLAN tags) and `ip`, ready for the TCP header.
pub fn eth_ip(l2: L2, src: [u8; 6], dst: [u8; 6], ip: IpHeaders) -> PacketBuilderStep<IpHeaders> {
    let b = PacketBuilder::ethernet2(src, dst);
    match l2 {
        L2::Plain => b.ip(ip),
        L2::Vlan => b.single_vlan(VlanId::try_new(42).unwrap()).ip(ip),
        L2::QinQ => b
            .double_vlan(VlanId::try_new(100).unwrap(), VlanId::try_new(42).unwrap())
            .ip(ip),
    }
}

pub fn finish(builder: PacketBuilderStep<TcpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

pub fn v4(src: [u8; 4], dst: [u8; 4], options: &[u8]) -> IpHeaders {
    let mut ip = Ipv4Header::new(0, 64, ip_number::TCP, src, dst).unwrap();
    ip.options = Ipv4Options::try_from(options).unwrap();
    IpHeaders::Ipv4(ip, Default::default())
}

pub fn v6(src: [u8; 16], dst: [u8; 16]) -> IpHeaders {
    IpHeaders::Ipv6(
        Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: 0,
            next_header: ip_number::TCP,
            hop_limit: 64,
            source: src,
            destination: dst,
        },
        Default::default(),
    )
}

/// A client SYN over `ip` (addresses inside `ip`).
pub fn syn(l2: L2, ip: IpHeaders, port: u16, payload: &[u8]) -> Vec<u8> {
    let b = eth_ip(l2, CLIENT_MAC, GATEWAY_MAC, ip)
        .tcp(CLIENT_PORT, port, SEQ, 64_240)
        .syn();
    finish(b, payload)
}

pub fn syn_v4(port: u16) -> Vec<u8> {
    syn(L2::Plain, v4(CLIENT, UPSTREAM, &[]), port, &[])
}

/// A SYN of another connection of the client's: from `client_port`.
pub fn syn_v4_from(client_port: u16, port: u16) -> Vec<u8> {
    let b = eth_ip(
        L2::Plain,
        CLIENT_MAC,
        GATEWAY_MAC,
        v4(CLIENT, UPSTREAM, &[]),
    )
    .tcp(client_port, port, SEQ, 64_240)
    .syn();
    finish(b, &[])
}

/// `frame` (ending in a 20-byte TCP header and no payload, as [`syn`] makes it) with its
/// TCP flags set to `flags`.
pub fn with_tcp_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    const FLAGS_FROM_END: usize = 20 - 13;
    let at = frame.len() - FLAGS_FROM_END;
    frame[at] = flags;
    frame
}
