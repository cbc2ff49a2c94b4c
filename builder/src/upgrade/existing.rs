//! The versions already on the image, as they boot today (their menu
//! entries are `bootloader::menu_entries`'): the kernel arguments the new
//! version keeps from the one it starts from and, for an image without a
//! manifest, their records read off the image.

use crate::bootloader::BootEntry;
use crate::layout::{self, Version};
use crate::manifest::{Deployment, StateDirs, VersionRecord};
use crate::model;

/// The new version's extra kernel arguments: `--kernel-args` when given
/// (empty meaning none), else those of the version the upgrade starts from
/// (`old`, as it boots today), so that what the build was given survives
/// upgrades that do not mention it.
pub(super) fn new_kernel_args(given: Option<&str>, entries: &[BootEntry], old: &Version) -> String {
    match given {
        Some(args) => args.trim().to_owned(),
        None => entries
            .iter()
            .find(|e| e.version.label() == old.label())
            .map(|e| e.kernel_args.clone())
            .unwrap_or_default(),
    }
}

/// A manifest record for a version read off the image (no manifest):
/// what the image shows. What it cannot show is marked unknown: how its
/// state was migrated, where its kernel came from, the files it moved.
pub(super) fn record_from_image(layout: &model::ImageLayout, entry: &BootEntry) -> VersionRecord {
    let label = entry.version.label();
    let info = layout.versions.iter().find(|v| v.label == label);
    let fstab = info.and_then(|v| v.fstab.as_ref());
    // The state dirs its orig's fstab mounts, in fstab order.
    let mut created: Vec<String> = Vec::new();
    for m in fstab
        .iter()
        .flat_map(|f| &f.lines)
        .filter_map(|l| l.mount.as_ref())
    {
        let by = format!("{label}/{}: {}", layout::Tree::Orig.name(), m.target);
        if let Some(s) = layout
            .state_dirs
            .iter()
            .find(|s| s.mounted_by.contains(&by))
        {
            if !created.contains(&s.name) {
                created.push(s.name.clone());
            }
        }
    }
    let fstab_lines_added = fstab
        .map(|f| {
            f.lines
                .iter()
                .filter(|l| l.added && l.mount.is_some())
                .map(|l| l.text.clone())
                .collect()
        })
        .unwrap_or_default();
    VersionRecord {
        label: label.to_owned(),
        deployed_by: Deployment::Build,
        based_on: None,
        deployed_at: 0,
        root_device: entry.root_device.clone(),
        state_dirs: StateDirs {
            created,
            skipped: Vec::new(),
        },
        fstab_lines_added,
        state_migration: "unknown".to_owned(),
        state_data: None,
        moved_files: Vec::new(),
        kernel: entry.version.kernel(),
        initramfs: entry.has_initramfs.then(|| entry.version.initramfs()),
        kernel_source: "unknown (read off the image)".to_owned(),
        initramfs_source: None,
        kernel_args: entry.append(),
        timings: Vec::new(),
        backend: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_version_keeps_the_old_ones_args_unless_given() {
        let entry = |label: &str, args: &str| BootEntry {
            version: Version::new(label).unwrap(),
            root_device: "UUID=abc".into(),
            has_initramfs: true,
            kernel_args: args.into(),
        };
        let entries = [
            entry("factory", "console=ttyS0 quiet"),
            entry("v2", "debug"),
        ];
        let factory = Version::new("factory").unwrap();
        // Not given: the old default's, not another version's.
        assert_eq!(
            new_kernel_args(None, &entries, &factory),
            "console=ttyS0 quiet"
        );
        assert_eq!(
            new_kernel_args(None, &entries, &Version::new("v2").unwrap()),
            "debug"
        );
        // Given: they replace the old ones; empty means none.
        assert_eq!(
            new_kernel_args(Some("loglevel=3"), &entries, &factory),
            "loglevel=3"
        );
        assert_eq!(new_kernel_args(Some(""), &entries, &factory), "");
        // An old default without an entry (cannot happen: it is whole): none.
        assert_eq!(new_kernel_args(None, &[], &factory), "");
    }
}
