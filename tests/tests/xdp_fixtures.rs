//! The enforcement programs in the real kernel through BPF_PROG_TEST_RUN, katran-style: an
//! input frame, the verdicts in the map, the expected action and the expected output frame.
//! Expected frames and checksums come from etherparse, independently of the programs' code.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use circuit_agent::{
    kernel::{ProgramsUnderTest, Stats, VerdictSpec, VerdictTable},
    time::{Clock, MonotonicClock},
};
use circuit_common::{Stat, program_names};
use circuit_tests::{
    RemoveOnDrop,
    frames::{
        CLIENT, CLIENT_MAC, CLIENT_PORT, CLIENT6, CLOSED_PORT, EXPIRED_PORT, GATEWAY_MAC,
        HALF_OPEN_PORT, ISOLATED_HOST, L2, OPEN_PORT, SEQ, UPSTREAM, UPSTREAM6, eth_ip, finish,
        syn, syn_v4, syn_v4_from, v4, v6, with_tcp_flags,
    },
    require_root, unique_name,
};
use etherparse::{
    IpHeaders, Ipv4Dscp, Ipv4Ecn, Ipv4Header, NetSlice, PacketBuilder, PacketBuilderStep,
    SlicedPacket, TcpHeader, TransportSlice, ip_number,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

struct Fixture {
    programs: ProgramsUnderTest,
    pins: RemoveOnDrop,
}

impl Fixture {
    fn new() -> Self {
        require_root().unwrap();
        let pins = RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique_name("cbxdp")));
        let mut programs = ProgramsUnderTest::load(&pins.0).unwrap();
        let now = MonotonicClock.now();
        // Longer than any run of the suite, emulated ones included (the randomized test
        // alone took over 5 min under TCG).
        let lease = now.saturating_add(Duration::from_secs(3600));
        let v = &mut programs.verdicts;
        v.reject(SocketAddr::from((UPSTREAM, OPEN_PORT)), lease)
            .unwrap();
        v.reject(SocketAddr::from((UPSTREAM6, OPEN_PORT)), lease)
            .unwrap();
        v.reject(SocketAddr::from((ISOLATED_HOST, 0)), lease)
            .unwrap();
        v.probe(SocketAddr::from((UPSTREAM, HALF_OPEN_PORT)), 1, lease)
            .unwrap();
        // A lease already in the past: a dead agent's verdict.
        v.reject(SocketAddr::from((UPSTREAM, EXPIRED_PORT)), now)
            .unwrap();
        Self { programs, pins }
    }

    fn xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.programs.xdp(program_names::XDP_ENFORCE), frame)
    }

    fn tc(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.programs.tc(), frame)
    }

    fn stat(&self, stat: Stat) -> u64 {
        Stats::open_pinned(&self.pins.0).unwrap().get(stat).unwrap()
    }
}

/// Removes every verdict [`Fixture::new`] writes, in one batch as an agent taking over a
/// map does (the filter words and the fast-path switch are written once, at the end).
fn clear_verdicts(verdicts: &mut VerdictTable) {
    verdicts
        .clear_many(&[
            SocketAddr::from((UPSTREAM, OPEN_PORT)),
            SocketAddr::from((UPSTREAM, HALF_OPEN_PORT)),
            SocketAddr::from((UPSTREAM, EXPIRED_PORT)),
            SocketAddr::from((UPSTREAM6, OPEN_PORT)),
            SocketAddr::from((ISOLATED_HOST, 0)),
        ])
        .unwrap();
}

/// Runs one frame through `program` (BPF_PROG_TEST_RUN); returns its action and output.
fn run<P>(program: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'b> TestRun<Opts<'b> = TestRunOptions<'b>, Result = TestRunResult>,
{
    let mut out = vec![0u8; 2048];
    let result = program
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

/// The reset expected for a SYN from the client: addresses and ports swapped, SEQ 0,
/// ACK = SEG.SEQ + SEG.LEN, RST|ACK, window 0, TTL/hop limit 64, no IP options.
fn expected_rst(l2: L2, v6_addrs: Option<([u8; 16], [u8; 16])>, ack: u32) -> Vec<u8> {
    let ip = match v6_addrs {
        Some((upstream, client)) => v6(upstream, client),
        None => {
            let mut ip = Ipv4Header::new(20, 64, ip_number::TCP, UPSTREAM, CLIENT).unwrap();
            ip.dont_fragment = true;
            IpHeaders::Ipv4(ip, Default::default())
        }
    };
    let b = eth_ip(l2, GATEWAY_MAC, CLIENT_MAC, ip)
        .tcp(OPEN_PORT, CLIENT_PORT, 0, 0)
        .rst()
        .ack(ack);
    finish(b, &[])
}

/// Checks both checksums of an emitted reset by recomputing them; returns its source (the
/// upstream that was rejected).
fn check_rst(frame: &[u8]) -> SocketAddr {
    let packet = SlicedPacket::from_ethernet(frame).expect("parsable reset");
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        panic!("reset is not TCP: {frame:02x?}");
    };
    let header = tcp.to_header();
    assert!(
        header.rst && header.ack && !header.syn,
        "flags of {header:?}"
    );
    let (src, csum) = match packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let ip = ip.header().to_header();
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "IPv4 checksum"
            );
            (
                IpAddr::from(ip.source),
                header.calc_checksum_ipv4(&ip, tcp.payload()).unwrap(),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let ip = ip.header().to_header();
            (
                IpAddr::from(ip.source),
                header.calc_checksum_ipv6(&ip, tcp.payload()).unwrap(),
            )
        }
        None => panic!("reset has no IP header"),
    };
    assert_eq!(header.checksum, csum, "TCP checksum");
    SocketAddr::new(src, header.source_port)
}

#[test]
fn syns_to_open_upstreams_get_the_exact_rst() {
    let f = Fixture::new();
    let payload = b"fast-open data";
    let with_options = {
        let b = eth_ip(
            L2::Plain,
            CLIENT_MAC,
            GATEWAY_MAC,
            v4(CLIENT, UPSTREAM, &[]),
        )
        .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240)
        .syn()
        .options(&[
            etherparse::TcpOptionElement::MaximumSegmentSize(1460),
            etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
            etherparse::TcpOptionElement::WindowScale(7),
            etherparse::TcpOptionElement::Noop,
        ])
        .unwrap();
        finish(b, payload)
    };
    let v6_rst = Some((UPSTREAM6, CLIENT6));
    let fixtures: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "IPv4",
            syn_v4(OPEN_PORT),
            expected_rst(L2::Plain, None, SEQ + 1),
        ),
        (
            // The payload counts in the acknowledgement, as in the kernel's own resets.
            "IPv4, TCP options and payload",
            with_options,
            expected_rst(L2::Plain, None, SEQ + 1 + payload.len() as u32),
        ),
        (
            "IPv4 with IP options",
            syn(
                L2::Plain,
                v4(CLIENT, UPSTREAM, &[1, 1, 1, 1, 1, 1, 1, 0]),
                OPEN_PORT,
                &[],
            ),
            expected_rst(L2::Plain, None, SEQ + 1),
        ),
        (
            "802.1Q",
            syn(L2::Vlan, v4(CLIENT, UPSTREAM, &[]), OPEN_PORT, &[]),
            expected_rst(L2::Vlan, None, SEQ + 1),
        ),
        (
            "QinQ",
            syn(L2::QinQ, v4(CLIENT, UPSTREAM, &[]), OPEN_PORT, &[]),
            expected_rst(L2::QinQ, None, SEQ + 1),
        ),
        (
            "IPv6",
            syn(L2::Plain, v6(CLIENT6, UPSTREAM6), OPEN_PORT, &[]),
            expected_rst(L2::Plain, v6_rst, SEQ + 1),
        ),
        (
            "IPv6 in QinQ with payload",
            syn(L2::QinQ, v6(CLIENT6, UPSTREAM6), OPEN_PORT, b"xy"),
            expected_rst(L2::QinQ, v6_rst, SEQ + 3),
        ),
        (
            "IPv6 with hop-by-hop, destination options and an atomic fragment header",
            v6_with_extensions(&[(0, 8), (60, 16), (44, 8)], 0),
            expected_rst(L2::Plain, v6_rst, SEQ + 1),
        ),
    ];
    for (name, frame, expected) in fixtures {
        let (action, out) = f.xdp(&frame);
        assert_eq!(action, XDP_TX, "{name}");
        assert_eq!(out, expected, "{name}");
        check_rst(&out);
    }
    assert_eq!(f.stat(Stat::XdpRejectOpen), 8);
}

/// An IPv6 SYN to UPSTREAM6:OPEN_PORT behind extension headers `(type, length in bytes)`;
/// `fragment` is the fragment header's offset/flags field.
fn v6_with_extensions(extensions: &[(u8, usize)], fragment: u16) -> Vec<u8> {
    let tcp = {
        let mut b = Vec::new();
        PacketBuilder::ipv6(CLIENT6, UPSTREAM6, 64)
            .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240)
            .syn()
            .write(&mut b, &[])
            .unwrap();
        b[40..].to_vec() // TCP header with a checksum over the pseudo-header
    };
    let mut chain = Vec::new();
    for (i, (kind, len)) in extensions.iter().enumerate() {
        let next = extensions.get(i + 1).map_or(6, |(k, _)| *k);
        let mut ext = vec![0u8; *len];
        ext[0] = next;
        match kind {
            44 => ext[2..4].copy_from_slice(&fragment.to_be_bytes()),
            _ => {
                ext[1] = (len / 8 - 1) as u8;
                // PadN option filling the rest, so the header is well formed.
                ext[2] = 1;
                ext[3] = (len - 4) as u8;
            }
        }
        chain.extend(ext);
    }
    let mut frame = Vec::new();
    frame.extend(GATEWAY_MAC);
    frame.extend(CLIENT_MAC);
    frame.extend(0x86ddu16.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&((chain.len() + tcp.len()) as u16).to_be_bytes());
    ip[6] = extensions.first().map_or(6, |(k, _)| *k);
    ip[7] = 64;
    ip[8..24].copy_from_slice(&CLIENT6);
    ip[24..40].copy_from_slice(&UPSTREAM6);
    frame.extend(ip);
    frame.extend(chain);
    frame.extend(tcp);
    frame
}

#[test]
fn a_whole_host_verdict_rejects_every_port() {
    let f = Fixture::new();
    for port in [22, 443, 8080] {
        let frame = syn(L2::Plain, v4(CLIENT, ISOLATED_HOST, &[]), port, &[]);
        let (action, out) = f.xdp(&frame);
        assert_eq!(action, XDP_TX, "port {port}");
        assert_eq!(check_rst(&out), SocketAddr::from((ISOLATED_HOST, port)));
    }
}

#[test]
fn a_whole_host_verdict_spares_the_ports_it_is_told_to() {
    let mut f = Fixture::new();
    let spared: std::collections::BTreeSet<SocketAddr> =
        [SocketAddr::from((ISOLATED_HOST, 53))].into();
    f.programs.verdicts.spare(&spared).unwrap();
    assert_eq!(f.programs.verdicts.spared().unwrap(), spared);
    let to = |port| syn(L2::Plain, v4(CLIENT, ISOLATED_HOST, &[]), port, &[]);
    assert_eq!(f.xdp(&to(53)), (XDP_PASS, to(53)));
    assert_eq!(f.tc(&to(53)).0, TC_ACT_OK);
    assert_eq!(f.xdp(&to(443)).0, XDP_TX);
    // An exact verdict for the port still counts: only the whole host's is spared.
    let lease = MonotonicClock.now().saturating_add(Duration::from_secs(60));
    f.programs
        .verdicts
        .reject(SocketAddr::from((ISOLATED_HOST, 53)), lease)
        .unwrap();
    assert_eq!(f.xdp(&to(53)).0, XDP_TX);
    f.programs
        .verdicts
        .clear(SocketAddr::from((ISOLATED_HOST, 53)))
        .unwrap();
    // While the host's verdict lives, its spared ports stay, wanted or not...
    f.programs.verdicts.spare(&Default::default()).unwrap();
    assert_eq!(f.programs.verdicts.spared().unwrap(), spared);
    assert_eq!(f.xdp(&to(53)).0, XDP_PASS);
    // ...and go once it is gone: a new verdict for the host covers the port again.
    let host = SocketAddr::from((ISOLATED_HOST, 0));
    f.programs.verdicts.clear(host).unwrap();
    f.programs.verdicts.spare(&Default::default()).unwrap();
    assert!(f.programs.verdicts.spared().unwrap().is_empty());
    f.programs.verdicts.reject(host, lease).unwrap();
    assert_eq!(f.xdp(&to(53)).0, XDP_TX);
    // The same pair written as a v4-mapped IPv6 address is the same key.
    let mapped: std::collections::BTreeSet<SocketAddr> = [SocketAddr::new(
        std::net::Ipv4Addr::from(ISOLATED_HOST)
            .to_ipv6_mapped()
            .into(),
        53,
    )]
    .into();
    f.programs.verdicts.spare(&mapped).unwrap();
    f.programs.verdicts.spare(&mapped).unwrap();
    assert_eq!(f.programs.verdicts.spared().unwrap(), spared);
    assert_eq!(f.xdp(&to(53)).0, XDP_PASS);
}

#[test]
fn syn_to_closed_or_expired_upstream_passes_untouched() {
    let f = Fixture::new();
    for port in [CLOSED_PORT, EXPIRED_PORT] {
        let frame = syn_v4(port);
        let (action, out) = f.xdp(&frame);
        assert_eq!(action, XDP_PASS, "port {port}");
        assert_eq!(out, frame, "port {port}");
    }
    // The expired lease was seen and ignored: fail open.
    assert_eq!(f.stat(Stat::LeaseExpired), 1);
    assert_eq!(f.stat(Stat::XdpRejectOpen), 0);
}

#[test]
fn established_traffic_other_protocols_and_fragments_pass_untouched() {
    let f = Fixture::new();
    let tcp = |flags: fn(PacketBuilderStep<TcpHeader>) -> PacketBuilderStep<TcpHeader>| {
        let b = eth_ip(
            L2::Plain,
            CLIENT_MAC,
            GATEWAY_MAC,
            v4(CLIENT, UPSTREAM, &[]),
        )
        .tcp(CLIENT_PORT, OPEN_PORT, SEQ, 64_240);
        finish(flags(b), b"data")
    };
    let udp = {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv4(CLIENT, UPSTREAM, 64)
            .udp(CLIENT_PORT, OPEN_PORT)
            .write(&mut frame, b"dns?")
            .unwrap();
        frame
    };
    let mut fragment = syn_v4(OPEN_PORT);
    fragment[14 + 6] = 0x20; // more-fragments
    let mut arp = vec![0xff; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let frames = [
        ("ACK", tcp(|b| b.ack(1))),
        ("PSH|ACK", tcp(|b| b.psh().ack(1))),
        ("SYN|ACK", tcp(|b| b.syn().ack(1))),
        ("RST", tcp(|b| b.rst())),
        ("FIN|ACK", tcp(|b| b.fin().ack(1))),
        ("UDP", udp),
        ("IPv4 fragment", fragment),
        ("IPv6 fragment", v6_with_extensions(&[(44, 8)], 0x0001)),
        ("ARP", arp),
    ];
    for (name, frame) in frames {
        let (action, out) = f.xdp(&frame);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}");
    }
    assert_eq!(f.stat(Stat::XdpRejectOpen), 0);
    // The two first fragments may be SYNs to an OPEN upstream: passed, but counted.
    assert_eq!(f.stat(Stat::XdpUnjudged), 2);
}

/// A SYN the parser cannot judge (a first fragment, or more IPv6 extension headers than it
/// walks) passes, fails open, and is counted; later fragments are no SYN at all.
#[test]
fn syns_that_cannot_be_judged_pass_and_are_counted() {
    let f = Fixture::new();
    let mut later_fragment = syn_v4(OPEN_PORT);
    later_fragment[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128
    let five = [(0, 8), (60, 8), (60, 8), (60, 8), (60, 8)];
    let mut udp_first_fragment = v6_with_extensions(&[(44, 8)], 0x0001);
    udp_first_fragment[14 + 40] = 17; // the fragment header's next header: UDP
    let cases = [
        ("IPv4 later fragment", later_fragment, false),
        ("IPv6 first fragment of UDP", udp_first_fragment, false),
        (
            "IPv6 later fragment",
            v6_with_extensions(&[(44, 8)], 0x0010),
            false,
        ),
        (
            "IPv6, 4 extension headers",
            v6_with_extensions(&five[..4], 0),
            false,
        ),
        (
            "IPv6, 5 extension headers",
            v6_with_extensions(&five, 0),
            true,
        ),
    ];
    let mut unjudged = 0;
    for (name, frame, counted) in cases {
        let judged_before = f.stat(Stat::XdpRejectOpen);
        let (action, out) = f.xdp(&frame);
        if name.contains("4 extension") {
            // Within the walk: judged, and rejected like any SYN to an OPEN upstream.
            assert_eq!(action, XDP_TX, "{name}");
            assert_eq!(f.stat(Stat::XdpRejectOpen), judged_before + 1, "{name}");
        } else {
            assert_eq!((action, out), (XDP_PASS, frame.clone()), "{name}");
        }
        unjudged += u64::from(counted);
        assert_eq!(f.stat(Stat::XdpUnjudged), unjudged, "{name}");
        // TC parses the same way and counts its own.
        let before = f.stat(Stat::TcUnjudged);
        f.tc(&frame);
        assert_eq!(
            f.stat(Stat::TcUnjudged),
            before + u64::from(counted),
            "{name} at TC"
        );
    }
}

#[test]
fn truncated_and_garbage_frames_pass() {
    let f = Fixture::new();
    let syn4 = syn(L2::Vlan, v4(CLIENT, UPSTREAM, &[]), OPEN_PORT, &[]);
    let syn6 = syn(L2::Plain, v6(CLIENT6, UPSTREAM6), OPEN_PORT, &[]);
    let mut bad_version = syn_v4(OPEN_PORT);
    bad_version[14] = 0x65;
    let mut short_ihl = syn_v4(OPEN_PORT);
    short_ihl[14] = 0x44;
    let mut frames: Vec<(String, Vec<u8>)> = vec![
        ("IP version 6 in an IPv4 ethertype".into(), bad_version),
        ("IHL below 5".into(), short_ihl),
    ];
    for cut in [14, 16, 20, 30, 40, 50, 57] {
        frames.push((format!("VLAN IPv4 SYN cut at {cut}"), syn4[..cut].to_vec()));
    }
    for cut in [14, 30, 53, 60, 70] {
        frames.push((format!("IPv6 SYN cut at {cut}"), syn6[..cut].to_vec()));
    }
    for (name, frame) in frames {
        let (action, out) = f.xdp(&frame);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}");
    }
    assert_eq!(f.stat(Stat::XdpRejectOpen), 0);
    assert!(f.stat(Stat::XdpParseFailures) >= 12);
}

#[test]
fn half_open_admits_its_probe_budget_then_rejects() {
    let f = Fixture::new();
    let frame = syn_v4(HALF_OPEN_PORT);
    let (first, out) = f.xdp(&frame);
    assert_eq!(first, XDP_PASS, "the one probe is admitted");
    assert_eq!(out, frame);
    // Other connections find the budget spent, at XDP and TC alike.
    for client_port in 1..=3 {
        let other = syn_v4_from(CLIENT_PORT + client_port, HALF_OPEN_PORT);
        assert_eq!(f.xdp(&other).0, XDP_TX, "the budget is spent");
    }
    let other = syn_v4_from(CLIENT_PORT + 9, HALF_OPEN_PORT);
    assert_eq!(f.tc(&other).0, TC_ACT_REDIRECT);
    assert_eq!(f.stat(Stat::ProbesAdmitted), 1);
    assert_eq!(f.stat(Stat::XdpRejectProbeBudget), 3);
    assert_eq!(f.stat(Stat::TcRejectProbeBudget), 1);
    let stored = f
        .programs
        .verdicts
        .get(SocketAddr::from((UPSTREAM, HALF_OPEN_PORT)))
        .unwrap()
        .unwrap();
    assert_eq!(stored.probes_admitted, 1);
    assert_eq!(stored.probe_budget, 1);
}

#[test]
fn an_admitted_connection_is_admitted_again_at_every_later_point() {
    let mut f = Fixture::new();
    let probe = syn_v4(HALF_OPEN_PORT);
    assert_eq!(f.xdp(&probe).0, XDP_PASS, "the probe takes the token");
    // Its SYN retransmitted, and crossing TC egress further along: admitted, no token.
    assert_eq!(f.xdp(&probe).0, XDP_PASS, "a retransmission");
    assert_eq!(f.tc(&probe).0, TC_ACT_OK, "a later point");
    assert_eq!(f.stat(Stat::ProbesAdmitted), 1);
    assert_eq!(f.stat(Stat::AdmittedFollowed), 2);
    let other = syn_v4_from(CLIENT_PORT + 1, HALF_OPEN_PORT);
    assert_eq!(f.xdp(&other).0, XDP_TX, "one token, one connection");

    // The breaker re-opens while the probe's SYN is on its way: the probe is not cut off.
    let upstream = SocketAddr::from((UPSTREAM, HALF_OPEN_PORT));
    let lease = MonotonicClock.now().saturating_add(Duration::from_secs(60));
    let v = &mut f.programs.verdicts;
    v.reject(upstream, lease).unwrap();
    assert_eq!(f.xdp(&probe).0, XDP_PASS);
    assert_eq!(f.xdp(&other).0, XDP_TX);
}

#[test]
fn a_new_probe_round_gives_back_tokens_and_a_new_period_starts_afresh() {
    let mut f = Fixture::new();
    let upstream = SocketAddr::from((UPSTREAM, HALF_OPEN_PORT));
    let lease = MonotonicClock.now().saturating_add(Duration::from_secs(60));
    let attempt = |f: &Fixture, n: u16| f.xdp(&syn_v4_from(CLIENT_PORT + n, HALF_OPEN_PORT)).0;
    assert_eq!(attempt(&f, 0), XDP_PASS);
    assert_eq!(attempt(&f, 1), XDP_TX);
    assert_eq!(attempt(&f, 2), XDP_TX);
    // A rewrite within the round (a lease renewal, say) gives nothing back.
    let v = &mut f.programs.verdicts;
    v.set(upstream, VerdictSpec::probe(1, 0), lease).unwrap();
    assert_eq!(attempt(&f, 3), XDP_TX);
    // Round 1: one more probe, whatever the rejected attempts counted.
    let v = &mut f.programs.verdicts;
    v.set(upstream, VerdictSpec::probe(1, 1), lease).unwrap();
    assert_eq!(attempt(&f, 4), XDP_PASS);
    assert_eq!(attempt(&f, 5), XDP_TX);
    // OPEN, then a new HALF_OPEN period: a fresh budget of one.
    let v = &mut f.programs.verdicts;
    v.reject(upstream, lease).unwrap();
    v.set(upstream, VerdictSpec::probe(1, 0), lease).unwrap();
    let stored = v.get(upstream).unwrap().unwrap();
    assert_eq!((stored.probe_budget, stored.probes_admitted), (1, 0));
    assert_eq!(attempt(&f, 6), XDP_PASS);
    assert_eq!(attempt(&f, 7), XDP_TX);
    assert_eq!(f.stat(Stat::ProbesAdmitted), 3);
}

#[test]
fn tc_egress_turns_a_rejected_syn_into_a_rst() {
    let f = Fixture::new();
    let (action, out) = f.tc(&syn_v4(OPEN_PORT));
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(out, expected_rst(L2::Plain, None, SEQ + 1));
    let frame = syn(L2::Plain, v6(CLIENT6, UPSTREAM6), OPEN_PORT, b"payload");
    let (action, out) = f.tc(&frame);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        expected_rst(L2::Plain, Some((UPSTREAM6, CLIENT6)), SEQ + 8)
    );
    for frame in [syn_v4(CLOSED_PORT), syn_v4(OPEN_PORT)[..40].to_vec()] {
        let (action, out) = f.tc(&frame);
        assert_eq!(action, TC_ACT_OK);
        assert_eq!(out, frame);
    }
    assert_eq!(f.stat(Stat::TcRejectOpen), 2);
}

#[test]
fn every_frame_is_counted_once_whichever_path_it_takes() {
    let mut f = Fixture::new();
    const ACK: u8 = 0x10;
    let ack = with_tcp_flags(syn_v4(OPEN_PORT), ACK);
    let vlan_ack = with_tcp_flags(
        syn(L2::Vlan, v4(CLIENT, UPSTREAM, &[]), OPEN_PORT, &[]),
        ACK,
    );
    let with_verdicts = [
        (ack.clone(), XDP_PASS),                      // the shortcut
        (syn_v4(OPEN_PORT), XDP_TX),                  // judged and rejected
        (syn_v4(CLOSED_PORT), XDP_PASS),              // judged and admitted
        (vlan_ack, XDP_PASS),                         // judged: the shortcut does not take tags
        (syn_v4(OPEN_PORT)[..30].to_vec(), XDP_PASS), // judged: malformed
    ];
    for (frame, action) in &with_verdicts {
        assert_eq!(f.xdp(frame).0, *action);
    }
    assert_eq!(f.stat(Stat::XdpFrames), with_verdicts.len() as u64);
    clear_verdicts(&mut f.programs.verdicts);
    for frame in [ack, syn_v4(OPEN_PORT)] {
        assert_eq!(f.xdp(&frame).0, XDP_PASS);
    }
    assert_eq!(
        f.stat(Stat::XdpFrames),
        with_verdicts.len() as u64 + 2,
        "the switch's fast path counts too"
    );
}

#[test]
fn with_no_verdict_at_all_no_frame_is_judged() {
    let mut f = Fixture::new();
    clear_verdicts(&mut f.programs.verdicts);
    let truncated = syn_v4(OPEN_PORT)[..30].to_vec();
    for frame in [syn_v4(OPEN_PORT), truncated] {
        assert_eq!(f.xdp(&frame), (XDP_PASS, frame));
    }
    assert_eq!(f.stat(Stat::XdpFrames), 2);
    assert_eq!(
        f.stat(Stat::XdpSynsChecked),
        0,
        "no lookup on the fast path"
    );
    assert_eq!(
        f.stat(Stat::XdpParseFailures),
        0,
        "no parsing on the fast path"
    );
    // A new verdict turns enforcement back on.
    let lease = MonotonicClock.now().saturating_add(Duration::from_secs(60));
    f.programs
        .verdicts
        .reject(SocketAddr::from((UPSTREAM, OPEN_PORT)), lease)
        .unwrap();
    assert_eq!(f.xdp(&syn_v4(OPEN_PORT)).0, XDP_TX);
}

#[test]
fn a_second_load_on_the_same_pins_keeps_the_running_programs_enforcing() {
    // What a restarting agent does before it adopts anything: load the object again with
    // the same pin directory. The fast-path switch is a global whose section the loader
    // initialises; the running programs must keep seeing it on.
    let f = Fixture::new();
    let mut next = ProgramsUnderTest::load(&f.pins.0).unwrap();
    assert_eq!(
        f.xdp(&syn_v4(OPEN_PORT)).0,
        XDP_TX,
        "old program still rejects"
    );
    let new_program = next.xdp(program_names::XDP_ENFORCE);
    assert_eq!(
        run(new_program, &syn_v4(OPEN_PORT)).0,
        XDP_TX,
        "new one too"
    );
    // One switch, shared: with the last verdict gone, both take the fast path.
    clear_verdicts(&mut next.verdicts);
    let checked = f.stat(Stat::XdpSynsChecked);
    assert_eq!(f.xdp(&syn_v4(OPEN_PORT)).0, XDP_PASS);
    assert_eq!(
        run(next.xdp(program_names::XDP_ENFORCE), &syn_v4(OPEN_PORT)).0,
        XDP_PASS
    );
    assert_eq!(
        f.stat(Stat::XdpSynsChecked),
        checked,
        "no lookup: switch off for both"
    );
}

#[test]
fn every_tcp_flag_combination_is_judged_alike_with_and_without_vlan_options_or_marks() {
    // Untagged IPv4 without options takes the parser's shortcut; a VLAN tag or an IP option
    // sends the same segment through the general walk. Each must reject exactly the bare
    // SYNs (SYN without ACK and RST) to an OPEN upstream, and pass everything else as is.
    // Marks (the type-of-service byte, which the shortcut reads with the header length and
    // masks off) must not change a verdict either.
    let marked = |mut ip: IpHeaders| {
        if let IpHeaders::Ipv4(header, _) = &mut ip {
            // Expedited forwarding, ECN-capable: marks real traffic carries.
            header.dscp = Ipv4Dscp::try_new(46).unwrap();
            header.ecn = Ipv4Ecn::ONE;
        }
        ip
    };
    let f = Fixture::new();
    for (l2, ip) in [
        (L2::Plain, v4(CLIENT, UPSTREAM, &[])),
        (L2::Plain, marked(v4(CLIENT, UPSTREAM, &[]))),
        (L2::Vlan, v4(CLIENT, UPSTREAM, &[])),
        (L2::Plain, v4(CLIENT, UPSTREAM, &[1, 1, 1, 0])),
    ] {
        let template = syn(l2, ip.clone(), OPEN_PORT, &[]);
        for flags in 0..=u8::MAX {
            let frame = with_tcp_flags(template.clone(), flags);
            let (action, out) = f.xdp(&frame);
            let bare_syn = flags & 0x16 == 0x02;
            let case = format!("{l2:?} {ip:?} flags {flags:#04x}");
            if bare_syn {
                assert_eq!(action, XDP_TX, "{case}");
                check_rst(&out);
            } else {
                assert_eq!((action, out), (XDP_PASS, frame), "{case}");
            }
        }
    }
}

/// xorshift64*: a small deterministic generator, so a failure names its seed and replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn randomized_frames_never_abort_and_only_open_upstreams_are_rejected() {
    const FRAMES: usize = 100_000;
    const SEED: u64 = 0x00c1_2c01_7b2e_a4e5;
    let f = Fixture::new();
    let rejectable: HashSet<SocketAddr> = [
        SocketAddr::from((UPSTREAM, OPEN_PORT)),
        SocketAddr::from((UPSTREAM6, OPEN_PORT)),
        SocketAddr::from((UPSTREAM, HALF_OPEN_PORT)),
    ]
    .into();
    let mut rng = Rng(SEED);
    let ports = [
        OPEN_PORT,
        HALF_OPEN_PORT,
        EXPIRED_PORT,
        CLOSED_PORT,
        22,
        443,
    ];
    let (mut tx, mut pass, mut dropped) = (0, 0, 0);
    for i in 0..FRAMES {
        let port = ports[rng.below(ports.len())];
        let l2 = [L2::Plain, L2::Vlan, L2::QinQ][rng.below(3)];
        let payload = vec![0xab; rng.below(64)];
        let mut frame = match rng.below(4) {
            0 => syn(l2, v6(CLIENT6, UPSTREAM6), port, &payload),
            1 => syn(l2, v4(CLIENT, UPSTREAM, &[1, 1, 1, 0]), port, &payload),
            _ => syn(l2, v4(CLIENT, UPSTREAM, &[]), port, &payload),
        };
        // Damage: flip bytes or cut the frame; a third stay intact.
        let damage = rng.below(3);
        match damage {
            0 => {
                for _ in 0..=rng.below(4) {
                    let at = rng.below(frame.len());
                    frame[at] ^= 1 << rng.below(8);
                }
            }
            1 => frame.truncate(14 + rng.below(frame.len() - 14)),
            _ => {}
        }
        let (action, out) = f.xdp(&frame);
        match action {
            XDP_TX => {
                tx += 1;
                let rejected = check_rst(&out);
                let seen =
                    rejectable.contains(&rejected) || rejected.ip() == IpAddr::from(ISOLATED_HOST);
                assert!(
                    seen,
                    "frame {i} (seed {SEED:#x}): rejected {rejected}, which has no verdict"
                );
            }
            XDP_PASS => {
                pass += 1;
                assert_eq!(
                    out, frame,
                    "frame {i} (seed {SEED:#x}) passed but was modified"
                );
                // An intact SYN to an OPEN upstream must not slip through.
                assert!(
                    damage != 2 || port != OPEN_PORT,
                    "frame {i} (seed {SEED:#x}): intact SYN to an OPEN upstream passed"
                );
            }
            // A rejected SYN whose source may not get a RST (damage can make it multicast
            // or loopback), or with this CPU's RST budget spent (100 000 frames in about a
            // second exceed it, unless the thread moves between CPUs): dropped, and counted
            // as exactly one of the two.
            XDP_DROP => {
                dropped += 1;
                let counted =
                    f.stat(Stat::XdpResetsSuppressed) + f.stat(Stat::XdpResetsRateLimited);
                assert_eq!(
                    counted, dropped,
                    "frame {i} (seed {SEED:#x}) dropped without being counted: {frame:02x?}"
                );
            }
            other => panic!("frame {i} (seed {SEED:#x}): action {other}: {frame:02x?}"),
        }
    }
    assert!(
        tx > 1_000 && pass > 10_000,
        "tx {tx}, pass {pass}, dropped {dropped}"
    );
}

#[test]
fn partial_verdicts_reject_their_share_and_dry_runs_reject_nothing() {
    let mut f = Fixture::new();
    let lease = MonotonicClock.now().saturating_add(Duration::from_secs(60));
    let (partial, dry_run) = (7000, 7001);
    let v = &mut f.programs.verdicts;
    // Half of the new connections, chosen per connection in the kernel.
    v.set(
        SocketAddr::from((UPSTREAM, partial)),
        VerdictSpec::partial(32_768),
        lease,
    )
    .unwrap();
    v.set(
        SocketAddr::from((UPSTREAM, dry_run)),
        VerdictSpec::reject().dry_run(),
        lease,
    )
    .unwrap();
    // Each from its own client port: one connection, one draw.
    let rejected = (0..2_000)
        .filter(|i| f.xdp(&syn_v4_from(CLIENT_PORT + i, partial)).0 == XDP_TX)
        .count() as u64;
    // Binomial(2000, 0.5): the bounds are nine standard deviations wide.
    assert!(
        (800..1_200).contains(&rejected),
        "{rejected} of 2000 rejected"
    );
    assert_eq!(f.stat(Stat::XdpRejectPartial), rejected);
    for _ in 0..10 {
        let frame = syn_v4(dry_run);
        assert_eq!(f.xdp(&frame), (XDP_PASS, frame));
    }
    assert_eq!(f.stat(Stat::DryRunRejects), 10);
    assert_eq!(f.stat(Stat::XdpRejectOpen), 0);
}

#[test]
fn no_reset_goes_to_a_source_no_host_owns() {
    let f = Fixture::new();
    let v6_multicast = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let sources = [
        syn(
            L2::Plain,
            v4([255, 255, 255, 255], UPSTREAM, &[]),
            OPEN_PORT,
            &[],
        ),
        syn(L2::Plain, v4([224, 0, 0, 1], UPSTREAM, &[]), OPEN_PORT, &[]),
        syn(L2::Plain, v4([127, 0, 0, 1], UPSTREAM, &[]), OPEN_PORT, &[]),
        syn(L2::Plain, v4([0, 0, 0, 0], UPSTREAM, &[]), OPEN_PORT, &[]),
        syn(L2::Vlan, v4([239, 1, 2, 3], UPSTREAM, &[]), OPEN_PORT, &[]),
        syn(L2::Plain, v6(v6_multicast, UPSTREAM6), OPEN_PORT, &[]),
    ];
    for frame in &sources {
        // Dropped, not reflected: the frame comes back as it was, and no RST is built.
        assert_eq!(f.xdp(frame), (XDP_DROP, frame.clone()));
    }
    assert_eq!(f.stat(Stat::XdpResetsSuppressed), sources.len() as u64);
    // Still rejections of an OPEN upstream, counted as such.
    assert_eq!(f.stat(Stat::XdpRejectOpen), sources.len() as u64);
    // A client that may get one still gets its RST, class E (pods on GKE) included.
    assert_eq!(f.xdp(&syn_v4(OPEN_PORT)).0, XDP_TX);
    let class_e = syn(
        L2::Plain,
        v4([240, 10, 0, 5], UPSTREAM, &[]),
        OPEN_PORT,
        &[],
    );
    assert_eq!(f.xdp(&class_e).0, XDP_TX);
    assert_eq!(f.stat(Stat::XdpResetsRateLimited), 0);
}

#[test]
fn resets_beyond_each_cpus_budget_are_dropped_and_counted() {
    use aya::maps::{PerCpuArray, PerCpuValues};
    use circuit_common::ResetBudget;
    let mut f = Fixture::new();
    // Every CPU's bucket with 3 tokens, refilled "now" far in the future, so that nothing
    // is earned during the test however slowly it runs (an emulated kernel).
    let cpus = aya::util::nr_cpus().unwrap();
    let nearly_empty = ResetBudget {
        tokens: 3,
        refilled_ns: u64::MAX / 2,
    };
    let mut budget: PerCpuArray<_, ResetBudget> =
        PerCpuArray::try_from(f.programs.ebpf.map_mut("RESET_BUDGET").unwrap()).unwrap();
    budget
        .set(
            0,
            PerCpuValues::try_from(vec![nearly_empty; cpus]).unwrap(),
            0,
        )
        .unwrap();
    // Pinned to one CPU, so one bucket counts (test_run runs on the calling CPU).
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
    let frame = syn_v4(OPEN_PORT);
    let actions: Vec<u32> = (0..10).map(|_| f.xdp(&frame).0).collect();
    assert_eq!(actions[..3], [XDP_TX; 3], "the budget's tokens: RSTs");
    assert_eq!(actions[3..], [XDP_DROP; 7], "then dropped");
    assert_eq!(f.stat(Stat::XdpResetsRateLimited), 7);
    // Still rejections, counted as such.
    assert_eq!(f.stat(Stat::XdpRejectOpen), 10);
}
