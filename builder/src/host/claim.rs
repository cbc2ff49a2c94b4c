//! The one way strata tells a dead run's leftovers from a live run's: the
//! run that makes a leftover holds a flock on it (its claim) for as long as
//! it lives, and the kernel lets go of it when the run dies, however it
//! dies (SIGKILL included). The next run removes only what nobody holds.
//!
//! Leftovers claimed so: a mount's private directory (`mount`), a partial
//! image and a rootless build's staging directory (`debris`), an extracted
//! rootfs archive (`rootfs_tar`), the inspect appliance's mountpoint
//! (`image::appliance`) and vmtest's work directories. The pid in their
//! names is for the human reading `ls`: pids are reused, and a run in
//! another pid namespace (a container sharing /tmp) has a pid that is no
//! process here, so a pid decides nothing (but for the names below).
//!
//! A leftover is claimed before it has the name a scan looks for: it is
//! made under a `CLAIMING` name, locked, then renamed into place (never
//! over anything: RENAME_NOREPLACE). No scan ever sees it unclaimed. A run
//! killed in that instant leaves an empty entry no scan looks for.
//!
//! The claim is a shared lock and the probe an exclusive one: a claim never
//! fails because someone else briefly locks the directory (systemd-tmpfiles
//! does), and where exclusive locks need a file open for writing (NFS) the
//! probe fails, so a leftover there counts as held and is never removed.
//!
//! A claimed leftover's name has `CLAIMED_TAG` right after `<pid>.` (and
//! its mark), which tempfile's random part never has. A name without it is
//! a leftover of a strata from before claims, which locked nothing: the
//! pid is all there is to judge it by (`lives`), so that such a strata
//! still running beside this one keeps its mounts and directories. (It
//! happened here: a test run of the first claim-only version swept the
//! work directory of an older strata's power-cut run in progress.)

use rustix::fs::{flock, FlockOperation};
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The name a leftover has while it is being claimed.
pub const CLAIMING: &str = ".strata-claiming.";

/// After `<pid>.` (and a mark) in a claimed leftover's name.
pub const CLAIMED_TAG: char = '+';

/// What a scan knows of a leftover named `…<pid>.<rest>`, to tell whether
/// the run that made it lives.
#[derive(Debug, Clone, Copy)]
pub struct Leftover<'a> {
    /// What its run claimed; None when it must not be opened (a mount
    /// point: a FUSE mount can hang whoever opens it).
    pub claimed: Option<&'a Path>,
    pub pid: u32,
    /// The name after `<pid>.` and the mark.
    pub rest: &'a str,
}

/// Whether the run that made `l` lives: its claim is held; for a name from
/// before claims (no `CLAIMED_TAG`), its pid is a process.
pub fn lives(l: &Leftover) -> bool {
    if l.rest.starts_with(CLAIMED_TAG) {
        l.claimed.is_some_and(held)
    } else {
        Path::new(&format!("/proc/{}", l.pid)).exists()
    }
}

/// This run's claim on a leftover it made: held until dropped, or until
/// the run dies.
#[derive(Debug)]
pub struct Claim {
    _file: File,
}

impl Claim {
    /// Claims `path` (a file or directory this run has just made).
    pub fn take(path: &Path) -> io::Result<Claim> {
        let file = open(path)?;
        flock(&file, FlockOperation::LockShared)?;
        Ok(Claim { _file: file })
    }
}

/// Opened to be locked: read-only, never through a symlink.
fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// Whether a live run holds `path`. What cannot be opened or locked counts
/// as held: what strata cannot judge, it leaves alone. Only a regular file
/// or a directory is opened to look (a device node or fifo named like a
/// leftover is somebody else's, and opening it could do something).
pub fn held(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(seen) = std::fs::symlink_metadata(path) else {
        return true;
    };
    if !(seen.is_file() || seen.is_dir()) {
        return true;
    }
    let Ok(f) = open(path) else {
        return true;
    };
    // What was opened is what was looked at, not something swapped in.
    let same = f
        .metadata()
        .is_ok_and(|m| m.dev() == seen.dev() && m.ino() == seen.ino());
    // The probe's own lock goes with `f`, at once.
    !same || flock(&f, FlockOperation::NonBlockingLockExclusive).is_err()
}

/// A new directory `<parent>/<prefix><pid>.<mark>+<random>`, mode 0700,
/// claimed by this run before it has that name.
pub fn claimed_dir(parent: &Path, prefix: &str, mark: &str) -> io::Result<(PathBuf, Claim)> {
    use std::os::unix::fs::PermissionsExt;
    // mkdir's mode (the umask can only take bits away): closed to others
    // from the start, never open even for a moment.
    let made = tempfile::Builder::new()
        .prefix(CLAIMING)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?
        .keep();
    let claim = Claim::take(&made).and_then(|claim| {
        // Beside `made`, which tempfile made absolute.
        let named = made.with_file_name(final_name(&made, prefix, mark));
        rename_noreplace(&made, &named)?;
        Ok((named, claim))
    });
    if claim.is_err() {
        let _ = std::fs::remove_dir(&made);
    }
    claim
}

/// Gives `file` (made under a `CLAIMING` name in `parent` and already
/// locked by its own descriptor) its name `<prefix><pid>.+<random>`.
pub fn name_claimed_file(
    file: tempfile::NamedTempFile,
    prefix: &str,
) -> io::Result<tempfile::NamedTempFile> {
    let (file, path) = file.into_parts();
    let named = path.with_file_name(final_name(&path, prefix, ""));
    // On an error `path` drops and removes the file.
    rename_noreplace(&path, &named)?;
    path.keep().map_err(|e| e.error)?;
    Ok(tempfile::NamedTempFile::from_parts(
        file,
        tempfile::TempPath::try_from_path(named)?,
    ))
}

/// A directory this run made and claims (`claimed_dir`), removed with
/// everything in it when dropped: a `tempfile::TempDir` that the next run
/// can tell from a dead run's.
#[derive(Debug)]
pub struct ClaimedDir {
    path: PathBuf,
    _claim: Claim,
}

impl ClaimedDir {
    /// `<parent>/<prefix><pid>.+<random>`, mode 0700 (see `claimed_dir`).
    pub fn new(parent: &Path, prefix: &str) -> io::Result<ClaimedDir> {
        let (path, claim) = claimed_dir(parent, prefix, "")?;
        Ok(ClaimedDir {
            path,
            _claim: claim,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes it now, saying whether that worked (dropping ignores it).
    pub fn close(mut self) -> io::Result<()> {
        std::fs::remove_dir_all(std::mem::take(&mut self.path))
    }
}

impl Drop for ClaimedDir {
    fn drop(&mut self) {
        // Empty after `close`. The claim goes after this (a field).
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A leftover's name read back: `<prefix><pid>.<rest>` as the pid and the
/// (non-empty) rest, which `lives` judges; None for another shape. The one
/// reader of the names `final_name` writes (and of older strata's).
pub fn split_name<'a>(name: &'a str, prefix: &str) -> Option<(u32, &'a str)> {
    let (pid, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    Some((pid.parse().ok()?, rest))
}

fn final_name(made: &Path, prefix: &str, mark: &str) -> String {
    let name = made.file_name().unwrap_or_default().to_string_lossy();
    let random = name.strip_prefix(CLAIMING).unwrap_or(&name);
    format!("{prefix}{}.{mark}{CLAIMED_TAG}{random}", std::process::id())
}

/// Renames, never over anything. Where the filesystem has no
/// RENAME_NOREPLACE (NFS, some FUSE servers) a plain rename to a name that
/// does not exist: the random part makes a name taken meanwhile as
/// unlikely as tempfile's own.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let flags = rustix::fs::RenameFlags::NOREPLACE;
    match rustix::fs::renameat_with(rustix::fs::CWD, from, rustix::fs::CWD, to, flags) {
        Err(e)
            if e == rustix::io::Errno::INVAL
                || e == rustix::io::Errno::NOSYS
                || e == rustix::io::Errno::OPNOTSUPP =>
        {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            std::fs::rename(from, to)
        }
        other => other.map_err(io::Error::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claimed directory is held while its claim lives, and only then; it
    /// is never seen under its final name unclaimed.
    #[test]
    fn a_claim_holds_until_it_is_dropped() {
        let parent = tempfile::tempdir().unwrap();
        let (dir, claim) = claimed_dir(parent.path(), ".x.strata-test.", "loop.").unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700);
        assert!(
            name.starts_with(&format!(".x.strata-test.{}.loop.+", std::process::id())),
            "{name}"
        );
        assert!(held(&dir));
        drop(claim);
        // A child another test thread forks holds a copy of the descriptor
        // until it execs (CLOEXEC): the lock may go a moment later.
        assert!(released(&dir));
        // Nothing is left under the claiming name.
        let left: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [dir.file_name().unwrap()]);
    }

    #[test]
    fn a_claimed_file_keeps_its_lock_under_its_name_and_goes_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(CLAIMING)
            .tempfile_in(parent.path())
            .unwrap();
        flock(tmp.as_file(), FlockOperation::NonBlockingLockExclusive).unwrap();
        let named = name_claimed_file(tmp, ".img.strata-partial.").unwrap();
        assert!(held(named.path()));
        let path = named.path().to_owned();
        drop(named);
        assert!(!path.exists());
    }

    fn released(path: &Path) -> bool {
        (0..100).any(|_| {
            let free = !held(path);
            if !free {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            free
        })
    }

    /// A symlink is never followed to what it names, and what cannot be
    /// opened is never judged dead.
    #[test]
    fn what_cannot_be_judged_counts_as_held() {
        let parent = tempfile::tempdir().unwrap();
        let target = parent.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = parent.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(held(&link));
        assert!(held(&parent.path().join("missing")));
        let fifo = parent.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(held(&fifo));
        assert!(!held(&target));
    }
}
