//! `boot-health`: every boot of the run came up without the kernel or
//! systemd saying something went wrong, judged from what the boot printed
//! on the serial console, its journal and `systemctl --failed`:
//! - the kernel: a panic, an Oops, `BUG:`, a `WARNING: CPU` splat, a
//!   general protection fault, a segfault, an OOM kill;
//! - systemd: emergency or rescue mode, failed units, an ordering cycle, a
//!   generator that failed.
//!
//! Lines are matched by the kernel's and systemd's own wording (English,
//! stable for years), on the text as a person would read it: systemd's
//! colour codes and the console's carriage returns stripped. A boot's
//! console also holds every kernel line its journal holds; a line seen in
//! both is one finding.
//!
//! The engine records, per boot, where the boot starts in the run's one
//! serial log ([`SerialWatch::snapshot`]`().bytes` when the boot starts) and
//! takes [`console_between`] those offsets, the boot's journal export and
//! [`failed_units`]; [`judge`] gives the row over all boots. When a guest
//! dies, [`panic_line`] names why.
//!
//! [`SerialWatch::snapshot`]: crate::serial::SerialWatch::snapshot

use crate::journal::{self, Entry};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use crate::serial;
use regex::Regex;
use serde::Serialize;
use std::sync::LazyLock;

/// The check's name in the report, `--checks` and JUnit.
pub const NAME: &str = "boot-health";

/// The guest command whose output [`BootObservation::failed_units`] holds:
/// one unit per line, no header, no footer, no bullet (`--plain`).
pub const FAILED_UNITS_COMMAND: &str = "systemctl --failed --no-legend --plain --no-pager";

/// What one boot showed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootObservation {
    /// The run's boot number (1 for the first boot).
    pub boot: u32,
    /// This boot's part of the serial log (see [`console_between`],
    /// [`split_at_next_kernel`]).
    pub console: String,
    /// `journalctl -b -o json` of this boot (JSON lines, as
    /// [`crate::journal`] reads them); None when it could not be read (the
    /// guest died before it).
    pub journal: Option<String>,
    /// The output of [`FAILED_UNITS_COMMAND`]; None when not asked (the
    /// guest died, or the agent did not answer).
    pub failed_units: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    KernelPanic,
    Oops,
    KernelBug,
    KernelWarning,
    GeneralProtectionFault,
    Segfault,
    OutOfMemory,
    EmergencyMode,
    RescueMode,
    FailedUnit,
    OrderingCycle,
    GeneratorFailed,
}

impl FindingKind {
    /// How the verdict names it.
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::KernelPanic => "kernel panic",
            FindingKind::Oops => "kernel oops",
            FindingKind::KernelBug => "kernel BUG",
            FindingKind::KernelWarning => "kernel warning",
            FindingKind::GeneralProtectionFault => "general protection fault",
            FindingKind::Segfault => "segfault",
            FindingKind::OutOfMemory => "OOM kill",
            FindingKind::EmergencyMode => "emergency mode",
            FindingKind::RescueMode => "rescue mode",
            FindingKind::FailedUnit => "failed unit",
            FindingKind::OrderingCycle => "ordering cycle",
            FindingKind::GeneratorFailed => "generator failure",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Console,
    Journal,
    /// The output of [`FAILED_UNITS_COMMAND`].
    FailedUnits,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Console => "console",
            Source::Journal => "journal",
            Source::FailedUnits => "systemctl --failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub boot: u32,
    pub kind: FindingKind,
    pub source: Source,
    /// The line as a person reads it: no colour codes, no carriage return,
    /// no printk timestamp, no `[FAILED]`-style status marker.
    pub line: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "boot {} ({}): {}",
            self.boot,
            self.source.name(),
            self.line
        )
    }
}

/// Kernel wording, matched case-sensitively: the kernel's own capitals
/// tell "BUG: unable to handle page fault" from "report a bug" and
/// "WARNING: CPU: 0 PID: 1 at …" from "RETBleed: WARNING: Spectre v2
/// mitigation leaves CPU open…".
const KERNEL: &[(&str, FindingKind)] = &[
    ("Kernel panic - not syncing", FindingKind::KernelPanic),
    ("Oops:", FindingKind::Oops),
    ("Oops -", FindingKind::Oops),
    ("BUG: ", FindingKind::KernelBug),
    ("WARNING: CPU", FindingKind::KernelWarning),
    (
        "general protection fault",
        FindingKind::GeneralProtectionFault,
    ),
    ("segfault at ", FindingKind::Segfault),
    ("oom-kill:", FindingKind::OutOfMemory),
];

/// systemd's wording (PID 1, systemd-sulogin-shell on the console).
const SYSTEMD: &[(&str, FindingKind)] = &[
    ("You are in emergency mode", FindingKind::EmergencyMode),
    (
        "Reached target emergency.target",
        FindingKind::EmergencyMode,
    ),
    // systemd before 250 named targets by description only.
    ("Reached target Emergency Mode", FindingKind::EmergencyMode),
    ("You are in rescue mode", FindingKind::RescueMode),
    ("Reached target rescue.target", FindingKind::RescueMode),
    ("Reached target Rescue Mode", FindingKind::RescueMode),
    // A start job that failed, worded by unit type (SD_MESSAGE_UNIT_FAILED).
    ("Failed to start ", FindingKind::FailedUnit),
    ("Failed to mount ", FindingKind::FailedUnit),
    ("Failed to activate swap ", FindingKind::FailedUnit),
    ("Failed to listen on ", FindingKind::FailedUnit),
    (": Failed with result '", FindingKind::FailedUnit),
    ("Found ordering cycle", FindingKind::OrderingCycle),
    ("to break ordering cycle", FindingKind::OrderingCycle),
    ("Unable to break cycle", FindingKind::OrderingCycle),
];

/// Generators are run by PID 1 through exec-util, which names the failing
/// one by its path (".../system-generators/x-generator failed with exit
/// status 1.", "... terminated by signal SEGV.").
static GENERATOR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"generator\S* (failed with exit status|terminated by signal)|(?i:failed to (run|execute|spawn) generators?)",
    )
    .expect("generator pattern")
});

/// "Out of memory: Killed process 412 (stress)" and the memory cgroup's
/// "Memory cgroup out of memory: Killed process …".
static OOM: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)out of memory: killed process").expect("oom pattern"));

/// What a cleaned line reports, if anything.
pub fn classify(line: &str) -> Option<FindingKind> {
    // The panic's closing banner restates its first line: "---[ end Kernel
    // panic - not syncing: … ]---". One panic, one finding.
    if line.starts_with("---[ end ") {
        return None;
    }
    KERNEL
        .iter()
        .chain(SYSTEMD)
        .find(|(p, _)| line.contains(p))
        .map(|(_, k)| *k)
        .or_else(|| OOM.is_match(line).then_some(FindingKind::OutOfMemory))
        .or_else(|| {
            GENERATOR
                .is_match(line)
                .then_some(FindingKind::GeneratorFailed)
        })
}

/// The lines of console text. A carriage return ends a line too: systemd
/// redraws its "A stop job is running…" status in place with `\r`, and
/// each redraw is a line of its own, not one run-on line.
pub fn console_lines(console: &str) -> impl Iterator<Item = &str> {
    console.split(['\n', '\r']).filter(|l| !l.trim().is_empty())
}

/// A console line as a person reads it: colour codes and carriage
/// returns gone, a login prompt the line was glued to dropped (a prompt
/// never ends its line, so whatever the console prints next follows it),
/// then the printk timestamp and systemd's status marker.
pub fn clean_console_line(line: &str) -> String {
    let plain = serial::plain(line);
    let mut s = plain.trim();
    if let Some((_, rest)) = s.split_once(" login: ") {
        if !rest.trim().is_empty() {
            s = rest.trim();
        }
    }
    if serial::printk_time(s).is_some() {
        s = s.split_once(']').map_or(s, |(_, rest)| rest).trim_start();
    }
    strip_status(s).trim().to_owned()
}

/// systemd's status column: "[  OK  ] ", "[FAILED] ", "[ TIME ] ",
/// "[DEPEND] ", and the spinner "[  *** ] " of a job still running.
fn strip_status(s: &str) -> &str {
    let Some(rest) = s.strip_prefix('[') else {
        return s;
    };
    let Some((inner, after)) = rest.split_once(']') else {
        return s;
    };
    let is_status = inner.len() == 6
        && (matches!(
            inner.trim(),
            "OK" | "FAILED" | "TIME" | "DEPEND" | "INFO" | "WARN"
        ) || inner.chars().all(|c| c == '*' || c == ' '));
    if is_status {
        after.trim_start()
    } else {
        s
    }
}

/// What two sightings of one message share: the line without the
/// `systemd[1]: ` (any `name[pid]: `) prefix a message logged through the
/// kernel's buffer carries on the console but not in its journal MESSAGE.
fn key(line: &str) -> &str {
    static PREFIX: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[\w@.:()-]+\[\d+\]: ").expect("prefix pattern"));
    match PREFIX.find(line) {
        Some(m) => &line[m.end()..],
        None => line,
    }
}

/// Whether a console line and a journal message are the same message.
/// systemd shortens unit names on the console to fit the status column
/// ("Failed to start very-long-na…ice - Foo."): the console's text around
/// the ellipsis must begin and end the journal's.
fn same_message(console: &str, journal: &str) -> bool {
    let (c, j) = (key(console), key(journal));
    if c == j {
        return true;
    }
    match c.split_once('…') {
        Some((head, tail)) => {
            j.len() > head.len() + tail.len() && j.starts_with(head) && j.ends_with(tail)
        }
        None => false,
    }
}

/// Journal entries that speak for the kernel or for the service manager.
/// Others are left out: qemu-guest-agent logs every command it runs
/// ("guest-exec called: \"/bin/sh -c grep 'Failed to start' …\""), and a
/// program's own output is its business, not the boot's.
fn speaks_for_the_system(e: &Entry) -> bool {
    e.get("_TRANSPORT").as_deref() == Some("kernel")
        || e.get("SYSLOG_IDENTIFIER").as_deref() == Some("systemd")
        || e.get("_PID").as_deref() == Some("1")
}

/// One boot's findings, and how many more `ignore` excused.
pub fn findings(obs: &BootObservation, ignore: &[Regex]) -> (Vec<Finding>, usize) {
    let (kept, excused) = sort(obs, ignore);
    (kept, excused.len())
}

/// The findings of one boot, deduplicated, split into kept and excused.
fn sort(obs: &BootObservation, ignore: &[Regex]) -> (Vec<Finding>, Vec<Finding>) {
    let mut all: Vec<Finding> = Vec::new();
    let found = |source: Source, line: String| {
        classify(&line).map(|kind| Finding {
            boot: obs.boot,
            kind,
            source,
            line,
        })
    };
    for raw in console_lines(&obs.console) {
        let Some(f) = found(Source::Console, clean_console_line(raw)) else {
            continue;
        };
        if !all.iter().any(|a| key(&a.line) == key(&f.line)) {
            all.push(f);
        }
    }
    for entry in obs
        .journal
        .as_deref()
        .map(journal::entries)
        .into_iter()
        .flatten()
    {
        let e = Entry(&entry);
        if !speaks_for_the_system(&e) {
            continue;
        }
        let message = e.get("MESSAGE").unwrap_or_default();
        let Some(f) = found(Source::Journal, message.trim().to_owned()) else {
            continue;
        };
        match all.iter_mut().find(|a| match a.source {
            Source::Console => same_message(&a.line, &f.line),
            _ => key(&a.line) == key(&f.line),
        }) {
            // The journal has the name the console shortened.
            Some(seen) if seen.line.contains('…') => *seen = f,
            Some(_) => {}
            None => all.push(f),
        }
    }
    for line in obs.failed_units.as_deref().unwrap_or("").lines() {
        let line = line.trim();
        if !line.is_empty() {
            all.push(Finding {
                boot: obs.boot,
                kind: FindingKind::FailedUnit,
                source: Source::FailedUnits,
                line: line.to_owned(),
            });
        }
    }
    all.into_iter()
        .partition(|f| !ignore.iter().any(|re| re.is_match(&f.line)))
}

/// The row over every boot of the run (or of a scenario's guest).
pub fn judge(all_boots: &[BootObservation], ignore: &[Regex]) -> CheckResult {
    let mut kept: Vec<Finding> = Vec::new();
    let mut excused: Vec<Finding> = Vec::new();
    for obs in all_boots {
        let (k, e) = sort(obs, ignore);
        kept.extend(k);
        excused.extend(e);
    }
    let excused_note = match excused.len() {
        0 => String::new(),
        1 => "; 1 line excused by [boot_health] ignore".to_owned(),
        n => format!("; {n} lines excused by [boot_health] ignore"),
    };
    let boots = match all_boots {
        [] => "no boot".to_owned(),
        [one] => format!("boot {}", one.boot),
        [first, .., last] => format!("boots {} to {}", first.boot, last.boot),
    };
    let excused_evidence = excused.iter().map(|f| format!("excused: {f}"));
    if kept.is_empty() {
        let mut evidence: Vec<String> = all_boots.iter().map(looked_at).collect();
        evidence.extend(excused_evidence);
        return CheckResult::new(
            NAME,
            Status::Pass,
            format!(
                "no panic, oops, kernel warning, crash, OOM kill, failed unit, ordering cycle, \
                 generator failure or emergency mode in {boots}{excused_note}"
            ),
            evidence,
        );
    }
    // "failed unit (boots 1, 2), kernel panic (boot 2)", in order of kind.
    let mut kinds: Vec<(FindingKind, Vec<u32>)> = Vec::new();
    for f in &kept {
        match kinds.iter_mut().find(|(k, _)| *k == f.kind) {
            Some((_, b)) if b.contains(&f.boot) => {}
            Some((_, b)) => b.push(f.boot),
            None => kinds.push((f.kind, vec![f.boot])),
        }
    }
    kinds.sort();
    let what = kinds
        .iter()
        .map(|(k, b)| {
            let b: Vec<String> = b.iter().map(u32::to_string).collect();
            let s = if b.len() == 1 { "" } else { "s" };
            format!("{} (boot{s} {})", k.name(), b.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut evidence: Vec<String> = kept.iter().map(Finding::to_string).collect();
    evidence.extend(excused_evidence);
    CheckResult::new(
        NAME,
        Status::Fail,
        format!("{what}{excused_note}"),
        evidence,
    )
}

/// What was read of one boot, for a passing row.
fn looked_at(obs: &BootObservation) -> String {
    let journal = match &obs.journal {
        Some(j) => format!("{} journal entries", journal::entries(j).count()),
        None => "no journal".to_owned(),
    };
    let failed = match &obs.failed_units {
        Some(_) => "systemctl --failed: none",
        None => "systemctl --failed: not asked",
    };
    format!(
        "boot {}: {} console lines, {journal}, {failed}",
        obs.boot,
        console_lines(&obs.console).count()
    )
}

/// The first panic line of a console, cleaned: why a guest that died in a
/// scenario died.
pub fn panic_line(console: &str) -> Option<String> {
    console_lines(console)
        .map(clean_console_line)
        .find(|l| classify(l) == Some(FindingKind::KernelPanic))
}

/// `from..to` of the run's serial log (`to`: None for the end), as text.
/// Offsets are [`crate::serial::SerialState::bytes`] taken by the engine;
/// both are clamped to the log, and a multi-byte character cut by an
/// offset becomes U+FFFD rather than an error.
pub fn console_between(log: &[u8], from: u64, to: Option<u64>) -> String {
    let len = log.len() as u64;
    let end = to.unwrap_or(len).min(len);
    let start = from.min(end);
    String::from_utf8_lossy(&log[start as usize..end as usize]).into_owned()
}

/// Splits console text that starts in a running system (at `systemctl
/// reboot`) at the next kernel: the old system's shutdown, then the new
/// boot. The next kernel starts at the bootloader's banner (`SYSLINUX`,
/// later boots through extlinux) or, for a direct kernel boot, at the
/// printk line stamped 0 ("[    0.000000] Linux version …"), which may
/// follow a login prompt on the same line. No next kernel: all shutdown.
pub fn split_at_next_kernel(console: &str) -> (&str, &str) {
    static NEXT: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?m)^SYSLINUX |\[\s*0\.0+\] Linux version ").expect("kernel pattern")
    });
    match NEXT.find(console) {
        Some(m) => console.split_at(m.start()),
        None => (console, ""),
    }
}

/// [`FAILED_UNITS_COMMAND`] in the guest.
pub async fn failed_units(m: &mut Machine) -> Result<String, MachineError> {
    m.succeed(FAILED_UNITS_COMMAND).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> String {
        let path = format!("{}/../fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn console(boot: u32, text: &str) -> BootObservation {
        BootObservation {
            boot,
            console: text.to_owned(),
            journal: None,
            failed_units: None,
        }
    }

    fn kinds(obs: &BootObservation) -> Vec<(FindingKind, String)> {
        findings(obs, &[])
            .0
            .into_iter()
            .map(|f| (f.kind, f.line))
            .collect()
    }

    /// A journal entry as `journalctl -o json` writes it.
    fn entry(transport: &str, ident: &str, pid: &str, message: &str) -> String {
        serde_json::json!({
            "_TRANSPORT": transport,
            "SYSLOG_IDENTIFIER": ident,
            "_PID": pid,
            "MESSAGE": message,
        })
        .to_string()
    }
    /// Cuts the run's one serial log into boots the way the engine will:
    /// at each kernel's first line.
    fn clean_run_boots() -> Vec<String> {
        let log = fixture("console/clean-run-serial.log");
        let kernel = Regex::new(r"\[\s*0\.0+\] Linux version ").unwrap();
        let starts: Vec<usize> = kernel.find_iter(&log).map(|m| m.start()).collect();
        starts
            .iter()
            .enumerate()
            .map(|(i, &from)| log[from..starts.get(i + 1).copied().unwrap_or(log.len())].to_owned())
            .collect()
    }

    #[test]
    fn a_real_passing_run_has_no_findings() {
        let boots = clean_run_boots();
        // The log also holds SYSLINUX before boot 1 (twice: the abandoned
        // KVM attempt) and strata's marker; 3 kernels follow.
        assert_eq!(
            boots.len(),
            3,
            "{:?}",
            boots.iter().map(|b| b.len()).collect::<Vec<_>>()
        );
        let journals = [
            Some(fixture("journal/clean-run-boot1.json")),
            None,
            Some(fixture("journal/clean-run-boot3.json")),
        ];
        let obs: Vec<BootObservation> = boots
            .into_iter()
            .zip(journals)
            .enumerate()
            .map(|(i, (console, journal))| BootObservation {
                boot: i as u32 + 1,
                console,
                journal,
                failed_units: Some(String::new()),
            })
            .collect();
        for o in &obs {
            assert_eq!(findings(o, &[]), (vec![], 0), "boot {}", o.boot);
        }
        // The whole log at once, shutdown and all, is clean too.
        let whole = console(1, &fixture("console/clean-run-serial.log"));
        assert_eq!(findings(&whole, &[]), (vec![], 0));
        let r = judge(&obs, &[]);
        assert_eq!(r.status, Status::Pass);
        assert_eq!(
            r.detail,
            "no panic, oops, kernel warning, crash, OOM kill, failed unit, ordering cycle, \
             generator failure or emergency mode in boots 1 to 3"
        );
        assert_eq!(r.evidence.len(), 3);
        assert!(
            r.evidence[0].starts_with("boot 1: ")
                && r.evidence[0]
                    .ends_with(" console lines, 641 journal entries, systemctl --failed: none"),
            "{}",
            r.evidence[0]
        );
        assert!(r.evidence[1].contains("no journal"), "{}", r.evidence[1]);
    }

    #[test]
    fn normal_lines_that_look_alarming_are_not_findings() {
        for line in [
            // Real lines of a Debian 12 boot (clean-run-serial.log).
            "[    0.945242] PCI: Using host bridge windows from ACPI; if necessary, use \"pci=nocrs\" and report a bug",
            "[    1.840755] AMD-Vi: AMD IOMMUv2 functionality not available on this system - This is not a bug.",
            "[    0.978134] acpi PNP0A03:00: fail to add MMCONFIG information, can't access extended PCI configuration space under this bridge.",
            "[    5.505777] systemd[1]: Initializing machine ID from random generator.",
            "Warning: fsck not present, so skipping root file system",
            "[    0.077119] clocksource: refined-jiffies: mask: 0xffffffff max_cycles: 0xffffffff, max_idle_ns: 7645519600211568 ns",
            // Kernel lines of other CPUs and kernels: a "WARNING:" that is
            // no splat, ACPI firmware complaints.
            "[    0.123456] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks possible!",
            "[    0.234567] ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.PCI0.XHC.RHUB.HS11], AE_NOT_FOUND (20220331/dswload2-162)",
            "[    0.345678] ACPI Error: AE_NOT_FOUND, During name lookup/catalog (20220331/psobject-220)",
            // A call trace alone (its header is the finding).
            "[   12.000000] Call Trace:",
            "[   12.000001]  <TASK>",
            // Targets and units that merely stop or pass.
            "[  OK  ] Stopped target emergency.target - Emergency Mode.",
            "[  OK  ] Finished systemd-fsck-root.service - File System Check on Root Device.",
            "         Starting systemd-oomd.service - Userspace Out-Of-Memory (OOM) Killer...",
            "[  OK  ] Reached target multi-user.target - Multi-User System.",
            // The panic's closing banner restates its first line.
            "[    9.000000] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
        ] {
            assert_eq!(kinds(&console(1, line)), vec![], "{line}");
        }
    }

    #[test]
    fn every_kind_from_real_wording() {
        // One line per kind, each as the kernel or systemd 252 prints it.
        let cases = [
            ("[   61.274180] Kernel panic - not syncing: sysrq triggered crash", FindingKind::KernelPanic, "Kernel panic - not syncing: sysrq triggered crash"),
            ("[   33.100000] Oops: 0002 [#1] PREEMPT SMP NOPTI", FindingKind::Oops, "Oops: 0002 [#1] PREEMPT SMP NOPTI"),
            ("[   33.100000] Oops - BUG: 0000 [#1] SMP", FindingKind::Oops, "Oops - BUG: 0000 [#1] SMP"),
            ("[   33.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000", FindingKind::KernelBug, "BUG: kernel NULL pointer dereference, address: 0000000000000000"),
            ("[   40.000000] WARNING: CPU: 1 PID: 1 at fs/btrfs/transaction.c:1986 btrfs_commit_transaction+0x9b1/0xb20 [btrfs]", FindingKind::KernelWarning, "WARNING: CPU: 1 PID: 1 at fs/btrfs/transaction.c:1986 btrfs_commit_transaction+0x9b1/0xb20 [btrfs]"),
            ("[   50.000000] general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI", FindingKind::GeneralProtectionFault, "general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI"),
            ("[   20.500000] crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000] likely on CPU 0 (core 0, socket 0)", FindingKind::Segfault, "crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000] likely on CPU 0 (core 0, socket 0)"),
            ("[   70.000000] Out of memory: Killed process 812 (stress) total-vm:1052300kB, anon-rss:901204kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:1812kB oom_score_adj:0", FindingKind::OutOfMemory, "Out of memory: Killed process 812 (stress) total-vm:1052300kB, anon-rss:901204kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:1812kB oom_score_adj:0"),
            ("[   70.000000] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/system.slice/hog.service,task=stress,pid=812,uid=0", FindingKind::OutOfMemory, "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/system.slice/hog.service,task=stress,pid=812,uid=0"),
            ("You are in emergency mode. After logging in, type \"journalctl -xb\" to view\r", FindingKind::EmergencyMode, "You are in emergency mode. After logging in, type \"journalctl -xb\" to view"),
            ("[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39memergency.target\x1b[0m - Emergency Mode.\r", FindingKind::EmergencyMode, "Reached target emergency.target - Emergency Mode."),
            ("You are in rescue mode. After logging in, type \"journalctl -xb\" to view", FindingKind::RescueMode, "You are in rescue mode. After logging in, type \"journalctl -xb\" to view"),
            ("[  OK  ] Reached target rescue.target - Rescue Mode.", FindingKind::RescueMode, "Reached target rescue.target - Rescue Mode."),
            ("[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mbroken.service\x1b[0m - Broken On Purpose.\r", FindingKind::FailedUnit, "Failed to start broken.service - Broken On Purpose."),
            ("[FAILED] Failed to mount mnt-missing.mount - /mnt/missing.", FindingKind::FailedUnit, "Failed to mount mnt-missing.mount - /mnt/missing."),
            ("[    6.100000] systemd[1]: local-fs.target: Found ordering cycle on srv.mount/start", FindingKind::OrderingCycle, "systemd[1]: local-fs.target: Found ordering cycle on srv.mount/start"),
            ("[    6.100002] systemd[1]: local-fs.target: Job srv.mount/start deleted to break ordering cycle starting with local-fs.target/start", FindingKind::OrderingCycle, "systemd[1]: local-fs.target: Job srv.mount/start deleted to break ordering cycle starting with local-fs.target/start"),
            ("[    5.600000] systemd[1]: /usr/lib/systemd/system-generators/systemd-fstab-generator failed with exit status 1.", FindingKind::GeneratorFailed, "systemd[1]: /usr/lib/systemd/system-generators/systemd-fstab-generator failed with exit status 1."),
            ("[    5.600000] systemd[1]: /etc/systemd/system-generators/my-generator terminated by signal SEGV.", FindingKind::GeneratorFailed, "systemd[1]: /etc/systemd/system-generators/my-generator terminated by signal SEGV."),
        ];
        for (raw, kind, line) in cases {
            assert_eq!(
                kinds(&console(2, raw)),
                vec![(kind, line.to_owned())],
                "{raw}"
            );
        }
    }

    #[test]
    fn failed_units_from_the_journal_and_from_systemctl() {
        // A real journal: `nofail` fstab lines, one of which fails.
        let obs = BootObservation {
            boot: 1,
            console: String::new(),
            journal: Some(fixture("journal/failed-mount-boot.json")),
            failed_units: Some("mnt-missing.mount loaded failed failed /mnt/missing\n".to_owned()),
        };
        let (found, excused) = findings(&obs, &[]);
        assert_eq!(excused, 0);
        let shown: Vec<String> = found.iter().map(Finding::to_string).collect();
        assert_eq!(
            shown,
            [
                "boot 1 (journal): mnt-missing.mount: Failed with result 'exit-code'.",
                "boot 1 (journal): Failed to mount mnt-missing.mount - /mnt/missing.",
                "boot 1 (systemctl --failed): mnt-missing.mount loaded failed failed /mnt/missing",
            ]
        );
        assert!(found.iter().all(|f| f.kind == FindingKind::FailedUnit));
        // Nothing failed: the real clean journal and an empty list.
        let clean = BootObservation {
            boot: 1,
            console: String::new(),
            journal: Some(fixture("journal/clean-boot.json")),
            failed_units: Some("\n".to_owned()),
        };
        assert_eq!(findings(&clean, &[]), (vec![], 0));
    }

    #[test]
    fn only_the_kernel_and_the_service_manager_speak_for_the_boot() {
        let journal = [
            // qemu-guest-agent echoes every command it runs.
            entry("syslog", "qemu-ga", "402", "info: guest-exec called: \"/bin/sh -c journalctl | grep 'Failed to start'\""),
            // A program's own output.
            entry("stdout", "myapp", "733", "BUG: config reload raced, retrying"),
            // The real thing, from PID 1 and from the kernel.
            entry("journal", "systemd", "1", "Failed to start broken.service - Broken On Purpose."),
            entry("kernel", "kernel", "", "crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000]"),
        ]
        .join("\n");
        let obs = BootObservation {
            boot: 1,
            journal: Some(journal),
            ..Default::default()
        };
        assert_eq!(
            kinds(&obs),
            [
                (FindingKind::FailedUnit, "Failed to start broken.service - Broken On Purpose.".to_owned()),
                (FindingKind::Segfault, "crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000]".to_owned()),
            ]
        );
    }

    #[test]
    fn a_line_in_console_and_journal_is_one_finding() {
        let console_text = concat!(
            "[   20.500000] crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000]\r\n",
            // Early, before journald: systemd logs through the kernel.
            "[    6.100000] systemd[1]: local-fs.target: Found ordering cycle on srv.mount/start\r\n",
            // The status column shortens long unit names.
            "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mstrata-very-lo…it-name.service\x1b[0m - Long.\r\n",
        );
        let journal = [
            entry("kernel", "kernel", "", "crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000]"),
            entry("kernel", "systemd", "1", "local-fs.target: Found ordering cycle on srv.mount/start"),
            entry("journal", "systemd", "1", "Failed to start strata-very-long-unit-name.service - Long."),
        ]
        .join("\n");
        let obs = BootObservation {
            boot: 2,
            console: console_text.to_owned(),
            journal: Some(journal),
            failed_units: None,
        };
        let (found, _) = findings(&obs, &[]);
        let shown: Vec<String> = found.iter().map(Finding::to_string).collect();
        assert_eq!(
            shown,
            [
                "boot 2 (console): crashy[612]: segfault at 0 ip 000055d0c0a0113d sp 00007ffd5d1f6f70 error 6 in crashy[55d0c0a01000+1000]",
                "boot 2 (console): systemd[1]: local-fs.target: Found ordering cycle on srv.mount/start",
                // The journal's full name replaces the console's shortened one.
                "boot 2 (journal): Failed to start strata-very-long-unit-name.service - Long.",
            ]
        );
        // A different unit behind the same shortened text is not merged.
        assert!(!same_message(
            "Failed to start strata-very-lo…it-name.service - Long.",
            "Failed to start other.service - Long."
        ));
    }

    #[test]
    fn ignore_patterns_excuse_lines_and_are_counted() {
        let text = concat!(
            "[    0.4] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:782 fpu__init_system_xstate+0x3e2/0x800\n",
            "[FAILED] Failed to start systemd-networkd-wait-online.service - Wait for Network to be Configured.\n",
            "[   61.2] Kernel panic - not syncing: sysrq triggered crash\n",
        );
        let ignore = [
            Regex::new(r"fpu__init_system_xstate").unwrap(),
            Regex::new(r"^Failed to start systemd-networkd-wait-online\.service").unwrap(),
        ];
        let obs = console(2, text);
        let (found, excused) = findings(&obs, &ignore);
        assert_eq!(excused, 2);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, FindingKind::KernelPanic);
        let r = judge(&[console(1, ""), obs], &ignore);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.detail,
            "kernel panic (boot 2); 2 lines excused by [boot_health] ignore"
        );
        // All excused: a pass that says so.
        let all = [Regex::new(".").unwrap()];
        let r = judge(&[console(2, text)], &all);
        assert_eq!(r.status, Status::Pass);
        assert!(
            r.detail
                .ends_with("in boot 2; 3 lines excused by [boot_health] ignore"),
            "{}",
            r.detail
        );
        assert!(r
            .evidence
            .iter()
            .any(|e| e.starts_with("excused: boot 2 (console): Kernel panic")));
    }

    #[test]
    fn a_failing_verdict_names_each_finding() {
        let boot1 = BootObservation {
            boot: 1,
            console: "[FAILED] Failed to start broken.service - Broken On Purpose.\r\n".into(),
            journal: Some(entry(
                "journal",
                "systemd",
                "1",
                "broken.service: Failed with result 'exit-code'.",
            )),
            failed_units: Some("broken.service loaded failed failed Broken On Purpose\n".into()),
        };
        let boot2 = BootObservation {
            boot: 2,
            console: fixture("console/clean-run-serial.log")
                .lines()
                .take(40)
                .chain([
                    "[   61.263121] sysrq: Trigger a crash",
                    "[   61.274180] Kernel panic - not syncing: sysrq triggered crash",
                    "[   61.274950] CPU: 0 PID: 512 Comm: sh Not tainted 6.1.0-57-amd64 #1  Debian 6.1.192-3",
                    "[   61.276000] Call Trace:",
                    "[   61.280000] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
                ])
                .collect::<Vec<_>>()
                .join("\n"),
            journal: None,
            failed_units: None,
        };
        let r = judge(&[boot1, boot2], &[Regex::new("never matches").unwrap()]);
        insta::assert_json_snapshot!("boot-health-failing", r);
    }

    #[test]
    fn the_panic_line_of_a_dead_guest() {
        let text = "[   61.263121] sysrq: Trigger a crash\r\n[   61.274180] Kernel panic - not syncing: sysrq triggered crash\r\n[   61.280000] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\r\n";
        assert_eq!(
            panic_line(text).as_deref(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(panic_line(&fixture("console/clean-run-serial.log")), None);
    }

    #[test]
    fn console_lines_are_cleaned_for_people() {
        assert_eq!(
            clean_console_line("strata-guest login: [\x1b[0;32m  OK  \x1b[0m] Removed slice \x1b[0;1;39msystem-modpr…lice\x1b[0m - Slice /system/modprobe.\r"),
            "Removed slice system-modpr…lice - Slice /system/modprobe."
        );
        assert_eq!(
            clean_console_line("[  *** ] A stop job is running for x"),
            "A stop job is running for x"
        );
        assert_eq!(
            clean_console_line("[    1.5] [drm] not a status"),
            "[drm] not a status"
        );
        assert_eq!(
            clean_console_line("strata-guest login: "),
            "strata-guest login:"
        );
        // Redraws in place are lines of their own.
        let redraws = "\r\x1b[K[  *** ] A stop job is running for a (1s / 1min 30s)\r\x1b[K[ *** ] A stop job is running for a (2s / 1min 30s)\r\n";
        assert_eq!(console_lines(redraws).count(), 2);
    }

    #[test]
    fn slicing_the_runs_serial_log() {
        let log = "boot one\nsecond line\nboot two ü\n".as_bytes();
        assert_eq!(console_between(log, 0, Some(9)), "boot one\n");
        assert_eq!(console_between(log, 9, None), "second line\nboot two ü\n");
        // Offsets past the end (a boot that printed nothing yet) clamp.
        assert_eq!(console_between(log, 100, None), "");
        assert_eq!(console_between(log, 5, Some(2)), "");
        // An offset inside a character: replaced, not an error.
        let cut = log.len() as u64 - 2;
        assert_eq!(
            console_between(log, 0, Some(cut)),
            "boot one\nsecond line\nboot two \u{fffd}"
        );
    }

    #[test]
    fn the_next_kernel_starts_at_syslinux_or_a_zero_stamped_linux_version() {
        let (shutdown, boot) = split_at_next_kernel(
            "[  OK  ] Reached target reboot.target - System Reboot.\r\n[   16.112269] reboot: machine restart\r\n\r\nSYSLINUX 6.04 20210613 Copyright (C) 1994-2015 H. Peter Anvin et al\r\n",
        );
        assert!(
            shutdown.ends_with("machine restart\r\n\r\n"),
            "{shutdown:?}"
        );
        assert!(boot.starts_with("SYSLINUX 6.04"));
        // Direct kernel boot, glued to a login prompt.
        let (shutdown, boot) = split_at_next_kernel(
            "x\r\nstrata-guest login: [    0.000000] Linux version 6.1.0-57-amd64\r\n",
        );
        assert_eq!(shutdown, "x\r\nstrata-guest login: ");
        assert!(boot.starts_with("[    0.000000] Linux version"));
        // A later "Linux version" mention is not a new kernel.
        let (shutdown, boot) = split_at_next_kernel("[   12.0] Linux version 6.1 is what we run\n");
        assert_eq!((shutdown.len(), boot), (43, ""));
    }
}
