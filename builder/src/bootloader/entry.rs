//! One version's boot entry, whatever the boot loader: what it boots and
//! with which command line.

use super::cmdline;
use crate::layout::{self, Version};

/// One boot menu entry: one deployed system version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub version: Version,
    pub root_device: String,
    pub has_initramfs: bool,
    pub kernel_args: String,
}

impl BootEntry {
    /// An entry for tests: version `label` from `root`, with or without an
    /// initramfs, with `args`.
    #[cfg(test)]
    pub(crate) fn for_test(label: &str, root: &str, initramfs: bool, args: &str) -> BootEntry {
        BootEntry {
            version: Version::new(label).unwrap(),
            root_device: root.into(),
            has_initramfs: initramfs,
            kernel_args: args.into(),
        }
    }

    /// The kernel command line; `strata test --boot direct` uses the same.
    pub fn append(&self) -> String {
        cmdline::compose(&self.root_device, &self.version, &self.kernel_args)
    }

    /// The entry `append` made for `version`, read back from its command
    /// line: the root device and the extra arguments. None when the line
    /// is not one `append` makes for `version` (another tool's menu, an
    /// entry booting another version).
    pub fn from_append(version: &Version, append: &str, has_initramfs: bool) -> Option<BootEntry> {
        Some(BootEntry {
            version: version.clone(),
            root_device: cmdline::root_device(append)?.to_owned(),
            has_initramfs,
            kernel_args: cmdline::strata_extra(append, version)?,
        })
    }

    /// The same entry booting through `systems/default`.
    pub fn via_default_link(&self) -> BootEntry {
        BootEntry {
            version: layout::via_default_link(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_from_their_command_line() {
        for e in [
            BootEntry::for_test("factory", "UUID=u", true, ""),
            BootEntry::for_test("v2", "/dev/vda", false, "quiet  loglevel=3"),
        ] {
            let back = BootEntry::from_append(&e.version, &e.append(), e.has_initramfs).unwrap();
            let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(back.root_device, e.root_device);
            assert_eq!(back.kernel_args, words(&e.kernel_args));
            assert_eq!(back.append(), words(&e.append()));
        }
        let v1 = Version::new("v1").unwrap();
        // Another version's line, another tool's line, no root.
        let other = BootEntry::for_test("v2", "/dev/vda", true, "");
        assert_eq!(BootEntry::from_append(&v1, &other.append(), true), None);
        assert_eq!(
            BootEntry::from_append(&v1, "root=/dev/sda1 ro quiet", true),
            None
        );
        assert_eq!(BootEntry::from_append(&v1, "quiet", true), None);
        assert_eq!(BootEntry::from_append(&v1, "", true), None);
    }
}
