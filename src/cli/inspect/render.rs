//! Human-readable output of `strata inspect` and `strata inspect --lint`.
//! Pure functions over the model: snapshot-tested without any image.

use std::fmt::Write;
use strata_builder::layout;
use strata_builder::model::*;

pub use strata_builder::size::human as bytes;

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn layout(l: &ImageLayout) -> String {
    let mut o = String::new();
    let label = l
        .filesystem
        .label
        .as_deref()
        .map(|s| format!(", label {s:?}"))
        .unwrap_or_default();
    let _ = writeln!(o, "Image {}", l.image);
    let _ = writeln!(o, "  btrfs, UUID {}{label}", l.filesystem.uuid);

    let _ = writeln!(o, "\nVersions ({}/)", layout::SYSTEMS_DIR);
    match (&l.default.link, &l.default.version) {
        (Some(link), Some(_)) => {
            let _ = writeln!(o, "  default -> {link}");
        }
        (Some(link), None) => {
            let _ = writeln!(o, "  default -> {link}  (names no version)");
        }
        (None, _) => {
            let _ = writeln!(o, "  default: (no {} link)", layout::DEFAULT_LINK);
        }
    }
    if l.versions.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    let id = |v: Option<u64>| {
        v.map(|i| format!("subvolume {i}"))
            .unwrap_or("MISSING".into())
    };
    for v in &l.versions {
        let _ = writeln!(
            o,
            "  {}{}",
            v.label,
            if v.default { "  (default)" } else { "" }
        );
        let _ = writeln!(o, "    orig       {}", id(v.orig));
        let _ = writeln!(
            o,
            "    run        {}{}",
            id(v.run),
            if v.run_is_snapshot_of_orig {
                ", snapshot of orig"
            } else if v.run.is_some() {
                ", NOT a snapshot of orig"
            } else {
                ""
            }
        );
        let size = |s: Option<u64>| s.map(bytes).unwrap_or("missing".into());
        let _ = writeln!(o, "    kernel     {}", size(v.kernel_size));
        let _ = writeln!(o, "    initramfs  {}", size(v.initramfs_size));
    }

    let _ = writeln!(o, "\nSubvolumes");
    if l.subvolumes.is_empty() {
        let _ = writeln!(o, "  (none)");
    } else {
        let w = l
            .subvolumes
            .iter()
            .map(|s| s.path.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            o,
            "  {:>5} {:>6}  {:<w$}  {:<36}  {:<36}  FLAGS",
            "ID", "PARENT", "PATH", "UUID", "PARENT UUID"
        );
        for s in &l.subvolumes {
            let _ = writeln!(
                o,
                "  {:>5} {:>6}  {:<w$}  {:<36}  {:<36}  {}",
                s.id,
                s.parent_id,
                s.path,
                s.uuid,
                s.parent_uuid.as_deref().unwrap_or("-"),
                if s.readonly { "ro" } else { "-" }
            );
        }
    }

    let _ = writeln!(o, "\nState directories ({}/)", layout::STATE_DIR);
    if l.state_dirs.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for s in &l.state_dirs {
        let kind = s
            .subvolume
            .map(|i| format!("subvolume {i}"))
            .unwrap_or("plain directory".into());
        let by = if s.mounted_by.is_empty() {
            "not mounted by any fstab".to_owned()
        } else {
            format!("mounted by {}", s.mounted_by.join(", "))
        };
        let _ = writeln!(o, "  {:<8} {kind}; {by}", s.name);
    }

    for v in &l.versions {
        for (f, note) in [(&v.fstab, ""), (&v.run_fstab, "  (differs from orig's)")] {
            let Some(f) = f else { continue };
            let _ = writeln!(o, "\n{}{note}", f.path);
            if f.lines.is_empty() {
                let _ = writeln!(o, "  (empty)");
            }
            for line in &f.lines {
                let mark = if line.added { '+' } else { ' ' };
                let _ = writeln!(o, "  {:>3} {mark} {}", line.number, line.text);
            }
            if f.marker_line.is_none() && !f.lines.is_empty() {
                let _ = writeln!(o, "  (no \"# Added by strata\" line: strata added nothing)");
            }
        }
        if v.fstab.is_none() {
            let path = layout::Version::found(&v.label).fstab(layout::Tree::Orig);
            let _ = writeln!(o, "\n{path}: missing");
        }
    }
    if l.versions.iter().any(|v| v.fstab.is_some()) {
        let _ = writeln!(o, "  (+ = added by strata, after \"# Added by strata\")");
    }

    match &l.boot {
        None => {
            let _ = writeln!(o, "\nBoot: no extlinux.conf");
        }
        Some(b) => {
            let _ = writeln!(
                o,
                "\nBoot ({}): default {}, timeout {}",
                b.path,
                b.default.as_deref().unwrap_or("(none)"),
                b.timeout.as_deref().unwrap_or("(none)")
            );
            for e in &b.entries {
                let default = b.default.as_deref() == Some(e.label.as_str());
                let _ = writeln!(
                    o,
                    "  {}{}",
                    e.label,
                    if default { "  (default)" } else { "" }
                );
                if let Some(k) = &e.kernel {
                    let state = if e.kernel_present { "" } else { "  (MISSING)" };
                    let _ = writeln!(o, "    kernel {k}{state}");
                }
                if let Some(i) = &e.initrd {
                    let state = if e.initrd_present == Some(false) {
                        "  (MISSING)"
                    } else {
                        ""
                    };
                    let _ = writeln!(o, "    initrd {i}{state}");
                }
                if let Some(a) = &e.append {
                    let _ = writeln!(o, "    append {a}");
                }
            }
        }
    }

    if l.problems.is_empty() {
        let _ = writeln!(o, "\nProblems: none");
    } else {
        let _ = writeln!(o, "\nProblems");
        for p in &l.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    o
}

/// How many hidden files to list per mountpoint unless `all`.
pub const LIST_LIMIT: usize = 20;

pub fn lint(l: &Lint, all: bool) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Lint {}", l.image);
    let trees = if l.trees.is_empty() {
        "no versions".to_owned()
    } else {
        l.trees.join(", ")
    };
    let _ = writeln!(
        o,
        "  checked {} in {trees}",
        plural(l.mountpoints.len() as u64, "mountpoint", "mountpoints")
    );

    let bad: Vec<&MountpointCheck> = l
        .mountpoints
        .iter()
        .filter(|m| m.status == MountpointStatus::NotEmpty)
        .collect();
    for m in &bad {
        let dir = m.dir.as_deref().unwrap_or("?");
        let _ = writeln!(
            o,
            "\n{}/{}: {} is not empty: {} ({}) hidden under the mount of {}",
            m.version,
            m.tree,
            m.mountpoint,
            plural(m.file_count, "entry", "entries"),
            bytes(m.total_bytes),
            m.mounted,
        );
        let _ = writeln!(o, "  directory in the image: {dir} ({})", m.basis);
        let shown = if all {
            m.files.len()
        } else {
            LIST_LIMIT.min(m.files.len())
        };
        let w = m.files[..shown]
            .iter()
            .map(|f| f.path.len())
            .max()
            .unwrap_or(0);
        for f in &m.files[..shown] {
            let _ = writeln!(
                o,
                "    {:<w$}  {:<12} {:>10}",
                f.path,
                f.kind.as_str(),
                bytes(f.size)
            );
        }
        if shown < m.files.len() {
            let _ = writeln!(
                o,
                "    … and {} more (--all lists them, --json has them all)",
                m.files.len() - shown
            );
        }
    }

    let notes: Vec<&MountpointCheck> = l
        .mountpoints
        .iter()
        .filter(|m| {
            matches!(
                m.status,
                MountpointStatus::NotADirectory | MountpointStatus::NotOnImage
            )
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(o);
        for m in notes {
            let why = match m.status {
                MountpointStatus::NotADirectory => "is not a directory in the image",
                _ => "lies under a mount of another device: not checked",
            };
            let _ = writeln!(o, "note: {}/{}: {} {why}", m.version, m.tree, m.mountpoint);
        }
    }

    if bad.is_empty() {
        let _ = writeln!(o, "\nClean: no mountpoint hides files.");
        return o;
    }
    let mut points: Vec<&str> = bad.iter().map(|m| m.mountpoint.as_str()).collect();
    points.sort();
    points.dedup();
    let _ = writeln!(
        o,
        "\nFound {} hidden under {} ({}): {}.",
        plural(l.hidden_files, "entry", "entries"),
        plural(points.len() as u64, "mountpoint", "mountpoints"),
        bytes(l.hidden_bytes),
        points.join(", ")
    );
    // Data already in a state subvolume, hidden by a mount the fstab nests
    // inside the state dir, needs the opposite advice: it is where state
    // belongs, and moving it "into the state subvolume" changes nothing.
    let in_state = |m: &MountpointCheck| {
        m.dir
            .as_deref()
            .and_then(|d| d.strip_prefix(layout::STATE_DIR))
            .is_some_and(|rest| rest.starts_with('/'))
    };
    if bad.iter().any(|m| !in_state(m)) {
        let _ = writeln!(
            o,
            "These files are in the image but invisible in the booted system: a \
             subvolume is mounted over the directory that holds them, and \
             systemd logs \"Directory … to mount over is not empty, mounting \
             anyway.\" for each. Fix: move them into the state subvolume (or \
             delete them) so the directory is empty, or rebuild the image with \
             `strata build`: its default `--state-migration move` leaves every \
             mountpoint empty."
        );
    }
    let mut nested: Vec<String> = bad
        .iter()
        .filter(|m| in_state(m))
        .map(|m| {
            format!(
                "{} (in {}, under {})",
                m.mountpoint,
                m.dir.as_deref().unwrap_or_default(),
                m.mounted
            )
        })
        .collect();
    nested.sort();
    nested.dedup();
    if !nested.is_empty() {
        let _ = writeln!(
            o,
            "Already in a state subvolume, hidden by a mount the version's fstab \
             nests inside the state dir: {}. Moving them into the state subvolume \
             changes nothing, they are in it. Fix: drop or move that mount in the \
             version's /etc/fstab, or move the data out of that directory of the \
             state subvolume (or delete it) if the mount should win.",
            nested.join(", ")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fstab(path: &str, text: &str) -> Fstab {
        strata_builder::image::read_fstab(path, text.as_bytes())
    }

    fn sample_layout() -> ImageLayout {
        let uuid = "7e8fa80d-1bbb-4e94-bb4e-c06a903df589";
        let sv = |id, path: &str, uuid: &str, parent: Option<&str>| Subvolume {
            id,
            generation: 9,
            parent_id: 5,
            top_level: 5,
            path: path.to_owned(),
            uuid: uuid.to_owned(),
            parent_uuid: parent.map(str::to_owned),
            readonly: false,
        };
        let orig_uuid = "f0aaf0cf-5cde-8c48-b38b-4ce6f7529407";
        let text = format!(
            "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n# Added by strata\nUUID={uuid} /home btrfs subvol=/state/home,defaults,rw,noatime 0 2\nUUID={uuid} /srv btrfs subvol=/state/srv,defaults,rw,noatime 0 2\nUUID={uuid} / btrfs defaults,rw,noatime 0 1\n"
        );
        ImageLayout {
            image: "/images/deb.img".into(),
            filesystem: Filesystem {
                uuid: uuid.into(),
                label: Some("strata".into()),
            },
            default: DefaultLink {
                link: Some("factory".into()),
                version: Some("factory".into()),
            },
            versions: vec![Version {
                label: "factory".into(),
                default: true,
                orig: Some(256),
                run: Some(259),
                run_is_snapshot_of_orig: true,
                kernel_size: Some(8_247_232),
                initramfs_size: Some(36_977_095),
                fstab: Some(fstab("systems/factory/orig/etc/fstab", &text)),
                run_fstab: None,
            }],
            state_dirs: vec![
                StateDir {
                    name: "home".into(),
                    subvolume: Some(257),
                    mounted_by: vec!["factory/orig: /home".into(), "factory/run: /home".into()],
                },
                StateDir {
                    name: "srv".into(),
                    subvolume: Some(258),
                    mounted_by: vec!["factory/orig: /srv".into(), "factory/run: /srv".into()],
                },
            ],
            subvolumes: vec![
                sv(256, "systems/factory/orig", orig_uuid, None),
                sv(257, "state/home", "45b72a0c-72c0-5145-a58b-36ee227583f5", None),
                sv(258, "state/srv", "69a1ed47-0081-0e40-afed-4de9ceeedebc", None),
                sv(
                    259,
                    "systems/factory/run",
                    "317d54a2-fd1f-bd41-a4ce-2b06e4fb8176",
                    Some(orig_uuid),
                ),
            ],
            boot: Some(Boot {
                path: "extlinux/extlinux.conf".into(),
                default: Some("factory".into()),
                timeout: Some("10".into()),
                entries: vec![BootEntry {
                    label: "factory".into(),
                    kernel: Some("/systems/factory/kernel".into()),
                    initrd: Some("/systems/factory/initramfs".into()),
                    append: Some(format!("root=UUID={uuid} rootfstype=btrfs rootflags=subvol=systems/factory/run init=/sbin/init rw console=tty0 console=ttyS0,115200")),
                    kernel_present: true,
                    initrd_present: Some(true),
                }],
            }),
            problems: vec![],
        }
    }

    #[test]
    fn layout_text() {
        insta::assert_snapshot!("layout", layout(&sample_layout()));
    }

    #[test]
    fn layout_json() {
        insta::assert_json_snapshot!("layout-json", sample_layout());
    }

    #[test]
    fn broken_layout_text() {
        let mut l = sample_layout();
        l.default = DefaultLink {
            link: Some("/systems/factory".into()),
            version: Some("factory".into()),
        };
        l.versions[0].default = false;
        l.versions[0].run_is_snapshot_of_orig = false;
        l.versions[0].initramfs_size = None;
        l.versions[0].run_fstab = Some(fstab(
            "systems/factory/run/etc/fstab",
            "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n",
        ));
        l.state_dirs[1].subvolume = None;
        l.state_dirs[1].mounted_by.clear();
        if let Some(b) = &mut l.boot {
            b.entries[0].initrd_present = Some(false);
        }
        l.problems = vec![
            "systems/default -> /systems/factory is an absolute symlink: it must be relative (it resolves differently inside the booted system)".into(),
            "systems/factory/run is not a snapshot of systems/factory/orig".into(),
            "state/srv is not a subvolume".into(),
        ];
        insta::assert_snapshot!("layout-broken", layout(&l));
    }

    fn sample_lint(files: Vec<HiddenFile>) -> Lint {
        let check = |tree: &str, mp: &str, files: Vec<HiddenFile>| {
            let status = if files.is_empty() {
                MountpointStatus::Empty
            } else {
                MountpointStatus::NotEmpty
            };
            MountpointCheck {
                version: "factory".into(),
                tree: tree.into(),
                mountpoint: mp.into(),
                dir: Some(format!("systems/factory/{tree}{mp}")),
                mounted: format!("state{mp}"),
                basis: "fstab line 4".into(),
                status,
                file_count: files.len() as u64,
                total_bytes: files.iter().map(|f| f.size).sum(),
                files,
            }
        };
        let mut mountpoints = vec![];
        for tree in ["orig", "run"] {
            for mp in ["/home", "/srv"] {
                let f = if tree == "run" && mp == "/srv" {
                    files.clone()
                } else {
                    vec![]
                };
                mountpoints.push(check(tree, mp, f));
            }
        }
        Lint {
            image: "/images/deb.img".into(),
            clean: files.is_empty(),
            hidden_files: files.len() as u64,
            hidden_bytes: files.iter().map(|f| f.size).sum(),
            mountpoints,
            trees: vec!["factory/orig".into(), "factory/run".into()],
        }
    }

    fn hidden(path: &str, kind: FileKind, size: u64) -> HiddenFile {
        HiddenFile {
            path: path.into(),
            kind,
            size,
        }
    }

    #[test]
    fn lint_clean_text() {
        insta::assert_snapshot!("lint-clean", lint(&sample_lint(vec![]), false));
    }

    #[test]
    fn lint_findings_text_and_json() {
        let l = sample_lint(vec![
            hidden("/srv/stale.html", FileKind::File, 18),
            hidden("/srv/www", FileKind::Dir, 0),
            hidden("/srv/www/current", FileKind::Symlink, 9),
        ]);
        insta::assert_snapshot!("lint-findings", lint(&l, false));
        insta::assert_json_snapshot!("lint-findings-json", l);
    }

    #[test]
    fn lint_long_listing_is_cut() {
        let files: Vec<HiddenFile> = (0..25)
            .map(|i| hidden(&format!("/srv/f{i:02}"), FileKind::File, 1000 * i))
            .collect();
        let l = sample_lint(files);
        let short = lint(&l, false);
        assert!(short.contains("… and 5 more"), "{short}");
        assert!(!short.contains("/srv/f24"));
        assert!(lint(&l, true).contains("/srv/f24"));
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(8_247_232), "7.9 MiB");
    }
}
