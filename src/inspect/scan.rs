//! Reading a layout from a mounted top-level subvolume (or any directory
//! shaped like one: the tests use plain temp dirs). Never writes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use strata_builder::fstab;
use strata_builder::image::model::*;

/// The comment line that precedes the fstab lines strata adds.
pub const ADDED_MARKER: &str = "# Added by strata";

/// Parses `btrfs subvolume list -puq` output:
/// `ID 256 gen 10 parent 5 top level 5 parent_uuid - uuid f0aa… path systems/factory/orig`
/// (`received_uuid` tolerated). The path runs to the end of the line.
pub fn parse_subvolume_list(text: &str) -> Vec<Subvolume> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find(" path ") else {
            continue;
        };
        let path = line[at + " path ".len()..].to_owned();
        let path = path
            .strip_prefix("<FS_TREE>/")
            .map(str::to_owned)
            .unwrap_or(path);
        let words: Vec<&str> = line[..at].split_whitespace().collect();
        let mut fields: HashMap<&str, &str> = HashMap::new();
        let mut i = 0;
        while i + 1 < words.len() {
            if words[i] == "top" && words.get(i + 1) == Some(&"level") && i + 2 < words.len() {
                fields.insert("top_level", words[i + 2]);
                i += 3;
            } else {
                fields.insert(words[i], words[i + 1]);
                i += 2;
            }
        }
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        let uuid = |k: &str| {
            fields
                .get(k)
                .filter(|v| **v != "-")
                .map(|v| (*v).to_owned())
        };
        let Some(id) = num("ID") else { continue };
        out.push(Subvolume {
            id,
            generation: num("gen").unwrap_or(0),
            parent_id: num("parent").unwrap_or(0),
            top_level: num("top_level").unwrap_or(0),
            path,
            uuid: uuid("uuid").unwrap_or_default(),
            parent_uuid: uuid("parent_uuid"),
            readonly: false,
        });
    }
    out
}

/// Splits an fstab into lines, marking those after "# Added by strata".
pub fn read_fstab(path_in_image: &str, bytes: &[u8]) -> Fstab {
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
        if marker_line.is_none() && raw.trim_start().starts_with(ADDED_MARKER) {
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

/// The subvolume path an fstab entry mounts from this filesystem
/// (`subvol=/state/srv` → `state/srv`; `subvolid=260` → its path), if any.
fn mounted_subvolume(m: &FstabMount, subvols: &[Subvolume]) -> Option<String> {
    if m.fstype != "btrfs" {
        return None;
    }
    for opt in m.options.split(',') {
        if let Some(v) = opt.strip_prefix("subvol=") {
            let v = v.trim_start_matches('/').trim_end_matches('/');
            return Some(v.to_owned());
        }
    }
    for opt in m.options.split(',') {
        if let Some(id) = opt
            .strip_prefix("subvolid=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            return subvols.iter().find(|s| s.id == id).map(|s| s.path.clone());
        }
    }
    None
}

fn is_state_subvolume(path: &str) -> bool {
    path.strip_prefix("state/")
        .is_some_and(|d| !d.is_empty() && !d.contains('/'))
}

/// Names of the directories in `dir` (not symlinks such as systems/default),
/// sorted; none when `dir` is missing.
fn subdirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Version labels: the directories under systems/.
fn version_labels(top: &Path) -> Vec<String> {
    subdirs(&top.join("systems"))
}

fn state_names(top: &Path) -> Vec<String> {
    subdirs(&top.join("state"))
}

fn read_default(top: &Path, labels: &[String]) -> (DefaultLink, Vec<String>) {
    let mut problems = Vec::new();
    let link = match std::fs::read_link(top.join("systems/default")) {
        Ok(t) => t,
        Err(_) => {
            if top.join("systems/default").exists() {
                problems.push("systems/default is not a symlink".to_owned());
            } else if !labels.is_empty() {
                problems.push("systems/default is missing".to_owned());
            }
            return (DefaultLink::default(), problems);
        }
    };
    let text = link.to_string_lossy().into_owned();
    if link.is_absolute() {
        problems.push(format!(
            "systems/default -> {text} is an absolute symlink: it must be relative \
             (it resolves differently inside the booted system)"
        ));
    }
    // `factory`, `./factory`, `/systems/factory`, `../systems/factory`.
    let parts: Vec<String> = link
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let candidate = match parts.as_slice() {
        [one] => Some(one.clone()),
        [sys, one] if sys == "systems" => Some(one.clone()),
        _ => None,
    };
    let version = labels
        .iter()
        .find(|l| candidate.as_deref() == Some(l.as_str()))
        .cloned();
    if version.is_none() && !link.is_absolute() {
        problems.push(format!("systems/default -> {text} names no version"));
    }
    (
        DefaultLink {
            link: Some(text),
            version,
        },
        problems,
    )
}

fn file_size(p: &Path) -> Option<u64> {
    std::fs::metadata(p)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// The boot config's location relative to the top level.
const BOOT_CONFIGS: &[&str] = &[
    "extlinux/extlinux.conf",
    "extlinux.conf",
    "boot/extlinux/extlinux.conf",
    "syslinux/syslinux.cfg",
];

fn read_boot(top: &Path) -> Option<Boot> {
    let path = BOOT_CONFIGS.iter().find(|p| top.join(p).is_file())?;
    let text = std::fs::read_to_string(top.join(path)).ok()?;
    let config = strata_builder::extlinux::parse(&text);
    let mut entries: Vec<BootEntry> = config
        .entries
        .into_iter()
        .map(|e| BootEntry {
            label: e.label,
            kernel: e.kernel,
            initrd: e.initrd,
            append: e.append,
            kernel_present: false,
            initrd_present: None,
        })
        .collect();
    let (default, timeout) = (config.default, config.timeout);
    let config_dir = Path::new(path).parent().unwrap_or(Path::new(""));
    let resolve = |p: &str| -> PathBuf {
        match p.strip_prefix('/') {
            Some(abs) => top.join(abs),
            None => top.join(config_dir).join(p),
        }
    };
    for e in &mut entries {
        e.kernel_present = e.kernel.as_deref().is_some_and(|k| resolve(k).is_file());
        e.initrd_present = e
            .initrd
            .as_deref()
            .map(|i| i.split(',').all(|one| resolve(one.trim()).is_file()));
    }
    Some(Boot {
        path: path.to_string(),
        default,
        timeout,
        entries,
    })
}

/// Reads the whole layout. `subvols` is `btrfs subvolume list` of the
/// filesystem (empty for a plain directory).
pub fn read_layout(
    top: &Path,
    image: &str,
    filesystem: Filesystem,
    subvols: Vec<Subvolume>,
) -> Layout {
    let mut problems = Vec::new();
    if !top.join("systems").is_dir() {
        problems.push("no systems/ directory: not a strata system layout".to_owned());
    }
    let labels = version_labels(top);
    let (default, p) = read_default(top, &labels);
    problems.extend(p);
    let by_path: HashMap<&str, &Subvolume> = subvols.iter().map(|s| (s.path.as_str(), s)).collect();

    let mut versions = Vec::new();
    let mut mounted_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for label in &labels {
        let base = format!("systems/{label}");
        let orig = by_path.get(format!("{base}/orig").as_str()).copied();
        let run = by_path.get(format!("{base}/run").as_str()).copied();
        for (what, sv) in [("orig", orig), ("run", run)] {
            if sv.is_none() {
                let p = top.join(&base).join(what);
                problems.push(if p.exists() {
                    format!("{base}/{what} is not a subvolume")
                } else {
                    format!("{base}/{what} is missing")
                });
            }
        }
        let snapshot = match (orig, run) {
            (Some(o), Some(r)) => r.parent_uuid.as_deref() == Some(o.uuid.as_str()),
            _ => false,
        };
        if orig.is_some() && run.is_some() && !snapshot {
            problems.push(format!("{base}/run is not a snapshot of {base}/orig"));
        }
        let kernel_size = file_size(&top.join(&base).join("kernel"));
        if kernel_size.is_none() {
            problems.push(format!("{base}/kernel is missing"));
        }
        let read = |tree: &str| {
            let rel = format!("{base}/{tree}/etc/fstab");
            std::fs::read(top.join(&rel))
                .ok()
                .map(|b| read_fstab(&rel, &b))
        };
        let fstab = read("orig");
        let run_fstab = read("run");
        for (tree, f) in [("orig", &fstab), ("run", &run_fstab)] {
            for m in f
                .iter()
                .flat_map(|f| &f.lines)
                .filter_map(|l| l.mount.as_ref())
            {
                if let Some(sv) = mounted_subvolume(m, &subvols).filter(|p| is_state_subvolume(p)) {
                    mounted_by
                        .entry(sv["state/".len()..].to_owned())
                        .or_default()
                        .push(format!("{label}/{tree}: {}", m.target));
                }
            }
        }
        let run_differs = match (&fstab, &run_fstab) {
            (Some(a), Some(b)) => a.lines != b.lines,
            (None, None) => false,
            _ => true,
        };
        versions.push(Version {
            label: label.clone(),
            default: default.version.as_deref() == Some(label.as_str()),
            orig: orig.map(|s| s.id),
            run: run.map(|s| s.id),
            run_is_snapshot_of_orig: snapshot,
            kernel_size,
            initramfs_size: file_size(&top.join(&base).join("initramfs")),
            fstab,
            run_fstab: if run_differs { run_fstab } else { None },
        });
    }
    if labels.is_empty() && top.join("systems").is_dir() {
        problems.push("systems/ has no versions".to_owned());
    }

    let state_dirs: Vec<StateDir> = state_names(top)
        .into_iter()
        .map(|name| {
            let sv = by_path.get(format!("state/{name}").as_str()).map(|s| s.id);
            if sv.is_none() {
                problems.push(format!("state/{name} is not a subvolume"));
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
            "fstab mounts state/{name} ({}) but the image has no such subvolume",
            by.join(", ")
        ));
    }

    let boot = read_boot(top);
    match &boot {
        None if !labels.is_empty() => {
            problems.push(format!("no boot menu ({} not found)", BOOT_CONFIGS[0]))
        }
        None => {}
        Some(b) => {
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
            for l in &labels {
                if !b.entries.iter().any(|e| &e.label == l) {
                    problems.push(format!("version {l} has no boot entry"));
                }
            }
            if let (Some(d), Some(v)) = (&b.default, &default.version) {
                if d != v {
                    problems.push(format!(
                        "boot menu default {d} differs from systems/default ({v})"
                    ));
                }
            }
        }
    }

    Layout {
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

/// A mount a tree's fstab makes at boot.
struct Planned {
    target: String,
    /// Subvolume path on this image, or None for another device.
    subvolume: Option<String>,
    mounted: String,
    basis: String,
}

fn is_under(path: &str, ancestor: &str) -> bool {
    ancestor == "/"
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn planned_mounts(fstab: Option<&Fstab>, subvols: &[Subvolume], states: &[String]) -> Vec<Planned> {
    let mut out = Vec::new();
    for line in fstab.iter().flat_map(|f| &f.lines) {
        let Some(m) = &line.mount else { continue };
        if m.target == "/" || !fstab::is_boot_mount(&m.target, &m.fstype, &m.options) {
            continue;
        }
        let subvolume = mounted_subvolume(m, subvols);
        let mounted = match &subvolume {
            Some(s) => s.clone(),
            None => format!("{} ({})", m.source, m.fstype),
        };
        out.push(Planned {
            target: m.target.clone(),
            subvolume,
            mounted,
            basis: format!("fstab line {}", line.number),
        });
    }
    let any_state = out
        .iter()
        .any(|p| p.subvolume.as_deref().is_some_and(is_state_subvolume));
    if !any_state {
        for name in states {
            out.push(Planned {
                target: format!("/{name}"),
                subvolume: Some(format!("state/{name}")),
                mounted: format!("state/{name}"),
                basis: "state dir (no fstab entry mounts it)".to_owned(),
            });
        }
    }
    out
}

/// Checks every mountpoint of every version's orig and run.
pub fn lint(top: &Path, image: &str, subvols: &[Subvolume]) -> Lint {
    let states = state_names(top);
    let mut mountpoints = Vec::new();
    let mut trees = Vec::new();
    for label in version_labels(top) {
        for tree in ["orig", "run"] {
            let root_rel = format!("systems/{label}/{tree}");
            if !top.join(&root_rel).is_dir() {
                continue;
            }
            trees.push(format!("{label}/{tree}"));
            let fstab_rel = format!("{root_rel}/etc/fstab");
            let fstab = std::fs::read(top.join(&fstab_rel))
                .ok()
                .map(|b| read_fstab(&fstab_rel, &b));
            let planned = planned_mounts(fstab.as_ref(), subvols, &states);
            for p in &planned {
                // The innermost other mount containing this mountpoint
                // decides where the directory really is.
                let outer = planned
                    .iter()
                    .filter(|o| o.target != p.target && is_under(&p.target, &o.target))
                    .max_by_key(|o| o.target.len());
                let dir_rel: Option<String> = match outer {
                    None => Some(format!("{root_rel}{}", p.target)),
                    Some(o) => o
                        .subvolume
                        .as_ref()
                        .map(|sv| format!("{sv}{}", &p.target[o.target.len()..])),
                };
                mountpoints.push(check_mountpoint(top, &label, tree, p, dir_rel));
            }
        }
    }
    // orig and run may both mount over one directory of a state subvolume:
    // count each directory once.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&MountpointCheck> = mountpoints
        .iter()
        .filter(|m| m.dir.as_ref().is_none_or(|d| seen.insert(d.clone())))
        .collect();
    let hidden_files = unique.iter().map(|m| m.file_count).sum();
    let hidden_bytes = unique.iter().map(|m| m.total_bytes).sum();
    Lint {
        image: image.to_owned(),
        clean: mountpoints
            .iter()
            .all(|m| m.status != MountpointStatus::NotEmpty),
        hidden_files,
        hidden_bytes,
        mountpoints,
        trees,
    }
}

fn check_mountpoint(
    top: &Path,
    label: &str,
    tree: &str,
    p: &Planned,
    dir_rel: Option<String>,
) -> MountpointCheck {
    let mut check = MountpointCheck {
        version: label.to_owned(),
        tree: tree.to_owned(),
        mountpoint: p.target.clone(),
        dir: dir_rel.clone(),
        mounted: p.mounted.clone(),
        basis: p.basis.clone(),
        status: MountpointStatus::NotOnImage,
        file_count: 0,
        total_bytes: 0,
        files: Vec::new(),
    };
    let Some(dir_rel) = dir_rel else {
        return check;
    };
    let dir = top.join(&dir_rel);
    check.status = match std::fs::symlink_metadata(&dir) {
        Err(_) => MountpointStatus::Missing,
        Ok(md) if !md.is_dir() => MountpointStatus::NotADirectory,
        Ok(md) => {
            walk(&dir, md.dev(), &p.target, &mut check.files);
            check.files.sort_by(|a, b| a.path.cmp(&b.path));
            if check.files.is_empty() {
                MountpointStatus::Empty
            } else {
                MountpointStatus::NotEmpty
            }
        }
    };
    check.file_count = check.files.len() as u64;
    check.total_bytes = check.files.iter().map(|f| f.size).sum();
    check
}

/// Lists everything under `dir` (not following symlinks) as `shown/…`.
fn walk(dir: &Path, dev: u64, shown: &str, out: &mut Vec<HiddenFile>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = format!("{}/{name}", shown.trim_end_matches('/'));
        let Ok(md) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let t = md.file_type();
        let (kind, size) = if t.is_dir() {
            (
                if md.dev() != dev {
                    FileKind::Subvolume
                } else {
                    FileKind::Dir
                },
                0,
            )
        } else if t.is_symlink() {
            (FileKind::Symlink, md.len())
        } else if t.is_fifo() {
            (FileKind::Fifo, 0)
        } else if t.is_socket() {
            (FileKind::Socket, 0)
        } else if t.is_char_device() {
            (FileKind::CharDevice, 0)
        } else if t.is_block_device() {
            (FileKind::BlockDevice, 0)
        } else {
            (FileKind::File, md.len())
        };
        out.push(HiddenFile {
            path: path.clone(),
            kind,
            size,
        });
        if t.is_dir() {
            walk(&e.path(), md.dev(), &path, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subvolume_list() {
        let text = "ID 256 gen 10 parent 5 top level 5 parent_uuid -                                    uuid f0aaf0cf-5cde-8c48-b38b-4ce6f7529407 path systems/factory/orig\n\
ID 262 gen 9 parent 5 top level 5 parent_uuid f0aaf0cf-5cde-8c48-b38b-4ce6f7529407 received_uuid - uuid 317d54a2-fd1f-bd41-a4ce-2b06e4fb8176 path systems/my dir/run\n";
        let s = parse_subvolume_list(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].id, 256);
        assert_eq!(s[0].parent_uuid, None);
        assert_eq!(s[1].path, "systems/my dir/run");
        assert_eq!(
            s[1].parent_uuid.as_deref(),
            Some("f0aaf0cf-5cde-8c48-b38b-4ce6f7529407")
        );
        assert_eq!(s[1].top_level, 5);
    }

    #[test]
    fn marks_added_lines() {
        let f = read_fstab(
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

    fn tree(top: &Path) {
        for d in [
            "systems/factory/orig/etc",
            "systems/factory/orig/srv",
            "systems/factory/orig/var",
            "systems/factory/run/etc",
            "systems/factory/run/srv",
            "systems/factory/run/var",
            "state/srv",
            "state/var/lib",
        ] {
            std::fs::create_dir_all(top.join(d)).unwrap();
        }
        let fstab = "# Added by strata\n/dev/vda /srv btrfs subvol=/state/srv 0 2\n/dev/vda /var btrfs subvol=state/var 0 2\n/dev/vda /var/lib/x btrfs subvol=/state/x 0 2\n/dev/vdb /mnt/data ext4 defaults 0 2\n/dev/vdb /mnt/data/sub ext4 defaults 0 2\n/dev/vda /mnt/later btrfs noauto 0 0\n";
        for t in ["orig", "run"] {
            std::fs::write(top.join(format!("systems/factory/{t}/etc/fstab")), fstab).unwrap();
        }
    }

    #[test]
    fn lint_finds_files_under_mountpoints_only() {
        let d = tempfile::tempdir().unwrap();
        tree(d.path());
        let clean = lint(d.path(), "img", &[]);
        assert!(clean.clean, "{clean:#?}");
        assert_eq!(clean.trees, ["factory/orig", "factory/run"]);

        std::fs::write(
            d.path().join("systems/factory/run/srv/stale.html"),
            "hidden\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("state/var/lib/x/deep")).unwrap();
        std::fs::write(d.path().join("state/var/lib/x/deep/f"), "12345").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("systems/factory/orig/var/link")).unwrap();
        let l = lint(d.path(), "img", &[]);
        assert!(!l.clean);
        let bad: Vec<(String, String, Vec<String>)> = l
            .mountpoints
            .iter()
            .filter(|m| m.status == MountpointStatus::NotEmpty)
            .map(|m| {
                (
                    format!("{}/{}", m.version, m.tree),
                    m.mountpoint.clone(),
                    m.files.iter().map(|f| f.path.clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            bad,
            [
                (
                    "factory/orig".into(),
                    "/var".into(),
                    vec!["/var/link".to_owned()]
                ),
                (
                    "factory/orig".into(),
                    "/var/lib/x".into(),
                    vec!["/var/lib/x/deep".to_owned(), "/var/lib/x/deep/f".to_owned()]
                ),
                (
                    "factory/run".into(),
                    "/srv".into(),
                    vec!["/srv/stale.html".to_owned()]
                ),
                (
                    "factory/run".into(),
                    "/var/lib/x".into(),
                    vec!["/var/lib/x/deep".to_owned(), "/var/lib/x/deep/f".to_owned()]
                ),
            ]
        );
        // /var/lib/x lives in state/var, /mnt/data/sub on another disk.
        let x = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/var/lib/x")
            .unwrap();
        assert_eq!(x.dir.as_deref(), Some("state/var/lib/x"));
        let sub = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/mnt/data/sub")
            .unwrap();
        assert_eq!(sub.status, MountpointStatus::NotOnImage);
        let data = l
            .mountpoints
            .iter()
            .find(|m| m.mountpoint == "/mnt/data")
            .unwrap();
        assert_eq!(data.status, MountpointStatus::Missing);
        assert!(l.mountpoints.iter().all(|m| m.mountpoint != "/mnt/later"));
        assert_eq!(l.hidden_bytes, 7 + 5 + 4);
    }

    #[test]
    fn lint_falls_back_to_state_dirs_without_fstab() {
        let d = tempfile::tempdir().unwrap();
        for p in ["systems/v1/run/home/alice", "systems/v1/orig", "state/home"] {
            std::fs::create_dir_all(d.path().join(p)).unwrap();
        }
        let l = lint(d.path(), "img", &[]);
        assert!(!l.clean);
        let m = &l.mountpoints.iter().find(|m| m.tree == "run").unwrap();
        assert_eq!(m.mountpoint, "/home");
        assert!(m.basis.contains("no fstab entry"));
        assert_eq!(m.files[0].path, "/home/alice");
    }
}
