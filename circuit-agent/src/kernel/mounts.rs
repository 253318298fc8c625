//! The kernel filesystems the agent needs, mounted when missing: a fresh container, or
//! `ip netns exec` (which remounts /sys), has neither bpffs nor tracefs.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn fs_magic(path: &Path) -> Option<i64> {
    statfs(path).ok().map(|s| s.filesystem_type().0)
}

fn mount_fs(fstype: &str, target: &Path) -> anyhow::Result<()> {
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "cannot mount {fstype} on {} (are you root?)",
            target.display()
        )
    })?;
    tracing::info!(fstype, target = %target.display(), "mounted missing filesystem");
    Ok(())
}

/// Makes sure `pin_dir` lives on a bpffs (mounting /sys/fs/bpf if needed) and exists.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let on_bpffs = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .is_some_and(|p| fs_magic(p) == Some(BPF_FS_MAGIC));
    if !on_bpffs {
        if !pin_dir.starts_with(BPFFS_ROOT) {
            bail!(
                "pin directory {} is not on a bpffs; use a path under {BPFFS_ROOT} or mount a bpffs there",
                pin_dir.display()
            );
        }
        mount_fs("bpf", Path::new(BPFFS_ROOT))?;
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("cannot create pin directory {}", pin_dir.display()))
}

/// Returns the tracefs mount, mounting tracefs at /sys/kernel/tracing if none is found.
pub fn ensure_tracefs() -> anyhow::Result<PathBuf> {
    if let Some(found) = TRACEFS_ROOTS
        .iter()
        .map(Path::new)
        .find(|p| fs_magic(p) == Some(TRACEFS_MAGIC))
    {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(TRACEFS_ROOTS[0]);
    mount_fs("tracefs", target)?;
    Ok(target.to_path_buf())
}
