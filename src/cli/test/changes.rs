//! The image changes of `strata test --upgrade-to`, as vmtest's
//! `ImageChanges`: the builder upgrades the private copy and sets its
//! default (`Ops`, wired in `lifecycle.rs`), and what the copy must show
//! afterwards is read back here: from the copy's manifest, which the builder
//! keeps up to date, or off the copy itself when there is none.

use std::path::{Path, PathBuf};
use strata_builder::error::FailureKind;
use strata_builder::expect::Expectations;
use strata_builder::host::interrupt::Interrupt;
use strata_builder::image;
use strata_builder::manifest::Manifest;
use strata_builder::migrate::Migration;
use strata_builder::sync::StatePolicy;
use strata_vmtest::lifecycle::{ChangeError, Changed, ImageChanges};

/// What `--upgrade-to` asks of the upgrade.
#[derive(Debug, Clone)]
pub struct UpgradePlan {
    pub rootfs: PathBuf,
    /// The current default's, so the new version boots the same way.
    pub kernel_args: String,
    pub migration: Migration,
    pub state_data: StatePolicy,
}

/// `strata upgrade IMAGE --rootfs … --label LABEL` on the copy, its
/// manifest (IMAGE.manifest.json) updated when there is one; progress lines
/// to `note`. The error keeps the upgrade's kind: a refused rootfs is bad
/// input (exit 2).
pub type UpgradeFn = fn(
    image: &Path,
    plan: &UpgradePlan,
    label: &str,
    interrupt: &Interrupt,
    note: &mut dyn FnMut(String),
) -> Result<(), ChangeError>;

/// `strata set-default IMAGE LABEL` on the copy (manifest updated too).
pub type SetDefaultFn = fn(image: &Path, label: &str) -> Result<(), ChangeError>;

/// The builder's two operations the lifecycle needs.
#[derive(Clone, Copy)]
pub struct Ops {
    pub upgrade: UpgradeFn,
    pub set_default: SetDefaultFn,
}

pub struct CliChanges {
    pub plan: UpgradePlan,
    pub ops: Ops,
}

impl ImageChanges for CliChanges {
    fn upgrade(
        &self,
        image: &Path,
        label: &str,
        interrupt: &Interrupt,
        note: &mut dyn FnMut(String),
    ) -> Result<Changed, ChangeError> {
        (self.ops.upgrade)(image, &self.plan, label, interrupt, note)?;
        let expect = expectations_of(image, label)?;
        let mut summary = format!(
            "upgraded to {label} from {} (state migration {}, state data {})",
            self.plan.rootfs.display(),
            self.plan.migration.name(),
            self.plan.state_data.name()
        );
        if !self.plan.kernel_args.is_empty() {
            summary.push_str(&format!("; kernel args {:?}", self.plan.kernel_args));
        }
        if let Some(s) = state_data_note(image, label) {
            summary.push_str(&format!("; {s}"));
        }
        Ok(Changed { expect, summary })
    }

    fn set_default(
        &self,
        image: &Path,
        label: &str,
        interrupt: &Interrupt,
        _note: &mut dyn FnMut(String),
    ) -> Result<Changed, ChangeError> {
        // A quick rename: checking before is enough.
        if interrupt.raised() {
            return Err(ChangeError {
                kind: FailureKind::Interrupted,
                message: "interrupted".into(),
            });
        }
        (self.ops.set_default)(image, label)?;
        Ok(Changed {
            expect: expectations_of(image, label)?,
            summary: format!("set {label} as the default"),
        })
    }

    /// The guest changed the copy (`--in-guest`): its manifest knows only
    /// the versions the host made, so a version the guest made is read off
    /// the copy itself.
    fn read(&self, image: &Path, label: &str) -> Result<Changed, ChangeError> {
        let path = Manifest::default_path(image);
        let known = Manifest::load(&path)
            .ok()
            .is_some_and(|m| m.version(label).is_some());
        let expect = match known {
            true => expectations_of(image, label)?,
            false => {
                let layout = image::read(image).map_err(|e| e.to_string())?;
                Expectations::from_layout(&layout, Some(label))?
            }
        };
        Ok(Changed {
            expect,
            summary: format!("{label} is the default (read back from the copy)"),
        })
    }
}

/// What `image` must show booting `label`: from the manifest next to it
/// (the copy's, as the builder left it), else read off the image.
pub fn expectations_of(image: &Path, label: &str) -> Result<Expectations, String> {
    let path = Manifest::default_path(image);
    if path.exists() {
        let m = Manifest::load(&path).map_err(|e| e.to_string())?;
        return Expectations::from_manifest(&m, path, Some(label));
    }
    let layout = image::read(image).map_err(|e| e.to_string())?;
    Expectations::from_layout(&layout, Some(label))
}

/// What the upgrade did with the new rootfs's state data, as its manifest
/// record says (none without a manifest).
fn state_data_note(image: &Path, label: &str) -> Option<String> {
    let m = Manifest::load(&Manifest::default_path(image)).ok()?;
    let d = m.version(label)?.state_data.clone()?;
    Some(format!(
        "{} merged into state, {} left out",
        d.merged.len(),
        d.left_out.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_builder::manifest::{Deployment, StateData};

    /// A schema-2 manifest with version `factory` (and `v2` when given).
    fn manifest(default: &str, v2: bool) -> Manifest {
        let record = |label: &str| {
            serde_json::from_value(serde_json::json!({
                "label": label, "deployed_by": "build",
                "root_device": "UUID=3f1c0000-0000-4000-8000-000000000001",
                "state_dirs": {"created": ["root", "srv"], "skipped": []},
                "fstab_lines_added": [], "state_migration": "move", "moved_files": [],
                "kernel": format!("systems/{label}/kernel"), "initramfs": null,
                "kernel_source": "boot/vmlinuz", "initramfs_source": null,
                "kernel_args": "", "timings": []
            }))
            .unwrap()
        };
        let mut versions = vec![record("factory")];
        if v2 {
            let mut r: strata_builder::manifest::VersionRecord = record("v2");
            r.deployed_by = Deployment::Upgrade;
            r.state_data = Some(StateData {
                policy: "keep".into(),
                merged: vec![],
                left_out: vec!["/srv/www/new.html".into()],
            });
            versions.push(r);
        }
        Manifest {
            manifest_version: 2,
            fs_uuid: "3f1c0000-0000-4000-8000-000000000001".into(),
            image_size: 0,
            default: default.into(),
            versions,
        }
    }

    /// Stands in for `strata upgrade`: the copy's manifest gains `label`.
    fn fake_upgrade(
        image: &Path,
        plan: &UpgradePlan,
        label: &str,
        _: &Interrupt,
        note: &mut dyn FnMut(String),
    ) -> Result<(), ChangeError> {
        assert_eq!(label, "v2");
        assert_eq!(plan.rootfs, Path::new("/r2"));
        note("upgrade: done".into());
        manifest("v2", true)
            .save(&Manifest::default_path(image))
            .map_err(|e| ChangeError::from(e.to_string()))
    }

    fn fake_set_default(image: &Path, label: &str) -> Result<(), ChangeError> {
        let path = Manifest::default_path(image);
        let mut m = Manifest::load(&path).map_err(|e| e.to_string())?;
        m.default = label.into();
        Ok(m.save(&path).map_err(|e| e.to_string())?)
    }

    fn failing_upgrade(
        _: &Path,
        _: &UpgradePlan,
        _: &str,
        _: &Interrupt,
        _: &mut dyn FnMut(String),
    ) -> Result<(), ChangeError> {
        Err(ChangeError {
            kind: FailureKind::Input,
            message: "rootfs /r2 has no etc/ directory: is it a root filesystem?".into(),
        })
    }

    fn changes(upgrade: UpgradeFn) -> CliChanges {
        CliChanges {
            plan: UpgradePlan {
                rootfs: "/r2".into(),
                kernel_args: String::new(),
                migration: Migration::Copy,
                state_data: StatePolicy::Keep,
            },
            ops: Ops {
                upgrade,
                set_default: fake_set_default,
            },
        }
    }

    #[test]
    fn after_each_change_the_copys_manifest_says_what_boots() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("copy.img");
        manifest("factory", false)
            .save(&Manifest::default_path(&img))
            .unwrap();
        let c = changes(fake_upgrade);
        let mut notes = Vec::new();
        let up = c
            .upgrade(&img, "v2", &Interrupt::default(), &mut |n| notes.push(n))
            .unwrap();
        assert_eq!(notes, ["upgrade: done"]);
        assert_eq!(up.expect.version.label(), "v2");
        assert_eq!(up.expect.state_dirs, ["root", "srv"]);
        assert_eq!(
            up.summary,
            "upgraded to v2 from /r2 (state migration copy, state data keep); 0 merged into state, 1 left out"
        );
        let back = c
            .set_default(&img, "factory", &Interrupt::default(), &mut |_| {})
            .unwrap();
        assert_eq!(back.expect.version.label(), "factory");
        assert_eq!(back.summary, "set factory as the default");
        assert_eq!(
            Manifest::load(&Manifest::default_path(&img))
                .unwrap()
                .default,
            "factory"
        );
    }

    #[test]
    fn failures_and_interrupts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("copy.img");
        let c = changes(failing_upgrade);
        let err = c
            .upgrade(&img, "v2", &Interrupt::default(), &mut |_| {})
            .unwrap_err();
        // The upgrade's kind comes through, not only its message.
        assert_eq!(err.kind, FailureKind::Input);
        assert_eq!(
            err.message,
            "rootfs /r2 has no etc/ directory: is it a root filesystem?"
        );
        let stop = Interrupt::default();
        stop.raise();
        let err = c
            .set_default(&img, "factory", &stop, &mut |_| {})
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Interrupted);
        assert_eq!(err.message, "interrupted");
    }
}
