//! The rootless build's worker: runs inside a user namespace (uid 0 mapped
//! to the user, other ids to their subordinate range), so the rootfs keeps
//! its owners while it is staged. It deploys into the staging directory
//! with the same steps as a privileged build (`build::deploy_and_boot`),
//! makes the filesystem with `mkfs.btrfs --rootdir`, and empties the staging
//! directory again (its files belong to mapped ids the user cannot delete).

use super::extract;
use super::staging::{self, Staging};
use super::wire::{DeviceNode, Message, Request, RootfsKind, WireError, Work};
use crate::build;
use crate::deploy;
use crate::error::{BuildError, Context, StepError};
use crate::fstab;
use crate::host::interrupt::Interrupt;
use crate::layout::{self, Version};
use crate::manifest::{Backend, FileType, Manifest, MovedFile};
use crate::migrate::Migration;
use crate::pathenc::encode_path;
use crate::plan::Plan;
use crate::progress::{Event, Step};
use crate::rootfs_tar::{self, DeviceNodes};
use crate::steps::Steps;
use std::io::{BufRead, Write};
use std::path::Path;

/// Reads the request from `input`, writes JSON lines to `output`. Returns
/// the process exit code (0: a `Done` line was written).
pub fn serve(input: impl BufRead, mut output: impl Write) -> u8 {
    let interrupt = Interrupt::on_signals().unwrap_or_default();
    // Dies with the outer strata even if it is SIGKILLed: SIGTERM lets this
    // side still empty the staging directory. Set after the handlers are
    // in place, so that SIGTERM is never the default (die, staging left
    // full).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    let mut send = |m: &Message| {
        // The outer reads line by line: one JSON value per line, flushed.
        if let Ok(line) = serde_json::to_string(m) {
            let _ = writeln!(output, "{line}");
            let _ = output.flush();
        }
    };
    let request: Request = match serde_json::from_reader(input) {
        Ok(r) => r,
        Err(e) => {
            send(&Message::Failed(WireError::from(&BuildError::Input(
                format!("rootless worker: reading the request: {e}"),
            ))));
            return 1;
        }
    };
    let result = {
        let mut on_event = |e: Event| send(&Message::from(&e));
        let r = run(&request, &interrupt, &mut on_event);
        empty(&request.staging);
        r
    };
    match result {
        Ok((manifest, work)) => {
            send(&Message::Done {
                manifest: Box::new(manifest),
                work,
            });
            0
        }
        Err(e) => {
            send(&Message::Failed(WireError::from(&e)));
            1
        }
    }
}

/// A device node `rootfs_tar` left out (the archive listing has no mtime:
/// the appliance's mknod time stays).
fn from_archive(n: &rootfs_tar::DeviceNode, archive: &Path) -> Result<DeviceNode, StepError> {
    let path = extract::device_name(&n.path, archive)?;
    Ok(DeviceNode {
        path: path.strip_prefix("./").unwrap_or(&path).to_owned(),
        block: n.kind == rootfs_tar::DeviceKind::Block,
        mode: n.mode,
        major: n.major,
        minor: n.minor,
        uid: n.uid,
        gid: n.gid,
        mtime: None,
    })
}

/// Removes everything in `dir`, keeping `dir` (the outer process made it
/// and removes it).
fn empty(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

fn run(
    req: &Request,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<(Manifest, Work), BuildError> {
    let mut steps = Steps::new(interrupt, on_event);
    let scratch = req.staging.join("rootfs");
    let top = req.staging.join("top");
    let source = &req.build.rootfs;
    let devices = steps.run(Step::ExtractRootfs, |s| {
        for d in [&scratch, &top] {
            std::fs::create_dir(d).context(|| format!("creating {}", d.display()))?;
        }
        match req.rootfs_kind {
            RootfsKind::Tar => {
                // What a user namespace cannot make (ids past its map,
                // trusted.* xattrs) and what cannot fit the image are
                // refused on the listing, naming the member, before
                // anything is extracted.
                let limits = rootfs_tar::Limits::rootless(req.build.size);
                let skipped = rootfs_tar::extract(
                    source,
                    &scratch,
                    DeviceNodes::Skip,
                    &limits,
                    s.interrupt(),
                )?;
                skipped.iter().map(|n| from_archive(n, source)).collect()
            }
            RootfsKind::Dir => {
                let devices = extract::devices_in_dir(source)?;
                extract::extract(source, &scratch, &devices, s.interrupt()).map_err(
                    |e| match e {
                        crate::host::cmd::CmdError::Interrupted { .. } => StepError::Interrupted,
                        e => StepError::Failed {
                            what: format!("copying rootfs {} into staging", source.display()),
                            cause: e.into(),
                        },
                    },
                )?;
                Ok(devices)
            }
        }
    })?;

    if !devices.is_empty() {
        steps.emit(Event::Note(format!(
            "{} device nodes left to the appliance VM (mknod is refused in a user namespace)",
            devices.len()
        )));
    }
    let mut opts = req.build.clone();
    opts.rootfs = scratch;
    // Refusals name the rootfs the user gave, not the staged copy.
    let staged = opts.rootfs.display().to_string();
    let mut prep = build::prepare(&opts).map_err(|e| match e {
        BuildError::Input(m) => {
            BuildError::Input(m.replace(&staged, &source.display().to_string()))
        }
        e => e,
    })?;
    prep.rootfs.scratch = true;
    // `prepare` judged the staged copy, which lacks the device nodes.
    let fstab = prep
        .rootfs
        .dir
        .read("etc/fstab")
        .map_err(|e| BuildError::Input(e.to_string()))?;
    let fstab = deploy::completed_fstab(&prep.plan, fstab.as_deref());
    refuse_hidden_devices(&devices, &prep.plan, &fstab, source)?;
    for r in &prep.plan.fstab_rejected {
        steps.emit(Event::Note(r.to_string()));
    }
    let mut stage = Staging::new(top.clone());
    let mut deployed = build::deploy_and_boot(&mut stage, &prep, &opts, &mut steps)?;
    // The move could not see the device nodes (not staged): record the
    // ones under state dirs as a privileged move does.
    deployed
        .moved_files
        .extend(devices.iter().filter_map(|d| moved_record(d, &prep.plan)));
    stage.work_mut().devices = devices
        .into_iter()
        .flat_map(|d| in_image(d, &prep.plan, &prep.version, opts.migration))
        .collect();
    steps.run(Step::Mkfs, |s| {
        staging::mkfs(
            &req.image,
            &top,
            stage.subvolumes(),
            layout::FS_LABEL,
            &prep.fs_uuid,
            s.interrupt(),
        )
        .map_err(|e| match e {
            crate::host::cmd::CmdError::Interrupted { .. } => StepError::Interrupted,
            e => StepError::Failed {
                what: "making the btrfs filesystem from the staging directory".into(),
                cause: e.into(),
            },
        })
    })?;
    // The build's own record, then the timings of the steps run here (the
    // outer process adds its own).
    let mut manifest = build::manifest(&opts, &prep, deployed, Backend::Rootless);
    manifest.versions[0].timings = steps.into_timings();
    Ok((manifest, stage.into_work()))
}

/// `deploy::refuse_hidden_data` for the device nodes: one under a mount
/// point of the completed fstab (`fstab`) other than a state dir would be
/// made in `orig` under the mount, hidden at boot.
fn refuse_hidden_devices(
    devices: &[DeviceNode],
    plan: &Plan,
    fstab: &[u8],
    shown: &Path,
) -> Result<(), BuildError> {
    for entry in fstab::mounts_over_root(&fstab::parse(fstab)) {
        let target = entry.target.trim_matches('/');
        if plan.created_state_dirs().any(|d| d == target) {
            continue;
        }
        let under: Vec<String> = devices
            .iter()
            .filter(|d| {
                d.path
                    .strip_prefix(target)
                    .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
            })
            .map(|d| format!("/{}", d.path))
            .collect();
        if !under.is_empty() {
            return Err(BuildError::Input(format!(
                "{} is a mount point (etc/fstab line {}: {}) but rootfs {} has {} device nodes under it ({}{}): they would be hidden at boot; move them onto that filesystem or remove them",
                entry.target,
                entry.line,
                entry.raw.trim(),
                shown.display(),
                under.len(),
                under[..under.len().min(5)].join(", "),
                if under.len() > 5 { ", …" } else { "" }
            )));
        }
    }
    Ok(())
}

/// The manifest record of a device node under a state dir (path relative
/// to the rootfs), as `migrate` writes it for a moved one.
fn moved_record(d: &DeviceNode, plan: &Plan) -> Option<MovedFile> {
    let (first, rest) = d.path.split_once('/')?;
    if rest.is_empty() || !plan.created_state_dirs().any(|s| s == first) {
        return None;
    }
    Some(MovedFile {
        path: encode_path(format!("/{}", d.path).as_bytes()),
        file_type: if d.block {
            FileType::Block
        } else {
            FileType::Char
        },
        sha256: None,
        mode: d.mode,
        uid: d.uid,
        gid: d.gid,
        size: 0,
        target: None,
        xattrs: Default::default(),
        hardlink: None,
    })
}

/// Where a device node of the rootfs (path relative to it) ends up in the
/// image: under `orig`, or in its state subvolume when its state dir was
/// moved (both when copied).
pub fn in_image(d: DeviceNode, plan: &Plan, version: &Version, how: Migration) -> Vec<DeviceNode> {
    let (first, rest) = d.path.split_once('/').unwrap_or((&d.path, ""));
    let state = plan.created_state_dirs().any(|s| s == first) && !rest.is_empty();
    let mut paths = Vec::new();
    if !state || how == Migration::Copy {
        paths.push(format!("{}/{}", version.orig(), d.path));
    }
    if state {
        paths.push(format!("{}/{rest}", layout::state(first)));
    }
    paths
        .into_iter()
        .map(|path| DeviceNode { path, ..d.clone() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, PlanOptions};

    /// A /dev/null-like char device at `path`.
    fn node(path: &str) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            block: false,
            mode: 0o666,
            major: 1,
            minor: 3,
            uid: 0,
            gid: 0,
            mtime: None,
        }
    }

    #[test]
    fn device_nodes_follow_their_state_dir() {
        let p = plan(
            None,
            &PlanOptions {
                label: "factory".into(),
                state_dirs: vec!["var".into(), "home".into()],
                root_device: None,
                fs_uuid: "u".into(),
                has_initramfs: true,
            },
        )
        .unwrap();
        let v = Version::new("factory").unwrap();
        let at = |path: &str, how| -> Vec<String> {
            in_image(node(path), &p, &v, how)
                .into_iter()
                .map(|d| d.path)
                .collect()
        };
        assert_eq!(
            at("dev/null", Migration::Move),
            ["systems/factory/orig/dev/null"]
        );
        assert_eq!(at("var/lib/x", Migration::Move), ["state/var/lib/x"]);
        assert_eq!(
            at("var/lib/x", Migration::Copy),
            ["systems/factory/orig/var/lib/x", "state/var/lib/x"]
        );
        assert_eq!(at("srv/x", Migration::Move), ["systems/factory/orig/srv/x"]);
    }

    #[test]
    fn device_nodes_under_a_mount_point_are_refused() {
        let fstab = b"/dev/vda / btrfs defaults 0 1\n/dev/vdb /srv/data ext4 defaults 0 2\n";
        let p = plan(
            Some(fstab),
            &PlanOptions {
                label: "factory".into(),
                state_dirs: vec!["var".into()],
                root_device: None,
                fs_uuid: "u".into(),
                has_initramfs: true,
            },
        )
        .unwrap();
        let completed = deploy::completed_fstab(&p, Some(fstab));
        // The state dir's own mount does not count.
        assert!(String::from_utf8_lossy(&completed).contains(" /var "));
        let shown = Path::new("/r");
        let ok = [
            node("dev/null"),
            node("var/lib/x"),
            node("srv/datax"),
            node("srv/x"),
        ];
        refuse_hidden_devices(&ok, &p, &completed, shown).unwrap();
        let bad = [node("dev/null"), node("srv/data/sub/x")];
        match refuse_hidden_devices(&bad, &p, &completed, shown) {
            Err(BuildError::Input(m)) => assert!(
                m.starts_with("/srv/data is a mount point (etc/fstab line 2: ")
                    && m.contains("rootfs /r has 1 device nodes under it (/srv/data/sub/x)"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
