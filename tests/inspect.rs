//! `strata inspect` and `strata inspect --lint` on real Btrfs images made
//! here with mkfs.btrfs, losetup and `btrfs subvolume` (not with the
//! builder), plus images `strata build` makes here. Needs root: every test
//! fails, and says so, without it (ci/test runs as root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn strata(args: &[&str], image: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .arg(image)
        .output()
        .unwrap()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// These tests attach loop devices and mount: without root they cannot
/// run, and a test that returned early would pass having proven nothing.
/// So they fail, and say what would let them run.
fn require_root() {
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    assert!(
        root,
        "tests/inspect.rs needs root (loop devices, mounts): run it as root, as ci/test does \
         (ci/test must run as root: ci/setup installs mkfs.btrfs, losetup and mmdebstrap)"
    );
}

/// A read-write mount of a test image, undone on drop (also on panic).
struct Mounted {
    dir: tempfile::TempDir,
    device: String,
}

impl Mounted {
    fn new(image: &Path) -> Mounted {
        let device = sh("losetup", &["--find", "--show", image.to_str().unwrap()]);
        let dir = tempfile::tempdir().unwrap();
        sh("mount", &[&device, dir.path().to_str().unwrap()]);
        Mounted { dir, device }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn subvolume(m: &Mounted, rel: &str) {
    sh(
        "btrfs",
        &["-q", "subvolume", "create", m.path(rel).to_str().unwrap()],
    );
}

/// The contract layout in miniature: one version, state home and srv,
/// fstab with strata's lines, run a snapshot of orig, a boot menu.
fn make_image(dir: &Path, leave: &[&str]) -> PathBuf {
    let img = dir.join("test.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    sh(
        "mkfs.btrfs",
        &["-q", "-L", "strata-test", img.to_str().unwrap()],
    );
    let m = Mounted::new(&img);
    std::fs::create_dir_all(m.path("systems/factory")).unwrap();
    std::fs::create_dir_all(m.path("state")).unwrap();
    subvolume(&m, "systems/factory/orig");
    for d in ["home", "srv"] {
        subvolume(&m, &format!("state/{d}"));
    }
    let orig = m.path("systems/factory/orig");
    for d in ["etc", "home", "srv", "usr/bin"] {
        std::fs::create_dir_all(orig.join(d)).unwrap();
    }
    std::fs::write(orig.join("usr/bin/tool"), "not state").unwrap();
    std::fs::write(
        orig.join("etc/fstab"),
        "# /etc/fstab: static file system information.\n\
         # Added by strata\n\
         /dev/vda /home btrfs subvol=/state/home,defaults,rw,noatime 0 2\n\
         /dev/vda /srv btrfs subvol=state/srv,defaults,rw,noatime 0 2\n\
         /dev/vda / btrfs defaults,rw,noatime 0 1\n",
    )
    .unwrap();
    std::fs::create_dir_all(m.path("state/home/alice")).unwrap();
    std::fs::write(m.path("state/home/alice/notes.txt"), "moved\n").unwrap();
    sh(
        "btrfs",
        &[
            "-q",
            "subvolume",
            "snapshot",
            orig.to_str().unwrap(),
            m.path("systems/factory/run").to_str().unwrap(),
        ],
    );
    std::os::unix::fs::symlink("factory", m.path("systems/default")).unwrap();
    std::fs::write(m.path("systems/factory/kernel"), "kernel").unwrap();
    std::fs::create_dir_all(m.path("extlinux")).unwrap();
    std::fs::write(
        m.path("extlinux/extlinux.conf"),
        "default factory\ntimeout 10\nlabel factory\n  kernel /systems/factory/kernel\n  append root=/dev/vda rootflags=subvol=systems/factory/run rw\n",
    )
    .unwrap();
    for rel in leave {
        let p = m.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "left under a mountpoint\n").unwrap();
    }
    drop(m);
    img
}

fn no_loop_left(img: &Path) {
    let left = sh("losetup", &["-j", img.to_str().unwrap()]);
    assert!(left.is_empty(), "loop device left behind: {left}");
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn clean_image_lints_clean_and_shows_its_layout() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let img = make_image(d.path(), &[]);

    let o = strata(&["inspect", "--lint"], &img);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("Clean"), "{text}");
    assert!(
        text.contains("checked 4 mountpoints in factory/orig, factory/run"),
        "{text}"
    );

    let o = strata(&["inspect"], &img);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "label \"strata-test\"",
        "default -> factory",
        "factory  (default)",
        "snapshot of orig",
        "systems/factory/orig/etc/fstab",
        "  3 + /dev/vda /home btrfs",
        "  2   # Added by strata",
        "state/home",
        "kernel /systems/factory/kernel",
        "Problems\n  - systems/factory/initramfs",
    ] {
        // initramfs is optional in the contract: not a problem.
        if want.starts_with("Problems") {
            assert!(!text.contains(want), "{text}");
            continue;
        }
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    let v = json(&strata(&["inspect", "--json"], &img));
    assert_eq!(v["default"]["version"], "factory");
    assert_eq!(v["versions"][0]["run_is_snapshot_of_orig"], true);
    let subvols: Vec<&str> = v["subvolumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        subvols,
        [
            "systems/factory/orig",
            "state/home",
            "state/srv",
            "systems/factory/run"
        ]
    );
    let run = &v["subvolumes"][3];
    assert_eq!(run["parent_uuid"], v["subvolumes"][0]["uuid"]);
    assert_eq!(v["problems"], serde_json::json!([]));
    let added: Vec<bool> = v["versions"][0]["fstab"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["added"].as_bool().unwrap())
        .collect();
    assert_eq!(added, [false, false, true, true, true]);
    no_loop_left(&img);
}

#[test]
fn lint_names_the_mountpoint_and_the_hidden_file() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let img = make_image(
        d.path(),
        &[
            "systems/factory/run/srv/stale.html",
            "systems/factory/orig/home/bob/.profile",
        ],
    );
    let o = strata(&["inspect", "--lint"], &img);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("factory/run: /srv is not empty"), "{text}");
    assert!(text.contains("/srv/stale.html"), "{text}");
    assert!(text.contains("factory/orig: /home is not empty"), "{text}");
    assert!(text.contains("/home/bob/.profile"), "{text}");
    assert!(
        text.contains("Found 3 entries hidden under 2 mountpoints"),
        "{text}"
    );

    let o = strata(&["inspect", "--lint", "--json"], &img);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert_eq!(v["clean"], false);
    let bad: Vec<(String, String, Vec<String>)> = v["mountpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "not-empty")
        .map(|m| {
            (
                format!(
                    "{}/{}",
                    m["version"].as_str().unwrap(),
                    m["tree"].as_str().unwrap()
                ),
                m["mountpoint"].as_str().unwrap().to_owned(),
                m["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        format!(
                            "{} {} {}",
                            f["path"].as_str().unwrap(),
                            f["type"],
                            f["size"]
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        bad,
        [
            (
                "factory/orig".to_owned(),
                "/home".to_owned(),
                vec![
                    "/home/bob \"dir\" 0".to_owned(),
                    "/home/bob/.profile \"file\" 24".to_owned()
                ]
            ),
            (
                "factory/run".to_owned(),
                "/srv".to_owned(),
                vec!["/srv/stale.html \"file\" 24".to_owned()]
            ),
        ]
    );
    no_loop_left(&img);
}

#[test]
fn bad_input_exits_2() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing.img");
    let o = strata(&["inspect", "--lint"], &missing);
    assert_eq!(o.status.code(), Some(2));

    let zeros = d.path().join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    for args in [&["inspect"][..], &["inspect", "--lint"]] {
        let o = strata(args, &zeros);
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("not a Btrfs filesystem"));
    }

    // Not root: the appliance reads the image (tests/rootless.rs); an image
    // the user cannot read is refused before it starts.
    let img = make_image(d.path(), &[]);
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_strata"))
        .args(["inspect", "--lint"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Btrfs, but not a system layout.
    let plain = d.path().join("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    sh("mkfs.btrfs", &["-q", plain.to_str().unwrap()]);
    let o = strata(&["inspect", "--lint"], &plain);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a strata system layout"));
    let o = strata(&["inspect"], &plain);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no systems/ directory"));
    no_loop_left(&plain);
}

/// A small rootfs `strata build` accepts: a kernel with a boot header and
/// an initramfs (a UUID root device needs one), an fstab, and data under two state dirs for the build to move.
fn synthetic_rootfs(root: &Path) {
    for d in ["etc", "boot", "usr/bin", "srv/www", "home/alice"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/fstab"), "tmpfs /tmp tmpfs defaults 0 0\n").unwrap();
    std::fs::write(root.join("usr/bin/tool"), "not state\n").unwrap();
    std::fs::write(root.join("srv/www/index.html"), "<p>state</p>\n").unwrap();
    std::fs::write(root.join("home/alice/notes.txt"), "state\n").unwrap();
    // Strata refuses a kernel without the x86 boot header.
    std::fs::write(
        root.join("boot/vmlinuz-1.0"),
        strata_builder::kernel::fake_kernel(b"synthetic kernel"),
    )
    .unwrap();
    std::fs::write(root.join("boot/initrd.img-1.0"), "synthetic initramfs\n").unwrap();
}

/// What the builder makes (not the hand-made layout above): `inspect
/// --lint` finds it clean and leaves it untouched; a copy with a file
/// dropped into the default version's run/srv is caught and named.
/// Built here, so it runs wherever the tests run (it used to look for a
/// prototype image that CI never had, and passed without checking).
#[test]
fn built_image_lints_clean_untouched_and_a_dropped_file_is_caught() {
    require_root();
    let d = tempfile::Builder::new()
        .prefix("strata-inspect-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let rootfs = d.path().join("rootfs");
    synthetic_rootfs(&rootfs);
    let img = d.path().join("built.img");
    // A fresh filesystem UUID: the copy below is mounted while other tests
    // may mount their own builds, and btrfs refuses two with one UUID.
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    let b = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "build",
            "--size",
            "300M",
            "--fs-uuid",
            uuid.trim(),
            "--rootfs",
        ])
        .arg(&rootfs)
        .arg("--output")
        .arg(&img)
        .output()
        .unwrap();
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));

    // Read-only all the way down: the image itself is safe to inspect.
    let before = std::fs::metadata(&img).unwrap().modified().unwrap();
    let o = strata(&["inspect", "--lint"], &img);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("Clean"), "{text}");
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), before);
    no_loop_left(&img);
    let default = json(&strata(&["inspect", "--json"], &img))["default"]["version"]
        .as_str()
        .unwrap()
        .to_owned();

    let copy = d.path().join("broken.img");
    sh(
        "cp",
        &[
            "--sparse=always",
            img.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    {
        let m = Mounted::new(&copy);
        std::fs::write(
            m.path(&format!("systems/{default}/run/srv/dropped.txt")),
            "oops\n",
        )
        .unwrap();
    }
    let o = strata(&["inspect", "--lint"], &copy);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("{default}/run: /srv is not empty")),
        "{text}"
    );
    assert!(text.contains("/srv/dropped.txt"), "{text}");
    no_loop_left(&copy);
}

/// `strata build --state-migration copy` of the Debian fixture leaves the
/// data under all five mountpoints; the default build leaves none. Needs
/// mmdebstrap for the fixture (cached: shared with ci/demo and ci/test).
#[test]
fn builder_copy_migration_is_caught_for_all_five_state_dirs() {
    require_root();
    // ci/setup vm installs it (ci/test runs that); without it the fixture
    // cannot be made, and passing would prove nothing.
    assert!(
        Command::new("mmdebstrap").arg("--version").output().is_ok(),
        "needs mmdebstrap for the Debian fixture: run ci/setup vm (ci/test does)"
    );
    let fx = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["fixture", "debian"])
        .output()
        .unwrap();
    assert!(
        fx.status.success(),
        "{}",
        String::from_utf8_lossy(&fx.stderr)
    );
    let rootfs = String::from_utf8_lossy(&fx.stdout).trim().to_owned();
    let d = tempfile::Builder::new()
        .prefix("strata-inspect-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    for (migration, want) in [("move", 0), ("copy", 1)] {
        let img = d.path().join(format!("{migration}.img"));
        let b = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "build",
                "--size",
                "3G",
                "--state-migration",
                migration,
                "--rootfs",
            ])
            .arg(&rootfs)
            .arg("--output")
            .arg(&img)
            .output()
            .unwrap();
        assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
        let o = strata(&["inspect", "--lint", "--json"], &img);
        assert_eq!(o.status.code(), Some(want), "{migration}");
        let v = json(&o);
        let mut bad: Vec<String> = v["mountpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["status"] == "not-empty" && m["tree"] == "run")
            .map(|m| m["mountpoint"].as_str().unwrap().to_owned())
            .collect();
        bad.sort();
        if migration == "move" {
            assert!(bad.is_empty(), "{bad:?}");
            continue;
        }
        assert_eq!(bad, ["/home", "/opt", "/root", "/srv", "/var"]);
        let root = v["mountpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["tree"] == "run" && m["mountpoint"] == "/root")
            .unwrap();
        assert!(
            root["files"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["path"] == "/root/.ssh/authorized_keys"),
            "{root}"
        );
        no_loop_left(&img);
    }
}
