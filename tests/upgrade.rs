//! `strata upgrade` end to end on images built here from small synthetic
//! rootfs trees (no VM): the new version beside the old one, what it
//! shares with it, the state-data policy, the refusals, and a SIGKILL at
//! every step boundary. Needs root and the packages `ci/setup` installs.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use strata_builder::bootloader::boot_entry;
use strata_builder::host::stop_point::STOP_AFTER_STEP_ENV;
use strata_builder::image;
use strata_builder::layout::{self, Version};
use strata_builder::manifest::{Deployment, Manifest};
use strata_builder::model::ImageLayout;
use strata_builder::progress::Step;
use strata_builder::upgrade::STEPS;

mod common;
use common::{random_file, sh, stderr, strata, wait_until_stopped};

/// A file that passes for a kernel (the x86 boot header) followed by random
/// bytes, big enough not to be stored inline.
fn random_kernel(path: &Path, bytes: usize) {
    random_file(path, bytes);
    let tail = fs::read(path).unwrap();
    fs::write(path, strata_builder::kernel::fake_kernel(&tail)).unwrap();
}

/// The first release: a kernel and initramfs big enough not to be stored
/// inline (so their extents can be compared), files that will stay, change
/// and go, and data under state dirs.
fn make_rootfs(root: &Path) {
    for d in ["etc", "boot", "usr/bin", "tmp", "var/lib/db", "home/alice"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("etc/fstab"), "tmpfs /tmp tmpfs defaults 0 0\n").unwrap();
    fs::write(root.join("etc/hostname"), "release-1\n").unwrap();
    random_kernel(&root.join("boot/vmlinuz-1.0"), 96 << 10);
    random_file(&root.join("boot/initrd.img-1.0"), 64 << 10);
    random_file(&root.join("usr/bin/unchanged"), 256 << 10);
    random_file(&root.join("usr/bin/changed"), 128 << 10);
    fs::write(root.join("usr/bin/removed"), "old tool\n").unwrap();
    fs::write(root.join("var/lib/db/data"), "factory data\n").unwrap();
    fs::write(root.join("home/alice/notes"), "alice's notes\n").unwrap();
    fs::create_dir_all(root.join("root/.ssh")).unwrap();
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(
        root.join("root/.ssh/authorized_keys"),
        "ssh-ed25519 AAAA x\n",
    )
    .unwrap();
}

/// The second release: `from` plus a changed file (same size and mtime:
/// only its contents tell), a new file, a removed one, and state data —
/// one file the live state already has (changed), two it lacks.
fn make_release_2(from: &Path, to: &Path) {
    sh(&format!("cp -a '{}' '{}'", from.display(), to.display()));
    let changed = to.join("usr/bin/changed");
    let mtime = fs::metadata(&changed).unwrap().modified().unwrap();
    random_file(&changed, 128 << 10);
    fs::File::options()
        .write(true)
        .open(&changed)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    fs::write(to.join("usr/bin/new-tool"), "new tool\n").unwrap();
    fs::remove_file(to.join("usr/bin/removed")).unwrap();
    fs::write(to.join("etc/hostname"), "release-2\n").unwrap();
    fs::write(to.join("var/lib/db/data"), "release-2 default data\n").unwrap();
    fs::create_dir_all(to.join("var/lib/newpkg")).unwrap();
    fs::write(to.join("var/lib/newpkg/state"), "new package state\n").unwrap();
    fs::write(to.join("home/alice/welcome"), "welcome to release 2\n").unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Both releases and an image of the first (label `factory`).
    fn new() -> Fixture {
        let fx = Fixture::empty();
        make_rootfs(&fx.rootfs1());
        make_release_2(&fx.rootfs1(), &fx.rootfs2());
        fx.build();
        fx
    }
    fn empty() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("strata-upgrade-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        Fixture { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn rootfs1(&self) -> PathBuf {
        self.path("rootfs1")
    }
    fn rootfs2(&self) -> PathBuf {
        self.path("rootfs2")
    }
    fn image(&self) -> PathBuf {
        self.path("sys.img")
    }
    fn manifest(&self) -> PathBuf {
        Manifest::default_path(&self.image())
    }
    /// Builds (again) the first release into the image, with a fresh
    /// filesystem UUID: btrfs must never see two mounted filesystems with
    /// one UUID (tests run in parallel).
    fn build(&self) {
        self.build_with(&[]);
    }
    /// `build` with more `strata build` arguments.
    fn build_with(&self, extra: &[&str]) {
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        let out = strata()
            .args(["build", "--force", "--size", "200M", "--rootfs"])
            .arg(self.rootfs1())
            .arg("--output")
            .arg(self.image())
            .args(["--fs-uuid", uuid.trim()])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "build: {}", stderr(&out));
    }
    fn upgrade_from(&self, rootfs: &Path, label: &str, extra: &[&str]) -> Output {
        strata()
            .arg("upgrade")
            .arg(self.image())
            .arg("--rootfs")
            .arg(rootfs)
            .args(["--label", label])
            .args(extra)
            .output()
            .unwrap()
    }
    fn upgrade(&self, label: &str, extra: &[&str]) -> Output {
        self.upgrade_from(&self.rootfs2(), label, extra)
    }
    fn layout(&self) -> ImageLayout {
        image::read(&self.image()).unwrap()
    }
    /// Loop devices backed by a file in this test's dir, and mounts of them.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let prefix = self.dir.path().to_string_lossy().into_owned();
        for entry in fs::read_dir("/sys/block").unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let backing = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .unwrap_or_default();
            if backing.starts_with(&prefix) {
                found.push(format!("/dev/{name} -> {}", backing.trim()));
            }
        }
        found
    }
    fn checksum(&self) -> String {
        sh(&format!("md5sum '{}'", self.image().display()))
    }
    /// A refused upgrade: exit 2, one error line naming every `want`, the
    /// image and manifest byte for byte as they were, nothing left attached.
    fn assert_refused(&self, out: &Output, want: &[&str], before: &(String, Vec<u8>)) {
        let e = stderr(out);
        assert_eq!(out.status.code(), Some(2), "{e}");
        let last = e.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("strata: error: "), "{e}");
        for w in want {
            assert!(last.contains(w), "expected {w:?} in {e}");
        }
        assert_eq!(self.checksum(), before.0, "the image changed: {e}");
        assert_eq!(
            fs::read(self.manifest()).unwrap_or_default(),
            before.1,
            "the manifest changed"
        );
        assert_eq!(self.leftovers(), Vec::<String>::new(), "left attached");
    }
    fn state(&self) -> (String, Vec<u8>) {
        (
            self.checksum(),
            fs::read(self.manifest()).unwrap_or_default(),
        )
    }
}

/// A read-only mount of an image, for looking at files and extents.
struct Mounted {
    mnt: tempfile::TempDir,
    loopdev: String,
}

impl Mounted {
    fn new(image: &Path) -> Mounted {
        let loopdev = sh(&format!(
            "losetup --find --show --read-only '{}'",
            image.display()
        ))
        .trim()
        .to_owned();
        let mnt = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -o ro '{loopdev}' '{}'",
            mnt.path().display()
        ));
        Mounted { mnt, loopdev }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.mnt.path().join(p)
    }
    fn extents(&self, p: &str) -> Vec<strata_builder::extents::Extent> {
        let f = fs::File::open(self.path(p)).unwrap();
        strata_builder::extents::extents(&f)
            .unwrap()
            .unwrap_or_else(|| panic!("{p} is stored inline"))
    }
    fn names(&self, p: &str) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(self.path(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

/// Whole versions (both subvolumes, run a snapshot of orig, a kernel), by
/// label.
fn whole_versions(l: &ImageLayout) -> Vec<String> {
    l.versions
        .iter()
        .filter(|v| v.orig.is_some() && v.run.is_some() && v.kernel_size.is_some())
        .map(|v| {
            assert!(
                v.run_is_snapshot_of_orig,
                "{}: run is not a snapshot",
                v.label
            );
            v.label.clone()
        })
        .collect()
}

/// The version the menu's default entry boots (through `systems/default`
/// when it goes through the link).
fn menu_boots(l: &ImageLayout) -> Option<String> {
    let boot = l.boot.as_ref()?;
    let entry = boot
        .default
        .as_deref()
        .and_then(|d| boot.entries.iter().find(|e| e.label == d))
        .or_else(|| boot.entries.first())?;
    assert!(entry.kernel_present, "{entry:?}");
    boot_entry::version_booted(entry.append.as_deref(), l.default.version.as_deref())
}

#[test]
fn upgrade_adds_a_version_beside_the_old_one() {
    let fx = Fixture::new();
    let out = fx.upgrade("v2", &["--kernel-args", "quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("version v2 (from factory) is now the default"),
        "{summary}"
    );
    assert!(
        summary.contains("3 merged (/home/alice/welcome, /var/lib/newpkg, /var/lib/newpkg/state)"),
        "{summary}"
    );
    assert!(summary.contains("left out (/home/alice, "), "{summary}");
    assert_eq!(fx.leftovers(), Vec::<String>::new());

    let l = fx.layout();
    assert_eq!(whole_versions(&l), ["factory", "v2"]);
    assert_eq!(l.default.version.as_deref(), Some("v2"));
    assert_eq!(menu_boots(&l).as_deref(), Some("v2"));
    let labels: Vec<&str> = l
        .boot
        .as_ref()
        .unwrap()
        .entries
        .iter()
        .map(|e| e.label.as_str())
        .collect();
    assert!(
        labels.contains(&"factory") && labels.contains(&"v2"),
        "{labels:?}"
    );
    assert!(l.problems.is_empty(), "{:#?}", l.problems);

    let m = Mounted::new(&fx.image());
    let (old, new) = (
        Version::new("factory").unwrap(),
        Version::new("v2").unwrap(),
    );
    let in_orig = |v: &Version, p: &str| format!("{}/{p}", v.orig());
    // Unchanged files share their extents with the old orig; the changed
    // one (same size and mtime) was written anew; the removed one is gone.
    assert_eq!(
        m.extents(&in_orig(&old, "usr/bin/unchanged")),
        m.extents(&in_orig(&new, "usr/bin/unchanged"))
    );
    let (a, b) = (
        m.extents(&in_orig(&old, "usr/bin/changed")),
        m.extents(&in_orig(&new, "usr/bin/changed")),
    );
    assert!(
        a.iter().all(|x| b.iter().all(|y| x.physical != y.physical)),
        "the changed file shares extents: {a:?} {b:?}"
    );
    assert_eq!(
        fs::read(m.path(&in_orig(&new, "usr/bin/changed"))).unwrap(),
        fs::read(fx.rootfs2().join("usr/bin/changed")).unwrap()
    );
    // Reading it (rsync compares contents) did not rewrite its inode: an
    // atime update would unshare the metadata of the whole tree.
    let atime = |p: &str| {
        let md = fs::symlink_metadata(m.path(p)).unwrap();
        (md.atime(), md.atime_nsec())
    };
    assert_eq!(
        atime(&in_orig(&old, "usr/bin/unchanged")),
        atime(&in_orig(&new, "usr/bin/unchanged"))
    );
    assert!(!m.path(&in_orig(&new, "usr/bin/removed")).exists());
    assert!(m.path(&in_orig(&old, "usr/bin/removed")).exists());
    assert_eq!(
        fs::read_to_string(m.path(&format!("{}/etc/hostname", new.run()))).unwrap(),
        "release-2\n"
    );
    // The kernel did not change: the new version's shares the old one's.
    assert_eq!(m.extents(&old.kernel()), m.extents(&new.kernel()));

    // State: every mountpoint of the new version is empty; the live data
    // stays; what the state lacked is merged.
    for dir in layout::DEFAULT_STATE_DIRS {
        for tree in [new.orig(), new.run()] {
            assert_eq!(
                m.names(&format!("{tree}/{dir}")),
                Vec::<String>::new(),
                "{tree}/{dir}"
            );
        }
    }
    assert_eq!(
        fs::read_to_string(m.path("state/var/lib/db/data")).unwrap(),
        "factory data\n"
    );
    assert_eq!(
        fs::read_to_string(m.path("state/var/lib/newpkg/state")).unwrap(),
        "new package state\n"
    );
    assert!(m.path("state/home/alice/welcome").is_file());
    let fstab = fs::read_to_string(m.path(&new.fstab(layout::Tree::Orig))).unwrap();
    assert!(
        fstab.starts_with("tmpfs /tmp tmpfs defaults 0 0\n"),
        "{fstab}"
    );
    assert!(fstab.contains(" /var btrfs subvol=/state/var,"), "{fstab}");
    let menu = fs::read_to_string(m.path(layout::BOOT_MENU)).unwrap();
    assert!(menu.contains("rootflags=subvol=systems/v2/run"), "{menu}");
    assert!(menu.contains("console=ttyS0,115200 quiet\n"), "{menu}");
    drop(m);

    let man = Manifest::load(&fx.manifest()).unwrap();
    assert_eq!(man.default, "v2");
    let labels: Vec<&str> = man.versions.iter().map(|v| v.label.as_str()).collect();
    assert_eq!(labels, ["factory", "v2"]);
    let v2 = man.version("v2").unwrap();
    assert_eq!(v2.deployed_by, Deployment::Upgrade);
    assert_eq!(v2.based_on.as_deref(), Some("factory"));
    assert_eq!(v2.root_device, man.version("factory").unwrap().root_device);
    let sd = v2.state_data.as_ref().unwrap();
    assert_eq!(sd.policy, "merge");
    for p in [
        "/var/lib/newpkg",
        "/var/lib/newpkg/state",
        "/home/alice/welcome",
    ] {
        assert!(sd.merged.iter().any(|m| m == p), "{p} not merged: {sd:?}");
        assert!(
            v2.moved_files.iter().any(|f| f.path == p),
            "{p} not in moved_files"
        );
    }
    for p in [
        "/var/lib/db/data",
        "/home/alice/notes",
        "/root/.ssh/authorized_keys",
    ] {
        assert!(
            sd.left_out.iter().any(|m| m == p),
            "{p} not left out: {sd:?}"
        );
    }
    let merged = v2
        .moved_files
        .iter()
        .find(|f| f.path == "/var/lib/newpkg/state")
        .unwrap();
    assert_eq!(
        merged.sha256.as_deref(),
        sh(&format!(
            "sha256sum '{}'",
            fx.rootfs2().join("var/lib/newpkg/state").display()
        ))
        .split(' ')
        .next()
    );
    let steps: Vec<&str> = v2.timings.iter().map(|t| t.step.as_str()).collect();
    let all: Vec<&str> = STEPS.iter().map(|s| s.name()).collect();
    assert_eq!(steps, all);

    // And once more, on top of the upgrade.
    let out = fx.upgrade_from(&fx.rootfs1(), "v3", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = fx.layout();
    assert_eq!(whole_versions(&l), ["factory", "v2", "v3"]);
    assert_eq!(menu_boots(&l).as_deref(), Some("v3"));
    let man = Manifest::load(&fx.manifest()).unwrap();
    assert_eq!(man.version("v3").unwrap().based_on.as_deref(), Some("v2"));
}

/// The words of the command line of the menu entry labelled `label`.
fn entry_words(l: &ImageLayout, label: &str) -> Vec<String> {
    let boot = l.boot.as_ref().expect("a boot menu");
    let entry = boot
        .entries
        .iter()
        .find(|e| e.label == label)
        .unwrap_or_else(|| panic!("no menu entry {label}: {boot:?}"));
    let append = entry.append.as_deref().unwrap_or_default();
    append.split_whitespace().map(str::to_owned).collect()
}

/// The extra kernel arguments given to `strata build` survive an upgrade
/// that does not mention them (they used to be lost); `--kernel-args ""`
/// drops them.
#[test]
fn upgrade_keeps_the_build_kernel_args_unless_given() {
    const ARGS: [&str; 2] = ["console=ttyS0", "strata.test=1"];
    let fx = Fixture::empty();
    make_rootfs(&fx.rootfs1());
    make_release_2(&fx.rootfs1(), &fx.rootfs2());
    fx.build_with(&["--kernel-args", &ARGS.join(" ")]);
    let has_args = |words: &[String]| ARGS.iter().all(|a| words.iter().any(|w| w == a));
    let has_none = |words: &[String]| !ARGS.iter().any(|a| words.iter().any(|w| w == a));
    let record_words = |label: &str| -> Vec<String> {
        let man = Manifest::load(&fx.manifest()).unwrap();
        let r = man
            .version(label)
            .unwrap_or_else(|| panic!("no record {label}"));
        r.kernel_args
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert!(has_args(&entry_words(&fx.layout(), "factory")));

    // No --kernel-args: the old default's are kept.
    let out = fx.upgrade("v2", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(r#"; kernel args "console=ttyS0 strata.test=1" (kept from factory); "#),
        "{summary}"
    );
    let l = fx.layout();
    assert_eq!(l.default.version.as_deref(), Some("v2"));
    let v2 = entry_words(&l, "v2");
    assert!(has_args(&v2), "{v2:?}");
    // Once each, after strata's own words (the kernel takes the last).
    assert_eq!(v2[v2.len() - 2..], ARGS, "{v2:?}");
    assert!(has_args(&record_words("v2")), "{:?}", record_words("v2"));
    let default = l.boot.as_ref().unwrap().default.clone().unwrap();
    assert!(
        has_args(&entry_words(&l, &default)),
        "menu default {default}"
    );

    // Without a manifest they are read off v2's menu entry.
    fs::remove_file(fx.manifest()).unwrap();
    let out = fx.upgrade("v3", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v3 = entry_words(&fx.layout(), "v3");
    assert_eq!(v3[v3.len() - 2..], ARGS, "{v3:?}");
    assert!(has_args(&record_words("v3")), "{:?}", record_words("v3"));

    // --kernel-args "": none, and the summary says nothing of them.
    let out = fx.upgrade("v4", &["--kernel-args", ""]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(!summary.contains("kernel args"), "{summary}");
    let l = fx.layout();
    assert_eq!(l.default.version.as_deref(), Some("v4"));
    let v4 = entry_words(&l, "v4");
    assert!(has_none(&v4), "{v4:?}");
    assert!(has_none(&record_words("v4")), "{:?}", record_words("v4"));
    assert!(
        has_none(&entry_words(&l, &default)),
        "menu default {default}"
    );
    // The older versions' entries keep theirs.
    assert!(has_args(&entry_words(&l, "factory")));
    assert!(has_args(&entry_words(&l, "v2")));
    assert!(has_args(&entry_words(&l, "v3")));
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

#[test]
fn keep_policy_and_no_default() {
    let fx = Fixture::new();
    let out = fx.upgrade("v2", &["--state-data", "keep", "--no-default"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("not the default"), "{summary}");
    let l = fx.layout();
    assert_eq!(whole_versions(&l), ["factory", "v2"]);
    assert_eq!(l.default.version.as_deref(), Some("factory"));
    assert_eq!(menu_boots(&l).as_deref(), Some("factory"));
    let m = Mounted::new(&fx.image());
    assert!(!m.path("state/var/lib/newpkg").exists());
    assert!(!m.path("state/home/alice/welcome").exists());
    assert_eq!(m.names("systems/v2/orig/var"), Vec::<String>::new());
    drop(m);
    let man = Manifest::load(&fx.manifest()).unwrap();
    assert_eq!(man.default, "factory");
    let sd = man.version("v2").unwrap().state_data.clone().unwrap();
    assert_eq!(sd.policy, "keep");
    assert!(sd.merged.is_empty());
    assert!(
        sd.left_out.iter().any(|p| p == "/var/lib/newpkg/state"),
        "{sd:?}"
    );
}

#[test]
fn copy_migration_reproduces_data_under_the_mountpoints() {
    let fx = Fixture::new();
    let out = fx.upgrade("v2", &["--state-migration", "copy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Mounted::new(&fx.image());
    assert!(m.path("systems/v2/run/var/lib/newpkg/state").is_file());
    assert!(m.path("systems/v2/run/home/alice/welcome").is_file());
    drop(m);
    let lint = image::lint(&fx.image()).unwrap();
    assert!(!lint.clean);
    let hidden: Vec<&str> = lint
        .mountpoints
        .iter()
        .filter(|c| c.version == "v2" && c.file_count > 0)
        .map(|c| c.mountpoint.as_str())
        .collect();
    assert!(
        hidden.contains(&"/var") && hidden.contains(&"/home"),
        "{hidden:?}"
    );
    assert!(
        lint.mountpoints
            .iter()
            .filter(|c| c.version == "factory")
            .all(|c| c.file_count == 0),
        "the old version got data under its mountpoints"
    );
}

#[test]
fn an_image_without_a_manifest_gets_one() {
    let fx = Fixture::new();
    fs::remove_file(fx.manifest()).unwrap();
    let out = fx.upgrade("v2", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let man = Manifest::load(&fx.manifest()).unwrap();
    let labels: Vec<&str> = man.versions.iter().map(|v| v.label.as_str()).collect();
    assert_eq!(labels, ["factory", "v2"]);
    let old = man.version("factory").unwrap();
    assert_eq!(
        old.state_dirs.created,
        ["home", "root", "opt", "srv", "var"]
    );
    assert_eq!(old.state_migration, "unknown");
    assert_eq!(man.version("v2").unwrap().root_device, old.root_device);
}

#[test]
fn refusals_change_nothing() {
    let fx = Fixture::new();
    let before = fx.state();

    let out = fx.upgrade("factory", &[]);
    fx.assert_refused(&out, &["version factory already exists"], &before);
    let out = fx.upgrade("default", &[]);
    fx.assert_refused(&out, &["invalid version label \"default\""], &before);

    // Data under a mount point of the NEW fstab that is not a state dir.
    let r3 = fx.path("rootfs3");
    sh(&format!(
        "cp -a '{}' '{}'",
        fx.rootfs2().display(),
        r3.display()
    ));
    fs::write(
        r3.join("etc/fstab"),
        "tmpfs /tmp tmpfs defaults 0 0\nLABEL=data /data ext4 defaults 0 2\n",
    )
    .unwrap();
    fs::create_dir_all(r3.join("data")).unwrap();
    fs::write(r3.join("data/file"), "hidden").unwrap();
    let out = fx.upgrade_from(&r3, "v3", &[]);
    fx.assert_refused(&out, &["/data is a mount point", "/data/file"], &before);

    // Too big: a file larger than the image's free space.
    let r4 = fx.path("rootfs4");
    sh(&format!(
        "cp -a '{}' '{}'",
        fx.rootfs2().display(),
        r4.display()
    ));
    sh(&format!(
        "fallocate -l 300M '{}'",
        r4.join("usr/bin/huge").display()
    ));
    let out = fx.upgrade_from(&r4, "v4", &[]);
    fx.assert_refused(&out, &["would not fit", "missing ", " MiB"], &before);
    let e = stderr(&out);
    let missing: f64 = e
        .split("missing ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{e}"));
    assert!(missing > 100.0, "{e}");

    // Not this layout: a plain btrfs filesystem, and not btrfs at all.
    let plain = fx.path("plain.img");
    fs::File::create(&plain)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    sh(&format!(
        "mkfs.btrfs -q -U {} '{}'",
        uuid.trim(),
        plain.display()
    ));
    let sum = sh(&format!("md5sum '{}'", plain.display()));
    let out = strata()
        .arg("upgrade")
        .arg(&plain)
        .arg("--rootfs")
        .arg(fx.rootfs2())
        .args(["--label", "v2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a strata system layout"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sh(&format!("md5sum '{}'", plain.display())), sum);
    assert!(!Manifest::default_path(&plain).exists());
    fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let out = strata()
        .arg("upgrade")
        .arg(&plain)
        .arg("--rootfs")
        .arg(fx.rootfs2())
        .args(["--label", "v2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a Btrfs filesystem"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// Starts `strata upgrade` with the stop hook at `step`, waits until it
/// has stopped itself there, and kills it with SIGKILL.
fn kill_after(fx: &Fixture, step: Step, label: &str) {
    let log = fs::File::create(fx.path(&format!("killed-{}.log", step.name()))).unwrap();
    let mut child = strata()
        .arg("upgrade")
        .arg(fx.image())
        .arg("--rootfs")
        .arg(fx.rootfs2())
        .args(["--label", label])
        .env(STOP_AFTER_STEP_ENV, step.name())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until_stopped(&mut child, &fx.path(&format!("killed-{}.log", step.name())));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// SIGKILL at every step boundary: the image boots a consistent default
/// (the old one until the flip), lists no half version, and the next
/// upgrade works (cleaning the killed run's mount, loop device and
/// partial version).
#[test]
fn sigkill_at_every_step_boundary_leaves_a_consistent_image() {
    let fx = Fixture::new();
    let committed_at = STEPS
        .iter()
        .position(|s| *s == Step::CommitVersion)
        .unwrap();
    let flipped_at = STEPS.iter().position(|s| *s == Step::SetDefault).unwrap();
    for (i, step) in STEPS.iter().enumerate() {
        let name = step.name();
        if i > 0 {
            fx.build();
        }
        kill_after(&fx, *step, "v2");

        // Read it as any next command would (that cleans the dead mount).
        let l = fx.layout();
        let (default, versions): (&str, &[&str]) = if i >= flipped_at {
            ("v2", &["factory", "v2"])
        } else if i >= committed_at {
            ("factory", &["factory", "v2"])
        } else {
            ("factory", &["factory"])
        };
        assert_eq!(l.default.version.as_deref(), Some(default), "after {name}");
        let labels: Vec<&str> = l.versions.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(labels, versions, "after {name}: {:#?}", l.problems);
        assert_eq!(whole_versions(&l), versions, "after {name}");
        assert_eq!(menu_boots(&l).as_deref(), Some(default), "after {name}");
        assert_eq!(fx.leftovers(), Vec::<String>::new(), "after {name}");
        let partial = l.problems.iter().any(|p| p.contains("debris"));
        let made_partial = (STEPS.iter().position(|s| *s == Step::SnapshotOrig).unwrap()
            ..committed_at)
            .contains(&i);
        assert_eq!(partial, made_partial, "after {name}: {:#?}", l.problems);

        // The next upgrade works: with the same label while the version
        // was not committed, with another one after (v2 is then whole).
        let label = if i >= committed_at { "v3" } else { "v2" };
        if i >= committed_at {
            let out = fx.upgrade("v2", &[]);
            assert_eq!(out.status.code(), Some(2), "after {name}: {}", stderr(&out));
        }
        let out = fx.upgrade(label, &[]);
        assert!(out.status.success(), "after {name}: {}", stderr(&out));
        if made_partial {
            assert!(
                stderr(&out).contains("removed systems/.strata-partial-v2"),
                "after {name}: {}",
                stderr(&out)
            );
        }
        let l = fx.layout();
        assert_eq!(l.default.version.as_deref(), Some(label), "after {name}");
        assert!(l.problems.is_empty(), "after {name}: {:#?}", l.problems);
    }
}

/// SIGTERM (or Ctrl-C) stops the upgrade between steps and undoes it: exit
/// 130, the partial version removed, nothing left attached.
#[test]
fn an_interrupt_undoes_the_half_made_version() {
    let fx = Fixture::new();
    let log = fx.path("interrupted.log");
    let mut child = strata()
        .arg("upgrade")
        .arg(fx.image())
        .arg("--rootfs")
        .arg(fx.rootfs2())
        .args(["--label", "v2"])
        .env(STOP_AFTER_STEP_ENV, Step::SyncRootfs.name())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until_stopped(&mut child, &log);
    let pid = child.id().to_string();
    sh(&format!("kill -TERM {pid} && kill -CONT {pid}"));
    let status = child.wait().unwrap();
    let e = fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{e}");
    assert!(e.contains("interrupted"), "{e}");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
    let l = fx.layout();
    assert_eq!(whole_versions(&l), ["factory"]);
    assert!(l.problems.is_empty(), "{:#?}", l.problems);
    assert_eq!(menu_boots(&l).as_deref(), Some("factory"));
}

/// Killed mid-way, the next upgrade cleans what the killed one left on
/// the host (its mount and loop device carry its pid) by itself.
#[test]
fn the_next_upgrade_cleans_a_killed_one() {
    let fx = Fixture::new();
    kill_after(&fx, Step::SyncRootfs, "v2");
    let out = fx.upgrade("v2", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("removed systems/.strata-partial-v2"), "{e}");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
    let l = fx.layout();
    assert_eq!(whole_versions(&l), ["factory", "v2"]);
    assert!(l.problems.is_empty(), "{:#?}", l.problems);
}

/// `--rootfs` a tar archive: extracted next to the image first (its own
/// step, then removed), the upgrade as from the directory.
#[test]
fn upgrades_from_a_tar_archive() {
    let fx = Fixture::new();
    let archive = fx.path("release-2.tar.gz");
    sh(&format!(
        "tar --xattrs --xattrs-include='*' --acls --numeric-owner --gzip -C '{}' -cf '{}' .",
        fx.rootfs2().display(),
        archive.display()
    ));
    // A label the image already has: refused before the extraction.
    let out = fx.upgrade_from(&archive, "factory", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("version factory already exists"), "{err}");
    assert!(!err.contains("extracting"), "{err}");

    let out = fx.upgrade_from(&archive, "v2", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = fx.layout();
    assert_eq!(whole_versions(&l), ["factory", "v2"]);
    assert_eq!(l.default.version.as_deref(), Some("v2"));
    let man = Manifest::load(&fx.manifest()).unwrap();
    let v2 = man.version("v2").unwrap();
    let steps: Vec<&str> = v2.timings.iter().map(|t| t.step.as_str()).collect();
    let mut all: Vec<&str> = STEPS.iter().map(|s| s.name()).collect();
    all.insert(1, Step::ExtractRootfs.name());
    assert_eq!(steps, all);
    let merged = &v2.state_data.as_ref().unwrap().merged;
    assert!(
        merged.iter().any(|p| p == "/var/lib/newpkg/state"),
        "{merged:?}"
    );
    let m = Mounted::new(&fx.image());
    assert_eq!(
        fs::read_to_string(m.path("systems/v2/orig/etc/hostname")).unwrap(),
        "release-2\n"
    );
    drop(m);
    let left: Vec<String> = fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".strata-extract."))
        .collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// An image given as a block device: the archive is extracted under the
/// temp dir (TMPDIR), not next to the device in /dev, and said where.
#[test]
fn a_device_upgraded_from_a_tar_archive_extracts_under_tmpdir() {
    let fx = Fixture::new();
    let archive = fx.path("release-2.tar");
    sh(&format!(
        "tar --numeric-owner -C '{}' -cf '{}' .",
        fx.rootfs2().display(),
        archive.display()
    ));
    let tmp = fx.path("tmp");
    fs::create_dir(&tmp).unwrap();
    let dev = sh(&format!("losetup --find --show '{}'", fx.image().display()));
    let dev = dev.trim().to_owned();
    let out = strata()
        .arg("upgrade")
        .arg(&dev)
        .arg("--rootfs")
        .arg(&archive)
        .args(["--label", "v2"])
        .arg("--manifest")
        .arg(fx.manifest())
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("under {}", tmp.display())), "{err}");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(whole_versions(&fx.layout()), ["factory", "v2"]);
}

/// A mount and loop device that are not this strata's, undone on drop.
struct Forged {
    mounts: Vec<PathBuf>,
    loopdev: String,
}

impl Drop for Forged {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loopdev)
            .status();
    }
}

/// Issue 22, item 2: a mount named like a killed strata's (the review's
/// FUSE `~/strata-mnt.999999.loop.x` with `fsname=/dev/loop0`, here a
/// tmpfs whose source names a loop device; and a real btrfs on that loop
/// device, on `fs` in a directory strata did not make) is someone else's.
/// The upgrade that cleans debris reports both and touches neither: the
/// mounts stay, the loop device stays attached.
#[test]
fn debris_cleaning_never_touches_a_mount_strata_did_not_make() {
    let fx = Fixture::new();
    let dead = 999_999;
    assert!(
        !Path::new(&format!("/proc/{dead}")).exists(),
        "pid {dead} must be free for this test"
    );
    let scratch = fx.path("victim.img");
    fs::File::create(&scratch)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    sh(&format!("mkfs.btrfs -q '{}'", scratch.display()));
    // Not autoclear: a device someone set up by hand, which stays until
    // they detach it.
    let loopdev = sh(&format!("losetup -f --show '{}'", scratch.display()))
        .trim()
        .to_owned();
    let mut forged = Forged {
        mounts: Vec::new(),
        loopdev: loopdev.clone(),
    };
    let fake = fx.path(&format!("strata-mnt.{dead}.loop.x"));
    fs::create_dir(&fake).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=1m '{loopdev}' '{}'",
        fake.display()
    ));
    forged.mounts.push(fake.clone());
    let private = fx.path(&format!("strata-mnt.{}.loop.y", dead - 1));
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
    let real = private.join("fs");
    fs::create_dir(&real).unwrap();
    sh(&format!("mount -t btrfs '{loopdev}' '{}'", real.display()));
    forged.mounts.push(real.clone());

    let out = fx.upgrade("v2", &[]);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for m in [&fake, &real] {
        let m = m.to_string_lossy().into_owned();
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(m.as_str())),
            "{m} was unmounted: {e}"
        );
        assert!(
            e.contains(&format!("left {loopdev} mounted on {m} alone")),
            "{e}"
        );
    }
    let name = loopdev.trim_start_matches("/dev/");
    assert!(
        Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists(),
        "{loopdev} was detached: {e}"
    );
    assert!(
        e.contains("not on `fs` inside a strata mount directory"),
        "{e}"
    );
    assert!(e.contains("mode 755"), "{e}");
    drop(forged);
}

/// Issue 22, item 6: the new fstab mounts a tmpfs on /var/lib/db, where
/// the live state (state/var) already has data. Refused (exit 2) naming
/// the files; with --allow-hidden-state it goes through, and `inspect
/// --lint` names the hidden state data with advice that fits it (the data
/// is in the state subvolume already: drop the mount or move the data).
#[test]
fn an_upgrade_never_hides_live_state_without_being_told() {
    let fx = Fixture::new();
    fs::write(
        fx.rootfs2().join("etc/fstab"),
        "tmpfs /tmp tmpfs defaults 0 0\ntmpfs /var/lib/db tmpfs defaults 0 0\n",
    )
    .unwrap();
    // The new rootfs brings nothing there itself: only the live state is
    // hidden.
    fs::remove_file(fx.rootfs2().join("var/lib/db/data")).unwrap();
    let before = fx.checksum();
    let out = fx.upgrade("v2", &[]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("/var/lib/db/data"), "{e}");
    assert!(e.contains("state/var/lib/db"), "{e}");
    assert!(e.contains("--allow-hidden-state"), "{e}");
    assert_eq!(fx.checksum(), before, "a refusal changes nothing");

    let out = fx.upgrade("v2", &["--allow-hidden-state"]);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("/var/lib/db/data"), "{e}");
    let lint = strata()
        .args(["inspect", "--lint"])
        .arg(fx.image())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&lint.stdout).into_owned();
    assert!(!lint.status.success(), "{text}");
    assert!(text.contains("/var/lib/db/data"), "{text}");
    assert!(text.contains("Already in a state subvolume"), "{text}");
    assert!(text.contains("in state/var/lib/db"), "{text}");
    assert!(
        !text.contains("Fix: move them into the state subvolume"),
        "{text}"
    );
}

/// A rootfs whose newest `boot/vmlinuz-*` is a link to its own /etc/shadow
/// (or any file that is not a kernel) is refused, naming the path: it
/// would otherwise become a "whole" version with a shadow file as kernel,
/// and the default.
#[test]
fn a_kernel_that_is_not_an_x86_kernel_is_refused() {
    let fx = Fixture::new();
    let before = fx.state();
    let r3 = fx.path("rootfs3");
    sh(&format!(
        "cp -a '{}' '{}'",
        fx.rootfs2().display(),
        r3.display()
    ));
    // Longer than a boot header: refused for its bytes, not its length.
    fs::write(
        r3.join("etc/shadow"),
        "root:$6$secret:19000:0:99999:7:::\n".repeat(40),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc/shadow", r3.join("boot/vmlinuz-9.9")).unwrap();
    let out = fx.upgrade_from(&r3, "v3", &[]);
    fx.assert_refused(
        &out,
        &[
            "kernel boot/vmlinuz-9.9",
            "is not an x86 Linux kernel",
            "HdrS",
        ],
        &before,
    );
}

/// An upgrade that runs out of space mid-sync says so ("no space left",
/// exit 2), leaves the image as it was, and gives the space back: the next
/// upgrade, with a small change, succeeds. (Read-only, statvfs said 0 bytes
/// free once every chunk was allocated, and every later upgrade was
/// refused; rsync's ENOSPC could end as a raw "Broken pipe … code 10".)
#[test]
fn after_an_enospc_mid_sync_a_small_upgrade_still_fits() {
    let fx = Fixture::empty();
    make_rootfs(&fx.rootfs1());
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    let out = strata()
        .args(["build", "--size", "300M", "--rootfs"])
        .arg(fx.rootfs1())
        .arg("--output")
        .arg(fx.image())
        .args(["--fs-uuid", uuid.trim()])
        .output()
        .unwrap();
    assert!(out.status.success(), "build: {}", stderr(&out));
    // Files of 4097 bytes take two 4 KiB blocks each: the fit check
    // (bytes to write plus a metadata margin) lets 29,000 of them in (also
    // the statvfs-based check of before), and they fill the 300 MiB image
    // mid-sync. Not zeros: rsync -S would write holes.
    let big = fx.path("rootfs-big");
    sh(&format!(
        "cp -a '{}' '{}'",
        fx.rootfs1().display(),
        big.display()
    ));
    let many = big.join("usr/share/many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..29_000u32 {
        let mut data = vec![0u8; 4097];
        for (j, b) in data.iter_mut().enumerate() {
            *b = (i as usize * 31 + j * 7 + 1) as u8 | 1;
        }
        data[..4].copy_from_slice(&i.to_le_bytes());
        fs::write(many.join(format!("f{i:05}")), data).unwrap();
    }
    let out = fx.upgrade_from(&big, "huge", &[]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("strata: error: no space left on the image"),
        "{e}"
    );
    assert!(!e.contains("Broken pipe"), "{e}");
    // The half-made version is gone (the image's bytes changed: btrfs
    // wrote and freed), the old one is whole and the default.
    assert_eq!(whole_versions(&fx.layout()), ["factory"]);
    assert_eq!(fx.leftovers(), Vec::<String>::new());

    // A small change (one new file) after it.
    let small = fx.path("rootfs-small");
    sh(&format!(
        "cp -a '{}' '{}'",
        fx.rootfs1().display(),
        small.display()
    ));
    fs::write(small.join("etc/motd"), "a small change\n").unwrap();
    let out = fx.upgrade_from(&small, "small", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(whole_versions(&fx.layout()), ["factory", "small"]);
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}
