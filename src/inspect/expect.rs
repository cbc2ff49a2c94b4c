//! What `strata test` should expect of an image it has no build manifest
//! for (one built by someone else): read off the image itself. There is no
//! list of moved files, so `moved-files` checks only that the mountpoints
//! are empty.

use super::model::Layout;
use strata_builder::manifest::{Manifest, StateDirs, MANIFEST_VERSION};
use strata_builder::plan::{validate_label, validate_state_dir, DEFAULT_STATE_DIRS};

/// The `state_migration` of a manifest derived from an image.
pub const UNKNOWN_MIGRATION: &str = "unknown (no build manifest: read from the image)";

pub fn manifest_from_layout(layout: &Layout, image_size: u64) -> Result<Manifest, String> {
    let label = layout.default.version.clone().ok_or_else(|| {
        format!(
            "{}: no build manifest, and no systems/default pointing at a version to read expectations from",
            layout.image
        )
    })?;
    // The names end up in guest shell scripts and paths: hold them to the
    // same rules strata builds with.
    validate_label(&label).map_err(|e| format!("{}: systems/default: {e}", layout.image))?;
    for d in layout.state_dirs.iter().filter(|d| d.subvolume.is_some()) {
        validate_state_dir(&d.name).map_err(|e| format!("{}: state/: {e}", layout.image))?;
    }
    // Every state subvolume present is expected to be mounted, whatever the
    // (possibly broken) fstab says: that is what the checks are for.
    let mut created: Vec<String> = layout
        .state_dirs
        .iter()
        .filter(|d| d.subvolume.is_some())
        .map(|d| d.name.clone())
        .collect();
    let rank = |n: &String| {
        DEFAULT_STATE_DIRS
            .iter()
            .position(|d| d == n)
            .unwrap_or(DEFAULT_STATE_DIRS.len())
    };
    created.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let entry = layout
        .boot
        .as_ref()
        .and_then(|b| b.entries.iter().find(|e| e.label == label));
    let append = entry.and_then(|e| e.append.clone()).unwrap_or_default();
    let root_device = append
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root="))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("UUID={}", layout.filesystem.uuid));
    Ok(Manifest {
        manifest_version: MANIFEST_VERSION,
        label: label.clone(),
        fs_uuid: layout.filesystem.uuid.clone(),
        root_device,
        state_dirs: StateDirs {
            created,
            skipped: Vec::new(),
        },
        fstab_lines_added: Vec::new(),
        state_migration: UNKNOWN_MIGRATION.to_owned(),
        moved_files: Vec::new(),
        kernel: format!("systems/{label}/kernel"),
        initramfs: entry
            .and_then(|e| e.initrd.as_ref())
            .map(|_| format!("systems/{label}/initramfs")),
        kernel_source: entry.and_then(|e| e.kernel.clone()).unwrap_or_default(),
        initramfs_source: entry.and_then(|e| e.initrd.clone()),
        kernel_args: append,
        image_size,
        timings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::model::{Filesystem, Subvolume};
    use crate::inspect::scan::read_layout;

    fn subvol(id: u64, path: &str) -> Subvolume {
        Subvolume {
            id,
            generation: 1,
            parent_id: 5,
            top_level: 5,
            path: path.into(),
            uuid: format!("uuid-{id}"),
            parent_uuid: None,
            readonly: false,
        }
    }

    #[test]
    fn expectations_come_from_the_image() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path();
        for d in [
            "systems/v1/orig/etc",
            "systems/v1/run/etc",
            "state/var",
            "state/home",
            "state/extra",
            "extlinux",
        ] {
            std::fs::create_dir_all(top.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("v1", top.join("systems/default")).unwrap();
        std::fs::write(
            top.join("extlinux/extlinux.conf"),
            "default v1\nlabel v1\n  kernel /systems/v1/kernel\n  append root=/dev/vda rw\n",
        )
        .unwrap();
        let subvols = vec![
            subvol(256, "systems/v1/orig"),
            subvol(257, "systems/v1/run"),
            subvol(258, "state/var"),
            subvol(259, "state/home"),
        ];
        let fs = Filesystem {
            uuid: "abcd".into(),
            label: None,
        };
        let layout = read_layout(top, "their.img", fs, subvols);
        let m = manifest_from_layout(&layout, 42).unwrap();
        assert_eq!(m.label, "v1");
        assert_eq!(m.root_device, "/dev/vda");
        // Plain directories under state/ are not subvolumes to mount.
        assert_eq!(m.state_dirs.created, ["home", "var"]);
        assert!(m.moved_files.is_empty());
        assert_eq!(m.initramfs, None);

        std::fs::remove_file(top.join("systems/default")).unwrap();
        std::fs::create_dir_all(top.join("systems/v1;reboot")).unwrap();
        std::os::unix::fs::symlink("v1;reboot", top.join("systems/default")).unwrap();
        let fs = Filesystem {
            uuid: "abcd".into(),
            label: None,
        };
        let layout = read_layout(top, "their.img", fs, vec![]);
        let e = manifest_from_layout(&layout, 42).unwrap_err();
        assert!(e.contains("invalid version label \"v1;reboot\""), "{e}");
    }
}
