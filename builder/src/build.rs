//! `strata build`: rootfs → image. Everything that can be checked without
//! side effects is checked in `prepare` first; `run` then
//!
//! ```text
//! (a tar archive: extract it next to the output)     rootfs_tar::Extraction
//! create the image (temp file, mkfs, loop, mount)   NewImage
//! deploy one version into it                         deploy::deploy
//! boot menu, default link, bootloader                boot
//! sync, unmount, detach; rename into place           NewImage::close, persist
//! ```
//!
//! Every resource the image needs (temp file, loop device, mount) is a guard
//! that undoes itself on any error or interruption.

use crate::boot;
use crate::copy;
use crate::deploy::{self, DeployOptions, Deployed, Rootfs};
use crate::error::{BuildError, Context, StepError};
use crate::host::btrfs;
use crate::host::claim;
use crate::host::debris;
use crate::host::interrupt::Interrupt;
use crate::host::loopdev::LoopDevice;
use crate::host::mount::Mount;
use crate::layout::{self, Version};
use crate::lock::ImageLock;
use crate::manifest::{
    Backend, Deployment, Manifest, SkippedStateDir, StateDirs, VersionRecord, MANIFEST_VERSION,
};
use crate::migrate::Migration;
use crate::plan::{self, Plan, PlanOptions, StateDirAction};
use crate::progress::{Event, Step};
use crate::rootfs_tar;
use crate::rootfs_tar::{DeviceNodes, Extraction, RootfsInput};
use crate::size::human;
use crate::steps::Steps;
use crate::toplevel::{Mounted, TopLevel};
use std::fs;
use std::path::{Path, PathBuf};

/// mkfs.btrfs refuses much less than this with default (DUP metadata) profiles.
pub const MIN_IMAGE_SIZE: u64 = 128 << 20;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildOptions {
    pub rootfs: PathBuf,
    pub output: PathBuf,
    pub size: u64,
    pub label: String,
    pub state_dirs: Vec<String>,
    pub root_device: Option<String>,
    /// Host paths that override the kernel/initramfs found in the rootfs.
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// An initramfs inside the rootfs (morph's `INITRAMFS_PATH`), used when
    /// no host `initramfs` is given.
    pub initramfs_in_rootfs: Option<String>,
    pub kernel_args: String,
    pub migration: Migration,
    pub manifest: PathBuf,
    pub force: bool,
    pub fs_uuid: Option<String>,
}

/// Everything decided before the first byte is written.
#[derive(Debug)]
pub struct Prepared {
    pub(crate) rootfs: Rootfs,
    pub(crate) version: Version,
    pub(crate) plan: Plan,
    pub(crate) fs_uuid: String,
}

impl Prepared {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

fn input(msg: impl Into<String>) -> BuildError {
    BuildError::Input(msg.into())
}

/// What is refused before the rootfs is even looked at.
fn check_can_build() -> Result<(), BuildError> {
    if !rustix::process::geteuid().is_root() {
        return Err(input(format!(
            "strata build must run as root (it creates loop devices and mounts); running as uid {}",
            rustix::process::geteuid().as_raw()
        )));
    }
    Ok(())
}

/// Validates the inputs and computes the plan. Creates nothing. `opts.rootfs`
/// is a directory here (an archive is extracted first: `build`).
pub fn prepare(opts: &BuildOptions) -> Result<Prepared, BuildError> {
    check_can_build()?;
    let rootfs = &opts.rootfs;
    let source = deploy::open_rootfs(rootfs)?;
    check_rootfs_and_output(rootfs, &opts.output)?;
    check_output(&opts.output, opts.force, "output image")?;
    check_output(&opts.manifest, opts.force, "manifest")?;
    let (kernel, initramfs) = deploy::boot_sources(
        &source,
        rootfs,
        opts.kernel.as_deref(),
        opts.initramfs.as_deref(),
        opts.initramfs_in_rootfs.as_deref(),
    )?;

    let fstab_bytes = source.read("etc/fstab").map_err(|e| input(e.to_string()))?;
    let fs_uuid = fs_uuid(opts)?;
    let plan = plan::plan(
        fstab_bytes.as_deref(),
        &PlanOptions {
            label: opts.label.clone(),
            state_dirs: opts.state_dirs.clone(),
            root_device: opts.root_device.clone(),
            fs_uuid: fs_uuid.clone(),
            has_initramfs: initramfs.is_some(),
        },
    )
    .map_err(|e| input(e.to_string()))?;

    deploy::check_state_dirs(&source, rootfs, &plan)?;
    deploy::refuse_hidden_data(&source, rootfs, &plan, fstab_bytes.as_deref())?;

    check_min_size(opts.size)?;
    let tree = copy::measure(rootfs)
        .map_err(|e| input(format!("reading rootfs {}: {e}", rootfs.display())))?;
    if tree.allocated >= opts.size {
        return Err(input(format!(
            "image size {} is too small for rootfs {} ({} allocated): give a larger --size",
            human(opts.size),
            rootfs.display(),
            human(tree.allocated)
        )));
    }
    let version = Version::new(&plan.label).map_err(|e| input(e.to_string()))?;
    Ok(Prepared {
        rootfs: Rootfs {
            path: rootfs.clone(),
            dir: source,
            kernel,
            initramfs,
            size: tree,
            scratch: false,
        },
        version,
        plan,
        fs_uuid,
    })
}

/// What `prepare` refuses without looking at the rootfs, each check the
/// one `prepare` runs: a build from an archive runs these before the
/// (long) extraction.
fn check_without_rootfs(opts: &BuildOptions) -> Result<(), BuildError> {
    check_can_build()?;
    check_options(opts)
}

/// `check_without_rootfs` without the root check: what the rootless build
/// (which needs no root) refuses before its long copy or extraction.
pub(crate) fn check_options(opts: &BuildOptions) -> Result<(), BuildError> {
    check_output(&opts.output, opts.force, "output image")?;
    check_output(&opts.manifest, opts.force, "manifest")?;
    for (what, host) in [("kernel", &opts.kernel), ("initramfs", &opts.initramfs)] {
        if let Some(path) = host {
            deploy::host_file(path, what)?;
        }
    }
    fs_uuid(opts)?;
    plan::check_options(&opts.label, &opts.state_dirs, opts.root_device.as_deref())
        .map_err(|e| input(e.to_string()))?;
    check_min_size(opts.size)
}

/// The filesystem's UUID: `--fs-uuid` (valid, not a mounted btrfs's) or
/// a new random one.
fn fs_uuid(opts: &BuildOptions) -> Result<String, BuildError> {
    match &opts.fs_uuid {
        Some(u) => {
            let u = uuid::Uuid::parse_str(u)
                .map_err(|e| input(format!("invalid --fs-uuid {u:?}: {e}")))?
                .hyphenated()
                .to_string();
            check_fs_uuid_unused(&u)?;
            Ok(u)
        }
        None => Ok(uuid::Uuid::new_v4().hyphenated().to_string()),
    }
}

fn check_min_size(size: u64) -> Result<(), BuildError> {
    if size < MIN_IMAGE_SIZE {
        return Err(input(format!(
            "image size {} is too small: a btrfs image needs at least {}",
            human(size),
            human(MIN_IMAGE_SIZE)
        )));
    }
    Ok(())
}

pub(crate) fn check_output(path: &Path, force: bool, what: &str) -> Result<(), BuildError> {
    match path.symlink_metadata() {
        Ok(m) if !m.is_file() => {
            // --force replaces an earlier image, never a device, a
            // directory or whatever a link points at.
            let kind = if m.is_dir() {
                "a directory"
            } else if m.file_type().is_symlink() {
                "a symlink"
            } else {
                "not a regular file"
            };
            return Err(input(format!(
                "{what} {} is {kind}: refusing to replace it, even with --force",
                path.display()
            )));
        }
        Ok(_) if !force => {
            return Err(input(format!(
                "{what} {} already exists (use --force to replace it)",
                path.display()
            )))
        }
        _ => {}
    }
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return Err(input(format!(
            "{what} {}: directory {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// The rootfs is read whole: it cannot be the host's root, and the image
/// cannot be written inside it (the copy would take in the image itself).
pub(crate) fn check_rootfs_and_output(rootfs: &Path, output: &Path) -> Result<(), BuildError> {
    let root =
        fs::canonicalize(rootfs).map_err(|e| input(format!("rootfs {}: {e}", rootfs.display())))?;
    if root == Path::new("/") {
        return Err(input(format!(
            "rootfs {} is the host's root directory: give the directory of the system to deploy",
            rootfs.display()
        )));
    }
    if let Ok(out_dir) = fs::canonicalize(parent_dir(output)) {
        if out_dir.starts_with(&root) {
            return Err(input(format!(
                "output image {} is inside rootfs {}: the rootfs would contain its own image; write it elsewhere",
                output.display(),
                rootfs.display()
            )));
        }
    }
    Ok(())
}

/// The existing image `--force` replaces, locked exclusively for the whole
/// build: an upgrade, `set-default` or `inspect` of it refuses the build
/// (and the build them) instead of both writing it. Nothing to lock
/// without `--force` or without an image there: the new file is locked
/// from its creation (`create_file`).
pub(crate) fn lock_output(opts: &BuildOptions) -> Result<Option<ImageLock>, BuildError> {
    let replaces = opts.force && opts.output.symlink_metadata().is_ok_and(|m| m.is_file());
    if !replaces {
        return Ok(None);
    }
    crate::lock::ImageLock::exclusive(&opts.output)
        .map(Some)
        .map_err(|e| StepError::from(e).in_step(Step::CreateImage))
}

/// After the debris of killed runs is cleaned: an image to replace that a
/// loop device outside strata is bound to (a mount, a VM) is in use.
pub(crate) fn refuse_attached_output(opts: &BuildOptions) -> Result<(), BuildError> {
    if opts.force {
        crate::lock::refuse_attached(&opts.output).map_err(|e| input(e.to_string()))?;
    }
    Ok(())
}

/// btrfs knows a filesystem by its UUID: a second one with the UUID of a
/// mounted btrfs cannot be mounted (the build would fail at its mount, or
/// worse, be taken for the other). Every mounted btrfs has
/// /sys/fs/btrfs/<uuid>.
fn check_fs_uuid_unused(uuid: &str) -> Result<(), BuildError> {
    if Path::new("/sys/fs/btrfs").join(uuid).exists() {
        return Err(input(format!(
            "--fs-uuid {uuid}: a mounted btrfs filesystem on this host already has it; pick another (or leave it out for a random one)"
        )));
    }
    Ok(())
}

pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Runs the steps, reporting progress through `on_event`.
pub struct Builder<'a> {
    opts: &'a BuildOptions,
    steps: Steps<'a>,
    /// A build from an archive cleans before extracting: `run` need not.
    debris_cleaned: bool,
}

impl<'a> Builder<'a> {
    pub fn new(
        opts: &'a BuildOptions,
        interrupt: &'a Interrupt,
        on_event: &'a mut dyn FnMut(Event),
    ) -> Self {
        Builder {
            opts,
            steps: Steps::new(interrupt, on_event),
            debris_cleaned: false,
        }
    }

    /// A build killed with SIGKILL could not clean up: its mount, loop
    /// device, partial image and extracted archive are no longer claimed
    /// (`host::claim`); clean them now.
    fn clean_debris(&mut self) {
        if std::mem::replace(&mut self.debris_cleaned, true) {
            return;
        }
        for c in debris::clean(&debris::find(Some(parent_dir(&self.opts.output)))) {
            self.steps.emit(Event::Note(c.to_string()));
        }
    }

    pub fn run(mut self, prep: Prepared) -> Result<Manifest, BuildError> {
        self.clean_debris();
        refuse_attached_output(self.opts)?;
        let (opts, steps) = (self.opts, &mut self.steps);
        for r in &prep.plan.fstab_rejected {
            steps.emit(Event::Note(r.to_string()));
        }
        let image = NewImage::create(opts, &prep.fs_uuid, steps)?;
        let mut top = Mounted::new(image.top());
        let deployed = deploy_and_boot(&mut top, &prep, opts, steps)?;

        let mut manifest = manifest(opts, &prep, deployed, Backend::Privileged);
        let file = steps.run(Step::Finish, |_| image.close())?;
        manifest.versions[0].timings = self.steps.into_timings();
        // After the timings are complete; a failure here is still the
        // finishing step's.
        persist(file, &manifest, opts).map_err(|e| e.in_step(Step::Finish))?;
        Ok(manifest)
    }
}

/// Deploys the one version and makes it boot: the same steps whatever `top`
/// is (a mounted image, or a rootless build's staging directory).
pub(crate) fn deploy_and_boot(
    top: &mut dyn TopLevel,
    prep: &Prepared,
    opts: &BuildOptions,
    steps: &mut Steps,
) -> Result<Deployed, BuildError> {
    let deployed = deploy::deploy(
        top,
        &prep.version,
        &prep.rootfs,
        &prep.plan,
        &DeployOptions {
            migration: opts.migration,
            kernel_args: opts.kernel_args.clone(),
            image_size: opts.size,
        },
        steps,
    )?;
    let version = &deployed.version;
    // The menu first, the default last: the order an upgrade needs too.
    steps.run(Step::WriteBootConfig, |_| {
        boot::write_menu(top.path(), version, std::slice::from_ref(&deployed.boot))
    })?;
    steps.run(Step::SetDefault, |_| boot::set_default(top.path(), version))?;
    steps.run(Step::InstallBootloader, |_| {
        top.install_bootloader()
            .context(|| "installing extlinux".into())
    })?;
    Ok(deployed)
}

/// The image being made: a temp file next to the output, with a new btrfs,
/// attached and mounted at its top level. Field order is drop order: on an
/// error the mount goes first, then the loop device, then the file.
struct NewImage {
    mount: Mount,
    loopdev: LoopDevice,
    file: tempfile::NamedTempFile,
}

impl NewImage {
    fn create(opts: &BuildOptions, fs_uuid: &str, steps: &mut Steps) -> Result<Self, BuildError> {
        let file = steps.run(Step::CreateImage, |_| create_file(opts))?;
        steps.run(Step::Mkfs, |_| {
            btrfs::mkfs(file.path(), layout::FS_LABEL, fs_uuid)
                .context(|| "making the btrfs filesystem".into())
        })?;
        steps.run(Step::Mount, |_| {
            let loopdev = LoopDevice::attach(file.path(), false)
                .context(|| format!("attaching {}", file.path().display()))?;
            // nodev/nosuid/noexec: the rootfs's device nodes and setuid
            // binaries are data here, never usable on the host.
            let mount = Mount::btrfs_on_own_loop(loopdev.path(), "noatime,nodev,nosuid,noexec")
                .context(|| format!("mounting {}", loopdev.path().display()))?;
            Ok(NewImage {
                mount,
                loopdev,
                file,
            })
        })
    }

    /// Where the top-level subvolume (id 5) is mounted.
    fn top(&self) -> &Path {
        self.mount.path()
    }

    /// Syncs, unmounts and detaches; the file is left to be renamed into place.
    fn close(self) -> Result<tempfile::NamedTempFile, StepError> {
        // Bindings drop in reverse order: on an early return the mount
        // (bound last) goes first, then the loop device, then the file.
        let NewImage {
            file,
            loopdev,
            mount,
        } = self;
        btrfs::sync(mount.path()).context(|| "syncing the filesystem".into())?;
        mount.unmount().context(|| "unmounting the image".into())?;
        loopdev
            .detach()
            .context(|| "detaching the loop device".into())?;
        Ok(file)
    }
}

/// A sparse file next to the output, renamed into place only on success and
/// deleted on any failure.
pub(crate) fn create_file(opts: &BuildOptions) -> Result<tempfile::NamedTempFile, StepError> {
    let dir = parent_dir(&opts.output);
    let name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(claim::CLAIMING)
        .tempfile_in(dir)
        .context(|| format!("creating an image in {}", dir.display()))?;
    // Locked by its own descriptor before it has the name the next run
    // looks for: the lock is its claim (`claim`) while it is partial, and
    // stays with the file once it is renamed over the output (`persist`).
    crate::lock::lock_new_file(tmp.as_file(), tmp.path())
        .context(|| format!("locking {}", tmp.path().display()))?;
    let tmp = claim::name_claimed_file(tmp, &format!(".{name}{}", debris::PARTIAL_MARKER))
        .context(|| format!("naming the new image in {}", dir.display()))?;
    tmp.as_file()
        .set_len(opts.size)
        .context(|| format!("sizing the image to {}", human(opts.size)))?;
    Ok(tmp)
}

pub(crate) fn manifest(
    opts: &BuildOptions,
    prep: &Prepared,
    deployed: Deployed,
    backend: Backend,
) -> Manifest {
    let version = deployed.version.label().to_owned();
    let mut manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        fs_uuid: prep.fs_uuid.clone(),
        image_size: opts.size,
        default: version,
        versions: vec![version_record(
            &prep.plan,
            opts.migration,
            deployed,
            Deployment::Build,
        )],
    };
    manifest.versions[0].backend = Some(backend);
    manifest
}

/// The manifest's record of one deployed version.
pub fn version_record(
    plan: &Plan,
    migration: Migration,
    deployed: Deployed,
    how: Deployment,
) -> VersionRecord {
    VersionRecord {
        label: deployed.version.label().to_owned(),
        deployed_by: how,
        based_on: None,
        deployed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        root_device: plan.root_device.clone(),
        state_dirs: StateDirs {
            created: plan.created_state_dirs().map(str::to_owned).collect(),
            skipped: plan
                .state_dirs
                .iter()
                .filter_map(|d| match &d.action {
                    StateDirAction::Skip { fstab_entry } => Some(SkippedStateDir {
                        dir: d.name.clone(),
                        fstab_entry: fstab_entry.clone(),
                    }),
                    StateDirAction::Create { .. } => None,
                })
                .collect(),
        },
        fstab_lines_added: plan.fstab_lines_added.clone(),
        state_migration: migration.name().to_owned(),
        state_data: None,
        kernel_args: deployed.boot.append(),
        moved_files: deployed.moved_files,
        kernel: deployed.kernel,
        initramfs: deployed.initramfs,
        kernel_source: deployed.kernel_source,
        initramfs_source: deployed.initramfs_source,
        timings: Vec::new(),
        // Upgrades run on a mounted image; a rootless build says so.
        backend: Some(Backend::Privileged),
    }
}

pub(crate) fn persist(
    image: tempfile::NamedTempFile,
    manifest: &Manifest,
    opts: &BuildOptions,
) -> Result<(), StepError> {
    // The image's bytes reach the disk before its name does: a crash after
    // the rename never leaves a named but half-written image.
    image
        .as_file()
        .sync_all()
        .context(|| "syncing the image file".into())?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Keep the 0644 a user expects (tempfile makes 0600).
        image
            .as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .context(|| "setting the image's mode".into())?;
    }
    // Without --force the existence check in `prepare` is not enough: two
    // builds to one output both pass it. The rename itself refuses to
    // replace (renameat2 RENAME_NOREPLACE), so the later one fails.
    let placed = if opts.force {
        image.persist(&opts.output)
    } else {
        image.persist_noclobber(&opts.output)
    };
    // The open file keeps the new image locked until its manifest is
    // written: an upgrade cannot start on an image without one.
    let _locked = match placed {
        Ok(f) => f,
        Err(e) => {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                return Err(StepError::input(format!(
                    "output image {} appeared while building (another build?); not replacing it without --force",
                    opts.output.display()
                )));
            }
            return Err(e.error)
                .context(|| format!("moving the image to {}", opts.output.display()));
        }
    };
    manifest
        .save(&opts.manifest)
        .context(|| format!("writing manifest {}", opts.manifest.display()))
}

/// prepare + run; a rootfs archive is extracted first (`build_from_tar`).
pub fn build(
    opts: &BuildOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<Manifest, BuildError> {
    let _lock = lock_output(opts)?;
    match rootfs_tar::classify(&opts.rootfs).map_err(|e| input(e.to_string()))? {
        RootfsInput::Dir => {
            let prep = prepare(opts)?;
            Builder::new(opts, interrupt, on_event).run(prep)
        }
        RootfsInput::Tar(_) => build_from_tar(opts, interrupt, on_event),
    }
}

/// `extract-rootfs` (next to the output: same filesystem, removed on every
/// way out) and then the build of the extracted tree. Whatever can be
/// refused without the rootfs is refused before extracting it.
fn build_from_tar(
    opts: &BuildOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<Manifest, BuildError> {
    check_without_rootfs(opts)?;
    let parent = rootfs_tar::extraction_parent(&opts.output);
    rootfs_tar::check_extraction_dir(&parent).map_err(|e| input(e.to_string()))?;
    let mut builder = Builder::new(opts, interrupt, on_event);
    // A killed run's extraction may be what fills the disk: gone first.
    builder.clean_debris();
    let extraction = builder.steps.run(Step::ExtractRootfs, |s| {
        Extraction::new(
            &parent,
            &opts.output,
            &opts.rootfs,
            DeviceNodes::Create,
            // An archive bigger than the image is refused on its listing,
            // before it fills the output's filesystem.
            &rootfs_tar::Limits {
                max_bytes: Some(opts.size),
                ..Default::default()
            },
            s.interrupt(),
        )
        .map_err(StepError::from)
    })?;
    let tree = BuildOptions {
        rootfs: extraction.rootfs().to_owned(),
        ..opts.clone()
    };
    let built = prepare(&tree).and_then(|prep| builder.run(prep));
    // Removed before the result is returned (it can be large), and said.
    on_event(Event::Note(extraction.remove()));
    built.map_err(|e| name_archive(e, &tree.rootfs, &opts.rootfs))
}

/// Messages about the extracted tree name the archive the user gave (the
/// tree is gone when they read it): `rootfs /o/.img.strata-extract.1.x/rootfs
/// has no etc/` → `rootfs r.tar has no etc/`.
pub fn name_archive(e: BuildError, tree: &Path, archive: &Path) -> BuildError {
    let (from, to) = (tree.display().to_string(), archive.display().to_string());
    match e {
        BuildError::Input(m) => BuildError::Input(m.replace(&from, &to)),
        BuildError::Step { step, what, cause } => BuildError::Step {
            step,
            what: what.replace(&from, &to),
            cause,
        },
        e => e,
    }
}
