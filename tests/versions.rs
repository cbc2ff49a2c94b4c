//! `strata versions`, `strata set-default` and `strata remove` on real
//! images: built with `strata build`, given more versions here (one as an
//! upgrade makes it, a snapshot of the default's orig changed in place; one
//! deployed with the builder's `deploy`), then listed, flipped, rolled back
//! and removed. Needs root and the packages `ci/setup` installs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use strata_builder::boot;
use strata_builder::bootloader::boot_entry;
use strata_builder::bootloader::{self, extlinux, BootEntry};
use strata_builder::build::version_record;
use strata_builder::copy;
use strata_builder::deploy::{self, BootSource, DeployOptions, Rootfs};
use strata_builder::host::interrupt::Interrupt;
use strata_builder::image::{self, Mode};
use strata_builder::layout::{self, Version, DEFAULT_STATE_DIRS};
use strata_builder::manifest::{Deployment, Manifest};
use strata_builder::migrate::Migration;
use strata_builder::plan::{self, PlanOptions};
use strata_builder::rootfs::RootDir;
use strata_builder::steps::Steps;

const MIB: usize = 1 << 20;
const SIZE: u64 = 300 << 20;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap()
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-ec", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Deterministic incompressible bytes: real extents, never inline.
fn fill(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// A small rootfs; every file but `big` small enough to be stored inline,
/// so the bytes a version holds alone are exactly its big files.
fn make_rootfs(root: &Path, kernel: &str, initramfs: bool, big: &[(&str, usize, u64)]) {
    for d in ["etc", "boot", "usr/bin", "var/lib/app", "root/.ssh"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("etc/fstab"), "# empty\n").unwrap();
    fs::write(root.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    fs::write(
        root.join(format!("boot/vmlinuz-{kernel}")),
        strata_builder::kernel::fake_kernel(format!("fake kernel {kernel}").as_bytes()),
    )
    .unwrap();
    if initramfs {
        fs::write(
            root.join(format!("boot/initrd.img-{kernel}")),
            "fake initramfs",
        )
        .unwrap();
    }
    fs::write(root.join("var/lib/app/db"), "state").unwrap();
    fs::write(root.join("root/.ssh/authorized_keys"), "ssh-ed25519 AAAA\n").unwrap();
    for (rel, len, seed) in big {
        fill(&root.join(rel), *len, *seed);
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    fs_uuid: String,
}

impl Fixture {
    /// `factory` built with `strata build` (kernel args "quiet").
    fn built() -> Fixture {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the versions tests need root (loop devices, mounts): run them as root, as CI does"
        );
        let dir = tempfile::Builder::new()
            .prefix("strata-versions-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let fs_uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .unwrap()
            .trim()
            .to_owned();
        let fx = Fixture { dir, fs_uuid };
        let rootfs = fx.dir.path().join("rootfs");
        make_rootfs(&rootfs, "1.10.0", true, &[("usr/lib/old.bin", MIB, 1)]);
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["build", "--size", "300M", "--kernel-args", "quiet"])
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--output")
            .arg(fx.image())
            .args(["--fs-uuid", &fx.fs_uuid])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        fx
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("out.img")
    }

    fn img(&self) -> String {
        self.image().display().to_string()
    }

    fn manifest_path(&self) -> PathBuf {
        Manifest::default_path(&self.image())
    }

    fn manifest(&self) -> Manifest {
        Manifest::load(&self.manifest_path()).unwrap()
    }

    /// `v2` as an upgrade makes it: a snapshot of factory's orig, changed
    /// in place (old.bin gone, new.bin added), run its snapshot, factory's
    /// kernel and initramfs; its menu entry and manifest record beside
    /// factory's. Factory stays the default.
    fn add_snapshot_version(&self) {
        let img = image::open(&self.image(), Mode::ReadWrite).unwrap();
        let mut m = self.manifest();
        let mut entries =
            bootloader::menu_entries(img.top(), &img.layout(), Some(&m), None, None).unwrap();
        let top = img.top();
        let (factory, v2) = (
            Version::new("factory").unwrap(),
            Version::new("v2").unwrap(),
        );
        fs::create_dir(top.join(v2.dir())).unwrap();
        sh(&format!(
            "btrfs -q subvolume snapshot '{}' '{}'",
            top.join(factory.orig()).display(),
            top.join(v2.orig()).display()
        ));
        fs::remove_file(top.join(v2.orig()).join("usr/lib/old.bin")).unwrap();
        fill(&top.join(v2.orig()).join("usr/lib/new.bin"), 2 * MIB, 2);
        sh(&format!(
            "btrfs -q subvolume snapshot '{}' '{}'",
            top.join(v2.orig()).display(),
            top.join(v2.run()).display()
        ));
        fs::copy(top.join(factory.kernel()), top.join(v2.kernel())).unwrap();
        fs::copy(top.join(factory.initramfs()), top.join(v2.initramfs())).unwrap();
        let entry = BootEntry {
            version: v2.clone(),
            ..entries[0].clone()
        };
        entries.push(entry.clone());
        boot::write_menu(top, &factory, &entries).unwrap();
        img.close().unwrap();
        let mut record = m.default_version().clone();
        record.label = "v2".into();
        record.deployed_by = Deployment::Upgrade;
        record.based_on = Some("factory".into());
        record.kernel = v2.kernel();
        record.initramfs = Some(v2.initramfs());
        record.kernel_args = entry.append();
        m.versions.push(record);
        m.save(&self.manifest_path()).unwrap();
    }

    /// `v3` deployed from its own rootfs with the builder's `deploy`: no
    /// initramfs, another root device (/dev/vda) and kernel arguments
    /// ("debug"), a 512 KiB file of its own. Factory stays the default.
    fn add_deployed_version(&self) {
        let rootfs = self.dir.path().join("rootfs3");
        make_rootfs(&rootfs, "3.0.0", false, &[("usr/lib/v3.bin", MIB / 2, 3)]);
        // The image's state is live data: a new rootfs brings none here.
        for d in DEFAULT_STATE_DIRS {
            let _ = fs::remove_dir_all(rootfs.join(d));
        }
        let img = image::open(&self.image(), Mode::ReadWrite).unwrap();
        let mut m = self.manifest();
        let mut entries =
            bootloader::menu_entries(img.top(), &img.layout(), Some(&m), None, None).unwrap();
        let v3 = Version::new("v3").unwrap();
        let plan = plan::plan(
            Some(&fs::read(rootfs.join("etc/fstab")).unwrap()),
            &PlanOptions {
                label: "v3".into(),
                state_dirs: DEFAULT_STATE_DIRS.map(String::from).to_vec(),
                // Without an initramfs the kernel needs a device name.
                root_device: Some("/dev/vda".into()),
                fs_uuid: self.fs_uuid.clone(),
                has_initramfs: false,
            },
        )
        .unwrap();
        let source = Rootfs {
            dir: RootDir::open(&rootfs).unwrap(),
            kernel: BootSource::Rootfs("boot/vmlinuz-3.0.0".into()),
            initramfs: None,
            size: copy::measure(&rootfs).unwrap(),
            path: rootfs,
            scratch: false,
        };
        let interrupt = Interrupt::default();
        let mut on_event = |_| {};
        let mut steps = Steps::new(&interrupt, &mut on_event);
        let deployed = deploy::deploy(
            &mut strata_builder::toplevel::Mounted::new(img.top()),
            &v3,
            &source,
            &plan,
            &DeployOptions {
                migration: Migration::Move,
                kernel_args: "debug".into(),
                image_size: SIZE,
            },
            &mut steps,
        )
        .unwrap();
        entries.push(deployed.boot.clone());
        boot::write_menu(img.top(), &Version::new("factory").unwrap(), &entries).unwrap();
        img.close().unwrap();
        m.versions.push(version_record(
            &plan,
            Migration::Move,
            deployed,
            Deployment::Upgrade,
        ));
        m.save(&self.manifest_path()).unwrap();
    }

    fn versions_json(&self) -> serde_json::Value {
        let out = strata(&["versions", &self.img(), "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The image's menu, `systems/default` target and reader's problems.
    fn boot_state(&self) -> (String, PathBuf, Vec<String>, Option<String>) {
        let img = image::open(&self.image(), Mode::ReadOnly).unwrap();
        let menu = fs::read_to_string(img.top().join(layout::BOOT_MENU)).unwrap();
        let link = fs::read_link(img.top().join(layout::DEFAULT_LINK)).unwrap();
        let l = img.layout();
        img.close().unwrap();
        (menu, link, l.problems, l.default.version)
    }

    fn sha256(&self) -> String {
        sh(&format!("sha256sum '{}'", self.image().display()))
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    }

    fn subvolumes(&self) -> Vec<String> {
        let img = image::open(&self.image(), Mode::ReadOnly).unwrap();
        let paths = img.subvolumes.iter().map(|s| s.path.clone()).collect();
        img.close().unwrap();
        paths
    }

    /// Loop devices backed by a file in this test's dir.
    fn assert_nothing_left(&self) {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        for entry in fs::read_dir("/sys/block").unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let backing = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .unwrap_or_default();
            assert!(
                !backing.starts_with(&prefix),
                "/dev/{name} still backed by {backing}"
            );
        }
    }

    /// A refused command: exit 2, one error line containing every `want`,
    /// the image and its manifest unchanged.
    fn assert_refused(&self, args: &[&str], want: &[&str]) {
        let (before, manifest) = (self.sha256(), fs::read(self.manifest_path()).unwrap());
        let out = strata(args);
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(e.starts_with("strata: error: "), "{e}");
        for w in want {
            assert!(e.contains(w), "expected {w:?} in {e}");
        }
        assert_eq!(self.sha256(), before, "{args:?} changed the image");
        assert_eq!(fs::read(self.manifest_path()).unwrap(), manifest);
        self.assert_nothing_left();
    }
}

fn labels(v: &serde_json::Value) -> Vec<(String, bool, String)> {
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["label"].as_str().unwrap().to_owned(),
                v["default"].as_bool().unwrap(),
                v["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 14
}

#[test]
fn list_flip_roll_back_and_remove() {
    let fx = Fixture::built();
    fx.add_snapshot_version();
    fx.add_deployed_version();

    // Listed: every version, factory the default.
    let v = fx.versions_json();
    assert_eq!(v["default"], "factory");
    assert_eq!(
        labels(&v),
        [
            ("factory".into(), true, "whole".into()),
            ("v2".into(), false, "whole".into()),
            ("v3".into(), false, "whole".into()),
        ]
    );
    let field = |i: usize, f: &str| v["versions"][i][f].clone();
    assert_eq!(field(0, "kernel")["version"], "1.10.0");
    assert_eq!(field(1, "kernel")["version"], "1.10.0");
    assert_eq!(field(2, "kernel")["version"], "3.0.0");
    assert_eq!(
        field(2, "kernel")["bytes"],
        strata_builder::kernel::fake_kernel(b"fake kernel 3.0.0").len()
    );
    // Each holds alone only what it changed: factory its old.bin, v2 its
    // new.bin, v3 (a copy of its own rootfs) its file.
    assert_eq!(field(0, "unshared_bytes"), MIB);
    assert_eq!(field(1, "unshared_bytes"), 2 * MIB);
    assert_eq!(field(2, "unshared_bytes"), MIB / 2);
    for i in 0..3 {
        let at = field(i, "deployed_at");
        assert!(is_rfc3339_utc(at.as_str().unwrap()), "{at}");
    }
    assert_eq!(v["debris"], serde_json::json!([]));
    let table = strata(&["versions", &fx.img()]);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table));
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("LABEL"), "{table}");
    let kernel_bytes = strata_builder::kernel::fake_kernel(b"fake kernel 1.10.0").len();
    assert!(
        table.contains(&format!("1.10.0 ({kernel_bytes} B)")),
        "{table}"
    );

    let (menu0, link, problems, _) = fx.boot_state();
    assert_eq!(link, Path::new("factory"));
    assert_eq!(problems, Vec::<String>::new());

    // Roll forward to v2: it boots like factory, so the flip is the whole
    // change and the menu stays byte for byte.
    let out = strata(&["set-default", &fx.img(), "v2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (menu, link, problems, default) = fx.boot_state();
    assert_eq!(menu, menu0);
    assert_eq!(link, Path::new("v2"));
    assert!(link.is_relative());
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(default.as_deref(), Some("v2"));
    assert_eq!(fx.manifest().default, "v2");
    fx.assert_nothing_left();

    // To v3: other arguments, no initramfs: the `default` entry changes
    // with it, and boots v3 through the link.
    let out = strata(&["set-default", &fx.img(), "v3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (menu, link, problems, _) = fx.boot_state();
    assert_eq!(link, Path::new("v3"));
    assert_eq!(problems, Vec::<String>::new());
    let config = extlinux::parse(&menu);
    let d = config.default_entry().unwrap();
    assert_eq!(d.label, "default");
    assert_eq!(d.initrd, None);
    assert!(d.cmdline().starts_with("root=/dev/vda "), "{menu}");
    assert!(d.cmdline().ends_with(" debug"), "{menu}");
    assert_eq!(
        boot_entry::version_booted(d.append.as_deref(), Some("v3")).as_deref(),
        Some("v3")
    );
    let own: Vec<&str> = config.entries.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(own, ["default", "factory", "v2", "v3"]);
    assert_eq!(fx.manifest().default, "v3");

    // Roll back to factory: the menu the build and the additions wrote.
    let out = strata(&["set-default", &fx.img(), "factory"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (menu, link, problems, _) = fx.boot_state();
    assert_eq!(menu, menu0);
    assert_eq!(link, Path::new("factory"));
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(fx.manifest().default, "factory");

    // The default cannot be removed; unknown labels are refused.
    fx.assert_refused(
        &["remove", &fx.img(), "factory"],
        &["factory is the default version", "set-default"],
    );
    fx.assert_refused(&["remove", &fx.img(), "nope"], &["no version \"nope\""]);
    fx.assert_refused(
        &["set-default", &fx.img(), "nope"],
        &["no version \"nope\"", "factory, v2, v3"],
    );
    fx.assert_refused(
        &["set-default", &fx.img(), "a/b"],
        &["invalid version label"],
    );

    // Removed with its nested subvolumes (deepest first).
    {
        let img = image::open(&fx.image(), Mode::ReadWrite).unwrap();
        let nested = img.top().join("systems/v2/run/usr/nested");
        sh(&format!("btrfs -q subvolume create '{}'", nested.display()));
        sh(&format!(
            "btrfs -q subvolume create '{}/deeper'",
            nested.display()
        ));
        img.close().unwrap();
    }
    assert!(fx
        .subvolumes()
        .contains(&"systems/v2/run/usr/nested/deeper".to_owned()));
    let out = strata(&["remove", &fx.img(), "v2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let left: Vec<String> = fx
        .subvolumes()
        .into_iter()
        .filter(|s| s.starts_with("systems/"))
        .collect();
    assert_eq!(
        left,
        [
            "systems/factory/orig",
            "systems/factory/run",
            "systems/v3/orig",
            "systems/v3/run"
        ]
    );
    let (menu, link, problems, _) = fx.boot_state();
    assert_eq!(link, Path::new("factory"));
    assert_eq!(problems, Vec::<String>::new());
    let own: Vec<String> = extlinux::parse(&menu)
        .entries
        .into_iter()
        .map(|e| e.label)
        .collect();
    assert_eq!(own, ["default", "factory", "v3"]);
    let m = fx.manifest();
    let recorded: Vec<&str> = m.versions.iter().map(|v| v.label.as_str()).collect();
    assert_eq!(recorded, ["factory", "v3"]);
    let v = fx.versions_json();
    assert_eq!(
        labels(&v),
        [
            ("factory".into(), true, "whole".into()),
            ("v3".into(), false, "whole".into()),
        ]
    );
    fx.assert_nothing_left();
}

/// A half-made version (orig only, as a killed deploy leaves it) and
/// strata's debris: listed for what they are, never made the default; the
/// half version is removed like any other.
#[test]
fn partial_versions_and_debris() {
    let fx = Fixture::built();
    {
        let img = image::open(&fx.image(), Mode::ReadWrite).unwrap();
        let top = img.top();
        fs::create_dir(top.join("systems/v9")).unwrap();
        sh(&format!(
            "btrfs -q subvolume create '{}'",
            top.join("systems/v9/orig").display()
        ));
        fs::create_dir(top.join("systems/.strata-partial-v8")).unwrap();
        img.close().unwrap();
    }
    let v = fx.versions_json();
    assert_eq!(
        labels(&v),
        [
            ("factory".into(), true, "whole".into()),
            ("v9".into(), false, "partial".into()),
        ]
    );
    assert_eq!(
        v["versions"][1]["problems"],
        serde_json::json!(["systems/v9/run is missing", "systems/v9/kernel is missing"])
    );
    assert_eq!(
        v["debris"],
        serde_json::json!(["systems/.strata-partial-v8"])
    );
    let table = String::from_utf8_lossy(&strata(&["versions", &fx.img()]).stdout).into_owned();
    assert!(table.contains("v9 is partial"), "{table}");
    assert!(table.contains("systems/.strata-partial-v8"), "{table}");

    fx.assert_refused(
        &["set-default", &fx.img(), "v9"],
        &["version v9 is partial", "systems/v9/run is missing"],
    );
    let out = strata(&["remove", &fx.img(), "v9"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!fx.subvolumes().iter().any(|s| s.starts_with("systems/v9")));
    let (_, link, problems, _) = fx.boot_state();
    assert_eq!(link, Path::new("factory"));
    // The debris is the only thing the reader still finds odd.
    assert!(
        problems.iter().all(|p| p.contains(".strata-partial-v8")),
        "{problems:#?}"
    );
    fx.assert_nothing_left();
}

/// A manifest of another image is refused before anything changes; one
/// that is missing is not needed.
#[test]
fn manifests_of_other_images_are_refused() {
    let fx = Fixture::built();
    fx.add_snapshot_version();
    let other = fx.dir.path().join("other.manifest.json");
    let mut m = fx.manifest();
    m.fs_uuid = "00000000-0000-4000-8000-000000000000".into();
    m.save(&other).unwrap();
    let other = other.display().to_string();
    fx.assert_refused(
        &["set-default", &fx.img(), "v2", "--manifest", &other],
        &["describes filesystem 00000000-0000-4000-8000-000000000000"],
    );
    fx.assert_refused(
        &["remove", &fx.img(), "v2", "--manifest", &other],
        &["describes filesystem"],
    );
    // Without its manifest the image still says how each version boots.
    fs::remove_file(fx.manifest_path()).unwrap();
    let out = strata(&["set-default", &fx.img(), "v2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (_, link, problems, _) = fx.boot_state();
    assert_eq!(link, Path::new("v2"));
    assert_eq!(problems, Vec::<String>::new());
    assert!(!fx.manifest_path().exists());
    fx.assert_nothing_left();
}

/// Not an image, not Btrfs, not this layout: exit 2, nothing changed.
#[test]
fn what_is_not_a_strata_image_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing.img").display().to_string();
    let zeros = d.path().join("zeros.img");
    fs::File::create(&zeros).unwrap().set_len(1 << 20).unwrap();
    let plain = d.path().join("plain.img");
    fs::File::create(&plain).unwrap().set_len(SIZE).unwrap();
    sh(&format!("mkfs.btrfs -q '{}'", plain.display()));
    let (zeros, plain) = (zeros.display().to_string(), plain.display().to_string());
    for (img, want) in [
        (&missing, "missing.img"),
        (&zeros, "not a Btrfs filesystem"),
        (&plain, "not a strata system layout"),
    ] {
        let sum = || {
            Path::new(img)
                .exists()
                .then(|| sh(&format!("sha256sum '{img}'")))
        };
        let before = sum();
        let out = strata(&["versions", img]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(want), "{}", text(&out));
        for cmd in ["set-default", "remove"] {
            let out = strata(&[cmd, img, "factory"]);
            assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        }
        assert_eq!(sum(), before, "{img} changed");
    }
    let out = strata(&["set-default", &plain, "factory"]);
    assert!(
        text(&out).contains("no version \"factory\" (it has none)"),
        "{}",
        text(&out)
    );
}
