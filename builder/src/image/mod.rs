//! An existing image: opened read-only or read-write (`open`: superblock
//! check, loop device and mount, undone on drop), its layout read back
//! (versions, default, subvolumes, state dirs, boot entries) and its
//! mountpoints linted for hidden files. The data is `crate::model`, serialised as
//! `strata inspect --json`; rendering it is the CLI's business.
//!
//! - `open`: superblock, `Mode`, the `OpenImage` guard.
//! - `read`: the layout of a mounted top level; `lint`: hidden files.
//! - `appliance`: the read-only image served over FUSE by the libguestfs
//!   appliance, for a user who is not root.
//! - `subvolumes`: `btrfs subvolume list` and what an fstab entry mounts.
//! - what a menu's entry points at and boots is `bootloader::boot_entry`'s.
//!
//! Every path comes from `crate::layout`.

pub mod appliance;
mod error;
pub(crate) mod lint;
mod open;
mod read;
mod subvolumes;

pub use error::ImageError;
pub use open::{open, open_to_read, read_superblock, Mode, OpenImage};
pub use read::fstab as read_fstab;
/// The reader over a plain directory shaped like a top level, for tests of
/// what is built on it.
#[cfg(test)]
pub(crate) use read::layout as read_dir_layout;

use crate::host::interrupt::Interrupt;
use crate::model::{ImageLayout, Lint};
use std::path::Path;

/// The layout of the image at `path` (under its shared lock), read through a read-only mount (the
/// appliance's when not root: `open_to_read`).
pub fn read(path: &Path) -> Result<ImageLayout, ImageError> {
    read_with(path, &Interrupt::default())
}

/// `read`, stopped (`ImageError::Interrupted`) when `interrupt` is raised
/// while the appliance starts.
pub fn read_with(path: &Path, interrupt: &Interrupt) -> Result<ImageLayout, ImageError> {
    let _lock = crate::lock::ImageLock::shared(path)?;
    let image = open_to_read(path, interrupt)?;
    let layout = image.layout();
    image.close()?;
    Ok(layout)
}

/// The mountpoint lint of the image at `path`, through a read-only mount
/// (the appliance's when not root).
pub fn lint(path: &Path) -> Result<Lint, ImageError> {
    lint_with(path, &Interrupt::default())
}

/// `lint`, stopped when `interrupt` is raised while the appliance starts.
pub fn lint_with(path: &Path, interrupt: &Interrupt) -> Result<Lint, ImageError> {
    let _lock = crate::lock::ImageLock::shared(path)?;
    let image = open_to_read(path, interrupt)?;
    let lint = image.lint()?;
    image.close()?;
    Ok(lint)
}
