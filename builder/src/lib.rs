//! Plans and builds Btrfs "system layout" raw disk images.
//!
//! Planning (`fstab`, `plan`, `bootloader`) is pure and tested with snapshots;
//! doing (`build` and the modules it drives) touches disks, mounts and loop
//! devices and always cleans up after itself.

pub mod boot;
pub mod bootloader;
pub mod build;
pub mod copy;
pub mod deploy;
pub mod du;
pub mod error;
pub mod etcfile;
pub mod expect;
pub mod extents;
pub mod fixture;
pub mod fstab;
pub mod host;
pub mod image;
pub mod kernel;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod migrate;
pub mod model;
pub mod octal;
pub mod pathenc;
pub mod plan;
pub mod progress;
pub mod rootfs;
pub mod rootfs_tar;
pub mod rootless;
pub mod running;
pub mod size;
pub mod steps;
pub mod sync;
pub mod toplevel;
pub mod unshared;
pub mod upgrade;
pub mod versions;
