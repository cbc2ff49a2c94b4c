//! The planner over fixtures/fstab/: one snapshot per file with the plan and
//! the completed fstab, and proof that strata's parser agrees with libmount.

use std::path::{Path, PathBuf};
use strata_builder::fstab;
use strata_builder::layout::DEFAULT_STATE_DIRS;
use strata_builder::plan::{plan, FstabChange, PlanOptions};

const FS_UUID: &str = "5e1f0c2a-7d4b-4c3e-8f9a-0b1c2d3e4f50";

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fstab");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "fstab"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "fstab corpus missing in {}",
        dir.display()
    );
    files
}

fn options() -> PlanOptions {
    PlanOptions {
        label: "factory".into(),
        state_dirs: DEFAULT_STATE_DIRS.iter().map(|s| s.to_string()).collect(),
        root_device: None,
        fs_uuid: FS_UUID.into(),
        has_initramfs: true,
    }
}

fn render(input: Option<&[u8]>) -> String {
    let p = plan(input, &options()).unwrap();
    let mut s = serde_json::to_string_pretty(&p).unwrap();
    s.push_str("\n--- etc/fstab after ---\n");
    match &p.fstab {
        FstabChange::Unchanged => s.push_str("(unchanged)\n"),
        FstabChange::Write { contents, .. } => {
            // Every input byte must survive, in order, at the start.
            assert!(contents.starts_with(input.unwrap_or_default()));
            // CR shown as `\r`: snapshot files normalise line ends.
            s.push_str(&String::from_utf8_lossy(contents).replace('\r', "\\r"));
        }
    }
    s
}

#[test]
fn snapshots_of_the_corpus() {
    for file in corpus() {
        let bytes = std::fs::read(&file).unwrap();
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        insta::assert_snapshot!(name, render(Some(&bytes)));
    }
    insta::assert_snapshot!("missing", render(None));
}

/// `findmnt --tab-file` is libmount, the parser systemd mounts with.
fn libmount_targets(file: &Path) -> Vec<(String, String)> {
    let out = std::process::Command::new("findmnt")
        .args(["--tab-file"])
        .arg(file)
        .args(["-J", "-o", "SOURCE,TARGET,FSTYPE"])
        .output()
        .expect("findmnt (util-linux) must be installed: run ci/setup");
    if out.stdout.is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|fs| {
            (
                fs["source"].as_str().unwrap_or_default().to_owned(),
                fstab::normalize_target(fs["target"].as_str().unwrap()),
            )
        })
        .collect()
}

#[test]
fn parser_agrees_with_libmount() {
    for file in corpus() {
        let ours: Vec<(String, String)> = fstab::parse(&std::fs::read(&file).unwrap())
            .into_iter()
            .map(|e| (fstab::unescape(&e.source), e.target))
            .collect();
        assert_eq!(ours, libmount_targets(&file), "{}", file.display());
    }
}

#[test]
fn nothing_to_add_leaves_the_file_untouched() {
    let full = b"/dev/vda / btrfs defaults 0 1\n/dev/vdb /home ext4 defaults 0 2\n\
/dev/vdc /root ext4 defaults 0 2\n/dev/vdd /opt ext4 defaults 0 2\n\
/dev/vde /srv ext4 defaults 0 2\n/dev/vdf /var ext4 defaults 0 2\n";
    let p = plan(Some(full), &options()).unwrap();
    assert_eq!(p.fstab, FstabChange::Unchanged);
    assert_eq!(p.created_state_dirs().count(), 0);
}

#[test]
fn explicit_root_device_is_used_and_conflicts_are_refused() {
    let mut o = options();
    o.root_device = Some("/dev/vda".into());
    assert_eq!(plan(None, &o).unwrap().root_device, "/dev/vda");
    o.root_device = Some("/dev/sda".into());
    let e = plan(Some(b"/dev/vda / btrfs defaults 0 1\n"), &o).unwrap_err();
    assert!(e.to_string().contains("/dev/vda"), "{e}");
    assert!(e.to_string().contains("/dev/sda"), "{e}");
}

#[test]
fn uuid_root_without_initramfs_is_refused() {
    let mut o = options();
    o.has_initramfs = false;
    let e = plan(None, &o).unwrap_err().to_string();
    assert!(e.contains("needs an initramfs"), "{e}");
    o.root_device = Some("/dev/vda".into());
    assert!(plan(None, &o).is_ok());
}

#[test]
fn bad_labels_and_state_dirs_are_named() {
    for bad in ["", "a/b", "..", "has space", "x\ny"] {
        let mut o = options();
        o.label = bad.into();
        assert!(plan(None, &o)
            .unwrap_err()
            .to_string()
            .contains(&format!("{bad:?}")));
    }
    for bad in ["", "var/lib", "..", "/var"] {
        let mut o = options();
        o.state_dirs = vec![bad.into()];
        assert!(plan(None, &o)
            .unwrap_err()
            .to_string()
            .contains(&format!("{bad:?}")));
    }
    let mut o = options();
    o.state_dirs = vec!["var".into(), "var".into()];
    assert!(plan(None, &o).unwrap_err().to_string().contains("twice"));
}

#[test]
fn rejected_lines_are_kept_listed_and_not_entries() {
    let text = b"/dev/vda / btrfs defaults 0 1\n/dev/vdb /var ext4 defaults 0 x\n";
    let p = plan(Some(text), &options()).unwrap();
    let rejected: Vec<(usize, &str)> = p
        .fstab_rejected
        .iter()
        .map(|r| (r.line, r.raw.as_str()))
        .collect();
    assert_eq!(rejected, [(2, "/dev/vdb /var ext4 defaults 0 x")]);
    assert!(p.created_state_dirs().any(|d| d == "var"));
    let FstabChange::Write { contents, .. } = &p.fstab else {
        panic!("var must be added");
    };
    assert!(contents.starts_with(text));
    assert!(p.fstab_rejected[0].to_string().contains("line 2"));
}

/// libmount guesses the table format from the first entry line; read as
/// mountinfo or swaps, no line of the file would be mounted at boot, not
/// even strata's own.
#[test]
fn fstab_libmount_reads_as_another_table_is_refused() {
    for (text, want) in [
        (
            &b"# c\n1 2 ext4 defaults\n/dev/vda / btrfs defaults 0 1\n"[..],
            "mountinfo",
        ),
        (
            b"\nFilename\tType\n/dev/vda / btrfs defaults 0 1\n",
            "swaps",
        ),
    ] {
        let e = plan(Some(text), &options()).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains(want), "{e}");
    }
}
