//! One agent per pin directory and per control socket: an exclusive `flock` held for the
//! agent's life. The kernel releases it when the process ends, crash included, so there is
//! no stale lock to clean up.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::bail;

/// Another process holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("{} is in use by {holder}: stop that agent first, or give this one its own", path.display())]
pub struct LockHeld {
    pub path: PathBuf,
    pub holder: String,
}

/// An exclusive lock on a file or directory, released on drop (or when the process ends).
#[derive(Debug)]
pub struct ExclusiveLock {
    _file: File,
    path: PathBuf,
}

impl ExclusiveLock {
    /// Locks `file` (opened at `path`) without waiting: `holder` names what holds it when
    /// it is taken, for the error.
    pub fn try_new(file: File, path: &Path, holder: &str) -> anyhow::Result<Self> {
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockHeld {
                    path: path.to_owned(),
                    holder: holder.to_owned(),
                }
                .into());
            }
            bail!("cannot lock {}: {err}", path.display());
        }
        Ok(Self {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// Locks the directory `dir` itself (bpffs has no regular files to lock).
    pub fn directory(dir: &Path, holder: &str) -> anyhow::Result<Self> {
        let file = File::open(dir)
            .map_err(|e| anyhow::anyhow!("cannot open {} to lock it: {e}", dir.display()))?;
        Self::try_new(file, dir, holder)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_directory_is_refused_until_the_first_goes() {
        let dir = std::env::temp_dir().join(format!("circuit-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = ExclusiveLock::directory(&dir, "another agent").unwrap();
        let err = ExclusiveLock::directory(&dir, "another agent").unwrap_err();
        assert!(err.to_string().contains("in use by another agent"), "{err}");
        assert!(err.downcast_ref::<LockHeld>().is_some());
        drop(first);
        let again = ExclusiveLock::directory(&dir, "another agent").unwrap();
        assert_eq!(again.path(), dir);
        drop(again);
        std::fs::remove_dir(&dir).unwrap();
    }
}
