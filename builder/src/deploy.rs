//! Deploying ONE version into an image's top level (`toplevel::TopLevel`:
//! mounted, or a rootless build's staging directory), as the named steps of
//! layout.md §1–4 and §6: orig, copy, fstab, state, hash, mountpoint check,
//! run snapshot, kernel. The result is
//! `systems/<label>/{orig,run,kernel,initramfs}` and its state subvolumes.
//!
//! It knows nothing of how the image was made or opened (mkfs, loop device,
//! temp file, staging) and does not touch what makes a version boot: the caller
//! writes the boot menu and flips the default afterwards (`boot`). `build`
//! calls it on a fresh image; an upgrade calls it on an open one.

use crate::bootloader::BootEntry;
use crate::copy::{self, CopyError, TreeSize};
use crate::error::{BuildError, Context, StepError};
use crate::etcfile;
use crate::fstab;
use crate::kernel::{self, BootFiles};
use crate::layout::{self, Version};
use crate::manifest::MovedFile;
use crate::migrate::{self, MigrateError, Migration};
use crate::plan::{FstabChange, Plan};
use crate::progress::{Event, Step};
use crate::rootfs::RootDir;
use crate::size::human;
use crate::steps::Steps;
use crate::toplevel::TopLevel;
use rustix::fs::FileType;
use std::fs;
use std::path::{Path, PathBuf};

/// Where a boot file comes from: inside the rootfs, or given on the host.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A path inside the rootfs, without a leading slash.
    Rootfs(String),
    Host(PathBuf),
}

impl BootSource {
    /// As the manifest records it (`kernel_source`).
    pub fn describe(&self) -> String {
        match self {
            BootSource::Rootfs(p) => format!("/{p}"),
            BootSource::Host(p) => p.display().to_string(),
        }
    }
}

/// A rootfs ready to deploy: opened (every path in it resolves inside it),
/// measured, its boot files chosen.
#[derive(Debug)]
pub struct Rootfs {
    pub path: PathBuf,
    pub dir: RootDir,
    pub kernel: BootSource,
    pub initramfs: Option<BootSource>,
    pub size: TreeSize,
    /// A tree strata extracted itself, on the filesystem of the top level
    /// (a rootless build's archive or copy): renamed into `orig` rather
    /// than copied again.
    pub scratch: bool,
}

fn input(msg: impl Into<String>) -> BuildError {
    BuildError::Input(msg.into())
}

/// Opens the rootfs the user named: a directory (a symlink to one is what
/// they meant) with an `etc/` inside. Refusals are input errors.
pub fn open_rootfs(path: &Path) -> Result<RootDir, BuildError> {
    let meta = fs::metadata(path).map_err(|e| input(format!("rootfs {}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Err(input(format!(
            "rootfs {} is not a directory",
            path.display()
        )));
    }
    let source =
        RootDir::open(path).map_err(|e| input(format!("rootfs {}: {e}", path.display())))?;
    match source.open_dir("etc") {
        Ok(Some(_)) => Ok(source),
        Ok(None) => Err(input(format!(
            "rootfs {} has no etc/ directory: is it a root filesystem?",
            path.display()
        ))),
        Err(e) => Err(input(e.to_string())),
    }
}

/// The kernel and initramfs to install (layout.md §4): host files given
/// explicitly win, else the rootfs's own. An explicit kernel gets only an
/// explicit initramfs: one found in the rootfs belongs to the rootfs's own
/// kernel.
pub fn boot_sources(
    source: &RootDir,
    path: &Path,
    kernel: Option<&Path>,
    initramfs: Option<&Path>,
    initramfs_in_rootfs: Option<&str>,
) -> Result<(BootSource, Option<BootSource>), BuildError> {
    let found = kernel::find(source).map_err(|e| input(e.to_string()))?;
    let (kernel_source, found_initramfs) = match (kernel, found) {
        (Some(k), found) => (
            BootSource::Host(host_file(k, "kernel")?),
            found.and_then(|f| f.initramfs),
        ),
        (None, Some(BootFiles { kernel, initramfs })) => (BootSource::Rootfs(kernel), initramfs),
        (None, None) => {
            return Err(input(format!(
                "no kernel found in rootfs {} (looked for boot/vmlinuz-<version>, boot/vmlinuz, vmlinuz): give --kernel",
                path.display()
            )))
        }
    };
    let initramfs_source = match (initramfs, initramfs_in_rootfs) {
        (Some(i), _) => Some(BootSource::Host(host_file(i, "initramfs")?)),
        (None, Some(p)) => Some(BootSource::Rootfs(rootfs_file(
            source,
            p,
            "INITRAMFS_PATH",
        )?)),
        // An explicit kernel gets only an explicit initramfs: one found in
        // the rootfs belongs to the rootfs's own kernel.
        (None, None) if kernel.is_some() => None,
        (None, None) => found_initramfs.map(BootSource::Rootfs),
    };
    // Look at what will be copied now, before anything is created: a fifo
    // or device node named like a kernel is refused here, not mid-build.
    for (what, src) in [
        ("kernel", Some(&kernel_source)),
        ("initramfs", initramfs_source.as_ref()),
    ] {
        if let Some(BootSource::Rootfs(p)) = src {
            rootfs_file(source, p, what)?;
        }
    }
    check_kernel(source, path, &kernel_source)?;
    Ok((kernel_source, initramfs_source))
}

/// Refuses a kernel that is not one (no x86 boot header): extlinux would
/// copy it and fail at boot, and a link to any file of the rootfs (its
/// /etc/shadow) would otherwise be installed as a kernel. The file was
/// already checked to be a regular file (`rootfs_file`, `host_file`).
fn check_kernel(source: &RootDir, path: &Path, kernel: &BootSource) -> Result<(), BuildError> {
    let (shown, file) = match kernel {
        BootSource::Rootfs(p) => (
            format!("kernel {p} in rootfs {}", path.display()),
            source
                .open_file(p)
                .map_err(|e| input(format!("kernel: {e}")))?,
        ),
        BootSource::Host(p) => (
            format!("kernel {}", p.display()),
            Some(fs::File::open(p).map_err(|e| input(format!("kernel {}: {e}", p.display())))?),
        ),
    };
    let Some(mut file) = file else {
        return Err(input(format!("{shown}: no such file")));
    };
    match kernel::check(&mut file) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(input(format!("{shown} is not an x86 Linux kernel: {why}"))),
        Err(e) => Err(input(format!("{shown}: {e}"))),
    }
}

/// A regular file inside the rootfs named by the user (`what` says how),
/// as a path relative to the rootfs top.
fn rootfs_file(source: &RootDir, path: &str, what: &str) -> Result<String, BuildError> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return Err(input(format!("{what} {path:?} names no file")));
    }
    match source.open_file(rel) {
        Ok(Some(_)) => Ok(rel.to_owned()),
        Ok(None) => Err(input(format!(
            "{what} {path}: no such file in rootfs {}",
            source.path().display()
        ))),
        Err(e) => Err(input(format!("{what}: {e}"))),
    }
}

pub fn host_file(path: &Path, what: &str) -> Result<PathBuf, BuildError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(path.to_owned()),
        Ok(_) => Err(input(format!(
            "{what} {} is not a regular file",
            path.display()
        ))),
        Err(e) => Err(input(format!("{what} {}: {e}", path.display()))),
    }
}

/// `open_rootfs` + `boot_sources` + its size: a rootfs ready to deploy.
pub fn prepare_rootfs(
    path: &Path,
    kernel: Option<&Path>,
    initramfs: Option<&Path>,
) -> Result<Rootfs, BuildError> {
    let dir = open_rootfs(path)?;
    let (kernel, initramfs) = boot_sources(&dir, path, kernel, initramfs, None)?;
    let size = copy::measure(path)
        .map_err(|e| input(format!("reading rootfs {}: {e}", path.display())))?;
    Ok(Rootfs {
        path: path.to_owned(),
        dir,
        kernel,
        initramfs,
        size,
        scratch: false,
    })
}

/// Every state dir the plan mounts must be a real directory in the rootfs,
/// or absent: a symlink or file there cannot be mounted over.
pub fn check_state_dirs(source: &RootDir, path: &Path, plan: &Plan) -> Result<(), BuildError> {
    for dir in plan.created_state_dirs() {
        match source
            .top_level_type(dir)
            .map_err(|e| input(e.to_string()))?
        {
            None | Some(FileType::Directory) => {}
            Some(FileType::Symlink) => {
                return Err(input(format!(
                    "rootfs {}: /{dir} is a symlink; a state directory must be a real directory (or absent) to be mounted over",
                    path.display()
                )))
            }
            Some(_) => {
                return Err(input(format!(
                    "rootfs {}: /{dir} is not a directory",
                    path.display()
                )))
            }
        }
    }
    Ok(())
}

/// How to deploy it.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    pub migration: Migration,
    /// Extra kernel arguments for this version's boot entry.
    pub kernel_args: String,
    /// The image's size, named when the copy runs out of space.
    pub image_size: u64,
}

/// What the manifest records about the deployed version, and its boot entry.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub version: Version,
    pub boot: BootEntry,
    /// Every entry moved into a state subvolume, hashed.
    pub moved_files: Vec<MovedFile>,
    /// Layout paths (`systems/<label>/kernel`).
    pub kernel: String,
    pub initramfs: Option<String>,
    /// Where they came from (`BootSource::describe`).
    pub kernel_source: String,
    pub initramfs_source: Option<String>,
}

/// Deploys `rootfs` as `version` following `plan`. Refuses a version that is
/// already there. On failure the version is left half made: the caller
/// undoes it (a new image is deleted whole).
pub fn deploy(
    top: &mut dyn TopLevel,
    version: &Version,
    rootfs: &Rootfs,
    plan: &Plan,
    opts: &DeployOptions,
    steps: &mut Steps,
) -> Result<Deployed, BuildError> {
    let orig = steps.run(Step::CreateOrig, |_| create_orig(top, version))?;
    steps.run(Step::CopyRootfs, |s| {
        copy_rootfs(rootfs, &orig, version, opts, s)
    })?;
    // Open once the copy is complete: every later look inside orig resolves
    // inside it. Dropped when this returns, before the caller unmounts.
    let orig_root = steps.run(Step::CompleteFstab, |_| {
        complete_fstab(&orig, version, plan)
    })?;
    let mut moved = steps.run(Step::MigrateState, |s| {
        move_state(top, &orig_root, plan, opts.migration, s)
    })?;
    steps.run(Step::HashMoved, |s| {
        hash_moved(top.path(), &mut moved, s.interrupt())
    })?;
    steps.run(Step::CheckMountpoints, |_| {
        check_mountpoints(&orig_root, plan, opts.migration)
    })?;
    steps.run(Step::Snapshot, |_| snapshot_run(top, version))?;
    steps.run(Step::InstallKernel, |_| {
        install_kernel(top.path(), version, rootfs)
    })?;

    Ok(Deployed {
        version: version.clone(),
        boot: BootEntry {
            version: version.clone(),
            root_device: plan.root_device.clone(),
            has_initramfs: rootfs.initramfs.is_some(),
            kernel_args: opts.kernel_args.clone(),
        },
        moved_files: moved,
        kernel: version.kernel(),
        initramfs: rootfs.initramfs.as_ref().map(|_| version.initramfs()),
        kernel_source: rootfs.kernel.describe(),
        initramfs_source: rootfs.initramfs.as_ref().map(BootSource::describe),
    })
}

/// `systems/<label>/` (new: never over an existing version) and its `orig`
/// subvolume.
fn create_orig(top: &mut dyn TopLevel, version: &Version) -> Result<PathBuf, StepError> {
    let path = top.path().to_owned();
    fs::create_dir_all(path.join(layout::SYSTEMS_DIR))
        .context(|| format!("creating {}", layout::SYSTEMS_DIR))?;
    fs::create_dir(path.join(version.dir())).context(|| format!("creating {}", version.dir()))?;
    top.create_subvolume(&version.orig())
        .context(|| format!("creating subvolume {}", version.orig()))?;
    Ok(path.join(version.orig()))
}

fn copy_rootfs(
    rootfs: &Rootfs,
    orig: &Path,
    version: &Version,
    opts: &DeployOptions,
    steps: &mut Steps,
) -> Result<(), StepError> {
    if rootfs.scratch {
        // Our own extraction on the same filesystem: `orig` is still empty
        // (a fresh directory), so the tree takes its place whole.
        return fs::rename(&rootfs.path, orig)
            .context(|| format!("moving {} into {}", rootfs.path.display(), version.orig()));
    }
    let (interrupt, total) = (steps.interrupt(), rootfs.size.entries);
    let copied = copy::copy_tree(&rootfs.path, orig, false, interrupt, |done| {
        steps.emit(Event::CopyProgress { done, total })
    });
    match copied {
        Err(CopyError::NoSpace) => Err(StepError::input(format!(
            "image size {} is too small for rootfs {} ({} allocated, plus btrfs metadata): no space left while copying; give a larger --size",
            human(opts.image_size),
            rootfs.path.display(),
            human(rootfs.size.allocated)
        ))),
        Err(CopyError::Interrupted) => Err(StepError::Interrupted),
        r => r.context(|| {
            format!(
                "copying rootfs {} into {}",
                rootfs.path.display(),
                version.orig()
            )
        }),
    }
}

/// Writes the fstab the plan completed (layout.md §3) into `orig`.
pub(crate) fn complete_fstab(
    orig: &Path,
    version: &Version,
    plan: &Plan,
) -> Result<RootDir, StepError> {
    let root = RootDir::open(orig).context(|| format!("opening {}", version.orig()))?;
    if let FstabChange::Write { contents, .. } = &plan.fstab {
        etcfile::replace(&root, "fstab", contents)
            .context(|| format!("writing {}", version.fstab(layout::Tree::Orig)))?;
    }
    Ok(root)
}

/// For each state dir the plan creates: the `state/<dir>` subvolume (unless
/// the image already has it) and `orig/<dir>`'s data moved into it
/// (layout.md §2), leaving `orig/<dir>` as an empty mountpoint.
fn move_state(
    top: &mut dyn TopLevel,
    orig: &RootDir,
    plan: &Plan,
    how: Migration,
    steps: &mut Steps,
) -> Result<Vec<MovedFile>, StepError> {
    let (path, clone) = (top.path().to_owned(), top.clones_extents());
    fs::create_dir_all(path.join(layout::STATE_DIR))
        .context(|| format!("creating {}", layout::STATE_DIR))?;
    let mut moved = Vec::new();
    for dir in plan.created_state_dirs() {
        if steps.interrupt().raised() {
            return Err(StepError::Interrupted);
        }
        let (state, mountpoint) = (layout::state(dir), layout::state_mountpoint(dir));
        let target = path.join(&state);
        let existed = match target.symlink_metadata() {
            Ok(m) if m.is_dir() => true,
            Ok(_) => {
                return Err(format!("{state} exists and is not a directory"))
                    .context(|| format!("creating subvolume {state}"))
            }
            Err(_) => {
                top.create_subvolume(&state)
                    .context(|| format!("creating subvolume {state}"))?;
                false
            }
        };
        let from = orig.path().join(dir);
        if orig
            .top_level_type(dir)
            .context(|| format!("checking {mountpoint}"))?
            .is_none()
        {
            // No data to move, but the mountpoint must exist.
            fs::create_dir(&from).context(|| format!("creating mountpoint {mountpoint}"))?;
            continue;
        }
        // The image's state holds the machine's live data, shared by every
        // version: what to do with a new rootfs's data for it (leave it out,
        // merge where absent) is the upgrade's policy, not a silent merge.
        if existed
            && !orig
                .list_dir(dir)
                .context(|| format!("listing {mountpoint}"))?
                .is_empty()
        {
            return Err(format!(
                "{state} already holds the image's live data and the rootfs has data under {mountpoint}: no policy to combine them"
            ))
            .context(|| format!("moving {mountpoint} into {state}"));
        }
        match migrate::migrate(&from, &target, dir, how, clone, steps.interrupt()) {
            Ok(files) => moved.extend(files),
            Err(MigrateError::Copy(CopyError::Interrupted)) => return Err(StepError::Interrupted),
            Err(e) => return Err(e).context(|| format!("moving {mountpoint} into {state}")),
        }
    }
    Ok(moved)
}

fn hash_moved(
    top: &Path,
    moved: &mut [MovedFile],
    interrupt: &crate::host::interrupt::Interrupt,
) -> Result<(), StepError> {
    match migrate::hash_moved(moved, &top.join(layout::STATE_DIR), interrupt) {
        Err(MigrateError::Interrupted) => Err(StepError::Interrupted),
        r => r.context(|| "hashing moved files".into()),
    }
}

/// The image's etc/fstab: the plan's completed one, or the rootfs's own
/// (`fstab_bytes`) when the plan leaves it unchanged.
pub(crate) fn completed_fstab(plan: &Plan, fstab_bytes: Option<&[u8]>) -> Vec<u8> {
    match &plan.fstab {
        crate::plan::FstabChange::Write { contents, .. } => contents.clone(),
        crate::plan::FstabChange::Unchanged => fstab_bytes.unwrap_or_default().to_vec(),
    }
}

/// No fstab mount point may hide data in the system: systemd would log
/// "Directory … to mount over is not empty" and the files would vanish from
/// view. Only `--state-migration copy` may leave state dirs filled.
/// layout.md §3: data under ANY mount point of the completed fstab is
/// refused before anything is copied, judged on the source tree — including
/// mount points nested in a state dir (`/var/lib/docker` on its own disk):
/// moving `/var` would carry that data into `state/var/lib/docker`, where
/// the mount hides it. State dirs themselves are the exception: their data
/// is moved out (or, with `Migration::Copy`, deliberately left).
pub fn refuse_hidden_data(
    dir: &RootDir,
    shown: &Path,
    plan: &Plan,
    fstab_bytes: Option<&[u8]>,
) -> Result<(), BuildError> {
    let completed = completed_fstab(plan, fstab_bytes);
    for entry in fstab::mounts_over_root(&fstab::parse(&completed)) {
        let target = entry.target.trim_start_matches('/');
        if plan.created_state_dirs().any(|d| d == target) {
            continue;
        }
        let names = dir.list_dir(target).map_err(|e| input(e.to_string()))?;
        if !names.is_empty() {
            let listed: Vec<String> = names
                .iter()
                .take(5)
                .map(|n| format!("{}/{n}", entry.target))
                .collect();
            return Err(input(format!(
                "{} is a mount point (etc/fstab line {}: {}) but rootfs {} has {} entries under it ({}{}): they would be hidden at boot; move them onto that filesystem or remove them",
                entry.target,
                entry.line,
                entry.raw.trim(),
                shown.display(),
                names.len(),
                listed.join(", "),
                if names.len() > 5 { ", …" } else { "" }
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_mountpoints(
    orig: &RootDir,
    plan: &Plan,
    how: Migration,
) -> Result<(), StepError> {
    let text = orig
        .read("etc/fstab")
        .context(|| "checking mount points".into())?
        .unwrap_or_default();
    let entries = fstab::parse(&text);
    for entry in fstab::mounts_over_root(&entries) {
        let target = entry.target.trim_start_matches('/');
        let is_state = plan.created_state_dirs().any(|d| d == target);
        if is_state && how == Migration::Copy {
            continue;
        }
        let names = orig
            .list_dir(target)
            .context(|| format!("checking mount point {}", entry.target))?;
        if !names.is_empty() {
            let shown: Vec<String> = names
                .iter()
                .take(5)
                .map(|n| format!("{}/{n}", entry.target))
                .collect();
            return Err(StepError::input(format!(
                "{} is a mount point (etc/fstab line {}: {}) but the rootfs has {} entries under it ({}{}): they would be hidden at boot; move them onto that filesystem or remove them",
                entry.target,
                entry.line,
                entry.raw.trim(),
                names.len(),
                shown.join(", "),
                if names.len() > 5 { ", …" } else { "" }
            )));
        }
    }
    Ok(())
}

/// `run`: a writable snapshot of the finished `orig` (fstab completed, state
/// moved out), so it costs ~0 bytes and its parent is `orig`.
pub(crate) fn snapshot_run(top: &mut dyn TopLevel, version: &Version) -> Result<(), StepError> {
    top.snapshot(&version.orig(), &version.run())
        .context(|| format!("snapshotting {} as {}", version.orig(), version.run()))
}

/// The kernel and initramfs beside the subvolumes (syslinux cannot enter
/// subvolumes).
fn install_kernel(top: &Path, version: &Version, rootfs: &Rootfs) -> Result<(), StepError> {
    install_boot_file(top, &rootfs.dir, &rootfs.kernel, &version.kernel())?;
    if let Some(i) = &rootfs.initramfs {
        install_boot_file(top, &rootfs.dir, i, &version.initramfs())?;
    }
    Ok(())
}

pub(crate) fn install_boot_file(
    top: &Path,
    source: &RootDir,
    from: &BootSource,
    to: &str,
) -> Result<(), StepError> {
    let what = || format!("installing {} as {to}", from.describe());
    let mut reader = match from {
        BootSource::Rootfs(p) => source
            .open_file(p)
            .context(what)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
            .context(what)?,
        BootSource::Host(p) => fs::File::open(p).context(what)?,
    };
    let mut out = fs::File::create(top.join(to)).context(what)?;
    std::io::copy(&mut reader, &mut out).context(what)?;
    Ok(())
}
