//! The appliance step of a rootless build: libguestfs boots a small Linux
//! VM (unprivileged QEMU) with the image as its disk and does what needs a
//! mounted btrfs: the device nodes the user namespace could not make, the
//! `run` snapshot, `extlinux --install`.
//!
//! The guestfish script is data (`Cmd`), rendered with guestfish's quoting
//! (double quotes, backslash escapes), so a path with spaces or quotes
//! stays one argument. This module owns guestfish's quoting, environment
//! and command line; `image::appliance` (a read-only image served over
//! FUSE for `strata inspect`) renders its script here too.

use super::wire::Work;
use super::Accel;
use crate::cmd::{self, CmdError};
use crate::interrupt::Interrupt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One guestfish command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    AddRaw(PathBuf),
    /// The image as a read-only drive: nothing in the appliance can write
    /// it (guestfish `--ro` refuses writable drives as well).
    AddRawReadOnly(PathBuf),
    /// Prints its text on guestfish's stdout: a marker between outputs.
    Echo(String),
    /// `btrfs subvolume list FLAGS` of the top level, run in the appliance
    /// (where it is mounted at /sysroot); prints the tool's output.
    ListSubvolumes(&'static str),
    /// Serves the appliance's `/` read-only over FUSE at this host
    /// directory; `MountLocalRun` then blocks until it is unmounted.
    MountLocal(PathBuf),
    MountLocalRun,
    Run,
    /// Mount the top level (subvolid=5) at the appliance's `/`.
    MountTop,
    Umask(u32),
    Mknod {
        mode: u32,
        major: u32,
        minor: u32,
        path: String,
    },
    Lchown {
        uid: u32,
        gid: u32,
        path: String,
    },
    Chmod {
        mode: u32,
        path: String,
    },
    Utimens {
        path: String,
        mtime: i64,
    },
    Snapshot {
        from: String,
        to: String,
    },
    Extlinux,
    Sync,
    UmountAll,
}

/// guestfish's double-quoted argument: `\` and `"` escaped, control and
/// non-ASCII bytes as `\xhh` (NUL cannot occur in a path).
pub fn quote(arg: &[u8]) -> String {
    let mut s = String::from("\"");
    for &b in arg {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}

/// An image path as the appliance sees it (the top level is mounted at /).
fn guest(rel: &str) -> String {
    quote(format!("/{}", rel.trim_start_matches('/')).as_bytes())
}

impl Cmd {
    pub fn render(&self) -> String {
        use std::os::unix::ffi::OsStrExt;
        match self {
            Cmd::AddRaw(p) => format!("add-drive {} format:raw", quote(p.as_os_str().as_bytes())),
            Cmd::AddRawReadOnly(p) => format!(
                "add-drive {} format:raw readonly:true",
                quote(p.as_os_str().as_bytes())
            ),
            Cmd::Echo(text) => format!("echo {}", quote(text.as_bytes())),
            // `debug sh` runs in the appliance, whose root is /sysroot.
            Cmd::ListSubvolumes(flags) => {
                format!(
                    "debug sh {}",
                    quote(format!("btrfs subvolume list {flags} /sysroot").as_bytes())
                )
            }
            Cmd::MountLocal(dir) => format!(
                "mount-local {} readonly:true",
                quote(dir.as_os_str().as_bytes())
            ),
            Cmd::MountLocalRun => "mount-local-run".into(),
            Cmd::Run => "run".into(),
            Cmd::MountTop => "mount-options \"subvolid=5\" /dev/sda /".into(),
            Cmd::Umask(m) => format!("umask 0{m:o}"),
            Cmd::Mknod {
                mode,
                major,
                minor,
                path,
            } => format!("mknod 0{mode:o} {major} {minor} {}", guest(path)),
            Cmd::Lchown { uid, gid, path } => format!("lchown {uid} {gid} {}", guest(path)),
            Cmd::Chmod { mode, path } => format!("chmod 0{mode:o} {}", guest(path)),
            Cmd::Utimens { path, mtime } => {
                format!("utimens {} {mtime} 0 {mtime} 0", guest(path))
            }
            Cmd::Snapshot { from, to } => {
                format!("btrfs-subvolume-snapshot {} {}", guest(from), guest(to))
            }
            Cmd::Extlinux => "extlinux /".into(),
            Cmd::Sync => "sync".into(),
            Cmd::UmountAll => "umount-all".into(),
        }
    }
}

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

pub fn render(script: &[Cmd]) -> String {
    let mut out = String::new();
    for c in script {
        out.push_str(&c.render());
        out.push('\n');
    }
    out
}

/// libguestfs's environment: its own QEMU (no libvirt), TCG unless KVM
/// was asked for (on some hosts /dev/kvm exists but KVM hangs or stops
/// the guest, measured on CI machines).
pub fn environment(accel: Accel) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![("LIBGUESTFS_BACKEND", "direct")];
    if accel == Accel::Tcg {
        env.push(("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"));
    }
    env
}

/// guestfish with libguestfs's environment and without progress bars (its
/// output is read by strata, not a terminal). The appliance boots the
/// host's kernel uncompressed where it can (`kernel`: seconds less under
/// TCG).
pub fn guestfish(accel: Accel) -> Command {
    let mut c = Command::new("guestfish");
    c.envs(environment(accel))
        .envs(super::kernel::environment(
            &crate::cache_dir::default_cache_dir(),
        ))
        .arg("--no-progress-bars");
    c
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
    fn quoting_keeps_one_argument() {
        assert_eq!(quote(b"/a b"), r#""/a b""#);
        assert_eq!(quote(br#"/it's "x"\y"#), r#""/it's \"x\"\\y""#);
        assert_eq!(quote(b"/caf\xe9\n"), r#""/caf\xe9\x0a""#);
    }

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
