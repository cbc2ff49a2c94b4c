//! `overmount`: nothing is hidden under any mountpoint of the booted
//! system, judged two ways, in every boot of the run:
//! - by looking: for every mountpoint whose underlying directory lies on a
//!   disk filesystem, a non-recursive bind mount of the filesystem below
//!   shows the directory without what is mounted on it;
//! - by the journal: systemd's "Directory … to mount over is not empty"
//!   (MESSAGE_ID, systemd ≥ 256).
//!
//! The journal alone is not enough (journald may not store notices, may be
//! volatile, or may not run yet when the mount happens); looking alone
//! would miss a mount that is gone again by the time the check runs.

use super::guest::Mount;
use super::{CheckId, Vm};
use crate::agent::Running;
use crate::journal::{self, JournalWarning, WarningKind};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status, Warning};

const ID: CheckId = CheckId::Overmount;

/// Mounted by the kernel, the initramfs or PID 1 itself before any unit,
/// over directories images ship with content on purpose (`/dev` nodes as a
/// fallback for early boot): systemd never checks them either.
const API_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];

/// Hidden entries under one mountpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hidden {
    pub paths: Vec<String>,
    pub bytes: u64,
}

/// What looking under one mountpoint found.
#[derive(Debug, Clone, PartialEq)]
pub struct Look {
    pub mountpoint: String,
    /// The hidden entries, or why they could not be listed.
    pub found: Result<Hidden, String>,
}

/// Whether `path` is `dir` or lies below it.
fn is_within(path: &str, dir: &str) -> bool {
    dir == "/"
        || path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The mountpoints to look under, each with the mount holding its
/// underlying directory (the nearest mount above it). Only directories on
/// a disk filesystem (a source that is a device path) can hide the image's
/// data; API filesystems and what is mounted on them are left out.
pub fn to_look_under(table: &[Mount]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for m in table {
        let mp = m.target.as_str();
        if mp == "/"
            || out.iter().any(|(t, _)| t == mp)
            || API_MOUNTS.iter().any(|api| is_within(mp, api))
        {
            continue;
        }
        // The nearest mount above: the longest proper ancestor (the last
        // one mounted there wins, as in the kernel).
        let below = table
            .iter()
            .filter(|p| p.target != mp && is_within(mp, &p.target))
            .max_by_key(|p| p.target.len());
        let Some(below) = below else { continue };
        let on_disk = below.source.as_deref().is_some_and(|s| s.starts_with('/'));
        if on_disk {
            out.push((mp.to_owned(), below.target.clone()));
        }
    }
    out
}

/// Reads (mountpoint, mount below) pairs, one per line each, and prints
/// for each `M<mountpoint>\0`, then `F<type> <size> <path>\0` per entry
/// under it in the filesystem below, or `E<why>\0`.
const LOOK_SCRIPT: &str = r#"set -u
b=$(mktemp -d /run/strata-under.XXXXXX) || exit 97
trap 'umount "$b" 2>/dev/null; rmdir "$b"' EXIT
while IFS= read -r mp && IFS= read -r below; do
    printf 'M%s\0' "$mp"
    if ! err=$(mount --bind "$below" "$b" 2>&1); then
        printf 'E%s\0' "cannot bind-mount $below to look under $mp: $err"
        continue
    fi
    if [ "$below" = / ]; then rel=${mp#/}; else rel=${mp#"$below"/}; fi
    if [ -d "$b/$rel" ] && [ ! -L "$b/$rel" ]; then
        (cd "$b/$rel" && find . -mindepth 1 -printf 'F%y %s %P\0') ||
            printf 'E%s\0' "cannot list what is under $mp"
    fi
    umount "$b" || { printf 'E%s\0' "cannot unmount $b"; exit 98; }
done
"#;

/// The look under every mountpoint (see [`start_look`]), running.
#[derive(Debug)]
pub struct Started {
    running: Option<Running>,
    /// Mountpoints no line of the script's input can name.
    unnamable: Vec<Look>,
}

/// Starts the look under every mountpoint of this boot's table (see
/// [`to_look_under`]) and returns at once; [`finish_look`] collects it.
pub async fn start(vm: &mut impl Vm) -> Result<Started, MachineError> {
    let pairs = to_look_under(vm.mount_table().await?);
    start_look(vm.machine(), &pairs).await
}

/// Starts the look under every mountpoint in `pairs` in the guest.
async fn start_look(m: &mut Machine, pairs: &[(String, String)]) -> Result<Started, MachineError> {
    let mut input = String::new();
    let mut unnamable = Vec::new();
    for (mp, below) in pairs {
        if mp.contains('\n') || below.contains('\n') {
            unnamable.push(Look {
                mountpoint: mp.clone(),
                found: Err("the mountpoint's name contains a newline: not looked under".into()),
            });
            continue;
        }
        input.push_str(&format!("{mp}\n{below}\n"));
    }
    let running = match input.is_empty() {
        true => None,
        false => Some(m.start_script(LOOK_SCRIPT, Some(input.as_bytes())).await?),
    };
    Ok(Started { running, unnamable })
}

pub async fn finish_look(m: &mut Machine, started: Started) -> Result<Vec<Look>, MachineError> {
    let mut looks = match &started.running {
        None => Vec::new(),
        Some(running) => {
            let out = m.finish(running).await?;
            if !out.success() {
                return Err(MachineError::CommandFailed {
                    command: "look under every mountpoint (bind mounts)".into(),
                    code: format!("{:?}", out.exit_code),
                    stderr: out.stderr_str().trim().to_owned(),
                });
            }
            parse_looks(&out.stdout)
        }
    };
    looks.extend(started.unnamable);
    Ok(looks)
}

/// The records of [`LOOK_SCRIPT`].
pub fn parse_looks(raw: &[u8]) -> Vec<Look> {
    let mut looks: Vec<Look> = Vec::new();
    for rec in raw.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let rec = String::from_utf8_lossy(rec);
        let (tag, rest) = rec.split_at(1);
        match (tag, looks.last_mut()) {
            ("M", _) => looks.push(Look {
                mountpoint: rest.to_owned(),
                found: Ok(Hidden::default()),
            }),
            ("E", Some(l)) => l.found = Err(rest.to_owned()),
            (
                "F",
                Some(Look {
                    mountpoint,
                    found: Ok(h),
                }),
            ) => {
                let mut it = rest.splitn(3, ' ');
                let (Some(kind), Some(size), Some(rel)) = (it.next(), it.next(), it.next()) else {
                    continue;
                };
                if kind == "f" {
                    h.bytes += size.parse::<u64>().unwrap_or(0);
                }
                h.paths
                    .push(format!("{}/{rel}", mountpoint.trim_end_matches('/')));
            }
            _ => {}
        }
    }
    for l in &mut looks {
        if let Ok(h) = &mut l.found {
            h.paths.sort();
        }
    }
    looks
}

pub fn to_warning(j: &JournalWarning, hidden: Option<&Hidden>) -> Warning {
    Warning {
        kind: j.kind.clone(),
        mountpoint: j.mountpoint.clone(),
        message: j.message.clone(),
        shadowed: hidden.map(|h| h.paths.clone()).unwrap_or_default(),
        shadowed_count: hidden.map_or(0, |h| h.paths.len()),
        shadowed_bytes: hidden.map_or(0, |h| h.bytes),
        unit: j.unit.clone(),
        phase: None,
    }
}

/// The journal's warnings with what each overmount hides, then every
/// mountpoint where looking found hidden files the journal did not report.
pub fn warnings(journal: &[JournalWarning], looks: &[Look]) -> Vec<Warning> {
    let hidden_at = |mp: &str| {
        looks
            .iter()
            .find(|l| l.mountpoint == mp)
            .and_then(|l| l.found.as_ref().ok())
    };
    let mut out: Vec<Warning> = journal
        .iter()
        .map(|j| match (&j.kind, &j.mountpoint) {
            (WarningKind::Overmount, Some(mp)) => to_warning(j, hidden_at(mp)),
            _ => to_warning(j, None),
        })
        .collect();
    for l in looks {
        let Ok(h) = &l.found else { continue };
        let reported = out.iter().any(|w| {
            w.kind == WarningKind::Overmount && w.mountpoint.as_deref() == Some(&l.mountpoint)
        });
        if h.paths.is_empty() || reported {
            continue;
        }
        out.push(Warning {
            kind: WarningKind::Overmount,
            mountpoint: Some(l.mountpoint.clone()),
            message: format!(
                "{} is mounted over a non-empty directory (found by looking under it; \
                 the journal has no entry for it)",
                l.mountpoint
            ),
            shadowed: h.paths.clone(),
            shadowed_count: h.paths.len(),
            shadowed_bytes: h.bytes,
            unit: None,
            phase: None,
        });
    }
    out
}

/// The check and every mount warning of this boot.
pub async fn run(vm: &mut impl Vm) -> Result<(CheckResult, Vec<Warning>), MachineError> {
    // The look runs in the guest while the journal export is collected:
    // started with the phase's first check when the session could, else
    // here, before waiting for the journal.
    let started = match vm.started(ID) {
        Some(super::Started::Overmount(s)) => s,
        _ => start(vm).await?,
    };
    let found = journal::mount_warnings(vm.journal().await?);
    let looks = finish_look(vm.machine(), started).await?;
    let warnings = warnings(&found, &looks);
    Ok((judge(&warnings, &looks), warnings))
}

/// After a later boot of the run (a reboot, a power cut): looks again and
/// folds this boot into the verdict so far (see [`merge`]).
pub async fn again(
    vm: &mut impl Vm,
    boot: u32,
    earlier: CheckResult,
    earlier_warnings: Vec<Warning>,
) -> Result<(CheckResult, Vec<Warning>), MachineError> {
    let (now, warnings) = match run(vm).await {
        Ok(r) => r,
        Err(e) => (super::verdict_of_failed_command(ID, e)?, Vec::new()),
    };
    Ok(merge(earlier, earlier_warnings, now, warnings, boot))
}

/// The journal's mount warnings as the report shows them when the check
/// did not run (nothing listed as hidden: nobody looked).
pub fn unexamined(journal_json: &str) -> Vec<Warning> {
    journal::mount_warnings(journal_json)
        .iter()
        .map(|j| to_warning(j, None))
        .collect()
}

/// One boot's verdict: fails on any overmount (found either way) and on
/// any mountpoint that could not be looked under.
pub fn judge(warnings: &[Warning], looks: &[Look]) -> CheckResult {
    let over: Vec<&Warning> = warnings
        .iter()
        .filter(|w| w.kind == WarningKind::Overmount)
        .collect();
    let blind: Vec<(&str, &str)> = looks
        .iter()
        .filter_map(|l| Some((l.mountpoint.as_str(), l.found.as_ref().err()?.as_str())))
        .collect();
    if over.is_empty() && blind.is_empty() {
        return CheckResult::new(
            ID.name(),
            Status::Pass,
            format!(
                "nothing hidden under {} mountpoint(s) (looked through bind mounts); \
                 no journal entry with MESSAGE_ID {}",
                looks.len(),
                journal::OVERMOUNT_MESSAGE_ID
            ),
            vec![format!(
                "looked under: {}",
                if looks.is_empty() {
                    "(no mountpoint on a disk filesystem besides /)".to_owned()
                } else {
                    looks
                        .iter()
                        .map(|l| l.mountpoint.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            )],
        );
    }
    let mut evidence: Vec<String> = over
        .iter()
        .map(|w| {
            format!(
                "{}: {} hidden entries, {} ({})",
                w.mountpoint.as_deref().unwrap_or("?"),
                w.shadowed_count,
                crate::report::human_bytes(w.shadowed_bytes),
                w.shadowed
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    evidence.extend(blind.iter().map(|(mp, why)| format!("{mp}: {why}")));
    let mut what = Vec::new();
    if !over.is_empty() {
        what.push(format!(
            "files hidden under {}",
            over.iter()
                .map(|w| w.mountpoint.clone().unwrap_or_else(|| "?".into()))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    if !blind.is_empty() {
        what.push(format!(
            "could not look under {}",
            blind
                .iter()
                .map(|(mp, _)| *mp)
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    CheckResult::new(ID.name(), Status::Fail, what.join("; "), evidence)
}

/// The verdict over several boots: failing if any boot failed, with the
/// later boot's evidence marked with its number; warnings of the later
/// boot that repeat an earlier one are not listed twice.
pub fn merge(
    earlier: CheckResult,
    mut warnings: Vec<Warning>,
    later: CheckResult,
    later_warnings: Vec<Warning>,
    boot: u32,
) -> (CheckResult, Vec<Warning>) {
    for w in later_warnings {
        let seen = warnings
            .iter()
            .any(|e| e.kind == w.kind && e.mountpoint == w.mountpoint && e.shadowed == w.shadowed);
        if !seen {
            warnings.push(w);
        }
    }
    let mut evidence = earlier.evidence.clone();
    evidence.extend(later.evidence.iter().map(|e| format!("boot {boot}: {e}")));
    let failed = (earlier.status == Status::Fail, later.status == Status::Fail);
    let detail = match failed {
        (false, false) => {
            // The latest pass detail, without an earlier "(boots …)" suffix.
            let base = later.detail.split(" (boots ").next().unwrap_or_default();
            format!("{base} (boots 1 to {boot})")
        }
        (true, false) => earlier.detail,
        (false, true) => format!("boot {boot}: {}", later.detail),
        (true, true) => format!("{}; boot {boot}: {}", earlier.detail, later.detail),
    };
    let status = if failed.0 || failed.1 {
        Status::Fail
    } else {
        Status::Pass
    };
    let mut merged = CheckResult::new(ID.name(), status, detail, evidence);
    merged.seconds = earlier.seconds;
    (merged, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testdata::table;

    fn looked(mp: &str, raw: &[u8]) -> Look {
        let mut rec = format!("M{mp}\0").into_bytes();
        rec.extend_from_slice(raw);
        parse_looks(&rec).remove(0)
    }

    #[test]
    fn hidden_listing_counts_files_and_bytes() {
        let l = looked("/var", b"Fd 4096 lib\0Ff 10 lib/a\0Ff 5 left behind.txt\0");
        let h = l.found.unwrap();
        assert_eq!(h.paths, ["/var/left behind.txt", "/var/lib", "/var/lib/a"]);
        assert_eq!(h.bytes, 15);
        let looks = parse_looks(b"M/srv\0Ecannot bind-mount /: busy\0M/var\0");
        assert_eq!(looks[0].found, Err("cannot bind-mount /: busy".into()));
        assert_eq!(looks[1].found, Ok(Hidden::default()));
    }

    #[test]
    fn every_mountpoint_on_a_disk_filesystem_is_looked_under() {
        let mut t = table("/state/var");
        let extra = crate::checks::guest::parse_findmnt(
            r#"{"filesystems": [
  {"target":"/sys","source":"sysfs","fstype":"sysfs","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/dev","source":"udev","fstype":"devtmpfs","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/dev/shm","source":"tmpfs","fstype":"tmpfs","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/run","source":"tmpfs","fstype":"tmpfs","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/run/user/0","source":"tmpfs","fstype":"tmpfs","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/tmp","source":"tmpfs","fstype":"tmpfs","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/var/lib/docker","source":"/dev/vda[/state/var/lib/docker]","fstype":"btrfs","fsroot":"/state/var/lib/docker","uuid":null,"options":"rw"},
  {"target":"/tmp/x","source":"/dev/vdb","fstype":"ext4","fsroot":"/","uuid":null,"options":"rw"},
  {"target":"/variable","source":"/dev/vdc","fstype":"ext4","fsroot":"/","uuid":null,"options":"rw"}
]}"#,
        )
        .unwrap();
        t.extend(extra);
        assert_eq!(
            to_look_under(&t),
            [
                ("/root", "/"),
                ("/var", "/"),
                ("/tmp", "/"),
                ("/var/lib/docker", "/var"),
                ("/variable", "/"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    fn overmount_at(mp: &str, hidden: Option<&Hidden>) -> Warning {
        let j = JournalWarning {
            kind: WarningKind::Overmount,
            mountpoint: Some(mp.into()),
            message: format!("Directory {mp} to mount over is not empty, mounting anyway."),
            unit: None,
        };
        to_warning(&j, hidden)
    }

    #[test]
    fn passes_without_overmounts_and_names_the_hidden_files() {
        let clean = [looked("/var", b"")];
        assert_eq!(judge(&[], &clean).status, Status::Pass);
        let h = looked("/var", b"Ff 10 lib/a\0").found.unwrap();
        let r = judge(&[overmount_at("/var", Some(&h))], &clean);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "files hidden under /var");
        assert_eq!(
            r.evidence,
            ["/var: 1 hidden entries, 10 bytes (/var/lib/a)"]
        );
    }

    #[test]
    fn files_under_a_mountpoint_fail_even_without_a_journal_entry() {
        // journald kept no notice (MaxLevelStore=warning, a volatile
        // journal, a mount before journald ran): looking still sees them.
        let looks = [
            looked("/srv", b"Fd 0 www\0Ff 14 www/dropped.html\0"),
            looked("/var", b""),
        ];
        let w = warnings(&[], &looks);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].mountpoint.as_deref(), Some("/srv"));
        assert_eq!(w[0].shadowed, ["/srv/www", "/srv/www/dropped.html"]);
        assert!(
            w[0].message.contains("the journal has no entry"),
            "{}",
            w[0].message
        );
        let r = judge(&w, &looks);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "files hidden under /srv");
        // With the journal's entry too, one warning in the journal's words.
        let j = JournalWarning {
            kind: WarningKind::Overmount,
            mountpoint: Some("/srv".into()),
            message: "Directory /srv to mount over is not empty, mounting anyway.".into(),
            unit: Some("srv.mount".into()),
        };
        let w = warnings(&[j], &looks);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].unit.as_deref(), Some("srv.mount"));
        assert_eq!(w[0].shadowed_count, 2);
    }

    #[test]
    fn a_mountpoint_that_cannot_be_looked_under_fails_the_check() {
        let looks =
            parse_looks(b"M/srv\0Ecannot bind-mount / to look under /srv: permission denied\0");
        let r = judge(&[], &looks);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "could not look under /srv");
        assert_eq!(
            r.evidence,
            ["/srv: cannot bind-mount / to look under /srv: permission denied"]
        );
    }

    #[test]
    fn every_boot_counts_not_only_the_first() {
        let looks1 = [looked("/var", b"")];
        let first = judge(&[], &looks1);
        assert_eq!(first.status, Status::Pass);
        // Boot 3 (after the power cut) shows files under /srv.
        let looks3 = [looked("/srv", b"Ff 3 x\0"), looked("/var", b"")];
        let w3 = warnings(&[], &looks3);
        let third = judge(&w3, &looks3);
        let (merged, w) = merge(first.clone(), vec![], third, w3.clone(), 3);
        assert_eq!(merged.status, Status::Fail);
        assert_eq!(merged.detail, "boot 3: files hidden under /srv");
        assert!(merged
            .evidence
            .contains(&"boot 3: /srv: 1 hidden entries, 3 bytes (/srv/x)".to_owned()));
        assert_eq!(w.len(), 1);
        // The same files again in a later boot are one warning, still failing.
        let (again, w) = merge(merged, w, judge(&w3, &looks3), w3, 4);
        assert_eq!(again.status, Status::Fail);
        assert_eq!(w.len(), 1);
        // All clean: a pass that says it covered every boot.
        let (clean, _) = merge(first.clone(), vec![], first, vec![], 2);
        assert_eq!(clean.status, Status::Pass);
        assert!(clean.detail.ends_with("(boots 1 to 2)"), "{}", clean.detail);
    }
}
