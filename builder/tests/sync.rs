//! `sync::sync_tree`, `sync::apply_state_policy` and
//! `sync::estimate_sync_bytes` on real trees with rsync. Needs root (owners,
//! device nodes, security xattrs, mounts) and the packages `ci/setup`
//! installs: these tests fail, not skip, without them.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_builder::host::interrupt::Interrupt;
use strata_builder::manifest::FileType;
use strata_builder::sync::{
    apply_state_policy, decode_to_path, estimate_sync_bytes, sync_tree, PathEntry, StatePolicy,
    SyncError, SyncOptions, SyncReport,
};

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the sync tests need root (owners, device nodes, security xattrs, mounts): run them as root, as CI does"
    );
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

fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// Deterministic incompressible bytes (xorshift), so extents are real data
/// and never holes.
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
    fs::write(path, data).unwrap();
}

fn no_interrupt() -> Interrupt {
    Interrupt::default()
}

/// Raises the interrupt after `after`: a run that blocks (e.g. on a fifo
/// it should never have opened) fails as Interrupted instead of hanging.
fn watchdog(after: Duration) -> Interrupt {
    let i = Interrupt::default();
    let raiser = i.clone();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        raiser.raise();
    });
    i
}

fn opts(exclude: &[&str]) -> SyncOptions {
    SyncOptions {
        exclude_contents_of: exclude.iter().map(|s| s.to_string()).collect(),
    }
}

/// Files rsync leaves while writing (`.name.XXXXXX`).
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().as_bytes().starts_with(b".") {
                found.push(e.path());
            }
        }
    }
    found
}

#[test]
fn sync_makes_dest_identical_keeping_every_attribute() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    for d in ["etc", "usr/bin", "usr/share/doc", "var/lib"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::create_dir_all(dest.join("etc")).unwrap();
    fs::create_dir_all(dest.join("usr/share/old")).unwrap();
    fs::write(dest.join("usr/share/old/readme"), b"old").unwrap();
    fs::write(dest.join("etc/gone"), b"removed by the new rootfs").unwrap();

    // Same bytes, different mtime: only the time is updated, not the data.
    fs::write(src.join("etc/os-release"), b"ID=test\n").unwrap();
    fs::write(dest.join("etc/os-release"), b"ID=test\n").unwrap();
    sh(&format!(
        "touch -d 2020-01-01 {}",
        q(&dest.join("etc/os-release"))
    ));
    let os_release_ino = fs::metadata(dest.join("etc/os-release")).unwrap().ino();
    // Same size and mtime, different bytes: rewritten (content compare).
    fs::write(src.join("etc/motd"), b"new release").unwrap();
    fs::write(dest.join("etc/motd"), b"old release").unwrap();
    sh(&format!(
        "touch -d 2021-01-01 {0} {1}",
        q(&src.join("etc/motd")),
        q(&dest.join("etc/motd"))
    ));
    // Owner, mode, setuid, ACL, xattrs, capability, hardlink, sparse file.
    fs::write(src.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    // chown clears setuid: owner first, then the mode.
    sh(&format!("chown 1234:5678 {}", q(&src.join("usr/bin/tool"))));
    fs::set_permissions(src.join("usr/bin/tool"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::write(src.join("usr/bin/ping"), b"ping").unwrap();
    sh(&format!(
        "setcap cap_net_raw+ep {}",
        q(&src.join("usr/bin/ping"))
    ));
    fs::hard_link(src.join("usr/bin/tool"), src.join("usr/bin/tool-alias")).unwrap();
    fs::write(src.join("usr/share/doc/notes"), b"notes").unwrap();
    sh(&format!(
        "setfacl -m u:4242:r {0} && setfattr -n user.origin -v rootfs {0}",
        q(&src.join("usr/share/doc/notes"))
    ));
    sh(&format!(
        "truncate -s 64M {0} && printf data | dd of={0} bs=1 seek=1000 conv=notrunc status=none",
        q(&src.join("var/lib/sparse"))
    ));

    let report = sync_tree(&src, &dest, &opts(&[]), &no_interrupt()).unwrap();
    // rsync lists the hardlink it makes last; which of the pair that is
    // depends on the inodes, so compare as sets.
    let mut created = report.created.clone();
    created.sort();
    assert_eq!(
        created,
        [
            "/usr/bin",
            "/usr/bin/ping",
            "/usr/bin/tool",
            "/usr/bin/tool-alias",
            "/usr/share/doc",
            "/usr/share/doc/notes",
            "/var",
            "/var/lib",
            "/var/lib/sparse",
        ],
        "{report:#?}"
    );
    assert_eq!(report.updated, ["/etc/motd"], "{report:#?}");
    assert_eq!(
        report.deleted,
        ["/etc/gone", "/usr/share/old/readme", "/usr/share/old"],
        "{report:#?}"
    );
    assert!(report.attributes.contains(&"/etc/os-release".to_string()));
    assert_eq!(
        report.bytes_written,
        ("new release".len() + 4 + 10 + 5 + 64 * 1024 * 1024) as u64
    );

    assert_eq!(
        fs::metadata(dest.join("etc/os-release")).unwrap().ino(),
        os_release_ino,
        "an unchanged file must not be rewritten"
    );
    assert_eq!(fs::read(dest.join("etc/motd")).unwrap(), b"new release");
    let tool = fs::metadata(dest.join("usr/bin/tool")).unwrap();
    assert_eq!(
        (tool.uid(), tool.gid(), tool.mode() & 0o7777),
        (1234, 5678, 0o4750)
    );
    assert_eq!(
        tool.ino(),
        fs::metadata(dest.join("usr/bin/tool-alias")).unwrap().ino()
    );
    assert!(sh(&format!("getcap {}", q(&dest.join("usr/bin/ping")))).contains("cap_net_raw"));
    let notes = q(&dest.join("usr/share/doc/notes"));
    assert!(sh(&format!("getfacl -n {notes}")).contains("user:4242:r--"));
    assert!(sh(&format!("getfattr -n user.origin {notes}")).contains("rootfs"));
    let sparse = fs::metadata(dest.join("var/lib/sparse")).unwrap();
    assert_eq!(sparse.len(), 64 * 1024 * 1024);
    assert!(sparse.blocks() * 512 < 1024 * 1024, "holes kept");

    // Identical now: a second run changes nothing at all.
    let again = sync_tree(&src, &dest, &opts(&[]), &no_interrupt()).unwrap();
    assert_eq!(
        again,
        SyncReport::default(),
        "second run must be a no-op: {again:#?}"
    );
    assert_eq!(
        estimate_sync_bytes(&src, &dest, &[], &no_interrupt()).unwrap(),
        0
    );
}

#[test]
fn estimate_is_what_the_sync_writes() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    fs::create_dir_all(src.join("usr/lib")).unwrap();
    fs::create_dir_all(src.join("var/cache")).unwrap();
    fs::create_dir_all(dest.join("usr/lib")).unwrap();
    fill(&src.join("usr/lib/same"), 300_000, 1);
    fill(&dest.join("usr/lib/same"), 300_000, 1);
    fill(&src.join("usr/lib/changed"), 200_000, 2);
    fill(&dest.join("usr/lib/changed"), 200_000, 3);
    fill(&src.join("usr/lib/new"), 50_000, 4);
    // Under an excluded state dir: not counted, not copied.
    fill(&src.join("var/cache/big"), 5_000_000, 5);

    let estimate = estimate_sync_bytes(&src, &dest, &["var".into()], &no_interrupt()).unwrap();
    assert_eq!(estimate, 250_000);
    let report = sync_tree(&src, &dest, &opts(&["var"]), &no_interrupt()).unwrap();
    assert_eq!(report.bytes_written, estimate);
    assert_eq!(
        estimate_sync_bytes(&src, &dest, &["var".into()], &no_interrupt()).unwrap(),
        0
    );
}

#[test]
fn excluded_state_contents_are_neither_copied_nor_deleted() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    fs::create_dir_all(src.join("var/lib/pkg")).unwrap();
    fs::write(src.join("var/lib/pkg/db"), b"new rootfs data").unwrap();
    fs::write(src.join("var/.hidden"), b"dot files too").unwrap();
    fs::set_permissions(src.join("var"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::create_dir_all(src.join("root")).unwrap();
    fs::create_dir_all(src.join("varnish")).unwrap();
    fs::write(src.join("varnish/conf"), b"not a state dir").unwrap();
    // The old tree: var has debris (a copy-mode upgrade left it), srv is a
    // state dir the new rootfs does not have at all.
    fs::create_dir_all(dest.join("var")).unwrap();
    fs::write(dest.join("var/old-debris"), b"x").unwrap();
    fs::create_dir_all(dest.join("srv/www")).unwrap();
    fs::write(dest.join("srv/www/index.html"), b"x").unwrap();
    fs::create_dir_all(dest.join("home")).unwrap();

    let report = sync_tree(
        &src,
        &dest,
        &opts(&["var", "srv", "home", "root"]),
        &no_interrupt(),
    )
    .unwrap();
    let names = |d: &str| {
        let mut v: Vec<_> = fs::read_dir(dest.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names("var"),
        ["old-debris"],
        "nothing copied, nothing deleted"
    );
    assert_eq!(
        fs::metadata(dest.join("var")).unwrap().mode() & 0o7777,
        0o750,
        "the mountpoint itself takes the new rootfs's attributes"
    );
    assert_eq!(
        names("varnish"),
        ["conf"],
        "only /var/* is excluded, not /varnish"
    );
    assert_eq!(names("srv/www"), ["index.html"]);
    assert!(
        !dest.join("home").exists(),
        "an empty dir the rootfs lacks goes"
    );
    assert!(dest.join("root").is_dir());
    assert_eq!(
        report.deleted,
        ["/home"],
        "excluded contents are not deleted: {report:#?}"
    );
    assert_eq!(
        report.messages,
        ["cannot delete non-empty directory: srv"],
        "{report:#?}"
    );

    // Names that are not state dir names are refused before rsync runs.
    for bad in ["../etc", "a/b", "*", ""] {
        assert!(
            matches!(
                sync_tree(&src, &dest, &opts(&[bad]), &no_interrupt()),
                Err(SyncError::Name(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn untrusted_links_and_special_files_are_recreated_never_followed() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, dest, host) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("host"),
    );
    for d in [&src.join("etc"), &src.join("dev"), &dest.join("etc"), &host] {
        fs::create_dir_all(d).unwrap();
    }
    // A host fifo: anything that opens it for reading blocks (there is no
    // writer), so a run that finishes never read through a link to it.
    let host_fifo = host.join("fifo");
    sh(&format!("mkfifo {}", q(&host_fifo)));
    symlink("/etc/shadow", src.join("etc/evil")).unwrap();
    symlink(&host_fifo, src.join("etc/to-host-fifo")).unwrap();
    symlink("/usr/lib", src.join("lib64")).unwrap();
    sh(&format!("mkfifo -m 0620 {}", q(&src.join("dev/initctl"))));
    sh(&format!("mknod -m 0666 {} c 1 5", q(&src.join("dev/zero"))));
    sh(&format!(
        "mknod -m 0660 {} b 7 200",
        q(&src.join("dev/loop200"))
    ));
    // The old tree has a symlink where the new rootfs has a directory:
    // rsync must replace the link, not write through it into the host.
    symlink(&host, dest.join("etc/conf.d")).unwrap();
    fs::create_dir_all(src.join("etc/conf.d")).unwrap();
    fs::write(src.join("etc/conf.d/app"), b"setting").unwrap();

    let report = sync_tree(&src, &dest, &opts(&[]), &watchdog(Duration::from_secs(60)))
        .expect("a blocked read through a link would end as Interrupted");
    assert_eq!(report.bytes_written, "setting".len() as u64, "{report:#?}");

    let link = |p: &str| fs::read_link(dest.join(p)).unwrap();
    assert_eq!(link("etc/evil"), Path::new("/etc/shadow"));
    assert_eq!(link("etc/to-host-fifo"), host_fifo);
    assert_eq!(link("lib64"), Path::new("/usr/lib"));
    let initctl = fs::symlink_metadata(dest.join("dev/initctl")).unwrap();
    assert!(initctl.file_type().is_fifo());
    assert_eq!(initctl.mode() & 0o7777, 0o620);
    for (name, char_dev) in [("dev/zero", true), ("dev/loop200", false)] {
        let (a, b) = (
            fs::symlink_metadata(src.join(name)).unwrap(),
            fs::symlink_metadata(dest.join(name)).unwrap(),
        );
        assert_eq!(b.file_type().is_char_device(), char_dev, "{name}");
        assert_eq!(b.file_type().is_block_device(), !char_dev, "{name}");
        assert_eq!(a.rdev(), b.rdev(), "{name}");
    }
    let conf = fs::symlink_metadata(dest.join("etc/conf.d")).unwrap();
    assert!(conf.is_dir(), "the old symlink was replaced by a directory");
    assert_eq!(fs::read(dest.join("etc/conf.d/app")).unwrap(), b"setting");
    let mut host_names: Vec<_> = fs::read_dir(&host)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    host_names.sort();
    assert_eq!(host_names, ["fifo"], "nothing was written on the host");
}

#[test]
fn interrupt_stops_rsync_and_leaves_no_temporary_file() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&dest).unwrap();
    // Holes are cheap to create but rsync -S still reads and seeks through
    // them: several seconds of work to interrupt.
    sh(&format!("truncate -s 1G {}", q(&src.join("big"))));

    let raised = Interrupt::default();
    raised.raise();
    assert!(matches!(
        sync_tree(&src, &dest, &opts(&[]), &raised),
        Err(SyncError::Interrupted)
    ));
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0, "nothing started");

    let result = sync_tree(
        &src,
        &dest,
        &opts(&[]),
        &watchdog(Duration::from_millis(300)),
    );
    // Interrupted, not finished: the flag stopped rsync mid-copy.
    assert!(matches!(result, Err(SyncError::Interrupted)), "{result:?}");
    assert_eq!(temp_files(&dest), Vec::<PathBuf>::new());
    assert!(!dest.join("big").exists());
}

/// A tmpfs mount of `size`, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size} tmpfs {}",
            q(dir.path())
        ));
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_filesystem_is_no_space() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fill(&src.join("big"), 4 << 20, 7);
    let small = Tmpfs::new("1m");
    let result = sync_tree(&src, small.0.path(), &opts(&[]), &no_interrupt());
    assert!(matches!(result, Err(SyncError::NoSpace)), "{result:?}");
}

// ---------------------------------------------------------------------------
// State data policy.

/// The new rootfs's /var and the live state/var, with a name that is not
/// UTF-8 and a symlink in the state that points out of it.
fn state_fixture(t: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (src, state, host) = (t.join("src-var"), t.join("state-var"), t.join("host"));
    for d in ["lib/pkg", "newdir/sub", "escape"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::create_dir_all(state.join("lib/pkg")).unwrap();
    fs::create_dir_all(&host).unwrap();
    fs::write(src.join("lib/pkg/db"), b"factory default").unwrap();
    fs::write(src.join("lib/pkg/new-db"), b"a new package's data").unwrap();
    fs::write(src.join("newdir/sub/f"), b"f").unwrap();
    fs::write(src.join("escape/shadow"), b"would land on the host").unwrap();
    fs::write(
        src.join(std::ffi::OsStr::from_bytes(b"caf\xe9 100%")),
        b"latin-1 name",
    )
    .unwrap();
    fs::set_permissions(src.join("lib"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(src.join("newdir"), fs::Permissions::from_mode(0o750)).unwrap();
    sh(&format!("chown 33:33 {}", q(&src.join("newdir/sub/f"))));
    // Live data: never overwritten, its directories keep their attributes.
    fs::write(state.join("lib/pkg/db"), b"the machine's own data").unwrap();
    fs::set_permissions(state.join("lib"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink(&host, state.join("escape")).unwrap();
    (src, state, host)
}

fn snapshot(dir: &Path) -> String {
    sh(&format!(
        "cd {} && find . -printf '%p %y %m %U:%G %s %l\\n' | LC_ALL=C sort && find . -type f -exec sha256sum {{}} + | LC_ALL=C sort",
        q(dir)
    ))
}

#[test]
fn merge_copies_only_what_the_state_lacks() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, state, host) = state_fixture(t.path());
    let before = snapshot(&state);

    let out = apply_state_policy(&src, &state, "var", StatePolicy::Merge, &no_interrupt()).unwrap();
    let entry = |path: &str, file_type, size| PathEntry {
        path: path.into(),
        file_type,
        size,
    };
    assert_eq!(
        out.merged,
        [
            entry("/var/caf%E9 100%25", FileType::File, 12),
            entry("/var/lib/pkg/new-db", FileType::File, 20),
            entry("/var/newdir", FileType::Dir, 0),
            entry("/var/newdir/sub", FileType::Dir, 0),
            entry("/var/newdir/sub/f", FileType::File, 1),
        ],
        "{out:#?}"
    );
    assert_eq!(
        out.left_out,
        [
            "/var/escape",
            "/var/escape/shadow",
            "/var/lib",
            "/var/lib/pkg",
            "/var/lib/pkg/db"
        ]
    );

    assert_eq!(
        fs::read(state.join("lib/pkg/db")).unwrap(),
        b"the machine's own data"
    );
    assert_eq!(
        fs::metadata(state.join("lib")).unwrap().mode() & 0o7777,
        0o755,
        "an existing directory keeps its attributes"
    );
    // The non-UTF-8 name arrived byte for byte, and its listed form decodes
    // back to it.
    let listed = decode_to_path(&out.merged[0].path).unwrap();
    let on_disk = state.join(listed.strip_prefix("/var").unwrap());
    assert_eq!(fs::read(on_disk).unwrap(), b"latin-1 name");
    let f = fs::metadata(state.join("newdir/sub/f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (33, 33));
    assert_eq!(
        fs::metadata(state.join("newdir")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        fs::read_dir(&host).unwrap().count(),
        0,
        "nothing written through the state's symlink"
    );
    assert!(fs::symlink_metadata(state.join("escape"))
        .unwrap()
        .file_type()
        .is_symlink());

    // Nothing was deleted or changed: the old entries are all still there.
    let after = snapshot(&state);
    // Nothing existing changed type, mode, owner, size or contents (the
    // snapshot leaves out mtimes: directories that got new entries have
    // new ones), the state root included.
    for line in before.lines() {
        assert!(after.contains(line), "{line:?} changed");
    }

    // A second merge has nothing left to copy.
    let again =
        apply_state_policy(&src, &state, "var", StatePolicy::Merge, &no_interrupt()).unwrap();
    assert!(again.merged.is_empty());
    assert_eq!(again.left_out.len(), out.merged.len() + out.left_out.len());
}

#[test]
fn keep_leaves_the_state_untouched_and_lists_everything() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let (src, state, _host) = state_fixture(t.path());
    let before = snapshot(&state);
    let out = apply_state_policy(&src, &state, "var", StatePolicy::Keep, &no_interrupt()).unwrap();
    assert!(out.merged.is_empty());
    assert_eq!(
        out.left_out,
        [
            "/var/caf%E9 100%25",
            "/var/escape",
            "/var/escape/shadow",
            "/var/lib",
            "/var/lib/pkg",
            "/var/lib/pkg/db",
            "/var/lib/pkg/new-db",
            "/var/newdir",
            "/var/newdir/sub",
            "/var/newdir/sub/f",
        ]
    );
    assert_eq!(snapshot(&state), before);
}

#[test]
fn policy_edge_cases() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    fs::create_dir_all(&state).unwrap();
    // The new rootfs has no /srv: nothing to do.
    let out = apply_state_policy(
        &t.path().join("missing"),
        &state,
        "srv",
        StatePolicy::Merge,
        &no_interrupt(),
    )
    .unwrap();
    assert_eq!(out, Default::default());
    // /var in the rootfs is a symlink: rsync would read wherever it points.
    symlink("/etc", t.path().join("var-link")).unwrap();
    assert!(matches!(
        apply_state_policy(
            &t.path().join("var-link"),
            &state,
            "var",
            StatePolicy::Merge,
            &no_interrupt()
        ),
        Err(SyncError::NotADirectory { .. })
    ));
    // An empty /var: nothing merged, nothing left out.
    fs::create_dir_all(t.path().join("empty")).unwrap();
    let out = apply_state_policy(
        &t.path().join("empty"),
        &state,
        "var",
        StatePolicy::Merge,
        &no_interrupt(),
    )
    .unwrap();
    assert_eq!(out, Default::default());
    assert!(matches!(
        apply_state_policy(
            &t.path().join("empty"),
            &state,
            "../etc",
            StatePolicy::Keep,
            &no_interrupt()
        ),
        Err(SyncError::Name(_))
    ));
}

// ---------------------------------------------------------------------------
// On btrfs: a snapshot plus the sync shares every unchanged extent.

mod btrfs_image {
    use super::*;
    use strata_builder::du::filesystem_du;
    use strata_builder::extents::extents;
    use strata_builder::host::loopdev::LoopDevice;
    use strata_builder::host::mount::Mount;

    pub struct Fs {
        // Field order: unmount, then detach, then remove the image.
        pub mount: Mount,
        _loop: LoopDevice,
        _dir: tempfile::TempDir,
    }

    pub fn btrfs(size: &str) -> Fs {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        sh(&format!("truncate -s {size} {}", q(&image)));
        strata_builder::host::btrfs::mkfs(&image, "synctest", &uuid()).unwrap();
        let lo = LoopDevice::attach(&image, false).unwrap();
        let mount = Mount::btrfs(lo.path(), "rw,noatime").unwrap();
        Fs {
            mount,
            _loop: lo,
            _dir: dir,
        }
    }

    fn uuid() -> String {
        sh("cat /proc/sys/kernel/random/uuid").trim().to_owned()
    }

    pub fn physical(path: &Path) -> Vec<(u64, u64)> {
        let f = fs::File::open(path).unwrap();
        extents(&f)
            .unwrap()
            .expect("data extents, not inline")
            .iter()
            .map(|e| (e.physical, e.length))
            .collect()
    }

    fn overlaps(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
        a.iter()
            .any(|&(pa, la)| b.iter().any(|&(pb, lb)| pa < pb + lb && pb < pa + la))
    }

    #[test]
    fn snapshot_then_sync_shares_unchanged_extents() {
        require_root();
        const BIG: usize = 64 << 20;
        const CHANGE: usize = 1 << 20;
        let fs_ = btrfs("512M");
        let top = fs_.mount.path();
        let (a, b) = (top.join("A"), top.join("B"));
        strata_builder::host::btrfs::subvolume_create(&a).unwrap();
        for d in ["usr/lib", "etc", "var"] {
            fs::create_dir_all(a.join(d)).unwrap();
        }
        fill(&a.join("usr/lib/big.bin"), BIG, 1);
        fill(&a.join("usr/lib/change.bin"), CHANGE, 2);
        fs::write(a.join("etc/hostname"), b"factory\n").unwrap();
        // The new rootfs, outside the image: A's content with change.bin
        // rewritten at the same size and mtime (only contents tell).
        let t = tempfile::tempdir().unwrap();
        let newroot = t.path().join("newroot");
        sh(&format!("cp -a {}/. {}", q(&a), q(&newroot)));
        fill(&newroot.join("usr/lib/change.bin"), CHANGE, 3);
        sh(&format!(
            "touch -r {} {}",
            q(&a.join("usr/lib/change.bin")),
            q(&newroot.join("usr/lib/change.bin"))
        ));

        strata_builder::host::btrfs::snapshot(&a, &b).unwrap();
        let report = sync_tree(&newroot, &b, &opts(&["var"]), &no_interrupt()).unwrap();
        assert_eq!(report.updated, ["/usr/lib/change.bin"], "{report:#?}");
        assert!(report.created.is_empty() && report.deleted.is_empty());
        assert_eq!(report.bytes_written, CHANGE as u64);

        let (big_a, big_b) = (
            physical(&a.join("usr/lib/big.bin")),
            physical(&b.join("usr/lib/big.bin")),
        );
        assert_eq!(big_a, big_b, "the unchanged file shares its extents");
        assert_eq!(big_a.iter().map(|e| e.1).sum::<u64>(), BIG as u64);
        let (ch_a, ch_b) = (
            physical(&a.join("usr/lib/change.bin")),
            physical(&b.join("usr/lib/change.bin")),
        );
        assert!(!overlaps(&ch_a, &ch_b), "{ch_a:?} vs {ch_b:?}");

        strata_builder::host::btrfs::sync(top).unwrap();
        let du = filesystem_du(&[&a, &b]).unwrap();
        let (du_a, du_b) = (&du[0], &du[1]);
        eprintln!("fi du A: {du_a:?}\nfi du B: {du_b:?}");
        assert_eq!(du_b.total, (BIG + CHANGE) as u64);
        assert_eq!(du_b.exclusive, CHANGE as u64, "B costs the change only");
        assert_eq!(du_a.exclusive, CHANGE as u64, "A keeps the old version");
        assert_eq!(du_b.set_shared, Some(BIG as u64));
    }

    /// Timing, not a check: `cargo test --test sync -- --ignored
    /// --nocapture measure`.
    #[test]
    #[ignore]
    fn measure_sync_of_an_unchanged_tree_against_a_full_copy() {
        require_root();
        const FILES: usize = 150;
        const EACH: usize = 4 << 20;
        let fs_ = btrfs("2G");
        let top = fs_.mount.path();
        let (a, b, c) = (top.join("A"), top.join("B"), top.join("C"));
        strata_builder::host::btrfs::subvolume_create(&a).unwrap();
        let t = tempfile::tempdir().unwrap();
        let newroot = t.path().join("newroot");
        fs::create_dir_all(newroot.join("usr/lib")).unwrap();
        for i in 0..FILES {
            fill(
                &newroot.join(format!("usr/lib/f{i:03}")),
                EACH,
                i as u64 + 1,
            );
        }
        fill(&newroot.join("usr/lib/changed"), 1 << 20, 999);
        sync_tree(&newroot, &a, &opts(&[]), &no_interrupt()).unwrap();
        fill(&newroot.join("usr/lib/changed"), 1 << 20, 1000);
        strata_builder::host::btrfs::sync(top).unwrap();

        let start = Instant::now();
        strata_builder::host::btrfs::snapshot(&a, &b).unwrap();
        let r = sync_tree(&newroot, &b, &opts(&[]), &no_interrupt()).unwrap();
        strata_builder::host::btrfs::sync(top).unwrap();
        let incremental = start.elapsed();
        assert_eq!(r.updated, ["/usr/lib/changed"]);

        let start = Instant::now();
        strata_builder::host::btrfs::subvolume_create(&c).unwrap();
        sync_tree(&newroot, &c, &opts(&[]), &no_interrupt()).unwrap();
        strata_builder::host::btrfs::sync(top).unwrap();
        let full = start.elapsed();

        let du = filesystem_du(&[&b, &c]).unwrap();
        eprintln!(
            "tree {} MiB: snapshot+sync (1 MiB changed) {incremental:.2?}, full copy into an empty subvolume {full:.2?}; exclusive bytes B {} C {}",
            (FILES * EACH + (1 << 20)) >> 20,
            du[0].exclusive,
            du[1].exclusive
        );
    }
}
