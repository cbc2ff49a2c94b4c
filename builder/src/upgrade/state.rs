//! `merge-state` and `hash-moved`: what the new rootfs has under the state
//! dirs, by the policy; state subvolumes new in the plan.

use super::check::Checked;
use super::{input, UpgradeOptions};
use crate::copy;
use crate::error::{Context, StepError};
use crate::host::btrfs;
use crate::layout;
use crate::manifest::MovedFile;
use crate::migrate::{self, Migration};
use crate::progress::Event;
use crate::steps::Steps;
use crate::sync::{self, SyncError};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What went into the state subvolumes.
#[derive(Default)]
pub(super) struct StateChanges {
    /// Moved into a state subvolume new in the plan (as a build moves).
    pub(super) moved: Vec<MovedFile>,
    /// Added to a live state subvolume by the policy ([`sync::encode_path`]
    /// form, decoded for hashing).
    pub(super) merged_files: Vec<MovedFile>,
    pub(super) merged_bytes: u64,
    /// Both of the above, paths only, in order.
    pub(super) merged: Vec<String>,
    pub(super) left_out: Vec<String>,
}

pub(super) fn merge_state(
    top: &Path,
    orig: &Path,
    c: &Checked,
    opts: &UpgradeOptions,
    steps: &mut Steps,
) -> Result<StateChanges, StepError> {
    fs::create_dir_all(top.join(layout::STATE_DIR))
        .context(|| format!("creating {}", layout::STATE_DIR))?;
    let mut out = StateChanges::default();
    for dir in c.plan.created_state_dirs() {
        let interrupt = steps.interrupt();
        if interrupt.raised() {
            return Err(StepError::Interrupted);
        }
        let (state, mountpoint) = (layout::state(dir), layout::state_mountpoint(dir));
        let target = top.join(&state);
        let here = orig.join(dir);
        if !c.live_state.iter().any(|d| d == dir) {
            // New in the plan: a subvolume of its own, and the new rootfs's
            // data (synced in full) moved into it, as a build does.
            if target.symlink_metadata().is_ok() {
                return Err(format!("{state} exists and is not a subvolume"))
                    .context(|| format!("creating subvolume {state}"));
            }
            btrfs::subvolume_create(&target).context(|| format!("creating subvolume {state}"))?;
            steps.emit(Event::Note(format!(
                "created state subvolume {state} (new in this version's fstab)"
            )));
            if here.symlink_metadata().is_err() {
                fs::create_dir(&here).context(|| format!("creating mountpoint {mountpoint}"))?;
                continue;
            }
            let moved = migrate::migrate(&here, &target, dir, opts.migration, true, interrupt)
                .map_err(|e| match e {
                    migrate::MigrateError::Copy(copy::CopyError::Interrupted) => {
                        StepError::Interrupted
                    }
                    e => StepError::Failed {
                        what: format!("moving {mountpoint} into {state}"),
                        cause: e.into(),
                    },
                })?;
            out.merged.extend(moved.iter().map(|f| f.path.clone()));
            out.moved.extend(moved);
            continue;
        }
        // A live state subvolume: its mountpoint must exist (the new rootfs
        // may lack the directory, and the sync then removed it) and, but
        // for the 2014 reproduction, be empty: what the snapshot had there
        // was hidden under the old version's mount, never seen.
        match here.symlink_metadata() {
            Err(_) => {
                fs::create_dir(&here).context(|| format!("creating mountpoint {mountpoint}"))?
            }
            Ok(_) if opts.migration == Migration::Move => {
                let hidden = fs::read_dir(&here)
                    .context(|| format!("listing mountpoint {mountpoint}"))?
                    .count();
                if hidden > 0 {
                    migrate::empty_dir(&here)
                        .context(|| format!("emptying mountpoint {mountpoint}"))?;
                    steps.emit(Event::Note(format!(
                        "{}: dropped {hidden} entries the old version had hidden under {mountpoint}",
                        c.version
                    )));
                }
            }
            Ok(_) => {}
        }
        let outcome = sync::apply_state_policy(
            &c.rootfs.path.join(dir),
            &target,
            dir,
            opts.state_data,
            interrupt,
        )
        .map_err(|e| match e {
            SyncError::Interrupted => StepError::Interrupted,
            SyncError::NoSpace => input(format!(
                "no space left on the image while merging {mountpoint} into {state}: give the image more space, or use --state-data keep"
            )),
            e => StepError::Failed {
                what: format!(
                    "applying the state-data policy {} to {mountpoint}",
                    opts.state_data.name()
                ),
                cause: e.into(),
            },
        })?;
        for e in &outcome.merged {
            let f = describe_state_entry(top, &e.path)
                .context(|| format!("reading {state} after the merge"))?;
            out.merged_bytes += f.size;
            out.merged_files.push(f);
            out.merged.push(e.path.clone());
        }
        out.left_out.extend(outcome.left_out);
    }
    Ok(out)
}

/// The path in the image of a booted-system path under a state dir, given
/// in [`sync::encode_path`] form (`/var/lib/x` → `<top>/state/var/lib/x`).
fn state_path(top: &Path, encoded: &str) -> std::io::Result<PathBuf> {
    crate::pathenc::path_below(&top.join(layout::STATE_DIR), encoded)
}

/// A manifest record of an entry just merged into state (hashed later).
fn describe_state_entry(top: &Path, encoded: &str) -> std::io::Result<MovedFile> {
    use std::os::unix::fs::PermissionsExt;
    let path = state_path(top, encoded)?;
    let m = fs::symlink_metadata(&path)?;
    let file_type = migrate::file_type(&m);
    Ok(MovedFile {
        path: encoded.to_owned(),
        file_type,
        sha256: None,
        mode: m.permissions().mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if m.is_dir() { 0 } else { m.len() },
        target: m
            .file_type()
            .is_symlink()
            .then(|| {
                fs::read_link(&path).map(|t| {
                    use std::os::unix::ffi::OsStrExt;
                    sync::encode_path(t.as_os_str().as_bytes())
                })
            })
            .transpose()?,
        xattrs: migrate::xattrs_record(
            &migrate::xattrs(&path).map_err(|e| std::io::Error::other(e.to_string()))?,
        ),
        // Hardlink groups are recorded for moved entries only (a merge
        // describes its entries one by one).
        hardlink: None,
    })
}

pub(super) fn hash_state(
    top: &Path,
    state: &mut StateChanges,
    interrupt: &crate::host::interrupt::Interrupt,
) -> Result<(), StepError> {
    let interrupted = |e: &migrate::MigrateError| matches!(e, migrate::MigrateError::Interrupted);
    match migrate::hash_moved(&mut state.moved, &top.join(layout::STATE_DIR), interrupt) {
        Err(e) if interrupted(&e) => return Err(StepError::Interrupted),
        r => r.context(|| "hashing moved files".into())?,
    }
    for f in state
        .merged_files
        .iter_mut()
        .filter(|f| f.file_type == crate::manifest::FileType::File)
    {
        let path = state_path(top, &f.path).context(|| format!("hashing {}", f.path))?;
        f.sha256 = Some(match migrate::hash(&path, interrupt) {
            Err(e) if interrupted(&e) => return Err(StepError::Interrupted),
            r => r.context(|| format!("hashing {}", f.path))?,
        });
    }
    Ok(())
}
