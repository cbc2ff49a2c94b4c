//! `strata test` as a process among processes: what a signal, a SIGKILL or
//! a second run does to it. The real binary runs against a fake QEMU (a
//! script that records its pid and sleeps) through the real spawn path, so
//! no VM boots; it needs `qemu-img` for the overlay, as every run does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    qemu: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.path().join("a.img.manifest.json"), manifest_json()).unwrap();
        let qemu = dir.path().join("fake-qemu");
        // Records its pid (atomically) and sleeps like a QEMU that never
        // opens its QMP socket.
        std::fs::write(
            &qemu,
            "#!/bin/sh\necho $$ > \"$FAKE_QEMU_PID.tmp\" && mv \"$FAKE_QEMU_PID.tmp\" \"$FAKE_QEMU_PID\"\nexec sleep 300\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Setup { dir, image, qemu }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `strata test` on the fake image with the fake QEMU; its temp dir
    /// (work dirs) is the setup's own `tmp`.
    fn strata(&self, pid_file: &str, extra: &[&str]) -> Command {
        self.strata_with(&self.qemu, pid_file, extra)
    }

    fn strata_with(&self, qemu: &Path, pid_file: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("test")
            .arg(&self.image)
            .args(["--accel", "tcg", "--timeout", "120", "--qemu"])
            .arg(qemu)
            .args(extra)
            .env("FAKE_QEMU_PID", self.path(pid_file))
            .env("TMPDIR", self.path("tmp"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn start(&self, pid_file: &str, extra: &[&str]) -> (Child, i32) {
        let child = self.strata(pid_file, extra).spawn().unwrap();
        let qemu = wait_for_pid(&self.path(pid_file), Duration::from_secs(60));
        (child, qemu)
    }
}

fn manifest_json() -> String {
    serde_json::json!({
        "manifest_version": 1, "label": "factory",
        "fs_uuid": "3f1c0000-0000-4000-8000-000000000001",
        "root_device": "UUID=3f1c0000-0000-4000-8000-000000000001",
        "state_dirs": {"created": ["var"], "skipped": []},
        "fstab_lines_added": [], "state_migration": "move", "moved_files": [],
        "kernel": "systems/factory/kernel", "initramfs": null,
        "kernel_source": "boot/vmlinuz", "initramfs_source": null,
        "kernel_args": "", "image_size": 0, "timings": []
    })
    .to_string()
}

fn wait_for_pid(file: &Path, within: Duration) -> i32 {
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            return text.trim().parse().unwrap();
        }
        assert!(t.elapsed() < within, "the fake QEMU never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Running or sleeping; a zombie or a missing process is gone.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            state != Some(Some('Z'))
        }
        Err(_) => false,
    }
}

fn gone_within(pid: i32, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

fn work_dirs(tmp: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("strata-vm."))
        .collect();
    v.sort();
    v
}

#[test]
fn a_sigkilled_strata_test_leaves_no_qemu_and_the_next_run_removes_its_work_dir() {
    let s = Setup::new();
    let (mut strata, qemu) = s.start("qemu.pid", &[]);
    let strata_pid = strata.id();
    assert!(alive(qemu));
    strata.kill().unwrap(); // SIGKILL: no handler, no cleanup of its own.
    strata.wait().unwrap();
    let kill_guard = KillOnDrop(qemu);
    assert!(
        gone_within(qemu, Duration::from_secs(5)),
        "QEMU (pid {qemu}) outlived the SIGKILLed strata"
    );
    drop(kill_guard);
    // Its work dir is debris now, named after it.
    let debris = work_dirs(&s.path("tmp"));
    assert_eq!(debris.len(), 1, "{debris:?}");
    assert!(
        debris[0].starts_with(&format!("strata-vm.{strata_pid}.")),
        "{debris:?}"
    );
    // The next run (here one that fails at once: no such QEMU) sweeps it.
    let out = s
        .strata_with(Path::new("/nonexistent/qemu"), "unused.pid", &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(work_dirs(&s.path("tmp")), Vec::<String>::new());
}

/// Kills a leftover fake QEMU if the test fails, so a red test leaves no
/// process behind either.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: kill(2) on the fake QEMU this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

#[test]
fn sigint_still_writes_the_json_and_junit_reports_marked_interrupted() {
    let s = Setup::new();
    let json = s.path("report.json");
    let junit = s.path("report.xml");
    let art = s.path("art");
    let (strata, qemu) = s.start(
        "qemu.pid",
        &[
            "--json",
            json.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
            "--artifacts",
            art.to_str().unwrap(),
        ],
    );
    let _guard = KillOnDrop(qemu);
    signal(strata.id(), libc::SIGINT);
    let out = strata.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted (SIGINT)"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report written"))
            .unwrap();
    assert_eq!(report["interrupted"], "SIGINT", "{report}");
    assert_eq!(report["verdict"], "fail");
    assert!(report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] == "skip"));
    let xml = std::fs::read_to_string(&junit).expect("JUnit report written");
    assert!(
        xml.contains(r#"<error message="interrupted (SIGINT); QEMU killed"#),
        "{xml}"
    );
    assert!(art.join("report.json").is_file());
    assert!(gone_within(qemu, Duration::from_secs(5)), "QEMU killed");
    assert_eq!(work_dirs(&s.path("tmp")), Vec::<String>::new());
}

#[test]
fn a_second_run_on_the_same_artifacts_dir_is_refused_naming_the_first() {
    let s = Setup::new();
    let art = s.path("art");
    let args = ["--artifacts", art.to_str().unwrap()];
    let (first, qemu) = s.start("first.pid", &args);
    let _guard = KillOnDrop(qemu);
    let out = s.strata("second.pid", &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another `strata test` run (pid {}",
            first.id()
        )),
        "{stderr}"
    );
    assert!(
        !s.path("second.pid").exists(),
        "the second run started no QEMU"
    );
    signal(first.id(), libc::SIGTERM);
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
}
