//! Build errors: bad input (the user can fix it; exit 2) or a failed step
//! (named, with the underlying cause).
//!
//! Code inside a step says only *what* it was doing (`StepError`, through
//! `Context`); the step runner (`steps::Steps`) says *which step* it was, by
//! turning it into a `BuildError`. A `StepError` is not an `std::error::Error`,
//! so it cannot become the cause of another one: context is added once.

use crate::progress::Step;

/// How a failure ends a command. Every error type of strata says which kind
/// it is; the CLI maps kinds to exit codes in one place (`src/cli/exit.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad usage or input the user can fix; nothing was changed.
    Input,
    /// What was asked for was done and found wanting, or a step failed: a
    /// check failed, a build step failed, lint found hidden files.
    Failed,
    /// The machinery under strata failed: QEMU, the guest agent, a tool,
    /// a timeout, an image that does not boot.
    Infrastructure,
    /// Stopped by SIGINT or SIGTERM, after cleaning up.
    Interrupted,
}

/// An error that knows its `FailureKind`.
pub trait Failure: std::error::Error {
    fn kind(&self) -> FailureKind;
}

impl Failure for BuildError {
    fn kind(&self) -> FailureKind {
        match self {
            BuildError::Input(_) => FailureKind::Input,
            BuildError::Step { .. } => FailureKind::Failed,
            BuildError::Interrupted => FailureKind::Interrupted,
        }
    }
}

impl Failure for crate::host::cmd::CmdError {
    fn kind(&self) -> FailureKind {
        FailureKind::Infrastructure
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Something about the inputs; nothing was created (or it was undone).
    #[error("{0}")]
    Input(String),
    /// `what` failed in `step` because of `cause`.
    ///
    /// The message already contains the cause, so it is deliberately not
    /// exposed as `source()`: chain printers (`{:#}` in anyhow) would print
    /// it twice, and the causes below (`RootfsError`, `CmdError::Spawn`…)
    /// print their own sources too.
    #[error("{what}: {cause}")]
    Step {
        step: Step,
        what: String,
        cause: BoxError,
    },
    #[error("interrupted by signal; cleaned up")]
    Interrupted,
}

impl BuildError {
    pub fn is_input(&self) -> bool {
        matches!(self, BuildError::Input(_))
    }

    /// The step that failed, for a failed step.
    pub fn step(&self) -> Option<Step> {
        match self {
            BuildError::Step { step, .. } => Some(*step),
            _ => None,
        }
    }
}

/// How a step fails, before the runner names the step.
#[derive(Debug)]
pub enum StepError {
    /// Something about the inputs found only while building (exit 2).
    Input(String),
    /// `what` failed because of `cause`.
    Failed {
        what: String,
        cause: BoxError,
    },
    Interrupted,
}

impl StepError {
    pub fn input(msg: impl Into<String>) -> StepError {
        StepError::Input(msg.into())
    }

    /// The error the user sees: this failure, in `step`.
    pub fn in_step(self, step: Step) -> BuildError {
        match self {
            StepError::Input(msg) => BuildError::Input(msg),
            StepError::Failed { what, cause } => BuildError::Step { step, what, cause },
            StepError::Interrupted => BuildError::Interrupted,
        }
    }
}

/// Adds "what we were doing" to any error, bootc style:
/// `creating subvolume state/var: btrfs subvolume create … failed: …`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StepError>;
}

impl<T, E: Into<BoxError>> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StepError> {
        self.map_err(|e| StepError::Failed {
            what: what(),
            cause: e.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::cmd::CmdError;

    /// What `strata: error: {:#}` prints: the message, then every source.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(c) = next {
            s.push_str(&format!(": {c}"));
            next = c.source();
        }
        s
    }

    #[test]
    fn the_runner_names_the_step_and_the_message_says_each_thing_once() {
        // A cause that prints its own source and also returns it.
        let cause = CmdError::Spawn {
            program: "btrfs".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let e = Err::<(), _>(cause)
            .context(|| "creating subvolume state/var".into())
            .unwrap_err()
            .in_step(Step::MigrateState);
        assert_eq!(e.step(), Some(Step::MigrateState));
        assert_eq!(
            chain(&e),
            "creating subvolume state/var: running btrfs: Permission denied (os error 13)"
        );
    }

    #[test]
    fn input_and_interrupt_keep_their_kind() {
        assert!(StepError::input("too small")
            .in_step(Step::CopyRootfs)
            .is_input());
        assert!(matches!(
            StepError::Interrupted.in_step(Step::CopyRootfs),
            BuildError::Interrupted
        ));
    }
}
