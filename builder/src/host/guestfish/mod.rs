//! libguestfs's appliance, as both appliances of strata use it: the
//! rootless build's (`rootless::appliance`: device nodes, the `run`
//! snapshot, extlinux) and the rootless inspect's (`image::appliance`: the
//! image served read-only over FUSE). This module owns the guestfish
//! script as data (`Cmd`) and its quoting (double quotes, backslash
//! escapes, so a path with spaces or quotes stays one argument), the
//! command line and environment, and what the host must have for it.

pub mod kernel;

use std::path::PathBuf;
use std::process::Command;

/// How the appliance VM runs: `--appliance-accel` (`tcg`, `kvm`); `help =
/// None` keeps the variant's docs out of `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Accel {
    /// Software emulation: slower, works everywhere (the default: KVM hangs
    /// on some hosts).
    #[default]
    #[value(help = None::<&str>)]
    Tcg,
    Kvm,
}

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
        .envs(kernel::environment(
            &crate::host::cache_dir::default_cache_dir(),
        ))
        .arg("--no-progress-bars");
    c
}

/// A program on PATH.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// guestfish and a kernel it can read for its appliance; /dev/kvm for KVM.
/// What is missing and how to get it, for the caller to prefix with what
/// it was doing (a rootless build, a rootless inspect).
pub fn missing(accel: Accel) -> Option<String> {
    if on_path("guestfish").is_none() {
        return Some(
            "guestfish not found: install libguestfs-tools (the appliance VM that works on the image without root)".into(),
        );
    }
    let readable_kernel = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .any(|e| std::fs::File::open(e.path()).is_ok());
    if !readable_kernel {
        return Some(
            "no readable /boot/vmlinuz-* for the libguestfs appliance: install a kernel (Debian: linux-image-amd64) and make it readable (chmod 0644 /boot/vmlinuz-*)".into(),
        );
    }
    if accel == Accel::Kvm
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        return Some(
            "--accel kvm but /dev/kvm cannot be opened: add the user to group kvm, or use TCG"
                .into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_one_argument() {
        assert_eq!(quote(b"/a b"), r#""/a b""#);
        assert_eq!(quote(br#"/it's "x"\y"#), r#""/it's \"x\"\\y""#);
        assert_eq!(quote(b"/caf\xe9\n"), r#""/caf\xe9\x0a""#);
    }
}
