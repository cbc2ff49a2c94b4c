//! A loop device that is detached when dropped, on every exit path.

use crate::cmd::{self, CmdError};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    pub fn attach(image: &Path, read_only: bool) -> Result<LoopDevice, CmdError> {
        let mut c = std::process::Command::new("losetup");
        c.args(["--find", "--show"]);
        if read_only {
            c.arg("--read-only");
        }
        let out = cmd::run(c.arg(image))?;
        Ok(LoopDevice {
            path: PathBuf::from(out.trim()),
            attached: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches now, reporting failure. The guard stays armed until the
    /// detach succeeded, so Drop tries again. (A device still in use — a
    /// lazily detached mount — is only marked autoclear by the kernel: it
    /// goes away when its last user does.)
    pub fn detach(mut self) -> Result<(), CmdError> {
        detach(&self.path)?;
        self.attached = false;
        Ok(())
    }
}

fn detach(path: &Path) -> Result<(), CmdError> {
    cmd::run(std::process::Command::new("losetup").arg("-d").arg(path)).map(drop)
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = detach(&self.path) {
                tracing::error!("cleanup: detaching {}: {e}", self.path.display());
            }
        }
    }
}
