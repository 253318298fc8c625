//! The decision every enforcement point makes for a new connection: look up the upstream's
//! verdict (exact address and port, then the whole host), honour its lease, and apply it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use circuit_common::{
    Control, EnforcementPoint, RejectReason, Stat, UpstreamKey, Verdict, VerdictFilter,
    VerdictState,
};

use crate::maps::{CONTROL, EXEMPT_CGROUPS, VERDICT_FILTER, VERDICTS, count, count_index};

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
        lookup_one(&UpstreamKey::new(upstream.addr, 0))
    })
}

/// Decides a new connection to `upstream` at `point`, given the [`active`] switch.
#[inline(always)]
pub fn decide(upstream: &UpstreamKey, point: EnforcementPoint, control: &Control) -> Decision {
    count_index(Stat::XdpSynsChecked as u32 + point as u32);
    let Some(verdict) = lookup(upstream, control) else {
        return Decision::Admit;
    };
    let verdict = unsafe { &mut *verdict };
    if unsafe { bpf_ktime_get_ns() } >= verdict.lease_expires_ns {
        // Nobody renewed this verdict: fail open.
        count(Stat::LeaseExpired);
        return Decision::Admit;
    }
    let reason = match VerdictState::from_u8(verdict.state) {
        Some(VerdictState::Open) => RejectReason::Open,
        Some(VerdictState::HalfOpen) => {
            // Count first, decide on the count seen afterwards. The increment is atomic
            // across CPUs and enforcement points (BPF XADD), so k admitted connections each
            // saw a count >= k: never more than the budget. Under an exact race two may both
            // see a count over budget and both be rejected, erring towards the upstream.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &mut verdict.probes_admitted,
                    1,
                );
            }
            let seen = unsafe { core::ptr::read_volatile(&verdict.probes_admitted) };
            if seen <= u64::from(verdict.probe_budget) {
                count(Stat::ProbesAdmitted);
                return Decision::Admit;
            }
            RejectReason::ProbeBudget
        }
        Some(VerdictState::Partial) => {
            let draw = unsafe { bpf_get_prandom_u32() } & 0xffff;
            if draw >= u32::from(verdict.reject_fraction) {
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
