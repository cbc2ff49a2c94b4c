//! The user's own checks (`[[check]]` in a test file): a guest command, an
//! optional unit to wait for, and what its exit code and output must be.
//! They run through the guest agent as root in the phases they name, and
//! report as `PHASE/NAME`. This module holds what a user check is; the
//! spec (`crate::spec`) fills it, the run executes it.

use serde::Serialize;

/// The moments of a run a check can run in. A plain run has `Boot` (boot 1)
/// and, when anything needs them, `Reboot` (after the clean reboot) and
/// `PowerCut` (after the fresh start following the power cut); an upgrade
/// lifecycle has `Boot` (the version the image came with), `Upgrade` and
/// `Rollback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum When {
    Boot,
    Reboot,
    PowerCut,
    Upgrade,
    Rollback,
}

impl When {
    pub const ALL: [When; 5] = [
        When::Boot,
        When::Reboot,
        When::PowerCut,
        When::Upgrade,
        When::Rollback,
    ];

    /// The name in a test file's `phases` and the prefix of report rows.
    pub fn name(self) -> &'static str {
        match self {
            When::Boot => "boot",
            When::Reboot => "reboot",
            When::PowerCut => "power-cut",
            When::Upgrade => "upgrade",
            When::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<When> {
        When::ALL.into_iter().find(|w| w.name() == s)
    }
}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One user check, validated (names, regexes, a command or a unit).
#[derive(Debug, Clone)]
pub struct UserCheck {
    /// Unique among built-in and user checks; the row is `PHASE/NAME`.
    pub name: String,
    /// `sh -c` in the guest, as root. None: only `wait_for_unit`.
    pub run: Option<String>,
    /// Waited for (bounded) before `run`; the check fails naming the
    /// unit's state and its last journal lines when it does not come up.
    pub wait_for_unit: Option<String>,
    pub expect_exit: i64,
    pub stdout_matches: Option<regex::Regex>,
    pub stdout_contains: Option<String>,
    pub stderr_matches: Option<regex::Regex>,
    /// None: every phase the run has.
    pub phases: Option<Vec<When>>,
}

impl UserCheck {
    /// Whether the check runs in `when` (of a run that has that phase).
    pub fn runs_in(&self, when: When) -> bool {
        self.phases.as_ref().is_none_or(|p| p.contains(&when))
    }
}
