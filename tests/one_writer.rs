//! One writer per image (issue 22, item 1) and loop devices that go away
//! with strata (item 3), end to end on images built here from a small
//! synthetic rootfs: concurrent upgrades, `set-default` during an upgrade
//! and on a hand-mounted image, `build --force` over an attached image,
//! and SIGKILLs in the windows where a loop device is bound but not
//! mounted. Needs root and the packages `ci/setup` installs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use strata_builder::host::stop_point::{LOOP_ATTACHED, LOOP_UNMOUNTED, STOP_AFTER_STEP_ENV};
use strata_builder::manifest::Manifest;

mod common;
use common::{random_file, sh, stderr, strata, wait_until_stopped};

fn make_rootfs(root: &Path, release: &str) {
    for d in ["etc", "boot", "usr/bin", "tmp", "var/lib/db", "home/alice"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("etc/fstab"), "tmpfs /tmp tmpfs defaults 0 0\n").unwrap();
    fs::write(root.join("etc/hostname"), format!("{release}\n")).unwrap();
    random_file(&root.join("boot/vmlinuz-1.0"), 96 << 10);
    // A kernel must look like one (the boot header strata checks).
    let mut kernel = fs::read(root.join("boot/vmlinuz-1.0")).unwrap();
    let header = strata_builder::kernel::fake_kernel(b"");
    kernel[..header.len()].copy_from_slice(&header);
    fs::write(root.join("boot/vmlinuz-1.0"), kernel).unwrap();
    random_file(&root.join("boot/initrd.img-1.0"), 64 << 10);
    // Enough files that an upgrade takes a while to sync.
    for i in 0..400 {
        random_file(&root.join(format!("usr/lib/{release}/f{i}")), 8 << 10);
    }
    fs::write(root.join("var/lib/db/data"), "factory data\n").unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("strata-one-writer-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let fx = Fixture { dir };
        make_rootfs(&fx.path("rootfs1"), "release-1");
        make_rootfs(&fx.path("rootfs2"), "release-2");
        fx.build();
        fx
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn image(&self) -> PathBuf {
        self.path("sys.img")
    }
    fn build_cmd(&self) -> Command {
        // A fresh filesystem UUID each time: btrfs refuses two mounted
        // filesystems with one UUID, and tests run in parallel.
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        let mut c = strata();
        c.args(["build", "--force", "--size", "300M", "--rootfs"])
            .arg(self.path("rootfs1"))
            .arg("--output")
            .arg(self.image())
            .args(["--fs-uuid", uuid.trim()]);
        c
    }
    fn build(&self) {
        let out = self.build_cmd().output().unwrap();
        assert!(out.status.success(), "build: {}", stderr(&out));
    }
    /// `strata SUBCOMMAND IMG LABEL` (set-default, remove), run to its end.
    fn on_image(&self, subcommand: &str, label: &str) -> Output {
        strata()
            .arg(subcommand)
            .arg(self.image())
            .arg(label)
            .output()
            .unwrap()
    }
    fn upgrade_cmd(&self, label: &str) -> Command {
        let mut c = strata();
        c.arg("upgrade")
            .arg(self.image())
            .arg("--rootfs")
            .arg(self.path("rootfs2"))
            .args(["--label", label]);
        c
    }
    fn spawn_upgrade(&self, label: &str, stop_at: Option<&str>) -> (Child, PathBuf) {
        let log = self.path(&format!("upgrade-{label}.log"));
        let mut c = self.upgrade_cmd(label);
        if let Some(s) = stop_at {
            c.env(STOP_AFTER_STEP_ENV, s);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    }
    /// Loop devices bound to a file in this test's directory, as
    /// `losetup -a` lists them.
    fn loops(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        sh("losetup -a")
            .lines()
            .filter(|l| l.contains(&prefix))
            .map(str::to_owned)
            .collect()
    }
    /// `loops`, once the kernel has had a moment to finish a detach.
    fn loops_settled(&self) -> Vec<String> {
        let start = Instant::now();
        loop {
            let l = self.loops();
            if l.is_empty() || start.elapsed() > Duration::from_secs(3) {
                return l;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn checksum(&self) -> String {
        sh(&format!("md5sum '{}'", self.image().display()))
    }
    /// `btrfs check --readonly` finds nothing wrong.
    fn assert_fs_clean(&self) {
        let out = Command::new("btrfs")
            .args(["check", "--readonly"])
            .arg(self.image())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "btrfs check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }
    /// The manifest and `strata versions` name the same default and the
    /// same versions, all whole.
    fn assert_manifest_agrees(&self) {
        let out = strata()
            .args(["versions", "--json"])
            .arg(self.image())
            .output()
            .unwrap();
        assert!(out.status.success(), "versions: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = Manifest::load(&Manifest::default_path(&self.image())).unwrap();
        assert_eq!(v["default"].as_str(), Some(m.default.as_str()), "{v:#}");
        let mut listed: Vec<&str> = v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                assert_eq!(x["status"], "whole", "{x:#}");
                x["label"].as_str().unwrap()
            })
            .collect();
        let mut recorded: Vec<&str> = m.versions.iter().map(|r| r.label.as_str()).collect();
        listed.sort_unstable();
        recorded.sort_unstable();
        assert_eq!(listed, recorded);
    }
}

/// Exit 2 and one error line naming every `want`.
fn assert_refused(out: &Output, want: &[&str]) {
    let e = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(last.starts_with("strata: error: "), "{e}");
    for w in want {
        assert!(last.contains(w), "expected {w:?} in {e}");
    }
}

/// A loop device and mount of the image made by hand, undone on drop.
struct HandMount {
    dev: String,
    mnt: Option<tempfile::TempDir>,
}

impl HandMount {
    fn attach(image: &Path) -> HandMount {
        let dev = sh(&format!("losetup --find --show '{}'", image.display()))
            .trim()
            .to_owned();
        HandMount { dev, mnt: None }
    }
    fn mount(image: &Path) -> HandMount {
        let mut h = HandMount::attach(image);
        let mnt = tempfile::tempdir().unwrap();
        sh(&format!("mount '{}' '{}'", h.dev, mnt.path().display()));
        h.mnt = Some(mnt);
        h
    }
}

impl Drop for HandMount {
    fn drop(&mut self) {
        if let Some(m) = &self.mnt {
            let _ = Command::new("umount").arg(m.path()).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The review's reproducer: two upgrades started 0.2 s apart both exited
/// 0 and left a corrupt filesystem. Exactly one may run; the other is
/// refused (exit 2) naming the one that holds the image.
#[test]
fn two_upgrades_at_once_one_is_refused_and_the_image_stays_whole() {
    let fx = Fixture::new();
    let (mut first, first_log) = fx.spawn_upgrade("v2", None);
    std::thread::sleep(Duration::from_millis(200));
    let (mut second, second_log) = fx.spawn_upgrade("v3", None);
    let (s1, s2) = (first.wait().unwrap(), second.wait().unwrap());
    let (e1, e2) = (
        fs::read_to_string(&first_log).unwrap(),
        fs::read_to_string(&second_log).unwrap(),
    );
    let (winner, loser_err, loser_pid_of_winner) = match (s1.code(), s2.code()) {
        (Some(0), Some(2)) => ("v2", &e2, first.id()),
        (Some(2), Some(0)) => ("v3", &e1, second.id()),
        other => panic!("want one 0 and one 2, got {other:?}:\nfirst: {e1}\nsecond: {e2}"),
    };
    assert!(loser_err.contains("is in use"), "{loser_err}");
    assert!(
        loser_err.contains(&format!("pid {loser_pid_of_winner} (strata upgrade")),
        "the holder is named: {loser_err}"
    );
    fx.assert_fs_clean();
    fx.assert_manifest_agrees();
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    assert_eq!(m.default, winner);
    assert_eq!(fx.loops_settled(), Vec::<String>::new());
}

/// `set-default` 2 s into an upgrade (held open at a step boundary) is
/// refused naming the upgrade; the upgrade then finishes as if alone.
#[test]
fn set_default_during_an_upgrade_is_refused() {
    let fx = Fixture::new();
    let started = Instant::now();
    let (mut up, log) = fx.spawn_upgrade("v2", Some("sync-rootfs"));
    wait_until_stopped(&mut up, &log);
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    let before = fx.checksum();
    let out = fx.on_image("set-default", "factory");
    assert_refused(
        &out,
        &["is in use", &format!("pid {} (strata upgrade", up.id())],
    );
    // Readers too: the filesystem is being written.
    let out = strata()
        .args(["versions"])
        .arg(fx.image())
        .output()
        .unwrap();
    assert_refused(&out, &["is in use", "to change it"]);
    sh(&format!("kill -CONT {}", up.id()));
    let status = up.wait().unwrap();
    assert!(status.success(), "{}", fs::read_to_string(&log).unwrap());
    assert_ne!(fx.checksum(), before, "the upgrade went on");
    fx.assert_fs_clean();
    fx.assert_manifest_agrees();
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    assert_eq!(m.default, "v2");
    assert_eq!(fx.loops_settled(), Vec::<String>::new());
}

/// A mount strata did not make: `set-default` (and an upgrade) would
/// write the filesystem beside it. Refused, naming the device and mount;
/// the image unchanged.
#[test]
fn set_default_on_a_hand_mounted_image_is_refused() {
    let fx = Fixture::new();
    let out = fx.upgrade_cmd("v2").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest_before = fs::read(Manifest::default_path(&fx.image())).unwrap();
    let hand = HandMount::mount(&fx.image());
    let before = fx.checksum();
    let out = fx.on_image("set-default", "factory");
    let mnt = hand.mnt.as_ref().unwrap().path().display().to_string();
    assert_refused(&out, &[&hand.dev, &mnt, "outside strata"]);
    let out = fx.on_image("remove", "factory");
    assert_refused(&out, &[&hand.dev, "outside strata"]);
    let out = fx.upgrade_cmd("v3").output().unwrap();
    assert_refused(&out, &[&hand.dev, "outside strata"]);
    drop(hand);
    assert_eq!(fx.checksum(), before, "the image changed");
    assert_eq!(
        fs::read(Manifest::default_path(&fx.image())).unwrap(),
        manifest_before
    );
    fx.assert_fs_clean();
    fx.assert_manifest_agrees();
}

/// `build --force` replaced an image a loop device still had open. Now
/// refused, the old image left as it was.
#[test]
fn build_force_over_an_attached_image_is_refused() {
    let fx = Fixture::new();
    let hand = HandMount::attach(&fx.image());
    let before = fx.checksum();
    let out = fx.build_cmd().output().unwrap();
    assert_refused(&out, &[&hand.dev, "(not mounted)", "outside strata"]);
    assert_eq!(fx.checksum(), before);
    let partials: Vec<String> = fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".strata-partial."))
        .collect();
    assert_eq!(partials, Vec::<String>::new());
    drop(hand);
    fx.build();
    fx.assert_fs_clean();
}

/// A SIGKILL in a window where strata's loop device is bound and not
/// mounted (after the attach, before the mount; after the unmount, before
/// the detach; for the read-only check mount and the read-write one)
/// leaves no loop device, and the next upgrade is not refused.
#[test]
fn sigkill_while_a_loop_device_is_unmounted_leaves_nothing_attached() {
    let fx = Fixture::new();
    let points = [
        format!("check-image:{LOOP_ATTACHED}"),
        format!("check-image:{LOOP_UNMOUNTED}"),
        format!("mount:{LOOP_ATTACHED}"),
        format!("finish:{LOOP_UNMOUNTED}"),
    ];
    for (i, point) in points.iter().enumerate() {
        let (mut child, log) = fx.spawn_upgrade(&format!("killed{i}"), Some(point));
        wait_until_stopped(&mut child, &log);
        assert_eq!(fx.loops().len(), 1, "at {point}: the window is open");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(fx.loops_settled(), Vec::<String>::new(), "after {point}");
        let out = fx.upgrade_cmd(&format!("next{i}")).output().unwrap();
        assert!(out.status.success(), "after {point}: {}", stderr(&out));
        assert_eq!(fx.loops_settled(), Vec::<String>::new(), "after {point}");
    }
    fx.assert_fs_clean();

    // A build killed between its attach and its mount: nothing attached,
    // and the next build removes the partial image.
    let log = fx.path("build-killed.log");
    let mut child = fx
        .build_cmd()
        .env(STOP_AFTER_STEP_ENV, format!("mount:{LOOP_ATTACHED}"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until_stopped(&mut child, &log);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(fx.loops_settled(), Vec::<String>::new(), "after the build");
    let out = fx.build_cmd().output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("removed partial image"),
        "{}",
        stderr(&out)
    );
    fx.assert_fs_clean();
}

/// The review's reproducer: an upgrade while `strata test` booted the image
/// (the backing file of its overlay) exited 0, and the test reported PASS
/// for a default it never booted. `strata test` holds a shared lock while
/// QEMU has the image: the upgrade is refused naming it, and the image is
/// left as it was.
#[test]
fn an_upgrade_while_strata_test_boots_the_image_is_refused() {
    let fx = Fixture::new();
    // A QEMU that never answers: the test run holds the image while it
    // waits for QMP (10 s), long enough to try the upgrade.
    let qemu = fx.path("qemu-that-waits");
    let started = fx.path("qemu-started");
    fs::write(
        &qemu,
        format!("#!/bin/sh\ntouch '{}'\nexec sleep 30\n", started.display()),
    )
    .unwrap();
    fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).unwrap();
    let before = fx.checksum();
    let log = fx.path("test.log");
    let mut test = strata()
        .arg("test")
        .arg(fx.image())
        .arg("--qemu")
        .arg(&qemu)
        .args(["--accel", "tcg", "--checks", "root", "--artifacts"])
        .arg(fx.path("art"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Until the test's QEMU has started, the lock is surely taken.
    let start = Instant::now();
    while !started.exists() {
        assert!(
            test.try_wait().unwrap().is_none(),
            "strata test ended early: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "QEMU never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fx.upgrade_cmd("v2").output().unwrap();
    let _ = test.kill();
    let _ = test.wait();
    assert_refused(&out, &["in use", "strata test"]);
    assert_eq!(fx.checksum(), before, "the image changed");
    fx.assert_fs_clean();
    fx.assert_manifest_agrees();
}

/// A QEMU started by hand holds no strata lock: an image it has open (its
/// disk, written by the guest at any moment) is refused to every writer,
/// naming the process.
#[test]
fn a_writer_is_refused_while_a_qemu_has_the_image_open() {
    let fx = Fixture::new();
    let before = fx.checksum();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-S", "-nodefaults", "-display", "none", "-drive"])
        .arg(format!(
            "file={},format=raw,if=none,id=d0",
            fx.image().display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // QEMU opens its drives before it listens to anything: wait for it.
    let image = fx.image();
    let start = Instant::now();
    while strata_builder::lock::opened_by_others(&image).is_empty() {
        assert!(qemu.try_wait().unwrap().is_none(), "QEMU exited");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "QEMU never opened it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let upgrade = fx.upgrade_cmd("v2").output().unwrap();
    let set_default = fx.on_image("set-default", "factory");
    let _ = qemu.kill();
    let _ = qemu.wait();
    let pid = format!("pid {}", qemu.id());
    assert_refused(&upgrade, &["is open in", &pid, "qemu-system-x86_64"]);
    assert_refused(&set_default, &["is open in", &pid]);
    assert_eq!(fx.checksum(), before, "the image changed");
    fx.assert_manifest_agrees();
}
