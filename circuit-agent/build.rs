//! Builds the kernel programs (circuit-ebpf) for bpfel-unknown-none with aya-build, so the
//! agent binary embeds the object it loads. `AYA_BUILD_SKIP=1` skips this for userspace-only
//! checks; `cargo xtask setup` installs what the build needs (nightly rust-src, bpf-linker).
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    // With AYA_BUILD_SKIP=1 aya-build builds nothing; leave an empty object so the agent still
    // compiles (it then refuses to attach, with a message saying why).
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let object = out_dir.join("circuit");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        std::fs::write(&object, [])?;
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("circuit-agent has no parent directory"))?
        .join("circuit-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "circuit-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
