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
