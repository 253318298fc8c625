//! Types shared by circuit's kernel programs (circuit-ebpf) and its agent.
//!
//! Everything here crosses the user/kernel boundary as raw bytes (map keys and values,
//! ring-buffer records, load-time globals), so every type is `#[repr(C)]` with explicit
//! padding fields: the bytemuck derives refuse implicit padding at compile time, which
//! rules out hash keys whose padding bytes differ between writer and reader.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Names of the maps, as the kernel sees them (at most 15 bytes: longer names are truncated).
pub mod map_names {
    /// Breaker verdicts written by the agent, read by every enforcement point.
    pub const VERDICTS: &str = "VERDICTS";
    /// Connection outcomes, kernel → agent.
    pub const OUTCOMES: &str = "OUTCOMES";
    /// Per-CPU counters, indexed by [`crate::Stat`].
    pub const STATS: &str = "STATS";
    /// Client sockets currently in SYN_SENT (kernel-internal bookkeeping).
    pub const SYN_SENT: &str = "SYN_SENT";
    /// Connections that an enforcement point rejected (kernel-internal bookkeeping).
    pub const REJECTED: &str = "REJECTED";
}

/// Names of the kernel programs in the object.
pub mod program_names {
    pub const XDP_ENFORCE: &str = "xdp_enforce";
    pub const TP_SET_STATE: &str = "tp_inet_sock_set_state";
    pub const TP_RECEIVE_RESET: &str = "tp_tcp_receive_reset";
}

/// Name of the load-time global that carries the tracepoint field offsets.
pub const TRACEPOINT_LAYOUT_GLOBAL: &str = "TRACEPOINT_LAYOUT";

/// Capacity of the maps, fixed in the object and relied on by the agent.
pub const VERDICTS_CAPACITY: u32 = 65_536;
pub const SYN_SENT_CAPACITY: u32 = 65_536;
pub const REJECTED_CAPACITY: u32 = 16_384;
pub const OUTCOMES_BYTES: u32 = 1 << 18;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const CLOSE: i32 = 7;
}

/// An upstream: destination address and port of a client connection.
///
/// IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`) so IPv4 and IPv6 share one key type
/// and one code path. The port is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct UpstreamKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

impl UpstreamKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 2],
        }
    }

    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        Self::new(v4_mapped(addr), port)
    }

    /// The IPv4 address when this key is v4-mapped.
    pub fn v4_addr(&self) -> Option<[u8; 4]> {
        let (prefix, tail) = self.addr.split_at(12);
        (prefix == V4_MAPPED_PREFIX).then(|| [tail[0], tail[1], tail[2], tail[3]])
    }
}

const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// `::ffff:a.b.c.d`, the IPv6 form of an IPv4 address.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// One TCP connection, client side first (addresses v4-mapped, ports in host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub upstream_addr: [u8; 16],
    pub client_port: u16,
    pub upstream_port: u16,
}

/// What the kernel enforces for an upstream. Absent from the map means closed (admit all).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictState {
    /// Reject every new connection.
    Open = 1,
    /// Admit up to `probe_budget` new connections in total, reject the rest.
    HalfOpen = 2,
}

impl VerdictState {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Open),
            2 => Some(Self::HalfOpen),
            _ => None,
        }
    }
}

/// A breaker verdict as stored in the VERDICTS map.
///
/// `lease_expires_ns` is on the kernel's monotonic clock (`bpf_ktime_get_ns`, i.e.
/// CLOCK_MONOTONIC): past it the kernel treats the verdict as closed, so an agent that stops
/// renewing its verdicts can never blackhole traffic. `probes_admitted` is incremented
/// atomically by the kernel; everything else is written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Verdict {
    pub state: u8,
    pub _pad: [u8; 3],
    pub probe_budget: u32,
    /// 64-bit because the BPF target only has 64-bit atomic read-modify-write.
    pub probes_admitted: u64,
    pub lease_expires_ns: u64,
}

impl Verdict {
    pub const fn new(state: VerdictState, probe_budget: u32, lease_expires_ns: u64) -> Self {
        Self {
            state: state as u8,
            _pad: [0; 3],
            probe_budget,
            probes_admitted: 0,
            lease_expires_ns,
        }
    }

    pub const fn state(&self) -> Option<VerdictState> {
        VerdictState::from_u8(self.state)
    }
}

/// How a client connection attempt ended, as classified in the kernel.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectOutcome {
    /// SYN_SENT → ESTABLISHED.
    Connected = 1,
    /// A RST answered our SYN.
    Refused = 2,
    /// SYN_SENT → CLOSE without a RST: the SYNs went unanswered until the kernel or the
    /// application gave up.
    TimedOut = 3,
    /// A circuit enforcement point rejected the attempt (not a signal about the upstream).
    Rejected = 4,
}

impl ConnectOutcome {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Connected),
            2 => Some(Self::Refused),
            3 => Some(Self::TimedOut),
            4 => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// One record on the OUTCOMES ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct OutcomeEvent {
    /// `bpf_ktime_get_ns` when the outcome was observed.
    pub timestamp_ns: u64,
    /// Time from connect() (CLOSE → SYN_SENT) to the outcome; 0 when the start was not seen.
    pub latency_ns: u64,
    pub upstream: UpstreamKey,
    pub outcome: u8,
    pub _pad: [u8; 3],
}

/// Per-socket bookkeeping while a client socket is in SYN_SENT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SynSent {
    pub start_ns: u64,
    /// A RST arrived for this socket (bit 0), and it came from a circuit reject (bit 1).
    pub flags: u32,
    pub _pad: u32,
}

impl SynSent {
    pub const RESET: u32 = 1;
    pub const REJECTED: u32 = 2;
}

/// Counters in the per-CPU STATS array; the discriminant is the array index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    XdpFrames = 0,
    XdpSynsChecked = 1,
    XdpRejects = 2,
    XdpProbesAdmitted = 3,
    XdpParseFailures = 4,
    OutcomeDrops = 5,
    LeaseExpired = 6,
}

impl Stat {
    pub const ALL: [Stat; 7] = [
        Stat::XdpFrames,
        Stat::XdpSynsChecked,
        Stat::XdpRejects,
        Stat::XdpProbesAdmitted,
        Stat::XdpParseFailures,
        Stat::OutcomeDrops,
        Stat::LeaseExpired,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Stat::XdpFrames => "xdp_frames",
            Stat::XdpSynsChecked => "xdp_syns_checked",
            Stat::XdpRejects => "xdp_rejects",
            Stat::XdpProbesAdmitted => "xdp_probes_admitted",
            Stat::XdpParseFailures => "xdp_parse_failures",
            Stat::OutcomeDrops => "outcome_drops",
            Stat::LeaseExpired => "lease_expired",
        }
    }
}

/// Byte offsets of the tracepoint fields the programs read. They differ between kernel
/// versions, so the agent reads them from tracefs `format` files at start-up and passes them
/// in as a load-time global; nothing is hard-coded for one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TracepointLayout {
    pub set_state: SockFieldOffsets,
    pub receive_reset: SockFieldOffsets,
}

/// Offsets of the socket fields shared by `sock:inet_sock_set_state` and
/// `tcp:tcp_receive_reset`; `oldstate`, `newstate` and `protocol` are only used (and only
/// required) for `inet_sock_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockFieldOffsets {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] bytemuck::Pod types (no padding, any bit pattern).
    unsafe impl aya::Pod for UpstreamKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for OutcomeEvent {}
    unsafe impl aya::Pod for SynSent {}
    unsafe impl aya::Pod for TracepointLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_sizes_the_kernel_sees() {
        assert_eq!(core::mem::size_of::<UpstreamKey>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 36);
        assert_eq!(core::mem::size_of::<Verdict>(), 24);
        assert_eq!(core::mem::size_of::<OutcomeEvent>(), 40);
        assert_eq!(core::mem::size_of::<SynSent>(), 16);
        assert_eq!(core::mem::size_of::<TracepointLayout>(), 48);
    }

    #[test]
    fn upstream_key_round_trips_through_bytes() {
        let key = UpstreamKey::v4([10, 1, 2, 3], 8080);
        let bytes = bytemuck::bytes_of(&key);
        assert_eq!(&bytes[..16], &v4_mapped([10, 1, 2, 3]));
        assert_eq!(&bytes[16..18], &8080u16.to_ne_bytes());
        assert_eq!(bytes[18..], [0, 0]);
        let back: UpstreamKey = bytemuck::pod_read_unaligned(bytes);
        assert_eq!(back, key);
        assert_eq!(back.v4_addr(), Some([10, 1, 2, 3]));
        let v6 = UpstreamKey::new(
            [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            443,
        );
        assert_eq!(v6.v4_addr(), None);
    }

    #[test]
    fn verdict_and_event_round_trip_through_bytes() {
        let verdict = Verdict::new(VerdictState::HalfOpen, 3, 123_456_789);
        let back: Verdict = bytemuck::pod_read_unaligned(bytemuck::bytes_of(&verdict));
        assert_eq!(back, verdict);
        assert_eq!(back.state(), Some(VerdictState::HalfOpen));
        assert_eq!(VerdictState::from_u8(0), None);

        let event = OutcomeEvent {
            timestamp_ns: 42,
            latency_ns: 7,
            upstream: UpstreamKey::v4([192, 0, 2, 1], 5432),
            outcome: ConnectOutcome::Refused as u8,
            _pad: [0; 3],
        };
        let back: OutcomeEvent = bytemuck::pod_read_unaligned(bytemuck::bytes_of(&event));
        assert_eq!(back, event);
        assert_eq!(
            ConnectOutcome::from_u8(back.outcome),
            Some(ConnectOutcome::Refused)
        );
        for outcome in [
            ConnectOutcome::Connected,
            ConnectOutcome::Refused,
            ConnectOutcome::TimedOut,
            ConnectOutcome::Rejected,
        ] {
            assert_eq!(ConnectOutcome::from_u8(outcome as u8), Some(outcome));
        }
        assert_eq!(ConnectOutcome::from_u8(0), None);
    }

    #[test]
    fn stat_indices_are_dense() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as u32, i as u32);
        }
    }
}
