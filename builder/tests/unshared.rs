//! On a real btrfs: the bytes a version holds alone (`unshared`), beside
//! what `btrfs filesystem du` says about the same trees (why it is not
//! used for this). Needs root (loop device, mount).

use std::fs;
use std::path::Path;
use std::process::Command;
use strata_builder::du::filesystem_du;
use strata_builder::host::btrfs::{snapshot, subvolume_create, sync};
use strata_builder::host::loopdev::LoopDevice;
use strata_builder::host::mount::Mount;
use strata_builder::unshared::{unshared_bytes, Owner};

const MIB: usize = 1 << 20;

/// Deterministic incompressible bytes (xorshift), so extents are real data.
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

struct Fs {
    // Field order: unmount, then detach, then remove the image.
    mount: Mount,
    _loop: LoopDevice,
    _dir: tempfile::TempDir,
}

fn btrfs() -> Fs {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root (loop device, mount)"
    );
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    fs::File::create(&image)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    strata_builder::host::btrfs::mkfs(&image, "unshared", uuid.trim()).unwrap();
    let lo = LoopDevice::attach(&image, false).unwrap();
    let mount = Mount::btrfs(lo.path(), "rw,noatime").unwrap();
    Fs {
        mount,
        _loop: lo,
        _dir: dir,
    }
}

fn owner(label: &str) -> Owner {
    Owner {
        dir: format!("systems/{label}"),
        trees: vec![
            format!("systems/{label}/orig"),
            format!("systems/{label}/run"),
        ],
    }
}

/// a: orig with `common` (4 MiB) and `aonly` (1 MiB), run a snapshot of it
/// plus `arun` (2 MiB) written after boot. b: a snapshot of a's orig with
/// `aonly` replaced by `bonly` (3 MiB), run its snapshot. state/x: a
/// reflink of a's `arun`. Removing a would free `aonly` only (`arun` is
/// also in the state, `common` in b); removing b frees `bonly`.
#[test]
fn a_version_holds_alone_what_no_other_tree_references() {
    let f = btrfs();
    let top = f.mount.path();
    let p = |rel: &str| top.join(rel);
    for d in ["systems/a", "systems/b", "state"] {
        fs::create_dir_all(p(d)).unwrap();
    }
    subvolume_create(&p("systems/a/orig")).unwrap();
    fill(&p("systems/a/orig/common"), 4 * MIB, 1);
    fill(&p("systems/a/orig/aonly"), MIB, 2);
    // Hard links are one file.
    fs::hard_link(p("systems/a/orig/aonly"), p("systems/a/orig/aonly2")).unwrap();
    snapshot(&p("systems/a/orig"), &p("systems/a/run")).unwrap();
    fill(&p("systems/a/run/arun"), 2 * MIB, 3);
    snapshot(&p("systems/a/orig"), &p("systems/b/orig")).unwrap();
    fs::remove_file(p("systems/b/orig/aonly")).unwrap();
    fs::remove_file(p("systems/b/orig/aonly2")).unwrap();
    fill(&p("systems/b/orig/bonly"), 3 * MIB, 4);
    snapshot(&p("systems/b/orig"), &p("systems/b/run")).unwrap();
    subvolume_create(&p("state/x")).unwrap();
    let ok = Command::new("cp")
        .arg("--reflink=always")
        .arg(p("systems/a/run/arun"))
        .arg(p("state/x/arun"))
        .status()
        .unwrap();
    assert!(ok.success());
    // The kernel beside the trees is not counted, nor compared against.
    fill(&p("systems/a/kernel"), MIB, 5);
    sync(top).unwrap();

    let got = unshared_bytes(top, &[owner("a"), owner("b")]).unwrap();
    assert_eq!(got, [MIB as u64, 3 * MIB as u64]);
    // Without the reflink in state, a's run-only file is a's alone too.
    fs::remove_file(p("state/x/arun")).unwrap();
    sync(top).unwrap();
    let got = unshared_bytes(top, &[owner("a"), owner("b")]).unwrap();
    assert_eq!(got, [3 * MIB as u64, 3 * MIB as u64]);

    // What `btrfs filesystem du -s` says of the same trees: one line per
    // path, each summarised on its own. orig and run share everything
    // they have in common, so "exclusive" is only what run wrote after the
    // snapshot (and orig's is 0), whatever b holds.
    let du = filesystem_du(&[&p("systems/a/orig"), &p("systems/a/run")]).unwrap();
    assert_eq!(du.len(), 2);
    assert_eq!(du[0].exclusive, 0);
    assert_eq!(du[1].exclusive, 2 * MIB as u64);
    assert_eq!(du[0].set_shared, Some(5 * MIB as u64));
    assert_eq!(du[1].set_shared, Some(5 * MIB as u64));
    // And over the version's dir: everything it references, counted once,
    // `common` (also b's) included.
    let du = filesystem_du(&[&p("systems/a")]).unwrap();
    assert_eq!(
        du[0].exclusive + du[0].set_shared.unwrap(),
        (7 + 1) as u64 * MIB as u64,
        "{du:?}"
    );
}
