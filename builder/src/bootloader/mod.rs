//! The boot loader's side of an image, in one place: the kernel command
//! line (`cmdline`: composed and read with the kernel's rule), each
//! version's entry (`BootEntry`), which versions are whole and the entries
//! a menu gets (`entries`), and the boot loader itself behind
//! `Bootloader`, whose one implementation is `Extlinux` (`extlinux`).
//!
//! Only what differs between boot loaders is behind the trait; the
//! command line, the entries and which versions are whole do not depend on
//! the loader that boots them.

pub mod boot_entry;
pub mod cmdline;
mod entries;
mod entry;
pub mod extlinux;
mod menu;

pub use entries::{image_root_device, menu_entries, menu_entry, problems};
pub use entry::BootEntry;
pub use extlinux::Extlinux;
pub use menu::{Menu, MenuEntry};

use crate::host::cmd::CmdError;
use crate::layout::Version;
use std::path::Path;

/// What strata needs of a boot loader. A second one (systemd-boot or GRUB
/// on an ESP, for UEFI) is one more implementation of this.
pub trait Bootloader {
    /// Where strata writes the menu, from the top level.
    fn config_path(&self) -> &'static str;
    /// A link the loader reads the menu through, from the top level, and
    /// its target (a path relative to the link's directory); None when the
    /// loader reads `config_path` itself.
    fn config_link(&self) -> Option<(&'static str, &'static str)>;
    /// The menu text: one entry per version, `default` booted unless
    /// another is picked.
    fn render_menu(&self, default: &Version, entries: &[BootEntry]) -> String;
    /// A menu in this loader's format read back, from any image.
    fn read_menu(&self, text: &str) -> Menu;
    /// Makes the image whose top level is mounted at `top` boot with this
    /// loader.
    fn install(&self, top: &Path) -> Result<(), CmdError>;
}

/// The boot loader strata's images boot with.
pub const BOOTLOADER: Extlinux = Extlinux;
