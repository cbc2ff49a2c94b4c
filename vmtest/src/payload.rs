//! The payload disk: what the host hands a guest that has no network (an
//! in-guest upgrade's strata binary and new rootfs) as a second, read-only
//! virtio disk (`QemuCommand::payload`). An ext4 filesystem written by
//! `mke2fs -d` from a staging directory: no mount, no loop device, owners
//! and modes kept. The guest mounts it read-only at [`GUEST_DIR`].

use std::path::{Path, PathBuf};
use std::process::Command;
use strata_builder::host::cmd;

/// Where the guest mounts the payload.
pub const GUEST_DIR: &str = "/run/strata-payload";

/// The guest command that mounts the payload (idempotent).
pub fn mount_command() -> String {
    format!(
        "mkdir -p {GUEST_DIR} && {{ mountpoint -q {GUEST_DIR} || mount -o ro /dev/disk/by-id/virtio-{} {GUEST_DIR}; }}",
        crate::qemu::PAYLOAD_SERIAL
    )
}

/// Headroom over the staged bytes: ext4's metadata, inode tables, journal.
const SLACK_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("payload: {0}")]
    Cmd(#[from] cmd::CmdError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PayloadError + '_ {
    move |source| PayloadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `disk`: an ext4 filesystem holding each `(name, host path)` of
/// `entries` at its top (a file or a whole directory tree), staged in
/// `staging` (reflinked or copied there: the host paths are only read).
/// The entry named `program` is an executable staged without its debug
/// sections when `objcopy` can (a debug build of strata is 140 MB, a
/// tenth of that without them, and every boot after a power cut reads it
/// cold through an emulated disk); otherwise as it is.
pub fn make(
    disk: &Path,
    staging: &Path,
    entries: &[(&str, &Path)],
    program: &str,
) -> Result<(), PayloadError> {
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let mut bytes = 0;
    for (name, from) in entries {
        let to = staging.join(name);
        if *name == program
            && cmd::run(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(from)
                    .arg(&to),
            )
            .is_ok()
        {
            bytes += du_bytes(&to)?;
            continue;
        }
        let _ = std::fs::remove_file(&to);
        // Hard links where the staging dir shares the source's filesystem
        // (mke2fs only reads them), else a copy.
        let linked = cmd::run(
            Command::new("cp")
                .args(["-a", "--link", "--"])
                .arg(from)
                .arg(&to),
        );
        if linked.is_err() {
            let _ = std::fs::remove_dir_all(&to);
            let _ = std::fs::remove_file(&to);
            cmd::run(
                Command::new("cp")
                    .args(["-a", "--reflink=auto", "--"])
                    .arg(from)
                    .arg(&to),
            )?;
        }
        bytes += du_bytes(&to)?;
    }
    let size = bytes + bytes / 5 + SLACK_BYTES;
    let _ = std::fs::remove_file(disk);
    let f = std::fs::File::create(disk).map_err(io(disk))?;
    f.set_len(size).map_err(io(disk))?;
    drop(f);
    cmd::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "strata-payload", "-d"])
            .arg(staging)
            .arg(disk),
    )?;
    let _ = std::fs::remove_dir_all(staging);
    Ok(())
}

/// Apparent bytes under `path` (`du -sb`).
fn du_bytes(path: &Path) -> Result<u64, PayloadError> {
    let out = cmd::run(Command::new("du").args(["-sb", "--"]).arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ext4 image, read back with debugfs (no mount): the staged
    /// file and directory are there with their contents.
    #[test]
    fn the_payload_holds_what_was_staged() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("tool");
        std::fs::write(&bin, b"#!/bin/sh\necho hi\n").unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/marker"), b"v2\n").unwrap();
        let disk = dir.path().join("payload.img");
        make(
            &disk,
            &dir.path().join("staging"),
            &[("strata", &bin), ("rootfs", &tree)],
            "strata",
        )
        .unwrap();
        let cat = |p: &str| {
            let out = Command::new("debugfs")
                .args(["-R", &format!("cat {p}")])
                .arg(&disk)
                .output()
                .expect("debugfs (e2fsprogs)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(cat("/rootfs/etc/marker"), "v2\n");
        assert!(cat("/strata").contains("echo hi"));
        assert!(mount_command().contains("virtio-strata-payload"));
    }
}
