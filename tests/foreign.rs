//! `strata test` on an image built by someone else: no build manifest, so
//! expectations are read off the image. Boots a real VM: needs the image
//! ci/test builds with `--state-migration copy` (STRATA_TEST_COPY_IMAGE).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn image_without_manifest_is_tested_and_its_warnings_explained() {
    let copy = std::env::var_os("STRATA_TEST_COPY_IMAGE")
        .map(PathBuf::from)
        .expect("STRATA_TEST_COPY_IMAGE is not set: run ci/test (it builds the image)");
    let dir = tempfile::Builder::new()
        .prefix("strata-foreign-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // The image alone, as someone else would hand it over.
    let image = dir.path().join("their.img");
    let cp = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&copy)
        .arg(&image)
        .status()
        .unwrap();
    assert!(cp.success());
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("test")
        .arg(&image)
        .args([
            "--accel",
            "tcg",
            "--checks",
            "state-mounts,overmount",
            "--json",
        ])
        .arg(&json)
        .arg("--artifacts")
        .arg(dir.path().join("artifacts"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("no build manifest"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let status = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["status"].as_str().unwrap().to_owned())
    };
    // The five state subvolumes found on the image are all mounted...
    assert_eq!(status("state-mounts").as_deref(), Some("pass"), "{stdout}");
    // ...but each hides the copy left under it, named with its files.
    assert_eq!(status("overmount").as_deref(), Some("fail"), "{stdout}");
    let mut mountpoints: Vec<String> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["kind"] == "overmount")
        .map(|w| w["mountpoint"].as_str().unwrap().to_owned())
        .collect();
    mountpoints.sort();
    assert_eq!(mountpoints, ["/home", "/opt", "/root", "/srv", "/var"]);
    assert!(stdout.contains("/root/.ssh/authorized_keys"), "{stdout}");
    assert!(!image.with_extension("img.manifest.json").exists());
}
