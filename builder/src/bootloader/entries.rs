//! Which versions of an image are whole, and the menu entry each one gets:
//! the one rule `versions` (list, set-default, remove) and `upgrade` (the
//! entries kept beside the new version) share, so that a version one
//! command would boot is one the other keeps in the menu, as it boots today.
//!
//! A version is whole when its `orig` and `run` are subvolumes and its
//! kernel is there, and so is the initramfs its menu entry or manifest
//! record names (its entry would not boot without it). Anything else under
//! `systems/<label>/` is partial: never made the default, never given an
//! entry.

use super::{cmdline, BootEntry};
use crate::bootloader::boot_entry;
use crate::layout::{self, Version};
use crate::manifest::Manifest;
use crate::model::{self, ImageLayout};
use std::path::Path;

/// The menu's entry for version `label`: the one labelled `label` unless
/// it boots another version, else one that boots it (a 2014-style
/// `label default` entry going through `systems/default`).
pub fn menu_entry<'a>(layout: &'a ImageLayout, label: &str) -> Option<&'a model::BootEntry> {
    let boot = layout.boot.as_ref()?;
    let default = layout.default.version.as_deref();
    let boots = |e: &model::BootEntry| boot_entry::version_booted(e.append.as_deref(), default);
    boot.entries
        .iter()
        .find(|e| e.label == label && boots(e).is_none_or(|b| b == label))
        .or_else(|| {
            boot.entries
                .iter()
                .find(|e| boots(e).as_deref() == Some(label))
        })
}

/// The image's root device: as its default version was deployed with (its
/// manifest record), else as that version's menu entry says, else the
/// filesystem's UUID. A whole version nothing describes (an upgrade cut
/// between renaming it into place and writing its menu entry, with no
/// record) was deployed with it, so that is the device it boots from.
pub fn image_root_device(layout: &ImageLayout, manifest: Option<&Manifest>) -> String {
    let default = layout.default.version.as_deref();
    default
        .and_then(|d| manifest.and_then(|m| m.version(d)))
        .map(|r| r.root_device.clone())
        .or_else(|| {
            default
                .and_then(|d| menu_entry(layout, d))
                .and_then(|e| Some(cmdline::root_device(e.append.as_deref()?)?.to_owned()))
        })
        .unwrap_or_else(|| format!("UUID={}", layout.filesystem.uuid))
}

/// Why version `v` of the image whose top level is `top` is not whole, in
/// plain words; empty when it is whole.
pub fn problems(
    top: &Path,
    layout: &ImageLayout,
    manifest: Option<&Manifest>,
    v: &model::Version,
) -> Vec<String> {
    let version = Version::found(&v.label);
    let mut problems = Vec::new();
    for (id, rel) in [(v.orig, version.orig()), (v.run, version.run())] {
        if id.is_none() {
            problems.push(if top.join(&rel).exists() {
                format!("{rel} is not a subvolume")
            } else {
                format!("{rel} is missing")
            });
        }
    }
    if v.kernel_size.is_none() {
        problems.push(format!("{} is missing", version.kernel()));
    }
    let entry_has_initrd = menu_entry(layout, &v.label).is_some_and(|e| e.initrd.is_some());
    let record_has_initramfs = manifest
        .and_then(|m| m.version(&v.label))
        .is_some_and(|r| r.initramfs.is_some());
    if v.initramfs_size.is_none() && (entry_has_initrd || record_has_initramfs) {
        problems.push(format!(
            "{} is missing (its {} names one)",
            version.initramfs(),
            if entry_has_initrd {
                "boot entry"
            } else {
                "manifest record"
            }
        ));
    }
    problems
}

/// The menu entries of the whole versions of an image (strata's debris
/// and `without` left out), each as it boots today: the command line of
/// its menu entry (`menu_entry`), else of its manifest record; the root
/// device that line gives the kernel, else the record's; the extra
/// arguments `cmdline::extra_args` reads. In the menu's order, then the
/// manifest's, then by label.
///
/// A version neither describes (an upgrade killed between its rename and
/// its menu, with no manifest) boots from `unknown_root` with no extra
/// arguments; without one it is refused. Also refused, as input: a menu
/// elsewhere than `layout::BOOT_MENU` (not one strata writes), a label
/// strata cannot write an entry for.
pub fn menu_entries(
    top: &Path,
    layout: &ImageLayout,
    manifest: Option<&Manifest>,
    without: Option<&str>,
    unknown_root: Option<&str>,
) -> Result<Vec<BootEntry>, String> {
    let shown = &layout.image;
    if let Some(b) = layout.boot.as_ref().filter(|b| b.path != layout::BOOT_MENU) {
        return Err(format!(
            "{shown}: its boot menu is {}, not {}: not a menu strata writes; rewrite it by hand",
            b.path,
            layout::BOOT_MENU
        ));
    }
    let position = |label: &str| {
        let in_menu = layout
            .boot
            .as_ref()
            .and_then(|b| b.entries.iter().position(|e| e.label == label));
        let in_manifest = manifest.and_then(|m| m.versions.iter().position(|v| v.label == label));
        (
            in_menu.unwrap_or(usize::MAX),
            in_manifest.unwrap_or(usize::MAX),
        )
    };
    let mut whole: Vec<&model::Version> = layout
        .versions
        .iter()
        .filter(|v| !layout::is_debris_name(&v.label) && Some(v.label.as_str()) != without)
        .filter(|v| problems(top, layout, manifest, v).is_empty())
        .collect();
    whole.sort_by(|a, b| {
        position(&a.label)
            .cmp(&position(&b.label))
            .then(a.label.cmp(&b.label))
    });
    let mut entries = Vec::new();
    for v in whole {
        let version = Version::new(&v.label).map_err(|e| {
            format!("{shown}: {e}: strata writes no boot entry for it; rename or remove it by hand")
        })?;
        let record = manifest.and_then(|m| m.version(&v.label));
        let line = menu_entry(layout, &v.label)
            .and_then(|e| e.append.as_deref())
            .or(record.map(|r| r.kernel_args.as_str()));
        let root_device = line
            .and_then(cmdline::root_device)
            .or(record.map(|r| r.root_device.as_str()))
            .or(unknown_root)
            .ok_or_else(|| {
                format!(
                    "{shown}: version {} has no boot entry strata can read and no manifest record: its root device and kernel arguments are unknown; give --manifest",
                    v.label
                )
            })?;
        entries.push(BootEntry {
            kernel_args: line
                .map(|l| cmdline::extra_args(l, &version))
                .unwrap_or_default(),
            root_device: root_device.to_owned(),
            has_initramfs: v.initramfs_size.is_some(),
            version,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootloader::extlinux;
    use crate::manifest::{Deployment, StateDirs, VersionRecord, MANIFEST_VERSION};
    use crate::model::{Boot, DefaultLink, Filesystem};

    /// An image with whole versions `labels` (kernel, and an initramfs
    /// where `initramfs` says), `default` the default, and `menu`.
    fn image(labels: &[(&str, bool)], default: &str, menu: Option<&str>) -> ImageLayout {
        ImageLayout {
            image: "img".into(),
            filesystem: Filesystem {
                uuid: "abcd".into(),
                label: None,
            },
            default: DefaultLink {
                link: Some(default.into()),
                version: Some(default.into()),
            },
            versions: labels
                .iter()
                .enumerate()
                .map(|(i, (l, initramfs))| model::Version {
                    label: (*l).into(),
                    default: *l == default,
                    orig: Some(256 + 2 * i as u64),
                    run: Some(257 + 2 * i as u64),
                    run_is_snapshot_of_orig: true,
                    kernel_size: Some(1),
                    initramfs_size: initramfs.then_some(1),
                    fstab: None,
                    run_fstab: None,
                })
                .collect(),
            state_dirs: vec![],
            subvolumes: vec![],
            boot: menu.map(|text| {
                let c = extlinux::parse(text);
                Boot {
                    path: layout::BOOT_MENU.into(),
                    default: c.default,
                    timeout: c.timeout,
                    entries: c
                        .entries
                        .into_iter()
                        .map(|e| model::BootEntry {
                            label: e.label,
                            kernel: e.kernel,
                            initrd: e.initrd,
                            append: e.append,
                            kernel_present: true,
                            initrd_present: None,
                        })
                        .collect(),
                }
            }),
            problems: vec![],
        }
    }

    fn record(label: &str, root: &str, line: &str, initramfs: bool) -> VersionRecord {
        VersionRecord {
            label: label.into(),
            deployed_by: Deployment::Upgrade,
            based_on: None,
            deployed_at: 0,
            root_device: root.into(),
            state_dirs: StateDirs {
                created: vec![],
                skipped: vec![],
            },
            fstab_lines_added: vec![],
            state_migration: "move".into(),
            state_data: None,
            moved_files: vec![],
            kernel: format!("systems/{label}/kernel"),
            initramfs: initramfs.then(|| format!("systems/{label}/initramfs")),
            kernel_source: String::new(),
            initramfs_source: None,
            kernel_args: line.into(),
            timings: vec![],
            backend: None,
        }
    }

    fn manifest(records: Vec<VersionRecord>) -> Manifest {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            fs_uuid: "abcd".into(),
            image_size: 1 << 30,
            default: records[0].label.clone(),
            versions: records,
        }
    }

    #[test]
    fn an_entry_is_the_versions_by_label_unless_it_boots_another() {
        let a = BootEntry::for_test("a", "/dev/vda", false, "");
        let b = BootEntry::for_test("b", "/dev/vda", false, "");
        // Labelled a, booting b: b's, not a's.
        let menu = format!(
            "label a\n  kernel /systems/b/kernel\n  append {}\nlabel x\n  append {}\n",
            b.append(),
            a.append()
        );
        let l = image(&[("a", false), ("b", false)], "a", Some(&menu));
        assert_eq!(menu_entry(&l, "a").unwrap().label, "x");
        assert_eq!(menu_entry(&l, "b").unwrap().label, "a");
        // A label whose line names no version is that version's.
        let l = image(
            &[("a", false)],
            "a",
            Some("label a\n  append root=/dev/sda\n"),
        );
        assert_eq!(menu_entry(&l, "a").unwrap().label, "a");
        // The default reached through systems/default.
        let via = BootEntry::for_test("a", "/dev/sda", false, "quiet").via_default_link();
        let l = image(
            &[("a", false)],
            "a",
            Some(&format!("label default\n  append {}\n", via.append())),
        );
        assert_eq!(menu_entry(&l, "a").unwrap().label, "default");
        assert_eq!(
            menu_entries(Path::new("/nonexistent"), &l, None, None, None).unwrap(),
            [BootEntry::for_test("a", "/dev/sda", false, "quiet")]
        );
    }

    /// The stricter rule, for every caller: an initramfs the menu entry or
    /// the record names must be there.
    #[test]
    fn a_named_initramfs_that_is_missing_makes_a_version_partial() {
        let top = Path::new("/nonexistent");
        let (a, b) = (
            BootEntry::for_test("a", "/dev/vda", false, ""),
            BootEntry::for_test("b", "/dev/vda", true, ""),
        );
        let menu = extlinux::render(&a.version, &[a.clone(), b.clone()]);
        // b's entry names one; b has none.
        let l = image(&[("a", false), ("b", false)], "a", Some(&menu));
        let b_info = &l.versions[1];
        assert_eq!(
            problems(top, &l, None, b_info),
            ["systems/b/initramfs is missing (its boot entry names one)"]
        );
        assert_eq!(
            menu_entries(top, &l, None, None, None).unwrap(),
            std::slice::from_ref(&a)
        );
        // Only the record names one.
        let l = image(&[("a", false), ("b", false)], "a", None);
        let m = manifest(vec![
            record("a", "/dev/vda", &a.append(), false),
            record("b", "/dev/vda", &b.append(), true),
        ]);
        assert_eq!(
            problems(top, &l, Some(&m), &l.versions[1]),
            ["systems/b/initramfs is missing (its manifest record names one)"]
        );
        assert_eq!(
            menu_entries(top, &l, Some(&m), None, None).unwrap(),
            std::slice::from_ref(&a)
        );
        assert!(problems(top, &l, Some(&m), &l.versions[0]).is_empty());
    }

    #[test]
    fn the_menu_first_then_the_record_then_the_root_given() {
        let top = Path::new("/nonexistent");
        let a = BootEntry::for_test("a", "/dev/vda", false, "quiet");
        let menu = extlinux::render(&a.version, std::slice::from_ref(&a));
        let l = image(
            &[("a", false), ("b", false), ("c", false)],
            "a",
            Some(&menu),
        );
        // b: its record, root device and arguments; c: nothing says.
        let b = BootEntry::for_test("b", "UUID=w", false, "debug");
        let m = manifest(vec![
            record("a", "x", "x", false),
            record("b", "UUID=w", &b.append(), false),
        ]);
        assert_eq!(
            menu_entries(top, &l, Some(&m), None, Some("/dev/vdz")).unwrap(),
            [
                a.clone(),
                b.clone(),
                BootEntry::for_test("c", "/dev/vdz", false, "")
            ]
        );
        let e = menu_entries(top, &l, Some(&m), None, None).unwrap_err();
        assert!(e.contains("version c has no boot entry"), "{e}");
        assert_eq!(
            menu_entries(top, &l, Some(&m), Some("c"), None).unwrap(),
            [a, b]
        );
    }
}
