//! Test files (`strata test --spec FILE`): a TOML file that says what to
//! boot, on what machine, what to set up in the guest, which checks judge
//! it and in which phases. `raw` is the file as serde reads it, `resolve`
//! turns it into a [`Spec`] and refuses what cannot run, `plan` renders
//! what a run will do (`--dry-run`). Every error names the file, the line
//! and the key (`app.toml:14: check[1].phases: …`): a test file is
//! reviewed and edited by people, and "invalid type" without a place is
//! not an answer. Nothing here boots or builds: the CLI fills a
//! `TestConfig` from the `Spec` (its command-line flags override it).

pub mod plan;
mod raw;
mod resolve;
#[cfg(test)]
mod tests;

use crate::accel::AccelChoice;
use crate::checks::user::{UserCheck, When};
use crate::checks::CheckId;
use crate::qemu::BootMode;
use crate::qemu::DiskBus;
use crate::run::{Scenario, TestConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;
use strata_builder::migrate::Migration;
use strata_builder::rootfs_tar::{self, RootfsInput};
use strata_builder::rootless::BackendChoice;
use strata_builder::sync::StatePolicy;

/// Where in the file a value was given: for errors found after parsing
/// (a path that does not exist, a phase the run turned out not to have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub line: usize,
    /// The key's path: `check[1].phases`, `upgrade.rootfs`.
    pub key: String,
}

/// A value and where the file gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub site: Site,
}

/// A test file that cannot run: exit 2 (`RunError::Input`-style).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct SpecError {
    /// As the user named it (not canonicalised: the message is theirs).
    pub file: PathBuf,
    /// 1-based; 0 when the file could not be read at all.
    pub line: usize,
    /// Empty when the error is the file's, not a key's (a TOML syntax error).
    pub key: String,
    pub message: String,
}

impl SpecError {
    fn render(&self) -> String {
        let mut s = self.file.display().to_string();
        if self.line > 0 {
            s.push_str(&format!(":{}", self.line));
        }
        if !self.key.is_empty() {
            s.push_str(&format!(": {}", self.key));
        }
        format!("{s}: {}", self.message)
    }
}

/// A test file, parsed and validated. Paths are resolved against the
/// file's directory.
#[derive(Debug, Clone)]
pub struct Spec {
    pub file: PathBuf,
    pub image: Option<Located<PathBuf>>,
    pub build: Option<BuildSpec>,
    pub machine: MachineSpec,
    /// The built-in checks to run (`checks`); None: all of them. User
    /// check names in the list are accepted and change nothing.
    pub checks: Option<Vec<CheckId>>,
    /// `[[setup]] run`: once after boot 1, before any check.
    pub setup: Vec<String>,
    pub user_checks: Vec<UserCheck>,
    /// `[state] preserve`: absolute guest paths, globs allowed.
    pub preserve: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub upgrade: Option<UpgradeSpec>,
    pub boot_health_ignore: Vec<regex::Regex>,
    pub output: OutputSpec,
    /// Where each user check's `phases` was given (by index), and where
    /// the first scenario is: for [`Spec::check_run_shape`], which the
    /// CLI calls again once `--upgrade-to` may have made the run a
    /// lifecycle.
    phase_sites: Vec<Option<Site>>,
    scenario_site: Option<Site>,
}

/// `[build]`: the image is built first, as `strata build` would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    pub rootfs: Located<PathBuf>,
    /// As written (`4G`): `strata build --size` parses it; checked here.
    pub size: String,
    /// None: the spec's `image`, else `<file stem>.img` beside the file.
    pub output: PathBuf,
    pub label: Option<String>,
    pub state_dirs: Option<Vec<String>>,
    pub root_device: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub state_migration: Option<Migration>,
    pub fs_uuid: Option<String>,
    pub backend: Option<BackendChoice>,
    pub force: bool,
}

impl BuildSpec {
    /// The `strata build` arguments this section stands for (after the
    /// subcommand name): the CLI parses them with `strata build`'s own
    /// definition, so a test file builds exactly as the command does.
    pub fn build_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--rootfs".into(),
            self.rootfs.value.clone().into(),
            "--output".into(),
            self.output.clone().into(),
            "--size".into(),
            self.size.clone().into(),
        ];
        let mut opt = |flag: &str, v: Option<std::ffi::OsString>| {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v);
            }
        };
        opt("--label", self.label.clone().map(Into::into));
        opt(
            "--state-dirs",
            self.state_dirs.as_ref().map(|d| d.join(",").into()),
        );
        opt("--root-device", self.root_device.clone().map(Into::into));
        opt("--kernel", self.kernel.clone().map(Into::into));
        opt("--initramfs", self.initramfs.clone().map(Into::into));
        opt(
            "--state-migration",
            self.state_migration.map(|m| value_name(m).into()),
        );
        opt("--fs-uuid", self.fs_uuid.clone().map(Into::into));
        opt("--backend", self.backend.map(|b| value_name(b).into()));
        // `--kernel-args=` keeps an empty value a value.
        if let Some(k) = &self.kernel_args {
            a.push(format!("--kernel-args={k}").into());
        }
        if self.force {
            a.push("--force".into());
        }
        a
    }
}

/// `[machine]`: each None leaves `TestConfig::new`'s default (the flags'
/// defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineSpec {
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub accel: Option<AccelChoice>,
    pub timeout: Option<Duration>,
    pub boot: Option<BootMode>,
    pub later_boots: Option<BootMode>,
    pub disk_bus: Option<DiskBus>,
    pub qemu: Option<PathBuf>,
}

/// `[upgrade]`: the lifecycle `--upgrade-to` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeSpec {
    pub rootfs: Located<PathBuf>,
    pub label: Option<Located<String>>,
    pub state_migration: Option<Migration>,
    pub state_data: Option<StatePolicy>,
    /// The upgrade and the rollback made by strata inside the running
    /// guest (`--in-guest`), not by the host on the powered-off copy.
    pub in_guest: bool,
    /// The power-cut matrix instead of the three stages.
    pub power_cut: Option<crate::power_cut::Plan>,
}

/// `[output]`: what `--json`, `--junit`, `--artifacts` say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputSpec {
    pub json: Option<PathBuf>,
    pub junit: Option<PathBuf>,
    pub artifacts: Option<PathBuf>,
}

/// The phases a run has, in order: what `phases` may name.
pub fn phases_of_run(lifecycle: bool) -> &'static [When] {
    if lifecycle {
        &[When::Boot, When::Upgrade, When::Rollback]
    } else {
        &[When::Boot, When::Reboot, When::PowerCut]
    }
}

/// The name clap gives a value (`--accel kvm`): the file takes the same.
pub(crate) fn value_name<E: clap::ValueEnum>(v: E) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

impl Spec {
    /// Reads and validates `file` (exit 2 on any error, naming the place).
    pub fn load(file: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(file).map_err(|e| SpecError {
            file: file.to_owned(),
            line: 0,
            key: String::new(),
            message: format!("cannot read the test file: {e}"),
        })?;
        Spec::parse(file, &text)
    }

    /// Validates `text` as the contents of `file` (whose directory relative
    /// paths are resolved against). Reads nothing: paths are checked by
    /// [`Spec::check_inputs`], once the command line has had its say.
    pub fn parse(file: &Path, text: &str) -> Result<Spec, SpecError> {
        resolve::resolve(file, text)
    }

    /// An error at `site` of this file.
    pub fn error_at(&self, site: &Site, message: impl Into<String>) -> SpecError {
        SpecError {
            file: self.file.clone(),
            line: site.line,
            key: site.key.clone(),
            message: message.into(),
        }
    }

    /// `file:line: key` for messages the CLI words itself.
    pub fn place(&self, site: &Site) -> String {
        format!("{}:{}: {}", self.file.display(), site.line, site.key)
    }

    /// The names `checks` and a scenario's `checks` may use besides the
    /// built-in ones.
    pub fn user_check_names(&self) -> Vec<&str> {
        self.user_checks.iter().map(|c| c.name.as_str()).collect()
    }

    /// Refuses what the run's shape does not allow: a user check naming a
    /// phase the run does not have, scenarios in an upgrade lifecycle.
    /// `parse` calls it with the file's own shape; the CLI again when
    /// `--upgrade-to` makes the run a lifecycle.
    pub fn check_run_shape(&self, lifecycle: bool) -> Result<(), SpecError> {
        let has = phases_of_run(lifecycle);
        for (check, site) in self.user_checks.iter().zip(&self.phase_sites) {
            let (Some(phases), Some(site)) = (&check.phases, site) else {
                continue;
            };
            if let Some(p) = phases.iter().find(|p| !has.contains(p)) {
                return Err(self.error_at(
                    site,
                    format!(
                        "phase \"{p}\" is not one this run has (the run has: {}{})",
                        names(has),
                        if lifecycle {
                            "; reboot and power-cut are the plain run's"
                        } else {
                            "; upgrade and rollback need [upgrade] or --upgrade-to"
                        }
                    ),
                ));
            }
        }
        if lifecycle {
            if let Some(site) = &self.scenario_site {
                return Err(self.error_at(
                    site,
                    "scenarios restore the plain run's first boot; an upgrade lifecycle has none (drop [upgrade] or the scenarios)",
                ));
            }
        }
        Ok(())
    }

    /// Checks the paths the run will read, where they came from this file:
    /// the image (unless it is built first, or the command line named
    /// another), the build's rootfs, the upgrade's rootfs (unless
    /// `--upgrade-to` replaced it). Before anything is read or booted.
    pub fn check_inputs(&self, image_given: bool, upgrade_given: bool) -> Result<(), SpecError> {
        if let (Some(image), None, false) = (&self.image, &self.build, image_given) {
            match std::fs::metadata(&image.value) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Err(self.error_at(
                        &image.site,
                        format!("{} is not a regular file", image.value.display()),
                    ))
                }
                Err(e) => {
                    return Err(
                        self.error_at(&image.site, format!("{}: {e}", image.value.display()))
                    )
                }
            }
        }
        if let Some(b) = &self.build {
            self.check_rootfs(&b.rootfs)?;
        }
        if let (Some(u), false) = (&self.upgrade, upgrade_given) {
            self.check_rootfs(&u.rootfs)?;
        }
        Ok(())
    }

    /// What `--rootfs` takes: a directory, or a tar archive told by its
    /// bytes.
    fn check_rootfs(&self, rootfs: &Located<PathBuf>) -> Result<(), SpecError> {
        let path = &rootfs.value;
        match rootfs_tar::classify(path) {
            Ok(RootfsInput::Tar(_)) => Ok(()),
            Ok(RootfsInput::Dir) if path.is_dir() => Ok(()),
            Ok(RootfsInput::Dir) => Err(self.error_at(
                &rootfs.site,
                format!(
                    "{}: no such directory or tar archive (a root filesystem)",
                    path.display()
                ),
            )),
            Err(e) => Err(self.error_at(&rootfs.site, e.to_string())),
        }
    }

    /// Fills `cfg` with what the file says; what it does not say keeps
    /// `cfg`'s value. The command line's flags are applied after this.
    pub fn apply(&self, cfg: &mut TestConfig) {
        let m = &self.machine;
        if let Some(v) = m.memory_mib {
            cfg.memory_mib = v;
        }
        if let Some(v) = m.cpus {
            cfg.cpus = v;
        }
        if let Some(v) = m.accel {
            cfg.accel = v;
        }
        if let Some(v) = m.timeout {
            cfg.timeout = v;
        }
        if let Some(v) = m.boot {
            cfg.boot = v;
        }
        if let Some(v) = m.later_boots {
            cfg.later_boots = v;
        }
        if let Some(v) = m.disk_bus {
            cfg.disk_bus = v;
        }
        if let Some(v) = &m.qemu {
            cfg.qemu_binary = v.clone();
        }
        if let Some(c) = &self.checks {
            cfg.checks = c.clone();
        }
        if let Some(a) = &self.output.artifacts {
            cfg.artifacts = Some(a.clone());
        }
        cfg.setup = self.setup.clone();
        cfg.user_checks = self.user_checks.clone();
        cfg.preserve = self.preserve.clone();
        cfg.scenarios = self.scenarios.clone();
        cfg.boot_health_ignore = self.boot_health_ignore.clone();
    }
}

/// Resolves check names (`--checks`, or a list in the file) against the
/// built-in checks and the user checks: the built-in ones, in registry
/// order. A user check name is accepted and selects nothing (user checks
/// always run in their phases).
pub fn builtin_checks(names: &[String], user: &[&str]) -> Result<Vec<CheckId>, String> {
    let mut ids = Vec::new();
    for n in names {
        match n.parse::<CheckId>() {
            Ok(id) => ids.push(id),
            Err(_) if user.contains(&n.as_str()) => {}
            Err(_) => return Err(unknown_check(n, user)),
        }
    }
    Ok(CheckId::ALL
        .into_iter()
        .filter(|id| ids.contains(id))
        .collect())
}

/// `unknown check "x" (built-in: …; user: …)`, the lists derived from the
/// registry and the file.
pub(crate) fn unknown_check(name: &str, user: &[&str]) -> String {
    let builtin = CheckId::ALL.map(CheckId::name).join(", ");
    if user.is_empty() {
        format!("unknown check {name:?} (built-in: {builtin})")
    } else {
        format!(
            "unknown check {name:?} (built-in: {builtin}; user: {})",
            user.join(", ")
        )
    }
}

pub(crate) fn names(phases: &[When]) -> String {
    phases
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}
