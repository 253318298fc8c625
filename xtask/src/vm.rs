//! `cargo xtask vm-test`: the kernel-facing test suites on the kernels users run, each booted
//! in a VM that shares this machine's files.
//!
//! - Kernels are Debian's packages, fetched with apt from a private package list (nothing is
//!   installed on this machine): bullseye's 5.10, bookworm's 6.1 (the newest, and an older
//!   point release pinned because its verifier is stricter), trixie's 6.12. They are
//!   unpacked under target/vm, outside /tmp, which the guest does not share.
//! - Each boots with virtme-ng under qemu: KVM when it works, TCG otherwise (nested KVM hangs
//!   on some cloud VMs, so a short boot decides rather than the presence of /dev/kvm).
//! - The agent and the test binaries are built once, here; inside, the suites run one after
//!   the other, writing logs, exit codes and timings to a shared directory.
//! - A kernel × suite table sums it up (markdown, so it can go into notes as is).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{build_agent, cargo, run, target_dir, workspace_root};

/// A kernel of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// What `--kernel` takes.
    pub label: &'static str,
    /// The Debian suite it comes from.
    suite: &'static str,
    pick: Pick,
}

#[derive(Clone, Copy, Debug)]
enum Pick {
    /// The newest `linux-image-{prefix}{N}{suffix}` in the lists.
    Newest {
        prefix: &'static str,
        suffix: &'static str,
    },
    /// This package, whatever is newer.
    Exact(&'static str),
}

pub const KERNELS: [Kernel; 4] = [
    Kernel {
        label: "5.10",
        suite: "bullseye",
        pick: Pick::Newest {
            prefix: "5.10.0-",
            suffix: "-amd64",
        },
    },
    Kernel {
        label: "6.1",
        suite: "bookworm",
        pick: Pick::Newest {
            prefix: "6.1.0-",
            suffix: "-amd64",
        },
    },
    // 6.1.176: its verifier rejected a stack read that newer 6.1 releases accept; kept to
    // hold the programs to the stricter one.
    Kernel {
        label: "6.1-old",
        suite: "bookworm",
        pick: Pick::Exact("linux-image-6.1.0-50-amd64"),
    },
    Kernel {
        label: "6.12",
        suite: "trixie",
        pick: Pick::Newest {
            prefix: "6.12.",
            suffix: "+deb13-amd64",
        },
    },
];

/// The suites that need a kernel: BPF_PROG_TEST_RUN fixtures and the end-to-end tests.
pub const SUITES: [&str; 9] = [
    "xdp_fixtures",
    "breaker_e2e",
    "dataplane_e2e",
    "config_e2e",
    "cli_e2e",
    "recovery_e2e",
    "witness_e2e",
    "pins",
    "service_e2e",
];

/// Modules the tests need that Debian builds as modules (the guest does not autoload
/// them all: `ip link add type veth` inside a namespace did not).
const MODULES: [&str; 12] = [
    "veth",
    "sch_htb",
    "sch_netem",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_reject_inet",
    "tcp_diag",
    // service_e2e: kube-proxy's DNAT in nftables (conntrack loaded before the agent starts,
    // so its BTF is there to read).
    "nf_conntrack",
    "nf_nat",
    "nft_chain_nat",
    "nft_numgen",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a short boot with it works, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Kernels: 5.10, 6.1, 6.1-old, 6.12 or all (repeatable, or comma-separated).
    #[arg(long = "kernel", value_delimiter = ',', default_value = "all")]
    pub kernels: Vec<String>,
    /// Suites to run (default: all kernel-facing ones).
    #[arg(long = "suite", value_delimiter = ',')]
    pub suites: Vec<String>,
    /// Only the tests whose names contain this (libtest's filter), in every suite.
    #[arg(long)]
    pub filter: Option<String>,
    /// KVM or emulation (TCG); `auto` tries KVM with a short boot first.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Test threads inside each VM.
    #[arg(long, default_value_t = 2)]
    pub test_threads: u32,
    /// Limit per VM: boot, doctor and every suite.
    #[arg(long, default_value = "40m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[arg(long, default_value = "4G")]
    pub memory: String,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
}

/// Parses `--kernel` values: labels or `all`.
pub fn parse_kernels(values: &[String]) -> anyhow::Result<Vec<Kernel>> {
    let mut out: Vec<Kernel> = Vec::new();
    for value in values {
        if value == "all" {
            out.extend(KERNELS);
            continue;
        }
        let kernel = KERNELS.iter().find(|k| k.label == value).with_context(|| {
            let labels: Vec<&str> = KERNELS.iter().map(|k| k.label).collect();
            format!(
                "unknown kernel {value:?}: one of {}, or all",
                labels.join(", ")
            )
        })?;
        out.push(*kernel);
    }
    out.dedup_by_key(|k| k.label);
    Ok(out)
}

fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

fn say(what: impl AsRef<str>) {
    println!("[vm-test] {}", what.as_ref());
}

pub fn vm_test(options: &Options) -> anyhow::Result<()> {
    // Bad input fails before anything is installed or fetched.
    let kernels = parse_kernels(&options.kernels)?;
    let suites: Vec<String> = if options.suites.is_empty() {
        SUITES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        options.suites.clone()
    };
    circuit_tests::require_root()?;
    let started = Instant::now();
    tools()?;
    let apt = Apt::new(&vm_dir().join("apt"))?;
    apt.update()?;
    let mut images = Vec::new();
    for kernel in &kernels {
        images.push((kernel, apt.fetch(kernel)?));
    }
    let agent = build_agent()?;
    let binaries = build_suites(&suites)?;
    let accel = match options.accel {
        Accel::Auto => detect_accel(&images[0].1, &options.memory),
        other => other,
    };
    say(format!(
        "accelerator: {}",
        if accel == Accel::Kvm {
            "KVM"
        } else {
            "TCG (emulation)"
        }
    ));
    let mut results = Vec::new();
    for (kernel, image) in &images {
        say(format!("{}: booting {}", kernel.label, image.package));
        let result = run_vm(kernel, image, &agent, &binaries, accel, options)?;
        println!("{}", result.summary());
        results.push(result);
    }
    println!("\n{}", table(&results, &suites));
    say(format!(
        "done in {} ({})",
        minutes(started.elapsed()),
        if accel == Accel::Kvm { "KVM" } else { "TCG" }
    ));
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel)
        .collect();
    if !failed.is_empty() {
        bail!(
            "failed on {} (logs in {})",
            failed.join(", "),
            vm_dir().join("run").display()
        );
    }
    Ok(())
}

/// qemu, busybox (virtme-ng's initramfs) and virtme-ng, installed when missing.
fn tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
        ("busybox-static", "/bin/busybox"),
        ("kmod", "/usr/sbin/modprobe"),
    ]
    .iter()
    .filter(|(_, file)| !Path::new(file).exists())
    .map(|(pkg, _)| *pkg)
    .collect();
    if !missing.is_empty() {
        say(format!("installing {}", missing.join(" ")));
        let mut cmd = apt_get();
        cmd.args(["install", "-y", "-q"]).args(&missing);
        run(cmd)?;
    }
    if !has_program("vng") {
        say("installing virtme-ng (pip)");
        let pip = |extra: &[&str]| {
            Command::new("python3")
                .args(["-m", "pip", "install", "-q", "virtme-ng"])
                .args(extra)
                .status()
                .is_ok_and(|s| s.success())
        };
        // Debian's Python refuses system-wide pip installs unless told (PEP 668).
        if !pip(&[]) && !pip(&["--break-system-packages"]) {
            bail!("cannot install virtme-ng with pip");
        }
        if !has_program("vng") {
            bail!("virtme-ng is installed but `vng` is not on PATH");
        }
    }
    Ok(())
}

fn has_program(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// apt with its own package lists, cache and no installed-package state: downloads only.
struct Apt {
    dir: PathBuf,
}

/// A kernel package, unpacked.
struct Image {
    package: String,
    /// The kernel image (boot/vmlinuz-*).
    vmlinuz: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        for sub in ["lists/partial", "archives/partial", "debs", "kernels"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let (debian, security) = archives();
        let mut list = String::new();
        for suite in ["bullseye", "bookworm", "trixie"] {
            writeln!(list, "deb [trusted=yes] {debian} {suite} main")?;
            writeln!(list, "deb [trusted=yes] {security} {suite}-security main")?;
        }
        fs::write(dir.join("sources.list"), list)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = if program == "apt-get" {
            apt_get()
        } else {
            Command::new(program)
        };
        let d = &self.dir;
        for (key, value) in [
            ("Dir::Etc::sourcelist", d.join("sources.list")),
            ("Dir::Etc::sourceparts", PathBuf::from("/dev/null")),
            ("Dir::State::Lists", d.join("lists")),
            ("Dir::Cache::Archives", d.join("archives")),
            ("Dir::State::status", PathBuf::from("/dev/null")),
            // Root downloads into root's directories; apt's sandbox user could not write them.
            ("APT::Sandbox::User", PathBuf::from("root")),
        ] {
            cmd.arg("-o").arg(format!("{key}={}", value.display()));
        }
        cmd
    }

    /// Refreshes the lists when older than a day (packages move on with security updates).
    fn update(&self) -> anyhow::Result<()> {
        let stamp = self.dir.join("lists/updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                t.elapsed()
                    .is_ok_and(|age| age < Duration::from_secs(86_400))
            });
        if fresh {
            return Ok(());
        }
        say("apt-get update (private lists for bullseye, bookworm, trixie)");
        let mut cmd = self.command("apt-get");
        cmd.args(["update", "-q"]).stdout(Stdio::null());
        run(cmd)?;
        fs::write(&stamp, "")?;
        Ok(())
    }

    fn resolve(&self, kernel: &Kernel) -> anyhow::Result<String> {
        let (prefix, suffix) = match kernel.pick {
            Pick::Exact(package) => return Ok(package.to_owned()),
            Pick::Newest { prefix, suffix } => (prefix, suffix),
        };
        let out = self
            .command("apt-cache")
            .args(["pkgnames", "linux-image-"])
            .output()
            .context("cannot run apt-cache")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|name| {
                let n = name
                    .strip_prefix("linux-image-")?
                    .strip_prefix(prefix)?
                    .strip_suffix(suffix)?;
                Some((n.parse::<u32>().ok()?, name.to_owned()))
            })
            .max()
            .map(|(_, name)| name)
            .with_context(|| {
                format!(
                    "no linux-image-{prefix}N{suffix} in Debian {} (archive lists in {})",
                    kernel.suite,
                    self.dir.join("lists").display()
                )
            })
    }

    /// Downloads and unpacks the kernel's package (once).
    fn fetch(&self, kernel: &Kernel) -> anyhow::Result<Image> {
        let package = self.resolve(kernel)?;
        let root = self.dir.join("kernels").join(&package);
        if find_vmlinuz(&root).is_none() {
            let debs = self.dir.join("debs");
            let deb = |debs: &Path| -> Option<PathBuf> {
                fs::read_dir(debs)
                    .ok()?
                    .filter_map(|e| Some(e.ok()?.path()))
                    .find(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&format!("{package}_")))
                    })
            };
            if deb(&debs).is_none() {
                say(format!("{}: downloading {package}", kernel.label));
                let mut cmd = self.command("apt-get");
                cmd.args(["download", "-q", &package]).current_dir(&debs);
                run(cmd)?;
            }
            let deb = deb(&debs).with_context(|| format!("apt downloaded no {package}"))?;
            let partial = root.with_extension("partial");
            let _ = fs::remove_dir_all(&partial);
            fs::create_dir_all(&partial)?;
            let mut cmd = Command::new("dpkg");
            cmd.arg("-x").arg(&deb).arg(&partial);
            run(cmd)?;
            // trixie ships modules under usr/lib; virtme-ng looks in lib/modules.
            if !partial.join("lib").exists() && partial.join("usr/lib/modules").exists() {
                std::os::unix::fs::symlink("usr/lib", partial.join("lib"))?;
            }
            let _ = fs::remove_dir_all(&root);
            fs::rename(&partial, &root)?;
        }
        let vmlinuz =
            find_vmlinuz(&root).with_context(|| format!("no boot/vmlinuz-* in {package}"))?;
        Ok(Image { package, vmlinuz })
    }
}

fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root.join("boot"))
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// This machine's Debian archive and security archive (a mirror or snapshot may be
/// configured), else deb.debian.org.
fn archives() -> (String, String) {
    let mut uris = Vec::new();
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sources") {
                let text = fs::read_to_string(&path).unwrap_or_default();
                for line in text.lines() {
                    if let Some(rest) = line.trim().strip_prefix("URIs:") {
                        uris.extend(rest.split_whitespace().map(str::to_owned));
                    }
                }
            }
        }
    }
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for line in list
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("deb "))
    {
        let uri = line
            .split_whitespace()
            .skip(1)
            .find(|w| !w.starts_with('['));
        uris.extend(uri.map(str::to_owned));
    }
    let debian = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let security = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian-security"))
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian-security".to_owned());
    (debian, security)
}

/// Builds the suites' test binaries once and returns name → path.
fn build_suites(suites: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut cmd = cargo(&[
        "test",
        "--package",
        "circuit-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for suite in suites {
        cmd.args(["--test", suite]);
    }
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().context("cannot run cargo test --no-run")?;
    let mut binaries = BTreeMap::new();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if suites.iter().any(|s| s == name) {
            binaries.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the test binaries failed ({status})");
    }
    for suite in suites {
        if !binaries.contains_key(suite) {
            bail!("cargo built no test binary for {suite}");
        }
    }
    Ok(binaries)
}

/// Runs `cmd` in its own process group, killed whole after `timeout` (vng leaves qemu
/// behind otherwise). None: timed out.
fn run_for(mut cmd: Command, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            // SAFETY: plain syscall; the group is the child's own (process_group(0)).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn vng(vmlinuz: &Path, accel: Accel, memory: &str, cpus: u32) -> Command {
    let mut cmd = Command::new("vng");
    cmd.arg("-r")
        .arg(vmlinuz)
        .args(["--user", "root", "--memory", memory, "--cpus"])
        .arg(cpus.to_string())
        .arg("-v");
    if accel != Accel::Kvm {
        cmd.arg("--disable-kvm");
    }
    cmd
}

/// Boots with KVM and runs `true`: KVM works if that ends well and quickly (a TCG boot takes
/// about 10 s; a nested KVM that hangs would take forever).
fn detect_accel(image: &Image, memory: &str) -> Accel {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    say("checking whether KVM works here (a short boot)");
    let mut cmd = vng(&image.vmlinuz, Accel::Kvm, memory, 1);
    cmd.args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    match run_for(cmd, Duration::from_secs(40)) {
        Ok(Some(status)) if status.success() => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

/// One suite's result in one VM.
#[derive(Clone, Debug)]
struct SuiteResult {
    /// None: did not run (the VM died or timed out before).
    exit: Option<i32>,
    passed: u32,
    failed: u32,
    seconds: f64,
}

struct VmResult {
    kernel: &'static str,
    /// `uname -r` inside, and the version the doctor read.
    release: String,
    doctor: Option<i32>,
    /// The doctor's verdict line per enforcement point, e.g. "cgroup degraded".
    capabilities: String,
    suites: BTreeMap<String, SuiteResult>,
    boot_to_end: Duration,
    timed_out: bool,
    dir: PathBuf,
}

impl VmResult {
    fn passed(&self) -> bool {
        !self.timed_out && self.doctor == Some(0) && self.suites.values().all(|s| s.exit == Some(0))
    }

    fn summary(&self) -> String {
        let mut out = format!(
            "[vm-test] {} ({}): {} in {}{}",
            self.kernel,
            self.release,
            if self.passed() { "passed" } else { "FAILED" },
            minutes(self.boot_to_end),
            if self.timed_out { " (timed out)" } else { "" }
        );
        for (name, s) in &self.suites {
            if s.exit != Some(0) {
                let _ = write!(
                    out,
                    "\n           {name}: {} (log {})",
                    cell(s),
                    self.dir.join(format!("{name}.log")).display()
                );
            }
        }
        out
    }
}

fn run_vm(
    kernel: &Kernel,
    image: &Image,
    agent: &Path,
    binaries: &BTreeMap<String, PathBuf>,
    accel: Accel,
    options: &Options,
) -> anyhow::Result<VmResult> {
    let dir = vm_dir().join("run").join(kernel.label);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let script = dir.join("guest.sh");
    fs::write(
        &script,
        guest_script(
            &dir,
            agent,
            binaries,
            options.test_threads,
            options.filter.as_deref(),
            if accel == Accel::Kvm { 2 } else { 6 },
        ),
    )?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let console = fs::File::create(dir.join("console.log"))?;
    let mut cmd = vng(&image.vmlinuz, accel, &options.memory, options.cpus);
    cmd.arg("--rwdir")
        .arg(&dir)
        .arg("--cwd")
        .arg(workspace_root())
        .arg("--")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    let started = Instant::now();
    let status = run_for(cmd, options.timeout)?;
    let boot_to_end = started.elapsed();
    let read = |name: &str| fs::read_to_string(dir.join(name)).ok();
    let code = |name: &str| read(name).and_then(|s| s.trim().parse::<i32>().ok());
    let mut suites = BTreeMap::new();
    for name in binaries.keys() {
        let log = read(&format!("{name}.log")).unwrap_or_default();
        let (passed, failed) = test_counts(&log);
        suites.insert(
            name.clone(),
            SuiteResult {
                exit: code(&format!("{name}.rc")),
                passed,
                failed,
                seconds: read(&format!("{name}.seconds"))
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0.0),
            },
        );
    }
    let doctor = read("doctor.txt").unwrap_or_default();
    let capabilities = doctor_capabilities(&doctor);
    let version = doctor
        .lines()
        .find(|l| l.starts_with("kernel "))
        .and_then(|l| l.split("(Linux ").nth(1))
        .map(|v| v.trim_end_matches(')').to_owned());
    let release = read("uname").map(|s| s.trim().to_owned());
    Ok(VmResult {
        kernel: kernel.label,
        release: match (version, release) {
            (Some(v), _) => v,
            (None, Some(r)) => r,
            (None, None) => format!("did not boot: see {}", dir.join("console.log").display()),
        },
        doctor: code("doctor.rc"),
        capabilities,
        suites,
        boot_to_end,
        timed_out: status.is_none(),
        dir,
    })
}

/// The script the guest runs: modules, the doctor, then each suite, each writing its log,
/// exit code and duration next to the script.
fn guest_script(
    dir: &Path,
    agent: &Path,
    binaries: &BTreeMap<String, PathBuf>,
    test_threads: u32,
    filter: Option<&str>,
    wait_scale: u32,
) -> String {
    let q = |p: &Path| format!("'{}'", p.display());
    let mut s =
        String::from("#!/bin/sh\n# Written by `cargo xtask vm-test`; runs inside the VM.\n");
    let _ = writeln!(s, "OUT={}", q(dir));
    let _ = writeln!(s, "uname -r > \"$OUT/uname\"");
    let _ = writeln!(
        s,
        "for m in {}; do modprobe -q \"$m\" 2>/dev/null; done",
        MODULES.join(" ")
    );
    let _ = writeln!(s, "export CIRCUIT_AGENT_BIN={}", q(agent));
    let _ = writeln!(s, "export RUST_BACKTRACE=1");
    // Under emulation everything is several times slower: the tests wait longer (see
    // circuit_tests::wait_scale), which only delays how a failure shows.
    let _ = writeln!(s, "export CIRCUIT_TEST_WAIT_SCALE={wait_scale}");
    let _ = writeln!(
        s,
        "\"$CIRCUIT_AGENT_BIN\" doctor > \"$OUT/doctor.txt\" 2>&1; echo $? > \"$OUT/doctor.rc\""
    );
    // libtest's filter, quoted for the shell (test names are identifiers).
    let filter = filter.map_or_else(String::new, |f| format!(" '{}'", f.replace('\'', "")));
    for (name, binary) in binaries {
        let _ = writeln!(s, "echo \"vm-test: {name}\"");
        let _ = writeln!(s, "start=$(date +%s.%N)");
        let _ = writeln!(
            s,
            "{}{filter} --test-threads={test_threads} > \"$OUT/{name}.log\" 2>&1; echo $? > \"$OUT/{name}.rc\"",
            q(binary)
        );
        let _ = writeln!(
            s,
            "echo \"$(date +%s.%N) $start\" | awk '{{print $1 - $2}}' > \"$OUT/{name}.seconds\""
        );
    }
    s.push_str("echo vm-test: done\n");
    s
}

/// Passed and failed counts from libtest's summary line.
fn test_counts(log: &str) -> (u32, u32) {
    let Some(line) = log.lines().rev().find(|l| l.starts_with("test result:")) else {
        return (0, 0);
    };
    let count = |word: &str| {
        line.split(';')
            .find(|part| part.trim_end().ends_with(word))
            .and_then(|part| part.split_whitespace().rev().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (count("passed"), count("failed"))
}

/// "cgroup degraded, xdp ok, tc degraded" from the doctor's last table.
fn doctor_capabilities(doctor: &str) -> String {
    let mut parts = Vec::new();
    let mut in_table = false;
    for line in doctor.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"CIRCUIT") {
            in_table = true;
            continue;
        }
        if in_table {
            match words.as_slice() {
                [name, status, ..] if *name != "outcomes" => parts.push(format!("{name} {status}")),
                [_, _, ..] => {}
                _ => break,
            }
        }
    }
    parts.join(", ")
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

fn cell(s: &SuiteResult) -> String {
    let time = minutes(Duration::from_secs_f64(s.seconds.max(0.0)));
    match s.exit {
        None => "not run".to_owned(),
        Some(0) => format!("ok {}/{} {time}", s.passed, s.passed + s.failed),
        Some(_) if s.passed + s.failed == 0 => format!("FAIL (no result) {time}"),
        Some(_) => format!("FAIL {}/{} {time}", s.passed, s.passed + s.failed),
    }
}

fn table(results: &[VmResult], suites: &[String]) -> String {
    let mut out = String::from("| kernel | enforcement (doctor) |");
    for s in suites {
        let _ = write!(out, " {s} |");
    }
    out.push_str(" VM total |\n|---|---|");
    for _ in suites {
        out.push_str("---|");
    }
    out.push_str("---|\n");
    for r in results {
        let _ = write!(
            out,
            "| {} ({}) | {} |",
            r.release,
            r.kernel,
            if r.doctor == Some(0) {
                r.capabilities.clone()
            } else {
                format!("doctor exit {:?}", r.doctor)
            }
        );
        for s in suites {
            let c = r.suites.get(s).map_or_else(|| "—".to_owned(), cell);
            let _ = write!(out, " {c} |");
        }
        let _ = writeln!(
            out,
            " {}{} |",
            minutes(r.boot_to_end),
            if r.timed_out { " (timed out)" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_parse_by_label_or_all() {
        let all = parse_kernels(&["all".to_owned()]).unwrap();
        assert_eq!(all.len(), KERNELS.len());
        let two = parse_kernels(&["5.10".to_owned(), "6.1-old".to_owned()]).unwrap();
        assert_eq!(
            two.iter().map(|k| k.label).collect::<Vec<_>>(),
            ["5.10", "6.1-old"]
        );
        let err = parse_kernels(&["4.19".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("6.12"), "{err}");
    }

    #[test]
    fn libtest_summaries_and_doctor_tables_are_read() {
        let log = "running 3 tests\n...\ntest result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.1s\n";
        assert_eq!(test_counts(log), (2, 1));
        assert_eq!(test_counts("no summary"), (0, 0));
        let doctor = " CIRCUIT   STATUS    DETAIL\n outcomes  degraded  x\n cgroup    degraded  EPERM\n xdp       ok\n tc        degraded  clsact\n\ncircuit can protect this node\n";
        assert_eq!(
            doctor_capabilities(doctor),
            "cgroup degraded, xdp ok, tc degraded"
        );
    }
}
