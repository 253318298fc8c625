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
    /// Connections an enforcement point answered with a RST, until their socket closes.
    pub const FLOW_MARKS: &str = "FLOW_MARKS";
    /// Failed connects whose cause the kernel reports after the socket closed.
    pub const PENDING_CLOSE: &str = "PENDING_CLOSE";
    /// Client sockets that reached ESTABLISHED, to recognise a reset after establishment.
    pub const ESTABLISHED: &str = "ESTABLISHED";
    /// Per-upstream outcome counters, kept in the kernel so a full ring buffer loses nothing.
    pub const UPSTREAM_COUNTS: &str = "UPSTREAM_COUNT";
    /// One-element array: the fast-path switch (how many verdicts exist). In the object it
    /// is the global [`crate::CONTROL_GLOBAL`] in its own data section
    /// ([`crate::CONTROL_SECTION`]), which the agent pins under this name.
    pub const CONTROL: &str = "CONTROL";
    /// cgroup ids exempt from rejection, with everything below them (priority clients).
    pub const EXEMPT_CGROUPS: &str = "EXEMPT_CGROUPS";
    /// (host, port) pairs a whole-host verdict leaves alone: the never-isolated ports of an
    /// isolated host (its DNS, say). Written by the agent before the host's verdict.
    pub const SPARED_PORTS: &str = "SPARED_PORTS";
    /// Operator overrides (trip / disable / reset), written by the CLI, applied by the agent.
    pub const OVERRIDES: &str = "OVERRIDES";
    /// A bitmap over upstream keys: a clear bit proves there is no verdict (see
    /// [`crate::VerdictFilter`]).
    pub const VERDICT_FILTER: &str = "VERDICT_FILTER";
    /// Probe tokens taken per upstream in its current HALF_OPEN period, counted by the
    /// kernel (the agent only zeroes and removes them).
    pub const PROBE_COUNTS: &str = "PROBE_COUNTS";
    /// Connections an enforcement point admitted while their upstream had a verdict, by
    /// [`crate::FlowKey`]: every later point, and SYN retransmissions, admit them as well.
    pub const ADMITTED_FLOWS: &str = "ADMITTED_FLOWS";
    /// Sockets the cgroup connect hook admitted, by socket cookie, until the sock_ops
    /// program learns their flow (the source port is chosen after connect4 runs).
    pub const ADMITTED_SOCKETS: &str = "ADMITTED_SOCKS";
    /// Client-scoped verdicts: one client (a cgroup, with everything below it) failed fast
    /// at one upstream, by the cgroup hook alone (see [`crate::ClientUpstreamKey`]).
    pub const CLIENT_VERDICTS: &str = "CLIENT_VERDICTS";
    /// Connects whose SYN went out, by flow, valued by when: a connect deferred by
    /// TCP_FASTOPEN_CONNECT and closed before its first write never sent one.
    pub const SYN_OUT: &str = "SYN_OUT";
    /// One u32: 1 while the sock_ops program that fills SYN_OUT is attached, so that a
    /// missing entry means "no SYN went out" rather than "nobody was watching".
    pub const SYN_TRACKING: &str = "SYN_TRACKING";
    /// Each client's budget of outcome events on the ring buffer (see [`crate::ClientBudget`]).
    pub const CLIENT_BUDGETS: &str = "CLIENT_BUDGETS";
    /// The endpoint a NAT (kube-proxy, Docker, plain DNAT) picked for a connection to a
    /// virtual address, by the connection's [`crate::FlowKey`] as its client sees it (the
    /// virtual address as upstream). Filled at conntrack confirmation, read by the outcome
    /// tracepoints, which then report the endpoint.
    pub const NAT_ENDPOINTS: &str = "NAT_ENDPOINTS";
    /// Where the cgroup connect hooks may re-route a connect to a virtual address, by that
    /// address (see [`crate::ServiceRoute`]). Written by the agent.
    pub const SERVICE_ROUTES: &str = "SERVICE_ROUTES";
    /// Sockets the cgroup connect hook re-routed, by socket cookie, valued by the virtual
    /// address the application asked for: getpeername() keeps returning it.
    pub const REROUTED: &str = "REROUTED";
}

/// Directory (under the pin directory) where attach links are pinned.
pub const LINKS_DIR: &str = "links";

/// Names of the kernel programs in the object.
pub mod program_names {
    pub const XDP_ENFORCE: &str = "xdp_enforce";
    /// An XDP program that only passes: the baseline for per-packet cost measurements.
    pub const XDP_BASELINE: &str = "xdp_baseline";
    pub const TC_ENFORCE: &str = "tc_enforce";
    pub const CGROUP_CONNECT4: &str = "cgroup_connect4";
    pub const CGROUP_CONNECT6: &str = "cgroup_connect6";
    pub const TP_SET_STATE: &str = "tp_inet_sock_set_state";
    pub const TP_RECEIVE_RESET: &str = "tp_tcp_receive_reset";
    pub const TP_ERROR_REPORT: &str = "tp_inet_sk_error_report";
    pub const TP_RETRANSMIT: &str = "tp_tcp_retransmit_skb";
    pub const TP_DESTROY_SOCK: &str = "tp_tcp_destroy_sock";
    /// sock_ops, as `tcp_connect()` sends a SYN: notes that the SYN went out (SYN_OUT), and
    /// turns a cgroup admission (by socket) into a flow admission, so XDP and TC honour it.
    pub const SOCKOPS_CONNECT: &str = "sockops_connect";
    /// Raw tracepoint on every packet handed to a device: a new connection's first packet
    /// carries its conntrack entry, with the NAT decided; records the endpoint it picked
    /// (NAT_ENDPOINTS).
    pub const RAW_TP_NET_DEV_QUEUE: &str = "raw_tp_net_dev_queue";
    /// The tracepoint it attaches to (4.17+ for raw tracepoints).
    pub const NET_DEV_QUEUE: &str = "net_dev_queue";
    /// getpeername() of a re-routed socket returns the virtual address it asked for.
    pub const CGROUP_GETPEERNAME4: &str = "cgroup_getpeername4";
    pub const CGROUP_GETPEERNAME6: &str = "cgroup_getpeername6";
}

/// Name of the load-time global that carries the tracepoint field offsets.
pub const TRACEPOINT_LAYOUT_GLOBAL: &str = "TRACEPOINT_LAYOUT";

/// Name of the load-time global that carries the conntrack offsets ([`ConntrackLayout`]).
pub const CONNTRACK_LAYOUT_GLOBAL: &str = "CONNTRACK_LAYOUT";

/// Where the conntrack probe finds a connection's tuples, read by the agent from the
/// kernel's BTF (struct layouts differ between kernels and configurations). All zero: the
/// probe records nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ConntrackLayout {
    /// `offsetof(struct sk_buff, _nfct)`: the conntrack entry, low 3 bits its ctinfo.
    pub skb_nfct: u32,
    /// `offsetof(struct nf_conn, tuplehash)`: the original-direction tuple hash, the reply
    /// one right after it.
    pub ct_tuplehash: u32,
    /// `sizeof(struct nf_conntrack_tuple_hash)`.
    pub tuplehash_size: u32,
    /// `offsetof(struct nf_conntrack_tuple_hash, tuple)`.
    pub tuple: u32,
}

impl ConntrackLayout {
    pub fn is_set(&self) -> bool {
        self.skb_nfct != 0 && self.ct_tuplehash != 0 && self.tuplehash_size != 0
    }
}

/// `struct nf_conntrack_tuple` as every kernel since 2.6 lays it out (40 bytes): the
/// source (address, port, l3 family), then the destination (address, port, protocol,
/// direction). Ports in network byte order; an IPv4 address in the first 4 bytes.
pub mod conntrack_tuple {
    pub const SIZE: usize = 40;
    pub const SRC_ADDR: usize = 0;
    pub const SRC_PORT: usize = 16;
    pub const L3_FAMILY: usize = 18;
    pub const DST_ADDR: usize = 20;
    pub const DST_PORT: usize = 36;
    pub const PROTOCOL: usize = 38;
}

/// Endpoints one [`ServiceRoute`] holds: the cgroup hook tries each at most once.
pub const MAX_SERVICE_ENDPOINTS: usize = 16;
pub const SERVICE_ROUTES_CAPACITY: u32 = 4_096;
pub const NAT_ENDPOINTS_CAPACITY: u32 = 65_536;
pub const REROUTED_CAPACITY: u32 = 65_536;

/// A virtual address some of whose endpoints are isolated: a connect to it is re-routed
/// to one of `endpoints` that its own verdict (and the client's) admits, picked at random
/// as the NAT would, or fails when none does. Absent: connects go to the NAT untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceRoute {
    /// Past this (`bpf_ktime_get_ns`), the route is ignored: a dead agent's routes lapse
    /// like its verdicts.
    pub lease_expires_ns: u64,
    pub endpoint_count: u32,
    /// [`ServiceRoute::FAIL_FAST`].
    pub flags: u32,
    pub endpoints: [UpstreamKey; MAX_SERVICE_ENDPOINTS],
}

impl ServiceRoute {
    /// Every endpoint is OPEN and the service is not re-routed: connects fail at once.
    pub const FAIL_FAST: u32 = 1;
}

/// Name of the load-time global (u32, 1 by default) that lets the cgroup connect hooks call
/// `bpf_set_retval` (Linux 5.18) to fail connect() with ECONNREFUSED. The agent sets it to 0
/// on older kernels, whose verifier refuses the helper: there a reject fails with EPERM.
pub const CGROUP_SET_RETVAL_GLOBAL: &str = "CGROUP_SET_RETVAL";

/// The [`Control`] switch is a global, not a map the programs look up: every packet reads
/// it, and a global is one load where a lookup is a dozen instructions. It sits alone in
/// this data section, which the loader turns into a one-element array map (pinned as
/// [`map_names::CONTROL`], shared by every agent's programs like the other maps).
pub const CONTROL_SECTION: &str = ".bss.control";
/// Name of the [`Control`] global in [`CONTROL_SECTION`].
pub const CONTROL_GLOBAL: &str = "CONTROL";

/// Capacity of the maps, fixed in the object and relied on by the agent.
pub const VERDICTS_CAPACITY: u32 = 65_536;
pub const SYN_SENT_CAPACITY: u32 = 65_536;
pub const FLOW_MARKS_CAPACITY: u32 = 16_384;
pub const ESTABLISHED_CAPACITY: u32 = 65_536;
pub const UPSTREAM_COUNTS_CAPACITY: u32 = 65_536;
/// About 13 100 outcome records (72 bytes and an 8-byte header each).
pub const OUTCOMES_BYTES: u32 = 1 << 20;
pub const ADMITTED_FLOWS_CAPACITY: u32 = 16_384;
pub const CLIENT_VERDICTS_CAPACITY: u32 = 16_384;
pub const SPARED_PORTS_CAPACITY: u32 = 4_096;
pub const CLIENT_BUDGETS_CAPACITY: u32 = 4_096;
/// How long an admission is honoured: longer than the kernel's default SYN retries take
/// to give up (about 127 s), so every retransmission of an admitted SYN is still admitted,
/// and short enough that a 4-tuple reused much later is judged afresh.
pub const ADMITTED_FLOW_TTL_NS: u64 = 180_000_000_000;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const ECONNREFUSED: i32 = 111;
pub const ETIMEDOUT: i32 = 110;

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const CLOSE: i32 = 7;
}

/// An upstream: destination address and port of a client connection.
///
/// IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`) so IPv4 and IPv6 share one key type
/// and one code path. The port is in host byte order. Aligned to 4 (20 bytes without padding
/// either way) so that the kernel programs build, copy and hash it by words, not bytes.
#[repr(C, align(4))]
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

/// A client (cgroup v2 id) at an upstream: the key of a client-scoped verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ClientUpstreamKey {
    pub client: u64,
    pub upstream: UpstreamKey,
    pub _pad: u32,
}

impl ClientUpstreamKey {
    pub const fn new(client: u64, upstream: UpstreamKey) -> Self {
        Self {
            client,
            upstream,
            _pad: 0,
        }
    }
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
    /// Reject a fraction (`reject_fraction` / 65536) of new connections, chosen per
    /// connection in the kernel: partial breaking of a degraded upstream.
    Partial = 3,
}

impl VerdictState {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Open),
            2 => Some(Self::HalfOpen),
            3 => Some(Self::Partial),
            _ => None,
        }
    }
}

/// A breaker verdict as stored in the VERDICTS map.
///
/// `lease_expires_ns` is on the kernel's monotonic clock (`bpf_ktime_get_ns`, i.e.
/// CLOCK_MONOTONIC): past it the kernel treats the verdict as closed, so an agent that stops
/// renewing its verdicts can never blackhole traffic. Written only by the agent (whole
/// values); the probe tokens the kernel takes are counted apart, in PROBE_COUNTS, so that no
/// agent write can lose a kernel increment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Verdict {
    pub state: u8,
    /// [`Verdict::DRY_RUN`]: count would-be rejects, reject nothing.
    pub flags: u8,
    /// For [`VerdictState::Partial`]: rejected share of new connections, in 1/65536.
    pub reject_fraction: u16,
    /// For [`VerdictState::HalfOpen`]: probe tokens granted in this HALF_OPEN period; the
    /// kernel admits a connection while PROBE_COUNTS for the upstream stays within it.
    pub probe_budget: u32,
    /// Unused (was the probe count before it moved to PROBE_COUNTS); keeps the value size,
    /// so verdicts pinned by an older agent are still read.
    pub _reserved: u64,
    pub lease_expires_ns: u64,
}

impl Verdict {
    pub const DRY_RUN: u8 = 1;

    pub const fn new(state: VerdictState, probe_budget: u32, lease_expires_ns: u64) -> Self {
        Self {
            state: state as u8,
            flags: 0,
            reject_fraction: 0,
            probe_budget,
            _reserved: 0,
            lease_expires_ns,
        }
    }

    pub const fn state(&self) -> Option<VerdictState> {
        VerdictState::from_u8(self.state)
    }

    pub const fn is_dry_run(&self) -> bool {
        self.flags & Self::DRY_RUN != 0
    }
}

/// What an operator asked for an upstream (`circuit-agent trip|disable|reset`). Kept in a
/// pinned map so it survives agent restarts; no kernel program reads it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverrideKind {
    /// Isolate until `until_ns` (0: until reset).
    ForcedOpen = 1,
    /// Never isolate.
    Disabled = 2,
    /// Forget the breaker's state; consumed (removed) by the agent.
    Reset = 3,
}

impl OverrideKind {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::ForcedOpen),
            2 => Some(Self::Disabled),
            3 => Some(Self::Reset),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Override {
    pub kind: u8,
    pub _pad: [u8; 7],
    /// CLOCK_MONOTONIC ns when a forced open ends; 0 for no end.
    pub until_ns: u64,
    /// CLOCK_MONOTONIC ns when the operator asked.
    pub set_at_ns: u64,
}

/// A one-hash bloom filter in front of VERDICTS. The hash map lookup of a 20-byte key is the
/// dominant cost of a SYN to an upstream without a verdict (the common case once anything
/// is open); an array lookup and a bit test rule it out first. The agent sets a key's bit
/// before writing its verdict and rebuilds the bitmap after removals, so a clear bit always
/// means "no verdict"; a set bit only means "look it up".
pub struct VerdictFilter;

impl VerdictFilter {
    /// 64-bit words in the bitmap (65 536 bits, 8 KiB).
    pub const WORDS: u32 = 1024;

    /// The word index and bit mask of `key`.
    #[inline(always)]
    pub fn slot(key: &UpstreamKey) -> (u32, u64) {
        let a = &key.addr;
        let word = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        let mut h =
            word(0) ^ word(4) ^ word(8) ^ word(12) ^ (key.port as u32).wrapping_mul(0x9e37_79b1);
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 15;
        ((h >> 6) & (Self::WORDS - 1), 1u64 << (h & 63))
    }
}

/// The fast path: while `active_verdicts` is 0 the enforcement points skip the verdict
/// lookup entirely, while `host_verdicts` is 0 they skip the whole-host lookup, and while
/// `exempt_cgroups` is 0 the priority-client check. The agent keeps them equal to the
/// counts in VERDICTS and EXEMPT_CGROUPS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Control {
    pub active_verdicts: u32,
    /// Verdicts for a whole host (port 0).
    pub host_verdicts: u32,
    /// Entries in EXEMPT_CGROUPS: with none, the cgroup walk is skipped.
    pub exempt_cgroups: u32,
    /// Entries in CLIENT_VERDICTS: with none, the cgroup hook looks up no client verdict.
    pub client_verdicts: u32,
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
    /// The SYN was retransmitted while connecting: an early sign of a black hole, long
    /// before the connect times out. One event per retransmission.
    SynRetransmit = 5,
    /// A RST arrived on a connection after it was established.
    Reset = 6,
    /// The connect failed on an ICMP error or an address-resolution failure (EHOSTUNREACH,
    /// ENETUNREACH and the like).
    Unreachable = 7,
    /// The application closed its socket while connecting, before any answer and without a
    /// kernel-reported error (Happy Eyeballs losers, cancelled or hedged requests, its own
    /// connect timeout). Evidence against the upstream only when it waited long enough; the
    /// agent decides that from the latency.
    Aborted = 8,
}

impl ConnectOutcome {
    pub const ALL: [ConnectOutcome; 8] = [
        ConnectOutcome::Connected,
        ConnectOutcome::Refused,
        ConnectOutcome::TimedOut,
        ConnectOutcome::Rejected,
        ConnectOutcome::SynRetransmit,
        ConnectOutcome::Reset,
        ConnectOutcome::Unreachable,
        ConnectOutcome::Aborted,
    ];

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Connected),
            2 => Some(Self::Refused),
            3 => Some(Self::TimedOut),
            4 => Some(Self::Rejected),
            5 => Some(Self::SynRetransmit),
            6 => Some(Self::Reset),
            7 => Some(Self::Unreachable),
            8 => Some(Self::Aborted),
            _ => None,
        }
    }
}

/// A token bucket of `BURST` tokens earning `RATE` per second, kept in a BPF map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket<const RATE: u64, const BURST: u64> {
    pub tokens: u64,
    /// When `tokens` was last topped up (bpf_ktime_get_ns).
    pub refilled_ns: u64,
}

// SAFETY: #[repr(C)], two u64s: no padding, any bit pattern is valid.
unsafe impl<const RATE: u64, const BURST: u64> Zeroable for TokenBucket<RATE, BURST> {}
// SAFETY: as above.
unsafe impl<const RATE: u64, const BURST: u64> Pod for TokenBucket<RATE, BURST> {}

/// A client's budget of outcome events on the shared ring buffer: one client (a cgroup: a
/// pod, a service) cannot fill the ring and starve the others of it, even while the agent
/// reads slowly. Beyond it, outcomes are only counted per upstream. 4 000 events a second
/// after a burst of 1 024: with the rate, a third of the ring in a second at most.
pub type ClientBudget = TokenBucket<4_000, 1_024>;

/// Each CPU's budget of XDP resets: a rejected SYN is answered with a RST to its source, and
/// a spoofed source would make that a reflection. Beyond the budget the SYN is dropped
/// (still rejected: its sender retransmits) and counted.
pub type ResetBudget = TokenBucket<10_000, 2_000>;

impl<const RATE: u64, const BURST: u64> TokenBucket<RATE, BURST> {
    pub const RATE: u64 = RATE;
    pub const BURST: u64 = BURST;
    /// Time to earn one token.
    pub const TOKEN_NS: u64 = 1_000_000_000 / RATE;

    /// A new bucket: a full burst.
    pub const fn full(now_ns: u64) -> Self {
        Self {
            tokens: BURST,
            refilled_ns: now_ns,
        }
    }

    /// Tops up for the time since the last refill, then takes a token if there is one. A
    /// zeroed bucket (a fresh map slot) fills at once.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        let elapsed = now_ns.saturating_sub(self.refilled_ns);
        // Capped, so that the product below cannot overflow after a long quiet time.
        let earned = elapsed.min(BURST * Self::TOKEN_NS) / Self::TOKEN_NS;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(BURST);
            self.refilled_ns = if self.tokens == BURST {
                now_ns
            } else {
                self.refilled_ns + earned * Self::TOKEN_NS
            };
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Whether a RST may be sent to `addr` (v4-mapped or IPv6): not to an address no single host
/// owns or no packet comes from (unspecified, "this network", loopback, multicast, the
/// limited broadcast). A subnet's directed broadcast cannot be told from here.
pub const fn may_receive_reset(addr: &[u8; 16]) -> bool {
    let mut v4_mapped = true;
    let mut i = 0;
    while i < 12 {
        if addr[i] != V4_MAPPED_PREFIX[i] {
            v4_mapped = false;
        }
        i += 1;
    }
    if v4_mapped {
        let first = addr[12];
        let broadcast = first == 255 && addr[13] == 255 && addr[14] == 255 && addr[15] == 255;
        // Class E (240/4) is routable where CNIs use it for pods (GKE): only its
        // 255.255.255.255 is left out.
        return first != 0 && first != 127 && !(first >= 224 && first < 240) && !broadcast;
    }
    if addr[0] == 0xff {
        return false;
    }
    // :: and ::1.
    let mut leading_zeros = true;
    let mut i = 0;
    while i < 15 {
        if addr[i] != 0 {
            leading_zeros = false;
        }
        i += 1;
    }
    !(leading_zeros && addr[15] <= 1)
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
    /// The client: the cgroup v2 id of the process that called connect() (in Kubernetes, a
    /// pod's container); 0 when the connect was not seen.
    pub client: u64,
    /// The virtual address the client connected to when a NAT sent the connection to
    /// `upstream` (an endpoint behind a Service); all zero otherwise.
    pub service: UpstreamKey,
    pub _pad2: u32,
}

/// Per-socket bookkeeping while a client socket is in SYN_SENT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SynSent {
    pub start_ns: u64,
    /// [`SynSent::RESET`]: a RST arrived while connecting.
    pub flags: u32,
    pub _pad: u32,
    /// The connecting process's cgroup id, taken in connect()'s own context.
    pub client: u64,
}

/// A failed connect waiting for its cause (see PENDING_CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PendingConnect {
    pub start_ns: u64,
    pub client: u64,
}

/// A client connection that reached ESTABLISHED, to recognise a reset after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct EstablishedConnection {
    pub upstream: UpstreamKey,
    pub _pad: u32,
    pub client: u64,
    /// As in [`OutcomeEvent::service`].
    pub service: UpstreamKey,
    pub _pad2: u32,
}

impl SynSent {
    pub const RESET: u32 = 1;
}

/// What is known about a connection from outside its socket, keyed by [`FlowKey`].
pub mod flow_mark {
    /// An enforcement point answered it with a RST.
    pub const REJECTED: u32 = 1;
}

/// Per-upstream outcome counters, at [`OutcomeCounters::slot`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct OutcomeCounters {
    pub counts: [u64; 8],
}

impl OutcomeCounters {
    /// The counter of `outcome`: its discriminant modulo 8. Slot 0 had no outcome until
    /// [`ConnectOutcome::Aborted`] (8) took it, which kept the value size of maps pinned by
    /// older agents.
    #[inline(always)]
    pub const fn slot(outcome: ConnectOutcome) -> usize {
        (outcome as usize) & 7
    }
}

/// Where a connection was rejected.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnforcementPoint {
    Xdp = 0,
    Tc = 1,
    Cgroup = 2,
}

/// Counters in the per-CPU STATS array; the discriminant is the array index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    XdpFrames = 0,
    XdpParseFailures = 1,
    TcPackets = 2,
    TcParseFailures = 3,
    CgroupConnects = 4,
    /// New connections (SYN or connect()) to an upstream when some verdict exists.
    XdpSynsChecked = 5,
    TcSynsChecked = 6,
    CgroupChecked = 7,
    XdpRejectOpen = 8,
    XdpRejectProbeBudget = 9,
    XdpRejectPartial = 10,
    TcRejectOpen = 11,
    TcRejectProbeBudget = 12,
    TcRejectPartial = 13,
    CgroupRejectOpen = 14,
    CgroupRejectProbeBudget = 15,
    CgroupRejectPartial = 16,
    ProbesAdmitted = 17,
    /// Rejects a dry-run (metrics-only) verdict would have made.
    DryRunRejects = 18,
    /// Clients exempt from rejection (priority cgroups) let through.
    ExemptAdmitted = 19,
    LeaseExpired = 20,
    OutcomeDrops = 21,
    /// New connections admitted because an earlier point (or an earlier copy of their SYN)
    /// admitted them: one connection, one decision.
    AdmittedFollowed = 22,
    /// connect()s refused by a client-scoped verdict (the client's own hold).
    CgroupRejectClient = 23,
    /// Outcomes kept off the ring buffer because their client spent its budget (counted per
    /// upstream in the kernel all the same).
    OutcomesThrottled = 24,
    /// Rejected SYNs at XDP dropped instead of answered: their source may not get a RST
    /// (multicast, broadcast, martian).
    XdpResetsSuppressed = 25,
    /// Rejected SYNs at XDP dropped instead of answered: the CPU's RST budget was spent.
    XdpResetsRateLimited = 26,
    /// TCP frames XDP passed without judging them: a first fragment of a SYN, or more
    /// IPv6 extension headers than the parser walks. A SYN among them is not rejected.
    XdpUnjudged = 27,
    /// The same at TC.
    TcUnjudged = 28,
    /// connect()s to a virtual address re-routed to an admitted endpoint.
    ServiceReroutes = 29,
    /// connect()s to a virtual address failed because no endpoint admitted them.
    ServiceRejects = 30,
    /// New connections whose NAT picked an endpoint, seen at conntrack confirmation.
    NatResolved = 31,
}

/// Why an enforcement point rejected a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    Open = 0,
    ProbeBudget = 1,
    Partial = 2,
}

impl Stat {
    pub const ALL: [Stat; 32] = [
        Stat::XdpFrames,
        Stat::XdpParseFailures,
        Stat::TcPackets,
        Stat::TcParseFailures,
        Stat::CgroupConnects,
        Stat::XdpSynsChecked,
        Stat::TcSynsChecked,
        Stat::CgroupChecked,
        Stat::XdpRejectOpen,
        Stat::XdpRejectProbeBudget,
        Stat::XdpRejectPartial,
        Stat::TcRejectOpen,
        Stat::TcRejectProbeBudget,
        Stat::TcRejectPartial,
        Stat::CgroupRejectOpen,
        Stat::CgroupRejectProbeBudget,
        Stat::CgroupRejectPartial,
        Stat::ProbesAdmitted,
        Stat::DryRunRejects,
        Stat::ExemptAdmitted,
        Stat::LeaseExpired,
        Stat::OutcomeDrops,
        Stat::AdmittedFollowed,
        Stat::CgroupRejectClient,
        Stat::OutcomesThrottled,
        Stat::XdpResetsSuppressed,
        Stat::XdpResetsRateLimited,
        Stat::XdpUnjudged,
        Stat::TcUnjudged,
        Stat::ServiceReroutes,
        Stat::ServiceRejects,
        Stat::NatResolved,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The reject counter of `point` for `reason`.
    pub const fn reject(point: EnforcementPoint, reason: RejectReason) -> Stat {
        Self::ALL[Stat::XdpRejectOpen as usize + point as usize * 3 + reason as usize]
    }

    /// The "new connection checked" counter of `point`.
    pub const fn checked(point: EnforcementPoint) -> Stat {
        Self::ALL[Stat::XdpSynsChecked as usize + point as usize]
    }

    pub const fn name(self) -> &'static str {
        match self {
            Stat::XdpFrames => "xdp_frames",
            Stat::XdpParseFailures => "xdp_parse_failures",
            Stat::TcPackets => "tc_packets",
            Stat::TcParseFailures => "tc_parse_failures",
            Stat::CgroupConnects => "cgroup_connects",
            Stat::XdpSynsChecked => "xdp_syns_checked",
            Stat::TcSynsChecked => "tc_syns_checked",
            Stat::CgroupChecked => "cgroup_connects_checked",
            Stat::XdpRejectOpen => "xdp_rejects_open",
            Stat::XdpRejectProbeBudget => "xdp_rejects_probe_budget",
            Stat::XdpRejectPartial => "xdp_rejects_partial",
            Stat::TcRejectOpen => "tc_rejects_open",
            Stat::TcRejectProbeBudget => "tc_rejects_probe_budget",
            Stat::TcRejectPartial => "tc_rejects_partial",
            Stat::CgroupRejectOpen => "cgroup_rejects_open",
            Stat::CgroupRejectProbeBudget => "cgroup_rejects_probe_budget",
            Stat::CgroupRejectPartial => "cgroup_rejects_partial",
            Stat::ProbesAdmitted => "probes_admitted",
            Stat::DryRunRejects => "dry_run_rejects",
            Stat::ExemptAdmitted => "exempt_admitted",
            Stat::LeaseExpired => "lease_expired",
            Stat::OutcomeDrops => "outcome_drops",
            Stat::AdmittedFollowed => "admitted_followed",
            Stat::CgroupRejectClient => "cgroup_rejects_client",
            Stat::OutcomesThrottled => "outcomes_throttled",
            Stat::XdpResetsSuppressed => "xdp_resets_suppressed",
            Stat::XdpResetsRateLimited => "xdp_resets_rate_limited",
            Stat::XdpUnjudged => "xdp_unjudged",
            Stat::TcUnjudged => "tc_unjudged",
            Stat::ServiceReroutes => "service_reroutes",
            Stat::ServiceRejects => "service_rejects",
            Stat::NatResolved => "nat_resolved",
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
    pub error_report: SockFieldOffsets,
    pub retransmit: SockFieldOffsets,
    pub destroy_sock: SockFieldOffsets,
}

/// Offsets of the socket fields of the four tracepoints. Each tracepoint has a subset; the
/// fields it lacks stay 0 and are not read by its program. A field some kernels lack (see
/// [`SockFieldOffsets::ABSENT`]) is read only when present.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockFieldOffsets {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub state: u16,
    pub error: u16,
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

impl SockFieldOffsets {
    /// The offset of a field this kernel's tracepoint does not have. `family` is one: the
    /// tcp:* tracepoints gained it in 5.11 (Linux 5.10 lacks it), and without it the
    /// programs read the IPv6 address fields, which those kernels fill for IPv4 sockets
    /// too, v4-mapped.
    pub const ABSENT: u16 = u16::MAX;
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] bytemuck::Pod types (no padding, any bit pattern).
    unsafe impl aya::Pod for UpstreamKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ClientUpstreamKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for OutcomeEvent {}
    unsafe impl aya::Pod for SynSent {}
    unsafe impl aya::Pod for PendingConnect {}
    unsafe impl aya::Pod for EstablishedConnection {}
    unsafe impl aya::Pod for TracepointLayout {}
    unsafe impl aya::Pod for OutcomeCounters {}
    unsafe impl aya::Pod for Control {}
    unsafe impl aya::Pod for Override {}
    unsafe impl aya::Pod for ServiceRoute {}
    unsafe impl aya::Pod for ConntrackLayout {}
    unsafe impl<const RATE: u64, const BURST: u64> aya::Pod for TokenBucket<RATE, BURST> {}
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_client_budget_allows_its_burst_then_its_rate() {
        let mut budget = ClientBudget::full(0);
        let burst = (0..2 * ClientBudget::BURST)
            .filter(|_| budget.take(0))
            .count();
        assert_eq!(burst as u64, ClientBudget::BURST);
        // One second later: one second's worth, never more than a burst.
        let second = 1_000_000_000;
        let more = (0..10 * ClientBudget::RATE)
            .filter(|_| budget.take(second))
            .count();
        assert_eq!(more as u64, ClientBudget::BURST.min(ClientBudget::RATE));
        // After an hour of quiet, a full burst again, and no overflow.
        let mut quiet = ClientBudget::full(0);
        quiet.tokens = 0;
        let later = 3_600 * second;
        let n = (0..2 * ClientBudget::BURST)
            .filter(|_| quiet.take(later))
            .count();
        assert_eq!(n as u64, ClientBudget::BURST);
        // Tokens earned a few at a time add up to the rate.
        let mut steady = ClientBudget::full(0);
        steady.tokens = 0;
        let admitted = (1..=ClientBudget::RATE)
            .filter(|i| steady.take(i * ClientBudget::TOKEN_NS))
            .count();
        assert_eq!(admitted as u64, ClientBudget::RATE);
    }

    use super::*;

    #[test]
    fn a_zeroed_reset_budget_fills_at_once_and_then_limits() {
        // A fresh per-CPU slot is all zero: it must not reject the first resets.
        let mut budget = ResetBudget::default();
        let now = 5_000_000_000;
        let sent = (0..3 * ResetBudget::BURST)
            .filter(|_| budget.take(now))
            .count();
        assert_eq!(sent as u64, ResetBudget::BURST);
    }

    #[test]
    fn resets_go_only_to_addresses_a_host_can_own() {
        let v4 = |a: [u8; 4]| UpstreamKey::v4(a, 1).addr;
        let v6 = |s: &str| s.parse::<core::net::Ipv6Addr>().unwrap().octets();
        for ok in [
            v4([10, 0, 0, 1]),
            v4([192, 0, 2, 7]),
            v4([223, 255, 255, 254]),
            v4([240, 10, 0, 5]), // class E, pods on GKE
            v4([255, 255, 255, 254]),
        ] {
            assert!(may_receive_reset(&ok), "{ok:?}");
        }
        for bad in [
            v4([0, 0, 0, 0]),
            v4([0, 1, 2, 3]),
            v4([127, 0, 0, 1]),
            v4([224, 0, 0, 1]),
            v4([239, 255, 255, 250]),
            v4([255, 255, 255, 255]),
        ] {
            assert!(!may_receive_reset(&bad), "{bad:?}");
        }
        for ok in ["2001:db8::1", "fe80::1", "fd00::2", "::2"] {
            assert!(may_receive_reset(&v6(ok)), "{ok}");
        }
        for bad in ["::", "::1", "ff02::1", "ff05::1:3"] {
            assert!(!may_receive_reset(&v6(bad)), "{bad}");
        }
    }

    #[test]
    fn layouts_have_the_sizes_the_kernel_sees() {
        assert_eq!(core::mem::size_of::<UpstreamKey>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 36);
        assert_eq!(core::mem::size_of::<ClientUpstreamKey>(), 32);
        assert_eq!(core::mem::size_of::<Verdict>(), 24);
        assert_eq!(core::mem::size_of::<OutcomeEvent>(), 72);
        assert_eq!(
            core::mem::size_of::<ServiceRoute>(),
            16 + 20 * MAX_SERVICE_ENDPOINTS
        );
        assert_eq!(core::mem::size_of::<ConntrackLayout>(), 16);
        assert_eq!(core::mem::size_of::<SynSent>(), 24);
        assert_eq!(core::mem::size_of::<PendingConnect>(), 16);
        assert_eq!(core::mem::size_of::<EstablishedConnection>(), 56);
        assert_eq!(core::mem::size_of::<TracepointLayout>(), 140);
        assert_eq!(core::mem::size_of::<OutcomeCounters>(), 64);
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
            client: 4242,
            service: UpstreamKey::v4([10, 96, 0, 10], 80),
            _pad2: 0,
        };
        let back: OutcomeEvent = bytemuck::pod_read_unaligned(bytemuck::bytes_of(&event));
        assert_eq!(back, event);
        assert_eq!(
            ConnectOutcome::from_u8(back.outcome),
            Some(ConnectOutcome::Refused)
        );
        for outcome in ConnectOutcome::ALL {
            assert_eq!(ConnectOutcome::from_u8(outcome as u8), Some(outcome));
        }
        assert_eq!(ConnectOutcome::from_u8(0), None);
    }

    #[test]
    fn filter_slots_stay_in_range_and_spread() {
        let mut words = [0u32; VerdictFilter::WORDS as usize];
        for host in 0..=255u8 {
            for port in [80u16, 443, 8080] {
                let (word, mask) = VerdictFilter::slot(&UpstreamKey::v4([10, 0, 7, host], port));
                assert!(word < VerdictFilter::WORDS);
                assert_eq!(mask.count_ones(), 1);
                words[word as usize] += 1;
            }
        }
        // 768 keys over 1024 words: no word should hold more than a handful.
        assert!(words.iter().all(|n| *n <= 8), "{:?}", words.iter().max());
    }

    #[test]
    fn stat_indices_are_dense() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as u32, i as u32);
        }
    }

    #[test]
    fn reject_and_checked_counters_follow_the_point_and_reason() {
        use EnforcementPoint::*;
        use RejectReason::*;
        assert_eq!(Stat::reject(Xdp, Open), Stat::XdpRejectOpen);
        assert_eq!(Stat::reject(Tc, ProbeBudget), Stat::TcRejectProbeBudget);
        assert_eq!(Stat::reject(Cgroup, Partial), Stat::CgroupRejectPartial);
        assert_eq!(Stat::checked(Tc), Stat::TcSynsChecked);
        assert_eq!(Stat::checked(Cgroup), Stat::CgroupChecked);
    }
}
