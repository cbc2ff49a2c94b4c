//! `root`: `/` is the expected version's `run` subvolume of the image's
//! btrfs filesystem.

use super::guest::{mounted_at, Mount};
use super::{CheckId, Vm};
use crate::machine::MachineError;
use crate::report::{CheckResult, Status};
use strata_builder::expect::Expectations;
use strata_builder::layout;

const ID: CheckId = CheckId::Root;

/// Judges this boot's mount table; the check's time includes taking it.
pub async fn run(vm: &mut impl Vm, expect: &Expectations) -> Result<CheckResult, MachineError> {
    Ok(judge(vm.mount_table().await?, expect))
}

pub fn judge(table: &[Mount], expect: &Expectations) -> CheckResult {
    let want_root = layout::fsroot(&expect.version.run());
    let Some(root) = mounted_at(table, "/") else {
        return CheckResult::new(ID.name(), Status::Fail, "nothing is mounted at /", vec![]);
    };
    let fstype = root.fstype.as_deref().unwrap_or("?");
    let fsroot = root.fsroot.as_deref().unwrap_or("?");
    let uuid = root.uuid.as_deref().unwrap_or("?");
    let evidence = vec![format!(
        "/ is {fstype} from {}, UUID {uuid}, fsroot {fsroot}, options {}",
        root.source.as_deref().unwrap_or("?"),
        root.options.as_deref().unwrap_or("?")
    )];
    let mut wrong = Vec::new();
    if fstype != "btrfs" {
        wrong.push(format!("fstype {fstype}, expected btrfs"));
    }
    if !uuid.eq_ignore_ascii_case(&expect.fs_uuid) {
        wrong.push(format!(
            "filesystem UUID {uuid}, expected the image's {}",
            expect.fs_uuid
        ));
    }
    if fsroot != want_root {
        wrong.push(format!("fsroot {fsroot}, expected {want_root}"));
    }
    if wrong.is_empty() {
        CheckResult::new(
            ID.name(),
            Status::Pass,
            format!("/ is btrfs {} at {want_root}", expect.fs_uuid),
            evidence,
        )
    } else {
        CheckResult::new(
            ID.name(),
            Status::Fail,
            format!("/: {}", wrong.join("; ")),
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
        assert_eq!(r.name, "root");
    }

    #[test]
    fn wrong_subvolume_is_named() {
        let mut t = table("/state/var");
        t[0].fsroot = Some("/systems/factory/orig".into());
        let r = judge(&t, &expectations());
        assert_eq!(r.status, Status::Fail);
        assert!(r
            .detail
            .contains("fsroot /systems/factory/orig, expected /systems/factory/run"));
    }

    #[test]
    fn nothing_at_root_fails() {
        let t: Vec<Mount> = table("/state/var")
            .into_iter()
            .filter(|m| m.target != "/")
            .collect();
        assert_eq!(judge(&t, &expectations()).detail, "nothing is mounted at /");
    }
}
