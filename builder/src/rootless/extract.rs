//! The rootfs into the staging directory, inside the user namespace. mknod
//! is refused there, so device nodes are not created but listed (with
//! their attributes) for the appliance.
//!
//! An archive goes through `rootfs_tar::extract` (`DeviceNodes::Skip`). A
//! directory is streamed through GNU tar (cp would fail on the first device
//! node): its device nodes are found by a walk and excluded by name.

use super::wire::DeviceNode;
use crate::error::{Context, StepError};
use crate::host::cmd::{self, CmdError};
use crate::host::interrupt::Interrupt;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// GNU tar's flags that keep every attribute the layout contract lists.
const KEEP: [&str; 5] = [
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
];

/// The device nodes under `root` (paths relative to it), without crossing
/// into other filesystems (the walk `cp --one-file-system` makes). A node
/// whose name cannot be listed is refused (`device_name`).
pub fn devices_in_dir(root: &Path) -> Result<Vec<DeviceNode>, StepError> {
    walk(root, root).context(|| format!("reading rootfs {}", root.display()))?
}

/// The name of a device node (relative to the rootfs `shown`) as the
/// appliance gets it: UTF-8 (the request is JSON) and without a newline
/// (the tar exclude list and the guestfish script are line-based). Any
/// other name is refused rather than created under a mangled one.
pub fn device_name(rel: &Path, shown: &Path) -> Result<String, StepError> {
    match rel.to_str() {
        Some(name) if !name.contains('\n') => Ok(name.to_owned()),
        _ => Err(StepError::input(format!(
            "rootfs {}: device node {:?} has a name that is not UTF-8 or contains a newline, which the rootless build cannot hand to its appliance VM: rename or remove it (or build as root with --backend privileged)",
            shown.display(),
            rel.as_os_str()
        ))),
    }
}

/// The walk; the outer result is reading, the inner one the names.
fn walk(root: &Path, shown: &Path) -> std::io::Result<Result<Vec<DeviceNode>, StepError>> {
    let dev = std::fs::symlink_metadata(root)?.dev();
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            let t = m.file_type();
            if t.is_dir() && m.dev() == dev {
                stack.push(entry.path());
            } else if t.is_char_device() || t.is_block_device() {
                let rel = entry.path();
                let rel = rel.strip_prefix(root).expect("under root");
                let path = match device_name(rel, shown) {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(e)),
                };
                out.push(DeviceNode {
                    path,
                    block: t.is_block_device(),
                    mode: m.mode() & 0o7777,
                    major: rustix::fs::major(m.rdev()),
                    minor: rustix::fs::minor(m.rdev()),
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: Some(m.mtime()),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Ok(out))
}

/// Fills `dest` (an existing empty directory) from the directory `rootfs`,
/// leaving out `devices` (found by `devices_in_dir`).
pub fn extract(
    rootfs: &Path,
    dest: &Path,
    devices: &[DeviceNode],
    interrupt: &Interrupt,
) -> Result<(), CmdError> {
    let mut excludes = tempfile::NamedTempFile::new().map_err(|source| CmdError::Spawn {
        program: "tar".into(),
        source,
    })?;
    for d in devices {
        writeln!(excludes, "./{}", d.path).map_err(|source| CmdError::Spawn {
            program: "tar".into(),
            source,
        })?;
    }
    let keep = KEEP.join(" ");
    // --no-wildcards --anchored: the list holds exact member names.
    let extract = format!(
        "tar --extract --same-owner --same-permissions {keep} --no-wildcards --anchored --exclude-from \"$2\" --directory \"$3\""
    );
    let script = format!(
        "set -o pipefail; tar --create --one-file-system {keep} --no-wildcards --anchored --exclude-from \"$2\" --directory \"$1\" --file - . | {extract} --file -"
    );
    cmd::run_interruptible(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("strata-extract")
            .arg(rootfs)
            .arg(excludes.path())
            .arg(dest),
        interrupt,
        &mut |_| {},
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::interrupt::Interrupt;

    #[test]
    fn a_directory_is_staged_without_its_device_nodes_which_are_listed() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        std::fs::create_dir_all(src.join("dev")).unwrap();
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(src.join("etc/hostname"), "h\n").unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", src.join("dev/fd")).unwrap();
        let mut devices = devices_in_dir(&src).unwrap();
        // Test runs as root: a real node (else only the walk is checked).
        let made = std::process::Command::new("mknod")
            .arg(src.join("dev/null"))
            .args(["c", "1", "3"])
            .status()
            .is_ok_and(|s| s.success());
        if made {
            devices = devices_in_dir(&src).unwrap();
            assert_eq!(devices.len(), 1);
            assert_eq!(devices[0].path, "dev/null");
            assert_eq!((devices[0].major, devices[0].minor), (1, 3));
        }
        extract(&src, &dest, &devices, &Interrupt::default()).unwrap();
        assert_eq!(std::fs::read(dest.join("etc/hostname")).unwrap(), b"h\n");
        assert!(dest.join("dev/fd").symlink_metadata().unwrap().is_symlink());
        assert!(dest.join("dev/null").symlink_metadata().is_err());
    }

    #[test]
    fn device_names_that_cannot_be_listed_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let shown = Path::new("/r");
        assert_eq!(
            device_name(Path::new("dev/null"), shown).unwrap(),
            "dev/null"
        );
        for bad in [&b"dev/a\nb"[..], b"dev/\xff"] {
            let rel = Path::new(std::ffi::OsStr::from_bytes(bad));
            match device_name(rel, shown) {
                Err(StepError::Input(m)) => {
                    assert!(m.starts_with("rootfs /r: device node \"dev/"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
