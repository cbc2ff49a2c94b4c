//! Helpers shared by the integration tests that drive the strata binary
//! on small images they build (`mod common;` in each): one copy of how
//! strata is started (without the morph environment fallbacks or a stop
//! hook leaking in from the caller's environment) and of the shell and
//! file helpers around it.

// Each test binary compiles its own copy and uses a subset of it.
#![allow(dead_code)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use strata_builder::host::stop_point::STOP_AFTER_STEP_ENV;

pub fn strata() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    for v in [
        "DISK_SIZE",
        "VERSION_LABEL",
        "ROOT_DEVICE",
        "KERNEL_ARGS",
        "INITRAMFS_PATH",
        STOP_AFTER_STEP_ENV,
    ] {
        c.env_remove(v);
    }
    c
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-ec", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn random_file(path: &Path, bytes: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::File::open("/dev/urandom").unwrap();
    let mut data = vec![0u8; bytes];
    std::io::Read::read_exact(&mut f, &mut data).unwrap();
    fs::write(path, data).unwrap();
}

/// Waits until `child` has stopped itself (the stop hook), failing with its
/// stderr (in `log`) if it ends first.
pub fn wait_until_stopped(child: &mut std::process::Child, log: &Path) {
    let stat = format!("/proc/{}/stat", child.id());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "strata ended ({status}) before it stopped: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        let state = fs::read_to_string(&stat).unwrap_or_default();
        // "pid (comm) S ...": the state follows the command's ')'.
        if state
            .rsplit(')')
            .next()
            .map(str::trim_start)
            .is_some_and(|s| s.starts_with('T'))
        {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "never stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
}
