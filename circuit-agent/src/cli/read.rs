//! The read commands: `status`, `inspect`, `events`: from the agent when it answers on its
//! socket, from the pinned maps (the kernel's truth) when it does not.

use std::{io::Write, net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;
use circuit_common::OverrideKind;
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use super::{BadInput, Output, ReadArgs};
use crate::{
    engine::Clock,
    kernel::{
        self, CgroupNames, OverrideTable, Stats, StoredOverride, StoredVerdict, UpstreamCounts,
        VerdictTable,
    },
    surfaces::control::{
        self, ClientHoldRow, Inspection, KernelVerdict, KernelVerdictState, Request, Status,
    },
    time::MonotonicClock,
};

pub(super) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

pub(super) fn secs(s: f64) -> String {
    humantime::format_duration(Duration::from_millis((s.max(0.0) * 1000.0) as u64)).to_string()
}

/// One request to the running agent; the first reply line. Err when no agent answers.
pub(super) fn ask_agent(socket: &Path, request: Request) -> anyhow::Result<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut lines = control::request(socket, &request).await?;
            lines
                .next_line()
                .await?
                .context("the agent closed the connection without answering")
        })
}

/// The kernel's view, from the pinned maps: works with no agent running.
#[derive(Serialize)]
struct KernelView {
    verdicts: Vec<VerdictRow>,
    /// Client-scoped verdicts: one client failed fast at one upstream, by the cgroup hook.
    client_verdicts: Vec<ClientHoldRow>,
    overrides: Vec<OverrideRow>,
    counters: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct VerdictRow {
    upstream: SocketAddr,
    #[serde(flatten)]
    verdict: KernelVerdict,
}

#[derive(Serialize)]
struct OverrideRow {
    upstream: SocketAddr,
    kind: &'static str,
    seconds_left: Option<f64>,
}

fn override_name(kind: OverrideKind) -> &'static str {
    match kind {
        OverrideKind::ForcedOpen => "FORCED_OPEN",
        OverrideKind::Disabled => "DISABLED",
        OverrideKind::Reset => "RESET (pending)",
    }
}

fn kernel_view(pin_dir: &Path) -> anyhow::Result<KernelView> {
    let now = MonotonicClock.now();
    let table = VerdictTable::open_pinned(pin_dir)?;
    let mut names = kernel::ensure_cgroup2_root().ok().map(CgroupNames::new);
    let client_verdicts = table
        .list_clients()?
        .into_iter()
        .map(|v| ClientHoldRow {
            upstream: v.upstream,
            client: v.client,
            client_path: names.as_mut().and_then(|n| n.path(v.client)),
            seconds_left: v.lease_expires.since(now).as_secs_f64(),
            dry_run: v.dry_run,
        })
        .collect();
    let verdicts = table
        .list()?
        .iter()
        .map(|v: &StoredVerdict| VerdictRow {
            upstream: v.upstream,
            verdict: KernelVerdict::of(v, now),
        })
        .collect();
    let overrides = OverrideTable::open_pinned(pin_dir)?
        .list()?
        .into_iter()
        .map(|o: StoredOverride| OverrideRow {
            upstream: o.upstream,
            kind: override_name(o.kind),
            seconds_left: o.until.map(|u| u.since(now).as_secs_f64()),
        })
        .collect();
    let counters = Stats::open_pinned(pin_dir)?
        .all()?
        .into_iter()
        .map(|(s, v)| (s.name(), v))
        .collect();
    Ok(KernelView {
        verdicts,
        client_verdicts,
        overrides,
        counters,
    })
}

#[derive(Serialize)]
struct StatusJson {
    /// "agent" when a running agent answered, "kernel" when read from the pins alone.
    source: &'static str,
    breakers: Vec<control::BreakerRow>,
    /// Clients failed fast on their own, as the agent holds them (empty without an agent;
    /// `client_verdicts` is the kernel's side).
    client_holds: Vec<ClientHoldRow>,
    /// Virtual addresses with the endpoints their NAT picked (empty without an agent).
    services: Vec<control::ServiceRow>,
    #[serde(flatten)]
    kernel: KernelView,
}

pub(super) fn status(read: &ReadArgs) -> anyhow::Result<()> {
    let kernel = kernel_view(&read.pins.pin_dir)?;
    let agent = ask_agent(&read.socket(), Request::Status);
    let (source, status) = match agent {
        Ok(line) => ("agent", serde_json::from_str::<Status>(&line)?),
        Err(err) => {
            tracing::debug!(%err, "no agent answered; showing the kernel's view");
            let none = Status {
                breakers: Vec::new(),
                client_holds: Vec::new(),
                services: Vec::new(),
            };
            ("kernel", none)
        }
    };
    let out = StatusJson {
        source,
        breakers: status.breakers,
        client_holds: status.client_holds,
        services: status.services,
        kernel,
    };
    if read.output == Output::Json {
        return print_json(&out);
    }
    if source == "agent" {
        let mut t = table(&[
            "UPSTREAM",
            "STATE",
            "FAIL RATE",
            "FAILS/CALLS",
            "SINCE",
            "NEXT PROBE",
            "REJECTS",
        ]);
        // Endpoints are listed under their service, the rest after.
        let behind: std::collections::BTreeSet<SocketAddr> = out
            .services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| e.endpoint))
            .collect();
        let by_upstream: std::collections::BTreeMap<SocketAddr, &control::BreakerRow> =
            out.breakers.iter().map(|b| (b.upstream, b)).collect();
        let mut rows: Vec<(String, &control::BreakerRow)> = Vec::new();
        for s in &out.services {
            for e in &s.endpoints {
                if let Some(b) = by_upstream.get(&e.endpoint) {
                    rows.push((format!("  {}", e.endpoint), b));
                }
            }
        }
        rows.extend(
            out.breakers
                .iter()
                .filter(|b| !behind.contains(&b.upstream))
                .map(|b| (b.upstream.to_string(), b)),
        );
        if !out.services.is_empty() {
            let mut s_table = table(&["SERVICE", "STATE", "ENDPOINTS", "RE-ROUTE"]);
            for s in &out.services {
                let endpoints: Vec<String> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let state = e.state.map_or("-".to_owned(), |st| st.to_string());
                        format!("{} {state}", e.endpoint)
                    })
                    .collect();
                s_table.add_row(vec![
                    s.service.to_string(),
                    s.state.to_string(),
                    endpoints.join("\n"),
                    if s.reroute { "on" } else { "off" }.to_owned(),
                ]);
            }
            println!("services (endpoints learned from their NAT):\n{s_table}\n");
        }
        for (name, b) in rows {
            t.add_row(vec![
                name,
                b.state.to_string(),
                b.failure_rate
                    .map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
                match (b.window_failures, b.window_calls) {
                    (Some(f), Some(c)) => format!("{f}/{c}"),
                    _ => format!("{} in a row", b.consecutive_failures),
                },
                secs(b.since_seconds),
                b.next_probe_seconds.map_or("-".into(), secs),
                b.rejects.to_string(),
            ]);
        }
        println!("{t}");
    } else {
        println!(
            "(no agent answered on {}: kernel view only)",
            read.socket().display()
        );
    }
    let mut t = table(&["UPSTREAM", "VERDICT", "PROBES", "LEASE LEFT"]);
    for v in &out.kernel.verdicts {
        let k = &v.verdict;
        let mut state = if k.state == KernelVerdictState::Partial {
            format!("PARTIAL {:.0}%", k.reject_fraction * 100.0)
        } else {
            k.state.as_str().to_owned()
        };
        if k.dry_run {
            state.push_str(" (dry run)");
        }
        let probes = if k.state == KernelVerdictState::HalfOpen {
            format!(
                "{}/{}",
                k.probes_admitted.min(u64::from(k.probe_budget)),
                k.probe_budget
            )
        } else {
            "-".into()
        };
        let left = if k.lease_left_seconds > 0.0 {
            secs(k.lease_left_seconds)
        } else {
            "expired".into()
        };
        t.add_row(vec![v.upstream.to_string(), state, probes, left]);
    }
    println!("\nkernel verdicts (node-wide):\n{t}");
    if !out.kernel.client_verdicts.is_empty() {
        let mut t = table(&["UPSTREAM", "CLIENT", "CGROUP", "LEASE LEFT"]);
        for h in &out.kernel.client_verdicts {
            let mut left = secs(h.seconds_left);
            if h.dry_run {
                left.push_str(" (dry run)");
            }
            t.add_row(vec![
                h.upstream.to_string(),
                h.client.to_string(),
                h.client_path.clone().unwrap_or_else(|| "?".into()),
                left,
            ]);
        }
        println!("\nclient-scoped verdicts (that client alone fails fast):\n{t}");
    }
    if !out.kernel.overrides.is_empty() {
        let mut t = table(&["UPSTREAM", "OVERRIDE", "TIME LEFT"]);
        for o in &out.kernel.overrides {
            t.add_row(vec![
                o.upstream.to_string(),
                o.kind.to_owned(),
                o.seconds_left.map_or("until reset".into(), secs),
            ]);
        }
        println!("\noperator overrides:\n{t}");
    }
    let mut t = table(&["COUNTER", "VALUE"]);
    for (name, value) in &out.kernel.counters {
        t.add_row(vec![name.to_string(), value.to_string()]);
    }
    println!("\nkernel counters:\n{t}");
    Ok(())
}

#[derive(Serialize)]
struct InspectJson {
    source: &'static str,
    upstream: SocketAddr,
    #[serde(flatten)]
    agent: Option<Inspection>,
    kernel_verdict: Option<KernelVerdict>,
    /// The kernel's outcome counters for this upstream (complete even if events were lost).
    kernel_counts: std::collections::BTreeMap<&'static str, u64>,
}

pub(super) fn inspect(upstream: SocketAddr, read: &ReadArgs) -> anyhow::Result<()> {
    let now = MonotonicClock.now();
    let kernel_verdict = VerdictTable::open_pinned(&read.pins.pin_dir)?
        .get(upstream)?
        .map(|v| KernelVerdict::of(&v, now));
    let kernel_counts: std::collections::BTreeMap<&str, u64> =
        UpstreamCounts::open_pinned(&read.pins.pin_dir)?
            .get(upstream)?
            .into_iter()
            .map(|(o, n)| (crate::engine::outcome_name(o), n))
            .collect();
    let agent = ask_agent(&read.socket(), Request::Inspect { upstream })
        .ok()
        .map(|line| serde_json::from_str::<Inspection>(&line))
        .transpose()?;
    if agent
        .as_ref()
        .is_some_and(|a| a.breaker.is_none() && a.service.is_none())
        && kernel_verdict.is_none()
        && kernel_counts.values().all(|n: &u64| *n == 0)
    {
        return Err(BadInput(format!(
            "unknown upstream {upstream}: no breaker, verdict or outcome"
        ))
        .into());
    }
    let out = InspectJson {
        source: if agent.is_some() { "agent" } else { "kernel" },
        upstream,
        agent,
        kernel_verdict,
        kernel_counts,
    };
    if read.output == Output::Json {
        return print_json(&out);
    }
    println!("upstream: {upstream}  (source: {})", out.source);
    if let Some(a) = &out.agent {
        if let Some(s) = &a.service {
            println!(
                "service: {} (re-route {}), {} endpoints:",
                s.state,
                if s.reroute { "on" } else { "off" },
                s.endpoints.len()
            );
            for e in &s.endpoints {
                let held = if e.client_holds > 0 {
                    format!(" ({} clients held)", e.client_holds)
                } else {
                    String::new()
                };
                println!(
                    "  {} {}{held}",
                    e.endpoint,
                    e.state.map_or("-".to_owned(), |st| st.to_string())
                );
            }
        }
        for service in &a.behind {
            println!("endpoint of service: {service}");
        }
        if let Some(b) = &a.breaker {
            println!("state: {} for {}", b.state, secs(b.since_seconds));
            if let Some(g) = &b.group {
                println!("group: {g}");
            }
            match (b.window_failures, b.window_calls) {
                (Some(f), Some(c)) => println!("window: {f} failures in {c} calls"),
                _ => println!("consecutive failures: {}", b.consecutive_failures),
            }
            if let Some(n) = b.next_probe_seconds {
                println!("next probe in: {}", secs(n));
            }
        }
        if let Some(p) = &a.policy {
            println!("policy: {p}");
        }
        if !a.witnesses.is_empty() {
            println!("clients lately (witnesses):");
            for w in &a.witnesses {
                let ago = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{} ago", secs(s)));
                println!(
                    "  {} {}: last failure {}, last success {}",
                    w.client,
                    w.client_path.as_deref().unwrap_or("?"),
                    ago(w.failure_seconds_ago),
                    ago(w.success_seconds_ago)
                );
            }
        }
        for h in &a.client_holds {
            println!(
                "client held on its own: {} {} for {}",
                h.client,
                h.client_path.as_deref().unwrap_or("?"),
                secs(h.seconds_left)
            );
        }
        if !a.recent_transitions.is_empty() {
            println!("recent transitions:");
            for e in &a.recent_transitions {
                let scope = match (&e.client_path, e.client) {
                    (Some(path), _) => format!(" (client {path})"),
                    (None, Some(id)) => format!(" (client {id})"),
                    (None, None) => String::new(),
                };
                println!("  {} → {}{scope}: {}", e.from, e.to, e.reason);
            }
        }
    }
    match &out.kernel_verdict {
        Some(k) => println!(
            "kernel verdict: {} (probes {}/{}, lease {})",
            k.state,
            k.probes_admitted,
            k.probe_budget,
            secs(k.lease_left_seconds)
        ),
        None => println!("kernel verdict: none (admitting)"),
    }
    let counts: Vec<String> = out
        .kernel_counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("kernel counters: {}", counts.join(" "));
    Ok(())
}

pub(super) fn events(follow: bool, read: &ReadArgs) -> anyhow::Result<()> {
    let socket = read.socket();
    let request = if follow {
        Request::Events
    } else {
        Request::Recent
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut lines = control::request(&socket, &request).await?;
            let mut stdout = std::io::stdout();
            while let Some(line) = lines.next_line().await? {
                if read.output == Output::Json {
                    writeln!(stdout, "{line}")?;
                } else if let Ok(e) = serde_json::from_str::<control::Event>(&line) {
                    writeln!(
                        stdout,
                        "{}  {}  {} → {}  {}",
                        secs(e.at_seconds),
                        e.upstream,
                        e.from,
                        e.to,
                        e.reason
                    )?;
                }
                stdout.flush()?;
            }
            Ok(())
        })
}
