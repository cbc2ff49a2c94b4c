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

/// `losetup -d`, then waits for the device to let go of its file. When the
/// last user (a filesystem just unmounted) has not closed the device yet,
/// the kernel only marks it autoclear and `losetup -d` returns at once; the
/// device goes a moment later. Callers (and the next run's checks) expect
/// it gone, so wait a little.
fn detach(path: &Path) -> Result<(), CmdError> {
    cmd::run(std::process::Command::new("losetup").arg("-d").arg(path))?;
    let backing = path
        .file_name()
        .map(|n| Path::new("/sys/block").join(n).join("loop/backing_file"));
    let Some(backing) = backing else {
        return Ok(());
    };
    // No second `losetup -d`: the device is already marked, and once freed
    // it may belong to another process's `losetup --find`.
    for _ in 0..40 {
        if !backing.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    tracing::warn!(
        "{} still has a backing file after detaching: the kernel frees it when its last user closes it",
        path.display()
    );
    Ok(())
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
