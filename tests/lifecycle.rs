//! The upgrade lifecycle in real VMs (`strata test --upgrade-to`, issue 8).
//! Upgrades a private copy of the fixture image (STRATA_TEST_IMAGE, its
//! manifest next to it) to a second rootfs made from the fixture's
//! (STRATA_TEST_UPGRADE_ROOTFS: a marker file, a changed file, one more file
//! under /srv); `ci/test` makes both. Without them these tests FAIL: a
//! silently skipped VM test proves nothing. Needs root.
//!
//! Each test is three boots. They take turns: the copies of one image share
//! its filesystem UUID, and the upgrades mount them (the kernel refuses two
//! at once); one VM at a time also keeps TCG boots within budget.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use strata_builder::manifest::Manifest;

static TURN: Mutex<()> = Mutex::new(());

const NEW: &str = "v2";

fn env_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: these tests boot real VMs and need {what}. Run ci/test (it makes it)"
        )
    });
    assert!(p.exists(), "{var}={} does not exist", p.display());
    p
}

fn fixture() -> (PathBuf, Manifest) {
    let image = env_path("STRATA_TEST_IMAGE", "the fixture image");
    let m = Manifest::load(&Manifest::default_path(&image))
        .unwrap_or_else(|e| panic!("STRATA_TEST_IMAGE's manifest: {e}"));
    (image, m)
}

fn upgrade_rootfs() -> PathBuf {
    let r = env_path(
        "STRATA_TEST_UPGRADE_ROOTFS",
        "a second rootfs: the fixture's plus /etc/strata-upgrade-marker, a changed file and /srv/www/new.html",
    );
    assert!(
        r.join("etc/strata-upgrade-marker").is_file() && r.join("srv/www/new.html").is_file(),
        "STRATA_TEST_UPGRADE_ROOTFS={} lacks the marker or /srv/www/new.html",
        r.display()
    );
    r
}

/// What says the image was not touched: its size and mtime, its manifest.
fn fingerprint(image: &Path) -> (u64, std::time::SystemTime, Vec<u8>) {
    let md = std::fs::metadata(image).unwrap();
    let manifest = std::fs::read(Manifest::default_path(image)).unwrap();
    (md.len(), md.modified().unwrap(), manifest)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    report: serde_json::Value,
    junit: String,
    _dir: tempfile::TempDir,
}

impl Run {
    fn says(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn row(&self, name: &str) -> &serde_json::Value {
        self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no row {name}\n{}", self.says()))
    }

    fn status(&self, name: &str) -> &str {
        self.row(name)["status"].as_str().unwrap()
    }

    fn failing(&self) -> Vec<&str> {
        self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "fail")
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }
}

/// `strata test IMAGE --upgrade-to ROOTFS --upgrade-label v2 EXTRA...`.
fn lifecycle(extra: &[&str]) -> Run {
    lifecycle_env(extra, &[])
}

/// The same with `--timeout` from `extra` when it has one, and `env` set
/// for strata.
fn lifecycle_env(extra: &[&str], env: &[(&str, &str)]) -> Run {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (image, _) = fixture();
    let rootfs = upgrade_rootfs();
    let dir = tempfile::Builder::new()
        .prefix("strata-lifecycle-test.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (json, junit) = (dir.path().join("report.json"), dir.path().join("junit.xml"));
    let before = fingerprint(&image);
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("test")
        .arg(&image)
        .args(["--accel", "tcg"])
        .args(match extra.contains(&"--timeout") {
            true => &[][..],
            false => &["--timeout", "900"][..],
        })
        .arg("--upgrade-to")
        .arg(&rootfs)
        .args(["--upgrade-label", NEW, "--json"])
        .arg(&json)
        .arg("--junit")
        .arg(&junit)
        .arg("--artifacts")
        .arg(dir.path().join("artifacts"))
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("{stdout}\n{stderr}");
    assert!(
        fingerprint(&image) == before,
        "the image under test or its manifest changed"
    );
    let report = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no JSON report\n{stdout}\n{stderr}"));
    Run {
        code: out.status.code(),
        junit: std::fs::read_to_string(&junit).unwrap_or_default(),
        stdout,
        stderr,
        report,
        _dir: dir,
    }
}

/// The lifecycle as the README's example test file tells it
/// (examples/upgrade.toml: setup data, the user's checks in each phase,
/// the preserved paths), with the fixture's image and second rootfs given
/// on the command line.
#[test]
fn upgrade_then_rollback_keeps_every_token_and_boots_the_right_version() {
    let (_, m) = fixture();
    let old = m.default.clone();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/upgrade.toml");
    let r = lifecycle(&["--spec", spec.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.says());
    assert_eq!(r.failing(), Vec::<&str>::new());
    assert_eq!(r.report["boots"], 3, "{}", r.says());
    let phases: Vec<(String, String, u64)> = r.report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap().to_owned(),
                p["label"].as_str().unwrap().to_owned(),
                p["boot"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("before".into(), old.clone(), 1),
            ("upgrade".into(), NEW.into(), 2),
            ("rollback".into(), old.clone(), 3),
        ]
    );
    // `/` is the new version's run after the upgrade, the old one's after
    // the rollback; the detail names the subvolume.
    for (row, label) in [
        ("before/root", &old),
        ("upgrade/root", &NEW.to_owned()),
        ("rollback/root", &old),
    ] {
        assert_eq!(r.status(row), "pass", "{}", r.says());
        let detail = r.row(row)["detail"].as_str().unwrap();
        assert!(
            detail.ends_with(&format!("/systems/{label}/run")),
            "{row}: {detail}"
        );
        assert_eq!(r.row(row)["label"], label.as_str());
    }
    // Every token intact: one line per state dir (and /root/.ssh), the
    // rollback boot reading those of both earlier boots.
    let dirs = &m.default_version().state_dirs.created;
    for (row, from) in [
        ("upgrade/tokens", "from before intact"),
        ("rollback/tokens", "from before, upgrade intact"),
    ] {
        assert_eq!(r.status(row), "pass", "{}", r.says());
        let evidence: Vec<&str> = r.row(row)["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        for d in dirs {
            assert!(
                evidence
                    .iter()
                    .any(|e| e.starts_with(&format!("/{d}: ")) && e.contains(from)),
                "{row}: /{d}: {evidence:?}"
            );
        }
        if dirs.iter().any(|d| d == "root") {
            assert!(
                evidence
                    .iter()
                    .any(|e| e.starts_with("/root/.ssh: ") && e.contains(from)),
                "{row}: {evidence:?}"
            );
        }
    }
    for phase in ["before", "upgrade", "rollback"] {
        for check in ["overmount", "boot-health", "app-data", "state-contract"] {
            assert_eq!(
                r.status(&format!("{phase}/{check}")),
                "pass",
                "{phase}/{check}"
            );
        }
    }
    // The example's own checks, each in the phases it names.
    assert_eq!(r.status("before/runs-factory"), "pass");
    assert_eq!(r.status("upgrade/runs-v2"), "pass");
    assert_eq!(r.status("rollback/runs-factory"), "pass");
    for (row, n) in [("before/shutdown", 1), ("upgrade/shutdown", 2)] {
        assert_eq!(r.status(row), "pass", "{}", r.says());
        let detail = r.row(row)["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!("shutdown of boot {n}")),
            "{detail}"
        );
    }
    assert!(r.stdout.contains("Upgrade lifecycle"), "{}", r.says());
    assert!(r.junit.contains(r#"name="upgrade/root""#), "{}", r.junit);
    assert!(r
        .junit
        .contains(r#"<property name="phase.upgrade" value="boot 2, version v2"#));
}

#[test]
fn an_upgrade_that_copies_state_data_fails_overmount_for_exactly_those_dirs() {
    let (_, m) = fixture();
    let rootfs = upgrade_rootfs();
    // The state dirs the new rootfs has data in: exactly what the copy
    // leaves under the new version's mountpoints.
    let expected: BTreeSet<String> = m
        .default_version()
        .state_dirs
        .created
        .iter()
        .filter(|d| {
            std::fs::read_dir(rootfs.join(d))
                .map(|mut e| e.next().is_some())
                .unwrap_or(false)
        })
        .map(|d| format!("/{d}"))
        .collect();
    assert!(expected.contains("/srv"), "{expected:?}");
    // The state-data merge copies the new rootfs's /srv/www/new.html into
    // the state subvolume: a change to a preserved path the upgrade made.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("preserve-www.toml");
    std::fs::write(&spec, "[state]\npreserve = [\"/srv/www\"]\n").unwrap();
    let r = lifecycle(&[
        "--state-migration",
        "copy",
        "--spec",
        spec.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.says());
    assert_eq!(r.status("upgrade/overmount"), "fail", "{}", r.says());
    assert_eq!(r.status("before/overmount"), "pass", "{}", r.says());
    assert_eq!(r.status("rollback/overmount"), "pass", "{}", r.says());
    assert_eq!(r.status("upgrade/root"), "pass", "{}", r.says());
    assert_eq!(r.status("rollback/root"), "pass", "{}", r.says());
    // The state subvolumes stay authoritative: the tokens are all there.
    assert_eq!(r.status("upgrade/tokens"), "pass", "{}", r.says());
    assert_eq!(r.status("rollback/tokens"), "pass", "{}", r.says());
    let upgrade_warnings: Vec<&serde_json::Value> = r.report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["kind"] == "overmount")
        .inspect(|w| assert_eq!(w["phase"], "upgrade", "{w}"))
        .collect();
    let hidden_under: BTreeSet<String> = upgrade_warnings
        .iter()
        .map(|w| w["mountpoint"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hidden_under, expected, "{}", r.says());
    let srv = upgrade_warnings
        .iter()
        .find(|w| w["mountpoint"] == "/srv")
        .unwrap();
    assert!(
        srv["shadowed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/srv/www/new.html"),
        "{srv}"
    );
    assert!(r.stdout.contains("/srv/www/new.html"), "{}", r.says());
    let detail = r.row("upgrade/overmount")["detail"].as_str().unwrap();
    for mp in &expected {
        assert!(detail.contains(mp.as_str()), "{detail}");
    }
    assert_eq!(r.status("before/state-contract"), "pass", "{}", r.says());
    for row in ["upgrade/state-contract", "rollback/state-contract"] {
        assert_eq!(r.status(row), "fail", "{}", r.says());
        let evidence = r.row(row)["evidence"].to_string();
        assert!(
            evidence.contains("/srv/www/new.html: new file"),
            "{row}: {evidence}"
        );
    }
}

/// SIGKILL in the middle of `strata upgrade` (after the new orig was synced,
/// before anything committed it) on a private copy of the fixture image:
/// `strata versions` tells the truth (only the old version, the half one as
/// debris or gone) and the image still boots its old default with the
/// layout checks passing: a real boot, not only an offline read.
#[test]
fn an_upgrade_killed_mid_way_leaves_an_image_that_boots_its_old_default() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (image, m) = fixture();
    let rootfs = upgrade_rootfs();
    let dir = tempfile::Builder::new()
        .prefix("strata-killed-upgrade.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let copy = dir.path().join("copy.img");
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&image)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(
        Manifest::default_path(&image),
        Manifest::default_path(&copy),
    )
    .unwrap();
    let strata = || Command::new(env!("CARGO_BIN_EXE_strata"));

    let mut child = strata()
        .arg("upgrade")
        .arg(&copy)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--label", NEW])
        .env("STRATA_STOP_AFTER_STEP", "sync-rootfs")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stat = format!("/proc/{}/stat", child.id());
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("strata upgrade ended ({status}) before it stopped after sync-rootfs");
        }
        let state = std::fs::read_to_string(&stat).unwrap_or_default();
        if state
            .rsplit(')')
            .next()
            .map(str::trim_start)
            .is_some_and(|s| s.starts_with('T'))
        {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(600),
            "never stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The next command works on it and tells the truth.
    let out = strata()
        .arg("versions")
        .arg(&copy)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["default"], m.default.as_str(), "{v}");
    let labels: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, [m.default.as_str()], "no half version listed: {v}");

    // And it boots: the old default, its layout intact.
    let out = strata()
        .arg("test")
        .arg(&copy)
        .args([
            "--accel",
            "tcg",
            "--checks",
            "root,state-mounts,fstab,overmount",
            "--artifacts",
        ])
        .arg(dir.path().join("artifacts"))
        .output()
        .unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("/systems/{}/run", m.default)),
        "{said}"
    );
}

/// The lifecycle with the changes made by the running system itself
/// (`--in-guest`): strata inside the guest, handed on the payload disk with
/// the new rootfs, runs `upgrade --running` (from the booted version's
/// orig, the default flipped last) and later `set-default --running`; the
/// host only reads the copy back between boots. Every boot through
/// extlinux: the guest's own flip is what the next boot shows.
#[test]
fn an_upgrade_made_by_the_running_system_boots_and_rolls_back() {
    let (_, m) = fixture();
    let old = m.default.clone();
    let r = lifecycle(&["--in-guest"]);
    assert_eq!(r.code, Some(0), "{}", r.says());
    assert_eq!(r.failing(), Vec::<&str>::new());
    for (row, label) in [
        ("before/root", old.as_str()),
        ("upgrade/root", NEW),
        ("rollback/root", old.as_str()),
    ] {
        let detail = r.row(row)["detail"].as_str().unwrap();
        assert!(
            detail.ends_with(&format!("/systems/{label}/run")),
            "{row}: {detail}"
        );
    }
    for row in ["upgrade/tokens", "rollback/tokens", "upgrade/overmount"] {
        assert_eq!(r.status(row), "pass", "{}", r.says());
    }
    let phases = r.report["phases"].as_array().unwrap();
    let change = phases[1]["change"].as_str().unwrap();
    assert!(
        change.starts_with("in the guest: ") && change.contains("upgrade --running"),
        "{change}"
    );
    let change = phases[2]["change"].as_str().unwrap();
    assert!(change.contains("set-default --running"), "{change}");
}

/// The steps `strata upgrade` reports for a rootfs directory, in order.
fn upgrade_steps() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["upgrade", "--list-steps"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .filter(|l| !l.is_empty() && l != "extract-rootfs")
        .collect()
}

/// The power-cut matrix (issue 19) around the commit point of the upgrade
/// the running system makes of itself: a cut after the new version is
/// renamed into place, after the flush, after the flip, and at a seeded
/// random moment (mid-sync on the fixture). Each point boots what the cut
/// left through the image's own extlinux: the old version before the
/// flip, the new one after it; the tokens are intact, `strata versions`
/// there agrees and lists no debris, and the upgrade run again completes
/// and boots the new version. Every step boundary is `ci/bench powercut`
/// (about 45 minutes under TCG: more than this suite's budget).
#[test]
fn the_in_guest_upgrade_survives_power_cuts_around_its_commit_point() {
    let (_, m) = fixture();
    let old = m.default.clone();
    let steps = upgrade_steps();
    let chosen = ["commit-version", "flush", "set-default"];
    for c in chosen {
        assert!(steps.iter().any(|s| s == c), "{c} not in {steps:?}");
    }
    let plan = format!("steps:{}+random:1:19", chosen.join(","));
    let r = lifecycle(&["--power-cut", &plan, "--timeout", "3600"]);
    assert_eq!(r.code, Some(0), "{}", r.says());
    assert_eq!(r.failing(), Vec::<&str>::new());
    for (step, booted) in [
        ("commit-version", old.as_str()),
        ("flush", old.as_str()),
        ("set-default", NEW),
    ] {
        let row = r.row(&format!("power-cut/{step}"));
        assert_eq!(row["status"], "pass", "{}", r.says());
        let evidence = row["evidence"].to_string();
        // Before the flip only the old version may boot; the flip is
        // durable when its step ends, so after it the new one boots.
        assert!(
            evidence.contains(&format!("booted {booted}")),
            "power-cut/{step}: {evidence}"
        );
        assert!(
            evidence.contains(&format!("upgrade run again: {NEW} boots")),
            "{evidence}"
        );
    }
    let random: Vec<&serde_json::Value> = r.report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("power-cut/at-"))
        .collect();
    assert_eq!(random.len(), 1, "{}", r.says());
    assert_eq!(random[0]["status"], "pass");
    // One JUnit test case per cut point.
    assert_eq!(
        r.junit.matches("name=\"power-cut/").count(),
        chosen.len() + 1,
        "{}",
        r.junit
    );
}

/// The matrix can fail: an upgrade made unsafe on purpose (the default
/// and the menu name the new version at the end of `mount`, before it
/// exists) fails at the first cut after the flip, with what the machine
/// did instead of booting, while the cut before it passes.
#[test]
fn an_upgrade_that_flips_the_default_first_fails_the_matrix_where_it_shows() {
    let (_, m) = fixture();
    let r = lifecycle_env(
        &["--power-cut", "steps:check-image,mount"],
        &[("STRATA_UNSAFE_UPGRADE", "flip-first")],
    );
    assert_eq!(r.code, Some(1), "{}", r.says());
    assert_eq!(r.failing(), ["power-cut/mount"], "{}", r.says());
    let ok = r.row("power-cut/check-image")["evidence"].to_string();
    assert!(ok.contains(&format!("booted {}", m.default)), "{ok}");
    let bad = r.row("power-cut/mount");
    let detail = bad["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("the machine did not boot a whole version"),
        "{detail}"
    );
    let evidence = bad["evidence"].to_string();
    assert!(evidence.contains("console: "), "{evidence}");
}
