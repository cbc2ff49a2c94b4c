//! Watches the serial console log QEMU writes: when the kernel started (for
//! the firmware/kernel split and for telling a stuck KVM guest from a slow
//! one) and whether the guest printed something that means it will never
//! come up, so a dead boot fails in seconds instead of at the timeout.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Console lines after which the guest cannot reach multi-user on its own.
const FATAL: &[&str] = &[
    "Kernel panic - not syncing",
    "Gave up waiting for root file system device",
    "ALERT! ",
    "Dropping to a shell!",
    // initramfs-tools when the root subvolume it was told to mount is not
    // there (a menu naming a version that does not exist): its shell next.
    "as root file system.",
    "Could not find kernel image",
    "Invalid or corrupt kernel image",
    "No DEFAULT or UI configuration directive found",
    "Failed to load ldlinux.c32",
    "You are in emergency mode",
    "-- System halted",
];

#[derive(Debug, Default, Clone)]
pub struct SerialState {
    pub bytes: u64,
    /// Host instant at which the kernel's clock read zero, estimated from the
    /// printk timestamps seen so far (the tightest bound wins).
    pub kernel_start: Option<Instant>,
    /// The first fatal console line of the current boot.
    pub fatal: Option<String>,
    /// When the console first showed the guest up this boot (systemd
    /// reached multi-user, or a getty printed a login prompt), and the line.
    pub up: Option<(Instant, String)>,
    partial: String,
    /// The last printk timestamp seen: one far below it is a new kernel.
    last_printk: Option<f64>,
    /// Set by `new_boot` until the next kernel's clock is seen: lines read
    /// meanwhile may still be the previous kernel's (a reboot's last lines
    /// read late).
    awaiting_kernel: bool,
    /// `fatal` / `up` were set while `awaiting_kernel`: the new kernel's
    /// first line proves they were the previous kernel's, and clears them.
    fatal_unsure: bool,
    up_unsure: bool,
}

#[derive(Clone)]
pub struct SerialWatch {
    path: PathBuf,
    state: Arc<Mutex<SerialState>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for SerialWatch {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl SerialWatch {
    /// Follows `path` (QEMU may not have created it yet) from byte `offset`.
    pub fn follow(path: PathBuf, offset: u64) -> SerialWatch {
        let state = Arc::new(Mutex::new(SerialState {
            bytes: offset,
            ..Default::default()
        }));
        let task = tokio::spawn(poll(path.clone(), state.clone()));
        SerialWatch {
            path,
            state,
            task: Arc::new(task),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn snapshot(&self) -> SerialState {
        self.state.lock().expect("serial state poisoned").clone()
    }

    /// Forgets fatal lines and kernel timing from the previous boot.
    pub fn new_boot(&self) {
        let mut s = self.state.lock().expect("serial state poisoned");
        s.kernel_start = None;
        s.fatal = None;
        s.up = None;
        s.awaiting_kernel = true;
        s.fatal_unsure = false;
        s.up_unsure = false;
    }
}

async fn poll(path: PathBuf, state: Arc<Mutex<SerialState>>) {
    let mut file = None;
    let mut buf = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        let Some(f) = file.as_mut() else { continue };
        let offset = state.lock().expect("serial state poisoned").bytes;
        if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
            continue;
        }
        buf.clear();
        if f.read_to_end(&mut buf).await.is_err() || buf.is_empty() {
            continue;
        }
        let now = Instant::now();
        let mut s = state.lock().expect("serial state poisoned");
        s.bytes += buf.len() as u64;
        let mut text = std::mem::take(&mut s.partial);
        text.push_str(&String::from_utf8_lossy(&buf));
        let complete = match text.rfind('\n') {
            Some(i) => {
                s.partial = text[i + 1..].to_owned();
                &text[..i]
            }
            None => {
                s.partial = text.clone();
                ""
            }
        };
        let mut newest: Option<f64> = None;
        for line in complete.lines() {
            if let Some(t) = printk_time(line) {
                // The previous kernel's last lines (a reboot's) may be read
                // after `new_boot`: its clock must not stand for the new one.
                if s.last_printk.is_some_and(|last| is_new_kernel(last, t)) {
                    s.kernel_start = None;
                    newest = None;
                    // So may its fatal line or login prompt: set since
                    // new_boot but before this kernel, they are not this
                    // boot's. Only the first kernel after new_boot clears
                    // them (a later one follows this boot's own reboot).
                    if std::mem::take(&mut s.awaiting_kernel) {
                        if std::mem::take(&mut s.fatal_unsure) {
                            s.fatal = None;
                        }
                        if std::mem::take(&mut s.up_unsure) {
                            s.up = None;
                        }
                    }
                }
                s.last_printk = Some(t);
                newest = Some(newest.map_or(t, |n: f64| n.max(t)));
            }
            if s.fatal.is_none() && is_fatal(line) {
                s.fatal = Some(line.trim().to_owned());
                s.fatal_unsure = s.awaiting_kernel;
            }
            if s.up.is_none() && shows_guest_up(line) {
                s.up = Some((now, plain(line).trim().to_owned()));
                s.up_unsure = s.awaiting_kernel;
            }
        }
        // A login prompt waits for input: it never ends its line.
        if s.up.is_none() && shows_guest_up(&s.partial) {
            s.up = Some((now, plain(&s.partial).trim().to_owned()));
            s.up_unsure = s.awaiting_kernel;
        }
        // A line stamped t was printed no later than now, so now - t bounds
        // the kernel's start from above; keep the tightest bound.
        if let Some(t) = newest {
            if let Some(start) = now.checked_sub(Duration::from_secs_f64(t)) {
                s.kernel_start = Some(s.kernel_start.map_or(start, |k| k.min(start)));
            }
        }
    }
}

/// Whether printk time `t` after `last` starts a new kernel's clock rather
/// than following the running one's (lines of two CPUs may come a little
/// out of order; a reboot starts again from zero).
fn is_new_kernel(last: f64, t: f64) -> bool {
    t + 1.0 < last
}

fn is_fatal(line: &str) -> bool {
    FATAL.iter().any(|p| line.contains(p))
}

/// Whether a console line says the guest reached multi-user: systemd's
/// status line (unit name since systemd 250, description before) or a
/// getty's login prompt.
pub fn shows_guest_up(line: &str) -> bool {
    let line = plain(line);
    let line = line.trim();
    let reached = line.contains("Reached target")
        && [
            "multi-user.target",
            "Multi-User System",
            "graphical.target",
            "Graphical Interface",
        ]
        .iter()
        .any(|t| line.contains(t));
    reached || line.ends_with(" login:")
}

/// The text of a console line without terminal escape sequences (systemd
/// colours its status lines: `[\x1b[0;32m  OK  \x1b[0m] Reached target
/// \x1b[0;1;39mmulti-user.target\x1b[0m …`).
pub(crate) fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// The printk timestamp of a console line: `[    1.234567] ...`.
pub fn printk_time(line: &str) -> Option<f64> {
    let rest = line
        .trim_start_matches(|c: char| c.is_control())
        .strip_prefix('[')?;
    let (num, _) = rest.split_once(']')?;
    num.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printk_timestamps() {
        assert_eq!(
            printk_time("[    1.234567] Linux version 6.1"),
            Some(1.234567)
        );
        assert_eq!(printk_time("[  OK  ] Started foo"), None);
        assert_eq!(printk_time("plain text"), None);
    }

    #[test]
    fn fatal_lines() {
        assert!(is_fatal(
            "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root"
        ));
        assert!(is_fatal(
            "ALERT!  UUID=1234 does not exist.  Dropping to a shell!"
        ));
        assert!(is_fatal("Failed to mount /dev/vda as root file system."));
        assert!(!is_fatal("[  OK  ] Reached target multi-user.target"));
    }

    #[test]
    fn multi_user_and_login_prompts_show_the_guest_up() {
        // systemd 252 (Debian 12), coloured as on a serial console.
        assert!(shows_guest_up(
            "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r"
        ));
        // systemd 247: the description only.
        assert!(shows_guest_up("[  OK  ] Reached target Multi-User System."));
        assert!(shows_guest_up("debian login: "));
        assert!(!shows_guest_up(
            "[  OK  ] Reached target local-fs.target - Local File Systems."
        ));
        assert!(!shows_guest_up(
            "[  OK  ] Stopped target multi-user.target - Multi-User System."
        ));
        assert!(!shows_guest_up("Last login: Tue Nov 26 on ttyS0"));
    }

    #[tokio::test]
    async fn a_login_prompt_without_a_newline_shows_the_guest_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let watch = SerialWatch::follow(path.clone(), 0);
        std::fs::write(
            &path,
            "Debian GNU/Linux 12 debian ttyS0\r\n\r\ndebian login: ",
        )
        .unwrap();
        eventually(&watch, |s| s.up.is_some()).await;
        assert_eq!(watch.snapshot().up.unwrap().1, "debian login:");
        watch.new_boot();
        assert!(watch.snapshot().up.is_none());
    }

    /// Polls `cond` until it holds (the watcher polls every 100 ms; a loaded
    /// CI machine may take longer than a fixed sleep would allow).
    async fn eventually(watch: &SerialWatch, cond: impl Fn(&SerialState) -> bool) {
        for _ in 0..100 {
            if cond(&watch.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("condition not reached: {:?}", watch.snapshot());
    }

    #[test]
    fn only_a_clock_far_behind_is_a_new_kernel() {
        assert!(is_new_kernel(45.9, 0.0));
        assert!(is_new_kernel(45.9, 2.1));
        assert!(!is_new_kernel(1.234, 1.233), "two CPUs' lines interleaved");
        assert!(!is_new_kernel(0.5, 0.0));
    }

    #[tokio::test]
    async fn a_reboots_last_lines_read_late_do_not_date_the_next_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let watch = SerialWatch::follow(path.clone(), 0);
        // The reboot's last line reaches the watcher only after new_boot,
        // in one read with the next kernel's first lines.
        watch.new_boot();
        std::fs::write(
            &path,
            "[   45.954259] reboot: Restarting system\n[    0.000000] Linux version\n[    0.200000] x\n",
        )
        .unwrap();
        eventually(&watch, |s| s.kernel_start.is_some()).await;
        let k = watch.snapshot().kernel_start.unwrap();
        // Dated by the new kernel's 0.2 s, not the old one's 45.9 s.
        assert!(k.elapsed() < Duration::from_secs(10), "{:?}", k.elapsed());
    }

    /// The old kernel's fatal line and login prompt, read only after
    /// new_boot, are forgotten once the next kernel's clock shows they came
    /// before it; the new kernel's own fatal line is kept.
    #[tokio::test]
    async fn a_reboots_late_fatal_and_login_lines_are_not_the_next_boots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let watch = SerialWatch::follow(path.clone(), 0);
        std::fs::write(
            &path,
            "[   40.000000] running
",
        )
        .unwrap();
        eventually(&watch, |s| s.kernel_start.is_some()).await;
        watch.new_boot();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(
            &mut f,
            b"[   45.900000] Kernel panic - not syncing: old
debian login: 
",
        )
        .unwrap();
        eventually(&watch, |s| s.fatal.is_some() && s.up.is_some()).await;
        std::io::Write::write_all(
            &mut f,
            b"[    0.000000] Linux version
[    0.200000] x
",
        )
        .unwrap();
        eventually(&watch, |s| s.last_printk == Some(0.2)).await;
        let s = watch.snapshot();
        assert!(s.fatal.is_none(), "{s:?}");
        assert!(s.up.is_none(), "{s:?}");
        std::io::Write::write_all(
            &mut f,
            b"[    1.000000] Kernel panic - not syncing: new
",
        )
        .unwrap();
        eventually(&watch, |s| s.fatal.is_some()).await;
        assert_eq!(
            watch.snapshot().fatal.as_deref(),
            Some("[    1.000000] Kernel panic - not syncing: new")
        );
        // A further reboot of this boot keeps its fatal line.
        std::io::Write::write_all(
            &mut f,
            b"[    0.000000] Linux version
",
        )
        .unwrap();
        eventually(&watch, |s| s.last_printk == Some(0.0)).await;
        assert!(watch.snapshot().fatal.is_some());
    }

    #[tokio::test]
    async fn follows_a_growing_log_and_spots_fatal_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let watch = SerialWatch::follow(path.clone(), 0);
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::fs::write(&path, "SYSLINUX 6.04\r\n[    0.500000] Linux version\n").unwrap();
        eventually(&watch, |s| s.kernel_start.is_some()).await;
        assert!(watch.snapshot().fatal.is_none());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"Gave up waiting for root file system device.\n")
            .unwrap();
        eventually(&watch, |s| s.fatal.is_some()).await;
        assert_eq!(
            watch.snapshot().fatal.as_deref(),
            Some("Gave up waiting for root file system device.")
        );
        watch.new_boot();
        assert!(watch.snapshot().fatal.is_none());
    }
}
