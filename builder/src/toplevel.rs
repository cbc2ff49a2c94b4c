//! The seam between deploying a version and the filesystem it lands on.
//!
//! `deploy` and `build` do the layout's steps (orig, copy, fstab, state,
//! run snapshot, kernel, menu, default, bootloader) through this trait, so
//! one implementation of the layout drives both backends:
//!
//! - [`Mounted`]: the image's top level (subvolid=5) mounted on the host;
//!   subvolumes and snapshots are made at once with btrfs-progs (the
//!   privileged build and every upgrade).
//! - `rootless::staging::Staging`: a plain directory that becomes the
//!   image through `mkfs.btrfs --rootdir`; what needs a mounted btrfs (the
//!   run snapshot, extlinux) is recorded for the appliance VM.

use crate::bootloader::{Bootloader, BOOTLOADER};
use crate::error::BoxError;
use crate::host::btrfs;
use std::path::Path;

/// Where a version is deployed: a directory that is (or becomes) the top
/// level of the image. Paths are relative to it (`layout` names them).
pub trait TopLevel {
    /// The directory the layout's files are written under.
    fn path(&self) -> &Path;
    /// A new, empty subvolume at `rel`.
    fn create_subvolume(&mut self, rel: &str) -> Result<(), BoxError>;
    /// A writable snapshot of the subvolume `from` as `to`.
    fn snapshot(&mut self, from: &str, to: &str) -> Result<(), BoxError>;
    /// The bootloader for the whole image (`Bootloader::install`).
    fn install_bootloader(&mut self) -> Result<(), BoxError>;
    /// Whether moving state may clone extents (`cp --reflink=always`): true
    /// on btrfs; a staging directory on another filesystem copies bytes
    /// where it cannot clone them.
    fn clones_extents(&self) -> bool;
}

/// An image whose top level is mounted at `top`: everything happens now.
pub struct Mounted<'a> {
    top: &'a Path,
}

impl<'a> Mounted<'a> {
    pub fn new(top: &'a Path) -> Self {
        Mounted { top }
    }
}

impl TopLevel for Mounted<'_> {
    fn path(&self) -> &Path {
        self.top
    }

    fn create_subvolume(&mut self, rel: &str) -> Result<(), BoxError> {
        Ok(btrfs::subvolume_create(&self.top.join(rel))?)
    }

    fn snapshot(&mut self, from: &str, to: &str) -> Result<(), BoxError> {
        Ok(btrfs::snapshot(&self.top.join(from), &self.top.join(to))?)
    }

    fn install_bootloader(&mut self) -> Result<(), BoxError> {
        Ok(BOOTLOADER.install(self.top)?)
    }

    fn clones_extents(&self) -> bool {
        true
    }
}
