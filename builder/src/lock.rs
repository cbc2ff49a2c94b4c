//! One writer per image, by a lock, not by looking (issue 22, item 1).
//!
//! Every command that changes an image (`build --force` over it,
//! `upgrade`, `set-default`, `remove`) holds an exclusive `flock(2)` on the
//! image file for its whole run; readers (`inspect`, `versions`, and
//! `strata test` through `ImageLock::shared`) hold a shared one. Nobody
//! waits: a command that meets a holder is refused (exit 2), naming the
//! holder's pid and command line (read from `/proc/locks`).
//!
//! Why a flock on the image itself, not on a lock file beside it:
//!
//! - a user who may read the image may lock it: `flock` needs only a
//!   read-only descriptor, where a sibling `.IMG.strata-lock` needs the
//!   right to create files in the image's directory (a rootless user
//!   reading an image in /var/lib/images has no such right);
//! - nothing is left behind to go stale: the kernel drops the lock when
//!   the process dies, SIGKILL included, and names the holder meanwhile;
//! - flock and QEMU's own image locks (OFD byte-range `fcntl` locks) are
//!   independent on Linux, so a shared strata lock never stops a VM.
//!
//! `build --force` replaces the file by a rename: the old inode's lock does
//! not cover the new one. So the build also locks its new file from the
//! moment it is created, and every lock is taken on what the path names
//! *after* locking (`take` checks the path still names the locked inode,
//! and tries again otherwise).
//!
//! A lock binds only strata. A loop device bound to the image by anyone
//! else (a hand mount, a leftover `losetup`) is found by its backing
//! device and inode (`attached_loops`), and writers refuse it too
//! (`refuse_attached`), after cleaning what killed strata runs left.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Failure, FailureKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Readers: any number at once, no writer.
    Shared,
    /// A writer: alone.
    Exclusive,
}

/// Who holds a lock, as `/proc/locks` and `/proc/PID/cmdline` tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    /// The command line, arguments joined by spaces.
    pub command: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(c)) => write!(f, "pid {pid} ({c})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            (None, _) => write!(f, "another process"),
        }
    }
}

/// A loop device bound to the image, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopUse {
    pub device: String,
    pub mounted_on: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The image cannot be opened (missing, not readable).
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Someone holds a lock that excludes the one wanted.
    #[error("{} is in use: {} holds it {}; run this again when it has finished", path.display(), holders_text(holders), match wanted { LockKind::Exclusive => "(strata changes an image only when nothing else reads or changes it)", LockKind::Shared => "to change it (reading it now would read a filesystem being written)" })]
    Held {
        path: PathBuf,
        holders: Vec<Holder>,
        wanted: LockKind,
    },
    /// flock(2) itself failed.
    #[error("locking {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Open in another process (a VM, a copy, a hand-run tool) that
    /// holds no strata lock.
    #[error("{} is open in {}: strata changes an image only when nothing else has it open (a VM writing its disk meanwhile would corrupt both); stop it first", path.display(), holders_text(holders))]
    OpenElsewhere { path: PathBuf, holders: Vec<Holder> },
    /// Bound to loop devices strata does not own.
    #[error("{} is attached to {} outside strata (a mount, a VM, a `losetup`): strata changes an image only when nothing else has it open; unmount it and detach it (`losetup -d {}`) first", path.display(), loops_text(loops), loops.iter().map(|l| l.device.as_str()).collect::<Vec<_>>().join(" "))]
    Attached { path: PathBuf, loops: Vec<LoopUse> },
}

fn holders_text(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return Holder {
            pid: None,
            command: None,
        }
        .to_string();
    }
    holders
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn loops_text(loops: &[LoopUse]) -> String {
    loops
        .iter()
        .map(|l| {
            if l.mounted_on.is_empty() {
                format!("{} (not mounted)", l.device)
            } else {
                format!("{} (mounted on {})", l.device, l.mounted_on.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Failure for LockError {
    fn kind(&self) -> FailureKind {
        match self {
            LockError::Lock { .. } => FailureKind::Infrastructure,
            _ => FailureKind::Input,
        }
    }
}

impl LockError {
    pub fn is_input(&self) -> bool {
        self.kind() == FailureKind::Input
    }
}

impl From<LockError> for crate::error::StepError {
    fn from(e: LockError) -> Self {
        if e.is_input() {
            crate::error::StepError::Input(e.to_string())
        } else {
            crate::error::StepError::Failed {
                what: "locking the image".into(),
                cause: e.into(),
            }
        }
    }
}

/// A lock on an image, held until dropped (or the process ends).
#[derive(Debug)]
pub struct ImageLock {
    /// Never read: the lock lives as long as this descriptor is open.
    _held: File,
    path: PathBuf,
    kind: LockKind,
}

impl ImageLock {
    /// For a command that changes the image at `path`: alone, or refused.
    pub fn exclusive(path: &Path) -> Result<ImageLock, LockError> {
        take(path, LockKind::Exclusive)
    }

    /// For a reader of the image at `path` (`strata inspect`, `versions`,
    /// and `strata test` while QEMU has the image open): any number of
    /// readers at once, refused while a writer holds it. Hold the guard as
    /// long as the image is read. A process must not ask for a second lock
    /// on an image it already holds one on (flock locks belong to open
    /// files: its own shared lock would refuse its exclusive one).
    pub fn shared(path: &Path) -> Result<ImageLock, LockError> {
        take(path, LockKind::Shared)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> LockKind {
        self.kind
    }
}

/// Locks a file strata has just created (a build's new image) through its
/// own descriptor, for as long as that descriptor (or one of its
/// duplicates) stays open: renamed over the output, it is held already.
pub fn lock_new_file(file: &File, path: &Path) -> Result<(), LockError> {
    flock(file, path, LockKind::Exclusive)
}

fn take(path: &Path, kind: LockKind) -> Result<ImageLock, LockError> {
    // Three tries: each lost race is a build renaming a new image over the
    // path between our open and our lock.
    for _ in 0..3 {
        let file = File::open(path).map_err(|source| LockError::Open {
            path: path.to_owned(),
            source,
        })?;
        flock(&file, path, kind)?;
        let locked = file.metadata().map_err(|source| LockError::Lock {
            path: path.to_owned(),
            source,
        })?;
        let named = std::fs::metadata(path).map_err(|source| LockError::Open {
            path: path.to_owned(),
            source,
        })?;
        if (locked.dev(), locked.ino()) == (named.dev(), named.ino()) {
            return Ok(ImageLock {
                _held: file,
                path: path.to_owned(),
                kind,
            });
        }
    }
    Err(LockError::Held {
        path: path.to_owned(),
        holders: Vec::new(),
        wanted: kind,
    })
}

fn flock(file: &File, path: &Path, kind: LockKind) -> Result<(), LockError> {
    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY: a valid descriptor; flock has no memory arguments.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                let md = file.metadata().ok();
                let holders = md.map(|m| holders(m.dev(), m.ino())).unwrap_or_default();
                return Err(LockError::Held {
                    path: path.to_owned(),
                    holders,
                    wanted: kind,
                });
            }
            _ => {
                return Err(LockError::Lock {
                    path: path.to_owned(),
                    source: e,
                })
            }
        }
    }
}

/// The processes holding a flock on the file (`dev`, `ino`): candidates
/// from `/proc/locks` by inode (its device numbers are the superblock's,
/// which on btrfs are not `st_dev`), kept when they have the file open.
fn holders(dev: u64, ino: u64) -> Vec<Holder> {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    // Our own pid too: our lock was refused, so a lock of ours listed
    // is another open file of this process, which conflicts all the same.
    let mut pids = flock_pids(&text, ino);
    pids.sort_unstable();
    pids.dedup();
    let confirmed: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| has_open(*p, dev, ino))
        .collect();
    // Another user's process cannot be looked into: then the inode alone.
    let pids = if confirmed.is_empty() {
        pids
    } else {
        confirmed
    };
    pids.into_iter()
        .map(|pid| Holder {
            pid: Some(pid),
            command: command_line(pid),
        })
        .collect()
}

/// Pids of the granted FLOCK locks on inode `ino` in `/proc/locks` text:
/// `1: FLOCK  ADVISORY  WRITE 4242 00:1d:131 0 EOF` (blocked waiters, the
/// `->` lines, hold nothing).
pub fn flock_pids(proc_locks: &str, ino: u64) -> Vec<u32> {
    proc_locks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid: u32 = f.get(4)?.parse().ok()?;
            let inode: u64 = f.get(5)?.rsplit(':').next()?.parse().ok()?;
            (inode == ino).then_some(pid)
        })
        .collect()
}

fn has_open(pid: u32, dev: u64, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
}

fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if words.is_empty() {
        return None;
    }
    // The program by its name: the path of the binary says nothing here.
    let mut words = words;
    if let Some(name) = Path::new(&words[0]).file_name() {
        words[0] = name.to_string_lossy().into_owned();
    }
    Some(words.join(" "))
}

/// The loop devices bound to the file at `image` (by device and inode: a
/// path may name another file by now, and the file another path), with
/// where each is mounted. Empty for what is not a regular file.
pub fn attached_loops(image: &Path) -> Vec<LoopUse> {
    let Ok(md) = std::fs::metadata(image) else {
        return Vec::new();
    };
    if !md.is_file() {
        return Vec::new();
    }
    let want = (md.dev(), md.ino());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue; // not bound
        };
        let device = format!("/dev/{name}");
        let id = crate::host::loopdev::backing_id(Path::new(&device))
            .ok()
            .or_else(|| {
                // Not allowed to open the device (not root): by the path the
                // kernel shows, which still names the file unless it moved.
                let path = backing.trim_end();
                let path = path.strip_suffix(" (deleted)").unwrap_or(path);
                std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
            });
        if id == Some(want) {
            out.push(LoopUse {
                mounted_on: mounted_from(&mountinfo, &device),
                device,
            });
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Mount points of `device` in `mountinfo` text.
pub fn mounted_from(mountinfo: &str, device: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let source = crate::fstab::unescape(f.get(sep + 2)?);
            let target = crate::fstab::unescape(f.get(4)?);
            (source == device).then_some(target)
        })
        .collect()
}

/// The processes other than this one that have the file at `image` open
/// (by device and inode), as far as /proc lets this user see: a QEMU
/// booting it by hand holds no strata lock, and neither does a `dd`.
pub fn opened_by_others(image: &Path) -> Vec<Holder> {
    let Ok(md) = std::fs::metadata(image) else {
        return Vec::new();
    };
    if !md.is_file() {
        return Vec::new();
    }
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && has_open(*pid, md.dev(), md.ino()))
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .map(|pid| Holder {
            pid: Some(pid),
            command: command_line(pid),
        })
        .collect()
}

/// For a writer holding the exclusive lock, after cleaning what killed
/// strata runs left (their mounts; their loop devices detach themselves,
/// `loopdev`): any loop device still bound to the image is someone
/// else's, and so is any other process that has it open. Refused, naming
/// the devices and their mounts, or the processes.
pub fn refuse_attached(image: &Path) -> Result<(), LockError> {
    let loops = attached_loops(image);
    if !loops.is_empty() {
        return Err(LockError::Attached {
            path: image.to_owned(),
            loops,
        });
    }
    let holders = opened_by_others(image);
    if !holders.is_empty() {
        return Err(LockError::OpenElsewhere {
            path: image.to_owned(),
            holders,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: FLOCK  ADVISORY  WRITE 4242 00:1d:131 0 EOF
1: -> FLOCK  ADVISORY  WRITE 4343 00:1d:131 0 EOF
2: POSIX  ADVISORY  WRITE 99 00:1d:131 0 EOF
3: FLOCK  ADVISORY  READ 77 fd:01:131 0 EOF
4: OFDLCK ADVISORY  READ  -1 00:06:9 100 101
5: FLOCK  ADVISORY  READ 78 00:1d:1310 0 EOF
";

    #[test]
    fn holders_are_the_granted_flocks_on_the_inode() {
        assert_eq!(flock_pids(LOCKS, 131), [4242, 77]);
        assert_eq!(flock_pids(LOCKS, 9), Vec::<u32>::new());
        assert_eq!(flock_pids("", 131), Vec::<u32>::new());
    }

    #[test]
    fn a_process_that_has_the_image_open_is_named() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        std::fs::write(&img, b"image").unwrap();
        assert!(refuse_attached(&img).is_ok());
        // Our own descriptors (the lock's) are never someone else's.
        let _ours = File::open(&img).unwrap();
        assert!(refuse_attached(&img).is_ok());
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .stdin(File::open(&img).unwrap())
            .spawn()
            .unwrap();
        let err = refuse_attached(&img).unwrap_err();
        let _ = other.kill();
        let _ = other.wait();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {} (sleep 30)", other.id()))
                && msg.contains("stop it first"),
            "{msg}"
        );
        assert_eq!(err.kind(), FailureKind::Input);
        assert!(refuse_attached(&img).is_ok());
    }

    #[test]
    fn mounts_of_a_device() {
        let info = "\
36 25 0:32 / /mnt/my\\040img rw,relatime shared:1 - btrfs /dev/loop7 rw
37 25 0:33 / /tmp/x rw - btrfs /dev/loop70 rw
38 25 0:33 /sub /srv rw - btrfs /dev/loop7 rw
";
        assert_eq!(mounted_from(info, "/dev/loop7"), ["/mnt/my img", "/srv"]);
        assert_eq!(mounted_from(info, "/dev/loop1"), Vec::<String>::new());
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        std::fs::write(&img, b"image").unwrap();
        // flock locks belong to open files: a second open in this process
        // conflicts as another process's would.
        let reader = ImageLock::shared(&img).unwrap();
        let other_reader = ImageLock::shared(&img).unwrap();
        let e = ImageLock::exclusive(&img).unwrap_err();
        assert!(e.is_input(), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("is in use"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop((reader, other_reader));
        let writer = ImageLock::exclusive(&img).unwrap();
        assert_eq!(writer.kind(), LockKind::Exclusive);
        let e = ImageLock::shared(&img).unwrap_err();
        assert!(e.to_string().contains("to change it"), "{e}");
        drop(writer);
        ImageLock::shared(&img).unwrap();

        let e = ImageLock::shared(&d.path().join("missing.img")).unwrap_err();
        assert!(e.is_input());
        assert!(e.to_string().contains("missing.img"), "{e}");
    }

    /// `build --force` renames a new image over the path: a lock taken on
    /// the old file must not pass for a lock on the new one.
    #[test]
    fn the_lock_is_on_what_the_path_names() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        std::fs::write(&img, b"old").unwrap();
        let old = ImageLock::exclusive(&img).unwrap();
        let new = d.path().join(".x.img.new");
        let f = File::create(&new).unwrap();
        lock_new_file(&f, &new).unwrap();
        std::fs::rename(&new, &img).unwrap();
        drop(old);
        assert!(ImageLock::exclusive(&img).is_err(), "the new file is held");
        drop(f);
        ImageLock::exclusive(&img).unwrap();
    }
}
