//! The new version assembled under its partial name (snapshot, sync,
//! fstab, state, run, kernel), then committed by one rename.

use super::check::Checked;
use super::state::{hash_state, merge_state};
use super::{input, UpgradeOptions};
use crate::deploy::{self, BootSource, Deployed, Rootfs};
use crate::error::{BuildError, Context, StepError};
use crate::host::btrfs;
use crate::host::interrupt::Interrupt;
use crate::layout::Version;
use crate::manifest::StateData;
use crate::migrate::Migration;
use crate::progress::Step;
use crate::steps::Steps;
use crate::sync::{self, SyncError, SyncOptions, SyncReport};
use crate::toplevel::Mounted;
use std::fs;
use std::io::Read;
use std::path::Path;

pub(super) struct Assembled {
    pub(super) deployed: Deployed,
    pub(super) sync: SyncReport,
    pub(super) state_data: StateData,
    pub(super) bytes_written: u64,
}

pub(super) fn assemble(
    top: &Path,
    c: &Checked,
    opts: &UpgradeOptions,
    steps: &mut Steps,
) -> Result<Assembled, BuildError> {
    let partial = c.version.partial();
    let orig = top.join(partial.orig());
    steps.run(Step::SnapshotOrig, |_| {
        fs::create_dir(top.join(partial.dir()))
            .context(|| format!("creating {}", partial.dir()))?;
        btrfs::snapshot(&top.join(c.old.orig()), &orig)
            .context(|| format!("snapshotting {} as {}", c.old.orig(), partial.orig()))
    })?;
    let sync = steps.run(Step::SyncRootfs, |s| {
        sync_rootfs(c, opts, &orig, &partial, s.interrupt())
    })?;
    // Open once the sync is complete: every later look inside orig resolves
    // inside it. Dropped when this returns, before the image is closed.
    let orig_root = steps.run(Step::CompleteFstab, |_| {
        deploy::complete_fstab(&orig, &partial, &c.plan)
    })?;
    let mut state = steps.run(Step::MergeState, |s| merge_state(top, &orig, c, opts, s))?;
    steps.run(Step::HashMoved, |s| {
        hash_state(top, &mut state, s.interrupt())
    })?;
    steps.run(Step::CheckMountpoints, |_| {
        deploy::check_mountpoints(&orig_root, &c.plan, opts.migration)
    })?;
    drop(orig_root);
    steps.run(Step::Snapshot, |_| {
        deploy::snapshot_run(&mut Mounted::new(top), &partial)
    })?;
    let boot_bytes = steps.run(Step::InstallKernel, |_| {
        install_boot_files(top, &partial, &c.old, &c.rootfs)
    })?;
    steps.run(Step::CommitVersion, |_| commit(top, &partial, &c.version))?;

    let rootfs = &c.rootfs;
    let mut moved_files = state.moved;
    moved_files.extend(state.merged_files);
    moved_files.sort_by(|a, b| a.path.cmp(&b.path));
    let bytes_written = sync.bytes_written + state.merged_bytes + boot_bytes;
    Ok(Assembled {
        deployed: Deployed {
            version: c.version.clone(),
            boot: c.new_entry(),
            moved_files,
            kernel: c.version.kernel(),
            initramfs: rootfs.initramfs.as_ref().map(|_| c.version.initramfs()),
            kernel_source: rootfs.kernel.describe(),
            initramfs_source: rootfs.initramfs.as_ref().map(BootSource::describe),
        },
        sync,
        state_data: StateData {
            policy: opts.state_data.name().to_owned(),
            merged: state.merged,
            left_out: state.left_out,
        },
        bytes_written,
    })
}

/// The snapshot made identical to the new rootfs. The live state dirs'
/// contents are excluded (their mountpoints stay as the snapshot has
/// them; `merge-state` deals with the data), except with
/// `Migration::Copy`, which reproduces the 2014 upgrades: the new rootfs's
/// data lands under the mountpoints.
fn sync_rootfs(
    c: &Checked,
    opts: &UpgradeOptions,
    orig: &Path,
    partial: &Version,
    interrupt: &Interrupt,
) -> Result<SyncReport, StepError> {
    let exclude_contents_of = match opts.migration {
        Migration::Move => c.live_state.clone(),
        Migration::Copy => Vec::new(),
    };
    sync::sync_tree(
        &c.rootfs.path,
        orig,
        &SyncOptions {
            exclude_contents_of,
        },
        interrupt,
    )
    .map_err(|e| match e {
        SyncError::Interrupted => StepError::Interrupted,
        SyncError::NoSpace => input(format!(
            "no space left on the image while writing rootfs {} into {}: give the image more space or remove an old version",
            c.rootfs.path.display(),
            partial.orig()
        )),
        e => StepError::Failed {
            what: format!(
                "synchronising {} with rootfs {}",
                partial.orig(),
                c.rootfs.path.display()
            ),
            cause: e.into(),
        },
    })
}

/// Kernel and initramfs into the partial directory. One the old default
/// already has, byte for byte, is cloned from it (FICLONE: it shares the
/// old file's extents, which the boot loader already reads), so an upgrade
/// that keeps its kernel does not add a copy of it. Returns the bytes
/// written.
fn install_boot_files(
    top: &Path,
    partial: &Version,
    old: &Version,
    rootfs: &Rootfs,
) -> Result<u64, StepError> {
    let mut written = 0;
    let files = [
        (Some(&rootfs.kernel), partial.kernel(), old.kernel()),
        (
            rootfs.initramfs.as_ref(),
            partial.initramfs(),
            old.initramfs(),
        ),
    ];
    for (source, to, old_file) in files {
        let Some(source) = source else { continue };
        let what = || format!("installing {} as {to}", source.describe());
        let open = || -> std::io::Result<Option<fs::File>> {
            match source {
                BootSource::Rootfs(p) => rootfs.dir.open_file(p).map_err(std::io::Error::other),
                BootSource::Host(p) => fs::File::open(p).map(Some),
            }
        };
        let old_path = top.join(&old_file);
        let same = match (open().context(what)?, fs::File::open(&old_path)) {
            (Some(a), Ok(b)) => same_bytes(a, b).context(what)?,
            _ => false,
        };
        if same {
            let from = fs::File::open(&old_path).context(what)?;
            let dest = fs::File::create(top.join(&to)).context(what)?;
            rustix::fs::ioctl_ficlone(&dest, &from).context(what)?;
        } else {
            deploy::install_boot_file(top, &rootfs.dir, source, &to)?;
            written += fs::metadata(top.join(&to)).map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(written)
}

fn same_bytes(a: fs::File, b: fs::File) -> std::io::Result<bool> {
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut a, mut b) = (std::io::BufReader::new(a), std::io::BufReader::new(b));
    let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            return Ok(b.read(&mut y[..1])? == 0);
        }
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// The commit point of the version itself: everything in it reaches the
/// disk, then one rename(2) gives it its name (never over an existing
/// entry), and the rename reaches the disk.
fn commit(top: &Path, partial: &Version, version: &Version) -> Result<(), StepError> {
    let what = || format!("renaming {} to {}", partial.dir(), version.dir());
    btrfs::sync(top).context(what)?;
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        top.join(partial.dir()),
        rustix::fs::CWD,
        top.join(version.dir()),
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .context(what)?;
    btrfs::sync(top).context(what)
}
