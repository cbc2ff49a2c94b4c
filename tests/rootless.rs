//! `strata build` as an ordinary user (the rootless backend), end to end:
//! a user created here builds an image from a tar archive, and it must
//! equal the privileged build of the same rootfs (`strata inspect --json`,
//! the manifest, the device nodes) except UUIDs, subvolume ids and times;
//! and the user's `strata inspect` (through the appliance) must print what
//! root's (through a loop mount) prints for the same image.
//!
//! Needs root (to create the user and to run the privileged build and
//! inspect), and what a rootless build needs: uidmap, a subordinate id range
//! (useradd gives one), libguestfs-tools with a readable kernel, btrfs-progs
//! with `mkfs.btrfs --subvol`. Nothing is skipped: a missing piece fails
//! the test with the reason.

use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const USER: &str = "strata-rootless";

/// The tests run as one user and look at that user's processes (no QEMU
/// left behind): they take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-ec", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The test user, with a subordinate id range.
fn ensure_user() {
    assert!(
        rustix_is_root(),
        "tests/rootless.rs must run as root: it creates the user {USER} and runs the privileged build to compare"
    );
    if Command::new("id")
        .arg(USER)
        .output()
        .unwrap()
        .status
        .success()
    {
        return;
    }
    sh(&format!("useradd --create-home {USER}"));
    let has_range = |file: &str| {
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{USER}:")))
    };
    if !has_range("/etc/subuid") || !has_range("/etc/subgid") {
        // useradd gives one when /etc/login.defs allows; else pick a free one.
        sh(&format!(
            "usermod --add-subuids 300000-365535 --add-subgids 300000-365535 {USER}"
        ));
    }
}

fn rustix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every kind of entry the layout contract lists, with owners the user
/// could not create outside a user namespace.
fn make_rootfs(root: &Path) {
    for d in [
        "etc",
        "boot",
        "dev",
        "home/alice",
        "opt/app/bin",
        "root/.ssh",
        "srv/www",
        "var/lib/db",
        "var/spool",
        "usr/bin",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(
        root.join("boot/vmlinuz-6.1.0"),
        strata_builder::kernel::fake_kernel(b"a fake kernel"),
    )
    .unwrap();
    fs::write(root.join("boot/initrd.img-6.1.0"), b"a fake initramfs").unwrap();
    sh(&format!(
        "cd '{}' && printf '# fstab\\n' > etc/fstab \
         && printf 'alice notes\\n' > home/alice/notes && chown -R 1000:1000 home/alice \
         && setfattr -n user.origin -v configure home/alice/notes && setfacl -m u:1234:r home/alice/notes \
         && chmod 0700 root root/.ssh && printf 'ssh-ed25519 AAAA t\\n' > root/.ssh/authorized_keys \
         && chmod 0600 root/.ssh/authorized_keys \
         && printf x > opt/app/bin/suid && chmod 4755 opt/app/bin/suid \
         && printf x > usr/bin/pinger && chmod 0755 usr/bin/pinger && setcap cap_net_raw+ep usr/bin/pinger \
         && printf x > usr/bin/shadowed && chown 0:42 usr/bin/shadowed && chmod 2750 usr/bin/shadowed \
         && truncate -s 16M opt/app/sparse && printf data | dd of=opt/app/sparse bs=1 seek=1048576 conv=notrunc status=none \
         && printf big > var/lib/db/data && ln var/lib/db/data var/lib/db/hardlink \
         && mkfifo var/spool/fifo && mknod var/spool/null c 1 3 && chown 0:5 var/spool/null \
         && mknod dev/null c 1 3 && chmod 0666 dev/null && mknod dev/sda b 8 0 && chmod 0660 dev/sda \
         && ln -s ../www srv/www/self && ln -s /etc/passwd srv/abs-link \
         && echo '<h1>' > srv/www/index.html",
        root.display()
    ));
}

/// inspect's view without what differs between any two builds: UUIDs,
/// subvolume ids and generations (mkfs numbers subvolumes in its own
/// order), the image path.
fn normalize(v: &mut Value) {
    const VOLATILE: [&str; 6] = [
        "id",
        "uuid",
        "parent_uuid",
        "parent_id",
        "generation",
        "subvolume",
    ];
    match v {
        Value::Object(m) => {
            for k in VOLATILE {
                m.remove(k);
            }
            m.remove("image");
            for (_, x) in m.iter_mut() {
                normalize(x);
            }
        }
        Value::Array(a) => {
            for x in a.iter_mut() {
                normalize(x);
            }
        }
        _ => {}
    }
}

fn inspect(image: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["inspect", "--json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "inspect: {}", stderr(&out));
    comparable(&out.stdout)
}

/// `strata inspect --json` output without what differs between builds.
fn comparable(json: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(json).unwrap();
    // versions[].orig/run are subvolume ids.
    for ver in v["versions"].as_array_mut().into_iter().flatten() {
        let m = ver.as_object_mut().unwrap();
        m.remove("orig");
        m.remove("run");
    }
    if let Some(s) = v["subvolumes"].as_array_mut() {
        s.sort_by_key(|x| x["path"].as_str().unwrap_or_default().to_owned());
    }
    normalize(&mut v);
    v
}

/// The manifest's version record without times and the backend.
fn record(manifest: &Path) -> Value {
    let mut m: Value = serde_json::from_slice(&fs::read(manifest).unwrap()).unwrap();
    let r = m["versions"][0].as_object_mut().unwrap();
    for k in ["timings", "deployed_at", "backend"] {
        r.remove(k);
    }
    // The same entries; a device node (made by the appliance) is listed
    // after the entries the move saw.
    if let Some(Value::Array(files)) = r.get_mut("moved_files") {
        files.sort_by_key(|f| f["path"].as_str().unwrap_or_default().to_owned());
    }
    m["versions"][0].take()
}

/// `stat` of entries inside an image, mounted read-only.
fn stat_in(image: &Path, paths: &[&str]) -> String {
    let mnt = tempfile::tempdir().unwrap();
    sh(&format!(
        "mount -o ro,loop '{}' '{}'",
        image.display(),
        mnt.path().display()
    ));
    let mut out = String::new();
    for p in paths {
        out.push_str(&sh(&format!(
            "cd '{}' && stat -c '%n %F %a %u:%g %t:%T' '{p}' && getfattr -h -d -m - -e hex '{p}'",
            mnt.path().display()
        )));
    }
    sh(&format!("umount '{}'", mnt.path().display()));
    out
}

#[test]
fn an_ordinary_user_builds_the_privileged_image_from_a_tar_archive() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    ensure_user();
    let dir = tempfile::Builder::new()
        .prefix("strata-rootless-test.")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs);
    let archive = dir.path().join("rootfs.tar");
    sh(&format!(
        "tar --xattrs --xattrs-include='*' --acls --numeric-owner --format=posix -C '{}' -cf '{}' . && chmod 0644 '{}'",
        rootfs.display(),
        archive.display(),
        archive.display()
    ));
    // The test binary's target dir need not be readable by the user.
    let exe = dir.path().join("strata");
    fs::copy(env!("CARGO_BIN_EXE_strata"), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    sh(&format!("chown {USER}: '{}'", out_dir.display()));
    let uuid = sh("cat /proc/sys/kernel/random/uuid").trim().to_owned();

    let rootless = out_dir.join("rootless.img");
    let built = as_user(
        &exe,
        &[
            "build",
            "--rootfs",
            archive.to_str().unwrap(),
            "--output",
            rootless.to_str().unwrap(),
            "--size",
            "512M",
            "--fs-uuid",
            &uuid,
        ],
    );
    assert!(
        built.status.success(),
        "rootless build as {USER} failed: {}",
        stderr(&built)
    );
    assert!(
        stderr(&built).contains("backend: rootless"),
        "{}",
        stderr(&built)
    );

    let privileged = dir.path().join("privileged.img");
    let built = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["build", "--backend", "privileged", "--rootfs"])
        .arg(&rootfs)
        .arg("--output")
        .arg(&privileged)
        .args(["--size", "512M", "--fs-uuid", &uuid])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "privileged build: {}",
        stderr(&built)
    );

    assert_eq!(inspect(&rootless), inspect(&privileged));
    let manifest = |img: &Path| {
        img.with_file_name(format!(
            "{}.manifest.json",
            img.file_name().unwrap().to_string_lossy()
        ))
    };
    assert_eq!(record(&manifest(&rootless)), record(&manifest(&privileged)));
    let m: Value = serde_json::from_slice(&fs::read(manifest(&rootless)).unwrap()).unwrap();
    assert_eq!(m["versions"][0]["backend"], "rootless");

    // What inspect does not show: the entries the appliance made, and
    // owners, modes and links of the staged tree.
    let paths = [
        "systems/factory/orig/dev/null",
        "systems/factory/run/dev/null",
        "systems/factory/run/dev/sda",
        "state/var/spool/null",
        "state/var/spool/fifo",
        "state/home/alice/notes",
        "state/root",
        "systems/factory/run/opt",
        "state/opt/app/bin/suid",
        "systems/factory/run/usr/bin/shadowed",
        // A file capability: written as a namespaced (v3) one inside the
        // user namespace, read back by mkfs there as the plain one.
        "systems/factory/run/usr/bin/pinger",
    ];
    let seen = stat_in(&rootless, &paths);
    assert!(seen.contains("security.capability=0x"), "{seen}");
    assert_eq!(seen, stat_in(&privileged, &paths));

    // The user inspects without root (the appliance serves the image over
    // FUSE to the same reader): byte for byte what root's loop mount shows.
    for args in [&["--json"][..], &["--lint", "--json"]] {
        let by_user = as_user(
            &exe,
            &[&["inspect"][..], args, &[rootless.to_str().unwrap()]].concat(),
        );
        let as_root = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("inspect")
            .args(args)
            .arg(&rootless)
            .output()
            .unwrap();
        assert!(
            by_user.status.success(),
            "inspect {args:?} as {USER}: {}",
            stderr(&by_user)
        );
        assert!(
            stderr(&by_user).contains("libguestfs appliance"),
            "{}",
            stderr(&by_user)
        );
        assert_eq!(by_user.status.code(), as_root.status.code(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&by_user.stdout),
            String::from_utf8_lossy(&as_root.stdout),
            "inspect {args:?}: {USER} (appliance) vs root (loop mount)"
        );
    }
    // Nothing of the appliance is left: no FUSE mount, no QEMU of the user.
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("strata-inspect."), "{mounts}");
    let qemu = Command::new("pgrep")
        .args(["-a", "-u", USER, "qemu"])
        .output()
        .unwrap();
    assert!(
        qemu.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&qemu.stdout)
    );
}

/// Runs the strata at `exe` as the test user, in `cwd`.
fn as_user(exe: &Path, args: &[&str]) -> Output {
    Command::new("runuser")
        .args([
            "-u",
            USER,
            "--",
            "env",
            &format!("HOME=/home/{USER}"),
            &format!("USER={USER}"),
        ])
        .arg(exe)
        .args(args)
        .output()
        .unwrap()
}

/// The end-to-end case: the Debian fixture, as the tar archive
/// `strata fixture debian --tar` makes (ci/test sets
/// STRATA_TEST_FIXTURE_TAR), built by an ordinary user, inspected by that
/// user (equal to root's view of the privileged build of the same rootfs),
/// then booted and checked by that same user with every check (QEMU under
/// TCG: the user has no /dev/kvm access, and auto says so).
#[test]
fn an_ordinary_user_builds_the_fixture_and_strata_test_passes_on_it() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    ensure_user();
    let archive = std::env::var_os("STRATA_TEST_FIXTURE_TAR")
        .map(std::path::PathBuf::from)
        .expect("STRATA_TEST_FIXTURE_TAR is not set: this test needs the fixture as a tar archive (ci/test makes it with `strata fixture debian --tar`); it does not skip");
    assert!(archive.is_file(), "{} is missing", archive.display());
    let dir = tempfile::Builder::new()
        .prefix("strata-rootless-fixture.")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("strata");
    fs::copy(env!("CARGO_BIN_EXE_strata"), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    // The archive may sit in a directory the user cannot enter.
    let readable = dir.path().join("fixture.tar");
    sh(&format!(
        "cp --reflink=auto '{}' '{}' && chmod 0644 '{}'",
        archive.display(),
        readable.display(),
        readable.display()
    ));
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    sh(&format!("chown {USER}: '{}'", out.display()));
    let image = out.join("fixture.img");
    let img = image.to_str().unwrap();
    // The privileged build of the same rootfs (ci/test's STRATA_TEST_IMAGE):
    // its filesystem UUID (which fstab and the boot menu name) and size, so
    // that the two images can be compared as they are.
    let privileged = std::env::var_os("STRATA_TEST_IMAGE")
        .map(std::path::PathBuf::from)
        .expect("STRATA_TEST_IMAGE is not set: ci/test builds the fixture image as root for the comparison");
    let pm: Value = serde_json::from_slice(
        &fs::read(format!("{}.manifest.json", privileged.display())).unwrap(),
    )
    .unwrap();
    let (uuid, size) = (
        pm["fs_uuid"].as_str().unwrap().to_owned(),
        pm["image_size"].as_u64().unwrap().to_string(),
    );

    let built = as_user(
        &exe,
        &[
            "build",
            "--rootfs",
            readable.to_str().unwrap(),
            "--output",
            img,
            "--size",
            &size,
            "--fs-uuid",
            &uuid,
        ],
    );
    assert!(
        built.status.success(),
        "rootless build of the fixture as {USER} failed: {}",
        stderr(&built)
    );
    assert!(stderr(&built).contains("backend: rootless"));

    // The user reads it back (through the appliance): what root reads off
    // the privileged build, except subvolume ids and generations.
    let inspected = as_user(&exe, &["inspect", "--json", img]);
    assert!(
        inspected.status.success(),
        "inspect as {USER}: {}",
        stderr(&inspected)
    );
    assert_eq!(comparable(&inspected.stdout), inspect(&privileged));

    let json = out.join("report.json");
    let tested = as_user(
        &exe,
        &[
            "test",
            img,
            "--accel",
            "auto",
            "--timeout",
            "900",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    let report = fs::read_to_string(&json).unwrap_or_default();
    assert!(
        tested.status.success(),
        "strata test as {USER} on the rootless fixture image failed ({}): {}\n{report}",
        tested.status,
        stderr(&tested)
    );
    let r: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["verdict"], "pass", "{report}");
    assert_eq!(r["boots"], 3, "every check ran, persistence too: {report}");
}

/// What a user namespace cannot make is refused on the archive's listing,
/// with exit 2 naming the member and the limit, before anything is
/// extracted: an owner past the 65536 mapped ids, a `trusted.*` xattr
/// (both used to end with exit 1 and a raw tar error).
#[test]
fn a_rootless_build_refuses_ids_and_xattrs_a_user_namespace_cannot_make() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    ensure_user();
    let dir = tempfile::Builder::new()
        .prefix("strata-rootless-test.")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("strata");
    fs::copy(env!("CARGO_BIN_EXE_strata"), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    sh(&format!("chown {USER}: '{}'", out_dir.display()));
    for (name, setup, want) in [
        (
            "big-uid",
            "printf x > usr/bin/far && chown 70000:0 usr/bin/far",
            &["./usr/bin/far", "70000:0", "0 to 65535"][..],
        ),
        (
            "big-gid",
            "printf x > usr/bin/far && chown 0:65536 usr/bin/far",
            &["./usr/bin/far", "0:65536", "0 to 65535"][..],
        ),
        (
            "trusted",
            "setfattr -n trusted.overlay.opaque -v y usr/bin",
            &["./usr/bin/", "trusted.overlay.opaque", "trusted.*"][..],
        ),
    ] {
        let rootfs = dir.path().join(name);
        fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
        fs::create_dir_all(rootfs.join("boot")).unwrap();
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/fstab"), "# fstab\n").unwrap();
        fs::write(
            rootfs.join("boot/vmlinuz-6.1.0"),
            strata_builder::kernel::fake_kernel(b"k"),
        )
        .unwrap();
        fs::write(rootfs.join("boot/initrd.img-6.1.0"), b"i").unwrap();
        sh(&format!("cd '{}' && {setup}", rootfs.display()));
        let archive = dir.path().join(format!("{name}.tar"));
        sh(&format!(
            "tar --xattrs --xattrs-include='*' --numeric-owner --format=posix -C '{}' -cf '{}' . && chmod 0644 '{}'",
            rootfs.display(),
            archive.display(),
            archive.display()
        ));
        let image = out_dir.join(format!("{name}.img"));
        let out = as_user(
            &exe,
            &[
                "build",
                "--rootfs",
                archive.to_str().unwrap(),
                "--output",
                image.to_str().unwrap(),
                "--size",
                "300M",
            ],
        );
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {e}");
        assert!(e.contains("backend: rootless"), "{e}");
        let last = e.trim().lines().last().unwrap_or_default();
        for w in want.iter().chain(&[archive.to_str().unwrap()]) {
            assert!(last.contains(w), "{name}: expected {w:?} in {e}");
        }
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
    }
}
