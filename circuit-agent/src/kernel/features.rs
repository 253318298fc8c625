//! What this kernel offers circuit, probed once at start. The agent degrades feature by
//! feature, with one log line for each, and `circuit-agent doctor` reports the same findings.
//!
//! Probes ask the kernel where that is cheap and exact (a map type, a helper for a program
//! type, a tracepoint's format file); where aya itself decides by version (tcx, XDP links),
//! the probe uses the same version, so the report says what the agent will actually do.

use std::path::Path;

use anyhow::Context;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
    util::KernelVersion,
};

use super::tracefs::{self, Layout, OPTIONAL_FIELDS, TRACEPOINTS};

/// How a feature stands on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Missing, and the agent works around it (the detail says how).
    Degraded,
    /// Missing, and what needs it cannot work here.
    Missing,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Missing => "missing",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Feature {
    pub name: String,
    /// The first Linux version that has it.
    pub needs: &'static str,
    pub status: Status,
    /// What is missing and what the agent does instead; empty when ok.
    pub detail: String,
}

/// The kernel's answers to circuit's probes.
#[derive(Clone, Debug)]
pub struct Features {
    /// `uname -r`.
    pub release: String,
    /// The version aya reads (Debian's and Ubuntu's real patch level, not the ABI's).
    pub version: Option<String>,
    /// The tracepoints and their fields, or why they cannot be used.
    pub layout: Result<Layout, String>,
    pub ring_buffer: bool,
    /// `bpf_set_retval` from cgroup connect hooks (5.18): rejects fail with ECONNREFUSED.
    pub set_retval: bool,
    /// tcx (6.6): the TC link is pinned and outlives the agent.
    pub tcx: bool,
    /// XDP through a bpf_link (5.9), which can be pinned and taken over.
    pub xdp_links: bool,
    /// Where conntrack keeps a connection's tuples (from BTF), or why it cannot be read:
    /// without it, endpoints behind virtual addresses are not resolved.
    pub conntrack: Result<super::conntrack::Conntrack, String>,
}

const TCX_SINCE: (u8, u8) = (6, 6);
const XDP_LINK_SINCE: (u8, u8) = (5, 9);

impl Features {
    /// Asks the kernel (tracepoint formats are read from the tracefs at `tracefs`).
    pub fn probe(tracefs: &Path) -> Self {
        let version = KernelVersion::current().ok();
        let at_least = |(major, minor): (u8, u8)| {
            version.is_some_and(|v| v >= KernelVersion::new(major, minor, 0))
        };
        Self {
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            version: version.map(|v| v.to_string()),
            layout: tracefs::read_layout(tracefs).map_err(|e| format!("{e:#}")),
            ring_buffer: is_map_supported(MapType::RingBuf).unwrap_or(false),
            set_retval: has_set_retval(),
            tcx: at_least(TCX_SINCE),
            xdp_links: at_least(XDP_LINK_SINCE),
            conntrack: super::conntrack::running_layout(),
        }
    }

    /// Whether outcomes can reach the agent at all: without them no breaker ever trips.
    pub fn outcomes_problem(&self) -> Option<String> {
        if !self.ring_buffer {
            return Some("this kernel has no BPF ring buffer (Linux 5.8)".to_owned());
        }
        self.layout.as_ref().err().cloned()
    }

    /// Every feature, in a fixed order, with what its absence costs.
    pub fn report(&self) -> Vec<Feature> {
        let mut out = Vec::new();
        let flag = |ok: bool, degraded: bool| match (ok, degraded) {
            (true, _) => Status::Ok,
            (false, true) => Status::Degraded,
            (false, false) => Status::Missing,
        };
        out.push(Feature {
            name: "ring buffer".to_owned(),
            needs: "5.8",
            status: flag(self.ring_buffer, false),
            detail: if self.ring_buffer {
                String::new()
            } else {
                "outcomes cannot reach the agent: nothing can be detected".to_owned()
            },
        });
        match &self.layout {
            Ok(layout) => {
                for tp in &TRACEPOINTS {
                    let has = layout.has(tp);
                    out.push(Feature {
                        name: format!("tracepoint {}:{}", tp.category, tp.name),
                        needs: tp.since,
                        status: flag(has, true),
                        detail: if has {
                            String::new()
                        } else {
                            tp.without.unwrap_or_default().to_owned()
                        },
                    });
                }
                for (name, since, without) in OPTIONAL_FIELDS {
                    let lacking: Vec<String> = layout
                        .absent_fields
                        .iter()
                        .filter(|(_, field)| *field == name)
                        .map(|(tp, _)| format!("{}:{}", tp.category, tp.name))
                        .collect();
                    out.push(Feature {
                        name: format!("tracepoint field `{name}`"),
                        needs: since,
                        status: flag(lacking.is_empty(), true),
                        detail: if lacking.is_empty() {
                            String::new()
                        } else {
                            format!("absent from {}: {without}", lacking.join(", "))
                        },
                    });
                }
            }
            Err(err) => out.push(Feature {
                name: "tracepoints".to_owned(),
                needs: "5.8",
                status: Status::Missing,
                detail: format!("{err}: outcomes cannot be classified"),
            }),
        }
        out.push(Feature {
            name: "bpf_set_retval (cgroup)".to_owned(),
            needs: "5.18",
            status: flag(self.set_retval, true),
            detail: if self.set_retval {
                String::new()
            } else {
                SET_RETVAL_WITHOUT.to_owned()
            },
        });
        out.push(Feature {
            name: "XDP links".to_owned(),
            needs: "5.9",
            status: flag(self.xdp_links, false),
            detail: if self.xdp_links {
                String::new()
            } else {
                "XDP cannot be attached with a pinnable link: XDP enforcement unavailable"
                    .to_owned()
            },
        });
        out.push(Feature {
            name: "conntrack layout (BTF)".to_owned(),
            needs: "5.11 (module BTF) when nf_conntrack is a module",
            status: flag(self.conntrack.is_ok(), true),
            detail: match &self.conntrack {
                Ok(_) => String::new(),
                Err(why) => format!("{why}; {CONNTRACK_WITHOUT}"),
            },
        });
        out.push(Feature {
            name: "tcx".to_owned(),
            needs: "6.6",
            status: flag(self.tcx, true),
            detail: if self.tcx {
                String::new()
            } else {
                TCX_WITHOUT.to_owned()
            },
        });
        out
    }

    /// One log line per degraded or missing feature.
    pub fn log(&self) {
        for f in self.report() {
            match f.status {
                Status::Ok => {}
                Status::Degraded => tracing::warn!(
                    feature = %f.name,
                    needs = %format!("Linux {}", f.needs),
                    kernel = %self.release,
                    "degraded: {}",
                    f.detail
                ),
                Status::Missing => tracing::error!(
                    feature = %f.name,
                    needs = %format!("Linux {}", f.needs),
                    kernel = %self.release,
                    "missing: {}",
                    f.detail
                ),
            }
        }
    }
}

const CONNTRACK_WITHOUT: &str = "endpoints behind virtual addresses (Service IPs, DNAT) are not resolved: a virtual address is judged as one upstream and never re-routed";

/// Whether cgroup connect hooks can choose their errno (`bpf_set_retval`, Linux 5.18): a
/// reject then fails connect() with ECONNREFUSED, else with EPERM.
pub fn has_set_retval() -> bool {
    is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
        .unwrap_or(false)
}

/// The verifier's answer for one program.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramCheck {
    pub program: &'static str,
    /// None when the kernel accepted it; else why not (the verifier's last word).
    pub error: Option<String>,
}

/// Loads (without attaching) every program the agent would load here, with maps pinned in a
/// scratch directory under `bpffs_root`, removed afterwards: what the verifier of this
/// kernel says about each.
pub fn verify_programs(
    features: &Features,
    bpffs_root: &Path,
) -> anyhow::Result<Vec<ProgramCheck>> {
    use circuit_common::program_names as names;
    let scratch = bpffs_root.join(format!("circuit-doctor-{}", std::process::id()));
    super::ensure_bpffs(&scratch)?;
    let result = (|| {
        let mut ebpf = super::load(&scratch, features)?;
        let layout = features.layout.as_ref().expect("checked by load");
        let mut names: Vec<&'static str> = TRACEPOINTS
            .iter()
            .filter(|tp| layout.has(tp))
            .map(|tp| tp.program)
            .collect();
        names.extend([
            names::CGROUP_CONNECT4,
            names::CGROUP_CONNECT6,
            names::CGROUP_GETPEERNAME4,
            names::CGROUP_GETPEERNAME6,
            names::XDP_ENFORCE,
            names::TC_ENFORCE,
        ]);
        if features.conntrack.is_ok() {
            names.push(names::RAW_TP_NET_DEV_QUEUE);
        }
        Ok::<_, anyhow::Error>(
            names
                .into_iter()
                .map(|program| {
                    let error = match ebpf.program_mut(program) {
                        None => Some("missing from the object".to_owned()),
                        Some(prog) => super::prog_load(prog).err().map(|e| verifier_summary(&e)),
                    };
                    ProgramCheck { program, error }
                })
                .collect(),
        )
    })();
    let removed = super::remove_pins(&scratch);
    let checks = result?;
    removed.with_context(|| format!("cannot remove the scratch pins {}", scratch.display()))?;
    Ok(checks)
}

/// The line of a load error that says why: the verifier's last complaint when it logged one.
fn verifier_summary(err: &aya::programs::ProgramError) -> String {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = err
    {
        let log = verifier_log.to_string();
        let why = log.lines().map(str::trim).rev().find(|line| {
            !line.is_empty()
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
                && !line.starts_with("processed ")
                && !line.starts_with(':')
        });
        if let Some(why) = why {
            return format!("verifier: {why} ({io_error})");
        }
        return io_error.to_string();
    }
    err.to_string()
}

const SET_RETVAL_WITHOUT: &str =
    "cgroup rejects fail connect() with EPERM instead of ECONNREFUSED (still at once)";
const TCX_WITHOUT: &str =
    "TC egress hangs off a clsact qdisc: it goes with the agent process instead of staying pinned";

#[cfg(test)]
mod tests {
    use super::*;

    fn features(set_retval: bool, tcx: bool) -> Features {
        Features {
            release: "test".to_owned(),
            version: None,
            layout: Ok(Layout::default()),
            ring_buffer: true,
            set_retval,
            tcx,
            xdp_links: true,
            conntrack: Ok(crate::kernel::conntrack::Conntrack {
                offsets: circuit_common::ConntrackLayout {
                    skb_nfct: 120,
                    ct_tuplehash: 16,
                    tuplehash_size: 56,
                    tuple: 16,
                },
            }),
        }
    }

    #[test]
    fn every_feature_is_reported_with_the_kernel_it_needs() {
        let report = features(true, true).report();
        assert!(report.iter().all(|f| f.status == Status::Ok), "{report:?}");
        assert!(report.iter().all(|f| !f.needs.is_empty()));
        let names: Vec<&str> = report.iter().map(|f| f.name.as_str()).collect();
        for wanted in [
            "ring buffer",
            "tracepoint sock:inet_sk_error_report",
            "bpf_set_retval (cgroup)",
            "tcx",
            "XDP links",
            "conntrack layout (BTF)",
        ] {
            assert!(names.contains(&wanted), "{names:?}");
        }
    }

    #[test]
    fn degradations_say_what_the_agent_does_instead() {
        let report = features(false, false).report();
        let retval = report
            .iter()
            .find(|f| f.name.starts_with("bpf_set_retval"))
            .unwrap();
        assert_eq!(retval.status, Status::Degraded);
        assert!(retval.detail.contains("EPERM"));
        let mut no_ring = features(true, true);
        no_ring.ring_buffer = false;
        assert!(no_ring.outcomes_problem().unwrap().contains("5.8"));
        let mut no_tracepoints = features(true, true);
        no_tracepoints.layout = Err("no tracefs".to_owned());
        assert_eq!(no_tracepoints.outcomes_problem().unwrap(), "no tracefs");
    }
}
