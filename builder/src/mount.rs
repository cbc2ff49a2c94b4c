//! A mount on a private temporary directory, unmounted when dropped.

use crate::cmd::{self, CmdError};
use std::path::Path;
use std::process::Command;

#[derive(Debug)]
pub struct Mount {
    // Declared before `dir` so the directory outlives the mount on drop.
    mounted: bool,
    dir: tempfile::TempDir,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("creating a mount point: {0}")]
    TempDir(#[source] std::io::Error),
    #[error(transparent)]
    Cmd(#[from] CmdError),
}

impl Mount {
    /// Mounts `device` (a block device or image file) as btrfs with `options`
    /// on a new directory under the system temp dir.
    pub fn btrfs(device: &Path, options: &str) -> Result<Mount, MountError> {
        let dir = tempfile::Builder::new()
            .prefix("strata-mnt-")
            .tempdir()
            .map_err(MountError::TempDir)?;
        cmd::run(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", options])
                .arg(device)
                .arg(dir.path()),
        )?;
        Ok(Mount { mounted: true, dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Unmounts now, reporting failure (Drop can only log it).
    pub fn unmount(mut self) -> Result<(), CmdError> {
        self.mounted = false;
        umount(self.dir.path())
    }
}

fn umount(path: &Path) -> Result<(), CmdError> {
    cmd::run(Command::new("umount").arg(path)).map(drop)
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount(self.dir.path()) {
                // A busy mount must still go: detach it lazily rather than
                // leave it (and the loop device under it) behind.
                tracing::error!("cleanup: unmounting {}: {e}", self.dir.path().display());
                let _ = cmd::run(Command::new("umount").arg("--lazy").arg(self.dir.path()));
            }
        }
    }
}
