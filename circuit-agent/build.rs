//! Builds the kernel programs (circuit-ebpf) for bpfel-unknown-none with the nightly
//! toolchain, so the agent binary embeds the object it loads. `AYA_BUILD_SKIP=1` skips this
//! for userspace-only checks; `cargo xtask setup` installs what the build needs (nightly
//! rust-src, bpf-linker).
//!
//! The nested build is quiet: its output is kept and shown (as cargo warnings) only when it
//! fails. The eBPF crate's own lints run separately (`cargo clippy` for the BPF target, in
//! CI). This does what aya-build does, without forwarding every line of a successful build.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The binary target of circuit-ebpf: the object the agent embeds.
const OBJECT: &str = "circuit";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let object = out_dir.join(OBJECT);
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // An empty object: the agent still compiles, and refuses to attach, saying why.
        std::fs::write(&object, [])?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("circuit-agent has no parent directory")?;
    // The programs and the layouts they share with the agent.
    for dir in ["circuit-ebpf", "circuit-common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // The programs read kernel structures laid out for the architecture the agent runs on.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")?;
    build(&root.join("circuit-ebpf"), &arch, &out_dir, &object)
}

fn build(ebpf_dir: &Path, arch: &str, out_dir: &Path, object: &Path) -> anyhow::Result<()> {
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--quiet"])
        .args(["--package", "circuit-ebpf", "--bin", OBJECT, "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(ebpf_dir)
        // The programs' cfg, debug info for BTF, and BTF itself (bpf-linker).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler settings are not the nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    let output = cmd.output().with_context(|| {
        format!("cannot run {cmd:?} (is rustup installed? `cargo xtask setup`)")
    })?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&output.stdout).lines())
        {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the kernel programs failed ({}); `cargo xtask setup` installs what they need",
            output.status
        );
    }
    let built = target_dir.join(TARGET).join("release").join(OBJECT);
    std::fs::copy(&built, object)
        .with_context(|| format!("cannot copy {} to {}", built.display(), object.display()))?;
    Ok(())
}
