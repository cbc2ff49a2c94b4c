//! `shutdown`: the clean reboot put every mount away and stopped every
//! unit in time. The mirror of overmount at the other end of a boot: a
//! state dir that a process keeps busy is not unmounted by systemd
//! ("[FAILED] Failed unmounting srv.mount - /srv.") and is only torn down
//! by systemd-shutdown after it killed everything; a unit that ignores
//! SIGTERM holds the reboot for its whole stop timeout.
//!
//! Judged from the console between `systemctl reboot` and the next kernel
//! (the console is where it shows: journald gives up /var/log/journal
//! before the state dirs are unmounted, so what follows is in the volatile
//! journal, lost by the reboot), and from the previous boot's journal
//! (`journalctl -b -1 -o json`) when there is one.
//!
//! systemd-shutdown retries what it cannot unmount at first; a "Failed to
//! unmount" of a try that a later "All filesystems unmounted." proves
//! transient is not a failure.

use super::boot_health::{clean_console_line, console_lines, split_at_next_kernel};
use crate::journal::{self, Entry};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use regex::Regex;
use serde::Serialize;
use std::sync::LazyLock;

/// The check's name in the report, `--checks` and JUnit.
pub const NAME: &str = "shutdown";

/// The guest command for the previous boot's journal.
pub const PREVIOUS_JOURNAL_COMMAND: &str = "journalctl -b -1 -o json --no-pager";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A mount that failed to unmount, hung unmounting, or could not be
    /// remounted read-only.
    FailedUnmount,
    /// A unit that did not stop within its stop timeout.
    StopTimeout,
}

impl ProblemKind {
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::FailedUnmount => "failed unmount",
            ProblemKind::StopTimeout => "stop timeout",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Console,
    Journal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The mount point or unit it is about ("/srv", "busy.service"), or
    /// "file systems" for systemd-shutdown's summary.
    pub subject: String,
    pub source: Source,
    /// The line, cleaned as boot-health cleans console lines.
    pub line: String,
}

/// One pattern: a kind, how to find it, which capture group names the
/// subject, and whether the line is a try systemd-shutdown repeats (see
/// the module doc).
struct Pattern {
    kind: ProblemKind,
    re: Regex,
    retried: bool,
}

/// The wording of systemd 252 (and later) for each, from the manager
/// (PID 1, unit log prefix "x.service: "), from systemd-shutdown and its
/// `(sd-umount)`/`(sd-remount)` children, and from umount(8) in a mount
/// unit's stop. The first capture group is the subject.
static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    let p = |kind, re: &str, retried| Pattern {
        kind,
        re: Regex::new(re).expect("shutdown pattern"),
        retried,
    };
    use ProblemKind::*;
    vec![
        // PID 1, a mount unit's stop job failed: "Failed unmounting
        // srv.mount - /srv." (the description of a mount unit is its path).
        p(
            FailedUnmount,
            r"Failed unmounting (\S+?)(?: - (/.*?))?\.?$",
            false,
        ),
        p(
            FailedUnmount,
            r"Timed out unmounting (\S+?)(?: - (/.*?))?\.?$",
            false,
        ),
        // The mount unit's own umount(8) ran out of time.
        p(
            FailedUnmount,
            r"^(\S+\.mount): Unmounting timed out\.",
            false,
        ),
        p(FailedUnmount, r"Could not unmount (/\S*?):? ", false),
        p(FailedUnmount, r"^umount: (/\S*?): target is busy", false),
        // systemd-shutdown's children; retried until nothing changes.
        p(FailedUnmount, r"Failed to unmount (/\S*?): ", true),
        p(FailedUnmount, r"Failed to remount '(.+?)' read-only", true),
        p(FailedUnmount, r"Unmounting '(.+?)' timed out", false),
        p(FailedUnmount, r"Remounting '(.+?)' timed out", false),
        // systemd-shutdown's verdict after its last try.
        p(
            FailedUnmount,
            r"(?:Failed to finalize|Unable to finalize remaining|Cannot finalize remaining) (file systems)",
            false,
        ),
        p(FailedUnmount, r"Not all (file systems) unmounted", false),
        p(
            StopTimeout,
            r"^(\S+): State '(?:stop|final)[\w-]*' timed out",
            false,
        ),
        p(StopTimeout, r"^(\S+): Stopping timed out\.", false),
        p(StopTimeout, r"^(\S+): Failed with result 'timeout'", false),
        p(
            StopTimeout,
            r"Timed out stopping (\S+?)(?: - .*)?\.?$",
            false,
        ),
    ]
});

/// "A stop job is running for busy.service - Busy (1min 30s / 1min 30s)":
/// the unit, the time so far and the limit.
static STOP_JOB: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"A stop job is running for (.+?) \(([^/()]+) / ([^/()]+)\)")
        .expect("stop job pattern")
});

/// "1min 30s", "5s", "2min", "1h 2min 3s", "no limit" (None).
fn seconds(span: &str) -> Option<u64> {
    let mut total = 0;
    let mut any = false;
    for part in span.split_whitespace() {
        let digits = part.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &part[digits.len()..];
        let n: u64 = digits.parse().ok()?;
        total += n * match unit {
            "h" => 3600,
            "min" => 60,
            "s" => 1,
            "ms" => 0,
            _ => return None,
        };
        any = true;
    }
    any.then_some(total)
}

/// A line's problem, if it is one; `retried` tells a systemd-shutdown
/// try apart.
fn classify(line: &str) -> Option<(ProblemKind, String, bool)> {
    for p in PATTERNS.iter() {
        if let Some(c) = p.re.captures(line) {
            // A mount unit's path is its description, else its name.
            let subject = c
                .get(2)
                .map(|m| m.as_str().to_owned())
                .or_else(|| {
                    let unit = c.get(1)?.as_str();
                    if unit.contains('…') {
                        return Some(unit.to_owned());
                    }
                    journal::mount_unit_path(unit).or_else(|| Some(unit.to_owned()))
                })
                .unwrap_or_default();
            return Some((p.kind, subject, p.retried));
        }
    }
    // The stop job's last redraw shows whether it ran out of time.
    let c = STOP_JOB.captures(line)?;
    let (so_far, limit) = (seconds(&c[2])?, seconds(&c[3])?);
    (so_far >= limit).then(|| {
        let unit = c[1].split(" - ").next().unwrap_or(&c[1]).to_owned();
        (ProblemKind::StopTimeout, unit, false)
    })
}

/// Journal entries that speak for the shutdown: the kernel, the service
/// manager, systemd-shutdown and its children, umount(8). The previous
/// boot's journal also holds qemu-guest-agent's log of every command the
/// checks ran; those are left out.
fn speaks_for_the_shutdown(e: &Entry) -> bool {
    let ident = e.get("SYSLOG_IDENTIFIER").unwrap_or_default();
    e.get("_TRANSPORT").as_deref() == Some("kernel")
        || e.get("_PID").as_deref() == Some("1")
        || ident.starts_with("systemd")
        || ident.starts_with("(sd-")
        || ident == "umount"
}

/// What the shutdown's console and journal show, deduplicated by kind and
/// subject (the first line wins); and the slow stop jobs that still
/// finished in time (for the record).
pub fn problems(console: &str, journal: Option<&str>) -> (Vec<Problem>, Vec<String>) {
    let (shutdown, _) = split_at_next_kernel(console);
    let mut lines: Vec<(Source, String)> = console_lines(shutdown)
        .map(|l| (Source::Console, clean_console_line(l)))
        .collect();
    for entry in journal.map(journal::entries).into_iter().flatten() {
        let e = Entry(&entry);
        if speaks_for_the_shutdown(&e) {
            let m = e.get("MESSAGE").unwrap_or_default();
            lines.push((Source::Journal, m.trim().to_owned()));
        }
    }
    // systemd-shutdown's own verdict makes its earlier failed tries moot.
    let all_unmounted = lines
        .iter()
        .any(|(_, l)| l.contains("All filesystems unmounted."));
    let mut out: Vec<Problem> = Vec::new();
    let mut slow: Vec<String> = Vec::new();
    for (source, line) in lines {
        // Strip "systemd[1]: " / "(sd-umount)[407]: " so the patterns
        // anchored at the unit name match kernel-buffer lines too.
        let text = unprefixed(&line);
        match classify(text) {
            Some((_, _, true)) if all_unmounted => {}
            Some((kind, subject, _)) => {
                if !out.iter().any(|p| p.kind == kind && p.subject == subject) {
                    out.push(Problem {
                        kind,
                        subject,
                        source,
                        line,
                    });
                }
            }
            None => {
                if let Some(c) = STOP_JOB.captures(text) {
                    let unit = c[1].split(" - ").next().unwrap_or(&c[1]).to_owned();
                    if !slow.contains(&unit) {
                        slow.push(unit);
                    }
                }
            }
        }
    }
    slow.retain(|u| {
        !out.iter()
            .any(|p| p.kind == ProblemKind::StopTimeout && &p.subject == u)
    });
    (out, slow)
}

fn unprefixed(line: &str) -> &str {
    static PREFIX: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[\w@.:()-]+\[\d+\]: ").expect("prefix pattern"));
    match PREFIX.find(line) {
        Some(m) => &line[m.end()..],
        None => line,
    }
}

/// The verdict on the shutdown of boot `boot`. `console`: the serial log
/// from `systemctl reboot` on (what follows the next kernel's first line
/// is cut off here); `journal`: [`PREVIOUS_JOURNAL_COMMAND`]'s output in
/// the next boot, when it could be read.
pub fn judge(boot: u32, console: &str, journal: Option<&str>, ignore: &[Regex]) -> CheckResult {
    let (found, slow) = problems(console, journal);
    let (kept, excused): (Vec<Problem>, Vec<Problem>) = found
        .into_iter()
        .partition(|p| !ignore.iter().any(|re| re.is_match(&p.line)));
    let n_lines = console_lines(split_at_next_kernel(console).0).count();
    let journal_note = match journal {
        Some(j) => format!(
            " and {} entries of its journal",
            journal::entries(j).count()
        ),
        None => String::new(),
    };
    let excused_note = match excused.len() {
        0 => String::new(),
        1 => "; 1 line excused by ignore".to_owned(),
        n => format!("; {n} lines excused by ignore"),
    };
    let mut evidence: Vec<String> = kept.iter().map(render).collect();
    if !slow.is_empty() {
        evidence.push(format!(
            "slow to stop, within its timeout: {}",
            slow.join(" ")
        ));
    }
    evidence.extend(excused.iter().map(|p| format!("excused: {}", render(p))));
    if kept.is_empty() {
        return CheckResult::new(
            NAME,
            Status::Pass,
            format!(
                "shutdown of boot {boot}: {n_lines} lines of console{journal_note}, \
                 no failed unmount, no stop timeout{excused_note}"
            ),
            evidence,
        );
    }
    let mut what: Vec<String> = Vec::new();
    for kind in [ProblemKind::FailedUnmount, ProblemKind::StopTimeout] {
        let subjects: Vec<&str> = kept
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.subject.as_str())
            .collect();
        if !subjects.is_empty() {
            what.push(format!("{} of {}", kind.name(), subjects.join(" ")));
        }
    }
    CheckResult::new(
        NAME,
        Status::Fail,
        format!("shutdown of boot {boot}: {}{excused_note}", what.join("; ")),
        evidence,
    )
}

fn render(p: &Problem) -> String {
    let source = match p.source {
        Source::Console => "console",
        Source::Journal => "journal",
    };
    format!("{} ({source}): {}", p.subject, p.line)
}

/// [`PREVIOUS_JOURNAL_COMMAND`] in the guest. Fails (in the guest) when
/// the journal is volatile and there is no previous boot to read.
pub async fn previous_journal(m: &mut Machine) -> Result<String, MachineError> {
    m.succeed(PREVIOUS_JOURNAL_COMMAND).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> String {
        let path = format!("{}/../fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn found(console: &str) -> Vec<(ProblemKind, String)> {
        problems(console, None)
            .0
            .into_iter()
            .map(|p| (p.kind, p.subject))
            .collect()
    }
    /// The clean run's first shutdown: from boot 1's login prompt (where
    /// the reboot's first status line is glued) on.
    fn clean_shutdown() -> String {
        let log = fixture("console/clean-run-serial.log");
        let at = log
            .find("strata-guest login: [")
            .expect("boot 1's login prompt");
        log[at..].to_owned()
    }

    #[test]
    fn a_clean_reboot_passes_and_says_what_was_read() {
        let console = clean_shutdown();
        assert_eq!(found(&console), vec![]);
        let r = judge(1, &console, None, &[]);
        assert_eq!(r.status, Status::Pass);
        // Up to the next kernel only, not the rest of the log.
        assert_eq!(
            r.detail,
            "shutdown of boot 1: 101 lines of console, no failed unmount, no stop timeout"
        );
        assert_eq!(r.evidence, Vec::<String>::new());
        // The previous boot's journal (a real one) adds nothing to find.
        let j = fixture("journal/clean-run-boot1.json");
        let r = judge(1, &console, Some(&j), &[]);
        assert_eq!(r.status, Status::Pass);
        assert!(
            r.detail.contains("and 641 entries of its journal"),
            "{}",
            r.detail
        );
    }

    #[test]
    fn a_state_dir_kept_busy_fails_naming_the_mount_point() {
        // Real: a process left in /srv by KillMode=none through the reboot.
        let console = fixture("console/busy-srv-shutdown.log");
        let (p, slow) = problems(&console, None);
        assert_eq!(slow, Vec::<String>::new());
        assert_eq!(
            p,
            [Problem {
                kind: ProblemKind::FailedUnmount,
                subject: "/srv".into(),
                source: Source::Console,
                line: "Failed unmounting srv.mount - /srv.".into(),
            }]
        );
        let r = judge(4, &console, None, &[]);
        insta::assert_json_snapshot!("shutdown-busy-srv", r);
        // Excused: a pass that counts it.
        let r = judge(4, &console, None, &[Regex::new(r"srv\.mount").unwrap()]);
        assert_eq!(r.status, Status::Pass);
        assert!(
            r.detail.ends_with("; 1 line excused by ignore"),
            "{}",
            r.detail
        );
        assert_eq!(
            r.evidence,
            ["excused: /srv (console): Failed unmounting srv.mount - /srv."]
        );
    }

    #[test]
    fn every_failed_unmount_wording() {
        for (line, subject) in [
            ("[\x1b[0;1;31mFAILED\x1b[0m] Failed unmounting \x1b[0;1;39mvar.mount\x1b[0m - /var.\r", "/var"),
            ("[FAILED] Failed unmounting var.mount.", "/var"),
            ("[ TIME ] Timed out unmounting srv-www.mount - /srv/www.", "/srv/www"),
            ("[   90.1] systemd-shutdown[1]: Could not unmount /var: Device or resource busy", "/var"),
            ("umount: /srv: target is busy.", "/srv"),
            ("[  200.0] systemd[1]: srv.mount: Unmounting timed out. Terminating.", "/srv"),
            ("[  120.0] systemd-shutdown[1]: Unmounting '/var' timed out, issuing SIGKILL to PID 407.", "/var"),
            ("[  120.0] systemd-shutdown[1]: Remounting '/var' timed out, issuing SIGKILL to PID 406.", "/var"),
            ("[  381.799399] shutdown[1]: Unable to finalize remaining file systems, loop devices, ignoring.", "file systems"),
            ("[  381.7] systemd-shutdown[1]: Failed to finalize file systems, ignoring.", "file systems"),
            ("[  381.7] systemd-shutdown[1]: Not all file systems unmounted, 1 left.", "file systems"),
            // Without systemd-shutdown's "All filesystems unmounted." the
            // failed tries stand.
            ("[ 3117.367215] (sd-umoun[2073]: Failed to unmount /srv: Device or resource busy", "/srv"),
            ("[ 3117.347740] (sd-remount)[2072]: Failed to remount '/srv' read-only: Device or resource busy", "/srv"),
        ] {
            assert_eq!(found(line), vec![(ProblemKind::FailedUnmount, subject.to_owned())], "{line}");
        }
    }

    #[test]
    fn normal_shutdown_lines_are_not_problems() {
        for line in [
            "         Unmounting srv.mount - /srv...",
            "[  OK  ] Unmounted srv.mount - /srv.",
            "[  OK  ] Reached target umount.target - Unmount All Filesystems.",
            "[   28.596775] systemd-shutdown[1]: Unmounting file systems.",
            "[   28.619585] (sd-remount)[406]: Remounting '/srv' read-only with options 'space_cache=v2,subvolid=260,subvol=/state/srv'.",
            "[   28.663199] (sd-umount)[407]: Unmounting '/srv'.",
            "[   28.703343] systemd-shutdown[1]: All filesystems, swaps, loop devices, MD devices and DM devices detached.",
            "[  OK  ] Stopped busy.service - /usr/bin/sleep infinity.",
            "[   16.003560] systemd-journald[215]: Received SIGTERM from PID 1 (systemd-shutdow).",
            // A slow stop that ended in time.
            "[  ***] A stop job is running for busy.service (12s / 1min 30s)",
            "[  ***] A stop job is running for slow.service (25s / no limit)",
        ] {
            assert_eq!(found(line), vec![], "{line}");
        }
        // A failed try that systemd-shutdown's retry made good.
        let retried =
            "[   28.6] (sd-umount)[407]: Failed to unmount /srv: Device or resource busy\n\
                       [   28.7] (sd-umount)[409]: Unmounting '/srv'.\n\
                       [   28.8] systemd-shutdown[1]: All filesystems unmounted.\n";
        assert_eq!(found(retried), vec![]);
    }

    #[test]
    fn every_stop_timeout_wording() {
        for (line, unit) in [
            // Real wording of systemd's unit log (systemd 252 and others).
            ("[  100.0] systemd[1]: nginx.service: State 'stop-sigterm' timed out. Killing.", "nginx.service"),
            ("[  100.0] systemd[1]: busy.service: State 'final-sigterm' timed out. Killing.", "busy.service"),
            ("[  100.0] systemd[1]: networking.service: Stopping timed out. Terminating.", "networking.service"),
            ("[  100.0] systemd[1]: session-3.scope: Stopping timed out. Killing.", "session-3.scope"),
            ("[  100.0] systemd[1]: systemd-journal-flush.service: Failed with result 'timeout'.", "systemd-journal-flush.service"),
            ("[ TIME ] Timed out stopping busy.service - Busy.", "busy.service"),
            // The stop job's status line at its limit.
            ("\r\x1b[K[    \x1b[0;31m*\x1b[0;1;31m*\x1b[0m\x1b[0;31m* \x1b[0m] A stop job is running for busy.service - Busy (1min 30s / 1min 30s)", "busy.service"),
        ] {
            let want = vec![(ProblemKind::StopTimeout, unit.to_owned())];
            assert_eq!(found(line), want, "{line}");
        }
    }

    #[test]
    fn a_hung_stop_is_one_problem_and_a_slow_one_is_noted() {
        // Redraws in place, then the timeout, as the console shows them.
        let console = concat!(
            "\r\x1b[K[  *** ] A stop job is running for busy.service - Busy (3s / 10s)",
            "\r\x1b[K[ ***  ] A stop job is running for busy.service - Busy (9s / 10s)",
            "\r\x1b[K[  *** ] A stop job is running for slow.service - Slow (4s / 1min 30s)\r\n",
            "[   40.0] systemd[1]: busy.service: State 'stop-sigterm' timed out. Killing.\r\n",
            "[   40.1] systemd[1]: busy.service: Killing process 612 (sleep) with signal SIGKILL.\r\n",
            "[   40.2] systemd[1]: busy.service: Failed with result 'timeout'.\r\n",
            "[  OK  ] Stopped busy.service - Busy.\r\n",
            "[  OK  ] Stopped slow.service - Slow.\r\n",
        );
        let (p, slow) = problems(console, None);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].subject, "busy.service");
        assert_eq!(
            p[0].line,
            "systemd[1]: busy.service: State 'stop-sigterm' timed out. Killing."
        );
        assert_eq!(slow, ["slow.service"]);
        let r = judge(2, console, None, &[]);
        assert_eq!(r.detail, "shutdown of boot 2: stop timeout of busy.service");
        assert_eq!(
            r.evidence,
            [
                "busy.service (console): systemd[1]: busy.service: State 'stop-sigterm' timed out. Killing.",
                "slow to stop, within its timeout: slow.service",
            ]
        );
    }

    #[test]
    fn the_previous_boots_journal_counts_but_not_its_guest_agent_log() {
        let line = |ident: &str, pid: &str, msg: &str| {
            serde_json::json!({"_TRANSPORT": "journal", "SYSLOG_IDENTIFIER": ident, "_PID": pid, "MESSAGE": msg})
                .to_string()
        };
        let j = [
            line(
                "qemu-ga",
                "402",
                "info: guest-exec called: \"/bin/sh -c grep 'Failed unmounting' /x\"",
            ),
            line("systemd", "1", "Failed unmounting srv.mount - /srv."),
            line("umount", "512", "umount: /srv: target is busy."),
        ]
        .join("\n");
        let (p, _) = problems("", Some(&j));
        // One problem per mount point: the first line names it.
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].source, p[0].subject.as_str()),
            (Source::Journal, "/srv")
        );
    }

    #[test]
    fn stop_job_spans() {
        assert_eq!(seconds("1min 30s"), Some(90));
        assert_eq!(seconds("5s"), Some(5));
        assert_eq!(seconds("1h 2min 3s"), Some(3723));
        assert_eq!(seconds("no limit"), None);
        assert_eq!(seconds(""), None);
    }
}
