//! Developer tasks: `cargo xtask setup | test | demo | bench | vm-test`.

mod demo;
mod setup;
mod vm;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "circuit's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and mount what building and running circuit needs (idempotent).
    Setup,
    /// Set up, then run every test: unit, kernel (BPF_PROG_TEST_RUN) and end-to-end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Set up, then run the agent in a two-namespace sandbox and watch a breaker trip and heal.
    Demo,
    /// Set up, then measure circuit against baselines measured in the same run; prints a
    /// markdown table and writes target/bench/results.json.
    Bench {
        /// A short run (fewer repetitions), for a quick look.
        #[arg(long)]
        quick: bool,
    },
    /// Set up, then run the kernel-facing suites (BPF_PROG_TEST_RUN fixtures, end to end)
    /// inside VMs booting Debian's kernels, and print a kernel × suite table.
    VmTest(vm::Options),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Test { cargo_args } => setup::setup().and_then(|()| test(&cargo_args)),
        Task::Demo => setup::setup().and_then(|()| demo::run(&build_agent()?)),
        Task::Bench { quick } => setup::setup().and_then(|()| bench(quick)),
        Task::VmTest(options) => setup::setup().and_then(|()| vm::vm_test(&options)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    cmd
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Builds the agent binary (with its kernel programs) in `profile` and returns its path.
fn build_agent_in(profile: &str) -> anyhow::Result<PathBuf> {
    let mut args = vec![
        "build",
        "--package",
        "circuit-agent",
        "--bin",
        "circuit-agent",
    ];
    if profile == "release" {
        args.push("--release");
    }
    run(cargo(&args))?;
    Ok(target_dir().join(profile).join("circuit-agent"))
}

/// The debug build: what the tests and the demo run.
fn build_agent() -> anyhow::Result<PathBuf> {
    build_agent_in("debug")
}

/// The release build, as deployed: what the benchmarks measure.
fn build_release_agent() -> anyhow::Result<PathBuf> {
    build_agent_in("release")
}

fn test(cargo_args: &[String]) -> anyhow::Result<()> {
    circuit_tests::require_root()?;
    let agent = build_agent()?;
    // Default members: the eBPF crate only builds for the BPF target (via the agent).
    let mut cmd = cargo(&["test", "--no-fail-fast"]);
    cmd.args(cargo_args).env("CIRCUIT_AGENT_BIN", &agent);
    let before = our_namespaces()?;
    let result = run(cmd);
    // Every test cleans up after itself; a namespace left behind is a bug worth failing on.
    // (Ones that existed before, e.g. a demo running beside the tests, are not ours.)
    let leaked: Vec<String> = our_namespaces()?
        .into_iter()
        .filter(|ns| !before.contains(ns))
        .collect();
    if !leaked.is_empty() {
        bail!("tests leaked network namespaces: {}", leaked.join(", "));
    }
    result
}

/// Network namespaces named with the tests' and demo's prefix.
fn our_namespaces() -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("cannot run `ip netns list`")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(circuit_tests::NAME_PREFIX))
        .map(str::to_owned)
        .collect())
}

/// The benchmark binaries (in tests/benches), each writing its figures as JSON.
const BENCHES: [&str; 4] = ["dataplane", "engine", "system", "services"];

fn bench(quick: bool) -> anyhow::Result<()> {
    circuit_tests::require_root()?;
    setup::bench_peers()?;
    let agent = build_release_agent()?;
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).context("cannot create target/bench")?;
    let mut all = Vec::new();
    for name in BENCHES {
        let json = dir.join(format!("{name}.json"));
        let mut cmd = cargo(&["bench", "--package", "circuit-tests", "--bench", name, "--"]);
        if quick {
            cmd.arg("--quick");
        }
        cmd.env("CIRCUIT_BENCH_JSON", &json)
            .env("CIRCUIT_AGENT_BIN", &agent);
        run(cmd)?;
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("{name} wrote no {}", json.display()))?;
        let inner = text
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim();
        if !inner.is_empty() {
            all.push(inner.to_owned());
        }
    }
    let results = dir.join("results.json");
    std::fs::write(&results, format!("[\n{}\n]\n", all.join(",\n")))
        .with_context(|| format!("cannot write {}", results.display()))?;
    println!("\nresults: {}", results.display());
    Ok(())
}
