//! Plans and builds Btrfs "system layout" raw disk images.
//!
//! Planning (`fstab`, `plan`, `extlinux`) is pure and tested with snapshots;
//! doing (`build` and the modules it drives) touches disks, mounts and loop
//! devices and always cleans up after itself.

pub mod cmd;
pub mod fstab;
pub mod loopdev;
pub mod manifest;
pub mod mount;
pub mod extlinux;
pub mod plan;
pub mod size;
