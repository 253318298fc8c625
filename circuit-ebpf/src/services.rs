//! Services behind virtual addresses (a Kubernetes Service's ClusterIP, a Docker port map,
//! any DNAT): the socket and every hook before the NAT see the virtual address, while what
//! fails is the endpoint the NAT picked.
//!
//! - A raw tracepoint on every packet handed to a device reads the conntrack entry of a
//!   connection's first packet and records the endpoint the NAT picked (NAT_ENDPOINTS); the
//!   outcome tracepoints then report the endpoint, with the virtual address beside it. This
//!   holds whichever namespace NATs: the client's own (OUTPUT, a host-network client) or
//!   the node's (PREROUTING, a pod).
//! - The cgroup connect hooks re-route a connect to a virtual address the agent has a
//!   route for (some of its endpoints are isolated) to an endpoint that admits it, picked
//!   at random as the NAT would; a HALF_OPEN endpoint gets its probes the same way.
//! - getpeername() of a re-routed socket returns the virtual address it asked for.

use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{cgroup_sock_addr, raw_tracepoint},
    programs::{RawTracePointContext, SockAddrContext},
};
use circuit_common::{
    AF_INET, ClientUpstreamKey, ConntrackLayout, Control, EnforcementPoint, FlowKey, IPPROTO_TCP,
    MAX_SERVICE_ENDPOINTS, ServiceRoute, Stat, UpstreamKey, VerdictState, conntrack_tuple as t,
    v4_mapped,
};

use crate::{
    maps::{CLIENT_VERDICTS, NAT_ENDPOINTS, REROUTED, SERVICE_ROUTES, count},
    verdict::{Connection, Decision, decide},
};

/// All zero until the agent sets it from the kernel's BTF: the probe then records nothing.
#[unsafe(no_mangle)]
static CONNTRACK_LAYOUT: Global<ConntrackLayout> = Global::new(ConntrackLayout {
    skb_nfct: 0,
    ct_tuplehash: 0,
    tuplehash_size: 0,
    tuple: 0,
});

/// `net:net_dev_queue(struct sk_buff *skb)`: every packet handed to a device, after
/// netfilter's POSTROUTING, so a new connection's first packet carries its confirmed
/// conntrack entry with the NAT decided: on the client's device for a host-network client
/// (OUTPUT NAT), on the node's device towards the endpoint for a pod (PREROUTING NAT). A
/// raw tracepoint: no kprobes needed, and on other packets it costs one read.
#[raw_tracepoint(tracepoint = "net_dev_queue")]
pub fn raw_tp_net_dev_queue(ctx: RawTracePointContext) -> i32 {
    let _ = on_packet(ctx.arg::<u64>(0));
    0
}

/// The ctinfo of a connection's packets in the original direction until a reply is seen.
const IP_CT_NEW: u64 = 2;

#[inline(always)]
fn on_packet(skb: u64) -> Result<(), i32> {
    let layout = CONNTRACK_LAYOUT.load();
    if layout.skb_nfct == 0 {
        return Ok(());
    }
    let nfct: u64 = read_kernel(skb + u64::from(layout.skb_nfct))?;
    // The low bits hold the packet's ctinfo: only a connection's first packets matter.
    if nfct & 7 != IP_CT_NEW {
        return Ok(());
    }
    let ct = nfct & !7;
    if ct == 0 {
        return Ok(());
    }
    let orig = ct + u64::from(layout.ct_tuplehash) + u64::from(layout.tuple);
    if u16::from(read_kernel::<u8>(orig + t::PROTOCOL as u64)?) != IPPROTO_TCP {
        return Ok(());
    }
    let reply = orig + u64::from(layout.tuplehash_size);
    let v4 = read_kernel::<u16>(orig + t::L3_FAMILY as u64)? == AF_INET;
    let virtual_addr = UpstreamKey::new(
        address(orig + t::DST_ADDR as u64, v4)?,
        port(orig + t::DST_PORT as u64)?,
    );
    let endpoint = UpstreamKey::new(
        address(reply + t::SRC_ADDR as u64, v4)?,
        port(reply + t::SRC_PORT as u64)?,
    );
    // No destination NAT: the socket already names the endpoint. A REDIRECT to a local
    // proxy (a mesh sidecar's 127.0.0.1:15001) is no endpoint: it is per namespace, and
    // re-routing other pods to it would skip their own redirect.
    if same_key(&virtual_addr, &endpoint) || is_loopback(&endpoint) {
        return Ok(());
    }
    let flow = FlowKey {
        client_addr: address(orig + t::SRC_ADDR as u64, v4)?,
        upstream_addr: virtual_addr.addr,
        client_port: port(orig + t::SRC_PORT as u64)?,
        upstream_port: virtual_addr.port,
    };
    count(Stat::NatResolved);
    NAT_ENDPOINTS.insert(flow, endpoint, 0)
}

/// A `T` at kernel address `at`.
#[inline(always)]
fn read_kernel<T>(at: u64) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel reports a bad address as Err instead of faulting; the
    // addresses come from the kernel's own layout (BTF), and every T read here is valid for
    // any bit pattern.
    unsafe { bpf_probe_read_kernel(at as *const T) }
}

/// A tuple's address at `at`, v4-mapped for IPv4 (held in its first 4 bytes).
#[inline(always)]
fn address(at: u64, v4: bool) -> Result<[u8; 16], i32> {
    if v4 {
        Ok(v4_mapped(read_kernel(at)?))
    } else {
        read_kernel(at)
    }
}

/// A tuple's port at `at`, in network byte order there.
#[inline(always)]
fn port(at: u64) -> Result<u16, i32> {
    Ok(u16::from_be(read_kernel(at)?))
}

/// Byte by byte: a slice comparison would call memcmp, which BPF has not.
#[inline(always)]
fn same_key(a: &UpstreamKey, b: &UpstreamKey) -> bool {
    let mut i = 0;
    while i < 16 {
        if a.addr[i] != b.addr[i] {
            return false;
        }
        i += 1;
    }
    a.port == b.port
}

/// 127.0.0.0/8 (v4-mapped) or ::1.
#[inline(always)]
fn is_loopback(key: &UpstreamKey) -> bool {
    if is_v4(key) {
        return key.addr[12] == 127;
    }
    let mut i = 0;
    while i < 15 {
        if key.addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    key.addr[15] == 1
}

#[inline(always)]
fn is_v4(key: &UpstreamKey) -> bool {
    let mut i = 0;
    while i < 10 {
        if key.addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    key.addr[10] == 0xff && key.addr[11] == 0xff
}

/// The endpoint the NAT picked for `flow` (the client's view), if a NAT picked one.
#[inline(always)]
pub fn nat_endpoint(flow: &FlowKey) -> Option<UpstreamKey> {
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    unsafe { NAT_ENDPOINTS.get(flow) }.copied()
}

/// Forgets `flow`'s endpoint once its connect has its outcome: a later connection on the
/// same 4-tuple gets its own (and the LRU keeps room for connections still connecting).
#[inline(always)]
pub fn forget_nat_endpoint(flow: &FlowKey) {
    let _ = NAT_ENDPOINTS.remove(flow);
}

/// What the cgroup hook does with a connect to a virtual address.
pub enum Reroute {
    /// No route: the NAT decides, as without circuit.
    Untouched,
    /// Connect to this endpoint instead.
    To(UpstreamKey),
    /// Every endpoint refuses this connect (isolated, out of probes, or held for the client).
    Refused,
}

/// Where a connect to `service` goes, given the [`crate::verdict::active_for_connect`]
/// switch: `own` is the connecting client's cgroup, `socket` the connection as the cgroup
/// hook names it (a probe token taken here is remembered for the later points).
#[inline(always)]
pub fn reroute(
    service: &UpstreamKey,
    own: u64,
    control: &Control,
    socket: Connection<'_>,
) -> Reroute {
    let Some(route) = SERVICE_ROUTES.get_ptr(service) else {
        return Reroute::Untouched;
    };
    // SAFETY: a map value, valid while the program runs; only the agent writes routes
    // (whole values), so this only reads.
    let route = unsafe { &*route };
    // SAFETY: a BPF helper with no pointer arguments.
    if unsafe { bpf_ktime_get_ns() } >= route.lease_expires_ns {
        // Nobody renewed it: fail open, to the NAT.
        return Reroute::Untouched;
    }
    if route.flags & ServiceRoute::FAIL_FAST != 0 {
        return Reroute::Refused;
    }
    let n = route.endpoint_count;
    if n == 0 || n > MAX_SERVICE_ENDPOINTS as u32 {
        return Reroute::Untouched;
    }
    let v4 = is_v4(service);
    // SAFETY: a BPF helper with no pointer arguments.
    let start = unsafe { bpf_get_prandom_u32() } % n;
    for k in 0..MAX_SERVICE_ENDPOINTS as u32 {
        if k >= n {
            break;
        }
        let mut i = start + k;
        if i >= n {
            i -= n;
        }
        let Some(endpoint) = route.endpoints.get(i as usize) else {
            break;
        };
        let endpoint = *endpoint;
        if is_v4(&endpoint) != v4 || held_for(control, &endpoint, own) {
            continue;
        }
        if decide(&endpoint, EnforcementPoint::Cgroup, control, socket) == Decision::Admit {
            return Reroute::To(endpoint);
        }
    }
    Reroute::Refused
}

/// Whether `client` itself is failed fast at `endpoint` (its own hold, as the engine
/// keys them: by the cgroup that connected).
#[inline(always)]
fn held_for(control: &Control, endpoint: &UpstreamKey, client: u64) -> bool {
    if control.client_verdicts == 0 {
        return false;
    }
    // SAFETY: a BPF helper with no pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map value, only read; only the agent writes client verdicts.
    unsafe { CLIENT_VERDICTS.get(ClientUpstreamKey::new(client, *endpoint)) }.is_some_and(|v| {
        now < v.lease_expires_ns && v.state() == Some(VerdictState::Open) && !v.is_dry_run()
    })
}

/// Remembers that the socket asked for `service`, for getpeername().
#[inline(always)]
pub fn remember_rerouted(cookie: u64, service: &UpstreamKey) {
    let _ = REROUTED.insert(cookie, *service, 0);
}

const CGROUP_PROCEED: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn cgroup_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(service) = rerouted(&ctx) {
        // SAFETY: the context the kernel passed, valid and writable for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = service.addr;
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(service.port.to_be());
    }
    CGROUP_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn cgroup_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(service) = rerouted(&ctx) {
        // SAFETY: as above.
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = service.addr;
        // Each word is one 4-byte store, as the verifier wants for this context.
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(service.port.to_be());
    }
    CGROUP_PROCEED
}

/// The virtual address a re-routed socket asked for.
#[inline(always)]
fn rerouted(ctx: &SockAddrContext) -> Option<UpstreamKey> {
    // SAFETY: the helper takes this program type's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied at once, so no reference outlives the lookup.
    unsafe { REROUTED.get(cookie) }.copied()
}
