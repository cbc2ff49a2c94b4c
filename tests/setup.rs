//! `ci/setup` on the releases it knows, and the rule that no package-mirror
//! host name is written into this repository: mirrors come from the machine's
//! own apt sources.
//!
//! `setup_base_in_a_fresh_trixie_chroot` needs root, mmdebstrap and the
//! Debian archive (through the host's own apt source); it takes a few
//! minutes. It fails, never skips, when any of that is missing. The Debian 12
//! path is exercised by the host itself (CI runs on bookworm); the test here
//! checks that what it writes comes from the machine's sources.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn setup_script() -> PathBuf {
    repo().join("ci/setup")
}

/// Runs `script` in bash after sourcing ci/setup with `env` set.
fn sourced(script: &str, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("source {} && {script}", setup_script().display()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running bash")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Host names of package mirrors, as extended regexes. Built from pieces so
/// that this file does not match its own patterns.
fn mirror_host_patterns() -> Vec<String> {
    let dot = r"\.";
    let debian = |host: &str| format!("{host}{dot}debian{dot}(org|net)");
    let ubuntu = |host: &str| format!("{host}{dot}ubuntu{dot}com");
    vec![
        debian("deb"),
        debian("security"),
        debian("snapshot"),
        debian("httpredir"),
        debian("http"),
        debian("ftp"),
        // ftp.<country>.debian.org and friends
        debian(r"ftp[0-9]*\.[a-z]{2}"),
        ubuntu("archive"),
        ubuntu(r"[a-z]{2}\.archive"),
        ubuntu("security"),
        ubuntu("ports"),
        format!("mirrors{dot}kernel{dot}org"),
    ]
}

#[test]
fn no_mirror_host_in_tracked_files() {
    let mut cmd = Command::new("git");
    cmd.current_dir(repo())
        .args(["grep", "-n", "-I", "-i", "-E"]);
    for p in mirror_host_patterns() {
        cmd.arg("-e").arg(p);
    }
    let out = cmd.output().expect("running git grep (is git installed?)");
    // git grep: 0 = found, 1 = nothing found, anything else = it failed.
    match out.status.code() {
        Some(1) => {}
        Some(0) => panic!(
            "package-mirror host names in tracked files (take mirrors from the machine's \
             apt sources instead):\n{}",
            text(&out.stdout)
        ),
        _ => panic!("git grep failed ({}): {}", out.status, text(&out.stderr)),
    }
}

#[test]
fn the_patterns_catch_what_they_are_for() {
    // Assembled at run time, so that no host name is in the source.
    let samples = [
        ["deb", "debian", "org"].join("."),
        ["ftp", "de", "debian", "org"].join("."),
        ["archive", "ubuntu", "com"].join("."),
        ["security", "debian", "org"].join("."),
    ];
    let dir = tempfile::tempdir().unwrap();
    for s in &samples {
        let f = dir.path().join("sample");
        fs::write(&f, format!("URIs: http://{s}/debian\n")).unwrap();
        let mut cmd = Command::new("grep");
        cmd.args(["-q", "-i", "-E"]);
        for p in mirror_host_patterns() {
            cmd.arg("-e").arg(p);
        }
        let st = cmd.arg(&f).status().unwrap();
        assert!(st.success(), "no pattern matches {s}");
    }
}

/// The Debian 12 path adds bookworm-backports from the machine's own
/// bookworm source: same URIs, same Signed-By, and no host of its own.
#[test]
fn bookworm_backports_come_from_the_machines_own_source() {
    let cases: [(&str, &str, &str); 3] = [
        (
            "sources.list.d/debian.sources",
            "Types: deb\nURIs: http://mirror.example.invalid/debian\n\
             Suites: bookworm bookworm-updates\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://security-mirror.example.invalid/debian-security\n\
             Suites: bookworm-security\nComponents: main\n",
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
        ),
        (
            "sources.list",
            "# one-line format\n\
             deb [arch=amd64 signed-by=/etc/apt/keyrings/local.gpg] http://mirror.example.invalid/debian bookworm main contrib\n",
            "Signed-By: /etc/apt/keyrings/local.gpg",
        ),
        (
            "sources.list.d/inline-key.sources",
            "Types: deb\nURIs: http://mirror.example.invalid/debian\nSuites: bookworm\n\
             Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n \
             mQINBGPL0BUBEADmW5NlOIlj\n -----END PGP PUBLIC KEY BLOCK-----\n",
            "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGPL0BUBEADmW5NlOIlj\n \
             -----END PGP PUBLIC KEY BLOCK-----",
        ),
    ];
    for (file, content, signed_by) in cases {
        let etc = tempfile::tempdir().unwrap();
        fs::create_dir_all(etc.path().join("sources.list.d")).unwrap();
        fs::write(etc.path().join(file), content).unwrap();
        // Twice: the second run finds the suite and writes nothing.
        let out = sourced(
            "ensure_backports bookworm && ensure_backports bookworm",
            &[("STRATA_APT_ETC", etc.path())],
        );
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
        let written = etc
            .path()
            .join("sources.list.d/strata-bookworm-backports.sources");
        let got = fs::read_to_string(&written).unwrap();
        assert!(
            got.contains("URIs: http://mirror.example.invalid/debian\n"),
            "{got}"
        );
        assert!(got.contains("Suites: bookworm-backports\n"), "{got}");
        assert!(
            got.contains(signed_by),
            "{file}: expected {signed_by:?} in\n{got}"
        );
        // Every URL it wrote is one the machine's source already had.
        for url in got.split_whitespace().filter(|w| w.contains("://")) {
            assert!(
                content.contains(url),
                "{file}: {url} is not from the machine's sources:\n{got}"
            );
        }
        assert_eq!(
            text(&out.stderr)
                .matches("added bookworm-backports")
                .count(),
            1,
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn bookworm_without_a_debian_source_says_so() {
    let etc = tempfile::tempdir().unwrap();
    let out = sourced(
        "ensure_backports bookworm",
        &[("STRATA_APT_ETC", etc.path())],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("no enabled apt source for bookworm"), "{err}");
    assert!(!etc
        .path()
        .join("sources.list.d/strata-bookworm-backports.sources")
        .exists());
}

#[test]
fn releases_are_recognised_and_unknown_ones_named() {
    let dir = tempfile::tempdir().unwrap();
    let known = [
        (
            "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
            "debian-12",
        ),
        (
            "ID=debian\nVERSION_ID=\"13\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n",
            "debian-13",
        ),
        (
            "ID=ubuntu\nVERSION_ID=\"22.04\"\nPRETTY_NAME=\"Ubuntu 22.04.5 LTS\"\n",
            "ubuntu-22.04",
        ),
        (
            "ID=ubuntu\nVERSION_ID=\"24.04\"\nPRETTY_NAME=\"Ubuntu 24.04.3 LTS\"\n",
            "ubuntu-24.04",
        ),
    ];
    let osr = dir.path().join("os-release");
    for (content, want) in known {
        fs::write(&osr, content).unwrap();
        let out = sourced(
            "detect_release && echo \"$SETUP_RELEASE\"",
            &[("STRATA_OS_RELEASE", &osr)],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), want);
    }
    fs::write(
        &osr,
        "ID=fedora\nVERSION_ID=40\nPRETTY_NAME=\"Fedora Linux 40 (Workstation Edition)\"\n",
    )
    .unwrap();
    let out = sourced("detect_release", &[("STRATA_OS_RELEASE", &osr)]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("unsupported release: Fedora Linux 40 (Workstation Edition)"),
        "{err}"
    );
}

/// The host's Debian archive source, as a one-line source for `suite`:
/// taken through ci/setup's own reading of the apt sources.
fn host_debian_source(suite: &str) -> String {
    let out = sourced(
        "c=$(. /etc/os-release && echo \"$VERSION_CODENAME\") && backports_stanza \"$c\"",
        &[],
    );
    assert!(
        out.status.success(),
        "the host has no enabled Debian source for its own release to take the mirror from: {}",
        text(&out.stderr)
    );
    let stanza = text(&out.stdout);
    let field = |name: &str| {
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let uri = field("URIs:")
        .split_whitespace()
        .next()
        .expect("a URI")
        .to_owned();
    let key = field("Signed-By:");
    if key.starts_with('/') {
        format!("deb [signed-by={key}] {uri} {suite} main")
    } else {
        format!("deb {uri} {suite} main")
    }
}

#[test]
fn setup_base_in_a_fresh_trixie_chroot() {
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    assert_eq!(
        uid, 0,
        "this test needs root (mmdebstrap makes a chroot): run it as root"
    );
    let mmdebstrap = Command::new("mmdebstrap").arg("--version").output();
    assert!(
        matches!(&mmdebstrap, Ok(o) if o.status.success()),
        "mmdebstrap is missing: install it (`ci/setup vm` does) — this test does not skip"
    );
    let source = host_debian_source("trixie");
    let work = tempfile::Builder::new()
        .prefix("strata-setup-trixie.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = work.path().join("root");
    // In the chroot: set up twice (the second run must find everything and
    // run no apt at all), then record what is there. Output goes to files
    // so that the two runs can be told apart; on failure it is shown.
    let run = |n: &str| {
        format!(
            "chroot \"$1\" bash /root/ci/setup base >\"$1/root/setup-{n}.out\" 2>&1 || \
             {{ cat \"$1/root/setup-{n}.out\"; exit 1; }}; \
             stat -c %s \"$1/var/tmp/strata-setup.log\" >\"$1/root/log-size-{n}\""
        )
    };
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("1500")
        .arg("mmdebstrap")
        .arg("--variant=minbase")
        .arg("--customize-hook=mkdir -p \"$1/root/ci\"")
        .arg(format!(
            "--customize-hook=copy-in {} /root/ci",
            setup_script().display()
        ))
        .arg(format!("--customize-hook={}", run("1")))
        .arg(format!("--customize-hook={}", run("2")))
        .arg("--customize-hook=chroot \"$1\" mkfs.btrfs --version >\"$1/root/btrfs-version\"")
        .arg("trixie")
        .arg(&root)
        .arg(&source)
        .output()
        .expect("running mmdebstrap");
    let took = started.elapsed().as_secs_f64();
    eprintln!("trixie chroot + ci/setup base twice: {took:.0} s");
    assert!(
        out.status.success(),
        "mmdebstrap or ci/setup in the chroot failed ({}, after {took:.0} s):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let read = |p: &str| fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));

    let first = read("root/setup-1.out");
    eprintln!("first run printed:\n{first}");
    let lines: Vec<&str> = first.lines().collect();
    assert!(
        lines.iter().all(|l| l.starts_with("ci/setup: ")),
        "set-up must print only its own one-line steps:\n{first}"
    );
    assert!(lines.len() <= 4, "too chatty:\n{first}");
    assert!(first.contains("installing "), "{first}");
    assert!(
        !first.contains("backports"),
        "trixie needs no backports:\n{first}"
    );

    assert_eq!(
        read("root/setup-2.out"),
        "",
        "second run must print nothing"
    );
    assert_eq!(
        read("root/log-size-1"),
        read("root/log-size-2"),
        "second run must not run apt (the log grew)"
    );

    let log = read("var/tmp/strata-setup.log");
    assert!(
        log.contains("Setting up btrfs-progs"),
        "apt's output belongs in the log"
    );

    let leftovers: Vec<_> = fs::read_dir(root.join("etc/apt/sources.list.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("strata-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no source added on trixie: {leftovers:?}"
    );

    let version = read("root/btrfs-version");
    // "mkfs.btrfs, part of btrfs-progs v6.14"
    let v: Vec<u32> = version
        .split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or("")
        .split('.')
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(
        v.len() >= 2 && (v[0], v[1]) >= (6, 12),
        "btrfs-progs on trixie: {version}"
    );
}
