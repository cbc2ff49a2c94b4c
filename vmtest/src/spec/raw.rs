//! The test file as TOML says it: every key, nothing resolved. Unknown
//! keys are refused (`deny_unknown_fields`) so a typo is an error, not a
//! key silently ignored; values that need a line for their error later are
//! `Spanned`.

use serde::Deserialize;
use toml::Spanned;

pub(super) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpec {
    pub image: Option<S<String>>,
    pub build: Option<S<RawBuild>>,
    pub machine: Option<RawMachine>,
    pub checks: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub setup: Vec<S<RawSetup>>,
    #[serde(default)]
    pub check: Vec<S<RawCheck>>,
    pub state: Option<RawState>,
    #[serde(default)]
    pub scenario: Vec<S<RawScenario>>,
    pub upgrade: Option<S<RawUpgrade>>,
    pub boot_health: Option<RawBootHealth>,
    pub output: Option<RawOutput>,
}

/// `strata build`'s options, by the same names (`_` for `-`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuild {
    pub rootfs: Option<S<String>>,
    pub size: Option<S<String>>,
    pub output: Option<S<String>>,
    pub label: Option<S<String>>,
    pub state_dirs: Option<S<Vec<String>>>,
    pub root_device: Option<S<String>>,
    pub kernel: Option<S<String>>,
    pub initramfs: Option<S<String>>,
    pub kernel_args: Option<S<String>>,
    pub state_migration: Option<S<String>>,
    pub fs_uuid: Option<S<String>>,
    pub backend: Option<S<String>>,
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMachine {
    pub memory: Option<S<u32>>,
    pub cpus: Option<S<u32>>,
    pub accel: Option<S<String>>,
    pub timeout: Option<S<u64>>,
    pub boot: Option<S<String>>,
    pub later_boots: Option<S<String>>,
    pub disk_bus: Option<S<String>>,
    pub qemu: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSetup {
    pub run: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    pub name: S<String>,
    pub run: Option<S<String>>,
    pub wait_for_unit: Option<S<String>>,
    pub expect_exit: Option<i64>,
    pub stdout_matches: Option<S<String>>,
    pub stdout_contains: Option<S<String>>,
    pub stderr_matches: Option<S<String>>,
    pub phases: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    #[serde(default)]
    pub preserve: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScenario {
    pub name: S<String>,
    pub run: S<Commands>,
    pub checks: S<Vec<S<String>>>,
}

/// `run = "cmd"` or `run = ["cmd1", "cmd2"]`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a command string or an array of command strings"
)]
pub(super) enum Commands {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpgrade {
    pub rootfs: S<String>,
    pub label: Option<S<String>>,
    pub state_migration: Option<S<String>>,
    pub state_data: Option<S<String>>,
    pub in_guest: Option<bool>,
    pub power_cut: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBootHealth {
    #[serde(default)]
    pub ignore: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    pub json: Option<S<String>>,
    pub junit: Option<S<String>>,
    pub artifacts: Option<S<String>>,
}
