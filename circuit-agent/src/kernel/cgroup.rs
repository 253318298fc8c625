//! The cgroup v2 root, where the connect hooks attach so they see every process.
//!
//! Found in /proc/self/mountinfo rather than assumed: it is /sys/fs/cgroup on unified hosts
//! (most Kubernetes nodes), /sys/fs/cgroup/unified on hybrid ones, and absent under
//! `ip netns exec` (which remounts /sys); then a cgroup2 mount is made for the agent.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::mount::{MsFlags, mount};

/// Where the agent mounts cgroup2 itself when no mount of the root is visible.
const PRIVATE_MOUNT: &str = "/run/circuit/cgroup2";

/// The mount point of the cgroup v2 hierarchy's root, from mountinfo text.
fn root_from_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fstype = fs.split_whitespace().next()?;
        let mut fields = mount.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fstype == "cgroup2" && is_hierarchy_root(root)).then(|| PathBuf::from(unescape(point)))
    })
}

/// A mount of the hierarchy's root: "/" in the host's cgroup namespace; inside a
/// container's cgroup namespace the host's root, bind-mounted in, shows as "/../.." (the
/// way up from the namespace's root), and attaching there still covers every process.
fn is_hierarchy_root(root: &str) -> bool {
    root == "/" || root.split('/').skip(1).all(|part| part == "..")
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup v2 root if one is mounted where this process sees it.
pub fn find_cgroup2_root() -> Option<PathBuf> {
    root_from_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The cgroup v2 root, mounting one if none is visible.
pub fn ensure_cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    if let Some(root) = root_from_mountinfo(&mountinfo) {
        return Ok(root);
    }
    let target = Path::new(PRIVATE_MOUNT);
    std::fs::create_dir_all(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    mount(
        Some("cgroup2"),
        target,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("no cgroup2 mount found and cannot mount one on {PRIVATE_MOUNT}"))?;
    tracing::info!(target = PRIVATE_MOUNT, "mounted cgroup2");
    Ok(target.to_path_buf())
}

/// Names cgroups by id for people: a cgroup v2 id is its directory's inode number, so the
/// path is found by walking the hierarchy from `root`. Results are kept (paths of live
/// cgroups do not change), misses are not (the cgroup may appear later).
#[derive(Debug)]
pub struct CgroupNames {
    root: PathBuf,
    known: std::collections::HashMap<u64, String>,
}

/// Cgroups walked at most per lookup: a bound on the cost of naming a cgroup that is gone.
const NAMING_WALK_LIMIT: usize = 100_000;

impl CgroupNames {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: std::collections::HashMap::new(),
        }
    }

    /// The path of cgroup `id` below the root (e.g. `/kubepods/pod1234/c0ffee`), if found.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.known.get(&id) {
            return Some(path.clone());
        }
        use std::os::unix::fs::MetadataExt;
        let mut stack = vec![self.root.clone()];
        let mut walked = 0;
        while let Some(dir) = stack.pop() {
            walked += 1;
            if walked > NAMING_WALK_LIMIT {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if meta.ino() == id {
                let relative = dir.strip_prefix(&self.root).unwrap_or(&dir);
                let path = format!("/{}", relative.display());
                self.known.insert(id, path.clone());
                return Some(path);
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_root_on_a_hybrid_host() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            root_from_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn ignores_a_namespaced_subtree_and_unescapes_paths() {
        let text = "\
40 30 0:27 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 30 0:27 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            root_from_mountinfo(text),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(
            root_from_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
