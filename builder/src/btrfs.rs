//! The btrfs operations a layout needs, through btrfs-progs.

use crate::cmd::{self, CmdError};
use std::path::Path;
use std::process::Command;

pub fn mkfs(image: &Path, label: &str, uuid: &str) -> Result<(), CmdError> {
    // Plain defaults: syslinux 6.04 reads them. Never enable compression:
    // syslinux cannot read compressed extents.
    cmd::run(
        Command::new("mkfs.btrfs")
            .args(["--quiet", "--label", label, "--uuid", uuid])
            .arg(image),
    )
    .map(drop)
}

pub fn subvolume_create(path: &Path) -> Result<(), CmdError> {
    cmd::run(
        Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(path),
    )
    .map(drop)
}

/// A writable snapshot (run is mounted read-write as /).
pub fn snapshot(source: &Path, dest: &Path) -> Result<(), CmdError> {
    cmd::run(
        Command::new("btrfs")
            .args(["-q", "subvolume", "snapshot"])
            .arg(source)
            .arg(dest),
    )
    .map(drop)
}

/// Deletes a subvolume (it must hold no other subvolume). Its space is
/// reclaimed in the background.
pub fn subvolume_delete(path: &Path) -> Result<(), CmdError> {
    cmd::run(
        Command::new("btrfs")
            .args(["-q", "subvolume", "delete"])
            .arg(path),
    )
    .map(drop)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeInfo {
    pub uuid: String,
    /// "-" when the subvolume is not a snapshot.
    pub parent_uuid: String,
    pub id: u64,
}

pub fn subvolume_show(path: &Path) -> Result<SubvolumeInfo, CmdError> {
    let out = cmd::run(Command::new("btrfs").args(["subvolume", "show"]).arg(path))?;
    let field = |name: &str| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .next()
            .unwrap_or_default()
    };
    Ok(SubvolumeInfo {
        uuid: field("UUID:"),
        parent_uuid: field("Parent UUID:"),
        id: field("Subvolume ID:").parse().unwrap_or(0),
    })
}

pub fn sync(path: &Path) -> Result<(), CmdError> {
    cmd::run(Command::new("btrfs").args(["filesystem", "sync"]).arg(path)).map(drop)
}
