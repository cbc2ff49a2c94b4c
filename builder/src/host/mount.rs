//! A mount on a private temporary directory, unmounted when dropped.
//!
//! The guard stays armed until the unmount has succeeded: a busy mount
//! (another process's cwd or open file inside it) is retried, then detached
//! lazily so nothing new can enter it, and the caller is told. The
//! directory is removed with rmdir(2) only, never recursively: a removal
//! that walks into a still-mounted filesystem would delete the image's
//! files.

use crate::host::claim::{self, Claim};
use crate::host::cmd::{self, CmdError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Mounts are on `<tmp>/strata-mnt.<pid>.<random>/fs`. The run holds its
/// claim on the directory around the mount point (`claim`) for as long as
/// the mount lives: that tells the next run a dead run's debris from a live
/// run's mount (`debris`). That directory is private (0700, this user's) and
/// stays visible while the mount hides `fs`: the next run trusts only a
/// mount inside such a directory, which no other user can make.
pub const MOUNT_DIR_PREFIX: &str = "strata-mnt.";

/// The mount point's name inside the private directory.
pub const MOUNT_POINT_NAME: &str = "fs";

/// In the private directory of a mount of a loop device strata attached:
/// `<st_dev> <st_ino>` of the loop device's backing file. The next run
/// detaches a dead run's device only while it still reads that file.
pub const BACKING_RECORD: &str = "backing";

/// After the pid in a mount dir's name: the mounted device is a loop device
/// strata attached (and may detach when cleaning a dead run's debris).
pub const OWN_LOOP_MARK: &str = "loop.";

/// How often a busy unmount is retried, and how long apart.
const BUSY_RETRIES: u32 = 10;
const BUSY_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Mount {
    mounted: bool,
    /// The private directory (`MOUNT_DIR_PREFIX`), holding `dir`.
    private: PathBuf,
    /// The mount point.
    dir: PathBuf,
    /// Held on `private` while this guard lives (dropped after `Drop`).
    _claim: Claim,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("creating a mount point: {0}")]
    TempDir(#[source] std::io::Error),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// The unmount kept failing (usually "target is busy").
    #[error("{} stayed in use after {BUSY_RETRIES} tries ({source}); {}", path.display(), if *lazily_detached { "detached it lazily: the filesystem goes away when its last user lets go" } else { "it is still mounted" })]
    Busy {
        path: PathBuf,
        #[source]
        source: CmdError,
        lazily_detached: bool,
    },
}

impl Mount {
    /// Mounts `device` (a block device or image file) as btrfs with `options`
    /// on a new directory under the system temp dir.
    pub fn btrfs(device: &Path, options: &str) -> Result<Mount, MountError> {
        Mount::btrfs_named(device, options, "")
    }

    /// Mounts a loop device strata attached itself. The directory says so
    /// (`strata-mnt.<pid>.loop.*`): the next run may detach the device if
    /// this run dies, which it must never do to a device a user gave.
    pub fn btrfs_on_own_loop(device: &Path, options: &str) -> Result<Mount, MountError> {
        Mount::btrfs_named(device, options, OWN_LOOP_MARK)
    }

    fn btrfs_named(device: &Path, options: &str, mark: &str) -> Result<Mount, MountError> {
        let (private, claim) = claim::claimed_dir(&std::env::temp_dir(), MOUNT_DIR_PREFIX, mark)
            .map_err(MountError::TempDir)?;
        // 0700 from its mkdir on (`claimed_dir`): only this user can put
        // anything in it, which is what lets the next run trust a mount
        // inside it (`debris::provenance`).
        let mut guard = Mount {
            mounted: false,
            dir: private.join(MOUNT_POINT_NAME),
            private,
            _claim: claim,
        };
        // On failure the guard drops unmounted and removes its directories.
        if mark == OWN_LOOP_MARK {
            let (dev, ino) =
                crate::host::loopdev::backing_id(device).map_err(MountError::TempDir)?;
            std::fs::write(guard.private.join(BACKING_RECORD), format!("{dev} {ino}\n"))
                .map_err(MountError::TempDir)?;
        }
        std::fs::create_dir(&guard.dir).map_err(MountError::TempDir)?;
        cmd::run(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", options])
                .arg(device)
                .arg(&guard.dir),
        )?;
        guard.mounted = true;
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Unmounts now (retrying while busy), reporting failure. On failure the
    /// mount has been detached lazily if at all possible.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), MountError> {
        if !self.mounted {
            // Never mounted (the mount failed), or already released.
            if self.private.exists() {
                self.remove_dir();
            }
            return Ok(());
        }
        let mut last = None;
        for attempt in 0..BUSY_RETRIES {
            match umount(&self.dir, false) {
                Ok(()) => {
                    self.mounted = false;
                    self.remove_dir();
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            if attempt + 1 < BUSY_RETRIES {
                std::thread::sleep(BUSY_PAUSE);
            }
        }
        let lazily_detached = umount(&self.dir, true).is_ok();
        if lazily_detached {
            self.mounted = false;
            self.remove_dir();
        }
        Err(MountError::Busy {
            path: self.dir.clone(),
            source: last.expect("at least one attempt"),
            lazily_detached,
        })
    }

    /// rmdir only: an unexpected entry means something is wrong, and a
    /// leftover empty directory in /tmp costs nothing.
    fn remove_dir(&self) {
        let record = self.private.join(BACKING_RECORD);
        let removed = std::fs::remove_dir(&self.dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| match std::fs::remove_file(&record) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
            .and_then(|()| std::fs::remove_dir(&self.private));
        if let Err(e) = removed {
            tracing::warn!("leaving mount point {}: {e}", self.dir.display());
        }
    }
}

fn umount(path: &Path, lazy: bool) -> Result<(), CmdError> {
    let mut c = Command::new("umount");
    if lazy {
        c.arg("--lazy");
    }
    cmd::run(c.arg(path)).map(drop)
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!("cleanup: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::loopdev::LoopDevice;

    fn mounted(dir: &Path) -> bool {
        let me = dir.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| m == me)
    }

    /// A process whose cwd is inside the mount makes umount fail with
    /// "target is busy": the guard must not give up (leaking the mount and
    /// the loop device), and nothing may be deleted through the mount.
    #[test]
    fn busy_unmount_is_retried_then_detached_lazily_and_reported() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts a loop device: run it as root (ci/test does)"
        );
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("busy.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        crate::host::btrfs::mkfs(&img, "busy", "6f1d3c9e-0000-4000-8000-00000000b005").unwrap();
        let dev = LoopDevice::attach(&img, false).unwrap();
        let m = Mount::btrfs(dev.path(), "noatime").unwrap();
        let dir = m.path().to_owned();
        assert!(dir
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{MOUNT_DIR_PREFIX}{}.", std::process::id())));
        std::fs::write(dir.join("keep-me"), "data").unwrap();
        let mut squatter = Command::new("sleep")
            .arg("30")
            .current_dir(&dir)
            .spawn()
            .unwrap();
        let err = m.unmount().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                MountError::Busy {
                    lazily_detached: true,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("detached it lazily"), "{msg}");
        assert!(!mounted(&dir), "the mount is gone from the namespace");
        squatter.kill().unwrap();
        squatter.wait().unwrap();
        dev.detach().unwrap();
        // The file lives on in the image: nothing was removed through the mount.
        let dev = LoopDevice::attach(&img, true).unwrap();
        let m = Mount::btrfs(dev.path(), "ro").unwrap();
        assert_eq!(
            std::fs::read_to_string(m.path().join("keep-me")).unwrap(),
            "data"
        );
        m.unmount().unwrap();
        dev.detach().unwrap();
    }
}
