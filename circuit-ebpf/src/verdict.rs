//! The decision every enforcement point makes for a new connection: look up the upstream's
//! verdict (exact address and port, then the whole host), honour its lease, and apply it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use circuit_common::{
    ADMITTED_FLOW_TTL_NS, ClientUpstreamKey, Control, EnforcementPoint, FlowKey, RejectReason,
    Stat, UpstreamKey, Verdict, VerdictFilter, VerdictState,
};

use crate::maps::{
    ADMITTED_FLOWS, ADMITTED_SOCKETS, CLIENT_VERDICTS, CONTROL, EXEMPT_CGROUPS, PROBE_COUNTS,
    SPARED_PORTS, VERDICT_FILTER, VERDICTS, count, count_index,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Reject, unless the client is exempt; count it with [`count_reject`] when done.
    Reject(RejectReason),
}

/// Counts a reject that happened at `point`.
#[inline(always)]
pub fn count_reject(point: EnforcementPoint, reason: RejectReason) {
    count_index(Stat::XdpRejectOpen as u32 + point as u32 * 3 + reason as u32);
}

/// Whether any verdict exists: the fast-path switch, one load. With none, the common case
/// costs nothing more.
#[inline(always)]
pub fn any_verdict() -> bool {
    // SAFETY: the global is only written from userspace (whole-value map updates); a
    // volatile read, since the compiler would otherwise assume it keeps its initial zero.
    unsafe { core::ptr::read_volatile(&raw const CONTROL.active_verdicts) != 0 }
}

/// The switch, read once and whole, when any verdict exists (see [`any_verdict`]).
#[inline(always)]
pub fn active() -> Option<Control> {
    // SAFETY: as in `any_verdict`.
    any_verdict().then(|| unsafe { core::ptr::read_volatile(&raw const CONTROL) })
}

/// The switch, read whole, when anything at all may make the cgroup hook reject: a verdict
/// or a client-scoped one.
#[inline(always)]
pub fn active_for_connect() -> Option<Control> {
    // SAFETY: as in `any_verdict`.
    let control = unsafe { core::ptr::read_volatile(&raw const CONTROL) };
    (control.active_verdicts != 0 || control.client_verdicts != 0).then_some(control)
}

/// What the client's own verdict at `upstream` says: `ancestor(level)` as for
/// [`is_exempt`], `own` the client's own cgroup id. The client's cgroup and those above it
/// are looked up (a verdict for a pod's cgroup holds for its containers).
#[inline(always)]
pub fn client_decision(
    control: &Control,
    upstream: &UpstreamKey,
    own: u64,
    ancestor: impl Fn(i32) -> u64,
) -> Decision {
    if control.client_verdicts == 0 {
        return Decision::Admit;
    }
    // SAFETY: a BPF helper with no pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let held = |id: u64| {
        let key = ClientUpstreamKey::new(id, *upstream);
        // SAFETY: a map value, only read; only the agent writes client verdicts.
        unsafe { CLIENT_VERDICTS.get(key) }
            .filter(|v| now < v.lease_expires_ns && v.state() == Some(VerdictState::Open))
            .map(|v| v.is_dry_run())
    };
    let mut dry_run = held(own);
    let mut level = 1;
    while dry_run.is_none() && level <= MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        dry_run = held(id);
        level += 1;
    }
    match dry_run {
        None => Decision::Admit,
        Some(true) => {
            count(Stat::DryRunRejects);
            Decision::Admit
        }
        Some(false) => Decision::Reject(RejectReason::Open),
    }
}

/// cgroup levels below the root walked for an exemption; deeper clients are judged by
/// their first 8 levels (Kubernetes pods sit at 3-5).
const MAX_CGROUP_DEPTH: i32 = 8;

/// Whether the client is a priority client: its cgroup, or one above it, is exempt. Asked
/// only for connections that would be rejected, so `ExemptAdmitted` counts exactly those.
/// `ancestor(level)` is the id of the client's cgroup ancestor at `level` (0 is the root),
/// 0 past the client's own level.
#[inline(always)]
pub fn is_exempt(control: &Control, ancestor: impl Fn(i32) -> u64) -> bool {
    if control.exempt_cgroups == 0 {
        return false;
    }
    for level in 1..=MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: only tested for presence, so no reference outlives the lookup.
        if unsafe { EXEMPT_CGROUPS.get(id) }.is_some() {
            count(Stat::ExemptAdmitted);
            return true;
        }
    }
    false
}

/// The verdict for `key`, skipping the hash lookup when the filter rules it out.
#[inline(always)]
fn lookup_one(key: &UpstreamKey) -> Option<*mut Verdict> {
    let (word, mask) = VerdictFilter::slot(key);
    let bits = VERDICT_FILTER.get(word).copied().unwrap_or(u64::MAX);
    if bits & mask == 0 {
        return None;
    }
    VERDICTS.get_ptr_mut(key)
}

/// The verdict for `upstream`: its own, else the whole host's (port 0) if any host has one.
#[inline(always)]
fn lookup(upstream: &UpstreamKey, control: &Control) -> Option<*mut Verdict> {
    lookup_one(upstream).or_else(|| {
        if control.host_verdicts == 0 {
            return None;
        }
        // A never-isolated port of an isolated host (its DNS, say) is spared.
        // SAFETY: only tested for presence, so no reference outlives the lookup.
        if unsafe { SPARED_PORTS.get(upstream) }.is_some() {
            return None;
        }
        lookup_one(&UpstreamKey::new(upstream.addr, 0))
    })
}

/// How an enforcement point names the connection it judges, so that one connection gets
/// one decision whatever points it crosses: XDP and TC see the flow (its 4-tuple as the
/// client sent it); the cgroup hook runs before the source port is chosen and sees the
/// socket, whose admission sock_ops turns into a flow admission before the SYN leaves.
#[derive(Clone, Copy)]
pub enum Connection<'a> {
    Flow(&'a FlowKey),
    /// The socket's cookie.
    Socket(u64),
}

/// Whether an earlier point (or an earlier copy of this SYN) admitted the connection.
#[inline(always)]
fn was_admitted(connection: Connection<'_>, now: u64) -> bool {
    let at = match connection {
        // SAFETY: the value is copied at once, so no reference outlives the lookup.
        Connection::Flow(flow) => unsafe { ADMITTED_FLOWS.get(flow) }.copied(),
        // A socket connects once: the cgroup hook is always its first point.
        Connection::Socket(_) => None,
    };
    at.is_some_and(|at| now.wrapping_sub(at) < ADMITTED_FLOW_TTL_NS)
}

/// Records that the connection was admitted despite its upstream's verdict (a probe, a
/// partial draw, a priority client), so no later point rejects it.
#[inline(always)]
pub fn remember_admitted(connection: Connection<'_>) {
    // SAFETY: a BPF helper with no pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = match connection {
        Connection::Flow(flow) => ADMITTED_FLOWS.insert(flow, now, 0),
        Connection::Socket(cookie) => ADMITTED_SOCKETS.insert(cookie, now, 0),
    };
}

/// Takes one of the upstream's probe tokens, if any is left of `budget`.
#[inline(always)]
fn take_probe_token(upstream: &UpstreamKey, budget: u32) -> bool {
    let mut taken = PROBE_COUNTS.get_ptr_mut(upstream);
    if taken.is_none() {
        // The agent removes the count when a HALF_OPEN period starts: the first probe makes
        // it (BPF_NOEXIST, so a racing first probe keeps the other's count).
        let _ = PROBE_COUNTS.insert(upstream, 0, 1);
        taken = PROBE_COUNTS.get_ptr_mut(upstream);
    }
    // No room to count (the map is sized like VERDICTS, so never in practice): admit, since
    // failing open costs at most an extra probe and failing closed could isolate for good.
    let Some(taken) = taken else { return true };
    // Count first, decide on the count seen afterwards. The increment is atomic across CPUs
    // and enforcement points (BPF XADD; a fetching add would need 5.12), so k admitted
    // connections each saw a count >= k: never more than the budget. Under an exact race two
    // may both see a count over budget and both be rejected, erring towards the upstream.
    // SAFETY: `taken` points at the map value, which lives as long as the program runs.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(taken, 1);
        core::ptr::read_volatile(taken) <= u64::from(budget)
    }
}

/// Decides a new connection to `upstream` at `point`, given the [`active`] switch.
#[inline(always)]
pub fn decide(
    upstream: &UpstreamKey,
    point: EnforcementPoint,
    control: &Control,
    connection: Connection<'_>,
) -> Decision {
    count_index(Stat::XdpSynsChecked as u32 + point as u32);
    let Some(verdict) = lookup(upstream, control) else {
        return Decision::Admit;
    };
    // SAFETY: a map value, valid while the program runs; only the agent writes verdicts
    // (whole values), so this reads and never writes it: each field is read once, whole, and
    // the HALF_OPEN token count lives apart, in PROBE_COUNTS.
    let verdict = unsafe { &*verdict };
    // SAFETY: a BPF helper with no pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= verdict.lease_expires_ns {
        // Nobody renewed this verdict: fail open.
        count(Stat::LeaseExpired);
        return Decision::Admit;
    }
    if was_admitted(connection, now) {
        count(Stat::AdmittedFollowed);
        return Decision::Admit;
    }
    let reason = match VerdictState::from_u8(verdict.state) {
        Some(VerdictState::Open) => RejectReason::Open,
        Some(VerdictState::HalfOpen) => {
            if take_probe_token(upstream, verdict.probe_budget) {
                count(Stat::ProbesAdmitted);
                remember_admitted(connection);
                return Decision::Admit;
            }
            RejectReason::ProbeBudget
        }
        Some(VerdictState::Partial) => {
            // SAFETY: a BPF helper with no pointer arguments.
            let draw = unsafe { bpf_get_prandom_u32() } & 0xffff;
            if draw >= u32::from(verdict.reject_fraction) {
                remember_admitted(connection);
                return Decision::Admit;
            }
            RejectReason::Partial
        }
        None => return Decision::Admit,
    };
    if verdict.flags & Verdict::DRY_RUN != 0 {
        count(Stat::DryRunRejects);
        return Decision::Admit;
    }
    Decision::Reject(reason)
}
