//! What every benchmark binary prints and writes: a markdown table of figures next to their
//! baselines, and the same figures as JSON for `cargo xtask bench` to collect. Included with
//! `#[path = "report.rs"] mod report;` (each bench is its own crate).

use std::path::Path;

/// One figure next to its baseline measured in the same run.
pub struct Row {
    pub name: &'static str,
    pub value: f64,
    pub baseline: f64,
    pub unit: &'static str,
    /// Largest acceptable `value / baseline`; `None`: reported, not judged.
    pub target: Option<f64>,
}

#[allow(dead_code)] // each bench is its own crate and uses a part of this file
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Prints `rows` as a markdown table whose first three column headers are `columns` (what
/// is measured, the figure, the baseline), and writes them as a JSON array of
/// `{"group":group,"name","value","unit","baseline","ratio","target"}` objects to
/// $CIRCUIT_BENCH_JSON (default target/bench/<group>.json).
pub fn publish(group: &str, columns: [&str; 3], rows: &[Row]) {
    let [what, value, baseline] = columns;
    println!("| {what} | {value} | {baseline} | unit | ratio | target |");
    println!("|---|---:|---:|---|---:|---|");
    let mut json = Vec::new();
    for r in rows {
        let ratio = r.value / r.baseline;
        let target = r.target.map_or("report".to_owned(), |t| {
            format!("≤ {t}× {}", if ratio <= t { "ok" } else { "MISSED" })
        });
        println!(
            "| {} | {:.1} | {:.1} | {} | {:.2}× | {} |",
            r.name, r.value, r.baseline, r.unit, ratio, target
        );
        json.push(format!(
            r#"{{"group":"{group}","name":"{}","value":{:.1},"unit":"{}","baseline":{:.1},"ratio":{:.3},"target":{}}}"#,
            r.name,
            r.value,
            r.unit,
            r.baseline,
            ratio,
            r.target.map_or("null".to_owned(), |t| t.to_string())
        ));
    }
    let out = std::env::var("CIRCUIT_BENCH_JSON")
        .unwrap_or_else(|_| format!("target/bench/{group}.json"));
    if let Some(dir) = Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, format!("[{}]\n", json.join(",\n"))).unwrap();
}

/// Where a [`Compared`] row's baseline comes from.
#[allow(dead_code)] // each bench is its own crate and uses a part of this file
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Measured in the same run, on the same machine.
    SameRun,
    /// A documented figure (another system's configured constant), shown for context: not
    /// a measurement and not judged.
    Documented,
}

/// One figure next to a baseline that is named per row, for benches whose rows compare
/// against different baselines.
#[allow(dead_code)]
pub struct Compared {
    pub name: String,
    pub value: f64,
    /// What the baseline is, e.g. "kernel RST from a closed port, p50".
    pub baseline_name: String,
    pub baseline: f64,
    pub source: Source,
    pub unit: &'static str,
    /// Largest acceptable `value / baseline`; `None`: reported, not judged.
    pub target: Option<f64>,
}

/// The `q`-quantile (0 < q ≤ 1) by nearest rank: the smallest sample with at least a
/// fraction `q` of the samples at or below it.
#[allow(dead_code)]
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    assert!(!samples.is_empty(), "percentile of no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Like [`publish`], for [`Compared`] rows: the table has a column naming each row's
/// baseline, documented (not measured) baselines are marked as such, and the JSON objects
/// carry `baseline_name` and `baseline_source` ("same run" or "documented") too. A ratio
/// over a zero baseline is shown as "-" (null in the JSON).
#[allow(dead_code)]
pub fn publish_compared(group: &str, rows: &[Compared]) {
    println!("| measurement | circuit | baseline | baseline is | unit | ratio | target |");
    println!("|---|---:|---:|---|---|---:|---|");
    let mut json = Vec::new();
    for r in rows {
        let ratio = (r.baseline != 0.0).then(|| r.value / r.baseline);
        let (source, baseline_name) = match r.source {
            Source::SameRun => ("same run", r.baseline_name.clone()),
            Source::Documented => (
                "documented",
                format!("{} (documented figure, not measured)", r.baseline_name),
            ),
        };
        let target = match (r.target, ratio) {
            (Some(t), Some(ratio)) => {
                format!("≤ {t}× {}", if ratio <= t { "ok" } else { "MISSED" })
            }
            _ => "report".to_owned(),
        };
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            r.name,
            r.value,
            r.baseline,
            baseline_name,
            r.unit,
            ratio.map_or("-".to_owned(), |ratio| format!("{}×", two_digits(ratio))),
            target
        );
        json.push(
            serde_json::json!({
                "group": group,
                "name": r.name,
                "value": round1(r.value),
                "unit": r.unit,
                "baseline": round1(r.baseline),
                "baseline_name": r.baseline_name,
                "baseline_source": source,
                "ratio": ratio,
                "target": r.target,
            })
            .to_string(),
        );
    }
    let out = std::env::var("CIRCUIT_BENCH_JSON")
        .unwrap_or_else(|_| format!("target/bench/{group}.json"));
    if let Some(dir) = Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, format!("[{}]\n", json.join(",\n"))).unwrap();
}

#[allow(dead_code)]
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Two decimals, or two significant digits for ratios below 0.01 (0.000051, not 0.00).
#[allow(dead_code)]
fn two_digits(x: f64) -> String {
    if x == 0.0 || x.abs() >= 0.01 || !x.is_finite() {
        return format!("{x:.2}");
    }
    let decimals = (1 - x.abs().log10().floor() as i32).max(2) as usize;
    format!("{x:.decimals$}")
}

/// The agent a benchmark measures: `$CIRCUIT_AGENT_BIN` (`cargo xtask bench` sets it to the
/// release build it makes), else the debug build of `cargo build` (target/debug/circuit-agent,
/// next to this bench's target/release), else `circuit_tests::agent_binary()` (the binary of
/// this bench's own profile).
// Only the benches that start an agent call it.
#[allow(dead_code)]
pub fn agent_binary() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    if let Some(path) = std::env::var_os("CIRCUIT_AGENT_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().context("cannot locate the bench executable")?;
    // target/release/deps/<bench>-… → target/debug/circuit-agent
    if let Some(target) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
        let debug = target.join("debug").join("circuit-agent");
        if debug.exists() {
            return Ok(debug);
        }
    }
    circuit_tests::agent_binary()
}
