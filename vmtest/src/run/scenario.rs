//! Scenarios: a change made in a running guest, then judged — seconds,
//! not a boot. After the first boot's checks the run saves the booted
//! guest (`Machine::save`: vCPUs stopped, the disk frozen by an external
//! snapshot, RAM and devices to a file; the run's own guest then goes on
//! to persistence on a new overlay). Each scenario starts from that saved
//! instant in a QEMU of its own (`Machine::restore`, on its own qcow2
//! overlay over the frozen disk), runs its commands in the guest, and runs
//! its checks there. Scenarios therefore never see each other's changes
//! nor the run's reboots, and a scenario may itself reboot and cut the
//! power (persistence) without touching the run's rows. Its rows are
//! named `<scenario>/<check>` and count in the verdict like any other row.
//!
//! This is for checks whose subject exists after boot: files written under
//! a mountpoint's underlying directory, a state dir unmounted, read-only or
//! covered by a tmpfs. What only a boot shows (an fstab line, a mount that
//! fails at boot, the journal's notices of it) still needs an image and a
//! boot of its own, and so does a moved file changed in state: moved-files
//! forgives what the running system rewrote since boot, by design.

use super::{me, RunError, Session};
use crate::artifacts;
use crate::checks::user::{self, When};
use crate::checks::{self, CheckId, Vm};
use crate::machine::Machine;
use crate::qemu::DiskFormat;
use crate::report::{CheckResult, ScenarioRecord, Status};
use crate::run::Progress;
use std::path::Path;
use std::time::{Duration, Instant};

/// One change and the checks that judge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The rows' prefix: `<name>/<check>`.
    pub name: String,
    /// Run in order in the guest (`sh -c`, as root); each must succeed.
    pub commands: Vec<String>,
    /// Judged after the commands, in the registry's order; persistence
    /// reboots and power-cuts the scenario's own guest.
    pub checks: Vec<CheckId>,
    /// The user checks (`TestConfig::user_checks`, by name) judged after
    /// the built-in ones.
    pub user_checks: Vec<String>,
}

/// The longest scenario name.
const MAX_NAME: usize = 64;

/// A scenario's (or a user check's) name: it prefixes report rows and
/// names files too (the scenario's overlay, its journals). The test file
/// refuses a bad one with its line; `validate` refuses it from the flags.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Refuses scenarios that cannot run (exit 2), before anything starts.
pub(super) fn validate(scenarios: &[Scenario], lifecycle: bool) -> Result<(), RunError> {
    if scenarios.is_empty() {
        return Ok(());
    }
    if lifecycle {
        return Err(RunError::Input(
            "scenarios run after the plain test; the upgrade lifecycle has none".into(),
        ));
    }
    let mut names: Vec<&str> = Vec::new();
    for s in scenarios {
        if !valid_name(&s.name) {
            return Err(RunError::Input(format!(
                "scenario name {:?}: use up to {MAX_NAME} letters, digits, '-' and '_' (it prefixes report rows)",
                s.name
            )));
        }
        if names.contains(&s.name.as_str()) {
            return Err(RunError::Input(format!(
                "scenario {:?} given twice",
                s.name
            )));
        }
        names.push(&s.name);
        if s.checks.is_empty() && s.user_checks.is_empty() {
            return Err(RunError::Input(format!(
                "scenario {:?} names no check to judge it",
                s.name
            )));
        }
    }
    Ok(())
}

impl Session {
    /// Saves the booted guest the scenarios start from, before anything
    /// else changes it. The run's own guest goes on, writing a new overlay
    /// (its later boots too: the template follows).
    pub(super) async fn save_for_scenarios(&mut self) -> Result<(), String> {
        self.emit(Progress::Step(
            "saving the booted guest for the scenarios (stop, disk snapshot, state to a file)"
                .into(),
        ));
        let state = self.workdir.path().join("booted.state");
        let next = self.workdir.path().join("after-save.qcow2");
        let saved = self
            .machine()
            .save(&state, &next)
            .await
            .map_err(|e| format!("saving the booted guest for the scenarios: {e}"))?;
        if let Some(t) = self.template.as_mut() {
            t.disk = next;
            t.disk_format = DiskFormat::Qcow2;
        }
        self.timings.save = saved.seconds;
        self.saved = Some(saved);
        Ok(())
    }

    /// Every scenario of the config, in order, each on its own restore of
    /// the saved guest. A scenario whose guest fails under it (its restore,
    /// a command, the agent a command killed) is that scenario's: its
    /// unjudged checks are rows saying why, the scenarios after it still
    /// run and report, and only then does the run end as an
    /// infrastructure failure (exit 3) naming the scenarios it hit.
    pub(super) async fn run_scenarios(&mut self) -> Result<(), String> {
        let Some(saved) = self.saved.clone() else {
            return Ok(());
        };
        // The run's own guest is done: its CPU goes to the scenarios.
        self.quit_machine().await;
        let mut failed = Vec::new();
        for sc in self.cfg.scenarios.clone() {
            let t = Instant::now();
            let rows_before = self.scenario_rows.len();
            let mut restore_seconds = 0.0;
            let outcome = self
                .one_scenario(&sc, &saved, t, &mut restore_seconds)
                .await;
            self.quit_machine().await;
            self.scenario = None;
            let _ = std::fs::remove_file(self.scenario_disk(&sc));
            let mut error = outcome.err();
            let mut unjudged = error
                .as_ref()
                .map(|e| format!("not judged: the scenario's guest failed: {e}"));
            // A guest that panicked under the scenario is the scenario's
            // verdict (boot-health, with the panic line), not strata's
            // failure: the kernel said what happened.
            if let Some(e) = &error {
                let console = self.console(self.scenario_mark.unwrap_or(0), None);
                if let Some(line) = checks::boot_health::panic_line(&console) {
                    let row = CheckResult::new(
                        &format!("{}/{}", sc.name, CheckId::BootHealth.name()),
                        Status::Fail,
                        format!("the guest panicked: {line}"),
                        vec![
                            format!("console: {line}"),
                            format!("the scenario stopped there: {e}"),
                        ],
                    );
                    self.emit(Progress::CheckFinished(row.clone()));
                    self.scenario_rows.push(row);
                    unjudged = Some("not judged: the guest panicked".into());
                    error = None;
                }
            }
            self.scenario_mark = None;
            if let Some(e) = &unjudged {
                self.emit(Progress::Step(format!("scenario {}: {e}", sc.name)));
                let judged: Vec<String> = self.scenario_rows[rows_before..]
                    .iter()
                    .map(|r| r.name.clone())
                    .collect();
                let wanted = CheckId::ALL
                    .into_iter()
                    .filter(|id| sc.checks.contains(id))
                    .map(|id| id.name().to_owned())
                    .chain(sc.user_checks.iter().cloned());
                for check in wanted {
                    let name = format!("{}/{check}", sc.name);
                    if judged.contains(&name) {
                        continue;
                    }
                    let row = CheckResult::new(&name, Status::Skip, e.clone(), vec![]);
                    self.emit(Progress::CheckFinished(row.clone()));
                    self.scenario_rows.push(row);
                }
            }
            if let Some(e) = &error {
                failed.push(format!("scenario {}: {e}", sc.name));
            }
            let seconds = t.elapsed().as_secs_f64();
            self.scenario_log.push(ScenarioRecord {
                name: sc.name.clone(),
                restore_seconds,
                seconds,
                error,
            });
            self.timings.scenarios += seconds;
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(failed.join("; ")),
        }
    }

    /// The scenario's own overlay on the saved disk.
    fn scenario_disk(&self, sc: &Scenario) -> std::path::PathBuf {
        self.workdir
            .path()
            .join(format!("scenario-{}.qcow2", sc.name))
    }

    /// Restores the saved guest, runs the scenario's commands, then its
    /// checks, recording each row as it is judged.
    async fn one_scenario(
        &mut self,
        sc: &Scenario,
        saved: &crate::machine::SavedState,
        t: Instant,
        restore_seconds: &mut f64,
    ) -> Result<(), String> {
        self.emit(Progress::Step(format!(
            "scenario {}: restoring the booted guest",
            sc.name
        )));
        let disk = self.scenario_disk(sc);
        overlay_on(&saved.disk, saved.disk_format(), &disk)?;
        // A reboot in the scenario (persistence) starts QEMU on its disk.
        if let Some(tpl) = self.template.as_mut() {
            tpl.disk = disk.clone();
        }
        let output = self
            .artifacts
            .path(&artifacts::scenario_qemu_output(&sc.name, 1));
        self.scenario_mark = Some(self.console_size());
        self.last_qemu_log = Some(output.clone());
        let m = Machine::restore(saved, &disk, &output, self.events.clone())
            .await
            .map_err(|e| format!("restoring the booted guest: {e}"))?;
        self.machine = Some(m);
        *restore_seconds = t.elapsed().as_secs_f64();
        self.scenario = Some(sc.name.clone());
        self.scenario_boots = 1;
        self.emit(Progress::Step(format!(
            "scenario {} (restored in {:.1}s): {}",
            sc.name,
            *restore_seconds,
            sc.commands.join("; ")
        )));
        for c in &sc.commands {
            self.machine()
                .succeed(c)
                .await
                .map_err(|e| format!("`{c}`: {e}"))?;
        }
        // A different guest from the one the first boot's rows saw.
        self.seen = Default::default();
        let expect = self.cfg.expect.clone();
        let ids = CheckId::ALL.into_iter().filter(|id| sc.checks.contains(id));
        for id in ids {
            let t_check = Instant::now();
            self.emit(Progress::Step(format!("{}/{}", sc.name, id.name())));
            let outcome = id
                .run(self, &expect)
                .await
                .map_err(|e| format!("{}: {}", id.name(), me(e)))?;
            let mut row = outcome.result;
            row.name = format!("{}/{}", sc.name, row.name);
            row.seconds = t_check.elapsed().as_secs_f64();
            self.emit(Progress::CheckFinished(row.clone()));
            self.scenario_rows.push(row);
        }
        for name in &sc.user_checks {
            let Some(check) = self
                .cfg
                .user_checks
                .iter()
                .find(|c| &c.name == name)
                .cloned()
            else {
                return Err(format!("no user check named {name:?}"));
            };
            let t_check = Instant::now();
            self.emit(Progress::Step(format!("{}/{name}", sc.name)));
            let seen = user::observe(self.machine(), &check)
                .await
                .map_err(|e| format!("{name}: {}", me(e)))?;
            let mut row = user::judge(When::Boot, &check, &seen);
            row.name = format!("{}/{name}", sc.name);
            row.seconds = t_check.elapsed().as_secs_f64();
            self.emit(Progress::CheckFinished(row.clone()));
            self.scenario_rows.push(row);
        }
        Ok(())
    }

    /// Ends the running guest (a power cut: nothing of it is judged again).
    pub(super) async fn quit_machine(&mut self) {
        if let Some(mut m) = self.machine.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), m.qmp().quit()).await;
            m.kill().await;
        }
    }
}

/// A fresh qcow2 overlay on a saved (frozen) disk of format `format`: a
/// plain run's qcow2 overlay, a lifecycle's raw copy.
pub(super) fn overlay_on(saved: &Path, format: DiskFormat, overlay: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(overlay);
    // qemu-img resolves a relative backing path against the overlay's dir.
    let saved = std::path::absolute(saved).map_err(|e| format!("{}: {e}", saved.display()))?;
    strata_builder::host::cmd::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format.driver(), "-b"])
            .arg(&saved)
            .arg(overlay),
    )
    .map(drop)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(name: &str, checks: &[CheckId]) -> Scenario {
        Scenario {
            name: name.into(),
            commands: vec!["true".into()],
            checks: checks.to_vec(),
            user_checks: vec![],
        }
    }

    #[test]
    fn scenarios_are_refused_before_anything_runs_when_they_cannot() {
        let ok = sc("mode", &[CheckId::MovedFiles]);
        let one = std::slice::from_ref(&ok);
        assert!(validate(one, false).is_ok());
        assert!(validate(&[], true).is_ok());
        // Each scenario has a guest of its own: it may reboot it.
        assert!(validate(&[sc("ro", &[CheckId::Persistence])], false).is_ok());
        let msg = |r: Result<(), RunError>| r.unwrap_err().to_string();
        assert!(msg(validate(one, true)).contains("lifecycle"));
        assert!(msg(validate(&[ok.clone(), ok.clone()], false)).contains("given twice"));
        assert!(msg(validate(&[sc("a b", &[CheckId::Root])], false)).contains("letters"));
        let long = "x".repeat(MAX_NAME + 1);
        assert!(msg(validate(&[sc(&long, &[CheckId::Root])], false)).contains("up to 64"));
        assert!(msg(validate(&[sc("x", &[])], false)).contains("no check"));
    }
}
