//! The boot loader's side of an image, in one place: the kernel command
//! line (`cmdline`: composed and read with the kernel's rule), each
//! version's entry (`BootEntry`), which versions are whole and the entries
//! a menu gets (`entries`), and the menu format (`extlinux`).

pub mod cmdline;
mod entries;
mod entry;
pub mod extlinux;

pub use entries::{menu_entries, menu_entry, problems};
pub use entry::BootEntry;
