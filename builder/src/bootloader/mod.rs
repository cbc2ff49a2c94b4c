//! The boot loader's side of an image, in one place: the kernel command
//! line (`cmdline`: composed and read with the kernel's rule), each
//! version's entry (`BootEntry`) and the menu format (`extlinux`).

pub mod cmdline;
mod entry;
pub mod extlinux;

pub use entry::BootEntry;
