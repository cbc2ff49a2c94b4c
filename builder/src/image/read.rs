//! Reading a layout from a mounted top-level subvolume (or any directory
//! shaped like one: the tests use plain temp dirs). Never writes.

use super::subvolumes;
use crate::bootloader::boot_entry;
use crate::bootloader::{Bootloader, BOOTLOADER};
use crate::fstab;
use crate::layout::{self, Tree, Version};
use crate::model::{self, *};
use crate::rootfs::RootDir;
use rustix::fs::FileType;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Splits an fstab into lines, marking those after strata's marker comment.
pub fn fstab(path_in_image: &str, bytes: &[u8]) -> Fstab {
    let entries: BTreeMap<usize, fstab::Entry> = fstab::parse(bytes)
        .into_iter()
        .map(|e| (e.line, e))
        .collect();
    let text = String::from_utf8_lossy(bytes);
    let mut lines = Vec::new();
    let mut marker_line = None;
    let mut pieces: Vec<&str> = text.split('\n').collect();
    if pieces.last() == Some(&"") {
        pieces.pop();
    }
    for (i, raw) in pieces.into_iter().enumerate() {
        let number = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let added = marker_line.is_some();
        if marker_line.is_none() && raw.trim_start().starts_with(layout::FSTAB_MARKER_PREFIX) {
            marker_line = Some(number);
        }
        lines.push(FstabLine {
            number,
            text: raw.to_owned(),
            added,
            mount: entries.get(&number).map(|e| FstabMount {
                source: e.source.clone(),
                target: e.target.clone(),
                fstype: e.fstype.clone(),
                options: e.options.clone(),
            }),
        });
    }
    Fstab {
        path: path_in_image.to_owned(),
        marker_line,
        lines,
    }
}

/// A tree's fstab, None when it has none. The image is as untrusted as a
/// rootfs: read through `RootDir` (RESOLVE_IN_ROOT at the top level, files
/// checked before they are opened), so `etc/fstab -> /etc/shadow` or a fifo
/// never reaches or blocks on the host.
pub(super) fn tree_fstab(top: &Path, version: &Version, tree: Tree) -> Option<Fstab> {
    let rel = version.fstab(tree);
    read_in_image(top, &rel).map(|b| fstab(&rel, &b))
}

/// A regular file of the image, read without leaving it.
pub(super) fn read_in_image(top: &Path, rel: &str) -> Option<Vec<u8>> {
    crate::rootfs::RootDir::open(top).ok()?.read(rel).ok()?
}

/// Names of the directories in the image's top-level directory `dir` (not
/// symlinks such as systems/default), sorted; none when `dir` is missing or
/// is itself a symlink (which could lead out of the image: the directory is
/// opened from the top with openat2 following no symlink).
fn subdirs(top: &Path, dir: &str) -> Vec<String> {
    use rustix::fs::{statat, AtFlags, Dir, FileType};
    let Ok(root) = crate::rootfs::RootDir::open(top) else {
        return Vec::new();
    };
    let Ok(fd) = root.open_dir_no_symlinks(dir) else {
        return Vec::new();
    };
    let Ok(entries) = Dir::read_from(&fd) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_bytes();
            n != b"." && n != b".."
        })
        .filter(|e| {
            statat(&fd, e.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The versions: the directories under systems/, except an upgrade's
/// partial directories (never a version, whole or not).
pub(super) fn versions(top: &Path) -> Vec<Version> {
    subdirs(top, layout::SYSTEMS_DIR)
        .iter()
        .filter(|l| !layout::is_partial_name(l))
        .map(|l| Version::found(l))
        .collect()
}

/// Partial version directories a killed upgrade left in systems/.
fn partials(top: &Path) -> Vec<String> {
    subdirs(top, layout::SYSTEMS_DIR)
        .into_iter()
        .filter(|l| layout::is_partial_name(l))
        .collect()
}

/// The state dir names: the directories under state/.
pub(super) fn state_names(top: &Path) -> Vec<String> {
    subdirs(top, layout::STATE_DIR)
}

fn read_default(root: Option<&RootDir>, labels: &[String]) -> (DefaultLink, Vec<String>) {
    let mut problems = Vec::new();
    let at = layout::DEFAULT_LINK;
    let link = match root.and_then(|r| r.read_link(at).ok().flatten()) {
        Some(t) => t,
        None => {
            if stat_in(root, at, false).is_some() {
                problems.push(format!("{} is not a symlink", layout::DEFAULT_LINK));
            } else if !labels.is_empty() {
                problems.push(format!("{} is missing", layout::DEFAULT_LINK));
            }
            return (DefaultLink::default(), problems);
        }
    };
    let text = link.to_string_lossy().into_owned();
    if link.is_absolute() {
        problems.push(format!(
            "{} -> {text} is an absolute symlink: it must be relative \
             (it resolves differently inside the booted system)",
            layout::DEFAULT_LINK
        ));
    }
    let named = boot_entry::default_label(&link);
    let version = labels.iter().find(|l| named.as_ref() == Some(*l)).cloned();
    if version.is_none() && !link.is_absolute() {
        problems.push(format!(
            "{} -> {text} names no version",
            layout::DEFAULT_LINK
        ));
    }
    (
        DefaultLink {
            link: Some(text),
            version,
        },
        problems,
    )
}

/// What is at `rel` in the image, looked up without leaving it (symlinks
/// resolved as in the image's own root, as the boot loader would).
fn stat_in(root: Option<&RootDir>, rel: &str, follow: bool) -> Option<rustix::fs::Stat> {
    root?.stat(rel, follow).ok().flatten()
}

fn is_type(root: Option<&RootDir>, rel: &str, want: FileType) -> bool {
    stat_in(root, rel, true).is_some_and(|st| FileType::from_raw_mode(st.st_mode) == want)
}

fn file_size(root: Option<&RootDir>, rel: &str) -> Option<u64> {
    stat_in(root, rel, true)
        .filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
        .map(|st| st.st_size as u64)
}

/// The first boot menu found, its entries' files checked where the boot
/// loader would look (through `systems/default` to `default_label`).
fn read_boot(top: &Path, root: Option<&RootDir>, default_label: Option<&str>) -> Option<Boot> {
    let (path, bytes) = layout::BOOT_CONFIGS
        .iter()
        .find_map(|p| read_in_image(top, p).map(|b| (p, b)))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let config = BOOTLOADER.read_menu(&text);
    let present = |p: &str| {
        boot_entry::resolve(path, p, default_label)
            .is_some_and(|rel| is_type(root, &rel, FileType::RegularFile))
    };
    let entries = config
        .entries
        .into_iter()
        .map(|e| BootEntry {
            kernel_present: e.kernel.as_deref().is_some_and(present),
            initrd_present: e
                .initrd
                .as_deref()
                .map(|i| i.split(',').all(|one| present(one.trim()))),
            label: e.label,
            kernel: e.kernel,
            initrd: e.initrd,
            append: e.append,
        })
        .collect();
    Some(Boot {
        path: path.to_string(),
        default: config.default,
        timeout: config.timeout,
        entries,
    })
}

/// What is wrong with the boot menu, given the versions and the default.
fn boot_problems(b: &Boot, labels: &[String], default: &DefaultLink) -> Vec<String> {
    let mut problems = Vec::new();
    let boots =
        |e: &BootEntry| boot_entry::version_booted(e.append.as_deref(), default.version.as_deref());
    for e in &b.entries {
        if !e.kernel_present {
            problems.push(format!(
                "boot entry {}: kernel {} is missing",
                e.label,
                e.kernel.as_deref().unwrap_or("(none)")
            ));
        }
        if e.initrd_present == Some(false) {
            problems.push(format!(
                "boot entry {}: initrd {} is missing",
                e.label,
                e.initrd.as_deref().unwrap_or("")
            ));
        }
    }
    for l in labels {
        // An entry boots a version by its label, or by its root (a menu
        // whose default entry goes through systems/default).
        if !b
            .entries
            .iter()
            .any(|e| &e.label == l || boots(e).as_ref() == Some(l))
        {
            problems.push(format!("version {l} has no boot entry"));
        }
    }
    if let (Some(d), Some(v)) = (&b.default, &default.version) {
        let booted = b
            .entries
            .iter()
            .find(|e| &e.label == d)
            .and_then(boots)
            .unwrap_or_else(|| d.clone());
        if &booted != v {
            problems.push(if &booted == d {
                format!(
                    "boot menu default {d} differs from {} ({v})",
                    layout::DEFAULT_LINK
                )
            } else {
                format!(
                    "boot menu default {d} boots {booted}, not {} ({v})",
                    layout::DEFAULT_LINK
                )
            });
        }
    }
    problems
}

/// Reads the whole layout. `subvols` is `btrfs subvolume list` of the
/// filesystem (empty for a plain directory).
pub fn layout(
    top: &Path,
    image: &str,
    filesystem: Filesystem,
    subvols: Vec<Subvolume>,
) -> ImageLayout {
    let mut problems = Vec::new();
    let root = RootDir::open(top).ok();
    let root = root.as_ref();
    let systems = layout::SYSTEMS_DIR;
    if !is_type(root, systems, FileType::Directory) {
        problems.push(format!(
            "no {systems}/ directory: not a strata system layout"
        ));
    }
    let found = versions(top);
    let labels: Vec<String> = found.iter().map(|v| v.label().to_owned()).collect();
    let (default, p) = read_default(root, &labels);
    problems.extend(p);
    let by_path: HashMap<&str, &Subvolume> = subvols.iter().map(|s| (s.path.as_str(), s)).collect();

    let mut versions = Vec::new();
    let mut mounted_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for version in &found {
        let label = version.label();
        let orig = by_path.get(version.orig().as_str()).copied();
        let run = by_path.get(version.run().as_str()).copied();
        for (tree, sv) in [(Tree::Orig, orig), (Tree::Run, run)] {
            if sv.is_none() {
                let rel = version.tree(tree);
                problems.push(if stat_in(root, &rel, false).is_some() {
                    format!("{rel} is not a subvolume")
                } else {
                    format!("{rel} is missing")
                });
            }
        }
        let snapshot = match (orig, run) {
            (Some(o), Some(r)) => r.parent_uuid.as_deref() == Some(o.uuid.as_str()),
            _ => false,
        };
        if orig.is_some() && run.is_some() && !snapshot {
            problems.push(format!(
                "{} is not a snapshot of {}",
                version.run(),
                version.orig()
            ));
        }
        let kernel_size = file_size(root, &version.kernel());
        if kernel_size.is_none() {
            problems.push(format!("{} is missing", version.kernel()));
        }
        let fstab = tree_fstab(top, version, Tree::Orig);
        let run_fstab = tree_fstab(top, version, Tree::Run);
        for (tree, f) in [(Tree::Orig, &fstab), (Tree::Run, &run_fstab)] {
            for m in f
                .iter()
                .flat_map(|f| &f.lines)
                .filter_map(|l| l.mount.as_ref())
            {
                let sv = subvolumes::mounted_by(m, &subvols);
                if let Some(dir) = sv.as_deref().and_then(layout::state_dir_of) {
                    mounted_by.entry(dir.to_owned()).or_default().push(format!(
                        "{label}/{}: {}",
                        tree.name(),
                        m.target
                    ));
                }
            }
        }
        let run_differs = match (&fstab, &run_fstab) {
            (Some(a), Some(b)) => a.lines != b.lines,
            (None, None) => false,
            _ => true,
        };
        versions.push(model::Version {
            label: label.to_owned(),
            default: default.version.as_deref() == Some(label),
            orig: orig.map(|s| s.id),
            run: run.map(|s| s.id),
            run_is_snapshot_of_orig: snapshot,
            kernel_size,
            initramfs_size: file_size(root, &version.initramfs()),
            fstab,
            run_fstab: if run_differs { run_fstab } else { None },
        });
    }
    if labels.is_empty() && is_type(root, systems, FileType::Directory) {
        problems.push(format!("{systems}/ has no versions"));
    }
    for name in partials(top) {
        problems.push(format!(
            "{systems}/{name}: debris of a killed `strata upgrade` (a half-made version, not listed; the next upgrade removes it)"
        ));
    }

    let state_dirs: Vec<StateDir> = state_names(top)
        .into_iter()
        .map(|name| {
            let sv = by_path.get(layout::state(&name).as_str()).map(|s| s.id);
            if sv.is_none() {
                problems.push(format!("{} is not a subvolume", layout::state(&name)));
            }
            StateDir {
                mounted_by: mounted_by.remove(&name).unwrap_or_default(),
                subvolume: sv,
                name,
            }
        })
        .collect();
    for (name, by) in mounted_by {
        problems.push(format!(
            "fstab mounts {} ({}) but the image has no such subvolume",
            layout::state(&name),
            by.join(", ")
        ));
    }

    let boot = read_boot(top, root, default.version.as_deref());
    match &boot {
        None if !labels.is_empty() => {
            problems.push(format!("no boot menu ({} not found)", layout::BOOT_MENU))
        }
        None => {}
        Some(b) => problems.extend(boot_problems(b, &labels, &default)),
    }

    ImageLayout {
        image: image.to_owned(),
        filesystem,
        default,
        versions,
        state_dirs,
        subvolumes: subvols,
        boot,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image is untrusted: an fstab that is a symlink out of it, or a
    /// fifo, is never followed to (or blocked on by) the host.
    #[test]
    fn an_image_fstab_never_leads_to_the_host() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path();
        let v = Version::new("v1").unwrap();
        let etc = top.join(v.orig()).join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(top.join(v.run()).join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", etc.join("fstab")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            top.join(v.fstab(Tree::Run)),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let top_owned = top.to_owned();
        std::thread::spawn(move || {
            let orig = tree_fstab(&top_owned, &v, Tree::Orig);
            let run = tree_fstab(&top_owned, &v, Tree::Run);
            tx.send((orig.is_some(), run.is_some())).unwrap();
        });
        let (orig, run) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a fifo in the image must not block the reader");
        assert!(
            !orig,
            "the host's /etc/hostname was read as the image's fstab"
        );
        assert!(!run);
    }

    /// Sizes and existence are looked up inside the image: a kernel that
    /// is a symlink to a host file (absolute, or climbing out with `..`)
    /// is missing, not the host file's size.
    #[test]
    fn kernel_and_initramfs_links_out_of_the_image_are_missing() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host secret\n").unwrap();
        let d = image_with_menu("v1", MENU_THROUGH_THE_LINK);
        let v1 = d.path().join("systems/v1");
        std::fs::remove_file(v1.join("kernel")).unwrap();
        std::fs::remove_file(v1.join("initramfs")).unwrap();
        std::os::unix::fs::symlink(host.path().join("secret"), v1.join("kernel")).unwrap();
        let climb = format!(
            "../../../../../../..{}",
            host.path().join("secret").display()
        );
        std::os::unix::fs::symlink(climb, v1.join("initramfs")).unwrap();
        let l = read(d.path());
        let v = &l.versions[0];
        assert_eq!(v.kernel_size, None);
        assert_eq!(v.initramfs_size, None);
        assert!(l
            .problems
            .contains(&"systems/v1/kernel is missing".to_owned()));
        let e = &l.boot.as_ref().unwrap().entries[0];
        assert!(!e.kernel_present);
        assert_eq!(e.initrd_present, Some(false));
    }

    #[test]
    fn marks_added_lines() {
        let f = fstab(
            "x/etc/fstab",
            b"# comment\nLABEL=a /data ext4 defaults 0 2\n# Added by strata\nUUID=u /srv btrfs subvol=/state/srv 0 2",
        );
        assert_eq!(f.marker_line, Some(3));
        assert!(!f.lines[1].added);
        assert!(!f.lines[2].added);
        assert!(f.lines[3].added);
        assert_eq!(f.lines[3].mount.as_ref().unwrap().target, "/srv");
        assert_eq!(f.lines.len(), 4);
    }

    fn read(top: &Path) -> ImageLayout {
        let fs = Filesystem {
            uuid: "abcd".into(),
            label: None,
        };
        layout(top, "img", fs, vec![])
    }

    /// One version `v1`, its kernel and initramfs, `systems/default` as
    /// `link` and the menu `menu` at extlinux/extlinux.conf.
    fn image_with_menu(link: &str, menu: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let top = d.path();
        for p in ["systems/v1/orig", "systems/v1/run", "extlinux"] {
            std::fs::create_dir_all(top.join(p)).unwrap();
        }
        std::fs::write(top.join("systems/v1/kernel"), "k").unwrap();
        std::fs::write(top.join("systems/v1/initramfs"), "i").unwrap();
        std::os::unix::fs::symlink(link, top.join("systems/default")).unwrap();
        std::fs::write(top.join("extlinux/extlinux.conf"), menu).unwrap();
        d
    }

    const MENU_THROUGH_THE_LINK: &str = "default default\n\
        label default\n  kernel /systems/default/kernel\n  initrd ../systems/default/initramfs\n  \
        append root=/dev/vda rootflags=subvol=systems/default/run rw\n";

    #[test]
    fn boot_entries_through_systems_default_are_resolved() {
        let d = image_with_menu("v1", MENU_THROUGH_THE_LINK);
        let l = read(d.path());
        assert_eq!(l.default.version.as_deref(), Some("v1"));
        let e = &l.boot.as_ref().unwrap().entries[0];
        assert!(e.kernel_present);
        assert_eq!(e.initrd_present, Some(true));
        // The `default` entry boots v1: no missing entry, no disagreement
        // between the menu's default and the link.
        let boot_problems: Vec<&String> =
            l.problems.iter().filter(|p| p.contains("boot")).collect();
        assert!(boot_problems.is_empty(), "{:#?}", l.problems);
    }

    /// The menu strata writes (a `default` entry through the link, one
    /// entry per version), read back with the reader: no problem before or
    /// after a flip, and the default entry boots the version the link names.
    #[test]
    fn the_menu_strata_writes_reads_clean_before_and_after_a_flip() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path();
        let mut subvols = Vec::new();
        let mut entries = Vec::new();
        for (i, (label, initramfs)) in [("factory", true), ("v2", false)].into_iter().enumerate() {
            let v = Version::new(label).unwrap();
            for (j, tree) in Tree::BOTH.into_iter().enumerate() {
                std::fs::create_dir_all(top.join(v.tree(tree))).unwrap();
                subvols.push(Subvolume {
                    id: 256 + 2 * i as u64 + j as u64,
                    generation: 1,
                    parent_id: 5,
                    top_level: 5,
                    path: v.tree(tree),
                    uuid: format!("{label}-{}", tree.name()),
                    parent_uuid: (tree == Tree::Run).then(|| format!("{label}-orig")),
                    readonly: false,
                });
            }
            std::fs::write(top.join(v.kernel()), "k").unwrap();
            if initramfs {
                std::fs::write(top.join(v.initramfs()), "i").unwrap();
            }
            entries.push(crate::bootloader::BootEntry {
                version: v,
                root_device: "UUID=abcd".into(),
                has_initramfs: initramfs,
                kernel_args: "quiet".into(),
            });
        }
        for default in [&entries[0].version, &entries[1].version] {
            crate::boot::write_menu(top, default, &entries).unwrap();
            crate::boot::set_default(top, default).unwrap();
            let fs = Filesystem {
                uuid: "abcd".into(),
                label: None,
            };
            let l = layout(top, "img", fs, subvols.clone());
            assert_eq!(l.problems, Vec::<String>::new(), "default {default}");
            assert_eq!(l.default.version.as_deref(), Some(default.label()));
            let boot = l.boot.as_ref().unwrap();
            assert_eq!(boot.default.as_deref(), Some("default"));
            let first = &boot.entries[0];
            assert_eq!(
                boot_entry::version_booted(first.append.as_deref(), Some(default.label()))
                    .as_deref(),
                Some(default.label())
            );
            assert!(first.kernel_present);
            // v2 has no initramfs: the `default` entry has no initrd line.
            let has_initrd = default.label() == "factory";
            assert_eq!(first.initrd_present, has_initrd.then_some(true));
        }
    }

    #[test]
    fn a_partial_version_is_debris_not_a_version() {
        let d = image_with_menu("v1", MENU_THROUGH_THE_LINK);
        let partial = Version::new("v2").unwrap().partial();
        std::fs::create_dir_all(d.path().join(partial.orig())).unwrap();
        std::fs::write(d.path().join(partial.kernel()), "k").unwrap();
        let l = read(d.path());
        let labels: Vec<&str> = l.versions.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(labels, ["v1"]);
        assert!(
            l.problems
                .iter()
                .any(|p| p.starts_with(&partial.dir()) && p.contains("debris")),
            "{:#?}",
            l.problems
        );
    }

    #[test]
    fn a_link_naming_no_version_leaves_its_entries_without_a_kernel() {
        let d = image_with_menu("gone", MENU_THROUGH_THE_LINK);
        let l = read(d.path());
        assert_eq!(l.default.version, None);
        let e = &l.boot.as_ref().unwrap().entries[0];
        assert!(!e.kernel_present);
        assert_eq!(e.initrd_present, Some(false));
        assert!(l
            .problems
            .contains(&"version v1 has no boot entry".to_owned()));
    }

    #[test]
    fn a_menu_default_booting_another_version_is_a_problem() {
        let d = image_with_menu(
            "v1",
            "default v1\nlabel v1\n  kernel /systems/v1/kernel\n  append rootflags=subvol=systems/v2/run\n",
        );
        let l = read(d.path());
        assert!(
            l.problems
                .contains(&"boot menu default v1 boots v2, not systems/default (v1)".to_owned()),
            "{:#?}",
            l.problems
        );
    }
}
