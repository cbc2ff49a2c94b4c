//! `check-image`: everything about the image and the new rootfs decided
//! through a read-only mount, every refusal (exit 2) before anything is
//! written.

use super::existing::{new_kernel_args, record_from_image};
use super::{input, Target, UpgradeOptions};
use crate::bootloader::{self, BootEntry};
use crate::copy;
use crate::deploy::{self, BootSource, Rootfs};
use crate::error::{BuildError, Context, StepError};
use crate::fstab;
use crate::host::interrupt::Interrupt;
use crate::image::{self, ImageError, Mode, OpenImage};
use crate::layout::{self, Version};
use crate::manifest::{Manifest, MANIFEST_VERSION};
use crate::migrate::Migration;
use crate::model;
use crate::plan::{self, Plan, PlanOptions};
use crate::progress::Event;
use crate::size::human;
use crate::steps::Steps;
use crate::sync::{self, StatePolicy, SyncError};
use std::fs;
use std::path::{Path, PathBuf};

/// Space kept free for btrfs metadata (DUP) on top of the data an upgrade
/// writes: a fixed part plus a part per rootfs entry (inodes, directory
/// items and the tree nodes copied on write around them).
const METADATA_MARGIN: u64 = 32 << 20;
const METADATA_PER_ENTRY: u64 = 2 << 10;

/// Everything decided before the image is opened for writing.
pub(super) struct Checked {
    pub(super) rootfs: Rootfs,
    pub(super) version: Version,
    /// The version the new one starts from (a snapshot of its orig, its
    /// kernel arguments and root device): the default of an image, the
    /// booted version of the running system.
    pub(super) old: Version,
    /// What `systems/default` names now: the menu's default until the flip.
    pub(super) default: Version,
    pub(super) plan: Plan,
    /// State dirs of the plan whose subvolume exists: the live data. Their
    /// contents are excluded from the sync and the policy applies.
    pub(super) live_state: Vec<String>,
    /// Menu entries of the versions already on the image, in order.
    pub(super) entries: Vec<BootEntry>,
    /// The new version's extra kernel arguments (`new_kernel_args`).
    pub(super) kernel_args: String,
    /// None: the running system without `--manifest` (nothing is saved).
    pub(super) manifest_path: Option<PathBuf>,
    /// Loaded, or started from the image's layout.
    pub(super) manifest: Manifest,
    pub(super) manifest_existed: bool,
}

pub(super) fn image_error(what: impl FnOnce() -> String) -> impl FnOnce(ImageError) -> StepError {
    move |e| match e {
        ImageError::Input(msg) => StepError::Input(msg),
        e => StepError::Failed {
            what: what(),
            cause: e.into(),
        },
    }
}

impl Checked {
    /// The new version's menu entry.
    pub(super) fn new_entry(&self) -> BootEntry {
        BootEntry {
            version: self.version.clone(),
            root_device: self.plan.root_device.clone(),
            has_initramfs: self.rootfs.initramfs.is_some(),
            kernel_args: self.kernel_args.clone(),
        }
    }
}

pub(super) fn check(
    target: &Target,
    opts: &UpgradeOptions,
    steps: &mut Steps,
) -> Result<Checked, StepError> {
    let image = target.path();
    let version = Version::new(&opts.label).map_err(|e| input(e.to_string()))?;
    let rootfs = deploy::prepare_rootfs(&opts.rootfs, None, None).map_err(into_step_error)?;
    let (manifest_path, loaded) = load_manifest_and_check_free(target, opts)?;
    let ro = open_ro(image, steps)?;
    let checked = check_open(
        target,
        &ro,
        opts,
        version,
        rootfs,
        loaded,
        manifest_path,
        steps,
    )?;
    ro.close()
        .map_err(image_error(|| format!("closing {}", image.display())))?;
    Ok(checked)
}

/// The part of `check` that needs no rootfs: the label, the manifest, the
/// image not in use, its layout (a whole default, no version of that
/// label yet). An upgrade from an archive runs it before the (long)
/// extraction; `check` runs it all again after (through the same code).
pub(super) fn check_without_rootfs(
    target: &Target,
    opts: &UpgradeOptions,
    steps: &mut Steps,
) -> Result<(), StepError> {
    let image = target.path();
    let version = Version::new(&opts.label).map_err(|e| input(e.to_string()))?;
    let (manifest_path, loaded) = load_manifest_and_check_free(target, opts)?;
    let ro = open_ro(image, steps)?;
    check_layout(
        target,
        &ro,
        &version,
        loaded.as_ref(),
        manifest_path.as_deref(),
    )?;
    ro.close()
        .map_err(image_error(|| format!("closing {}", image.display())))
}

fn load_manifest_and_check_free(
    target: &Target,
    opts: &UpgradeOptions,
) -> Result<(Option<PathBuf>, Option<Manifest>), StepError> {
    let image = target.path();
    let manifest_path = opts.manifest.clone().or_else(|| target.default_manifest());
    let loaded = match manifest_path.as_deref().map(|p| (p, p.symlink_metadata())) {
        Some((p, Ok(_))) => Some(Manifest::load(p).map_err(|e| {
            input(format!(
                "{e} (give --manifest PATH for this image's manifest, or move that file away)"
            ))
        })?),
        _ => None,
    };
    // No other strata: `upgrade` holds the image's exclusive lock. Killed
    // runs' mounts were cleaned in the step before (their loop devices
    // detach themselves): a loop device still bound to the image is
    // someone else's (a hand mount, a VM).
    crate::lock::refuse_attached(image)?;
    Ok((manifest_path, loaded))
}

fn open_ro(image: &Path, steps: &mut Steps) -> Result<OpenImage, StepError> {
    let ro = image::open(image, Mode::ReadOnly).map_err(image_error(|| {
        format!("opening {} read-only", image.display())
    }))?;
    for c in &ro.cleaned {
        steps.emit(Event::Note(c.to_string()));
    }
    Ok(ro)
}

fn into_step_error(e: BuildError) -> StepError {
    match e {
        BuildError::Input(m) => StepError::Input(m),
        BuildError::Interrupted => StepError::Interrupted,
        BuildError::Step { what, cause, .. } => StepError::Failed { what, cause },
    }
}

#[allow(clippy::too_many_arguments)]
fn check_open(
    target: &Target,
    ro: &OpenImage,
    opts: &UpgradeOptions,
    version: Version,
    rootfs: Rootfs,
    loaded: Option<Manifest>,
    manifest_path: Option<PathBuf>,
    steps: &mut Steps,
) -> Result<Checked, StepError> {
    let image = target.path();
    let layout = ro.layout();
    let (old, default) = check_layout(
        target,
        ro,
        &version,
        loaded.as_ref(),
        manifest_path.as_deref(),
    )?;
    let old_label = old.label().to_owned();
    let fs_uuid = layout.filesystem.uuid.clone();

    let root_device = bootloader::image_root_device(&layout, loaded.as_ref());

    let state_dirs = state_dir_list(loaded.as_ref(), &old_label, &layout);
    let fstab_bytes = rootfs
        .dir
        .read("etc/fstab")
        .map_err(|e| input(e.to_string()))?;
    let new_entries = fstab::parse(fstab_bytes.as_deref().unwrap_or_default());
    let has_root_entry = fstab::find_target(&new_entries, "/").is_some();
    if !has_root_entry
        && rootfs.initramfs.is_none()
        && (root_device.starts_with("UUID=") || root_device.starts_with("LABEL="))
    {
        return Err(input(format!(
            "the image's root device is {root_device}, which needs an initramfs to be found at boot, and rootfs {} has none",
            rootfs.path.display()
        )));
    }
    let plan = plan::plan(
        fstab_bytes.as_deref(),
        &PlanOptions {
            label: version.label().to_owned(),
            state_dirs,
            // Through the plan's own rule when it is the filesystem's UUID
            // (the build's default); as given otherwise. A `/` entry in the
            // new fstab wins either way.
            root_device: (!has_root_entry && root_device != format!("UUID={fs_uuid}"))
                .then(|| root_device.clone()),
            fs_uuid: fs_uuid.clone(),
            has_initramfs: rootfs.initramfs.is_some(),
        },
    )
    .map_err(|e| input(e.to_string()))?;
    deploy::check_state_dirs(&rootfs.dir, &rootfs.path, &plan).map_err(into_step_error)?;
    deploy::refuse_hidden_data(&rootfs.dir, &rootfs.path, &plan, fstab_bytes.as_deref())
        .map_err(|e| input(e.to_string()))?;

    let live_state: Vec<String> = plan
        .created_state_dirs()
        .filter(|d| {
            layout
                .state_dirs
                .iter()
                .any(|s| s.name == *d && s.subvolume.is_some())
        })
        .map(str::to_owned)
        .collect();
    let hidden = hidden_state(ro, &new_entries, &plan, &live_state);
    if !hidden.is_empty() {
        if opts.allow_hidden_state {
            steps.emit(Event::Note(format!(
                "--allow-hidden-state: the new fstab hides data already in the state: {}",
                hidden.join("; ")
            )));
        } else {
            return Err(input(format!(
                "rootfs {}'s /etc/fstab mounts over data already in the live state, which the \
                 booted system could no longer see: {}. Move or remove that data in the image \
                 first, drop the mount from the new fstab, or pass --allow-hidden-state to \
                 upgrade anyway (`strata inspect --lint` will name the data)",
                rootfs.path.display(),
                hidden.join("; ")
            )));
        }
    }
    check_fit(
        ro.top(),
        &old,
        &rootfs,
        opts,
        &live_state,
        steps.interrupt(),
    )?;

    // A whole version nothing describes (an upgrade killed between its
    // rename and its menu, before its manifest record) was deployed with
    // the image's root device: it keeps it.
    let entries =
        bootloader::menu_entries(ro.top(), &layout, loaded.as_ref(), None, Some(&root_device))
            .map_err(input)?;
    let kernel_args = new_kernel_args(opts.kernel_args.as_deref(), &entries, &old);
    let manifest_existed = loaded.is_some();
    let mut manifest = loaded.unwrap_or_else(|| Manifest {
        manifest_version: MANIFEST_VERSION,
        fs_uuid,
        image_size: fs::metadata(image).map(|m| m.len()).unwrap_or(0),
        default: old_label.clone(),
        versions: Vec::new(),
    });
    // The manifest describes the image: a whole version it has no record
    // of (a run killed after the image was complete but before the
    // manifest was written, a version made by another tool) gets one read
    // off the image; a record of a version no longer there goes.
    for e in &entries {
        if manifest.version(e.version.label()).is_none() {
            if let (true, Some(manifest_path)) = (manifest_existed, &manifest_path) {
                steps.emit(Event::Note(format!(
                    "manifest {}: no record of version {}; adding one read off the image",
                    manifest_path.display(),
                    e.version
                )));
            }
            manifest.versions.push(record_from_image(&layout, e));
        }
    }
    manifest.versions.retain(|r| {
        let there = layout.versions.iter().any(|v| v.label == r.label);
        if let (false, Some(manifest_path)) = (there, &manifest_path) {
            steps.emit(Event::Note(format!(
                "manifest {}: dropping the record of version {}, which is not on the image",
                manifest_path.display(),
                r.label
            )));
        }
        there
    });
    manifest.default = default.label().to_owned();
    Ok(Checked {
        rootfs,
        version,
        old,
        default,
        plan,
        live_state,
        entries,
        kernel_args,
        manifest_path,
        manifest,
        manifest_existed,
    })
}

/// How many hidden files a refusal names per mount; the rest are counted.
const HIDDEN_NAMED: usize = 5;

/// The live state the new version would hide: for each boot mount of the
/// new fstab (`fstab::mounts_over_root`, the one rule for what mounts at
/// boot) inside the mountpoint of a live state subvolume, what that
/// subvolume already holds at the mount's path. One text per mount:
/// `/var/lib/docker (tmpfs) over state/var/lib/docker: 3 entries
/// (/var/lib/docker/a, …)`. Read through the read-only mount, never
/// following a symlink of the image.
fn hidden_state(
    ro: &OpenImage,
    entries: &[fstab::Entry],
    plan: &Plan,
    live: &[String],
) -> Vec<String> {
    let Ok(root) = crate::rootfs::RootDir::open(ro.top()) else {
        return Vec::new();
    };
    let state_points: Vec<String> = plan
        .created_state_dirs()
        .map(layout::state_mountpoint)
        .collect();
    let subvols = &ro.layout().subvolumes;
    let mut out = Vec::new();
    for e in fstab::mounts_over_root(entries) {
        // A state dir's own mount is strata's: its data is its subvolume.
        if state_points.contains(&e.target) {
            continue;
        }
        for d in live {
            let point = layout::state_mountpoint(d);
            let Some(rest) = e.target.strip_prefix(&point).filter(|r| r.starts_with('/')) else {
                continue;
            };
            let dir_rel = format!("{}{rest}", layout::state(d));
            let Some(files) = image::lint::entries_under(&root, &dir_rel, &e.target, subvols)
            else {
                continue;
            };
            if files.is_empty() {
                continue;
            }
            let mut named: Vec<&str> = files
                .iter()
                .take(HIDDEN_NAMED)
                .map(|f| f.path.as_str())
                .collect();
            let more = files.len().saturating_sub(HIDDEN_NAMED);
            let more_text = format!("and {more} more");
            if more > 0 {
                named.push(&more_text);
            }
            out.push(format!(
                "{} ({}) over {dir_rel}: {} ({})",
                e.target,
                e.fstype,
                if files.len() == 1 {
                    "1 entry".to_owned()
                } else {
                    format!("{} entries", files.len())
                },
                named.join(", ")
            ));
        }
    }
    out
}

/// The image is a strata layout with a whole default version and no
/// version called `version` yet; the manifest, if any, is this image's.
/// Returns the version to start from (the default, or the running
/// system's booted version, which must be whole too) and the default.
fn check_layout(
    target: &Target,
    ro: &OpenImage,
    version: &Version,
    loaded: Option<&Manifest>,
    manifest_path: Option<&Path>,
) -> Result<(Version, Version), StepError> {
    let shown = target.path().display();
    let layout = ro.layout();
    let not_layout = |why: String| {
        let problems = if layout.problems.is_empty() {
            String::new()
        } else {
            format!(" ({})", layout.problems.join("; "))
        };
        input(format!(
            "{shown} is not a strata system layout to upgrade: {why}{problems}"
        ))
    };
    let Some(old_label) = layout.default.version.clone() else {
        return Err(not_layout(format!(
            "{} names no version",
            layout::DEFAULT_LINK
        )));
    };
    // Whole by the one rule (`bootloader::problems`): the initramfs its
    // entry or record names is there too.
    let not_whole = |label: &str| match layout.versions.iter().find(|v| v.label == label) {
        None => Some("it is not on the image".to_owned()),
        Some(v) => {
            let problems = bootloader::problems(ro.top(), &layout, loaded, v);
            (!problems.is_empty()).then(|| problems.join("; "))
        }
    };
    if let Some(why) = not_whole(&old_label) {
        return Err(not_layout(format!(
            "the default version {old_label} is not whole ({why})"
        )));
    }
    let default = Version::new(&old_label).map_err(|e| not_layout(e.to_string()))?;
    let old = match target.base() {
        None => default.clone(),
        Some(booted) => {
            if let Some(why) = not_whole(booted.label()) {
                return Err(not_layout(format!(
                    "the booted version {booted} is not a whole version of it ({why})"
                )));
            }
            booted.clone()
        }
    };
    if layout.versions.iter().any(|v| v.label == version.label())
        || ro.top().join(version.dir()).symlink_metadata().is_ok()
    {
        return Err(input(format!(
            "version {version} already exists in {shown} (versions: {}): choose another --label",
            layout
                .versions
                .iter()
                .map(|v| v.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let fs_uuid = layout.filesystem.uuid.clone();
    if let (Some(m), Some(manifest_path)) = (loaded, manifest_path) {
        if m.fs_uuid != fs_uuid {
            return Err(input(format!(
                "manifest {} describes filesystem {}, but {shown} is filesystem {fs_uuid}: give --manifest PATH for this image's manifest",
                manifest_path.display(),
                m.fs_uuid
            )));
        }
    }
    Ok((old, default))
}

/// The state dirs the new version mounts: the image's configured list
/// (the default version's as the manifest records it, created and skipped,
/// then the other versions'), then every state subvolume on the image (in
/// the build's default order, then by name).
fn state_dir_list(
    manifest: Option<&Manifest>,
    default: &str,
    layout: &model::ImageLayout,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |d: &str| {
        if !out.iter().any(|o| o == d) {
            out.push(d.to_owned());
        }
    };
    if let Some(m) = manifest {
        let records = m
            .version(default)
            .into_iter()
            .chain(m.versions.iter().filter(|v| v.label != default));
        for r in records {
            for d in &r.state_dirs.created {
                add(d);
            }
            for s in &r.state_dirs.skipped {
                add(&s.dir);
            }
        }
    }
    let rank = |n: &str| {
        layout::DEFAULT_STATE_DIRS
            .iter()
            .position(|d| *d == n)
            .unwrap_or(layout::DEFAULT_STATE_DIRS.len())
    };
    let mut on_image: Vec<&str> = layout
        .state_dirs
        .iter()
        .filter(|s| s.subvolume.is_some())
        .map(|s| s.name.as_str())
        .collect();
    on_image.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    for d in on_image {
        add(d);
    }
    out
}

/// Refuses an upgrade that would not fit. The new orig shares the old
/// one's extents, so only changed and new files need space (deleting
/// shared files frees nothing), plus state data merged, kernel and
/// initramfs, and metadata. When even a rewrite of the whole rootfs fits,
/// the exact figure (rsync's dry run, which reads both trees) is not
/// needed.
fn check_fit(
    top: &Path,
    old: &Version,
    rootfs: &Rootfs,
    opts: &UpgradeOptions,
    live_state: &[String],
    interrupt: &Interrupt,
) -> Result<(), StepError> {
    // btrfs's own estimate, not statvfs: on this read-only mount statvfs
    // says 0 once every chunk is allocated (after an ENOSPC), however much
    // room the chunks have.
    let usage = crate::host::btrfs::usage(top)
        .context(|| format!("reading the free space of {}", top.display()))?;
    let free = usage.data_free;
    let boot_files: u64 = [Some(&rootfs.kernel), rootfs.initramfs.as_ref()]
        .into_iter()
        .flatten()
        .map(|b| boot_file_size(rootfs, b))
        .sum();
    // The margin counts every copy (DUP: two). Metadata goes first into
    // the room its chunks still have (each byte of it holding
    // metadata_ratio copies); only the rest takes new chunks out of the
    // space data could use.
    let in_chunks = (usage.metadata_free as f64 * usage.metadata_ratio) as u64;
    let margin =
        (METADATA_MARGIN + METADATA_PER_ENTRY * rootfs.size.entries).saturating_sub(in_chunks);
    let fixed = boot_files + margin;
    if free >= rootfs.size.allocated + fixed {
        return Ok(());
    }
    let excluded: Vec<String> = match opts.migration {
        Migration::Move => live_state.to_vec(),
        Migration::Copy => Vec::new(),
    };
    let changed =
        sync::estimate_sync_bytes(&rootfs.path, &top.join(old.orig()), &excluded, interrupt)
            .map_err(|e| match e {
                SyncError::Interrupted => StepError::Interrupted,
                e => StepError::Failed {
                    what: format!("estimating what rootfs {} changes", rootfs.path.display()),
                    cause: e.into(),
                },
            })?;
    let merged: u64 = match opts.state_data {
        StatePolicy::Keep => 0,
        StatePolicy::Merge => live_state
            .iter()
            .filter_map(|d| copy::measure(&rootfs.path.join(d)).ok())
            .map(|t| t.allocated)
            .sum(),
    };
    let need = changed + merged + fixed;
    if need > free {
        return Err(input(format!(
            "rootfs {} would not fit: the upgrade needs about {} ({} of changed files, up to {} of state data to merge, {} for kernel and initramfs, {} kept for btrfs metadata) and the image has {} free: missing {}; give the image more space or remove an old version",
            rootfs.path.display(),
            human(need),
            human(changed),
            human(merged),
            human(boot_files),
            human(margin),
            human(free),
            human(need - free)
        )));
    }
    Ok(())
}

fn boot_file_size(rootfs: &Rootfs, b: &BootSource) -> u64 {
    match b {
        BootSource::Rootfs(p) => rootfs
            .dir
            .open_file(p)
            .ok()
            .flatten()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0),
        BootSource::Host(p) => fs::metadata(p).map(|m| m.len()).unwrap_or(0),
    }
}
