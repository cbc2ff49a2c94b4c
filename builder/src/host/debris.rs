//! What a strata killed with SIGKILL leaves behind, found and cleaned by the
//! next run. Guards undo everything on errors and signals that can be
//! caught; SIGKILL cannot be, so every resource strata makes is claimed by
//! the run that made it (`claim`: a flock the kernel drops when the run
//! dies) and named so the next run finds it:
//!
//! - mounts on `<tmp>/strata-mnt.<pid>.<random>/fs` (`mount::MOUNT_DIR_PREFIX`),
//!   and the loop devices mounted there;
//! - partial images `.<name>.strata-partial.<pid>.<random>` next to the
//!   output (`PARTIAL_MARKER`);
//! - a rootless build's staging directories
//!   `.<name>.strata-staging.<pid>.<random>` next to the output
//!   (`STAGING_MARKER`). Their files belong to the ids of a user
//!   namespace, so an ordinary user removes them from inside one
//!   (`remove_tree`);
//! - extracted rootfs archives `.<name>.strata-extract.<pid>.<random>/`
//!   next to the output (`EXTRACT_MARKER`, `rootfs_tar::Extraction`).
//!
//! Only resources nobody holds are touched (the pid in a name is for
//! humans), and a loop device only when the dead run attached it itself
//! (its mount dir says so).
//!
//! A name proves nothing: anyone can mount a FUSE filesystem on
//! `~/strata-mnt.999999.loop.x` naming `/dev/loop0` as its source. A mount
//! is cleaned only when this user's strata provably made it: its mount
//! point is `fs` inside a directory of that name owned by this user with
//! mode 0700 (which no other user can fill), it is btrfs, and a loop
//! device strata attached still reads the file recorded beside it when it
//! was attached (`mount::BACKING_RECORD`, by device and inode). Anything
//! else named so is reported and left alone. strata's loop
//! devices are attached with autoclear (`loopdev`): one that is not mounted
//! went away with the run that held it, one that is goes with the unmount.

use crate::host::claim;
use crate::host::cmd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The part of a staging directory's name after `.<output name>`; the pid
/// after it is the outer process's, which holds its claim.
pub const STAGING_MARKER: &str = ".strata-staging.";

/// Removes a staging directory whatever ids its files have: directly when
/// that works (root, or already empty), else from inside a user namespace
/// where those ids are the user's.
pub fn remove_tree(path: &Path) -> Result<(), cmd::CmdError> {
    if std::fs::remove_dir(path).is_ok() || !path.exists() {
        return Ok(());
    }
    if rustix::process::geteuid().is_root() {
        return std::fs::remove_dir_all(path).map_err(|source| cmd::CmdError::Spawn {
            program: "rm".into(),
            source,
        });
    }
    cmd::run(
        Command::new("unshare")
            .args(["--map-auto", "--map-root-user", "--", "rm", "-rf", "--"])
            .arg(path),
    )
    .map(drop)
}

/// The part of a partial image's name after `.<output name>`.
pub const PARTIAL_MARKER: &str = ".strata-partial.";
/// The part of an extracted rootfs archive's directory name after
/// `.<output name>`.
pub const EXTRACT_MARKER: &str = ".strata-extract.";

/// A resource left by a dead run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A mount on a strata mount dir nobody holds; `device` is what is
    /// mounted; `own_loop`: a loop device that run attached itself.
    Mount {
        dir: PathBuf,
        device: String,
        own_loop: bool,
    },
    /// A partial image of a dead build.
    Partial(PathBuf),
    /// A staging directory of a dead rootless build.
    Staging(PathBuf),
    /// A rootfs archive a dead run extracted (a directory).
    Extraction(PathBuf),
    /// A mount named like a dead run's that strata cannot prove it made:
    /// reported, never touched. `why` says what does not fit.
    NotOurs {
        dir: PathBuf,
        device: String,
        why: String,
    },
}

/// What cleaning did, for the caller to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleaned {
    Unmounted {
        dir: PathBuf,
        device: String,
    },
    Detached(String),
    Removed(PathBuf),
    RemovedStaging(PathBuf),
    RemovedExtraction(PathBuf),
    /// Named like a dead run's mount, but not provably strata's: left alone.
    LeftAlone {
        dir: PathBuf,
        device: String,
        why: String,
    },
    /// Could not be cleaned: what failed and the command that would do it.
    Failed {
        what: String,
        command: String,
    },
}

impl std::fmt::Display for Cleaned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cleaned::Unmounted { dir, device } => write!(
                f,
                "unmounted {device} from {} (left by a killed strata)",
                dir.display()
            ),
            Cleaned::Detached(dev) => {
                write!(f, "detached loop device {dev} (left by a killed strata)")
            }
            Cleaned::Removed(p) => write!(
                f,
                "removed partial image {} (left by a killed strata)",
                p.display()
            ),
            Cleaned::RemovedStaging(p) => write!(
                f,
                "removed staging directory {} (left by a killed rootless strata build)",
                p.display()
            ),
            Cleaned::RemovedExtraction(p) => write!(
                f,
                "removed extracted rootfs archive {} (left by a killed strata)",
                p.display()
            ),
            Cleaned::LeftAlone { dir, device, why } => write!(
                f,
                "left {device} mounted on {} alone: it is named like a killed strata's \
                 mount, but {why}",
                dir.display()
            ),
            Cleaned::Failed { what, command } => {
                write!(f, "could not clean {what}: run `{command}`")
            }
        }
    }
}

/// The pid in a name `<prefix><pid>.<rest>`, if it has that shape.
fn pid_after(name: &str, prefix: &str) -> Option<u32> {
    claim::split_name(name, prefix).map(|(pid, _)| pid)
}

/// A mount named like a strata mount of a dead run, as `mountinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub dir: PathBuf,
    pub fstype: String,
    pub device: String,
    pub own_loop: bool,
}

/// Mounts named like strata mounts whose run is gone, from `mountinfo`
/// text: those `judge` finds strata's as `Mount`, the others as `NotOurs`
/// with its reason. Both the current layout (`<name>/fs`) and a mount
/// point that itself has the name (older runs, or a forgery) are seen.
pub fn dead_mounts(
    mountinfo: &str,
    lives: impl Fn(&claim::Leftover) -> bool,
    judge: impl Fn(&Seen) -> Result<(), String>,
) -> Vec<Leftover> {
    let mut out = Vec::new();
    let mount_points: std::collections::HashSet<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|d| PathBuf::from(crate::fstab::unescape(d)))
        .collect();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dir) = fields.get(4).map(|d| crate::fstab::unescape(d)) else {
            continue;
        };
        let dir = PathBuf::from(dir);
        let named = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| pid_after(n, crate::host::mount::MOUNT_DIR_PREFIX).is_some())
        };
        // strata mounts on `fs` in the directory it claimed; a mount point
        // that itself has the name (a forgery, or an older strata's) is
        // never opened to be judged (a FUSE mount can hang whoever opens
        // it): `judge` says whose it is.
        let Some(name) = named(&dir).or_else(|| dir.parent().and_then(named)) else {
            continue;
        };
        let claimed = dir
            .parent()
            .filter(|_| named(&dir).is_none())
            .filter(|p| !mount_points.contains(*p));
        let Some((pid, rest)) = claim::split_name(&name, crate::host::mount::MOUNT_DIR_PREFIX)
        else {
            continue;
        };
        let unmarked = rest.strip_prefix(crate::host::mount::OWN_LOOP_MARK);
        let own_loop = unmarked.is_some();
        let rest = unmarked.unwrap_or(rest);
        if lives(&claim::Leftover { claimed, pid, rest }) {
            continue;
        }
        // After the " - " separator: fstype, source.
        let sep = fields.iter().position(|f| *f == "-");
        let after = |n: usize| {
            sep.and_then(|i| fields.get(i + n))
                .map(|s| crate::fstab::unescape(s))
                .unwrap_or_default()
        };
        let seen = Seen {
            dir,
            fstype: after(1),
            device: after(2),
            own_loop,
        };
        out.push(match judge(&seen) {
            Ok(()) => Leftover::Mount {
                dir: seen.dir,
                device: seen.device,
                own_loop: seen.own_loop,
            },
            Err(why) => Leftover::NotOurs {
                dir: seen.dir,
                device: seen.device,
                why,
            },
        });
    }
    out
}

/// Whether this user's strata provably made the mount `seen` (see the
/// module's comment), or why not.
pub fn provenance(seen: &Seen) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let private = seen
        .dir
        .parent()
        .filter(|_| {
            seen.dir
                .file_name()
                .is_some_and(|n| n == crate::host::mount::MOUNT_POINT_NAME)
        })
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                pid_after(&n.to_string_lossy(), crate::host::mount::MOUNT_DIR_PREFIX).is_some()
            })
        })
        .ok_or_else(|| {
            format!(
                "it is not on `{}` inside a strata mount directory",
                crate::host::mount::MOUNT_POINT_NAME
            )
        })?;
    // lstat: a symlink named so could point at any directory.
    let md = std::fs::symlink_metadata(private)
        .map_err(|e| format!("its directory {} cannot be read: {e}", private.display()))?;
    let euid = rustix::process::geteuid().as_raw();
    let mode = md.permissions().mode() & 0o7777;
    if !md.is_dir() || md.uid() != euid || mode != 0o700 {
        return Err(format!(
            "its directory {} is {} owned by uid {} with mode {mode:o}, not a private \
             (0700) directory of uid {euid}",
            private.display(),
            if md.is_dir() {
                "a directory"
            } else {
                "not a directory"
            },
            md.uid(),
        ));
    }
    if seen.fstype != "btrfs" {
        return Err(format!(
            "it is a {} mount, and strata mounts only btrfs",
            seen.fstype
        ));
    }
    if seen.own_loop {
        let record = private.join(crate::host::mount::BACKING_RECORD);
        let recorded = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| {
                let (d, i) = t.trim().split_once(' ')?;
                Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
            })
            .ok_or_else(|| {
                format!(
                    "{} does not record which file strata attached {} to",
                    record.display(),
                    seen.device
                )
            })?;
        let is_loop = Path::new(&seen.device)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("loop"))
            && seen.device.starts_with("/dev/");
        let reads = is_loop
            .then(|| crate::host::loopdev::backing_id(Path::new(&seen.device)).ok())
            .flatten();
        if reads != Some(recorded) {
            return Err(format!(
                "{} is not the loop device strata attached to the file it recorded",
                seen.device
            ));
        }
    }
    Ok(())
}

/// Partial images and staging directories of dead builds in `dir`. Each
/// marker is looked for from the end (as for extractions), and each on its
/// own: the output's own name may contain either. A partial image is a
/// file, a staging directory a directory, so one entry is never both.
pub fn dead_partials(dir: &Path, lives: impl Fn(&claim::Leftover) -> bool) -> Vec<Leftover> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let path = e.path();
        let dead = |marker: &str| {
            name.rfind(marker)
                .and_then(|at| claim::split_name(&name[at..], marker))
                .is_some_and(|(pid, rest)| {
                    !lives(&claim::Leftover {
                        claimed: Some(&path),
                        pid,
                        rest,
                    })
                })
        };
        if dead(PARTIAL_MARKER) && e.file_type().is_ok_and(|t| t.is_file()) {
            out.push(Leftover::Partial(e.path()));
        }
        // Removed recursively (from a user namespace): only a directory
        // we made, as for extractions.
        if dead(STAGING_MARKER) && ours(&e) {
            out.push(Leftover::Staging(e.path()));
        }
    }
    out
}

/// A real directory (not followed through a symlink) owned by us: one this
/// user's strata made, not whatever another user named so in a directory
/// they can write.
fn ours(e: &std::fs::DirEntry) -> bool {
    e.metadata()
        .is_ok_and(|m| m.is_dir() && m.uid() == rustix::process::geteuid().as_raw())
}

/// Rootfs archives dead runs extracted into `dir`.
pub fn dead_extractions(dir: &Path, lives: impl Fn(&claim::Leftover) -> bool) -> Vec<Leftover> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(at) = name.rfind(EXTRACT_MARKER) else {
            continue;
        };
        if !name.starts_with('.') {
            continue;
        }
        let Some((pid, rest)) = claim::split_name(&name[at..], EXTRACT_MARKER) else {
            continue;
        };
        let path = e.path();
        let claimed = Some(path.as_path());
        // Owned by us, as `Extraction` checks.
        if ours(&e) && !lives(&claim::Leftover { claimed, pid, rest }) {
            out.push(Leftover::Extraction(e.path()));
        }
    }
    out
}

/// Everything a dead run left: its mounts anywhere, its partial images and
/// extracted archives in `image_dir` (the directory of the image or output
/// being worked on).
pub fn find(image_dir: Option<&Path>) -> Vec<Leftover> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = dead_mounts(&info, claim::lives, provenance);
    if let Some(d) = image_dir {
        out.extend(dead_partials(d, claim::lives));
        out.extend(dead_extractions(d, claim::lives));
    }
    out
}

/// The mounts of dead runs on a loop device backed by `image`: what keeps
/// the image from being opened again (btrfs refuses a second device of a
/// filesystem that is still mounted through the first).
pub fn find_for_image(image: &Path) -> Vec<Leftover> {
    let backing = loops_backing(image);
    if backing.is_empty() {
        return Vec::new();
    }
    find(None)
        .into_iter()
        .filter(|l| {
            matches!(l, Leftover::Mount { device, .. } | Leftover::NotOurs { device, .. }
                if backing.contains(device))
        })
        .collect()
}

/// Cleans what `find` found: unmount (lazily if busy) and rmdir, detach the
/// loop device that was mounted, remove partial images no loop device uses.
pub fn clean(leftovers: &[Leftover]) -> Vec<Cleaned> {
    let mut done = Vec::new();
    for l in leftovers {
        match l {
            Leftover::Mount {
                dir,
                device,
                own_loop,
            } => {
                let unmounted = cmd::run(Command::new("umount").arg(dir))
                    .or_else(|_| cmd::run(Command::new("umount").arg("--lazy").arg(dir)));
                if unmounted.is_err() {
                    done.push(Cleaned::Failed {
                        what: format!("mount {}", dir.display()),
                        command: format!("umount --lazy {}", dir.display()),
                    });
                    continue;
                }
                // The mount point, then the private directory around it
                // and its record (rmdir only: nothing else is ours there).
                let _ = std::fs::remove_dir(dir);
                if let Some(private) = dir.parent() {
                    let _ = std::fs::remove_file(private.join(crate::host::mount::BACKING_RECORD));
                    let _ = std::fs::remove_dir(private);
                }
                done.push(Cleaned::Unmounted {
                    dir: dir.clone(),
                    device: device.clone(),
                });
                // Only a loop device that run attached: a device the user
                // gave (`strata inspect /dev/loop5`) stays theirs.
                if *own_loop {
                    // strata attaches with autoclear (`loopdev`): the
                    // unmount was the device's last close, and the kernel
                    // detached it already. Older runs' devices need
                    // `losetup -d`.
                    let detached = || !loop_bound(device);
                    if wait_for(detached) {
                        done.push(Cleaned::Detached(device.clone()));
                        continue;
                    }
                    match cmd::run(Command::new("losetup").arg("-d").arg(device)) {
                        Ok(_) => done.push(Cleaned::Detached(device.clone())),
                        Err(_) if detached() => done.push(Cleaned::Detached(device.clone())),
                        Err(_) => done.push(Cleaned::Failed {
                            what: format!("loop device {device}"),
                            command: format!("losetup -d {device}"),
                        }),
                    }
                }
            }
            Leftover::NotOurs { dir, device, why } => done.push(Cleaned::LeftAlone {
                dir: dir.clone(),
                device: device.clone(),
                why: why.clone(),
            }),
            Leftover::Extraction(path) => match std::fs::remove_dir_all(path) {
                Ok(()) => done.push(Cleaned::RemovedExtraction(path.clone())),
                Err(_) => done.push(Cleaned::Failed {
                    what: format!("extracted rootfs archive {}", path.display()),
                    command: format!("rm -rf {}", path.display()),
                }),
            },
            Leftover::Partial(path) => {
                let users = loops_backing(path);
                for dev in &users {
                    let _ = cmd::run(Command::new("losetup").arg("-d").arg(dev));
                }
                match std::fs::remove_file(path) {
                    Ok(()) => done.push(Cleaned::Removed(path.clone())),
                    Err(_) => done.push(Cleaned::Failed {
                        what: format!("partial image {}", path.display()),
                        command: format!("rm {}", path.display()),
                    }),
                }
            }
            Leftover::Staging(path) => match remove_tree(path) {
                Ok(()) => done.push(Cleaned::RemovedStaging(path.clone())),
                Err(_) => done.push(Cleaned::Failed {
                    what: format!("staging directory {}", path.display()),
                    command: format!(
                        "unshare --map-auto --map-root-user rm -rf {}",
                        path.display()
                    ),
                }),
            },
        }
    }
    done
}

/// `/dev/loopN` is bound to a file.
fn loop_bound(device: &str) -> bool {
    let name = Path::new(device).file_name().unwrap_or_default();
    Path::new("/sys/block")
        .join(name)
        .join("loop/backing_file")
        .exists()
}

/// `done` within a second (an autoclear detach follows the last close by
/// a moment when udev probes the device).
fn wait_for(done: impl Fn() -> bool) -> bool {
    for _ in 0..20 {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done()
}

/// Loop devices whose backing file is `file` (`losetup -j`).
pub fn loops_backing(file: &Path) -> Vec<String> {
    let Ok(out) = cmd::run(Command::new("losetup").arg("-j").arg(file)) else {
        return Vec::new();
    };
    parse_losetup_j(&out)
}

/// `/dev/loop3: []: (/var/tmp/x.img)` → `/dev/loop3`.
pub fn parse_losetup_j(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_once(':').map(|(d, _)| d.trim().to_owned()))
        .filter(|d| d.starts_with("/dev/"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
36 25 0:32 / /tmp/strata-mnt.999999.loop.AbC/fs rw,relatime shared:1 - btrfs /dev/loop7 rw,space_cache=v2,subvolid=5,subvol=/
37 25 0:33 / /tmp/strata-mnt.1.XyZ/fs rw,relatime shared:2 - btrfs /dev/loop8 rw
42 25 0:38 / /tmp/strata-mnt.5.+Claim/fs rw - btrfs /dev/loop10 rw
43 25 0:39 / /tmp/strata-mnt.1.loop.+Gone/fs rw - btrfs /dev/loop11 rw
38 25 0:34 / /tmp/my\\040dir/strata-mnt.424242.q/fs rw - btrfs /dev/loop9 rw
39 25 0:35 / /mnt/strata-mnt.x rw - ext4 /dev/vdb rw
40 25 0:36 / /proc rw - proc proc rw
41 25 0:37 / /home/u/strata-mnt.999998.loop.x rw - fuse.sshfs /dev/loop0 rw
";

    #[test]
    fn dead_mounts_are_strata_dirs_nobody_holds() {
        // The live run holds the directory around its mount point.
        let found = dead_mounts(
            INFO,
            |l| {
                // A mount point is never handed over to be opened.
                assert!(
                    !l.claimed.is_some_and(|c| c.starts_with("/home/u")),
                    "{l:?}"
                );
                // As `claim::lives`: a claimed name by its claim (here the
                // one held), a name from before claims by its pid (1 lives).
                if l.rest.starts_with(claim::CLAIMED_TAG) {
                    l.claimed == Some(Path::new("/tmp/strata-mnt.5.+Claim"))
                } else {
                    l.pid == 1
                }
            },
            |s| {
                (s.fstype == "btrfs")
                    .then_some(())
                    .ok_or("not btrfs".into())
            },
        );
        assert_eq!(
            found,
            [
                Leftover::Mount {
                    dir: "/tmp/strata-mnt.999999.loop.AbC/fs".into(),
                    device: "/dev/loop7".into(),
                    own_loop: true,
                },
                // Its pid lives, but nobody holds its claim.
                Leftover::Mount {
                    dir: "/tmp/strata-mnt.1.loop.+Gone/fs".into(),
                    device: "/dev/loop11".into(),
                    own_loop: true,
                },
                Leftover::Mount {
                    dir: "/tmp/my dir/strata-mnt.424242.q/fs".into(),
                    device: "/dev/loop9".into(),
                    own_loop: false,
                },
                Leftover::NotOurs {
                    dir: "/home/u/strata-mnt.999998.loop.x".into(),
                    device: "/dev/loop0".into(),
                    why: "not btrfs".into(),
                },
            ]
        );
    }

    /// The review's forgery, judged for real: a mount point named like a
    /// dead run's own-loop mount, outside any private strata directory.
    #[test]
    fn a_mount_named_like_strata_s_proves_nothing() {
        let seen = Seen {
            dir: "/home/u/strata-mnt.999999.loop.x".into(),
            fstype: "fuse.x".into(),
            device: "/dev/loop0".into(),
            own_loop: true,
        };
        let why = provenance(&seen).unwrap_err();
        assert!(why.contains("not on `fs`"), "{why}");
        // The right shape, in a directory anyone could have made.
        let d = tempfile::tempdir().unwrap();
        let private = d.path().join("strata-mnt.999999.loop.x");
        std::fs::create_dir(&private).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        let seen = Seen {
            dir: private.join("fs"),
            ..seen
        };
        let why = provenance(&seen).unwrap_err();
        assert!(why.contains("mode 755"), "{why}");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let why = provenance(&seen).unwrap_err();
        assert!(why.contains("fuse.x mount"), "{why}");
        let seen = Seen {
            fstype: "btrfs".into(),
            ..seen
        };
        let why = provenance(&seen).unwrap_err();
        assert!(why.contains("does not record"), "{why}");
    }

    #[test]
    fn partials_of_dead_builds_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(".sys.img.strata-staging.999999.q/top/etc")).unwrap();
        std::fs::create_dir(d.path().join(".sys.img.strata-staging.1.live")).unwrap();
        // An output whose own name has the partial marker, its run alive:
        // its dead staging directory is still found.
        let odd = ".o.strata-partial.1.img.strata-staging.999998.z";
        std::fs::create_dir(d.path().join(odd)).unwrap();
        // Another user's directory of that name is not ours to remove.
        let theirs = d.path().join(".sys.img.strata-staging.999997.t");
        std::fs::create_dir(&theirs).unwrap();
        let chowned = std::process::Command::new("chown")
            .args(["12345"])
            .arg(&theirs)
            .status()
            .is_ok_and(|s| s.success());
        if !chowned {
            std::fs::remove_dir(&theirs).unwrap();
        }
        for n in [
            ".sys.img.strata-partial.999999.aB3",
            ".sys.img.strata-partial.1.live",
            "sys.img",
            ".sys.img.strata-partial.notapid.x",
        ] {
            std::fs::write(d.path().join(n), "").unwrap();
        }
        let mut found = dead_partials(d.path(), |l| l.pid == 1);
        found.sort_by_key(|l| format!("{l:?}"));
        let (partial, staging, odd) = (
            d.path().join(".sys.img.strata-partial.999999.aB3"),
            d.path().join(".sys.img.strata-staging.999999.q"),
            d.path().join(odd),
        );
        assert_eq!(
            found,
            [
                Leftover::Partial(partial.clone()),
                Leftover::Staging(odd.clone()),
                Leftover::Staging(staging.clone()),
            ]
        );
        let cleaned = clean(&found);
        assert_eq!(
            cleaned,
            [
                Cleaned::Removed(partial),
                Cleaned::RemovedStaging(odd.clone()),
                Cleaned::RemovedStaging(staging.clone())
            ]
        );
        assert!(!staging.exists() && !odd.exists());
        if chowned {
            assert!(theirs.exists());
        }
        assert!(d.path().join(".sys.img.strata-partial.1.live").exists());
        assert!(d.path().join(".sys.img.strata-staging.1.live").exists());
    }

    /// For real: a staging directory and a partial image this process
    /// claims are left alone, whatever pid their names carry; once the
    /// claims are gone they are a dead run's.
    #[test]
    fn what_a_live_run_claims_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let (staging, claim) =
            claim::claimed_dir(d.path(), &format!(".sys.img{STAGING_MARKER}"), "").unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(claim::CLAIMING)
            .tempfile_in(d.path())
            .unwrap();
        rustix::fs::flock(
            tmp.as_file(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .unwrap();
        let partial = claim::name_claimed_file(tmp, &format!(".sys.img{PARTIAL_MARKER}")).unwrap();
        assert_eq!(dead_partials(d.path(), claim::lives), []);
        drop(claim);
        let (file, path) = partial.into_parts();
        drop(file);
        // A lock goes with the last descriptor of its open file: a child
        // another test thread is forking holds a copy until it execs
        // (CLOEXEC), so the release may come a moment later.
        let mut found = Vec::new();
        for _ in 0..100 {
            found = dead_partials(d.path(), claim::lives);
            if found.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        found.sort_by_key(|l| format!("{l:?}"));
        assert_eq!(
            found,
            [
                Leftover::Partial(path.to_path_buf()),
                Leftover::Staging(staging)
            ]
        );
    }

    #[test]
    fn extractions_of_dead_runs_only() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            ".sys.img.strata-extract.999999.aB3",
            ".sys.img.strata-extract.1.live",
            "sys.img.strata-extract.999999.x",
            // An output named `o.strata-extract.999999.img`, its run alive.
            ".o.strata-extract.999999.img.strata-extract.1.live",
        ] {
            std::fs::create_dir_all(d.path().join(n).join("rootfs/etc")).unwrap();
        }
        // A file of that name is not ours to remove recursively.
        std::fs::write(d.path().join(".o.strata-extract.999998.f"), "").unwrap();
        let found = dead_extractions(d.path(), |l| l.pid == 1);
        let dead = d.path().join(".sys.img.strata-extract.999999.aB3");
        assert_eq!(found, [Leftover::Extraction(dead.clone())]);
        assert_eq!(clean(&found), [Cleaned::RemovedExtraction(dead.clone())]);
        assert!(!dead.exists());
        assert!(d.path().join(".sys.img.strata-extract.1.live").exists());
    }

    #[test]
    fn losetup_j_lines() {
        assert_eq!(
            parse_losetup_j(
                "/dev/loop3: []: (/var/tmp/x.img)\n/dev/loop4: [2049]:12 (/var/tmp/x.img)\n"
            ),
            ["/dev/loop3", "/dev/loop4"]
        );
        assert!(parse_losetup_j("").is_empty());
    }
}
