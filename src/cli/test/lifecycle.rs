//! The builder's side of `strata test --upgrade-to`: `builder::upgrade` and
//! `builder::versions::set_default` on the private copy, the only code of
//! the lifecycle that changes an image. `changes.rs` turns them into
//! vmtest's `ImageChanges`; this file only calls the agreed API (ISSUE8).

use super::changes::{Ops, UpgradePlan};
use std::path::Path;
use strata_builder::host::interrupt::Interrupt;
use strata_builder::progress::Event;
use strata_builder::upgrade::{self, UpgradeOptions};
use strata_builder::versions;
use strata_vmtest::lifecycle::ChangeError;

pub const OPS: Ops = Ops {
    upgrade: upgrade_copy,
    set_default: set_default_of_copy,
};

fn upgrade_copy(
    image: &Path,
    plan: &UpgradePlan,
    label: &str,
    interrupt: &Interrupt,
    note: &mut dyn FnMut(String),
) -> Result<(), ChangeError> {
    let opts = UpgradeOptions {
        rootfs: plan.rootfs.clone(),
        label: label.to_owned(),
        // The plan's are the default's already (`extra_kernel_args`),
        // given as before.
        kernel_args: Some(plan.kernel_args.clone()),
        migration: plan.migration,
        state_data: plan.state_data,
        set_default: true,
        // IMAGE.manifest.json next to the copy: the run copied it there.
        manifest: None,
        // A scenario upgrade is refused like any other.
        allow_hidden_state: false,
    };
    let mut on_event = |e: Event| match e {
        Event::StepFinished(step, took) => note(format!(
            "upgrade: {} ({:.1}s)",
            step.describe(),
            took.as_secs_f64()
        )),
        Event::Note(n) => note(format!("upgrade: {n}")),
        _ => {}
    };
    // With its kind: a rootfs the upgrade refuses is bad input (exit 2),
    // which a message alone would turn into infrastructure (exit 3).
    upgrade::upgrade(image, &opts, interrupt, &mut on_event)
        .map(drop)
        .map_err(|e| ChangeError::of(&e))
}

fn set_default_of_copy(image: &Path, label: &str) -> Result<(), ChangeError> {
    versions::set_default(image, label, None).map_err(|e| ChangeError::of(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_builder::error::FailureKind;
    use strata_builder::migrate::Migration;
    use strata_builder::sync::StatePolicy;

    /// The real upgrade, refusing what it is given, hands the lifecycle an
    /// error of kind Input, so the run ends with exit 2 (it was a string,
    /// and every string ends a run with exit 3). No VM: the lifecycle calls
    /// this between boots, and `run::tests` shows the kind reaching the
    /// exit code.
    #[test]
    fn an_upgrade_refused_for_its_input_keeps_the_input_kind() {
        // Not root, the upgrade is refused for that instead (also Input),
        // which would prove nothing about the rootfs check below.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the upgrade needs root (it loop-mounts the image): run this test as root, as ci/test does"
        );
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("zeros.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let plan = UpgradePlan {
            rootfs,
            kernel_args: String::new(),
            migration: Migration::Move,
            state_data: StatePolicy::Merge,
        };
        let err =
            (OPS.upgrade)(&image, &plan, "v2", &Interrupt::default(), &mut |_| {}).unwrap_err();
        assert_eq!(err.kind, FailureKind::Input, "{err}");
        // A directory passes `--upgrade-to`'s own check before the first
        // boot; only the upgrade finds it is no root filesystem.
        assert!(err.message.contains("has no etc/ directory"), "{err}");
        let err = (OPS.set_default)(&image, "v2;reboot").unwrap_err();
        assert_eq!(err.kind, FailureKind::Input, "{err}");
    }
}
