//! `strata build` end to end with real mkfs.btrfs, loop devices, mounts and
//! extlinux, on small synthetic rootfs trees made here. Needs root and the
//! packages `ci/setup` installs.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use strata_builder::kernel::fake_kernel;
use strata_builder::manifest::Manifest;
use strata_builder::migrate::xattrs;

mod common;
use common::{sh, stderr, strata};

const FS_UUID: &str = "0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40";

/// A rootfs with the kinds of thing configure steps leave in state dirs.
fn make_rootfs(root: &Path) {
    for d in [
        "etc",
        "boot",
        "home/alice/.config",
        "opt/app/bin",
        "srv/www",
        "var/lib/db",
        "var/spool",
        "tmp",
        "usr/bin",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(
        root.join("etc/fstab"),
        b"# configured by hand\ntmpfs\t/tmp\ttmpfs\tdefaults 0 0",
    )
    .unwrap();
    fs::write(root.join("boot/vmlinuz-1.2.3"), fake_kernel(b"older")).unwrap();
    fs::write(
        root.join("boot/vmlinuz-1.10.0"),
        fake_kernel(b"the newest fake kernel"),
    )
    .unwrap();
    fs::write(root.join("boot/initrd.img-1.10.0"), b"fake initramfs").unwrap();
    fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    // /root/.ssh as configure steps write it: 0700 dir, 0600 key.
    fs::create_dir_all(root.join("root/.ssh")).unwrap();
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(root.join("root/.ssh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(
        root.join("root/.ssh/authorized_keys"),
        b"ssh-ed25519 AAAA test@strata\n",
    )
    .unwrap();
    fs::set_permissions(
        root.join("root/.ssh/authorized_keys"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(root.join("home/alice/.config/notes"), b"alice's notes\n").unwrap();
    sh(&format!(
        "cd '{}' && chown -R 1000:1000 home/alice && setfattr -n user.origin -v configure home/alice/.config/notes \
         && setfacl -m u:1234:r home/alice/.config/notes \
         && printf x > opt/app/bin/suid && chmod 4755 opt/app/bin/suid \
         && truncate -s 64M opt/app/sparse && printf data | dd of=opt/app/sparse bs=1 seek=1048576 conv=notrunc status=none \
         && printf 'big' > var/lib/db/data && ln var/lib/db/data var/lib/db/hardlink \
         && mkfifo var/spool/fifo && mknod var/spool/null c 1 3 \
         && ln -s ../www srv/www/self && ln -s /etc/passwd srv/abs-link \
         && touch -d '2001-02-03 04:05:06' srv/www && echo '<h1>' > srv/www/index.html && touch -h -d '2002-01-01' srv/abs-link",
        root.display()
    ));
}

struct Fixture {
    dir: tempfile::TempDir,
    /// Unique per test: btrfs must never see two mounted filesystems with
    /// one UUID (tests run in parallel).
    fs_uuid: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("strata-build-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        make_rootfs(&dir.path().join("rootfs"));
        let fs_uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .unwrap()
            .trim()
            .to_owned();
        Fixture { dir, fs_uuid }
    }
    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
    fn image(&self) -> PathBuf {
        self.dir.path().join("out.img")
    }
    fn build(&self, extra: &[&str]) -> Output {
        self.build_from(&self.rootfs(), extra)
    }
    fn build_from(&self, rootfs: &Path, extra: &[&str]) -> Output {
        strata()
            .args(["build", "--rootfs"])
            .arg(rootfs)
            .arg("--output")
            .arg(self.image())
            .args(if extra.contains(&"--fs-uuid") {
                vec![]
            } else {
                vec!["--fs-uuid", &self.fs_uuid]
            })
            .args(extra)
            .output()
            .unwrap()
    }
    /// Everything in the test dir except the rootfs: a failed build must add nothing.
    fn outputs(&self) -> Vec<String> {
        fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "rootfs")
            .collect()
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
                let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
                found.extend(
                    mounts
                        .lines()
                        .filter(|l| l.starts_with(&format!("/dev/{name} ")))
                        .map(str::to_owned),
                );
            }
        }
        found
    }
    /// A refused build: exit 2, one error line naming every `want`, no
    /// file, loop device or mount left behind.
    fn assert_refused(&self, out: &Output, want: &[&str]) {
        let e = stderr(out);
        assert_eq!(out.status.code(), Some(2), "{e}");
        // Progress lines may come first; the error is the one last line.
        let last = e.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("strata: error: "), "{e}");
        assert_eq!(e.matches("strata: error").count(), 1, "{e}");
        for w in want {
            assert!(last.contains(w), "expected {w:?} in {e}");
        }
        assert_eq!(self.outputs(), Vec::<String>::new(), "files left: {e}");
        self.assert_nothing_left();
    }

    fn assert_nothing_left(&self) {
        assert_eq!(
            self.leftovers(),
            Vec::<String>::new(),
            "loop devices or mounts left behind"
        );
    }
}

/// A read-only mount of a built image for inspection.
struct Inspect {
    mnt: tempfile::TempDir,
    loopdev: String,
}

impl Inspect {
    fn new(image: &Path) -> Inspect {
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
        Inspect { mnt, loopdev }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.mnt.path().join(p)
    }
}

impl Drop for Inspect {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

fn subvolume_field(path: &Path, field: &str) -> String {
    sh(&format!("btrfs subvolume show '{}'", path.display()))
        .lines()
        .find_map(|l| l.trim().strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap()
}

fn assert_same_entry(src: &Path, dst: &Path) {
    let (a, b) = (
        fs::symlink_metadata(src).unwrap(),
        fs::symlink_metadata(dst).unwrap(),
    );
    let what = dst.display();
    assert_eq!(a.mode(), b.mode(), "mode of {what}");
    assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "owner of {what}");
    assert_eq!(a.rdev(), b.rdev(), "device number of {what}");
    assert_eq!(
        xattrs(src).unwrap(),
        xattrs(dst).unwrap(),
        "xattrs of {what}"
    );
    if !a.is_dir() {
        assert_eq!(a.size(), b.size(), "size of {what}");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "mtime of {what}"
        );
    }
    if a.is_file() {
        assert_eq!(
            fs::read(src).unwrap(),
            fs::read(dst).unwrap(),
            "bytes of {what}"
        );
        // Holes stay holes.
        assert!(b.blocks() <= a.blocks() + 8, "{what} lost its holes");
    }
    if a.file_type().is_symlink() {
        assert_eq!(fs::read_link(src).unwrap(), fs::read_link(dst).unwrap());
    }
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(root.join(rel)).unwrap() {
        let rel = rel.join(e.unwrap().file_name());
        out.push(rel.clone());
        if fs::symlink_metadata(root.join(&rel)).unwrap().is_dir() {
            walk(root, &rel, out);
        }
    }
}

#[test]
fn builds_the_system_layout() {
    let mut fx = Fixture::new();
    // Fixed so the extlinux.conf snapshot is stable; used by this test only.
    fx.fs_uuid = FS_UUID.into();
    let out = fx.build(&["--size", "300M", "--kernel-args", "quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    fx.assert_nothing_left();

    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    assert_eq!(m.fs_uuid, FS_UUID);
    assert_eq!(m.default_version().root_device, format!("UUID={FS_UUID}"));
    assert_eq!(
        m.default_version().state_dirs.created,
        ["home", "root", "opt", "srv", "var"]
    );
    assert_eq!(m.default_version().kernel_source, "/boot/vmlinuz-1.10.0");
    let key = m
        .default_version()
        .moved_files
        .iter()
        .find(|f| f.path == "/root/.ssh/authorized_keys")
        .unwrap();
    assert_eq!((key.mode, key.uid, key.gid), (0o600, 0, 0));
    assert_eq!(
        key.sha256.as_deref(),
        Some(
            sh(&format!(
                "sha256sum '{}'",
                fx.rootfs().join("root/.ssh/authorized_keys").display()
            ))
            .split(' ')
            .next()
            .unwrap()
        )
    );

    let img = Inspect::new(&fx.image());
    let list = sh(&format!(
        "btrfs subvolume list '{}'",
        img.mnt.path().display()
    ));
    for sv in [
        "systems/factory/orig",
        "systems/factory/run",
        "state/home",
        "state/root",
        "state/opt",
        "state/srv",
        "state/var",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(&format!("path {sv}"))),
            "no subvolume {sv} in\n{list}"
        );
    }
    let orig_uuid = subvolume_field(&img.path("systems/factory/orig"), "UUID:");
    assert_eq!(
        subvolume_field(&img.path("systems/factory/run"), "Parent UUID:"),
        orig_uuid
    );
    assert_eq!(
        fs::read_link(img.path("systems/default")).unwrap(),
        Path::new("factory")
    );
    assert!(img.path("ldlinux.c32").is_file());
    assert_eq!(
        fs::read(img.path("systems/factory/kernel")).unwrap(),
        fake_kernel(b"the newest fake kernel")
    );
    assert_eq!(
        fs::read(img.path("systems/factory/initramfs")).unwrap(),
        b"fake initramfs"
    );
    insta::assert_snapshot!(
        "extlinux.conf",
        fs::read_to_string(img.path("extlinux/extlinux.conf")).unwrap()
    );
    assert_eq!(
        fs::read_link(img.path("extlinux.conf")).unwrap(),
        Path::new("extlinux/extlinux.conf")
    );

    let fstab = fs::read(img.path("systems/factory/run/etc/fstab")).unwrap();
    let mut expected = b"# configured by hand\ntmpfs\t/tmp\ttmpfs\tdefaults 0 0\n".to_vec();
    expected.extend(strata_builder::layout::FSTAB_MARKER.bytes());
    expected.push(b'\n');
    for l in &m.default_version().fstab_lines_added {
        expected.extend(l.bytes());
        expected.push(b'\n');
    }
    assert_eq!(
        String::from_utf8_lossy(&fstab),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(
        fs::metadata(img.path("systems/factory/orig/etc/fstab"))
            .unwrap()
            .mode()
            & 0o7777,
        0o644
    );

    for dir in ["home", "root", "opt", "srv", "var"] {
        let src = fx.rootfs().join(dir);
        for sys in ["orig", "run"] {
            let mp = img.path(&format!("systems/factory/{sys}/{dir}"));
            assert_eq!(
                fs::read_dir(&mp).unwrap().count(),
                0,
                "{} not empty",
                mp.display()
            );
            // The mountpoint keeps the original directory's mode and owner.
            let (a, b) = (fs::metadata(&src).unwrap(), fs::metadata(&mp).unwrap());
            assert_eq!(
                (a.mode(), a.uid(), a.gid()),
                (b.mode(), b.uid(), b.gid()),
                "{}",
                mp.display()
            );
        }
        let state = img.path(&format!("state/{dir}"));
        assert_same_entry(&src, &state);
        let mut entries = Vec::new();
        walk(&src, Path::new(""), &mut entries);
        for rel in &entries {
            assert_same_entry(&src.join(rel), &state.join(rel));
            let shown = format!("/{dir}/{}", rel.display());
            assert!(
                m.default_version()
                    .moved_files
                    .iter()
                    .any(|f| f.path == shown),
                "{shown} missing from manifest"
            );
        }
    }
    assert_eq!(
        fs::metadata(img.path("state/root")).unwrap().mode() & 0o777,
        0o700
    );
    let (a, b) = (
        fs::metadata(img.path("state/var/lib/db/data")).unwrap(),
        fs::metadata(img.path("state/var/lib/db/hardlink")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hardlink became two files");
    // Moved by reflink: state shares its extents with nothing copied twice.
    let du = sh(&format!(
        "btrfs filesystem du -s --raw '{}'",
        img.path("state/opt").display()
    ));
    assert!(du.lines().nth(1).is_some(), "{du}");
}

#[test]
fn copy_migration_leaves_data_under_the_mountpoints() {
    let fx = Fixture::new();
    let out = fx.build(&[
        "--size",
        "300M",
        "--state-migration",
        "copy",
        "--state-dirs",
        "srv,var",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let img = Inspect::new(&fx.image());
    assert!(img.path("systems/factory/run/srv/www/index.html").is_file());
    assert!(img.path("state/srv/www/index.html").is_file());
    assert!(!img.path("state/home").exists(), "home was not asked for");
    assert!(img.path("systems/factory/run/home/alice").is_dir());
}

#[test]
fn existing_fstab_entries_skip_their_state_dirs() {
    let fx = Fixture::new();
    // /home on its own partition, as a configure step would set it up; the
    // rootfs must then have nothing under /home.
    fs::remove_dir_all(fx.rootfs().join("home/alice")).unwrap();
    fs::write(
        fx.rootfs().join("etc/fstab"),
        "/dev/vda / btrfs defaults 0 1\nLABEL=home /home/ ext4 defaults 0 2\n",
    )
    .unwrap();
    let out = fx.build(&["--size", "300M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    assert_eq!(m.default_version().root_device, "/dev/vda");
    assert_eq!(
        m.default_version().state_dirs.created,
        ["root", "opt", "srv", "var"]
    );
    assert_eq!(m.default_version().state_dirs.skipped[0].dir, "home");
    assert_eq!(
        m.default_version().state_dirs.skipped[0].fstab_entry,
        "LABEL=home /home/ ext4 defaults 0 2"
    );
    let img = Inspect::new(&fx.image());
    assert!(!img.path("state/home").exists());
    let conf = fs::read_to_string(img.path("extlinux/extlinux.conf")).unwrap();
    assert!(
        conf.contains("append root=/dev/vda rootfstype=btrfs"),
        "{conf}"
    );
}

#[test]
fn data_under_another_mountpoint_is_refused() {
    let fx = Fixture::new();
    fs::write(fx.rootfs().join("tmp/leftover"), b"x").unwrap();
    let out = fx.build(&["--size", "300M"]);
    fx.assert_refused(&out, &["/tmp is a mount point", "/tmp/leftover"]);
}

/// A mount point nested in a state dir (`/var/lib/docker` on its own disk)
/// with data under it: moving /var would carry that data into
/// state/var/lib/docker, where the mount hides it. Refused from the source
/// tree, before anything is created.
#[test]
fn data_under_a_mountpoint_nested_in_a_state_dir_is_refused() {
    let fx = Fixture::new();
    let fstab = fx.rootfs().join("etc/fstab");
    let mut text = fs::read_to_string(&fstab).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("/dev/vdb /var/lib/docker ext4 defaults 0 2\n");
    fs::write(&fstab, text).unwrap();
    fs::create_dir_all(fx.rootfs().join("var/lib/docker/overlay2")).unwrap();
    let out = fx.build(&["--size", "300M"]);
    fx.assert_refused(
        &out,
        &[
            "/var/lib/docker is a mount point",
            "/var/lib/docker/overlay2",
        ],
    );
}

/// --force replaces an earlier image, never a directory or a device, and
/// the rootfs can neither be / nor hold the output.
#[test]
fn outputs_that_are_not_images_and_rootfs_traps_are_refused() {
    let fx = Fixture::new();
    fs::create_dir(fx.image()).unwrap();
    let out = fx.build(&["--size", "300M", "--force"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is a directory: refusing to replace it, even with --force"));
    fs::remove_dir(fx.image()).unwrap();

    let manifest_dir = fx.rootfs().parent().unwrap().join("mdir");
    fs::create_dir(&manifest_dir).unwrap();
    let out = fx.build(&[
        "--size",
        "300M",
        "--manifest",
        manifest_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("manifest"), "{}", stderr(&out));
    assert!(!fx.image().exists(), "refused before building");
    fs::remove_dir(&manifest_dir).unwrap();

    let out = fx.build_from(Path::new("/"), &["--size", "300M"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is the host's root directory"));

    let inside = fx.rootfs().join("srv/out.img");
    let out = strata()
        .args(["build", "--size", "300M", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(&inside)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is inside rootfs"),
        "{}",
        stderr(&out)
    );
    assert!(!inside.exists());
    fx.assert_nothing_left();
}

/// btrfs cannot mount two filesystems with one UUID: a --fs-uuid that a
/// mounted btrfs already has is refused before mkfs.
#[test]
fn an_fs_uuid_a_mounted_filesystem_has_is_refused() {
    let fx = Fixture::new();
    let out = fx.build(&["--size", "300M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = fx.image().with_extension("first");
    fs::rename(fx.image(), &first).unwrap();
    let _ = fs::remove_file(Manifest::default_path(&fx.image()));
    let mounted = Inspect::new(&first);
    let out = fx.build(&["--size", "300M"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("a mounted btrfs filesystem on this host already has it"),
        "{}",
        stderr(&out)
    );
    assert!(!fx.image().exists());
    drop(mounted);
    fs::remove_file(&first).unwrap();
}

/// Two builds to one --output without --force both pass the early
/// existence check; the final rename (RENAME_NOREPLACE) lets only one win,
/// and the other says so instead of silently replacing it.
#[test]
fn concurrent_builds_to_one_output_never_replace_each_other() {
    let fx = Fixture::new();
    let spawn = |uuid: &str| {
        strata()
            .args(["build", "--size", "300M", "--fs-uuid", uuid, "--rootfs"])
            .arg(fx.rootfs())
            .arg("--output")
            .arg(fx.image())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn("5f0c5f6e-0000-4000-8000-00000000000a");
    let b = spawn("5f0c5f6e-0000-4000-8000-00000000000b");
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let codes = [a.status.code(), b.status.code()];
    let errs = format!("{}\n{}", stderr(&a), stderr(&b));
    assert!(codes.contains(&Some(0)), "{errs}");
    assert!(codes.contains(&Some(2)), "both succeeded: {errs}");
    assert!(
        errs.contains("appeared while building") || errs.contains("already exists"),
        "{errs}"
    );
    // The image that won is the one its manifest describes.
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    let winner = if a.status.success() { "a" } else { "b" };
    assert!(
        m.fs_uuid.ends_with(&format!("00000000000{winner}")),
        "{}",
        m.fs_uuid
    );
    let i = Inspect::new(&fx.image());
    let uuid = sh(&format!(
        "blkid -s UUID -o value '{}'",
        fx.image().display()
    ));
    drop(i);
    assert_eq!(uuid.trim(), m.fs_uuid);
    fx.assert_nothing_left();
}

/// Each bad input: exit 2, one line naming the input, nothing created.
#[test]
fn bad_inputs_fail_cleanly() {
    let fx = Fixture::new();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "no disk size"),
        (vec!["--size", "4X"], "invalid size \"4X\""),
        (vec!["--size", "1M"], "image size 1.0 MiB is too small"),
        (
            vec!["--size", "300M", "--label", "a/b"],
            "invalid version label \"a/b\"",
        ),
        (
            vec!["--size", "300M", "--state-dirs", "var/lib"],
            "invalid state directory \"var/lib\"",
        ),
        (
            vec!["--size", "300M", "--fs-uuid", "nope"],
            "invalid --fs-uuid \"nope\"",
        ),
        (
            vec!["--size", "300M", "--kernel", "/nonexistent/vmlinuz"],
            "kernel /nonexistent/vmlinuz",
        ),
    ];
    for (args, want) in cases {
        fx.assert_refused(&fx.build(&args), &[want]);
    }
    let out = fx.build_from(Path::new("/nonexistent/rootfs"), &["--size", "300M"]);
    fx.assert_refused(&out, &["rootfs /nonexistent/rootfs"]);

    let empty = tempfile::tempdir().unwrap();
    let out = fx.build_from(empty.path(), &["--size", "300M"]);
    fx.assert_refused(&out, &["has no etc/ directory"]);

    for k in ["boot/vmlinuz-1.2.3", "boot/vmlinuz-1.10.0"] {
        fs::remove_file(fx.rootfs().join(k)).unwrap();
    }
    fx.assert_refused(
        &fx.build(&["--size", "300M"]),
        &["no kernel found in rootfs"],
    );
}

#[test]
fn env_fallbacks_work_like_morph() {
    let fx = Fixture::new();
    let out = strata()
        .env("DISK_SIZE", "300M")
        .env("VERSION_LABEL", "v2")
        .env("ROOT_DEVICE", "/dev/vda")
        .env("KERNEL_ARGS", "quiet")
        .args(["build", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    assert_eq!(m.default, "v2");
    assert_eq!(m.default_version().root_device, "/dev/vda");
    assert_eq!(m.image_size, 300 << 20);
    assert!(m.default_version().kernel_args.ends_with(" quiet"));
}

/// morph passed the initramfs as a path inside the rootfs.
#[test]
fn initramfs_path_names_the_rootfs_initramfs() {
    let fx = Fixture::new();
    fs::write(fx.rootfs().join("boot/custom-initrd"), b"the custom one").unwrap();
    let out = strata()
        .env("INITRAMFS_PATH", "/boot/custom-initrd")
        .args(["build", "--size", "300M", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    let v = m.default_version();
    assert_eq!(v.initramfs_source.as_deref(), Some("/boot/custom-initrd"));
    assert_eq!(v.kernel_source, "/boot/vmlinuz-1.10.0");
    let i = Inspect::new(&fx.image());
    assert_eq!(
        fs::read(i.path("systems/factory/initramfs")).unwrap(),
        b"the custom one"
    );
    drop(i);

    fs::remove_file(fx.image()).unwrap();
    let out = strata()
        .env("INITRAMFS_PATH", "/boot/missing")
        .args(["build", "--size", "300M", "--force", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("INITRAMFS_PATH /boot/missing: no such file in rootfs"),
        "{}",
        stderr(&out)
    );
    assert!(!fx.image().exists());
}

/// A fifo where strata reads a file (etc/fstab, the kernel, the initramfs)
/// would block `open` forever: refused at once, exit 2, nothing created.
#[test]
fn fifos_where_strata_reads_are_refused_not_opened() {
    for target in ["etc/fstab", "boot/initrd.img-1.10.0"] {
        let fx = Fixture::new();
        let p = fx.rootfs().join(target);
        let _ = fs::remove_file(&p);
        sh(&format!("mkfifo '{}'", p.display()));
        let mut child = strata()
            .args(["build", "--size", "300M", "--rootfs"])
            .arg(fx.rootfs())
            .arg("--output")
            .arg(fx.image())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("strata build blocked on a fifo at {target}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(2), "{target}: {err}");
        assert!(
            err.contains(target) && err.contains("a fifo"),
            "{target}: {err}"
        );
        assert!(!fx.image().exists());
        fx.assert_nothing_left();
    }
}

#[test]
fn existing_output_is_kept_without_force() {
    let fx = Fixture::new();
    fs::write(fx.image(), b"precious").unwrap();
    let out = fx.build(&["--size", "300M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("already exists (use --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(fx.image()).unwrap(), b"precious");
    let out = fx.build(&["--size", "300M", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::metadata(fx.image()).unwrap().len(), 300 << 20);
}

#[test]
fn no_space_mid_copy_fails_cleanly() {
    let fx = Fixture::new();
    // Random data does not compress or dedupe: 150 MiB of it cannot fit a
    // 160 MiB btrfs with its metadata and system chunks.
    sh(&format!(
        "head -c 150M /dev/urandom > '{}'",
        fx.rootfs().join("usr/bin/big").display()
    ));
    let out = fx.build(&["--size", "160M"]);
    fx.assert_refused(&out, &["no space left while copying", "160.0 MiB"]);
}

#[test]
fn not_root_is_refused() {
    let fx = Fixture::new();
    sh(&format!("chmod 0755 '{}'", fx.dir.path().display()));
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_strata"),
            "build",
            // Without it an ordinary user gets the rootless backend.
            "--backend",
            "privileged",
            "--rootfs",
        ])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .args(["--size", "300M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("must run as root"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fx.outputs(), Vec::<String>::new());
}

#[test]
fn sigterm_mid_copy_cleans_up() {
    use std::io::{BufRead, BufReader};
    let fx = Fixture::new();
    // Enough small files that the copy is still running when the signal lands.
    sh(&format!(
        "cd '{}' && mkdir -p usr/share/many && cd usr/share/many && seq 1 20000 | xargs touch",
        fx.rootfs().display()
    ));
    let mut child = strata()
        .args(["build", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .args(["--size", "300M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("copying rootfs") {
            break;
        }
    }
    sh(&format!("kill -TERM {}", child.id()));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
    assert_eq!(fx.outputs(), Vec::<String>::new());
    fx.assert_nothing_left();
}

/// SIGKILL cannot be caught: the mount, loop device and partial image stay.
/// They carry the dead run's pid, and the next build finds and cleans them,
/// saying what it did.
#[test]
fn debris_of_a_sigkilled_build_is_cleaned_by_the_next_run() {
    use std::io::{BufRead, BufReader};
    let fx = Fixture::new();
    sh(&format!(
        "cd '{}' && mkdir -p usr/share/many && cd usr/share/many && seq 1 20000 | xargs touch",
        fx.rootfs().display()
    ));
    let mut child = strata()
        .args(["build", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .args(["--size", "300M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("copying rootfs") {
            break;
        }
    }
    sh(&format!("kill -KILL {}", child.id()));
    child.wait().unwrap();
    assert!(
        !fx.leftovers().is_empty(),
        "a SIGKILLed build leaves its loop device and mount"
    );
    let partials: Vec<String> = fx
        .outputs()
        .into_iter()
        .filter(|n| n.contains(".strata-partial."))
        .collect();
    assert_eq!(partials.len(), 1, "{:?}", fx.outputs());

    let o = strata()
        .args(["build", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .args(["--size", "300M"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // The partial image is in this test's directory: this run removes it.
    // The dead mount and loop device may be cleaned by whichever strata
    // runs first (tests run in parallel): only that nothing is left counts.
    assert!(err.contains("removed partial image"), "{err}");
    let mut outputs = fx.outputs();
    outputs.sort();
    assert_eq!(outputs, ["out.img", "out.img.manifest.json"]);
    fx.assert_nothing_left();
}

fn sha(path: &str) -> String {
    sh(&format!("sha256sum {path}"))
}

/// The rootfs is untrusted: links inside it resolve inside it.
#[test]
fn symlinks_in_the_rootfs_never_reach_the_host() {
    let host_fstab = sha("/etc/fstab");
    let host_passwd = sha("/etc/passwd");

    // etc/fstab -> /etc/fstab points at itself inside the rootfs: a loop,
    // refused by name; the host's /etc/fstab is never read or written.
    let fx = Fixture::new();
    fs::remove_file(fx.rootfs().join("etc/fstab")).unwrap();
    symlink("/etc/fstab", fx.rootfs().join("etc/fstab")).unwrap();
    fx.assert_refused(&fx.build(&["--size", "300M"]), &["etc/fstab"]);

    // root -> / would make the move empty the host's root directory.
    fs::remove_file(fx.rootfs().join("etc/fstab")).unwrap();
    fs::remove_dir_all(fx.rootfs().join("root")).unwrap();
    symlink("/", fx.rootfs().join("root")).unwrap();
    fx.assert_refused(&fx.build(&["--size", "300M"]), &["/root is a symlink"]);
    fs::remove_file(fx.rootfs().join("root")).unwrap();
    fs::create_dir(fx.rootfs().join("root")).unwrap();

    // Absolute and ../ links that stay meaningful inside the rootfs are
    // followed there: fstab and kernel come from the rootfs, not the host.
    fs::write(fx.rootfs().join("etc/fstab.real"), b"# the rootfs's own\n").unwrap();
    symlink(
        "../../../../../etc/fstab.real",
        fx.rootfs().join("etc/fstab"),
    )
    .unwrap();
    for k in [
        "boot/vmlinuz-1.2.3",
        "boot/vmlinuz-1.10.0",
        "boot/initrd.img-1.10.0",
    ] {
        fs::remove_file(fx.rootfs().join(k)).unwrap();
    }
    fs::write(
        fx.rootfs().join("boot/kernel-real"),
        fake_kernel(b"rootfs kernel"),
    )
    .unwrap();
    symlink("/boot/kernel-real", fx.rootfs().join("vmlinuz")).unwrap();
    let out = fx.build(&["--size", "300M", "--root-device", "/dev/vda"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let img = Inspect::new(&fx.image());
    let fstab = fs::read_to_string(img.path("systems/factory/run/etc/fstab")).unwrap();
    assert!(fstab.starts_with("# the rootfs's own\n"), "{fstab}");
    assert_eq!(
        fs::read(img.path("systems/factory/kernel")).unwrap(),
        fake_kernel(b"rootfs kernel")
    );
    drop(img);

    assert_eq!(sha("/etc/fstab"), host_fstab);
    assert_eq!(sha("/etc/passwd"), host_passwd);
    assert!(Path::new("/root").is_dir());
}

/// Names are bytes: a file under a state dir named with Latin-1 bytes (not
/// UTF-8) and one whose name holds the encoding's escape character build,
/// and the manifest records both losslessly with the right sha256.
#[test]
fn non_utf8_names_under_a_state_dir_build_and_round_trip_in_the_manifest() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use strata_builder::pathenc::decode_path;

    let fx = Fixture::new();
    let latin1 = fx
        .rootfs()
        .join("srv/www")
        .join(OsStr::from_bytes(b"caf\xe9"));
    fs::write(&latin1, b"latin-1 name").unwrap();
    fs::write(fx.rootfs().join("srv/www/100%"), b"percent name").unwrap();
    // What else the move keeps is recorded for the harness to compare.
    sh(&format!(
        "cd '{}/srv/www' && f=$(printf 'caf\\351') && setfattr -n user.origin -v x \"$f\" \
         && setfacl -m u:1234:r \"$f\" && setcap cap_net_raw+ep \"$f\" && ln \"$f\" caf-link",
        fx.rootfs().display()
    ));
    let out = fx.build(&["--size", "300M"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    let moved = &m.default_version().moved_files;
    for (encoded, bytes, contents) in [
        (
            "/srv/www/caf%E9",
            &b"/srv/www/caf\xe9"[..],
            &b"latin-1 name"[..],
        ),
        ("/srv/www/100%25", b"/srv/www/100%", b"percent name"),
    ] {
        let f = moved
            .iter()
            .find(|f| f.path == encoded)
            .unwrap_or_else(|| panic!("{encoded} not in the manifest"));
        assert_eq!(decode_path(&f.path).as_deref(), Some(bytes));
        let want = sh(&format!(
            "printf %s '{}' | sha256sum",
            std::str::from_utf8(contents).unwrap()
        ));
        assert_eq!(f.sha256.as_deref(), want.split(' ').next());
    }
    let caf = moved.iter().find(|f| f.path == "/srv/www/caf%E9").unwrap();
    assert_eq!(caf.xattrs["user.origin"], "78");
    for x in ["system.posix_acl_access", "security.capability"] {
        assert!(caf.xattrs.contains_key(x), "{x}: {caf:?}");
    }
    let link = moved
        .iter()
        .find(|f| f.path == "/srv/www/caf-link")
        .unwrap();
    assert_eq!(caf.hardlink.as_deref(), Some("/srv/www/caf%E9"));
    assert_eq!(link.hardlink, caf.hardlink);
    let img = Inspect::new(&fx.image());
    assert_eq!(
        fs::read(
            img.path("state/srv/www")
                .join(OsStr::from_bytes(b"caf\xe9"))
        )
        .unwrap(),
        b"latin-1 name"
    );
}

/// What `--rootfs` gets in the tar tests: the fixture's rootfs plus the
/// attributes a tar must carry outside the state dirs (an owner no host
/// user has with setuid, a trusted.* xattr, an ACL, a hardlink pair, a
/// symlink, a device node, a fifo), archived with every attribute (and
/// holes: `--sparse`), zstd-compressed, under a name that says nothing of
/// it.
fn make_rootfs_archive(fx: &Fixture) -> PathBuf {
    sh(&format!(
        "cd '{}' && mkdir -p dev run && printf owned > usr/bin/owned \
         && chown 1234:5678 usr/bin/owned && chmod 4755 usr/bin/owned \
         && setfattr -n user.strata -v kept usr/bin/owned && setfattr -n trusted.strata -v root-only usr/bin/tool \
         && setfacl -m u:4321:rx,g:8765:r usr/bin/owned && ln usr/bin/owned usr/bin/owned-too \
         && ln -s owned usr/bin/owned-link && mknod dev/null c 1 3 && chmod 666 dev/null && mkfifo run/initctl \
         && touch -d '2003-04-05 06:07:08' usr/bin/owned",
        fx.rootfs().display()
    ));
    let archive = fx.dir.path().join("rootfs.archive");
    sh(&format!(
        "tar --xattrs --xattrs-include='*' --acls --numeric-owner --sparse --zstd -C '{}' -cf '{}' .",
        fx.rootfs().display(),
        archive.display()
    ));
    archive
}

fn getfacl(path: &Path) -> String {
    sh(&format!(
        "getfacl --omit-header --numeric --physical '{}'",
        path.display()
    ))
}

#[test]
fn builds_from_a_tar_archive_keeping_every_attribute() {
    let fx = Fixture::new();
    let archive = make_rootfs_archive(&fx);
    let out = fx.build_from(&archive, &["--size", "300M"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("extracting the rootfs archive"), "{err}");
    fx.assert_nothing_left();
    let mut outputs = fx.outputs();
    outputs.sort();
    // The extraction is gone with the build.
    assert_eq!(
        outputs,
        ["out.img", "out.img.manifest.json", "rootfs.archive"]
    );

    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    let v = m.default_version();
    assert_eq!(v.timings[0].step, "extract-rootfs");
    // Where the rootfs came from is not recorded (as for a directory).
    assert_eq!(v.kernel_source, "/boot/vmlinuz-1.10.0");
    assert!(v
        .moved_files
        .iter()
        .any(|f| f.path == "/root/.ssh/authorized_keys" && f.mode == 0o600));

    let img = Inspect::new(&fx.image());
    let state_dirs = ["home", "root", "opt", "srv", "var"];
    let mut entries = Vec::new();
    walk(&fx.rootfs(), Path::new(""), &mut entries);
    for rel in &entries {
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if rel == Path::new("etc/fstab") {
            continue;
        }
        let in_image = if state_dirs.contains(&top.as_ref()) {
            if rel.components().count() == 1 {
                continue; // the mountpoint; its contents are in state/
            }
            img.path("state").join(rel)
        } else {
            img.path("systems/factory/orig").join(rel)
        };
        assert_same_entry(&fx.rootfs().join(rel), &in_image);
    }
    let owned = img.path("systems/factory/orig/usr/bin/owned");
    let meta = fs::symlink_metadata(&owned).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o4755, 1234, 5678)
    );
    assert_eq!(meta.mtime(), 1049522828, "2003-04-05 06:07:08 UTC");
    assert_eq!(
        meta.ino(),
        fs::metadata(img.path("systems/factory/orig/usr/bin/owned-too"))
            .unwrap()
            .ino(),
        "hardlink became two files"
    );
    assert!(
        getfacl(&owned).contains("user:4321:r-x"),
        "{}",
        getfacl(&owned)
    );
    assert_eq!(getfacl(&owned), getfacl(&fx.rootfs().join("usr/bin/owned")));
    let null = fs::symlink_metadata(img.path("systems/factory/orig/dev/null")).unwrap();
    assert_eq!(null.rdev(), libc_makedev(1, 3));
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(img.path("systems/factory/orig/run/initctl"))
            .unwrap()
            .file_type()
    ));
    assert_eq!(
        fs::read_link(img.path("systems/factory/orig/usr/bin/owned-link")).unwrap(),
        Path::new("owned")
    );
    // State: the key, its 0700 directories, the ACL and the device node
    // the fixture puts under the state dirs.
    let key = img.path("state/root/.ssh/authorized_keys");
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::read(&key).unwrap(), b"ssh-ed25519 AAAA test@strata\n");
    assert_eq!(
        getfacl(&img.path("state/home/alice/.config/notes")),
        getfacl(&fx.rootfs().join("home/alice/.config/notes"))
    );
    assert_eq!(
        fs::symlink_metadata(img.path("state/var/spool/null"))
            .unwrap()
            .rdev(),
        libc_makedev(1, 3)
    );
    assert_eq!(
        fs::read_dir(img.path("systems/factory/orig/root"))
            .unwrap()
            .count(),
        0
    );
}

/// `makedev(3)` as Linux encodes it, for the small numbers used here.
fn libc_makedev(major: u64, minor: u64) -> u64 {
    (major << 8) | minor
}

#[test]
fn rootfs_files_that_are_not_archives_and_unsafe_archives_are_refused() {
    let fx = Fixture::new();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    let garbage = elsewhere.path().join("rootfs.tar");
    fs::write(&garbage, "named like a tar, but is not one\n").unwrap();
    let out = fx.build_from(&garbage, &["--size", "300M"]);
    fx.assert_refused(
        &out,
        &[
            &garbage.display().to_string(),
            "neither a directory nor a tar archive",
        ],
    );

    // `../escape` and a file through a symlink to outside: refused, and
    // nothing is written outside the extraction (which is removed).
    let evil = elsewhere.path().join("evil");
    let outside = elsewhere.path().join("outside");
    fs::create_dir_all(evil.join("etc")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    symlink(&outside, evil.join("link")).unwrap();
    fs::create_dir_all(evil.join("sub")).unwrap();
    fs::write(evil.join("sub/escape"), "out\n").unwrap();
    fs::write(evil.join("written"), "through the link\n").unwrap();
    let archive = elsewhere.path().join("evil.tar");
    // GNU tar's --transform makes the member names an attacker would.
    sh(&format!(
        "cd '{}' && tar --numeric-owner -cf '{}' etc link \
         --transform='s,^sub/escape$,../escape,' sub/escape \
         --transform='s,^written$,link/written,' written",
        evil.display(),
        archive.display()
    ));
    let listing = sh(&format!("tar -tf '{}'", archive.display()));
    assert!(
        listing.contains("../escape") && listing.contains("link/written"),
        "{listing}"
    );
    let out = fx.build_from(&archive, &["--size", "300M"]);
    fx.assert_refused(&out, &["evil.tar", "'..'"]);
    assert!(!fx.dir.path().join("escape").exists());
    assert!(!elsewhere.path().join("escape").exists());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

/// Where other users could swap the extraction for a link (a directory
/// they can write without the sticky bit), a build from an archive is
/// refused before anything is made, naming the directory.
#[test]
fn a_tar_build_into_a_directory_others_can_write_is_refused() {
    let fx = Fixture::new();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    let archive = elsewhere.path().join("r.tar");
    fs::rename(make_rootfs_archive(&fx), &archive).unwrap();
    fs::set_permissions(fx.dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = fx.build_from(&archive, &["--size", "300M"]);
    fx.assert_refused(&out, &[&fx.dir.path().display().to_string(), "sticky"]);
}

/// What can be refused without the rootfs is refused before a (long)
/// extraction of an archive: nothing is extracted.
#[test]
fn a_tar_build_refuses_bad_options_before_extracting() {
    let fx = Fixture::new();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    let archive = elsewhere.path().join("r.tar");
    fs::rename(make_rootfs_archive(&fx), &archive).unwrap();
    let missing = elsewhere.path().join("no-such-vmlinuz");
    let missing = missing.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--size", "300M", "--fs-uuid", "nope"],
            "invalid --fs-uuid",
        ),
        (vec!["--size", "1M"], "too small"),
        (
            vec!["--size", "300M", "--kernel", missing],
            "no-such-vmlinuz",
        ),
        (vec!["--size", "300M", "--label", "a/b"], "a/b"),
    ] {
        let out = fx.build_from(&archive, &args);
        fx.assert_refused(&out, &[want]);
        assert!(!stderr(&out).contains("extracting"), "{}", stderr(&out));
    }
}

/// Killed right after the extraction (SIGKILL: nothing can clean up), the
/// extracted tree is left; the next run removes it. Stopped by SIGTERM
/// there instead, the build removes it itself.
#[test]
fn an_extraction_is_removed_after_sigterm_and_after_sigkill() {
    let fx = Fixture::new();
    let archive = make_rootfs_archive(&fx);
    let extractions = || -> Vec<String> {
        fx.outputs()
            .into_iter()
            .filter(|n| n.contains(".strata-extract."))
            .collect()
    };
    for signal in ["TERM", "KILL"] {
        let mut child = strata()
            .args(["build", "--rootfs"])
            .arg(&archive)
            .arg("--output")
            .arg(fx.image())
            .args(["--size", "300M", "--fs-uuid", &fx.fs_uuid])
            .env(
                strata_builder::host::stop_point::STOP_AFTER_STEP_ENV,
                strata_builder::progress::Step::ExtractRootfs.name(),
            )
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stat = format!("/proc/{}/stat", child.id());
        let start = std::time::Instant::now();
        while !fs::read_to_string(&stat)
            .unwrap_or_default()
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('T'))
        {
            assert!(child.try_wait().unwrap().is_none(), "ended before the stop");
            assert!(start.elapsed().as_secs() < 60, "never stopped");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(extractions().len(), 1, "{:?}", fx.outputs());
        sh(&format!("kill -{signal} {0}; kill -CONT {0}", child.id()));
        let status = child.wait().unwrap();
        if signal == "TERM" {
            assert_eq!(status.code(), Some(130), "interrupted");
            assert_eq!(extractions(), Vec::<String>::new());
        } else {
            assert_eq!(extractions().len(), 1, "a SIGKILLed run cannot clean up");
        }
    }
    let out = fx.build_from(&archive, &["--size", "300M"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("removed extracted rootfs archive").count(),
        1,
        "{err}"
    );
    assert_eq!(extractions(), Vec::<String>::new());
    fx.assert_nothing_left();
}

/// A sparse file under a state dir is hashed by its extents (holes as
/// zeros, never read) to the digest `sha256sum` gives, and a SIGINT while
/// a terabyte of holes is hashed stops the build (exit 130) with nothing
/// left: no image, no loop device, no mount.
#[test]
fn sparse_files_under_a_state_dir_hash_by_extents_and_ctrl_c_stops_the_hash() {
    use std::io::{BufRead, BufReader};
    let fx = Fixture::new();
    let sparse = fx.rootfs().join("srv/sparse");
    sh(&format!(
        "truncate -s 3G '{0}' && printf head | dd of='{0}' conv=notrunc status=none \
         && printf middle | dd of='{0}' bs=1M seek=1500 conv=notrunc status=none \
         && truncate -s 4G '{0}'",
        sparse.display()
    ));
    let want = sh(&format!("sha256sum < '{}'", sparse.display()));
    let want = want.split_whitespace().next().unwrap();
    let out = fx.build(&["--size", "300M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Manifest::load(&Manifest::default_path(&fx.image())).unwrap();
    let rec = m
        .default_version()
        .moved_files
        .iter()
        .find(|f| f.path == "/srv/sparse")
        .expect("/srv/sparse recorded");
    assert_eq!(rec.sha256.as_deref(), Some(want));
    fs::remove_file(fx.image()).unwrap();
    fs::remove_file(Manifest::default_path(&fx.image())).unwrap();
    fs::remove_file(&sparse).unwrap();

    // sha256 has no shortcut over zeros: a terabyte takes minutes to hash,
    // so Ctrl-C at that step must be heard.
    sh(&format!(
        "truncate -s 1T '{}'",
        fx.rootfs().join("srv/big").display()
    ));
    let mut child = strata()
        .args(["build", "--rootfs"])
        .arg(fx.rootfs())
        .arg("--output")
        .arg(fx.image())
        .args(["--size", "300M", "--fs-uuid", &fx.fs_uuid])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let at_hash = line.contains("hashing moved files");
        seen.push(line);
        if at_hash {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("hashing")),
        "{seen:?}"
    );
    // Well inside the hash (the step itself is running).
    std::thread::sleep(Duration::from_secs(1));
    let sent = Instant::now();
    sh(&format!("kill -INT {}", child.id()));
    // Read the rest on a thread: a strata that ignores the signal would
    // hold the pipe open for minutes.
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            child.wait().unwrap();
            panic!("SIGINT during the hash was not heard within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest = rest.join().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
    assert_eq!(fx.outputs(), Vec::<String>::new());
    fx.assert_nothing_left();
}

/// A kernel that is not an x86 kernel (no "HdrS" boot header) is refused
/// with exit 2 naming it: in the rootfs (a link to its own /etc/shadow)
/// and as `--kernel` on the host.
#[test]
fn a_kernel_that_is_not_an_x86_kernel_is_refused() {
    let fx = Fixture::new();
    fs::write(fx.rootfs().join("etc/shadow"), "root:*:19000::::::\n").unwrap();
    symlink("/etc/shadow", fx.rootfs().join("boot/vmlinuz-9.9")).unwrap();
    // Its own initramfs: nothing else stands in the way of using it.
    fs::write(fx.rootfs().join("boot/initrd.img-9.9"), b"initramfs").unwrap();
    let out = fx.build(&["--size", "300M"]);
    fx.assert_refused(
        &out,
        &[
            "kernel boot/vmlinuz-9.9 in rootfs",
            "not an x86 Linux kernel",
        ],
    );
    fs::remove_file(fx.rootfs().join("boot/vmlinuz-9.9")).unwrap();
    fs::remove_file(fx.rootfs().join("boot/initrd.img-9.9")).unwrap();

    let elsewhere = tempfile::tempdir().unwrap();
    let text = elsewhere.path().join("vmlinuz-text");
    fs::write(&text, "#!/bin/sh\necho not a kernel\n").unwrap();
    let out = fx.build(&["--size", "300M", "--kernel", text.to_str().unwrap()]);
    fx.assert_refused(
        &out,
        &[text.to_str().unwrap(), "not an x86 Linux kernel", "shorter"],
    );
}

/// A truncated archive ends with exit 2 naming it, whether tar or its
/// decompressor finds the end (a truncated `.tar.gz` used to end with
/// exit 1 and tar's command line), and nothing is left.
#[test]
fn truncated_archives_compressed_or_not_are_refused_naming_them() {
    let fx = Fixture::new();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    let whole = elsewhere.path().join("whole.tar");
    sh(&format!(
        "tar --numeric-owner -C '{}' -cf '{}' . && gzip -k '{1}' && xz -k '{1}'",
        fx.rootfs().display(),
        whole.display()
    ));
    for (from, keep) in [
        ("whole.tar", "half"),
        ("whole.tar.gz", "half"),
        // gzip's header only: tar says no more than "Child returned
        // status 1".
        ("whole.tar.gz", "100"),
        // All but gzip's trailer: the tar stream is whole.
        ("whole.tar.gz", "-8"),
        ("whole.tar.xz", "half"),
    ] {
        let src = elsewhere.path().join(from);
        let len = fs::metadata(&src).unwrap().len();
        let n = match keep {
            "half" => len / 2,
            "-8" => len - 8,
            n => n.parse().unwrap(),
        };
        let cut = elsewhere.path().join(format!("cut-{keep}-{from}"));
        sh(&format!(
            "head -c {n} '{}' > '{}'",
            src.display(),
            cut.display()
        ));
        let out = fx.build_from(&cut, &["--size", "300M"]);
        fx.assert_refused(&out, &[&cut.display().to_string(), "is damaged or unsafe"]);
        assert!(!stderr(&out).contains("\"tar\""), "{}", stderr(&out));
    }
}

/// An archive whose members add up to more than the image is refused on
/// its listing, naming the largest member and the size, before a byte is
/// extracted (it used to be extracted in full first). A sparse member of an
/// archive made with `--sparse` counts only its data: that one fits.
#[test]
fn an_archive_bigger_than_the_image_is_refused_before_extraction() {
    let fx = Fixture::new();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    let huge = fx.rootfs().join("usr/bin/huge");
    // 2 GiB of holes: stored as data only with --sparse.
    sh(&format!("truncate -s 2G '{}'", huge.display()));
    let sparse = elsewhere.path().join("sparse.tar.zst");
    sh(&format!(
        "tar --numeric-owner --sparse --zstd -C '{}' -cf '{}' .",
        fx.rootfs().display(),
        sparse.display()
    ));
    let out = fx.build_from(&sparse, &["--size", "300M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    fs::remove_file(fx.image()).unwrap();
    fs::remove_file(Manifest::default_path(&fx.image())).unwrap();

    // 400 MiB written out (zeros compress to nothing: the archive is small,
    // its tar stream is not).
    sh(&format!(
        "rm '{0}' && head -c 400M /dev/zero > '{0}'",
        huge.display()
    ));
    let archive = elsewhere.path().join("big.tar.zst");
    sh(&format!(
        "tar --numeric-owner --zstd -C '{}' -cf '{}' .",
        fx.rootfs().display(),
        archive.display()
    ));
    fs::remove_file(&huge).unwrap();
    let out = fx.build_from(&archive, &["--size", "300M"]);
    fx.assert_refused(
        &out,
        &[
            &archive.display().to_string(),
            "more than the 300.0 MiB image",
            "./usr/bin/huge, 400.0 MiB",
            "nothing was extracted",
        ],
    );
}
