//! `strata inspect --lint`: the files hidden under the mountpoints of every
//! version's orig and run, read from a mounted top level (or a directory
//! shaped like one). Never writes.
//!
//! The image is untrusted: every path in it is looked up from the top-level
//! directory with openat2 and no symlink is ever followed (a `srv ->
//! /home/user` in a tree, or `systems` itself a symlink, must not make lint
//! list the host's directories through the mount).

use super::read::{state_names, tree_fstab, versions};
use super::subvolumes;
use crate::fstab;
use crate::layout::{self, Tree};
use crate::model::*;
use crate::rootfs::RootDir;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::Path;

/// A mount a tree's fstab makes at boot.
struct Planned {
    target: String,
    /// Subvolume path on this image, or None for another device.
    subvolume: Option<String>,
    mounted: String,
    basis: String,
}

fn is_under(path: &str, ancestor: &str) -> bool {
    ancestor == "/"
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The mounts over the tree's root: its fstab's boot mounts, or, when none
/// of them mounts a state subvolume, every state dir at its usual place.
fn planned_mounts(fstab: Option<&Fstab>, subvols: &[Subvolume], states: &[String]) -> Vec<Planned> {
    let mut out = Vec::new();
    for line in fstab.iter().flat_map(|f| &f.lines) {
        let Some(m) = &line.mount else { continue };
        if m.target == "/" || !fstab::is_boot_mount(&m.target, &m.fstype, &m.options) {
            continue;
        }
        let subvolume = subvolumes::mounted_by(m, subvols);
        let mounted = match &subvolume {
            Some(s) => s.clone(),
            None => format!("{} ({})", m.source, m.fstype),
        };
        out.push(Planned {
            target: m.target.clone(),
            subvolume,
            mounted,
            basis: format!("fstab line {}", line.number),
        });
    }
    let any_state = out.iter().any(|p| {
        p.subvolume
            .as_deref()
            .and_then(layout::state_dir_of)
            .is_some()
    });
    if !any_state {
        for name in states {
            out.push(Planned {
                target: layout::state_mountpoint(name),
                subvolume: Some(layout::state(name)),
                mounted: layout::state(name),
                basis: "state dir (no fstab entry mounts it)".to_owned(),
            });
        }
    }
    out
}

/// Checks every mountpoint of every version's orig and run.
pub fn mountpoints(top: &Path, image: &str, subvols: &[Subvolume]) -> Lint {
    let states = state_names(top);
    let root = RootDir::open(top).ok();
    let mut mountpoints = Vec::new();
    let mut trees = Vec::new();
    for version in versions(top) {
        let label = version.label();
        for tree in Tree::BOTH {
            let root_rel = version.tree(tree);
            let tree_dir = root
                .as_ref()
                .and_then(|r| r.open_dir_no_symlinks(&root_rel).ok());
            if tree_dir.is_none() {
                continue;
            }
            trees.push(format!("{label}/{}", tree.name()));
            let fstab = tree_fstab(top, &version, tree);
            let planned = planned_mounts(fstab.as_ref(), subvols, &states);
            for p in &planned {
                // The innermost other mount containing this mountpoint
                // decides where the directory really is.
                let outer = planned
                    .iter()
                    .filter(|o| o.target != p.target && is_under(&p.target, &o.target))
                    .max_by_key(|o| o.target.len());
                let dir_rel: Option<String> = match outer {
                    None => Some(format!("{root_rel}{}", p.target)),
                    Some(o) => o
                        .subvolume
                        .as_ref()
                        .map(|sv| format!("{sv}{}", &p.target[o.target.len()..])),
                };
                mountpoints.push(check_mountpoint(
                    root.as_ref(),
                    label,
                    tree.name(),
                    p,
                    dir_rel,
                    subvols,
                ));
            }
        }
    }
    // orig and run may both mount over one directory of a state subvolume:
    // count each directory once.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&MountpointCheck> = mountpoints
        .iter()
        .filter(|m| m.dir.as_ref().is_none_or(|d| seen.insert(d.clone())))
        .collect();
    let hidden_files = unique.iter().map(|m| m.file_count).sum();
    let hidden_bytes = unique.iter().map(|m| m.total_bytes).sum();
    Lint {
        image: image.to_owned(),
        clean: mountpoints
            .iter()
            .all(|m| m.status != MountpointStatus::NotEmpty),
        hidden_files,
        hidden_bytes,
        mountpoints,
        trees,
    }
}

fn check_mountpoint(
    root: Option<&RootDir>,
    label: &str,
    tree: &str,
    p: &Planned,
    dir_rel: Option<String>,
    subvols: &[Subvolume],
) -> MountpointCheck {
    let mut check = MountpointCheck {
        version: label.to_owned(),
        tree: tree.to_owned(),
        mountpoint: p.target.clone(),
        dir: dir_rel.clone(),
        mounted: p.mounted.clone(),
        basis: p.basis.clone(),
        status: MountpointStatus::NotOnImage,
        file_count: 0,
        total_bytes: 0,
        files: Vec::new(),
    };
    let (Some(dir_rel), Some(root)) = (dir_rel, root) else {
        return check;
    };
    // No symlink is followed on the way: one in a tree is relative to that
    // tree's root at boot, not to the image's, and one pointing out of the
    // image would make lint walk the host.
    check.status = match root.open_dir_no_symlinks(&dir_rel) {
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => MountpointStatus::NotADirectory,
        Err(_) => MountpointStatus::Missing,
        Ok(fd) => {
            let subvols: HashSet<&str> = subvols.iter().map(|s| s.path.as_str()).collect();
            let at = Walk {
                dev: rustix::fs::fstat(&fd).map(|st| st.st_dev).unwrap_or(0),
                rel: &dir_rel,
                shown: &p.target,
            };
            walk(&fd, at, &subvols, &mut check.files);
            check.files.sort_by(|a, b| a.path.cmp(&b.path));
            if check.files.is_empty() {
                MountpointStatus::Empty
            } else {
                MountpointStatus::NotEmpty
            }
        }
    };
    check.file_count = check.files.len() as u64;
    check.total_bytes = check.files.iter().map(|f| f.size).sum();
    check
}

/// Everything under `dir_rel` (a directory of the image, looked up from
/// `root` without following a symlink), shown under `shown`. `None` when
/// there is no directory there. An entry that is there but not a
/// directory is listed itself: a mount over it fails at boot.
pub fn entries_under(
    root: &RootDir,
    dir_rel: &str,
    shown: &str,
    subvols: &[Subvolume],
) -> Option<Vec<HiddenFile>> {
    match root.open_dir_no_symlinks(dir_rel) {
        Err(e @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) => Some(vec![HiddenFile {
            path: shown.to_owned(),
            kind: if e == rustix::io::Errno::LOOP {
                FileKind::Symlink
            } else {
                FileKind::File
            },
            size: 0,
        }]),
        Err(_) => None,
        Ok(fd) => {
            let subvols: HashSet<&str> = subvols.iter().map(|s| s.path.as_str()).collect();
            let at = Walk {
                dev: rustix::fs::fstat(&fd).map(|st| st.st_dev).unwrap_or(0),
                rel: dir_rel,
                shown,
            };
            let mut out = Vec::new();
            walk(&fd, at, &subvols, &mut out);
            out.sort_by(|a, b| a.path.cmp(&b.path));
            Some(out)
        }
    }
}

/// Where `walk` is: the directory's device, its path in the image, and
/// how it is shown.
#[derive(Clone, Copy)]
struct Walk<'a> {
    dev: u64,
    rel: &'a str,
    shown: &'a str,
}

/// Lists everything under the open directory `dir` as `shown/…`, each
/// entry looked at (never followed) from `dir` and a directory opened with
/// O_NOFOLLOW before it is walked. A directory is a subvolume when it is on
/// another device (a loop mount gives each subvolume its own) or listed as
/// one (the appliance's FUSE mount shows one device for all).
fn walk(dir: &OwnedFd, at: Walk, subvols: &HashSet<&str>, out: &mut Vec<HiddenFile>) {
    let Ok(entries) = rustix::fs::Dir::read_from(dir) else {
        return;
    };
    let mut names: Vec<std::ffi::CString> = entries
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    names.sort();
    for cname in names {
        let name = cname.to_string_lossy().into_owned();
        let path = format!("{}/{name}", at.shown.trim_end_matches('/'));
        let rel = format!("{}/{name}", at.rel.trim_end_matches('/'));
        let Ok(st) = rustix::fs::statat(dir, cname.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let t = FileType::from_raw_mode(st.st_mode);
        let len = st.st_size as u64;
        let (kind, size) = match t {
            FileType::Directory => (
                if st.st_dev != at.dev || subvols.contains(rel.as_str()) {
                    FileKind::Subvolume
                } else {
                    FileKind::Dir
                },
                0,
            ),
            FileType::Symlink => (FileKind::Symlink, len),
            FileType::Fifo => (FileKind::Fifo, 0),
            FileType::Socket => (FileKind::Socket, 0),
            FileType::CharacterDevice => (FileKind::CharDevice, 0),
            FileType::BlockDevice => (FileKind::BlockDevice, 0),
            _ => (FileKind::File, len),
        };
        out.push(HiddenFile {
            path: path.clone(),
            kind,
            size,
        });
        if t == FileType::Directory {
            let Ok(sub) = rustix::fs::openat(
                dir,
                cname.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            let dev = rustix::fs::fstat(&sub)
                .map(|s| s.st_dev)
                .unwrap_or(st.st_dev);
            let inner = Walk {
                dev,
                rel: &rel,
                shown: &path,
            };
            walk(&sub, inner, subvols, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(top: &Path) {
        for d in [
            "systems/factory/orig/etc",
            "systems/factory/orig/srv",
            "systems/factory/orig/var",
            "systems/factory/run/etc",
            "systems/factory/run/srv",
            "systems/factory/run/var",
            "state/srv",
            "state/var/lib",
        ] {
            std::fs::create_dir_all(top.join(d)).unwrap();
        }
        let fstab = "# Added by strata\n/dev/vda /srv btrfs subvol=/state/srv 0 2\n/dev/vda /var btrfs subvol=state/var 0 2\n/dev/vda /var/lib/x btrfs subvol=/state/x 0 2\n/dev/vdb /mnt/data ext4 defaults 0 2\n/dev/vdb /mnt/data/sub ext4 defaults 0 2\n/dev/vda /mnt/later btrfs noauto 0 0\n";
        for t in ["orig", "run"] {
            std::fs::write(top.join(format!("systems/factory/{t}/etc/fstab")), fstab).unwrap();
        }
    }

    #[test]
    fn lint_finds_files_under_mountpoints_only() {
        let d = tempfile::tempdir().unwrap();
        tree(d.path());
        let clean = mountpoints(d.path(), "img", &[]);
        assert!(clean.clean, "{clean:#?}");
        assert_eq!(clean.trees, ["factory/orig", "factory/run"]);

        std::fs::write(
            d.path().join("systems/factory/run/srv/stale.html"),
            "hidden\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("state/var/lib/x/deep")).unwrap();
        std::fs::write(d.path().join("state/var/lib/x/deep/f"), "12345").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("systems/factory/orig/var/link")).unwrap();
        let l = mountpoints(d.path(), "img", &[]);
        assert!(!l.clean);
        let bad: Vec<(String, String, Vec<String>)> = l
            .mountpoints
            .iter()
            .filter(|m| m.status == MountpointStatus::NotEmpty)
            .map(|m| {
                (
                    format!("{}/{}", m.version, m.tree),
                    m.mountpoint.clone(),
                    m.files.iter().map(|f| f.path.clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            bad,
            [
                (
                    "factory/orig".into(),
                    "/var".into(),
                    vec!["/var/link".to_owned()]
                ),
                (
                    "factory/orig".into(),
                    "/var/lib/x".into(),
                    vec!["/var/lib/x/deep".to_owned(), "/var/lib/x/deep/f".to_owned()]
                ),
                (
                    "factory/run".into(),
                    "/srv".into(),
                    vec!["/srv/stale.html".to_owned()]
                ),
                (
                    "factory/run".into(),
                    "/var/lib/x".into(),
                    vec!["/var/lib/x/deep".to_owned(), "/var/lib/x/deep/f".to_owned()]
                ),
            ]
        );
        // /var/lib/x lives in state/var, /mnt/data/sub on another disk.
        let x = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/var/lib/x")
            .unwrap();
        assert_eq!(x.dir.as_deref(), Some("state/var/lib/x"));
        let sub = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/mnt/data/sub")
            .unwrap();
        assert_eq!(sub.status, MountpointStatus::NotOnImage);
        let data = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/mnt/data")
            .unwrap();
        assert_eq!(data.status, MountpointStatus::Missing);
        assert!(l.mountpoints.iter().all(|m| m.mountpoint != "/mnt/later"));
        assert_eq!(l.hidden_bytes, 7 + 5 + 4);
    }

    /// A hostile image whose mountpoint's parent is a symlink out of it
    /// (`srv -> <host dir>`, fstab mounting /srv/x), or whose `systems` is
    /// one, must never make lint list the host's files.
    #[test]
    fn symlinks_in_the_image_never_lead_lint_to_the_host() {
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("x/secret-dir")).unwrap();
        std::fs::write(host.path().join("x/secret"), "host\n").unwrap();
        let d = tempfile::tempdir().unwrap();
        let top = d.path();
        for t in ["orig", "run"] {
            let tree = top.join(format!("systems/v/{t}"));
            std::fs::create_dir_all(tree.join("etc")).unwrap();
            std::os::unix::fs::symlink(host.path(), tree.join("srv")).unwrap();
            std::fs::write(
                tree.join("etc/fstab"),
                "/dev/vdb /srv/x ext4 defaults 0 2\n/dev/vdc /srv ext4 noauto 0 0\n",
            )
            .unwrap();
        }
        let l = mountpoints(top, "img", &[]);
        assert_eq!(l.trees, ["v/orig", "v/run"]);
        let x: Vec<&MountpointCheck> = l
            .mountpoints
            .iter()
            .filter(|m| m.mountpoint == "/srv/x")
            .collect();
        assert_eq!(x.len(), 2, "{l:#?}");
        for m in x {
            assert_eq!(m.status, MountpointStatus::NotADirectory, "{m:#?}");
            assert!(m.files.is_empty(), "host files listed: {:#?}", m.files);
        }
        assert_eq!(l.hidden_files, 0);

        // `systems` itself a symlink to a host directory shaped like an image.
        let hostile = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("systems/v/orig/srv")).unwrap();
        std::fs::write(host.path().join("systems/v/orig/srv/secret"), "host\n").unwrap();
        std::fs::create_dir_all(hostile.path().join("state/srv")).unwrap();
        std::os::unix::fs::symlink(host.path().join("systems"), hostile.path().join("systems"))
            .unwrap();
        let l = mountpoints(hostile.path(), "img", &[]);
        assert!(
            l.mountpoints.iter().all(|m| m.files.is_empty()),
            "host files listed: {l:#?}"
        );
        assert_eq!(l.hidden_files, 0);
    }

    #[test]
    fn lint_falls_back_to_state_dirs_without_fstab() {
        let d = tempfile::tempdir().unwrap();
        for p in ["systems/v1/run/home/alice", "systems/v1/orig", "state/home"] {
            std::fs::create_dir_all(d.path().join(p)).unwrap();
        }
        let l = mountpoints(d.path(), "img", &[]);
        assert!(!l.clean);
        let m = &l.mountpoints.iter().find(|m| m.tree == "run").unwrap();
        assert_eq!(m.mountpoint, "/home");
        assert!(m.basis.contains("no fstab entry"));
        assert_eq!(m.files[0].path, "/home/alice");
    }

    #[test]
    fn a_listed_subvolume_is_one_on_a_single_device_mount() {
        // The appliance's FUSE mount shows every subvolume on one device:
        // the subvolume list says which directories are subvolumes.
        let d = tempfile::tempdir().unwrap();
        tree(d.path());
        std::fs::create_dir_all(d.path().join("state/var/lib/x/nested")).unwrap();
        let subvols = subvolumes::parse(
            "ID 270 gen 1 parent 5 top level 5 parent_uuid - uuid u path state/var/lib/x/nested\n",
        );
        let l = mountpoints(d.path(), "img", &subvols);
        let x = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/var/lib/x")
            .unwrap();
        assert_eq!(x.files.len(), 1);
        assert_eq!(x.files[0].path, "/var/lib/x/nested");
        assert_eq!(x.files[0].kind, FileKind::Subvolume);
        let plain = mountpoints(d.path(), "img", &[]);
        let x = plain
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/var/lib/x")
            .unwrap();
        assert_eq!(x.files[0].kind, FileKind::Dir);
    }
}
