//! The boots of an upgrade lifecycle, by name: the rows of the report and
//! the phases of the test file are keyed by them. Their own module so the
//! report (below the lifecycle) can name them.

use serde::Serialize;

/// The three boots of a lifecycle, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The current default version, as the image came.
    Before,
    /// The new version, after the upgrade.
    Upgrade,
    /// The old version again, after `set-default` back to it.
    Rollback,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Before, Stage::Upgrade, Stage::Rollback];

    /// The prefix of the stage's rows (`upgrade/root`) and its JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Before => "before",
            Stage::Upgrade => "upgrade",
            Stage::Rollback => "rollback",
        }
    }

    /// Why the machine boots, for the progress lines.
    pub fn why(self) -> &'static str {
        match self {
            Stage::Before => "the current default version",
            Stage::Upgrade => "the new version, after the upgrade",
            Stage::Rollback => "the old version again, after set-default",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
