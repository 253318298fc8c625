//! `circuit-agent doctor`: what works on this kernel and why not, feature by feature (in
//! the manner of `bpftool feature probe`), then what that leaves of circuit: outcome
//! detection and each enforcement point, with the verifier's answer for every program.
//! Loads programs into a scratch pin directory; attaches nothing.

use std::path::Path;

use anyhow::Context;
use circuit_common::program_names as names;
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::kernel::{
    self, Enforcer,
    features::{Feature, Features, ProgramCheck, Status},
};

/// One part of circuit and whether it works here.
#[derive(Clone, Debug, Serialize)]
pub struct Capability {
    /// "outcomes", or an enforcement point.
    pub name: String,
    pub status: Status,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub version: Option<String>,
    pub features: Vec<Feature>,
    pub programs: Vec<ProgramCheck>,
    pub capabilities: Vec<Capability>,
    /// Outcomes are detected and at least one enforcement point works.
    pub can_protect: bool,
}

/// Probes this kernel. Needs the privileges of `attach` (probes load programs).
pub fn diagnose() -> anyhow::Result<Report> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("doctor loads test programs into the kernel: run it as root");
    }
    let tracefs = kernel::ensure_tracefs()?;
    let features = Features::probe(&tracefs);
    let programs = if features.outcomes_problem().is_some() {
        // The object cannot be fitted to this kernel; the features say why.
        Vec::new()
    } else {
        let root = Path::new(kernel::DEFAULT_PIN_DIR)
            .parent()
            .context("the default pin directory has no parent")?;
        kernel::features::verify_programs(&features, root)?
    };
    let cgroup = kernel::find_cgroup2_root().map(|p| p.display().to_string());
    Ok(assess(&features, programs, cgroup))
}

/// What the probes leave of circuit.
fn assess(features: &Features, programs: Vec<ProgramCheck>, cgroup2: Option<String>) -> Report {
    let refused = |wanted: &[&str]| -> Option<String> {
        programs
            .iter()
            .filter(|p| wanted.contains(&p.program))
            .find_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.program)))
    };
    let mut capabilities = Vec::new();
    let tracepoints: Vec<&str> = programs
        .iter()
        .map(|p| p.program)
        .filter(|p| p.starts_with("tp_"))
        .collect();
    let outcomes = match features.outcomes_problem() {
        Some(problem) => (Status::Missing, problem),
        None => match refused(&tracepoints) {
            Some(err) => (Status::Missing, err),
            None => {
                let degraded: Vec<String> = features
                    .report()
                    .into_iter()
                    .filter(|f| f.name.starts_with("tracepoint") && f.status != Status::Ok)
                    .map(|f| f.detail)
                    .collect();
                if degraded.is_empty() {
                    (Status::Ok, String::new())
                } else {
                    (Status::Degraded, degraded.join("; "))
                }
            }
        },
    };
    capabilities.push(Capability {
        name: "outcomes".to_owned(),
        status: outcomes.0,
        detail: outcomes.1,
    });
    let enforcer = |e: Enforcer, progs: &[&str], ok: (Status, String)| {
        if programs.is_empty() {
            return Capability {
                name: e.to_string(),
                status: Status::Missing,
                detail: "programs not loaded (see outcomes)".to_owned(),
            };
        }
        match refused(progs) {
            Some(err) => Capability {
                name: e.to_string(),
                status: Status::Missing,
                detail: err,
            },
            None => Capability {
                name: e.to_string(),
                status: ok.0,
                detail: ok.1,
            },
        }
    };
    let cgroup_ok = match (&cgroup2, features.set_retval) {
        (None, _) => (
            Status::Missing,
            "no cgroup v2 hierarchy (attach mounts one if it can)".to_owned(),
        ),
        (Some(root), true) => (Status::Ok, format!("at {root}")),
        (Some(root), false) => (
            Status::Degraded,
            format!("at {root}; rejects fail with EPERM (no bpf_set_retval before 5.18)"),
        ),
    };
    capabilities.push(enforcer(
        Enforcer::Cgroup,
        &[names::CGROUP_CONNECT4, names::CGROUP_CONNECT6],
        cgroup_ok,
    ));
    let xdp_ok = if features.xdp_links {
        (Status::Ok, String::new())
    } else {
        (
            Status::Missing,
            "no XDP links before 5.9 (circuit pins its XDP link)".to_owned(),
        )
    };
    capabilities.push(enforcer(Enforcer::Xdp, &[names::XDP_ENFORCE], xdp_ok));
    let tc_ok = if features.tcx {
        (Status::Ok, "tcx".to_owned())
    } else {
        (
            Status::Degraded,
            "clsact: the filter goes with the agent process (no tcx before 6.6)".to_owned(),
        )
    };
    capabilities.push(enforcer(Enforcer::Tc, &[names::TC_ENFORCE], tc_ok));
    let works = |c: &Capability| c.status != Status::Missing;
    let can_protect = works(&capabilities[0]) && capabilities[1..].iter().any(works);
    Report {
        kernel: features.release.clone(),
        version: features.version.clone(),
        features: features.report(),
        programs,
        capabilities,
        can_protect,
    }
}

/// The report as tables: features, programs, then what circuit can do here.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "kernel {}{}\n\n",
        report.kernel,
        report
            .version
            .as_ref()
            .map(|v| format!(" (Linux {v})"))
            .unwrap_or_default()
    );
    let mut features = table(&["FEATURE", "NEEDS", "STATUS", "DETAIL"]);
    for f in &report.features {
        features.add_row(vec![
            f.name.clone(),
            f.needs.to_owned(),
            f.status.as_str().to_owned(),
            f.detail.clone(),
        ]);
    }
    out.push_str(&format!("{features}\n\n"));
    if !report.programs.is_empty() {
        let mut programs = table(&["PROGRAM", "VERIFIER"]);
        for p in &report.programs {
            programs.add_row(vec![
                p.program.to_owned(),
                p.error.clone().unwrap_or_else(|| "accepted".to_owned()),
            ]);
        }
        out.push_str(&format!("{programs}\n\n"));
    }
    let mut caps = table(&["CIRCUIT", "STATUS", "DETAIL"]);
    for c in &report.capabilities {
        caps.add_row(vec![
            c.name.clone(),
            c.status.as_str().to_owned(),
            c.detail.clone(),
        ]);
    }
    out.push_str(&format!("{caps}\n\n"));
    out.push_str(if report.can_protect {
        "circuit can protect this node\n"
    } else {
        "circuit cannot protect this node: it needs outcomes and at least one enforcement point\n"
    });
    out
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::Layout;

    fn features(set_retval: bool) -> Features {
        Features {
            release: "5.10.0-46-amd64".to_owned(),
            version: Some("5.10.262".to_owned()),
            layout: Ok(Layout::default()),
            ring_buffer: true,
            set_retval,
            tcx: false,
            xdp_links: true,
            conntrack: Err("nf_conntrack is not loaded".to_owned()),
        }
    }

    fn accepted(names: &[&'static str]) -> Vec<ProgramCheck> {
        names
            .iter()
            .map(|program| ProgramCheck {
                program,
                error: None,
            })
            .collect()
    }

    const ALL: [&str; 4] = [
        names::CGROUP_CONNECT4,
        names::CGROUP_CONNECT6,
        names::XDP_ENFORCE,
        names::TC_ENFORCE,
    ];

    #[test]
    fn an_old_kernel_degrades_but_protects() {
        let report = assess(
            &features(false),
            accepted(&ALL),
            Some("/sys/fs/cgroup".into()),
        );
        assert!(report.can_protect);
        let status: Vec<(&str, Status)> = report
            .capabilities
            .iter()
            .map(|c| (c.name.as_str(), c.status))
            .collect();
        assert_eq!(
            status,
            [
                ("outcomes", Status::Ok),
                ("cgroup", Status::Degraded),
                ("xdp", Status::Ok),
                ("tc", Status::Degraded)
            ]
        );
        let text = render(&report);
        assert!(
            text.contains("EPERM") && text.contains("can protect"),
            "{text}"
        );
    }

    #[test]
    fn a_refused_program_is_named_with_the_verifiers_reason() {
        let mut programs = accepted(&ALL);
        programs[2].error = Some("verifier: invalid read from stack R10 off=-128 size=8".into());
        let report = assess(&features(true), programs, Some("/sys/fs/cgroup".into()));
        let xdp = &report.capabilities[2];
        assert_eq!(xdp.status, Status::Missing);
        assert!(xdp.detail.contains("xdp_enforce") && xdp.detail.contains("R10"));
        assert!(report.can_protect, "cgroup and tc still work");
    }

    #[test]
    fn nothing_enforceable_or_no_outcomes_means_no_protection() {
        let mut programs = accepted(&ALL);
        for p in &mut programs {
            p.error = Some("refused".into());
        }
        assert!(!assess(&features(true), programs, None).can_protect);
        let mut blind = features(true);
        blind.ring_buffer = false;
        let report = assess(&blind, Vec::new(), Some("/sys/fs/cgroup".into()));
        assert!(!report.can_protect);
        assert_eq!(report.capabilities[0].status, Status::Missing);
    }
}
