//! `strata upgrade --running` without a VM: a booted strata system
//! emulated honestly. In a mount namespace of its own, the image's
//! `systems/factory/run` is mounted from a loop device as the kernel mounts
//! it at boot (`subvol=`), the host's /usr, /dev, /sys and a /proc are put
//! inside, and strata runs chrooted into it: for strata, `/` is the run
//! subvolume of the image's btrfs, as in a guest. The real in-VM proof is
//! vmtest's. Also the test-only unsafe modes (`STRATA_UNSAFE_UPGRADE`).
//! Needs root, like tests/upgrade.rs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use strata_builder::host::stop_point::STOP_AFTER_STEP_ENV;
use strata_builder::image::{self, Mode};
use strata_builder::layout;
use strata_builder::steps::UNSAFE_UPGRADE_ENV;

mod common;
use common::{random_file, sh, stderr, strata, wait_until_stopped};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// An image of a small release `factory` and a second release beside it.
    fn new() -> Fixture {
        assert!(
            sh("id -u").trim() == "0",
            "this test mounts images: run it as root (ci/test does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("strata-running-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let fx = Fixture { dir };
        let r1 = fx.path("rootfs1");
        for d in ["etc", "boot", "usr/bin", "tmp", "var/lib/db", "home/alice"] {
            fs::create_dir_all(r1.join(d)).unwrap();
        }
        fs::write(r1.join("etc/hostname"), "release-1\n").unwrap();
        random_file(&r1.join("boot/vmlinuz-1.0"), 96 << 10);
        let k = fs::read(r1.join("boot/vmlinuz-1.0")).unwrap();
        fs::write(
            r1.join("boot/vmlinuz-1.0"),
            strata_builder::kernel::fake_kernel(&k),
        )
        .unwrap();
        random_file(&r1.join("boot/initrd.img-1.0"), 64 << 10);
        fs::write(r1.join("var/lib/db/data"), "factory data\n").unwrap();
        sh(&format!(
            "cp -a '{}' '{}'",
            r1.display(),
            fx.path("rootfs2").display()
        ));
        fs::write(fx.path("rootfs2/etc/hostname"), "release-2\n").unwrap();
        fs::write(fx.path("rootfs2/var/lib/db/new"), "release-2 data\n").unwrap();
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        let out = strata()
            .args(["build", "--size", "200M", "--rootfs"])
            .arg(&r1)
            .arg("--output")
            .arg(fx.image())
            .args(["--fs-uuid", uuid.trim()])
            .output()
            .unwrap();
        assert!(out.status.success(), "build: {}", stderr(&out));
        fx
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn image(&self) -> PathBuf {
        self.path("sys.img")
    }

    /// Runs `strata ARGS` as if inside the booted `factory`: see the module
    /// documentation. `rootfs2` is copied to the guest's /tmp/rootfs2 and
    /// a file is written to the live `/`, which the new version must not
    /// get (it starts from orig, never from run).
    fn in_guest(&self, args: &str, env: &str) -> Output {
        let root = self.path("guest-root");
        fs::create_dir_all(&root).unwrap();
        let script = format!(
            "set -e
mount -o loop,subvol=/{run} '{img}' '{r}'
for d in proc dev sys usr tmp; do mkdir -p '{r}'/$d; done
for l in bin sbin lib lib64; do [ -e '{r}'/$l ] || [ -L '{r}'/$l ] || ln -s usr/$l '{r}'/$l; done
mount --bind /usr '{r}/usr'
mount -t proc proc '{r}/proc'
mount --rbind /dev '{r}/dev'
mount --rbind /sys '{r}/sys'
touch '{r}/strata'
mount --bind '{bin}' '{r}/strata'
rm -rf '{r}/tmp/rootfs2'
cp -a '{r2}' '{r}/tmp/rootfs2'
echo live > '{r}/written-while-running'
exec env -i PATH=/usr/sbin:/usr/bin TMPDIR=/tmp {env} chroot '{r}' /strata {args}",
            run = layout::Version::new("factory").unwrap().run(),
            img = self.image().display(),
            r = root.display(),
            bin = env!("CARGO_BIN_EXE_strata"),
            r2 = self.path("rootfs2").display(),
        );
        // The namespace (and every mount in it) goes when the shell's exec'd
        // strata exits; the loop device (`mount -o loop`: autoclear) with it.
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn versions_json(&self) -> serde_json::Value {
        let out = strata()
            .arg("versions")
            .arg(self.image())
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "versions: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn labels(v: &serde_json::Value) -> Vec<String> {
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["label"].as_str().unwrap().to_owned())
        .collect()
}

/// No mount of strata's left in this namespace, and no loop device on the
/// image: a run inside a namespace leaves nothing outside it.
fn nothing_left(img: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(&format!(
            "{}{}.",
            strata_builder::host::mount::MOUNT_DIR_PREFIX,
            std::process::id()
        )),
        "{info}"
    );
    let loops = sh(&format!("losetup -j '{}'", img.display()));
    assert!(loops.trim().is_empty(), "loop devices left: {loops}");
}

#[test]
fn running_upgrade_adds_a_version_from_orig_and_flips_the_default() {
    let fx = Fixture::new();
    let out = fx.in_guest("upgrade --running --rootfs /tmp/rootfs2 --label v2", "");
    assert!(
        out.status.success(),
        "upgrade --running: {}\n{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("the running system (/dev/loop") && said.contains("booted factory"),
        "{said}"
    );
    assert!(said.contains("no manifest"), "{said}");
    nothing_left(&fx.image());

    let v = fx.versions_json();
    assert_eq!(labels(&v), ["factory", "v2"], "{v}");
    assert_eq!(v["default"], "v2", "{v}");

    let img = image::open(&fx.image(), Mode::ReadOnly).unwrap();
    let top = img.top();
    assert_eq!(
        fs::read_to_string(top.join("systems/v2/orig/etc/hostname")).unwrap(),
        "release-2\n"
    );
    // From orig, never the live run: the file written while running is in
    // factory's run only.
    assert!(top
        .join("systems/factory/run/written-while-running")
        .exists());
    assert!(!top.join("systems/v2/orig/written-while-running").exists());
    assert!(!top.join("systems/v2/run/written-while-running").exists());
    // State merged as offline: the new file, the live one untouched.
    assert_eq!(
        fs::read_to_string(top.join("state/var/lib/db/new")).unwrap(),
        "release-2 data\n"
    );
    assert_eq!(
        fs::read_to_string(top.join("state/var/lib/db/data")).unwrap(),
        "factory data\n"
    );
    let menu = fs::read_to_string(top.join(layout::BOOT_MENU)).unwrap();
    assert!(
        menu.contains("label v2") && menu.contains("label factory"),
        "{menu}"
    );
    img.close().unwrap();

    // The versions commands inside: listed the same; the booted version
    // cannot be removed (exit 2, named), another can.
    let out = fx.in_guest("versions --running", "");
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("factory") && table.contains("v2"), "{table}");
    let out = fx.in_guest("set-default --running factory", "");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = fx.in_guest("remove --running factory", "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("factory is the booted version"),
        "{}",
        stderr(&out)
    );
    let out = fx.in_guest("remove --running v2", "");
    assert!(out.status.success(), "{}", stderr(&out));
    nothing_left(&fx.image());
    let v = fx.versions_json();
    assert_eq!(labels(&v), ["factory"], "{v}");
    assert_eq!(v["default"], "factory", "{v}");
}

#[test]
fn running_upgrade_refuses_as_offline_does() {
    let fx = Fixture::new();
    // A label that exists: exit 2 from check-image, nothing changed.
    let out = fx.in_guest(
        "upgrade --running --rootfs /tmp/rootfs2 --label factory",
        "",
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    nothing_left(&fx.image());
    assert_eq!(labels(&fx.versions_json()), ["factory"]);
}

/// `flip-first`: stopped right after `mount`, before any of the new version
/// exists, `systems/default` already names it (read through strata's own
/// mount of the image while it is stopped). `skip-flush` warns and
/// completes.
#[test]
fn unsafe_modes_do_what_they_say_and_warn() {
    let fx = Fixture::new();
    let log = fx.path("flip-first.log");
    let mut child = strata()
        .arg("upgrade")
        .arg(fx.image())
        .arg("--rootfs")
        .arg(fx.path("rootfs2"))
        .args(["--label", "v2"])
        .env(UNSAFE_UPGRADE_ENV, "flip-first")
        .env(STOP_AFTER_STEP_ENV, "mount")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until_stopped(&mut child, &log);
    let prefix = format!(
        "{}{}.",
        strata_builder::host::mount::MOUNT_DIR_PREFIX,
        child.id()
    );
    let top = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join(strata_builder::host::mount::MOUNT_POINT_NAME))
        .expect("strata's mount of the image");
    let link = fs::read_link(top.join(layout::DEFAULT_LINK)).unwrap();
    let exists = top.join("systems/v2").exists();
    let menu = fs::read_to_string(top.join(layout::BOOT_MENU)).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let said = fs::read_to_string(&log).unwrap();
    assert_eq!(link, Path::new("v2"), "{said}");
    assert!(!exists, "systems/v2 exists already");
    assert!(menu.contains("label v2"), "{menu}");
    assert!(
        said.contains("WARNING: STRATA_UNSAFE_UPGRADE=flip-first"),
        "{said}"
    );

    // The link names nothing whole: set back by hand (which also cleans
    // the killed run's mount). Then skip-flush: the upgrade completes,
    // warning.
    let out = strata()
        .arg("set-default")
        .arg(fx.image())
        .arg("factory")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = strata()
        .arg("upgrade")
        .arg(fx.image())
        .arg("--rootfs")
        .arg(fx.path("rootfs2"))
        .args(["--label", "v3"])
        .env(UNSAFE_UPGRADE_ENV, "skip-flush")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("WARNING: STRATA_UNSAFE_UPGRADE=skip-flush"));
    assert!(stderr(&out).contains("UNSAFE skip-flush"));
    assert_eq!(fx.versions_json()["default"], "v3");
}
