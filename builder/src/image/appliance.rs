//! An image opened read-only without root: a libguestfs appliance (the
//! same guestfish as the rootless build, `host::guestfish`) mounts its top
//! level, lists the subvolumes, and serves the filesystem over FUSE at a
//! host directory (`mount-local`), where the ordinary reader (`read`,
//! `lint`) reads it like a loop mount. One appliance session:
//!
//! ```text
//! guestfish --ro (script on stdin)       strata
//! run, mount subvolid=5
//! echo BEGIN_LIST; btrfs subvolume list -puq   → subvolumes
//! echo BEGIN_READONLY; … -r                    → read-only flags
//! echo SERVING; mount-local DIR; mount-local-run
//!                                        wait until DIR is a mountpoint
//!                                        read the layout through DIR
//! mount-local-run returns                ← fusermount -u DIR
//! guestfish exits                        wait
//! ```
//!
//! FUSE without `default_permissions`: the kernel does not check modes
//! against the caller, guestfish (root in the appliance) reads any file,
//! so a 0600 root-owned fstab reads as it does through a loop mount as
//! root. Only the mounting user can see the mount (no `allow_other`).
//!
//! guestfish runs in its own process group (a terminal's Ctrl-C reaches
//! only strata, which unmounts and waits) and gets SIGTERM if strata dies.
//! A strata killed by SIGKILL while the image was served leaves a dead FUSE
//! mount on `<tmp>/strata-inspect.<pid>.<random>/fs`: the next appliance
//! session unmounts and removes those nobody holds (`clean_dead`).

use super::{subvolumes, ImageError};
use crate::host::claim::{self, Claim};
use crate::host::cmd;
use crate::host::debris::Cleaned;
use crate::host::guestfish::{self, Accel, Cmd};
use crate::host::interrupt::Interrupt;
use crate::model::Subvolume;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The name of the session's private directory in the temp dir: this, the
/// pid (for humans), a random part. The session claims it (`claim`) and
/// serves the image on `MOUNTPOINT` inside it: a scan opens the directory
/// to judge it, never the FUSE mount, which a dead server would hang.
const DIR_PREFIX: &str = "strata-inspect.";
const MOUNTPOINT: &str = "fs";

/// Marker lines the script echoes between the outputs strata reads.
const BEGIN_LIST: &str = "strata: subvolume list -puq";
const BEGIN_READONLY: &str = "strata: subvolume list -r";
const SERVING: &str = "strata: mount-local";

/// How long the appliance may take to boot and serve the image (TCG on a
/// busy host boots in tens of seconds; this is for a hung QEMU).
const START_DEADLINE: Duration = Duration::from_secs(600);
/// How long guestfish may take to exit after the unmount.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// After SIGTERM to its group, before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);
/// How many of guestfish's last stderr lines an error keeps.
const STDERR_LINES: usize = 20;

/// The guestfish script: list the subvolumes between markers, then serve
/// the top level at `dir` until it is unmounted.
pub fn script(image: &Path, dir: &Path) -> Vec<Cmd> {
    vec![
        Cmd::AddRawReadOnly(image.to_owned()),
        Cmd::Run,
        Cmd::MountTop,
        Cmd::Echo(BEGIN_LIST.into()),
        Cmd::ListSubvolumes("-puq"),
        Cmd::Echo(BEGIN_READONLY.into()),
        Cmd::ListSubvolumes("-r"),
        Cmd::Echo(SERVING.into()),
        Cmd::MountLocal(dir.to_owned()),
        Cmd::MountLocalRun,
    ]
}

/// A running appliance serving an image at `path()`; unmounted, waited
/// for and its directory removed on `close` (or drop).
pub struct Session {
    /// The mountpoint, `MOUNTPOINT` in `private`.
    dir: PathBuf,
    private: PathBuf,
    /// Held on `private` while the session lives (dropped after `Drop`).
    _claim: Claim,
    child: Child,
    stderr: Option<JoinHandle<String>>,
    closed: bool,
}

fn tool(what: &str, cause: impl Into<String>) -> ImageError {
    ImageError::tool(what.to_owned(), cause.into())
}

/// Starts the appliance on `image` and returns once the image is served,
/// with its subvolumes and what dead sessions left that was cleaned.
pub fn open(
    image: &Path,
    accel: Accel,
    interrupt: &Interrupt,
) -> Result<(Session, Vec<Subvolume>, Vec<Cleaned>), ImageError> {
    if let Some(missing) = guestfish::missing(accel) {
        return Err(ImageError::Input(format!(
            "opening {} without root: {missing}",
            image.display()
        )));
    }
    if fusermount().is_none() {
        return Err(ImageError::Input(format!(
            "opening {} without root: fusermount3 not found: install fuse3 \
             (the appliance serves the image to strata over FUSE)",
            image.display()
        )));
    }
    if interrupt.raised() {
        return Err(ImageError::Interrupted);
    }
    let cleaned = clean_dead(&std::env::temp_dir());
    let starting = "starting the libguestfs appliance to read the image";
    // /proc/self/mountinfo names the mountpoint with symlinks resolved.
    let tmp = std::env::temp_dir();
    let tmp = tmp.canonicalize().unwrap_or(tmp);
    let (private, claim) = claim::claimed_dir(&tmp, DIR_PREFIX, "")
        .map_err(|e| tool(starting, format!("creating a mountpoint: {e}")))?;
    let dir = private.join(MOUNTPOINT);
    if let Err(e) = std::fs::create_dir(&dir) {
        let _ = std::fs::remove_dir(&private);
        return Err(tool(starting, format!("creating a mountpoint: {e}")));
    }
    let text = guestfish::render(&script(image, &dir));
    let mut c = guestfish::guestfish(accel);
    c.arg("--ro")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd::tie_to_us(&mut c);
    let mut child = match c.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            let _ = std::fs::remove_dir(&private);
            return Err(tool(starting, format!("running guestfish: {e}")));
        }
    };
    let mut stdin = child.stdin.take().expect("piped");
    // The script is small (far below a pipe's buffer); guestfish reads the
    // rest after mount-local-run returns, then sees the end and exits.
    let _ = stdin.write_all(text.as_bytes());
    drop(stdin);
    let stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            tail.push_back(line);
            if tail.len() > STDERR_LINES {
                tail.pop_front();
            }
        }
        Vec::from(tail).join("\n")
    });
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut session = Session {
        dir,
        private,
        _claim: claim,
        child,
        stderr: Some(stderr),
        closed: false,
    };
    match session.wait_until_served(&lines, interrupt) {
        Ok(subvols) => Ok((session, subvols, cleaned)),
        Err(e) => {
            let (_, stderr) = session.shutdown();
            Err(match e {
                Failed::Interrupted => ImageError::Interrupted,
                Failed::Appliance(what) => tool(starting, format!("{what}: {}", stderr.trim())),
            })
        }
    }
}

enum Failed {
    Interrupted,
    /// What went wrong; guestfish's stderr is added to it.
    Appliance(String),
}

impl Session {
    /// The top level of the image, as served by the appliance.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads the listings off guestfish's stdout, then waits until the
    /// mountpoint is served.
    fn wait_until_served(
        &mut self,
        lines: &Receiver<String>,
        interrupt: &Interrupt,
    ) -> Result<Vec<Subvolume>, Failed> {
        let deadline = Instant::now() + START_DEADLINE;
        let (mut list, mut readonly) = (String::new(), String::new());
        let mut section = None::<&str>;
        let mut served_next = false;
        loop {
            if interrupt.raised() {
                return Err(Failed::Interrupted);
            }
            if Instant::now() > deadline {
                return Err(Failed::Appliance(format!(
                    "the appliance did not serve the image within {}s",
                    START_DEADLINE.as_secs()
                )));
            }
            if served_next && is_mountpoint(&self.dir) {
                return Ok(subvolumes::combine(&list, Some(&readonly)));
            }
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Err(Failed::Appliance(format!("guestfish ended ({status})")));
            }
            match lines.recv_timeout(POLL) {
                Ok(line) => match line.as_str() {
                    BEGIN_LIST => section = Some(BEGIN_LIST),
                    BEGIN_READONLY => section = Some(BEGIN_READONLY),
                    SERVING => {
                        section = None;
                        served_next = true;
                    }
                    _ => {
                        let into = match section {
                            Some(BEGIN_LIST) => &mut list,
                            Some(BEGIN_READONLY) => &mut readonly,
                            _ => continue,
                        };
                        into.push_str(&line);
                        into.push('\n');
                    }
                },
                Err(RecvTimeoutError::Timeout) => {}
                // stdout closed: guestfish is ending; try_wait says how.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(POLL),
            }
        }
    }

    /// Unmounts, waits for guestfish (its group killed if it does not
    /// exit), removes the mountpoint. Returns guestfish's status and the
    /// tail of its stderr. Idempotent.
    ///
    /// Only a served image ends guestfish by itself (the unmount returns
    /// mount-local-run, then its script ends): one never served (Ctrl-C or
    /// the start deadline while the appliance boots) has its group killed
    /// at once instead of after `EXIT_DEADLINE`.
    fn shutdown(&mut self) -> (Option<ExitStatus>, String) {
        if self.closed {
            return (None, String::new());
        }
        self.closed = true;
        let served = is_mountpoint(&self.dir);
        if served {
            unmount(&self.dir, false);
        }
        let mut status = self.child.try_wait().ok().flatten();
        let deadline = Instant::now() + EXIT_DEADLINE;
        while served && status.is_none() && Instant::now() < deadline {
            std::thread::sleep(POLL);
            status = self.child.try_wait().ok().flatten();
        }
        if status.is_none() {
            status = kill_group(&mut self.child);
        }
        // A guestfish killed while serving leaves a dead FUSE mount.
        if is_mountpoint(&self.dir) {
            unmount(&self.dir, true);
        }
        // rmdir only: nothing is ever removed through a mount left behind.
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(&self.private);
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (status, stderr)
    }

    /// Stops serving and reports how guestfish ended.
    pub fn close(mut self) -> Result<(), ImageError> {
        match self.shutdown() {
            (Some(s), _) if s.success() => Ok(()),
            (status, stderr) => Err(tool(
                "stopping the libguestfs appliance",
                format!(
                    "guestfish ended ({}): {}",
                    status.map(|s| s.to_string()).unwrap_or("killed".into()),
                    stderr.trim()
                ),
            )),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Unmounts (lazily: a dead FUSE server answers nothing) and removes the
/// mountpoints in `tmp` of sessions that are gone (`claim::lives`). Only
/// the user's own FUSE mounts can be unmounted by fusermount; others are
/// left. A session's mount is `fs` in the directory it claims; a strata
/// from before claims mounted on the named directory itself, which is
/// judged by its pid and never opened.
fn clean_dead(tmp: &Path) -> Vec<Cleaned> {
    // As mountinfo names them: symlinks resolved.
    let tmp = tmp.canonicalize().unwrap_or_else(|_| tmp.to_owned());
    let mut cleaned = Vec::new();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((pid, rest)) = claim::split_name(&name, DIR_PREFIX) else {
            continue;
        };
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let private = e.path();
        let claimed_layout = rest.starts_with(claim::CLAIMED_TAG);
        let claimed = Some(private.as_path()).filter(|p| !is_mountpoint(p));
        if claim::lives(&claim::Leftover { claimed, pid, rest }) {
            continue;
        }
        let dir = if claimed_layout {
            private.join(MOUNTPOINT)
        } else {
            private.clone()
        };
        if is_mountpoint(&dir) {
            unmount(&dir, true);
            if is_mountpoint(&dir) {
                continue;
            }
            cleaned.push(Cleaned::Unmounted {
                dir: dir.clone(),
                device: "the libguestfs appliance's FUSE mount".into(),
            });
        }
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(&private);
    }
    cleaned
}

/// SIGTERM to the child's process group (guestfish and its QEMU), SIGKILL
/// after `GRACE`.
fn kill_group(child: &mut Child) -> Option<ExitStatus> {
    use rustix::process::{kill_process_group, Pid, Signal};
    let pgid = Pid::from_child(child);
    let _ = kill_process_group(pgid, Signal::TERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(POLL);
    }
    let _ = kill_process_group(pgid, Signal::KILL);
    child.wait().ok()
}

/// fusermount3 (fuse3), else fusermount.
fn fusermount() -> Option<PathBuf> {
    ["fusermount3", "fusermount"]
        .into_iter()
        .find_map(guestfish::on_path)
}

/// `fusermount -u`, lazily when busy (a reader still holding a file) or
/// when `lazy` (a dead server).
fn unmount(dir: &Path, lazy: bool) {
    let Some(program) = fusermount() else { return };
    let run = |lazy: bool| {
        let mut c = Command::new(&program);
        c.arg("-u").arg("-q");
        if lazy {
            c.arg("-z");
        }
        c.arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if lazy || !run(false) {
        run(true);
    }
}

/// Whether `dir` is a mountpoint of this mount namespace, from
/// /proc/self/mountinfo (a stat of a FUSE mount whose server is not
/// answering yet would block).
fn is_mountpoint(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let want = escape_mountinfo(dir.as_os_str().as_bytes());
    std::fs::read("/proc/self/mountinfo")
        .map(|t| {
            t.split(|b| *b == b'\n')
                .any(|l| l.split(|b| *b == b' ').nth(4) == Some(want.as_slice()))
        })
        .unwrap_or(false)
}

/// The kernel's escaping of a path in mountinfo: space, tab, newline and
/// backslash as three-digit octal.
fn escape_mountinfo(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.extend(format!("\\{b:03o}").bytes()),
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_for_an_inspect() {
        insta::assert_snapshot!(guestfish::render(&script(
            Path::new("/var/tmp/my \"sys\".img"),
            Path::new("/tmp/strata-inspect.42.x")
        )));
    }

    /// Interrupted before the image was served (the appliance still
    /// booting, which would never exit on its own): guestfish's group is
    /// killed at once, not after EXIT_DEADLINE.
    #[test]
    fn an_unserved_session_is_killed_at_once() {
        let (private, claim) =
            claim::claimed_dir(&std::env::temp_dir(), "strata-inspect-test.", "").unwrap();
        let dir = private.join(MOUNTPOINT);
        std::fs::create_dir(&dir).unwrap();
        let mut sleep = Command::new("sleep");
        sleep.arg("600");
        cmd::tie_to_us(&mut sleep);
        let child = sleep.spawn().unwrap();
        let mut session = Session {
            dir: dir.clone(),
            private: private.clone(),
            _claim: claim,
            child,
            stderr: None,
            closed: false,
        };
        let started = Instant::now();
        let (status, _) = session.shutdown();
        assert!(started.elapsed() < GRACE, "took {:?}", started.elapsed());
        assert!(status.is_some_and(|s| !s.success()));
        assert!(!dir.exists(), "the mountpoint is removed");
        assert!(!private.exists(), "its directory is removed");
    }

    #[test]
    fn mountinfo_escaping() {
        assert_eq!(escape_mountinfo(b"/tmp/a b\\c"), b"/tmp/a\\040b\\134c");
        // What the kernel escapes, the one mountinfo reader decodes back.
        let odd = b"/tmp/a b\tc\nd\\e\\040f\xff";
        let read = crate::octal::unescape(&escape_mountinfo(odd), &crate::octal::LIBMOUNT);
        assert_eq!(read.unwrap(), odd);
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }
}
