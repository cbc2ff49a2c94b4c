//! `strata fixture debian` for real: mmdebstrap, the cache, the copy.
//! Needs root and mmdebstrap (ci/setup); about 70 s on a cold cache, a few
//! seconds warm (the default cache is shared with ci/demo).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

/// These tests build a real fixture: without root and mmdebstrap they
/// cannot, and a skipped test proves nothing, so they fail and say why.
fn require_root_and_mmdebstrap() {
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let mm = Command::new("mmdebstrap").arg("--version").output().is_ok();
    assert!(
        root && mm,
        "needs root and mmdebstrap (run ci/setup vm, then the tests as root)"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

#[test]
fn debian_fixture_has_what_configure_steps_add() {
    require_root_and_mmdebstrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rootfs");
    let o = strata()
        .args(["fixture", "debian", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        out.to_str().unwrap()
    );

    assert!(out.join("etc/os-release").is_file());
    assert!(out.join("sbin/init").exists());
    let boot: Vec<String> = std::fs::read_dir(out.join("boot"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(boot.iter().any(|n| n.starts_with("vmlinuz-")), "{boot:?}");
    assert!(
        boot.iter().any(|n| n.starts_with("initrd.img-")),
        "{boot:?}"
    );

    assert_eq!(mode(&out.join("root")), 0o700);
    assert_eq!(mode(&out.join("root/.ssh")), 0o700);
    let keys = out.join("root/.ssh/authorized_keys");
    assert_eq!(mode(&keys), 0o600);
    assert_eq!(std::fs::metadata(&keys).unwrap().uid(), 0);
    assert!(std::fs::read_to_string(&keys).unwrap().starts_with("ssh-"));

    let alice = out.join("home/alice");
    assert_eq!(std::fs::metadata(&alice).unwrap().uid(), 1000);
    let todo = alice.join("notes/todo.txt");
    assert_eq!(mode(&todo), 0o640);
    assert_eq!(std::fs::metadata(&todo).unwrap().uid(), 1000);
    assert!(alice.join(".bashrc").is_file(), "useradd copies /etc/skel");

    assert!(out.join("srv/www/index.html").is_file());
    assert_eq!(mode(&out.join("opt/hello/bin/hello")), 0o755);
    assert!(out.join("var/lib/strata-fixture/data.txt").is_file());
    assert_eq!(
        std::fs::read_to_string(out.join("etc/hostname")).unwrap(),
        "strata-guest\n"
    );
    for pkg in ["qemu-guest-agent", "dbus", "systemd-sysv", "btrfs-progs"] {
        let status = std::fs::read_to_string(out.join("var/lib/dpkg/status")).unwrap();
        assert!(
            status.contains(&format!("Package: {pkg}\n")),
            "{pkg} not installed"
        );
    }

    // Warm cache: no rebuild, and the earlier output is replaced in place.
    std::fs::write(out.join("srv/scratch"), "changed by a test").unwrap();
    let o = strata()
        .args(["fixture", "debian", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !out.join("srv/scratch").exists(),
        "output replaced by the cached tree"
    );
    // Warm means served from the cache, not rebuilt: judged by what it
    // says it did, not by a clock (speed is ci/bench's business).
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains(": cached (") && !said.contains("built in"),
        "the second run rebuilt instead of using the cache:\n{said}"
    );

    // Without --output: the cache path, instantly.
    let o = strata().args(["fixture", "debian"]).output().unwrap();
    assert!(o.status.success());
    let cached = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(Path::new(&cached)
        .join("root/.ssh/authorized_keys")
        .is_file());
}

#[test]
fn refuses_to_replace_a_foreign_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious"), "x").unwrap();
    let o = strata()
        .args(["fixture", "debian", "--cache-dir"])
        .arg(dir.path().join("cache"))
        .arg("--output")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to replace"));
    assert!(dir.path().join("precious").exists());
    assert!(
        !dir.path().join("cache").exists(),
        "checked before any build"
    );
}

#[test]
fn missing_mmdebstrap_names_ci_setup() {
    let dir = tempfile::tempdir().unwrap();
    let o = strata()
        .args(["fixture", "debian", "--cache-dir"])
        .arg(dir.path())
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("mmdebstrap not found") && err.contains("ci/setup"),
        "{err}"
    );
    // The failed build left nothing behind but the (empty, reusable) lock
    // file that serialises builds of one recipe.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("fixtures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".lock-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `--tar` as root: the cached rootfs archived with numeric owners, modes,
/// device nodes and the configure steps' files, ready for `--rootfs`.
#[test]
fn debian_fixture_as_a_tar_archive() {
    require_root_and_mmdebstrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let out = dir.path().join("debian.tar");
    let o = strata()
        .args(["fixture", "debian", "--tar"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        out.to_str().unwrap()
    );
    let list = Command::new("tar")
        .args(["--list", "--verbose", "--numeric-owner", "-f"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout);
    let line = |name: &str| {
        list.lines()
            .find(|l| l.ends_with(&format!(" ./{name}")))
            .unwrap_or_else(|| panic!("no ./{name} in the archive"))
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("dev/null"), "crw-rw-rw- 0/0 1,3");
    assert_eq!(
        line("root/.ssh/authorized_keys")
            .rsplit_once(' ')
            .unwrap()
            .0,
        "-rw------- 0/0"
    );
    assert!(line("home/alice/notes/todo.txt").starts_with("-rw-r----- 1000/1000"));
    assert!(line("usr/bin/passwd").starts_with("-rwsr-xr-x 0/0"));
    // No temporary file left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["debian.tar"]);
}
