//! Reading boot entries off an image: where their paths point and which
//! version they boot. Paths are the boot loader's: absolute ones from the
//! top level (syslinux's root), relative ones from the menu's directory,
//! and `systems/default` followed to the version it names (layout.md §6:
//! an entry may say `kernel /systems/default/kernel`,
//! `rootflags=subvol=systems/default/run`).

use crate::bootloader::cmdline;
use crate::layout::{self, Version};
use std::path::Path;

/// The label a stored `systems/default` target names for a boot loader.
/// Its root is the top level, so an absolute `/systems/v2` names `v2` here
/// too (the reader still reports it: inside the booted system it resolves
/// elsewhere).
pub fn default_label(target: &Path) -> Option<String> {
    layout::label_of_default_target(target.strip_prefix("/").unwrap_or(target))
}

/// Where a path written in the menu at `config` (relative to the top
/// level, e.g. `extlinux/extlinux.conf`) points, relative to the top level
/// and with `systems/default` resolved through `default_label`. None when
/// it goes through the link and the link names no version, or climbs out
/// of the top level.
pub fn resolve(config: &str, path: &str, default_label: Option<&str>) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    let from_config = match path.strip_prefix('/') {
        Some(_) => None,
        None => Path::new(config).parent().and_then(Path::to_str),
    };
    for part in from_config
        .into_iter()
        .chain([path])
        .flat_map(|p| p.split('/'))
    {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    layout::resolve_default_link(&parts.join("/"), default_label)
}

/// The version an entry boots: the one whose `run` its
/// `rootflags=subvol=` names (through `systems/default` too). None when it
/// names none, or no subvolume at all (the root is then whatever the
/// filesystem's default subvolume is).
pub fn version_booted(append: Option<&str>, default_label: Option<&str>) -> Option<String> {
    let subvol = cmdline::root_subvol(append?)?;
    let path = layout::resolve_default_link(subvol.trim_matches('/'), default_label)?;
    let (label, _) = layout::split_version_path(&path)?;
    (Version::found(label).run() == path).then(|| label.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_like_the_boot_loader() {
        let menu = layout::BOOT_MENU;
        assert_eq!(
            resolve(menu, "/systems/v1/kernel", None).as_deref(),
            Some("systems/v1/kernel")
        );
        // Relative to the menu's directory, `..` included.
        assert_eq!(
            resolve(menu, "vmlinuz", None).as_deref(),
            Some("extlinux/vmlinuz")
        );
        assert_eq!(
            resolve(menu, "../systems/v1/kernel", None).as_deref(),
            Some("systems/v1/kernel")
        );
        assert_eq!(
            resolve(layout::BOOT_MENU_LINK, "vmlinuz", None).as_deref(),
            Some("vmlinuz")
        );
        assert_eq!(resolve(layout::BOOT_MENU_LINK, "../vmlinuz", None), None);
        // Through the default link.
        assert_eq!(
            resolve(menu, "/systems/default/kernel", Some("v2")).as_deref(),
            Some("systems/v2/kernel")
        );
        assert_eq!(
            resolve(menu, "../systems/default/initramfs", Some("v2")).as_deref(),
            Some("systems/v2/initramfs")
        );
        assert_eq!(resolve(menu, "/systems/default/kernel", None), None);
    }

    #[test]
    fn the_version_an_entry_boots() {
        let boots = |append: &str, default| version_booted(Some(append), default);
        assert_eq!(
            boots("root=/dev/vda rootflags=subvol=systems/v1/run rw", None).as_deref(),
            Some("v1")
        );
        assert_eq!(
            boots(
                "rootflags=compress=zstd,subvol=/systems/default/run/",
                Some("v2")
            )
            .as_deref(),
            Some("v2")
        );
        assert_eq!(boots("rootflags=subvol=systems/default/run", None), None);
        assert_eq!(boots("rootflags=subvol=systems/v1/orig", None), None);
        assert_eq!(boots("rootflags=subvol=@", None), None);
        assert_eq!(boots("root=/dev/vda rw", None), None);
        assert_eq!(version_booted(None, Some("v2")), None);
    }

    #[test]
    fn default_link_as_the_boot_loader_follows_it() {
        assert_eq!(default_label(Path::new("v2")).as_deref(), Some("v2"));
        assert_eq!(
            default_label(Path::new("/systems/v2")).as_deref(),
            Some("v2")
        );
        assert_eq!(default_label(Path::new("a/b/c")), None);
    }
}
