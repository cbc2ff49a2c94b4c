//! The appliance step of a rootless build: libguestfs boots a small Linux
//! VM (unprivileged QEMU) with the image as its disk and does what needs a
//! mounted btrfs: the device nodes the user namespace could not make, the
//! `run` snapshot, `extlinux --install`.
//!
//! The script is data (`host::guestfish::Cmd`); guestfish's quoting,
//! command line and environment are `host::guestfish`'s.

use super::wire::Work;
use crate::host::cmd::{self, CmdError};
use crate::host::guestfish::{guestfish, render, Accel, Cmd};
use crate::host::interrupt::Interrupt;
use std::io::Write;
use std::path::Path;

/// The script for `work` on `image`: device nodes first (so the snapshot
/// has them too), then the snapshots, then the bootloader.
pub fn script(image: &Path, work: &Work) -> Vec<Cmd> {
    let mut s = vec![
        Cmd::AddRaw(image.to_owned()),
        Cmd::Run,
        Cmd::MountTop,
        Cmd::Umask(0),
    ];
    for d in &work.devices {
        let kind = if d.block { 0o060000 } else { 0o020000 };
        s.push(Cmd::Mknod {
            mode: kind | (d.mode & 0o777),
            major: d.major,
            minor: d.minor,
            path: d.path.clone(),
        });
        s.push(Cmd::Lchown {
            uid: d.uid,
            gid: d.gid,
            path: d.path.clone(),
        });
        // After the chown, which clears setuid/setgid.
        s.push(Cmd::Chmod {
            mode: d.mode,
            path: d.path.clone(),
        });
        if let Some(mtime) = d.mtime {
            s.push(Cmd::Utimens {
                path: d.path.clone(),
                mtime,
            });
        }
    }
    for (from, to) in &work.snapshots {
        s.push(Cmd::Snapshot {
            from: from.clone(),
            to: to.clone(),
        });
    }
    if work.bootloader {
        s.push(Cmd::Extlinux);
    }
    s.extend([Cmd::Sync, Cmd::UmountAll]);
    s
}

/// Runs the script in a fresh appliance. Interruptible; the appliance (its
/// whole process group) dies with strata.
pub fn run(image: &Path, work: &Work, accel: Accel, interrupt: &Interrupt) -> Result<(), CmdError> {
    let text = render(&script(image, work));
    let spawn = |source| CmdError::Spawn {
        program: "guestfish".into(),
        source,
    };
    let mut file = tempfile::Builder::new()
        .prefix("strata-appliance.")
        .suffix(".gf")
        .tempfile()
        .map_err(spawn)?;
    file.write_all(text.as_bytes()).map_err(spawn)?;
    let mut c = guestfish(accel);
    c.arg("-f").arg(file.path());
    cmd::run_interruptible(&mut c, interrupt, &mut |_| {})
}

#[cfg(test)]
mod tests {
    use super::super::wire::DeviceNode;
    use super::*;

    #[test]
    fn the_script_for_a_build() {
        let work = Work {
            devices: vec![
                DeviceNode {
                    path: "systems/factory/orig/dev/null".into(),
                    block: false,
                    mode: 0o666,
                    major: 1,
                    minor: 3,
                    uid: 0,
                    gid: 0,
                    mtime: Some(1714564800),
                },
                DeviceNode {
                    path: "systems/factory/orig/dev/my \"disk\"".into(),
                    block: true,
                    mode: 0o2660,
                    major: 8,
                    minor: 16,
                    uid: 0,
                    gid: 6,
                    mtime: None,
                },
            ],
            snapshots: vec![("systems/factory/orig".into(), "systems/factory/run".into())],
            bootloader: true,
        };
        insta::assert_snapshot!(render(&script(
            Path::new("/var/tmp/.sys img.strata-partial.42.x"),
            &work
        )));
    }
}
