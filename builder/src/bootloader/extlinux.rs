//! `Extlinux`, the boot loader strata's images boot with, and its menu,
//! extlinux.conf, byte for byte as layout.md §4 and §6 give it.
//!
//! The menu's default entry boots THROUGH `systems/default` (kernel, initrd
//! and `rootflags=subvol=` all spelled `systems/default/…`), followed by one
//! entry per version for manual choice. So the commit point of an upgrade,
//! a rollback or a roll-forward is the one rename(2) that flips the link
//! (`boot::set_default`): syslinux and the kernel both follow it (measured,
//! layout.md §6).
//!
//! The `default` entry carries the default version's root device, extra
//! arguments and whether it has an initramfs. When every version agrees on
//! those, the menu text does not change on a flip. When they differ, the
//! menu must be rewritten too; the caller writes it first and flips last
//! (`versions::set_default`). A crash between the two leaves the `default`
//! entry booting the old version's kernel with the new version's root
//! device and arguments (and initrd line): the per-version entries stay
//! right, so the old version can be picked by hand, and re-running the
//! command completes the change.

use super::{BootEntry, Bootloader, Menu, MenuEntry};
use crate::host::cmd::{self, CmdError};
use crate::layout::{self, Version};
use std::path::Path;
use std::process::Command;

/// syslinux's extlinux, on the whole-disk btrfs.
#[derive(Debug, Clone, Copy)]
pub struct Extlinux;

impl Bootloader for Extlinux {
    fn config_path(&self) -> &'static str {
        layout::BOOT_MENU
    }

    /// syslinux 6.04 does not search `extlinux/` on its own (measured: "No
    /// configuration file found"); it follows the top-level link.
    fn config_link(&self) -> Option<(&'static str, &'static str)> {
        Some((layout::BOOT_MENU_LINK, layout::BOOT_MENU_LINK_TARGET))
    }

    fn render_menu(&self, default: &Version, entries: &[BootEntry]) -> String {
        render(default, entries)
    }

    fn read_menu(&self, text: &str) -> Menu {
        parse(text)
    }

    /// `extlinux --install` on the top level. Whole-disk btrfs: extlinux's
    /// boot sector is sector 0, so syslinux's mbr.bin must NOT be written
    /// there (it would make the image unbootable). The rootless build runs
    /// the same command in its appliance (`rootless::appliance`).
    fn install(&self, top: &Path) -> Result<(), CmdError> {
        cmd::run(Command::new("extlinux").arg("--install").arg(top)).map(drop)
    }
}

/// One `label` stanza for `entry`.
fn stanza(entry: &BootEntry, label: &str, s: &mut String) {
    s.push_str(&format!(
        "label {label}\n  kernel {}\n",
        layout::boot_kernel_path(&entry.version)
    ));
    if entry.has_initramfs {
        s.push_str(&format!(
            "  initrd {}\n",
            layout::boot_initramfs_path(&entry.version)
        ));
    }
    s.push_str(&format!("  append {}\n", entry.append()));
}

/// The whole menu: `default default`, the `default` entry booting through
/// `systems/default` with `default`'s root device, arguments and initramfs,
/// then one entry per version, in the order given. `default` must have an
/// entry (`boot::write_menu` refuses otherwise); without one the menu has no
/// `default` entry and syslinux boots the first.
pub fn render(default: &Version, entries: &[BootEntry]) -> String {
    let through_link = entries.iter().find(|e| &e.version == default);
    let mut s = String::from("serial 0 115200\n");
    if through_link.is_some() {
        s.push_str(&format!("default {}\n", layout::DEFAULT_ENTRY_LABEL));
    }
    s.push_str("timeout 10\n");
    if let Some(e) = through_link {
        stanza(&e.via_default_link(), layout::DEFAULT_ENTRY_LABEL, &mut s);
    }
    for e in entries {
        stanza(e, e.version.label(), &mut s);
    }
    s
}

/// Parses the subset of syslinux's config language a boot menu like ours
/// uses: global `default`/`timeout`, `label` stanzas with `kernel`/`linux`,
/// `initrd` and `append`. Keywords are case-insensitive, as in syslinux.
pub fn parse(text: &str) -> Menu {
    let mut config = Menu::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once([' ', '\t']) {
            Some((k, v)) => (k.to_ascii_lowercase(), v.trim().to_owned()),
            None => (line.to_ascii_lowercase(), String::new()),
        };
        match (key.as_str(), config.entries.last_mut()) {
            ("default", _) => config.default = Some(value),
            ("timeout", _) => config.timeout = Some(value),
            ("label", _) => config.entries.push(MenuEntry {
                label: value,
                kernel: None,
                initrd: None,
                append: None,
            }),
            ("kernel" | "linux", Some(e)) => e.kernel = Some(value),
            ("initrd", Some(e)) => e.initrd = Some(value),
            ("append", Some(e)) => {
                if e.initrd.is_none() {
                    e.initrd = value
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("initrd="))
                        .map(str::to_owned);
                }
                e.append = Some(value);
            }
            _ => {}
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_render_parses_back() {
        let factory = BootEntry::for_test("factory", "UUID=x", true, "quiet");
        let c = parse(&render(&factory.version, std::slice::from_ref(&factory)));
        assert_eq!(c.timeout.as_deref(), Some("10"));
        // syslinux boots the entry going through the link...
        let d = c.default_entry().unwrap();
        assert_eq!(d.label, "default");
        assert_eq!(d.kernel.as_deref(), Some("/systems/default/kernel"));
        assert_eq!(d.initrd.as_deref(), Some("/systems/default/initramfs"));
        assert_eq!(d.cmdline(), factory.via_default_link().append());
        assert!(d
            .cmdline()
            .contains("rootflags=subvol=systems/default/run "));
        // ...and the version's own entry is there to pick by hand.
        let own = &c.entries[1];
        assert_eq!(own.label, "factory");
        assert_eq!(own.kernel.as_deref(), Some("/systems/factory/kernel"));
        assert_eq!(own.cmdline(), factory.append());
    }

    /// One version: byte for byte what every build writes
    /// (tests/snapshots/build__extlinux.conf.snap).
    #[test]
    fn one_version_menu() {
        let e = BootEntry::for_test(
            "factory",
            "UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40",
            true,
            "quiet",
        );
        assert_eq!(
            render(&e.version, std::slice::from_ref(&e)),
            "serial 0 115200\n\
             default default\n\
             timeout 10\n\
             label default\n\
             \x20 kernel /systems/default/kernel\n\
             \x20 initrd /systems/default/initramfs\n\
             \x20 append root=UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40 rootfstype=btrfs rootflags=subvol=systems/default/run init=/sbin/init rw console=tty0 console=ttyS0,115200 quiet\n\
             label factory\n\
             \x20 kernel /systems/factory/kernel\n\
             \x20 initrd /systems/factory/initramfs\n\
             \x20 append root=UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40 rootfstype=btrfs rootflags=subvol=systems/factory/run init=/sbin/init rw console=tty0 console=ttyS0,115200 quiet\n"
        );
    }

    /// Two versions after an upgrade: the `default` entry with v2's root
    /// device, arguments and (no) initramfs, then one stanza each, in the
    /// order given.
    #[test]
    fn two_version_menu() {
        let factory = BootEntry::for_test(
            "factory",
            "UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40",
            true,
            "",
        );
        let v2 = BootEntry::for_test("v2", "/dev/vda", false, "quiet loglevel=3");
        insta::assert_snapshot!(render(&v2.version, &[factory, v2.clone()]));
    }

    /// The commit point: versions that agree on root device, arguments and
    /// initramfs give one menu whichever is the default, so flipping
    /// `systems/default` is the whole change.
    #[test]
    fn a_flip_between_alike_versions_leaves_the_menu_as_it_is() {
        let a = BootEntry::for_test("factory", "UUID=u", true, "quiet");
        let b = BootEntry::for_test("v2", "UUID=u", true, "quiet");
        let both = [a.clone(), b.clone()];
        assert_eq!(render(&a.version, &both), render(&b.version, &both));
        // Different arguments: the `default` entry follows the default.
        let c = BootEntry::for_test("v3", "UUID=u", true, "quiet debug");
        let all = [a.clone(), c.clone()];
        assert_ne!(render(&a.version, &all), render(&c.version, &all));
    }

    /// Through the trait (as a `dyn`, as a second loader would be used):
    /// the menu strata writes and reads back.
    #[test]
    fn extlinux_is_the_bootloader_of_this_format() {
        let e = BootEntry::for_test("factory", "UUID=u", true, "");
        let b: &dyn Bootloader = &Extlinux;
        let text = b.render_menu(&e.version, std::slice::from_ref(&e));
        assert_eq!(text, render(&e.version, std::slice::from_ref(&e)));
        assert_eq!(b.read_menu(&text), parse(&text));
        assert_eq!(b.config_path(), layout::BOOT_MENU);
        let (link, target) = b.config_link().unwrap();
        assert_eq!(
            std::path::Path::new(link)
                .parent()
                .unwrap()
                .join(target)
                .as_path(),
            std::path::Path::new(b.config_path())
        );
    }

    #[test]
    fn syslinux_spellings() {
        let c = parse(
            "DEFAULT b\nLABEL a\n  LINUX /a\nlabel b\n\tkernel /b\n\tappend initrd=/b.img root=/dev/vda rw\n",
        );
        let d = c.default_entry().unwrap();
        assert_eq!(d.label, "b");
        assert_eq!(d.initrd.as_deref(), Some("/b.img"));
        assert_eq!(d.cmdline(), "root=/dev/vda rw");
        assert_eq!(c.entries[0].kernel.as_deref(), Some("/a"));
        assert_eq!(parse("label x\n").default_entry().unwrap().label, "x");
    }
}
