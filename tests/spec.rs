//! `strata test --spec`: the examples in `examples/` are valid test files
//! and their dry run is the plan; a malformed file is exit 2 naming the
//! file, the line and the key, before any image is read (no VM, no root: a
//! dry run reads nothing of the image). And `examples/fixture.toml` passes
//! on the fixture image in a real run (STRATA_TEST_IMAGE, which `ci/test`
//! builds; without it that test FAILS). `examples/upgrade.toml` is run by
//! tests/lifecycle.rs.

mod common;

use common::{stderr, strata};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dry_run(file: &str, extra: &[&str]) -> String {
    let out = strata()
        .current_dir(repo())
        .args(["test", "--spec", file, "--dry-run"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{file}: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_fixture_example_plans_three_boots_with_its_own_checks() {
    let plan = dry_run("examples/fixture.toml", &["/var/tmp/sys.img"]);
    let lines: Vec<&str> = plan.lines().collect();
    // IMAGE on the command line replaces the file's `image`.
    assert_eq!(lines[0], "image: /var/tmp/sys.img");
    assert!(lines[1].contains("timeout 900 s"), "{plan}");
    let boot1 = lines.iter().find(|l| l.starts_with("boot 1 ")).unwrap();
    assert!(boot1.contains("setup (2 commands)"), "{boot1}");
    assert!(
        boot1.contains("user: system-running, os-release"),
        "{boot1}"
    );
    assert!(boot1.contains("state-contract records 2 paths"), "{boot1}");
    let reboot = lines.iter().find(|l| l.starts_with("boot 2 ")).unwrap();
    assert!(
        reboot.contains("phase reboot") && reboot.contains("persistence"),
        "{reboot}"
    );
    assert!(reboot.contains("user: system-running;"), "{reboot}");
    assert!(
        lines.iter().any(|l| l.starts_with("boot 3 power cut")),
        "{plan}"
    );
    // Flags given override the file.
    let plan = dry_run(
        "examples/fixture.toml",
        &["--timeout", "60", "--checks", "root,state-contract"],
    );
    assert!(plan.contains("timeout 60 s"), "{plan}");
    assert!(plan.contains("not run (skipped): state-mounts"), "{plan}");
    // The paths to preserve still need the reboot and the power cut.
    let reboot = plan.lines().find(|l| l.starts_with("boot 2 ")).unwrap();
    assert!(!reboot.contains("persistence"), "{reboot}");
    assert!(reboot.contains("state-contract"), "{reboot}");
    // Without the state contract, nothing needs them.
    let plan = dry_run("examples/fixture.toml", &["--checks", "root"]);
    assert!(!plan.contains("boot 2 "), "{plan}");
}

#[test]
fn the_upgrade_example_plans_the_lifecycle() {
    let plan = dry_run("examples/upgrade.toml", &[]);
    assert!(
        plan.contains("boot 2 upgrade to v2 (extlinux) — phase upgrade"),
        "{plan}"
    );
    assert!(plan.contains("user: app-data, runs-v2"), "{plan}");
    assert!(plan.contains("boot 3 rollback"), "{plan}");
}

#[test]
fn a_malformed_file_is_exit_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    std::fs::write(
        &file,
        "image = \"nowhere.img\"\n\n[[check]]\nname = \"up\"\nrun = \"true\"\nphases = [\"reboooot\"]\n",
    )
    .unwrap();
    let out = strata()
        .args(["test", "--spec"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "strata: error: {}:6: check[0].phases: unknown phase \"reboooot\" (the run has: boot, reboot, power-cut)",
            file.display()
        )
    );
}

/// The README's example test file, for real: three boots of the fixture
/// image, every built-in check, the file's setup, its own checks in their
/// phases and its preserved paths, all passing.
#[test]
fn the_fixture_example_passes_on_the_fixture_image() {
    let image = std::env::var_os("STRATA_TEST_IMAGE").unwrap_or_else(|| {
        panic!(
            "STRATA_TEST_IMAGE is not set: this test boots the fixture image (ci/test builds it)"
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = strata()
        .current_dir(repo())
        .args(["test", "--spec", "examples/fixture.toml"])
        .arg(&image)
        .args(["--accel", "tcg", "--cpus", "1", "--json"])
        .arg(&json)
        .arg("--artifacts")
        .arg(dir.path().join("artifacts"))
        .output()
        .unwrap();
    let said = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{said}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let status = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no row {name}\n{said}"))["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for row in [
        "root",
        "moved-files",
        "overmount",
        "persistence",
        "boot-health",
        "shutdown",
        "state-contract",
        "boot/system-running",
        "reboot/system-running",
        "power-cut/system-running",
        "boot/os-release",
    ] {
        assert_eq!(status(row), "pass", "{row}\n{said}");
    }
    assert_eq!(report["boots"], 3, "{said}");
}
