//! The XDP enforcement program in the real kernel through BPF_PROG_TEST_RUN, katran-style:
//! an input frame, the verdicts in the map, the expected action and output frame. Expected
//! frames and checksums come from etherparse, independently of the program's own code.

use std::{net::SocketAddr, path::Path, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use circuit_agent::{
    engine::{Clock, MonotonicClock},
    kernel::{Stats, XdpUnderTest},
};
use circuit_common::Stat;
use circuit_tests::{RemoveOnDrop, require_root, unique_name};
use etherparse::{
    Ipv4Header, Ipv4Options, PacketBuilder, SlicedPacket, TransportSlice, VlanId, ip_number,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT: [u8; 4] = [10, 9, 0, 1];
const UPSTREAM: [u8; 4] = [10, 9, 0, 2];
const OPEN_PORT: u16 = 8080;
const HALF_OPEN_PORT: u16 = 8081;
const EXPIRED_PORT: u16 = 8082;
const CLOSED_PORT: u16 = 9090;
const CLIENT_PORT: u16 = 40_000;
const SEQ: u32 = 0x1234_5678;

struct Fixture {
    xdp: XdpUnderTest,
    pins: RemoveOnDrop,
}

impl Fixture {
    fn new() -> Self {
        require_root().unwrap();
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbxdp")));
        let mut xdp = XdpUnderTest::load(&pins.0).unwrap();
        let now = MonotonicClock.now();
        let lease = now.saturating_add(Duration::from_secs(300));
        xdp.verdicts.reject(upstream(OPEN_PORT), lease).unwrap();
        xdp.verdicts
            .probe(upstream(HALF_OPEN_PORT), 1, lease)
            .unwrap();
        // A lease already in the past: a dead agent's verdict.
        xdp.verdicts.reject(upstream(EXPIRED_PORT), now).unwrap();
        Self { xdp, pins }
    }

    /// Runs one frame; returns the action and the output frame.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; 2048];
        let result = self
            .xdp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn stat(&self, stat: Stat) -> u64 {
        Stats::open_pinned(&self.pins.0).unwrap().get(stat).unwrap()
    }
}

fn upstream(port: u16) -> SocketAddr {
    SocketAddr::from((UPSTREAM, port))
}

fn syn_to(port: u16) -> Vec<u8> {
    syn_with(port, &[])
}

fn syn_with(port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(CLIENT, UPSTREAM, 64)
        .tcp(CLIENT_PORT, port, SEQ, 64_240)
        .syn();
    write(builder, payload)
}

fn write<B: Into<etherparse::PacketBuilderStep<etherparse::TcpHeader>>>(
    builder: B,
    payload: &[u8],
) -> Vec<u8> {
    let builder = builder.into();
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// The reset we expect for a SYN from the client: addresses and ports swapped, SEQ 0,
/// ACK = SEG.SEQ + SEG.LEN, RST|ACK, DF, TTL 64, no options.
fn expected_rst(ack: u32) -> Vec<u8> {
    let mut ip = Ipv4Header::new(20, 64, ip_number::TCP, UPSTREAM, CLIENT).unwrap();
    ip.dont_fragment = true;
    let builder = PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(OPEN_PORT, CLIENT_PORT, 0, 0)
        .rst()
        .ack(ack);
    write(builder, &[])
}

/// Checks both checksums of an emitted reset by recomputing them with etherparse.
fn assert_valid_checksums(frame: &[u8]) {
    let packet = SlicedPacket::from_ethernet(frame).expect("parsable reset");
    let Some(etherparse::NetSlice::Ipv4(ip)) = packet.net else {
        panic!("reset is not IPv4");
    };
    let ip_header = ip.header().to_header();
    assert_eq!(
        ip_header.header_checksum,
        ip_header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        panic!("reset is not TCP");
    };
    let tcp_header = tcp.to_header();
    assert_eq!(
        tcp_header.checksum,
        tcp_header
            .calc_checksum_ipv4(&ip_header, tcp.payload())
            .unwrap(),
        "TCP checksum"
    );
}

#[test]
fn syn_to_open_upstream_gets_the_exact_rst() {
    let f = Fixture::new();
    let (action, out) = f.run(&syn_to(OPEN_PORT));
    assert_eq!(action, XDP_TX);
    assert_eq!(out, expected_rst(SEQ + 1));
    assert_valid_checksums(&out);
    assert_eq!(f.stat(Stat::XdpRejects), 1);
    assert_eq!(f.stat(Stat::XdpSynsChecked), 1);
}

#[test]
fn syn_with_options_and_payload_is_answered_with_a_bare_rst() {
    let f = Fixture::new();
    let payload = b"fast-open data";
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(CLIENT, UPSTREAM, 64)
        .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240)
        .syn()
        .options(&[
            etherparse::TcpOptionElement::MaximumSegmentSize(1460),
            etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
            etherparse::TcpOptionElement::WindowScale(7),
            etherparse::TcpOptionElement::Noop,
        ])
        .unwrap();
    let frame = write(builder, payload);
    let (action, out) = f.run(&frame);
    assert_eq!(action, XDP_TX);
    // The payload counts in the acknowledgement, as in the kernel's own resets.
    assert_eq!(out, expected_rst(SEQ + 1 + payload.len() as u32));
    assert_valid_checksums(&out);
}

#[test]
fn syn_with_ip_options_gets_a_rst_without_them() {
    let f = Fixture::new();
    let mut ip = Ipv4Header::new(0, 64, ip_number::TCP, CLIENT, UPSTREAM).unwrap();
    // Record-route style option padding: 8 bytes of NOPs + EOL.
    ip.options = Ipv4Options::try_from(&[1u8, 1, 1, 1, 1, 1, 1, 0][..]).unwrap();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240)
        .syn();
    let (action, out) = f.run(&write(builder, &[]));
    assert_eq!(action, XDP_TX);
    assert_eq!(out, expected_rst(SEQ + 1));
    assert_valid_checksums(&out);
}

#[test]
fn vlan_tagged_syn_gets_a_rst_on_the_same_vlan() {
    let f = Fixture::new();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .single_vlan(VlanId::try_new(42).unwrap())
        .ipv4(CLIENT, UPSTREAM, 64)
        .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240)
        .syn();
    let (action, out) = f.run(&write(builder, &[]));
    assert_eq!(action, XDP_TX);
    let mut ip = Ipv4Header::new(20, 64, ip_number::TCP, UPSTREAM, CLIENT).unwrap();
    ip.dont_fragment = true;
    let expected = PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_MAC)
        .single_vlan(VlanId::try_new(42).unwrap())
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(OPEN_PORT, CLIENT_PORT, 0, 0)
        .rst()
        .ack(SEQ + 1);
    assert_eq!(out, write(expected, &[]));
    assert_valid_checksums(&out);
}

#[test]
fn syn_to_closed_or_unknown_upstream_passes_untouched() {
    let f = Fixture::new();
    for port in [CLOSED_PORT, EXPIRED_PORT] {
        let frame = syn_to(port);
        let (action, out) = f.run(&frame);
        assert_eq!(action, XDP_PASS, "port {port}");
        assert_eq!(out, frame, "port {port}");
    }
    // The expired lease was seen and ignored: fail open.
    assert_eq!(f.stat(Stat::LeaseExpired), 1);
    assert_eq!(f.stat(Stat::XdpRejects), 0);
}

#[test]
fn established_traffic_and_other_protocols_pass_untouched() {
    let f = Fixture::new();
    let tcp = |flags: fn(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>| {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv4(CLIENT, UPSTREAM, 64)
            .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240);
        write(flags(b), b"data")
    };
    let udp = {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv4(CLIENT, UPSTREAM, 64)
            .udp(CLIENT_PORT, OPEN_PORT);
        let mut frame = Vec::new();
        b.write(&mut frame, b"dns?").unwrap();
        frame
    };
    let frames = [
        ("ACK", tcp(|b| b.ack(1))),
        ("PSH|ACK", tcp(|b| b.psh().ack(1))),
        ("SYN|ACK", tcp(|b| b.syn().ack(1))),
        ("RST", tcp(|b| b.rst())),
        ("FIN|ACK", tcp(|b| b.fin().ack(1))),
        ("UDP", udp),
    ];
    for (name, frame) in frames {
        let (action, out) = f.run(&frame);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}");
    }
    assert_eq!(f.stat(Stat::XdpRejects), 0);
}

#[test]
fn truncated_fragmented_and_garbage_frames_pass() {
    let f = Fixture::new();
    let syn = syn_to(OPEN_PORT);
    let mut fragment = syn.clone();
    fragment[14 + 6] = 0x20; // more-fragments
    let mut bad_version = syn.clone();
    bad_version[14] = 0x65;
    let mut short_ihl = syn.clone();
    short_ihl[14] = 0x44;
    let frames: [(&str, Vec<u8>); 7] = [
        ("ethernet only", syn[..14].to_vec()),
        ("half an IPv4 header", syn[..24].to_vec()),
        ("IPv4 without TCP", syn[..34].to_vec()),
        ("half a TCP header", syn[..44].to_vec()),
        ("fragment", fragment),
        ("IP version 6 in an IPv4 ethertype", bad_version),
        ("IHL below 5", short_ihl),
    ];
    for (name, frame) in frames {
        let (action, out) = f.run(&frame);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}");
    }
    let garbage: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    assert_eq!(f.run(&garbage).0, XDP_PASS);
    assert_eq!(f.stat(Stat::XdpRejects), 0);
    assert!(f.stat(Stat::XdpParseFailures) >= 5);
}

#[test]
fn half_open_admits_its_probe_budget_then_rejects() {
    let f = Fixture::new();
    let frame = syn_to(HALF_OPEN_PORT);
    let (first, out) = f.run(&frame);
    assert_eq!(first, XDP_PASS, "the one probe is admitted");
    assert_eq!(out, frame);
    for _ in 0..3 {
        assert_eq!(f.run(&frame).0, XDP_TX, "the budget is spent");
    }
    assert_eq!(f.stat(Stat::XdpProbesAdmitted), 1);
    let stored = f
        .xdp
        .verdicts
        .get(upstream(HALF_OPEN_PORT))
        .unwrap()
        .unwrap();
    assert_eq!(stored.probes_admitted, 4, "every SYN is counted");
}
