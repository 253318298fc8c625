//! The kernel filesystems the agent needs, and the pin directory it owns on bpffs.
//!
//! The bpffs root is world-writable (mode 1777, the kernel's default), so anybody can
//! create an entry there: a symlink named like the pin directory, or the directory itself
//! before root does. circuit therefore follows no symlink on the way to its pin directory
//! and uses only directories that root owns and nobody else can write, and `detach`
//! removes only the pins circuit makes, by name.
//!
//! bpffs is mounted only when /sys/fs/bpf is none, and only in the host's mount namespace:
//! pins made on a bpffs private to the agent's mount namespace (`ip netns exec` remounts
//! /sys) would vanish with the agent, and its protection with them.

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use anyhow::{Context, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, FsType, TRACEFS_MAGIC, statfs},
};

const BPFFS_ROOT: &str = "/sys/fs/bpf";
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn fs_magic(path: &Path) -> Option<FsType> {
    statfs(path).ok().map(|s| s.filesystem_type())
}

fn mount_fs(fstype: &str, target: &Path, data: Option<&str>) -> anyhow::Result<()> {
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        data,
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

/// Whether this process shares pid 1's mount namespace. Unknown (pid 1's namespace is not
/// readable, as under `ip netns exec`) counts as no: a bpffs mounted then might be private.
fn in_host_mount_namespace() -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (ino("/proc/self/ns/mnt"), ino("/proc/1/ns/mnt")) {
        (Some(own), Some(host)) => own == host,
        _ => false,
    }
}

/// Makes sure `pin_dir` is a directory on bpffs that only root can change (creating it,
/// mode 0700, when missing), mounting bpffs at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let pin_dir = absolute(pin_dir)?;
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && fs_magic(root) != Some(BPF_FS_MAGIC) {
        if !in_host_mount_namespace() {
            bail!(
                "no bpffs at {BPFFS_ROOT} in this mount namespace (`ip netns exec` remounts /sys): pins made here would vanish with the agent, and its protection with them; enter only the network namespace (`nsenter --net=/run/netns/NAME circuit-agent ...`) or mount the host's bpffs at {BPFFS_ROOT}"
            );
        }
        // Only root may create entries in a bpffs the agent mounts.
        mount_fs("bpf", root, Some("mode=0700"))?;
    }
    walk(&pin_dir, Create::Yes)?;
    if fs_magic(&pin_dir) != Some(BPF_FS_MAGIC) {
        bail!(
            "pin directory {} is not on a bpffs; use a path under {BPFFS_ROOT} or mount a bpffs there",
            pin_dir.display()
        );
    }
    Ok(())
}

/// Checks that an existing `dir` is circuit's to change: a real directory (no symlink on
/// the way) on bpffs, owned by root and writable by nobody else. `Ok(false)`: no such
/// directory, nothing to do.
pub fn owned_pin_dir(dir: &Path) -> anyhow::Result<bool> {
    let dir = absolute(dir)?;
    if !walk(&dir, Create::No)? {
        return Ok(false);
    }
    if fs_magic(&dir) != Some(BPF_FS_MAGIC) {
        bail!(
            "{} is not on a bpffs: circuit removes only the pins it made there",
            dir.display()
        );
    }
    Ok(true)
}

/// Creates `dir` like [`ensure_bpffs`], for a directory under a checked pin directory.
pub fn ensure_owned_dir(dir: &Path) -> anyhow::Result<()> {
    walk(&absolute(dir)?, Create::Yes).map(|_| ())
}

#[derive(Clone, Copy, PartialEq)]
enum Create {
    Yes,
    No,
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        bail!(
            "pin directory {} must be an absolute path without `..`",
            path.display()
        );
    }
    Ok(path.to_path_buf())
}

/// Walks from `/` to `dir` without following symlinks, checking each directory on the way
/// (see [`check_dir`]) and creating the missing ones (mode 0700) when asked. Returns
/// whether `dir` exists at the end.
fn walk(dir: &Path, create: Create) -> anyhow::Result<bool> {
    let mut at = PathBuf::from("/");
    let mut parts = dir.components().skip(1).peekable();
    while let Some(part) = parts.next() {
        at.push(part);
        let last = parts.peek().is_none();
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if create == Create::No {
                    return Ok(false);
                }
                match std::fs::DirBuilder::new().mode(0o700).create(&at) {
                    Ok(()) => {}
                    // Made by someone else in between: checked below like any other.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot create {}", at.display()));
                    }
                }
                std::fs::symlink_metadata(&at)
                    .with_context(|| format!("cannot read {}", at.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", at.display())),
        };
        check_dir(&at, &meta, last)?;
    }
    Ok(true)
}

/// A directory on the way to (or being) the pin directory: not a symlink, owned by root,
/// and writable by nobody else. On the way, a sticky directory writable by all (the bpffs
/// root, /tmp) is fine: nobody can rename or remove root's entries in it.
fn check_dir(path: &Path, meta: &std::fs::Metadata, pin_dir: bool) -> anyhow::Result<()> {
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symlink: circuit follows none on the way to its pins (anybody may create entries in the bpffs root)",
            path.display()
        );
    }
    if !meta.is_dir() {
        bail!("{} is not a directory", path.display());
    }
    let mode = meta.permissions().mode();
    let writable_by_others = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if meta.uid() != 0 || (writable_by_others && (pin_dir || !sticky)) {
        bail!(
            "{} is owned by uid {} with mode {:o}: circuit uses only directories that root owns and nobody else can write",
            path.display(),
            meta.uid(),
            mode & 0o7777
        );
    }
    Ok(())
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
    mount_fs("tracefs", target, None)?;
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_parent_paths_are_refused() {
        assert!(absolute(Path::new("sys/fs/bpf/x")).is_err());
        assert!(absolute(Path::new("/sys/fs/bpf/../../etc")).is_err());
        assert!(absolute(Path::new("/sys/fs/bpf/circuit")).is_ok());
    }
}
