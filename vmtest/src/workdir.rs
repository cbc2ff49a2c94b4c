//! The run's private work dir: the qcow2 overlay, QEMU's sockets, the boot
//! files of `--boot direct`. It is `strata-vm.<pid>.XXXXXX` under the temp
//! dir, and the run holds its claim on it (the builder's `host::claim`, as
//! for every leftover strata makes) for as long as it lives.
//!
//! A run killed with SIGKILL cannot remove its own work dir (its QEMU dies
//! with it: see `qemu::tie_to_us`). The next run therefore removes every
//! `strata-vm.<pid>.*` dir nobody holds: the claim, not the pid, decides,
//! so a reused pid never keeps debris alive and a live run's dir is never
//! touched. Nothing is killed: a held dir belongs to a live run and stays.
//!
//! The upgrade lifecycle's private copy of the image lives in a second dir
//! of the same kind, `.strata-lifecycle.<pid>.XXXXXX` beside the image
//! (`COPY_PREFIX`): a killed lifecycle leaves a copy of GiBs, swept the same
//! way by the next lifecycle run beside the same image.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use strata_builder::host::claim::{self, ClaimedDir};

pub const PREFIX: &str = "strata-vm.";
/// The lifecycle's image copy dir (`run`'s `private_dir`).
pub const COPY_PREFIX: &str = ".strata-lifecycle.";

/// The work dir of this run; removed on drop.
pub struct WorkDir {
    dir: ClaimedDir,
    /// Dead runs' work dirs removed while creating this one.
    pub removed: Vec<PathBuf>,
}

impl WorkDir {
    /// Under the system temp dir.
    pub fn create() -> io::Result<WorkDir> {
        WorkDir::create_in(&std::env::temp_dir())
    }

    /// Under `root`: removes dead runs' dirs there, then makes this run's.
    pub fn create_in(root: &Path) -> io::Result<WorkDir> {
        WorkDir::create_named(root, PREFIX)
    }

    /// Under `root`, named `<prefix><pid>.XXXXXX`: removes dead runs' dirs
    /// of that prefix there, then makes this run's.
    pub fn create_named(root: &Path, prefix: &str) -> io::Result<WorkDir> {
        let removed = remove_dead_named(root, prefix);
        let dir = ClaimedDir::new(root, prefix)?;
        Ok(WorkDir { dir, removed })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A strata from before claims held an exclusive flock on `.lock` inside
/// its work dir: while that is held, the run lives whatever its pid says.
fn legacy_lock_held(dir: &Path, rest: &str) -> bool {
    if rest.starts_with(claim::CLAIMED_TAG) {
        return false;
    }
    std::fs::File::open(dir.join(".lock")).is_ok_and(|f| {
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
    })
}

/// Removes the work dirs of runs that are gone; returns what it removed.
/// Failures are not this run's problem: what cannot be removed stays.
pub fn remove_dead(root: &Path) -> Vec<PathBuf> {
    remove_dead_named(root, PREFIX)
}

/// [`remove_dead`] for the dirs named `<prefix><pid>.XXXXXX`.
pub fn remove_dead_named(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, rest)) = name.to_str().and_then(|n| claim::split_name(n, prefix)) else {
            continue;
        };
        let path = entry.path();
        // Only real directories of ours, never through a symlink.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() {
            continue;
        }
        let claimed = Some(path.as_path());
        if claim::lives(&claim::Leftover { claimed, pid, rest }) || legacy_lock_held(&path, rest) {
            continue;
        }
        match remove_tree_on(&path, meta.dev()) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed a dead run's work dir");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), "cannot remove a dead run's work dir: {e}")
            }
        }
    }
    removed
}

/// Removes `dir` and everything under it, refusing to descend into another
/// filesystem (a mount under it would be emptied otherwise).
fn remove_tree_on(dir: &Path, dev: u64) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            if meta.dev() != dev {
                return Err(io::Error::other(format!(
                    "{} is a mountpoint: not removing through it",
                    path.display()
                )));
            }
            remove_tree_on(&path, dev)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dirs_carry_the_pid_and_a_claim() {
        let root = tempfile::tempdir().unwrap();
        let w = WorkDir::create_in(root.path()).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            claim::split_name(&name, PREFIX).map(|(pid, _)| pid),
            Some(std::process::id()),
            "{name}"
        );
        assert!(claim::held(w.path()), "our claim is held");
        let path = w.path().to_owned();
        drop(w);
        assert!(!path.exists(), "an orderly run removes its own");
    }

    #[test]
    fn the_next_run_removes_dead_runs_work_dirs_and_keeps_live_ones() {
        let root = tempfile::tempdir().unwrap();
        // A run that was SIGKILLed: nobody holds its claim. Its pid is
        // ours: for a claimed dir a pid decides nothing.
        let dead = root
            .path()
            .join(format!("{PREFIX}{}.+AbCdEf", std::process::id()));
        std::fs::create_dir_all(dead.join("boot")).unwrap();
        std::fs::write(dead.join("overlay.qcow2"), "x").unwrap();
        std::fs::write(dead.join("boot/kernel"), "x").unwrap();
        // A live run (here: this process holds its lock).
        let live = WorkDir::create_in(root.path()).unwrap();
        // Not ours by name: left alone whatever it holds.
        let other = root.path().join("strata-vm.notapid");
        std::fs::create_dir(&other).unwrap();
        // Creating the live run's dir already swept the dead one away.
        assert!(live.removed.contains(&dead), "{:?}", live.removed);
        assert!(!dead.exists());
        let again = WorkDir::create_in(root.path()).unwrap();
        assert!(again.removed.is_empty(), "{:?}", again.removed);
        assert!(live.path().exists(), "a live run's dir is never touched");
        assert!(other.exists());
    }

    #[test]
    fn a_killed_lifecycles_copy_dir_is_swept_by_the_next_copy_dir_only() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join(format!("{COPY_PREFIX}4194303.+AbCdEf"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("debian.img"), "a copy of GiBs").unwrap();
        // A plain run's work dir in the same place leaves it alone...
        let plain = WorkDir::create_in(root.path()).unwrap();
        assert!(plain.removed.is_empty(), "{:?}", plain.removed);
        assert!(dead.exists());
        // ...the next lifecycle's copy dir removes it.
        let copy = WorkDir::create_named(root.path(), COPY_PREFIX).unwrap();
        assert_eq!(copy.removed, std::slice::from_ref(&dead));
        assert!(!dead.exists());
        let name = copy.path().file_name().unwrap().to_str().unwrap();
        assert_eq!(
            claim::split_name(name, COPY_PREFIX).map(|(pid, _)| pid),
            Some(std::process::id())
        );
    }

    /// A strata from before claims locked `.lock` inside its dir, or (killed
    /// before that) had only its pid: both still keep a live run's dir.
    #[test]
    fn work_dirs_of_a_strata_from_before_claims_are_judged_the_old_way() {
        let root = tempfile::tempdir().unwrap();
        let locked = root.path().join(format!("{PREFIX}4194303.Locked"));
        std::fs::create_dir(&locked).unwrap();
        let lock = std::fs::File::create(locked.join(".lock")).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        let mine = root
            .path()
            .join(format!("{PREFIX}{}.x", std::process::id()));
        std::fs::create_dir(&mine).unwrap();
        // pid_max on Linux is at most 4194304: this pid cannot be alive.
        let gone = root.path().join(format!("{PREFIX}4194305.y"));
        std::fs::create_dir(&gone).unwrap();
        let removed = remove_dead(root.path());
        assert_eq!(removed, [gone]);
        assert!(mine.exists(), "our own pid: alive");
        assert!(locked.exists(), "its lock is held");
        drop(lock);
        assert_eq!(remove_dead(root.path()), [locked]);
    }
}
