//! The builder's side of `strata test --upgrade-to`: `builder::upgrade` and
//! `builder::versions::set_default` on the private copy, the only code of
//! the lifecycle that changes an image. `changes.rs` turns them into
//! vmtest's `ImageChanges`; this file only calls the agreed API (ISSUE8).

use super::changes::{Ops, UpgradePlan};
use std::path::Path;
use strata_builder::interrupt::Interrupt;
use strata_builder::progress::Event;
use strata_builder::upgrade::{self, UpgradeOptions};
use strata_builder::versions;

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
) -> Result<(), String> {
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
    upgrade::upgrade(image, &opts, interrupt, &mut on_event)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn set_default_of_copy(image: &Path, label: &str) -> Result<(), String> {
    versions::set_default(image, label, None).map_err(|e| e.to_string())
}
