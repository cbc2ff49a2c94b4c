//! `systems/.strata-partial-<label>`: where an upgrade assembles a version,
//! and its removal (undo on failure, debris of a killed run).

use crate::host::btrfs;
use crate::layout::{self, Version};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Partial version directories in `systems/`.
pub(super) fn partial_dirs(top: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(top.join(layout::SYSTEMS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| layout::is_partial_name(n))
        .collect();
    names.sort();
    names
}

/// The subvolumes an upgrade makes in its partial directory, those that
/// exist (a subvolume's root directory has inode number 256).
pub(super) fn own_subvolumes(top: &Path, partial: &Version) -> Vec<String> {
    [partial.run(), partial.orig()]
        .into_iter()
        .filter(|p| fs::symlink_metadata(top.join(p)).is_ok_and(|m| m.is_dir() && m.ino() == 256))
        .collect()
}

/// Deletes `rel` (a partial version directory) and the subvolumes in it
/// (of `subvolumes`, image-relative paths), nested ones first.
pub(super) fn remove_partial(top: &Path, rel: &str, subvolumes: &[String]) -> std::io::Result<()> {
    let dir = top.join(rel);
    if dir.symlink_metadata().is_err() {
        return Ok(());
    }
    let prefix = format!("{rel}/");
    let mut inside: Vec<&String> = subvolumes
        .iter()
        .filter(|p| p.starts_with(&prefix))
        .collect();
    inside.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for p in inside {
        let path = top.join(p);
        if path.symlink_metadata().is_ok() {
            btrfs::subvolume_delete(&[&path]).map_err(std::io::Error::other)?;
        }
    }
    fs::remove_dir_all(&dir)
}
