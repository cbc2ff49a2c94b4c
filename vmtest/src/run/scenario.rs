//! Scenarios: a change made in the running guest, then judged again —
//! seconds, not a boot. After the first boot's checks (a run with
//! scenarios has no persistence: see `validate`), each scenario, in order
//! and on top of the ones before it, runs its
//! commands in the guest as it is now, forgets what this boot had shown
//! (mount table, journal), and runs its checks again. Its rows are named
//! `<scenario>/<check>` and count in the verdict like any other row.
//!
//! This is for checks whose subject exists after boot: files written under
//! a mountpoint's underlying directory, a state dir unmounted or covered by
//! a tmpfs. What only a boot shows (an fstab line, a mount that fails at
//! boot, the journal's notices of it) still needs an image and a boot of
//! its own, and so does a moved file changed in state: moved-files
//! forgives what the running system rewrote since boot, by design.

use super::{me, RunError, Session};
use crate::checks::{CheckId, Phase, Vm};
use crate::run::Progress;
use std::time::Instant;

/// One change and the checks that judge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The rows' prefix: `<name>/<check>`.
    pub name: String,
    /// Run in order in the guest (`sh -c`, as root); each must succeed.
    pub commands: Vec<String>,
    /// First-boot checks only: persistence boots the machine again.
    pub checks: Vec<CheckId>,
}

/// Refuses scenarios that cannot run (exit 2), before anything starts.
pub(super) fn validate(
    scenarios: &[Scenario],
    lifecycle: bool,
    persistence: bool,
) -> Result<(), RunError> {
    if scenarios.is_empty() {
        return Ok(());
    }
    if lifecycle {
        return Err(RunError::Input(
            "scenarios run after the plain test; the upgrade lifecycle has none".into(),
        ));
    }
    // After the reboot and power cut, moved-files would take what the guest
    // rewrote during the earlier boots for defects of the image (it forgives
    // only changes since the current boot); before them, the scenarios'
    // changes would be carried into persistence and overmount's later looks.
    if persistence {
        return Err(RunError::Input(
            "scenarios judge the guest as the first boot left it: run them without persistence (--checks)".into(),
        ));
    }
    let mut names: Vec<&str> = Vec::new();
    for s in scenarios {
        let valid = !s.name.is_empty()
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(RunError::Input(format!(
                "scenario name {:?}: use letters, digits, '-' and '_' (it prefixes report rows)",
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
        if s.checks.is_empty() {
            return Err(RunError::Input(format!(
                "scenario {:?} names no check to judge it",
                s.name
            )));
        }
        if let Some(c) = s.checks.iter().find(|c| c.phase() != Phase::FirstBoot) {
            return Err(RunError::Input(format!(
                "scenario {:?}: {} boots the machine again; a scenario judges the running guest",
                s.name,
                c.name()
            )));
        }
    }
    Ok(())
}

impl Session {
    /// Every scenario of the config, in order, on the running guest.
    pub(super) async fn run_scenarios(&mut self) -> Result<(), String> {
        let expect = self.cfg.expect.clone();
        for sc in self.cfg.scenarios.clone() {
            let t = Instant::now();
            self.emit(Progress::Step(format!(
                "scenario {}: {}",
                sc.name,
                sc.commands.join("; ")
            )));
            for c in &sc.commands {
                self.machine()
                    .succeed(c)
                    .await
                    .map_err(|e| format!("scenario {}: `{c}`: {e}", sc.name))?;
            }
            // The guest changed: what this boot had shown no longer holds.
            self.seen = Default::default();
            let ids = CheckId::ALL.into_iter().filter(|id| sc.checks.contains(id));
            for id in ids {
                let t_check = Instant::now();
                self.emit(Progress::Step(format!("{}/{}", sc.name, id.name())));
                let outcome = id.run(self, &expect).await.map_err(me)?;
                let mut row = outcome.result;
                row.name = format!("{}/{}", sc.name, row.name);
                row.seconds = t_check.elapsed().as_secs_f64();
                self.emit(Progress::CheckFinished(row.clone()));
                self.scenario_rows.push(row);
            }
            self.timings.scenarios += t.elapsed().as_secs_f64();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(name: &str, checks: &[CheckId]) -> Scenario {
        Scenario {
            name: name.into(),
            commands: vec!["true".into()],
            checks: checks.to_vec(),
        }
    }

    #[test]
    fn scenarios_are_refused_before_anything_runs_when_they_cannot() {
        let ok = sc("mode", &[CheckId::MovedFiles]);
        let one = std::slice::from_ref(&ok);
        assert!(validate(one, false, false).is_ok());
        assert!(validate(&[], true, true).is_ok());
        let msg = |r: Result<(), RunError>| r.unwrap_err().to_string();
        assert!(msg(validate(one, true, false)).contains("lifecycle"));
        assert!(msg(validate(one, false, true)).contains("without persistence"));
        assert!(msg(validate(&[ok.clone(), ok.clone()], false, false)).contains("given twice"));
        assert!(msg(validate(&[sc("a b", &[CheckId::Root])], false, false)).contains("letters"));
        assert!(msg(validate(&[sc("x", &[])], false, false)).contains("no check"));
        assert!(
            msg(validate(&[sc("x", &[CheckId::Persistence])], false, false))
                .contains("persistence boots")
        );
    }
}
