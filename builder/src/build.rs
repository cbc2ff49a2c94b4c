//! `strata build`: rootfs → image, as a sequence of named steps over typed
//! state. Everything that can be checked without side effects is checked in
//! `prepare` first; `run` then creates the image, and every resource it makes
//! (temp image, loop device, mount) is a guard that undoes itself on any
//! error or interruption.

use crate::btrfs;
use crate::copy::{self, CopyError, TreeSize};
use crate::error::{BuildError, Context};
use crate::etcfile;
use crate::extlinux::{self, BootEntry};
use crate::fstab;
use crate::interrupt::Interrupt;
use crate::kernel::{self, BootFiles};
use crate::loopdev::LoopDevice;
use crate::manifest::{Manifest, SkippedStateDir, StateDirs, StepTiming, MANIFEST_VERSION};
use crate::migrate::{self, Migration};
use crate::mount::Mount;
use crate::plan::{self, FstabChange, Plan, PlanOptions, StateDirAction};
use crate::progress::{Event, Step};
use crate::rootfs::RootDir;
use crate::size::human;
use rustix::fs::FileType;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// mkfs.btrfs refuses much less than this with default (DUP metadata) profiles.
pub const MIN_IMAGE_SIZE: u64 = 128 << 20;

#[derive(Debug, Clone)]
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
    pub kernel_args: String,
    pub migration: Migration,
    pub manifest: PathBuf,
    pub force: bool,
    pub fs_uuid: Option<String>,
}

/// Where a boot file comes from: inside the rootfs, or given on the host.
#[derive(Debug, Clone)]
enum BootSource {
    Rootfs(String),
    Host(PathBuf),
}

impl BootSource {
    fn describe(&self) -> String {
        match self {
            BootSource::Rootfs(p) => format!("/{p}"),
            BootSource::Host(p) => p.display().to_string(),
        }
    }
}

/// Everything decided before the first byte is written.
#[derive(Debug)]
pub struct Prepared {
    source: RootDir,
    kernel: BootSource,
    initramfs: Option<BootSource>,
    plan: Plan,
    fs_uuid: String,
    tree: TreeSize,
}

impl Prepared {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

fn input(msg: impl Into<String>) -> BuildError {
    BuildError::Input(msg.into())
}

/// Validates the inputs and computes the plan. Creates nothing.
pub fn prepare(opts: &BuildOptions) -> Result<Prepared, BuildError> {
    if !rustix::process::geteuid().is_root() {
        return Err(input(format!(
            "strata build must run as root (it creates loop devices and mounts); running as uid {}",
            rustix::process::geteuid().as_raw()
        )));
    }
    let rootfs = &opts.rootfs;
    let meta =
        fs::metadata(rootfs).map_err(|e| input(format!("rootfs {}: {e}", rootfs.display())))?;
    if !meta.is_dir() {
        return Err(input(format!(
            "rootfs {} is not a directory",
            rootfs.display()
        )));
    }
    let source =
        RootDir::open(rootfs).map_err(|e| input(format!("rootfs {}: {e}", rootfs.display())))?;
    match source.open_dir("etc") {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(input(format!(
                "rootfs {} has no etc/ directory: is it a root filesystem?",
                rootfs.display()
            )))
        }
        Err(e) => return Err(input(e.to_string())),
    }
    check_output(&opts.output, opts.force, "output image")?;
    check_output(&opts.manifest, opts.force, "manifest")?;

    let found = kernel::find(&source).map_err(|e| input(e.to_string()))?;
    let (kernel, found_initramfs) = match (&opts.kernel, found) {
        (Some(k), found) => (
            BootSource::Host(host_file(k, "kernel")?),
            found.and_then(|f| f.initramfs),
        ),
        (None, Some(BootFiles { kernel, initramfs })) => (BootSource::Rootfs(kernel), initramfs),
        (None, None) => {
            return Err(input(format!(
                "no kernel found in rootfs {} (looked for boot/vmlinuz-<version>, boot/vmlinuz, vmlinuz): give --kernel",
                rootfs.display()
            )))
        }
    };
    let initramfs = match &opts.initramfs {
        Some(i) => Some(BootSource::Host(host_file(i, "initramfs")?)),
        // An explicit kernel gets only an explicit initramfs: one found in
        // the rootfs belongs to the rootfs's own kernel.
        None if opts.kernel.is_some() => None,
        None => found_initramfs.map(BootSource::Rootfs),
    };

    let fstab_bytes = source.read("etc/fstab").map_err(|e| input(e.to_string()))?;
    let fs_uuid = match &opts.fs_uuid {
        Some(u) => uuid::Uuid::parse_str(u)
            .map_err(|e| input(format!("invalid --fs-uuid {u:?}: {e}")))?
            .hyphenated()
            .to_string(),
        None => uuid::Uuid::new_v4().hyphenated().to_string(),
    };
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

    for dir in plan.created_state_dirs() {
        match source.top_level_type(dir).map_err(|e| input(e.to_string()))? {
            None | Some(FileType::Directory) => {}
            Some(FileType::Symlink) => {
                return Err(input(format!(
                    "rootfs {}: /{dir} is a symlink; a state directory must be a real directory (or absent) to be mounted over",
                    rootfs.display()
                )))
            }
            Some(_) => {
                return Err(input(format!(
                    "rootfs {}: /{dir} is not a directory",
                    rootfs.display()
                )))
            }
        }
    }

    if opts.size < MIN_IMAGE_SIZE {
        return Err(input(format!(
            "image size {} is too small: a btrfs image needs at least {}",
            human(opts.size),
            human(MIN_IMAGE_SIZE)
        )));
    }
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
    Ok(Prepared {
        source,
        kernel,
        initramfs,
        plan,
        fs_uuid,
        tree,
    })
}

fn check_output(path: &Path, force: bool, what: &str) -> Result<(), BuildError> {
    if path.symlink_metadata().is_ok() && !force {
        return Err(input(format!(
            "{what} {} already exists (use --force to replace it)",
            path.display()
        )));
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

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn host_file(path: &Path, what: &str) -> Result<PathBuf, BuildError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(path.to_owned()),
        Ok(_) => Err(input(format!(
            "{what} {} is not a regular file",
            path.display()
        ))),
        Err(e) => Err(input(format!("{what} {}: {e}", path.display()))),
    }
}

/// Runs the steps, reporting progress through `on_event`.
pub struct Builder<'a> {
    opts: &'a BuildOptions,
    interrupt: &'a Interrupt,
    on_event: &'a mut dyn FnMut(Event),
    timings: Vec<StepTiming>,
}

impl<'a> Builder<'a> {
    pub fn new(
        opts: &'a BuildOptions,
        interrupt: &'a Interrupt,
        on_event: &'a mut dyn FnMut(Event),
    ) -> Self {
        Builder {
            opts,
            interrupt,
            on_event,
            timings: Vec::new(),
        }
    }

    fn step<T>(
        &mut self,
        step: Step,
        f: impl FnOnce(&mut Self) -> Result<T, BuildError>,
    ) -> Result<T, BuildError> {
        if self.interrupt.raised() {
            return Err(BuildError::Interrupted);
        }
        (self.on_event)(Event::StepStarted(step));
        let start = Instant::now();
        let out = f(self)?;
        let took = start.elapsed();
        self.timings.push(StepTiming {
            step: step.name().to_owned(),
            seconds: (took.as_secs_f64() * 1000.0).round() / 1000.0,
        });
        (self.on_event)(Event::StepFinished(step, took));
        if self.interrupt.raised() {
            return Err(BuildError::Interrupted);
        }
        Ok(out)
    }

    pub fn run(mut self, prep: Prepared) -> Result<Manifest, BuildError> {
        let opts = self.opts;
        let label = prep.plan.label.clone();
        // Declaration order is drop order reversed: the mount goes first,
        // then the loop device, then (on failure) the partial image.
        let image = self.step(Step::CreateImage, |_| create_image(opts))?;
        self.step(Step::Mkfs, |_| {
            btrfs::mkfs(image.path(), crate::layout::FS_LABEL, &prep.fs_uuid)
                .context(Step::Mkfs, || "making the btrfs filesystem".into())
        })?;
        let (loopdev, mount) = self.step(Step::Mount, |_| {
            let l = LoopDevice::attach(image.path(), false).context(Step::Mount, || {
                format!("attaching {}", image.path().display())
            })?;
            let m = Mount::btrfs(l.path(), "noatime")
                .context(Step::Mount, || format!("mounting {}", l.path().display()))?;
            Ok((l, m))
        })?;
        let top = mount.path().to_owned();
        let system = top.join("systems").join(&label);
        let orig = system.join("orig");

        self.step(Step::CreateOrig, |_| {
            fs::create_dir_all(&system)
                .context(Step::CreateOrig, || format!("creating systems/{label}"))?;
            btrfs::subvolume_create(&orig).context(Step::CreateOrig, || {
                format!("creating subvolume systems/{label}/orig")
            })
        })?;

        let total = prep.tree.entries;
        self.step(Step::CopyRootfs, |b| {
            let (interrupt, on_event) = (b.interrupt, &mut b.on_event);
            copy::copy_tree(&opts.rootfs, &orig, false, interrupt, |done| {
                on_event(Event::CopyProgress { done, total })
            })
            .map_err(|e| match e {
                CopyError::NoSpace => input(format!(
                    "image size {} is too small for rootfs {} ({} allocated, plus btrfs metadata): no space left while copying; give a larger --size",
                    human(opts.size),
                    opts.rootfs.display(),
                    human(prep.tree.allocated)
                )),
                CopyError::Interrupted => BuildError::Interrupted,
                e => BuildError::Step {
                    step: Step::CopyRootfs,
                    context: format!("copying rootfs {} into orig", opts.rootfs.display()),
                    source: e.into(),
                },
            })
        })?;

        let orig_root =
            RootDir::open(&orig).context(Step::CompleteFstab, || "opening orig".into())?;
        self.step(Step::CompleteFstab, |_| match &prep.plan.fstab {
            FstabChange::Unchanged => Ok(()),
            FstabChange::Write { contents, .. } => etcfile::replace(&orig_root, "fstab", contents)
                .context(Step::CompleteFstab, || "writing orig/etc/fstab".into()),
        })?;

        let mut moved = Vec::new();
        self.step(Step::MigrateState, |b| {
            let state = top.join("state");
            fs::create_dir_all(&state).context(Step::MigrateState, || "creating state/".into())?;
            for dir in prep.plan.created_state_dirs() {
                if b.interrupt.raised() {
                    return Err(BuildError::Interrupted);
                }
                let target = state.join(dir);
                btrfs::subvolume_create(&target).context(Step::MigrateState, || {
                    format!("creating subvolume state/{dir}")
                })?;
                let from = orig.join(dir);
                if orig_root
                    .top_level_type(dir)
                    .context(Step::MigrateState, || format!("checking /{dir}"))?
                    .is_none()
                {
                    // No data to move, but the mountpoint must exist.
                    fs::create_dir(&from)
                        .context(Step::MigrateState, || format!("creating mountpoint /{dir}"))?;
                    continue;
                }
                let files = migrate::migrate(&from, &target, dir, opts.migration, b.interrupt)
                    .context(Step::MigrateState, || {
                        format!("moving /{dir} into state/{dir}")
                    })?;
                moved.extend(files);
            }
            Ok(())
        })?;

        self.step(Step::HashMoved, |_| {
            migrate::hash_moved(&mut moved, &top.join("state"))
                .context(Step::HashMoved, || "hashing moved files".into())
        })?;

        self.step(Step::CheckMountpoints, |_| {
            check_mountpoints(&orig_root, &prep.plan, opts.migration)
        })?;

        self.step(Step::Snapshot, |_| {
            btrfs::snapshot(&orig, &system.join("run")).context(Step::Snapshot, || {
                format!("snapshotting systems/{label}/orig as run")
            })?;
            let default = top.join("systems/default");
            std::os::unix::fs::symlink(&label, &default)
                .context(Step::Snapshot, || "linking systems/default".into())
        })?;

        self.step(Step::InstallKernel, |_| {
            install_boot_file(&prep.source, &prep.kernel, &system.join("kernel"))?;
            if let Some(i) = &prep.initramfs {
                install_boot_file(&prep.source, i, &system.join("initramfs"))?;
            }
            Ok(())
        })?;

        let entry = BootEntry {
            label: label.clone(),
            root_device: prep.plan.root_device.clone(),
            has_initramfs: prep.initramfs.is_some(),
            kernel_args: opts.kernel_args.clone(),
        };
        self.step(Step::WriteBootConfig, |_| {
            let dir = top.join("extlinux");
            fs::create_dir_all(&dir)
                .context(Step::WriteBootConfig, || "creating extlinux/".into())?;
            fs::write(
                dir.join("extlinux.conf"),
                extlinux::render(&label, std::slice::from_ref(&entry)),
            )
            .context(Step::WriteBootConfig, || {
                "writing extlinux/extlinux.conf".into()
            })?;
            // syslinux 6.04 does not search extlinux/ on its own (measured:
            // "No configuration file found"); it follows this link.
            std::os::unix::fs::symlink("extlinux/extlinux.conf", top.join("extlinux.conf"))
                .context(Step::WriteBootConfig, || "linking extlinux.conf".into())
        })?;

        self.step(Step::InstallBootloader, |_| {
            // Whole-disk btrfs: extlinux's boot sector is sector 0. Writing
            // syslinux's mbr.bin there would make the image unbootable.
            crate::cmd::run(
                std::process::Command::new("extlinux")
                    .arg("--install")
                    .arg(&top),
            )
            .context(Step::InstallBootloader, || "installing extlinux".into())
        })?;

        let manifest = Manifest {
            manifest_version: MANIFEST_VERSION,
            label: label.clone(),
            fs_uuid: prep.fs_uuid.clone(),
            root_device: prep.plan.root_device.clone(),
            state_dirs: StateDirs {
                created: prep.plan.created_state_dirs().map(str::to_owned).collect(),
                skipped: prep
                    .plan
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
            fstab_lines_added: prep.plan.fstab_lines_added.clone(),
            state_migration: opts.migration.name().to_owned(),
            moved_files: moved,
            kernel: format!("systems/{label}/kernel"),
            initramfs: prep
                .initramfs
                .as_ref()
                .map(|_| format!("systems/{label}/initramfs")),
            kernel_source: prep.kernel.describe(),
            initramfs_source: prep.initramfs.as_ref().map(BootSource::describe),
            kernel_args: entry.append(),
            image_size: opts.size,
            timings: Vec::new(),
        };

        self.step(Step::Finish, |_| {
            btrfs::sync(&top).context(Step::Finish, || "syncing the filesystem".into())?;
            drop(orig_root);
            mount
                .unmount()
                .context(Step::Finish, || "unmounting the image".into())?;
            loopdev
                .detach()
                .context(Step::Finish, || "detaching the loop device".into())
        })?;

        let mut manifest = manifest;
        manifest.timings = std::mem::take(&mut self.timings);
        persist(image, &manifest, opts)?;
        Ok(manifest)
    }
}

/// A sparse file next to the output, renamed into place only on success and
/// deleted on any failure.
fn create_image(opts: &BuildOptions) -> Result<tempfile::NamedTempFile, BuildError> {
    let dir = parent_dir(&opts.output);
    let name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.strata-partial-"))
        .tempfile_in(dir)
        .context(Step::CreateImage, || {
            format!("creating an image in {}", dir.display())
        })?;
    tmp.as_file()
        .set_len(opts.size)
        .context(Step::CreateImage, || {
            format!("sizing the image to {}", human(opts.size))
        })?;
    Ok(tmp)
}

fn persist(
    image: tempfile::NamedTempFile,
    manifest: &Manifest,
    opts: &BuildOptions,
) -> Result<(), BuildError> {
    let ctx = || format!("writing manifest {}", opts.manifest.display());
    let mut m = tempfile::Builder::new()
        .prefix(".strata-manifest-")
        .tempfile_in(parent_dir(&opts.manifest))
        .context(Step::Finish, ctx)?;
    let mut json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    json.push(b'\n');
    m.write_all(&json).context(Step::Finish, ctx)?;
    // Keep the 0644 a user expects of both files (tempfile makes 0600).
    for f in [m.as_file(), image.as_file()] {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .context(Step::Finish, ctx)?;
    }
    image
        .persist(&opts.output)
        .map_err(|e| e.error)
        .context(Step::Finish, || {
            format!("moving the image to {}", opts.output.display())
        })?;
    m.persist(&opts.manifest)
        .map_err(|e| e.error)
        .context(Step::Finish, ctx)?;
    Ok(())
}

fn install_boot_file(source: &RootDir, from: &BootSource, to: &Path) -> Result<(), BuildError> {
    let ctx = || format!("installing {} as {}", from.describe(), to.display());
    let mut reader = match from {
        BootSource::Rootfs(p) => source
            .open_file(p)
            .context(Step::InstallKernel, ctx)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
            .context(Step::InstallKernel, ctx)?,
        BootSource::Host(p) => fs::File::open(p).context(Step::InstallKernel, ctx)?,
    };
    let mut out = fs::File::create(to).context(Step::InstallKernel, ctx)?;
    std::io::copy(&mut reader, &mut out).context(Step::InstallKernel, ctx)?;
    Ok(())
}

/// No fstab mount point may hide data in the system: systemd would log
/// "Directory … to mount over is not empty" and the files would vanish from
/// view. Only `--state-migration copy` may leave state dirs filled.
fn check_mountpoints(orig: &RootDir, plan: &Plan, how: Migration) -> Result<(), BuildError> {
    let text = orig
        .read("etc/fstab")
        .context(Step::CheckMountpoints, || "reading orig/etc/fstab".into())?
        .unwrap_or_default();
    let entries = fstab::parse(&text);
    for entry in fstab::mounts_over_root(&entries) {
        let target = entry.target.trim_start_matches('/');
        let is_state = plan.created_state_dirs().any(|d| d == target);
        if is_state && how == Migration::Copy {
            continue;
        }
        let names = orig.list_dir(target).context(Step::CheckMountpoints, || {
            format!("listing {}", entry.target)
        })?;
        if !names.is_empty() {
            let shown: Vec<String> = names
                .iter()
                .take(5)
                .map(|n| format!("{}/{n}", entry.target))
                .collect();
            return Err(input(format!(
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

/// prepare + run.
pub fn build(
    opts: &BuildOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<Manifest, BuildError> {
    let prep = prepare(opts)?;
    Builder::new(opts, interrupt, on_event).run(prep)
}
