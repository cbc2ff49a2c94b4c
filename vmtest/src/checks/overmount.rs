//! `overmount`: systemd logs no mount over a non-empty directory this boot
//! (journal MESSAGE_ID, systemd ≥ 256); for each one it did log, the files
//! the mount hides are listed.

use super::{CheckId, Vm};
use crate::journal::{self, JournalWarning, WarningKind};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status, Warning};

const ID: CheckId = CheckId::Overmount;

/// Hidden entries under one mountpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hidden {
    pub paths: Vec<String>,
    pub bytes: u64,
}

/// Lists what is underneath `mountpoint`: a non-recursive bind mount of the
/// filesystem holding the mountpoint's directory shows the directory
/// without whatever is mounted on it.
pub async fn list_hidden(m: &mut Machine, mountpoint: &str) -> Result<Hidden, MachineError> {
    let q = crate::qemu::shell_quote(mountpoint);
    let script = format!(
        r#"set -u
mp={q}
parent=$(findmnt -n -o TARGET -T "$(dirname "$mp")")
b=$(mktemp -d /run/strata-under.XXXXXX)
trap 'umount "$b" 2>/dev/null; rmdir "$b"' EXIT
mount --bind "$parent" "$b" || exit 97
rel=${{mp#"$parent"}}
cd "$b/$rel" || exit 0
find . -mindepth 1 -printf '%y %s %P\0'
"#
    );
    let out = m.exec(&script).await?;
    if !out.success() {
        return Err(MachineError::CommandFailed {
            command: format!("list files hidden under {mountpoint}"),
            code: format!("{:?}", out.exit_code),
            stderr: out.stderr_str(),
        });
    }
    Ok(parse_hidden(mountpoint, &out.stdout))
}

pub fn parse_hidden(mountpoint: &str, raw: &[u8]) -> Hidden {
    let mut h = Hidden::default();
    for rec in raw.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let rec = String::from_utf8_lossy(rec);
        let mut it = rec.splitn(3, ' ');
        let (Some(kind), Some(size), Some(rel)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if kind == "f" {
            h.bytes += size.parse::<u64>().unwrap_or(0);
        }
        h.paths
            .push(format!("{}/{rel}", mountpoint.trim_end_matches('/')));
    }
    h.paths.sort();
    h
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

/// The check plus every journal warning of this boot, with the files each
/// overmount hides.
pub async fn run(vm: &mut impl Vm) -> Result<(CheckResult, Vec<Warning>), MachineError> {
    let found = journal::mount_warnings(vm.journal().await?);
    let mut warnings = Vec::new();
    for j in &found {
        let hidden = match (&j.kind, &j.mountpoint) {
            (WarningKind::Overmount, Some(mp)) => Some(list_hidden(vm.machine(), mp).await?),
            _ => None,
        };
        warnings.push(to_warning(j, hidden.as_ref()));
    }
    Ok((judge(&warnings), warnings))
}

/// The journal's mount warnings as the report shows them when the check
/// did not run (nothing listed as hidden: nobody looked).
pub fn unexamined(journal_json: &str) -> Vec<Warning> {
    journal::mount_warnings(journal_json)
        .iter()
        .map(|j| to_warning(j, None))
        .collect()
}

pub fn judge(warnings: &[Warning]) -> CheckResult {
    let over: Vec<&Warning> = warnings
        .iter()
        .filter(|w| w.kind == WarningKind::Overmount)
        .collect();
    if over.is_empty() {
        return CheckResult::new(
            ID.name(),
            Status::Pass,
            format!(
                "no journal entry with MESSAGE_ID {}",
                journal::OVERMOUNT_MESSAGE_ID
            ),
            vec![],
        );
    }
    let evidence = over
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
    CheckResult::new(
        ID.name(),
        Status::Fail,
        format!(
            "files hidden under {}",
            over.iter()
                .map(|w| w.mountpoint.clone().unwrap_or_else(|| "?".into()))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        evidence,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_listing_counts_files_and_bytes() {
        let h = parse_hidden("/var", b"d 4096 lib\0f 10 lib/a\0f 5 left behind.txt\0");
        assert_eq!(h.paths, ["/var/left behind.txt", "/var/lib", "/var/lib/a"]);
        assert_eq!(h.bytes, 15);
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
        assert_eq!(judge(&[]).status, Status::Pass);
        let h = parse_hidden("/var", b"f 10 lib/a\0");
        let r = judge(&[overmount_at("/var", Some(&h))]);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "files hidden under /var");
        assert_eq!(
            r.evidence,
            ["/var: 1 hidden entries, 10 bytes (/var/lib/a)"]
        );
    }
}
