//! `fstab`: `findmnt --verify` is clean, every fstab entry systemd mounts at
//! boot is mounted, and no unit failed.

use super::guest::{findmnt, mounted_at, Mount};
use super::{CheckId, Vm};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use strata_builder::fstab::is_boot_mount;

const ID: CheckId = CheckId::Fstab;

pub struct Observation {
    pub verify_output: String,
    pub verify_exit: Option<i64>,
    pub entries: Vec<Mount>,
    pub failed_units: String,
}

pub async fn run(vm: &mut impl Vm) -> Result<CheckResult, MachineError> {
    let obs = observe(vm.machine()).await?;
    Ok(judge(&obs, vm.mount_table().await?))
}

/// The three readings in one guest command (each command is a round trip
/// and a shell, costly under TCG): each tool's exit code and output,
/// NUL-terminated fields, in this order. A tool's stderr goes to the
/// script's, for the error when it fails.
const OBSERVE_SCRIPT: &str = r#"v=$(findmnt --verify 2>&1); ve=$?
f=$(findmnt -J -l --fstab -o TARGET,SOURCE,FSTYPE,OPTIONS); fe=$?
u=$(systemctl --failed --plain --no-legend --no-pager); ue=$?
printf '%s\0%s\0%s\0%s\0%s\0%s\0' "$ve" "$v" "$fe" "$f" "$ue" "$u"
"#;

/// The commands of [`OBSERVE_SCRIPT`] after `findmnt --verify`, as their
/// failures name them.
const FSTAB_COMMAND: &str = "findmnt -J -l --fstab -o TARGET,SOURCE,FSTYPE,OPTIONS";
const FAILED_COMMAND: &str = "systemctl --failed --plain --no-legend --no-pager";

/// One tool's part of [`OBSERVE_SCRIPT`]'s output.
#[derive(Debug, PartialEq)]
pub struct Ran {
    pub exit: Option<i64>,
    pub stdout: String,
}

/// [`OBSERVE_SCRIPT`]'s stdout as (verify, fstab, failed units); None when
/// it is not six fields (the script died half-way).
pub fn parse_observed(raw: &[u8]) -> Option<[Ran; 3]> {
    let fields: Vec<&[u8]> = raw.strip_suffix(b"\0")?.split(|b| *b == 0).collect();
    let [ve, v, fe, f, ue, u] = fields[..] else {
        return None;
    };
    let ran = |exit: &[u8], out: &[u8]| Ran {
        exit: std::str::from_utf8(exit)
            .ok()
            .and_then(|e| e.trim().parse().ok()),
        stdout: String::from_utf8_lossy(out).into_owned(),
    };
    Some([ran(ve, v), ran(fe, f), ran(ue, u)])
}

pub async fn observe(m: &mut Machine) -> Result<Observation, MachineError> {
    let out = m.exec(OBSERVE_SCRIPT).await?;
    let failed = |command: &str, code: String| MachineError::CommandFailed {
        command: command.into(),
        code,
        stderr: out.stderr_str().trim().to_owned(),
    };
    let Some([verify, entries, units]) = parse_observed(&out.stdout) else {
        return Err(failed(
            "findmnt --verify; findmnt --fstab; systemctl --failed",
            format!("{:?}", out.exit_code),
        ));
    };
    // As before, fstab and the failed units must be read; verify's exit
    // code is a finding of its own.
    for (ran, command) in [(&entries, FSTAB_COMMAND), (&units, FAILED_COMMAND)] {
        if ran.exit != Some(0) {
            return Err(failed(command, format!("{:?}", ran.exit)));
        }
    }
    Ok(Observation {
        verify_output: verify.stdout,
        verify_exit: verify.exit,
        entries: findmnt(&entries.stdout, "findmnt --fstab -J")?,
        failed_units: units.stdout,
    })
}

/// `table` is the live mount table the entries must show up in.
pub fn judge(obs: &Observation, table: &[Mount]) -> CheckResult {
    let mut evidence = Vec::new();
    let mut problems = Vec::new();
    let verify = obs.verify_output.trim();
    // findmnt prints "[W]"/"[E]" per finding and a summary; a clean table
    // exits 0 with "Success, no errors or warnings detected".
    let findings: Vec<&str> = verify
        .lines()
        .filter(|l| l.contains("[W]") || l.contains("[E]"))
        .collect();
    if obs.verify_exit != Some(0) || !findings.is_empty() {
        problems.push("findmnt --verify reports problems".to_owned());
        evidence.extend(
            verify
                .lines()
                .map(|l| format!("findmnt --verify: {}", l.trim())),
        );
    } else {
        evidence.push(format!(
            "findmnt --verify: {}",
            verify.lines().last().unwrap_or("")
        ));
    }
    let mut mounted = 0;
    for e in &obs.entries {
        let fstype = e.fstype.as_deref().unwrap_or("");
        let opts = e.options.as_deref().unwrap_or("");
        // The same rule as the build and `strata inspect --lint`.
        if !is_boot_mount(&e.target, fstype, opts) {
            continue;
        }
        if mounted_at(table, &e.target).is_some() {
            mounted += 1;
            evidence.push(format!(
                "fstab {} ({} {fstype}): mounted",
                e.target,
                e.source.as_deref().unwrap_or("?")
            ));
        } else {
            problems.push(format!("{} not mounted", e.target));
            evidence.push(format!(
                "fstab {} ({} {fstype} {opts}): NOT mounted",
                e.target,
                e.source.as_deref().unwrap_or("?")
            ));
        }
    }
    let failed: Vec<&str> = obs
        .failed_units
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !failed.is_empty() {
        problems.push(format!("{} failed unit(s)", failed.len()));
        evidence.extend(failed.iter().map(|l| format!("systemctl --failed: {l}")));
    }
    if problems.is_empty() {
        CheckResult::new(
            ID.name(),
            Status::Pass,
            format!("findmnt --verify clean; {mounted} fstab entries mounted; no failed units"),
            evidence,
        )
    } else {
        CheckResult::new(ID.name(), Status::Fail, problems.join("; "), evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testdata::{table, UUID};

    fn entry(target: &str, source: &str, fstype: &str, options: &str) -> Mount {
        Mount {
            target: target.into(),
            source: Some(source.into()),
            fstype: Some(fstype.into()),
            fsroot: None,
            uuid: None,
            options: Some(options.into()),
        }
    }

    fn clean() -> Observation {
        Observation {
            verify_output: "Success, no errors or warnings detected\n".into(),
            verify_exit: Some(0),
            entries: vec![
                entry(
                    "/var",
                    &format!("UUID={UUID}"),
                    "btrfs",
                    "subvol=/state/var",
                ),
                entry("none", "/swapfile", "swap", "sw"),
            ],
            failed_units: String::new(),
        }
    }

    #[test]
    fn needs_clean_verify_all_mounted_and_no_failed_units() {
        let t = table("/state/var");
        let mut obs = clean();
        let r = judge(&obs, &t);
        assert_eq!(r.status, Status::Pass);
        assert_eq!(
            r.detail,
            "findmnt --verify clean; 1 fstab entries mounted; no failed units"
        );
        obs.entries
            .push(entry("/srv", "LABEL=x", "btrfs", "defaults"));
        obs.failed_units = "srv.mount loaded failed failed /srv\n".into();
        let r = judge(&obs, &t);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "/srv not mounted; 1 failed unit(s)");
    }

    #[test]
    fn entries_not_mounted_at_boot_are_not_required() {
        let mut obs = clean();
        obs.entries
            .push(entry("/mnt", "LABEL=x", "ext4", "noauto,ro"));
        obs.entries
            .push(entry("/swapfile", "/swapfile", "swap", "sw"));
        let r = judge(&obs, &table("/state/var"));
        assert_eq!(r.status, Status::Pass, "{r:?}");
    }

    #[test]
    fn the_one_commands_fields_are_cut_at_nuls() {
        let raw = b"1\x00/srv\n   [W] x\x000\x00{\"filesystems\": []}\x000\x00a.mount loaded failed failed A\nb.service loaded failed failed B\0";
        let [v, f, u] = parse_observed(raw).expect("parsed");
        assert_eq!(v.exit, Some(1));
        assert_eq!(v.stdout, "/srv\n   [W] x");
        assert_eq!(f.exit, Some(0));
        assert!(findmnt(&f.stdout, "t").unwrap().is_empty());
        assert_eq!(u.stdout.lines().count(), 2);
        // Cut short or not ours: no observation.
        assert!(parse_observed(&raw[..raw.len() - 1]).is_none());
        assert!(parse_observed(b"0\0x\0").is_none());
        assert!(parse_observed(b"").is_none());
    }

    #[test]
    fn the_one_command_is_valid_shell() {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", OBSERVE_SCRIPT])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn verify_findings_fail_the_check() {
        let mut obs = clean();
        obs.verify_output =
            "/srv\n   [W] target specified more than once\n\n0 parse errors, 0 errors, 1 warning\n"
                .into();
        let r = judge(&obs, &table("/state/var"));
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "findmnt --verify reports problems");
        assert!(r
            .evidence
            .contains(&"findmnt --verify: [W] target specified more than once".to_owned()));
    }
}
