//! `state-mounts`: every state dir is mounted from its own state subvolume
//! of the filesystem `/` is on.

use super::guest::{mounted_at, Mount};
use super::{CheckId, Vm};
use crate::machine::MachineError;
use crate::report::{CheckResult, Status};
use strata_builder::expect::Expectations;
use strata_builder::layout;

const ID: CheckId = CheckId::StateMounts;

/// Judges this boot's mount table (shared with `root`).
pub async fn run(vm: &mut impl Vm, expect: &Expectations) -> Result<CheckResult, MachineError> {
    Ok(judge(vm.mount_table().await?, expect))
}

pub fn judge(table: &[Mount], expect: &Expectations) -> CheckResult {
    let root_uuid = mounted_at(table, "/").and_then(|m| m.uuid.clone());
    let mut evidence = Vec::new();
    let mut bad = Vec::new();
    for d in &expect.state_dirs {
        let target = layout::state_mountpoint(d);
        let want_root = layout::fsroot(&layout::state(d));
        match mounted_at(table, &target) {
            None => {
                bad.push(target.clone());
                evidence.push(format!(
                    "{target}: not a mountpoint (expected subvolume {want_root})"
                ));
            }
            Some(m) => {
                let fstype = m.fstype.as_deref().unwrap_or("?");
                let fsroot = m.fsroot.as_deref().unwrap_or("?");
                let uuid = m.uuid.as_deref().unwrap_or("?");
                let mut wrong = Vec::new();
                if fstype != "btrfs" {
                    wrong.push(format!("fstype {fstype}"));
                }
                if fsroot != want_root {
                    wrong.push(format!("fsroot {fsroot}, expected {want_root}"));
                }
                if root_uuid.as_deref() != Some(uuid) {
                    wrong.push(format!(
                        "UUID {uuid} differs from /'s {}",
                        root_uuid.as_deref().unwrap_or("?")
                    ));
                }
                if wrong.is_empty() {
                    evidence.push(format!("{target}: btrfs, fsroot {fsroot}, UUID {uuid}"));
                } else {
                    bad.push(target.clone());
                    evidence.push(format!("{target}: {}", wrong.join("; ")));
                }
            }
        }
    }
    if bad.is_empty() {
        CheckResult::new(
            ID.name(),
            Status::Pass,
            format!(
                "{} state subvolumes mounted: {}",
                expect.state_dirs.len(),
                expect
                    .state_dirs
                    .iter()
                    .map(|d| layout::state_mountpoint(d))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            evidence,
        )
    } else {
        CheckResult::new(
            ID.name(),
            Status::Fail,
            format!("not mounted as expected: {}", bad.join(" ")),
            evidence,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testdata::{expectations, table};

    #[test]
    fn passes_on_the_expected_table() {
        let r = judge(&table("/state/var"), &expectations());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert_eq!(r.detail, "2 state subvolumes mounted: /root /var");
    }

    #[test]
    fn wrong_subvolume_is_named() {
        let r = judge(&table("/systems/factory/run/var"), &expectations());
        assert_eq!(r.status, Status::Fail);
        assert!(r
            .evidence
            .iter()
            .any(|e| e.contains("/var: fsroot /systems/factory/run/var, expected /state/var")));
    }

    #[test]
    fn missing_mount_fails() {
        let t: Vec<Mount> = table("/state/var")
            .into_iter()
            .filter(|m| m.target != "/var")
            .collect();
        let r = judge(&t, &expectations());
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "not mounted as expected: /var");
    }
}
