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
use strata_builder::steps::STOP_AFTER_STEP_ENV;

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
