//! `cargo xtask setup`: makes a fresh machine ready to build, test and run circuit.
//! Idempotent, and quick when everything is already there.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

/// The toolchain versions (toolchain.env at the repository root, which the Dockerfile
/// sources too).
const TOOLCHAIN: &str = include_str!("../../toolchain.env");

/// `KEY`'s value in toolchain.env.
fn toolchain(key: &str) -> &'static str {
    circuit_tests::toolchain_env(TOOLCHAIN)
        .find_map(|(k, value)| (k == key).then_some(value))
        .unwrap_or_else(|| panic!("toolchain.env has no {key}"))
}

fn step(what: &str, state: &str) {
    println!("[setup] {what}: {state}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    step(what, &format!("running {cmd:?}"));
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what}: {cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn setup() -> anyhow::Result<()> {
    circuit_tests::require_root()
        .context("setup installs packages and mounts kernel filesystems")?;
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    mounts()?;
    kubectl();
    step("ready", "all set");
    Ok(())
}

/// LLVM 22 (bpf-linker links libLLVM; it must match the nightly's LLVM), iproute2 (network
/// namespaces for the tests and the demo), nftables (the firewall baselines of the system
/// benchmark: `reject with tcp reset` and `drop` inside a sandbox namespace; the Service
/// topology's DNAT), conntrack (which endpoint a Service connection reached), and Go with
/// Sprig and YAML (the Helm chart is rendered by Go's text/template with Helm's function
/// library, as helm does, since no registry here ships helm itself).
fn apt_packages() -> anyhow::Result<()> {
    let llvm = toolchain("LLVM_VERSION");
    let llvm_package = format!("llvm-{llvm}-dev");
    let libllvm = format!("/usr/lib/llvm-{llvm}/lib/libLLVM.so");
    let wanted = [
        (llvm_package.as_str(), libllvm.as_str()),
        ("iproute2", "/usr/sbin/ip"),
        ("nftables", "/usr/sbin/nft"),
        ("conntrack", "/usr/sbin/conntrack"),
        ("golang-go", "/usr/bin/go"),
        (
            "golang-github-masterminds-sprig-dev",
            "/usr/share/gocode/src/github.com/Masterminds/sprig/functions.go",
        ),
        (
            "golang-gopkg-yaml.v3-dev",
            "/usr/share/gocode/src/gopkg.in/yaml.v3/yaml.go",
        ),
    ];
    let missing = missing_packages(&wanted);
    if missing.is_empty() {
        step(
            "apt packages",
            &format!("{llvm_package}, iproute2, nftables, conntrack, Go with Sprig present"),
        );
        return Ok(());
    }
    apt_install("apt packages", &missing)
}

/// The packages of `wanted` (package, a file it installs) whose file is absent.
fn missing_packages<'a>(wanted: &[(&'a str, &str)]) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect()
}

fn apt_install(what: &str, packages: &[&str]) -> anyhow::Result<()> {
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run(
        what,
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The peers `cargo xtask bench` measures circuit against (the services bench): HAProxy
/// and nginx from Debian, and wrk. Their packages would start system services on port 80;
/// Debian's policy-rc.d hook (exit 101: "action forbidden") keeps them from starting while
/// they are installed, and the benchmark runs its own instances in its namespaces.
pub fn bench_peers() -> anyhow::Result<()> {
    let wanted = [
        ("haproxy", "/usr/sbin/haproxy"),
        ("nginx-light", "/usr/sbin/nginx"),
        ("wrk", "/usr/bin/wrk"),
    ];
    let missing = missing_packages(&wanted);
    if missing.is_empty() {
        step("bench peers", "haproxy, nginx, wrk present");
        return Ok(());
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask bench: no service starts\nexit 101\n",
        )
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
        })
        .context("cannot write /usr/sbin/policy-rc.d")?;
    }
    let installed = apt_install("bench peers", &missing);
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    installed
}

/// The eBPF crate is built with the nightly toolchain and `-Z build-std=core`.
fn nightly_rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup with a nightly toolchain is required (rustup toolchain install nightly)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src", "installed");
        return Ok(());
    }
    run(
        "nightly rust-src",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

/// bpf-linker built against the nightly's LLVM: the first llvm-config on PATH may be another
/// version, so LLVM_PREFIX points the build at the right one.
fn bpf_linker() -> anyhow::Result<()> {
    let (wanted, llvm) = (toolchain("BPF_LINKER_VERSION"), toolchain("LLVM_VERSION"));
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(wanted) {
        step("bpf-linker", &format!("{} present", version.trim()));
        return Ok(());
    }
    run(
        "bpf-linker",
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{wanted}"),
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")),
    )
}

/// kubectl builds the kustomize bundle in the deployment tests (`kubectl kustomize`). It
/// comes with this machine's image; no registry reachable here ships it, so setup only says
/// whether it is there.
fn kubectl() {
    match output(Command::new("kubectl").args(["version", "--client"])) {
        Some(_) => step("kubectl", "present"),
        None => step(
            "kubectl",
            "MISSING: the deployment tests build deploy/kubernetes with `kubectl kustomize` and fail without it",
        ),
    }
}

/// bpffs for pinned maps, tracefs for the tracepoints.
fn mounts() -> anyhow::Result<()> {
    for (fstype, target) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        if succeeds(Command::new("mountpoint").args(["-q", target])) {
            step(fstype, &format!("mounted on {target}"));
            continue;
        }
        run(
            fstype,
            Command::new("mount").args(["-t", fstype, fstype, target]),
        )?;
    }
    Ok(())
}
