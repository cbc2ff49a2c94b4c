//! `strata upgrade`: a new version deployed beside the existing ones, in
//! place (layout.md §6), as named steps:
//!
//! ```text
//! clean-debris       what killed runs left on the host (mounts, loop devices,
//!                    extracted archives)
//! extract-rootfs     only for a tar archive, once what check-image refuses
//!                    without the rootfs is ruled out: extracted next to the
//!                    image (under the temp dir for a device;
//!                    `rootfs_tar::Extraction`), removed on every way out
//! check-image        read-only: every refusal (exit 2) happens here, before
//!                    the image is opened for writing
//! mount              read-write; partial versions a killed upgrade left go
//! snapshot-orig      systems/.strata-partial-L/orig: snapshot of the default's orig
//! sync-rootfs        made identical to the new rootfs (rsync, contents
//!                    compared; the live state dirs' contents excluded)
//! complete-fstab     the NEW rootfs's fstab completed by the build's rules
//! merge-state        the state-data policy; state subvolumes new in the plan
//! hash-moved         sha256 of what went into state, for the manifest
//! check-mountpoints  no mount point of the new version hides data
//! snapshot           run: a snapshot of the finished orig
//! install-kernel     kernel and initramfs beside them
//! commit-version     one rename(2): systems/.strata-partial-L -> systems/L
//! write-boot-config  one menu entry per version (temp file + rename)
//! flush              the filesystem committed (`btrfs filesystem sync`):
//!                    the new version and the menu are on disk before
//!                    anything can make them the default
//! set-default        systems/default -> L (one rename(2)), LAST
//! finish             sync, unmount, detach
//! ```
//!
//! and then the manifest gets the version's record (atomic rewrite).
//!
//! Two targets, one code path (`Target`): an image (a file, loop-attached,
//! or a device nobody has mounted) and the running system
//! (`strata upgrade --running`: the device behind `/`, whose top level is
//! mounted a second time in strata's private mount namespace,
//! `crate::running`). They differ only in what surrounds the steps: the
//! lock is the image's flock either way (on the device node for
//! `--running`); the new version starts from the booted version's orig
//! instead of the default's (never from its live run); the manifest is
//! `IMG.manifest.json` for an image and only `--manifest PATH` for the
//! running system (a device has no file beside it).
//!
//! Crash safety (SIGKILL included): until `commit-version` the new version
//! exists only under a partial name that no reader lists as a version and
//! the next upgrade removes; the old default, its menu entry and the link
//! are untouched. After it the new version is whole (listed, bootable from
//! the menu once written); `systems/default` still names the old one until
//! the flip. Power cuts: the snapshots, the sync and the rename live in
//! btrfs's running transaction, and the flip's fsync of `systems/` may
//! reach the disk through the log tree without it; `flush` commits the
//! transaction first, so a flip that survives a power cut always names a
//! version (and a menu) that survived too. The mount and loop device of a killed run carry its pid
//! (`debris`): the next strata command that opens the image cleans them.
//! State data merged before a crash stays in the state subvolumes: they
//! are files the live state lacked, no existing byte is changed.
//!
//! The state subvolumes are the machine's live data and stay
//! authoritative: what the new rootfs has under a state dir never stays
//! under the new version's mountpoint; `StatePolicy::Merge` (the default)
//! adds what the state lacks and overwrites nothing, `Keep` leaves the
//! state as it is. Both list what was merged and left out. Only
//! `Migration::Copy` (the 2014 reproduction) leaves the new rootfs's data
//! under the mountpoints.

mod assemble;
mod check;
mod existing;
mod partial;
mod state;

use crate::boot;
use crate::bootloader::boot_entry;
use crate::build;
use crate::error::{BuildError, Context, StepError};
use crate::host::btrfs;
use crate::host::debris;
use crate::host::interrupt::Interrupt;
use crate::image::{self, Mode, OpenImage};
use crate::layout::{self, Version};
use crate::lock::ImageLock;
use crate::manifest::Manifest;
use crate::manifest::{Deployment, StateData, VersionRecord};
use crate::migrate::Migration;
use crate::progress::{Event, Step};
use crate::rootfs_tar::{self, DeviceNodes, Extraction, RootfsInput};
use crate::running::Running;
use crate::steps::{Steps, UnsafeUpgrade, UNSAFE_UPGRADE_ENV};
use crate::sync::{StatePolicy, SyncReport};
use std::fs;
use std::path::{Path, PathBuf};

use assemble::{assemble, Assembled};
use check::{check, check_without_rootfs, image_error, Checked};
use partial::{own_subvolumes, partial_dirs, remove_partial};

/// Every step of an upgrade from a directory, in order (`set-default` is
/// skipped with `set_default: false`; a tar archive adds `extract-rootfs`
/// after `clean-debris`).
pub const STEPS: [Step; 16] = [
    Step::CleanDebris,
    Step::CheckImage,
    Step::Mount,
    Step::SnapshotOrig,
    Step::SyncRootfs,
    Step::CompleteFstab,
    Step::MergeState,
    Step::HashMoved,
    Step::CheckMountpoints,
    Step::Snapshot,
    Step::InstallKernel,
    Step::CommitVersion,
    Step::WriteBootConfig,
    Step::Flush,
    Step::SetDefault,
    Step::Finish,
];

/// The names of the steps an upgrade runs, in order (what
/// `STRATA_STOP_AFTER_STEP` takes; `strata upgrade --list-steps` prints
/// them): `STEPS`, with `extract-rootfs` after `clean-debris` for a tar
/// archive and without `set-default` for `--no-default`.
pub fn step_names(tar: bool, set_default: bool) -> Vec<&'static str> {
    let mut out = Vec::new();
    for s in STEPS {
        if s == Step::SetDefault && !set_default {
            continue;
        }
        out.push(s.name());
        if s == Step::CleanDebris && tar {
            out.push(Step::ExtractRootfs.name());
        }
    }
    out
}

/// What an upgrade changes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An image file (loop-attached) or a block device nobody has mounted.
    Image(PathBuf),
    /// The system strata runs in (`crate::running`): its device, whose top
    /// level strata mounts again beside `/`. Enter the private mount
    /// namespace first (`running::enter`).
    Running(Running),
}

impl Target {
    /// The image file or the device.
    pub fn path(&self) -> &Path {
        match self {
            Target::Image(p) => p,
            Target::Running(r) => &r.device,
        }
    }

    /// The version the new one starts from when it is not the default:
    /// the booted one.
    fn base(&self) -> Option<&Version> {
        match self {
            Target::Image(_) => None,
            Target::Running(r) => Some(&r.booted),
        }
    }

    /// The manifest kept when none is given: beside an image; none for the
    /// running system (nothing is beside a device, and the image's
    /// manifest, if any, is on the host that built it).
    fn default_manifest(&self) -> Option<PathBuf> {
        match self {
            Target::Image(p) => Some(Manifest::default_path(p)),
            Target::Running(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// The new rootfs: a directory or a tar archive (`rootfs_tar`).
    pub rootfs: PathBuf,
    /// The new version's label: `systems/<label>/`.
    pub label: String,
    /// Extra kernel arguments for the new version's boot entry. `None`:
    /// the new version keeps those of the version it starts from (the
    /// current default); `Some` replaces them (`Some("")`: none).
    pub kernel_args: Option<String>,
    /// `Copy` reproduces the 2014 warnings: the new rootfs's data stays
    /// under the new version's mountpoints.
    pub migration: Migration,
    /// What happens to the new rootfs's data under the state dirs.
    pub state_data: StatePolicy,
    /// Flip `systems/default` to the new version (the last step).
    pub set_default: bool,
    /// The manifest to update; default `IMG.manifest.json` (none for the
    /// running system). Started from the image's layout when it does not
    /// exist.
    pub manifest: Option<PathBuf>,
    /// Go on when the new fstab mounts something over data already in a
    /// live state subvolume (`--allow-hidden-state`): that data stays on
    /// the image, invisible in the booted system, and `inspect --lint`
    /// names it. Without it the upgrade is refused, naming the files.
    pub allow_hidden_state: bool,
}

/// What an upgrade did, for the CLI's summary.
#[derive(Debug, Clone)]
pub struct UpgradeSummary {
    pub label: String,
    /// The version whose orig the new one started from: the default (an
    /// image) or the booted version (the running system).
    pub based_on: String,
    /// What `systems/default` named before.
    pub default_before: String,
    /// The new version is the default now.
    pub is_default: bool,
    /// The new version's extra kernel arguments, as its entry has them.
    pub kernel_args: String,
    /// They were kept from `based_on` (no `kernel_args` given).
    pub kernel_args_kept: bool,
    /// What the sync changed in the new orig.
    pub sync: SyncReport,
    /// Data bytes written into the image: changed and new files, state
    /// data merged, kernel and initramfs unless unchanged (then shared).
    pub bytes_written: u64,
    pub state_data: StateData,
    /// None: the running system's upgrade without `--manifest`.
    pub manifest: Option<PathBuf>,
    /// The manifest did not exist and was started from the image's layout.
    pub manifest_created: bool,
    pub record: VersionRecord,
}

fn input(msg: impl Into<String>) -> StepError {
    StepError::Input(msg.into())
}

/// Upgrades the image at `image` in place: see the module documentation.
pub fn upgrade(
    image: &Path,
    opts: &UpgradeOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<UpgradeSummary, BuildError> {
    upgrade_target(&Target::Image(image.to_owned()), opts, interrupt, on_event)
}

/// Upgrades the system this process runs in (`running::enter` found it
/// and entered the private mount namespace): the same steps as `upgrade`.
pub fn upgrade_running(
    running: &Running,
    opts: &UpgradeOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<UpgradeSummary, BuildError> {
    upgrade_target(&Target::Running(running.clone()), opts, interrupt, on_event)
}

/// Upgrades `target` in place: see the module documentation.
pub fn upgrade_target(
    target: &Target,
    opts: &UpgradeOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<UpgradeSummary, BuildError> {
    let image = target.path();
    // Refused before anything happens: a typo must not run the safe path.
    let unsafe_mode = UnsafeUpgrade::from_env().map_err(BuildError::Input)?;
    if let Some(m) = unsafe_mode {
        on_event(Event::Note(format!(
            "UNSAFE (test only): {UNSAFE_UPGRADE_ENV}={}: this upgrade is not crash-safe",
            m.name()
        )));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(BuildError::Input(format!(
            "strata upgrade must run as root (it attaches a loop device and mounts the image); running as uid {}",
            rustix::process::geteuid().as_raw()
        )));
    }
    let input = rootfs_tar::classify(&opts.rootfs).map_err(|e| BuildError::Input(e.to_string()))?;
    // Next to the image (its filesystem has the room the image grows into
    // anyway), under the temp dir for a device.
    let extract_in = rootfs_tar::extraction_parent(image);
    if let RootfsInput::Tar(_) = input {
        rootfs_tar::check_extraction_dir(&extract_in)
            .map_err(|e| BuildError::Input(e.to_string()))?;
    }
    // One writer: held until the upgrade returns (the manifest is written
    // under it too); refused, naming the holder, while anyone reads or
    // changes the image.
    let _lock = ImageLock::exclusive(image)
        .map_err(|e| crate::error::StepError::from(e).in_step(Step::CheckImage))?;
    let mut steps = Steps::new(interrupt, on_event);
    // A run killed with SIGKILL could not clean up: its mounts and loop
    // devices carry its pid (a mount of this image would keep it from
    // being opened again), its extracted archive too.
    steps.run(Step::CleanDebris, |s| {
        for c in debris::clean(&debris::find(Some(&extract_in))) {
            s.emit(Event::Note(c.to_string()));
        }
        Ok(())
    })?;
    match input {
        RootfsInput::Dir => upgrade_from(target, opts, unsafe_mode, steps),
        RootfsInput::Tar(_) => {
            // What check-image refuses without the rootfs, refused before
            // the long extraction (a read-only look, no step of its own).
            check_without_rootfs(target, opts, &mut steps)
                .map_err(|e| e.in_step(Step::CheckImage))?;
            // Removed on every way out.
            let extraction = steps.run(Step::ExtractRootfs, |s| {
                if extract_in != parent_dir(image) {
                    s.emit(Event::Note(format!(
                        "{} is not a regular file: extracting {} under {}",
                        image.display(),
                        opts.rootfs.display(),
                        extract_in.display()
                    )));
                }
                Extraction::new(
                    &extract_in,
                    image,
                    &opts.rootfs,
                    DeviceNodes::Create,
                    // Nothing bigger than the image can fit in it: refused
                    // on the listing, before it fills the disk.
                    &rootfs_tar::Limits {
                        max_bytes: image_size(image),
                        ..Default::default()
                    },
                    s.interrupt(),
                )
                .map_err(StepError::from)
            })?;
            let tree = UpgradeOptions {
                rootfs: extraction.rootfs().to_owned(),
                ..opts.clone()
            };
            let upgraded = upgrade_from(target, &tree, unsafe_mode, steps);
            on_event(Event::Note(extraction.remove()));
            upgraded.map_err(|e| build::name_archive(e, &tree.rootfs, &opts.rootfs))
        }
    }
}

/// The size of the image file or device (None when it cannot be read: the
/// checks after the extraction name that).
fn image_size(image: &Path) -> Option<u64> {
    use std::io::Seek;
    std::fs::File::open(image)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .ok()
}

/// The upgrade from `check-image` on, `opts.rootfs` a directory.
fn upgrade_from(
    target: &Target,
    opts: &UpgradeOptions,
    unsafe_mode: Option<UnsafeUpgrade>,
    mut steps: Steps,
) -> Result<UpgradeSummary, BuildError> {
    let image = target.path();
    let checked = steps.run(Step::CheckImage, |s| check(target, opts, s))?;
    let rw = steps.run(Step::Mount, |s| {
        let rw = open_rw(image, &checked, s)?;
        if unsafe_mode == Some(UnsafeUpgrade::FlipFirst) {
            // The broken order the power-cut matrix must catch: the link
            // and the menu name a version that does not exist yet.
            let mut entries = checked.entries.clone();
            entries.push(checked.new_entry());
            boot::write_menu(rw.top(), &checked.version, &entries)?;
            boot::set_default_unchecked(rw.top(), &checked.version)?;
            s.emit(Event::Note(format!(
                "UNSAFE flip-first: {} already names {}, which does not exist yet",
                layout::DEFAULT_LINK,
                checked.version
            )));
        }
        Ok(rw)
    })?;
    let top = rw.top().to_owned();

    let partial = checked.version.partial();
    let assembled = match assemble(&top, &checked, opts, &mut steps) {
        Ok(a) => a,
        Err(e) => {
            // The half-made version goes now (after a SIGKILL the next
            // upgrade removes it); the image is as it was, but for state
            // data already merged (files the state lacked).
            if let Err(u) = remove_partial(&top, &partial.dir(), &own_subvolumes(&top, &partial)) {
                steps.emit(Event::Note(format!(
                    "could not remove {}: {u}; the next strata upgrade removes it",
                    partial.dir()
                )));
            } else if !matches!(e, BuildError::Interrupted) {
                // Its space comes back only once btrfs's cleaner has run,
                // which it does on a read-write mount only: wait for it
                // here, or the next run's check (read-only) would find the
                // image as full as this ENOSPC left it.
                if let Err(u) = crate::host::btrfs::subvolume_sync(&top) {
                    steps.emit(Event::Note(format!(
                        "the space {} held may be freed only later: {u}",
                        partial.dir()
                    )));
                }
            }
            drop(rw);
            return Err(e);
        }
    };

    // The new version is whole and named. The menu gets one entry per
    // version with the current default still the default: a crash before
    // the flip boots that version, as the link says.
    let (version, old) = (&checked.version, &checked.old);
    let default_before = checked.default.label().to_owned();
    let mut entries = checked.entries.clone();
    entries.push(assembled.deployed.boot.clone());
    steps.run(Step::WriteBootConfig, |_| {
        boot::write_menu(&top, &checked.default, &entries)
    })?;
    // The flip is made durable by its own fsync of `systems/`, which btrfs
    // may satisfy from its log tree without committing the transaction
    // that holds the new subvolumes; replayed after a power cut, the link
    // would name a version that is not there. One commit here puts all of
    // it on disk before the flip exists.
    steps.run(Step::Flush, |s| {
        if unsafe_mode == Some(UnsafeUpgrade::SkipFlush) {
            s.emit(Event::Note(
                "UNSAFE skip-flush: the filesystem is not committed before the flip".into(),
            ));
            return Ok(());
        }
        btrfs::sync(&top).context(|| "committing the filesystem before the flip".into())
    })?;
    if opts.set_default {
        steps.run(Step::SetDefault, |_| {
            boot::set_default(&top, version)?;
            // The default entry boots through systems/default (layout.md
            // §4), so the flip alone boots the new version; the rewrite
            // gives that entry the new version's root device, arguments
            // and initramfs line. Where the versions share those the menu
            // does not change. Where they differ, a crash between the two
            // boots the new kernel with the old version's command line
            // (each version's own entry still boots it whole): the mirror
            // of `versions::set_default`'s window, which writes the menu
            // first. Proving both under power cuts is issue 19's matrix.
            boot::write_menu(&top, version, &entries)
        })?;
    }
    // No `extlinux --install`: the boot sector and ldlinux do not depend on
    // the versions, and the menu is read by path at every boot.
    steps.run(Step::Finish, |_| {
        btrfs::sync(&top).context(|| "syncing the filesystem".into())?;
        rw.close()
            .context(|| "unmounting and detaching the image".into())
    })?;

    let Checked {
        plan,
        kernel_args,
        manifest_path,
        mut manifest,
        manifest_existed,
        ..
    } = checked;
    let Assembled {
        deployed,
        sync,
        state_data,
        bytes_written,
    } = assembled;
    let mut record = build::version_record(&plan, opts.migration, deployed, Deployment::Upgrade);
    record.based_on = Some(old.label().to_owned());
    record.state_data = Some(state_data.clone());
    record.timings = steps.into_timings();
    manifest.versions.push(record.clone());
    if opts.set_default {
        manifest.default = record.label.clone();
    }
    if let Ok(m) = fs::metadata(image) {
        if m.is_file() {
            manifest.image_size = m.len();
        }
    }
    // After the image is complete: a crash before this leaves the manifest
    // one version behind, never ahead of the image.
    if let Some(manifest_path) = &manifest_path {
        manifest
            .save(manifest_path)
            .context(|| format!("writing manifest {}", manifest_path.display()))
            .map_err(|e| e.in_step(Step::Finish))?;
    }
    Ok(UpgradeSummary {
        label: record.label.clone(),
        based_on: old.label().to_owned(),
        default_before,
        is_default: opts.set_default,
        kernel_args,
        kernel_args_kept: opts.kernel_args.is_none(),
        sync,
        bytes_written,
        state_data,
        manifest: manifest_path,
        manifest_created: !manifest_existed,
        record,
    })
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

// ---------------------------------------------------------------------------
// mount: read-write, debris inside the image removed.

fn open_rw(image: &Path, checked: &Checked, steps: &mut Steps) -> Result<OpenImage, StepError> {
    let rw = image::open(image, Mode::ReadWrite).map_err(image_error(|| {
        format!("opening {} read-write", image.display())
    }))?;
    for c in &rw.cleaned {
        steps.emit(Event::Note(c.to_string()));
    }
    let top = rw.top();
    // What was checked still holds (no other strata writes the image while
    // we hold its lock, and `image::open` refused anyone else's loop
    // device); checked again all the same, as cheap as it is.
    let default = fs::read_link(top.join(layout::DEFAULT_LINK))
        .ok()
        .and_then(|t| boot_entry::default_label(&t));
    if default.as_deref() != Some(checked.default.label()) {
        return Err(input(format!(
            "{} changed while strata was checking it ({} no longer names {})",
            image.display(),
            layout::DEFAULT_LINK,
            checked.default
        )));
    }
    if top.join(checked.version.dir()).symlink_metadata().is_ok() {
        return Err(input(format!(
            "version {} appeared in {} while strata was checking it",
            checked.version,
            image.display()
        )));
    }
    let subvolumes: Vec<String> = rw.subvolumes.iter().map(|s| s.path.clone()).collect();
    for name in partial_dirs(top) {
        let rel = format!("{}/{name}", layout::SYSTEMS_DIR);
        remove_partial(top, &rel, &subvolumes)
            .context(|| format!("removing {rel}, left by a killed strata upgrade"))?;
        steps.emit(Event::Note(format!(
            "removed {rel} (a half-made version left by a killed strata upgrade)"
        )));
    }
    Ok(rw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_are_unique() {
        let mut names: Vec<&str> = STEPS.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), STEPS.len());
    }

    /// What the harness pauses at: the flush before the flip, the archive's
    /// extraction second, no flip with --no-default.
    #[test]
    fn step_names_follow_the_input() {
        let dir = step_names(false, true);
        assert_eq!(dir.len(), STEPS.len());
        let at = |names: &[&str], n: &str| names.iter().position(|x| *x == n).unwrap();
        assert_eq!(at(&dir, "flush") + 1, at(&dir, "set-default"));
        assert_eq!(at(&dir, "write-boot-config") + 1, at(&dir, "flush"));
        let tar = step_names(true, true);
        assert_eq!(&tar[..3], ["clean-debris", "extract-rootfs", "check-image"]);
        assert!(!step_names(false, false).contains(&"set-default"));
    }
}
