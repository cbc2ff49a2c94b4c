//! The upgrade lifecycle of `strata test --upgrade-to` (issue 8): three
//! boots of a private copy of the image — the current default; after an
//! offline upgrade to a new version; after setting the old version default
//! again — with the layout checks in each and tokens written to the state
//! dirs that must survive both changes.
//!
//! vmtest runs the machine; it never changes an image itself. The changes
//! between boots go through [`ImageChanges`], which the binary implements
//! with the builder (`builder::upgrade`, `builder::versions`). This module
//! holds what needs no VM: the trait, the phases, the rows of the report,
//! and the tokens (`tokens`). The story itself is `run::lifecycle`.

use crate::checks::user::{UserCheck, When};
use crate::checks::{CheckId, Phase};
use crate::report::{CheckResult, PhaseRecord, Status};
use crate::stage::Stage;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use strata_builder::error::{Failure, FailureKind};
use strata_builder::expect::Expectations;
use strata_builder::host::interrupt::Interrupt;

/// What the image is after a change: what its next boot must show.
#[derive(Debug, Clone)]
pub struct Changed {
    /// The version that now boots by default, with its state dirs and the
    /// files deployed into state for it.
    pub expect: Expectations,
    /// One line for the report: what was done.
    pub summary: String,
}

/// Why an image change failed, and the kind of failure it is. The kind is
/// kept, not flattened into the message: an upgrade refused for its input
/// (the rootfs, the label) ends the run as bad input (exit 2), as `strata
/// upgrade` would, not as an infrastructure failure (exit 3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ChangeError {
    pub kind: FailureKind,
    pub message: String,
}

impl ChangeError {
    /// The builder's error, with its own kind.
    pub fn of<E: Failure>(err: &E) -> ChangeError {
        ChangeError {
            kind: err.kind(),
            message: err.to_string(),
        }
    }
}

impl Failure for ChangeError {
    fn kind(&self) -> FailureKind {
        self.kind
    }
}

/// Reading the changed image back (its manifest, its layout) is the
/// runner's own work: a failure there is infrastructure.
impl From<String> for ChangeError {
    fn from(message: String) -> ChangeError {
        ChangeError {
            kind: FailureKind::Infrastructure,
            message,
        }
    }
}

/// Changes a powered-off image between two boots. Called from a blocking
/// thread with the image's QEMU gone; `note` shows progress lines, and a
/// raised `interrupt` (SIGINT, SIGTERM, the run's timeout) asks the change
/// to stop. Errors end the run with the report so far, with the exit code
/// of their kind (bad input 2, else 3).
pub trait ImageChanges: Send + Sync {
    /// Deploys the new version `label` beside the existing ones and makes
    /// it the default (`strata upgrade IMG --rootfs … --label LABEL`).
    fn upgrade(
        &self,
        image: &Path,
        label: &str,
        interrupt: &Interrupt,
        note: &mut dyn FnMut(String),
    ) -> Result<Changed, ChangeError>;

    /// Makes the existing version `label` the default (`strata set-default`).
    fn set_default(
        &self,
        image: &Path,
        label: &str,
        interrupt: &Interrupt,
        note: &mut dyn FnMut(String),
    ) -> Result<Changed, ChangeError>;

    /// What the powered-off image must show booting `label`, changed by
    /// someone else (the guest itself, `InGuest`): read back, not changed.
    fn read(&self, image: &Path, label: &str) -> Result<Changed, ChangeError>;
}

/// The lifecycle's changes made by the running system itself (`strata
/// test --upgrade-to … --in-guest`): strata inside the guest runs `upgrade
/// --running` and `set-default --running`, handed the binary and the new
/// rootfs on the payload disk (`crate::payload`); the host only reads the
/// image back between boots.
#[derive(Debug, Clone)]
pub struct InGuest {
    /// The strata binary to run in the guest (the host's own: host and
    /// guest must share a C library the binary runs on).
    pub strata: std::path::PathBuf,
    /// The new rootfs (a directory or a tar archive).
    pub rootfs: std::path::PathBuf,
    /// `upgrade`'s own options, passed as they are (`--state-data merge`).
    pub upgrade_args: Vec<String>,
}

/// `TestConfig::lifecycle`: run the upgrade lifecycle instead of the plain
/// test.
#[derive(Clone)]
pub struct Lifecycle {
    pub changes: Arc<dyn ImageChanges>,
    /// The label the upgrade deploys (must not exist in the image).
    pub label: String,
    /// Raised by the run's timeout so a change in progress stops; the
    /// caller may register it for signals too.
    pub interrupt: Interrupt,
    /// The changes are made by the guest, not by `changes` (which then
    /// only reads the image back).
    pub in_guest: Option<InGuest>,
    /// Instead of the three stages: the power-cut matrix of the in-guest
    /// upgrade (`crate::power_cut`).
    pub power_cut: Option<crate::power_cut::Plan>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// One row of a stage: a layout check, the tokens written earlier, or a
/// user check (its index in `TestConfig::user_checks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    Check(CheckId),
    Tokens,
    User(usize),
}

impl Stage {
    /// The test file's phase this stage's boot is (`phases = ["boot", …]`).
    pub fn when(self) -> When {
        match self {
            Stage::Before => When::Boot,
            Stage::Upgrade => When::Upgrade,
            Stage::Rollback => When::Rollback,
        }
    }
}

/// The rows each stage reports, in order. Only the first-boot checks run
/// in a lifecycle: persistence's reboot and power cut would double the
/// boots, and the tokens prove the state dirs across two clean shutdowns
/// and two image changes instead (no power cut: see the README). The user
/// checks that run in the stage's phase come last.
pub fn rows_of(stage: Stage, user: &[UserCheck], contract: bool) -> Vec<Row> {
    let mut rows: Vec<Row> = CheckId::ALL
        .into_iter()
        .filter(|id| id.phase() == Phase::FirstBoot)
        .map(Row::Check)
        .collect();
    if stage != Stage::Before {
        rows.push(Row::Tokens);
    }
    rows.push(Row::Check(CheckId::BootHealth));
    // Every stage but the last ends in a clean poweroff.
    if stage != Stage::Rollback {
        rows.push(Row::Check(CheckId::Shutdown));
    }
    // With `[state] preserve`: recorded in the first stage, compared in
    // the others.
    if contract {
        rows.push(Row::Check(CheckId::StateContract));
    }
    rows.extend(
        user.iter()
            .enumerate()
            .filter(|(_, c)| c.runs_in(stage.when()))
            .map(|(i, _)| Row::User(i)),
    );
    rows
}

fn row_name(row: Row, user: &[UserCheck]) -> &str {
    match row {
        Row::Check(id) => id.name(),
        Row::Tokens => crate::tokens::TOKENS,
        Row::User(i) => user.get(i).map(|c| c.name.as_str()).unwrap_or("?"),
    }
}

/// A result as a lifecycle row: named `<stage>/<check>`, with the stage and
/// the version the boot ran.
pub fn tag(stage: Stage, label: &str, mut c: CheckResult) -> CheckResult {
    c.name = format!("{}/{}", stage.name(), c.name);
    c.phase = Some(stage);
    c.label = Some(label.to_owned());
    c
}

/// The plan before anything ran: which version each boot must run.
pub fn plan(old: &str, new: &str) -> Vec<PhaseRecord> {
    Stage::ALL
        .into_iter()
        .map(|phase| PhaseRecord {
            phase,
            label: match phase {
                Stage::Upgrade => new.to_owned(),
                Stage::Before | Stage::Rollback => old.to_owned(),
            },
            boot: None,
            change: None,
            change_seconds: None,
        })
        .collect()
}

/// Results of a lifecycle run, by stage and row, already tagged.
pub type Results = BTreeMap<(Stage, Row), CheckResult>;

/// Every row of every stage, in order: what ran, and a skip row saying why
/// for what did not, so every report of a lifecycle has the same rows.
pub fn rows(
    phases: &[PhaseRecord],
    wanted: &[CheckId],
    user: &[UserCheck],
    contract: bool,
    results: &Results,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for p in phases {
        for row in rows_of(p.phase, user, contract) {
            let c = match results.get(&(p.phase, row)) {
                Some(c) => c.clone(),
                None => {
                    let why = match row {
                        Row::Check(id) if !wanted.contains(&id) => "not requested (--checks)",
                        _ => "not run: the run stopped before it",
                    };
                    tag(
                        p.phase,
                        &p.label,
                        CheckResult::new(row_name(row, user), Status::Skip, why, vec![]),
                    )
                }
            };
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_the_first_boot_checks_and_later_ones_the_tokens() {
        let names = |s| {
            rows_of(s, &[], false)
                .into_iter()
                .map(|r| row_name(r, &[]).to_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            names(Stage::Before),
            "root,state-mounts,fstab,moved-files,overmount,boot-health,shutdown"
        );
        assert_eq!(
            names(Stage::Upgrade),
            "root,state-mounts,fstab,moved-files,overmount,tokens,boot-health,shutdown"
        );
        assert_eq!(
            names(Stage::Rollback),
            "root,state-mounts,fstab,moved-files,overmount,tokens,boot-health"
        );
    }

    #[test]
    fn rows_not_reached_are_skips_that_say_why() {
        let phases = plan("factory", "v2");
        let wanted = [CheckId::Root, CheckId::Overmount];
        let mut results = Results::new();
        results.insert(
            (Stage::Before, Row::Check(CheckId::Root)),
            tag(
                Stage::Before,
                "factory",
                CheckResult::new("root", Status::Pass, "ok", vec![]),
            ),
        );
        let rows = rows(&phases, &wanted, &[], false, &results);
        assert_eq!(rows.len(), 7 + 8 + 7);
        let row = |name: &str| rows.iter().find(|c| c.name == name).unwrap();
        assert_eq!(row("before/root").status, Status::Pass);
        assert_eq!(row("before/fstab").detail, "not requested (--checks)");
        assert_eq!(
            row("before/overmount").detail,
            "not run: the run stopped before it"
        );
        let tokens = row("upgrade/tokens");
        assert_eq!(tokens.detail, "not run: the run stopped before it");
        assert_eq!(tokens.phase, Some(Stage::Upgrade));
        assert_eq!(tokens.label.as_deref(), Some("v2"));
        assert_eq!(row("rollback/root").label.as_deref(), Some("factory"));
    }
}
