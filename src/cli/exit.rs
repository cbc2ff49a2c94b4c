//! The one failure policy: every subcommand ends through here, and every
//! error kind has one exit code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; all checks passed; lint clean |
//! | 1 | a check failed, a step failed, lint found hidden files |
//! | 2 | bad usage or input; nothing was changed |
//! | 3 | infrastructure: QEMU, the guest agent, a tool, a timeout |
//! | 130 | interrupted (SIGINT/SIGTERM), after cleaning up |

use strata_builder::error::{Failure, FailureKind};

pub const SUCCESS: u8 = 0;

pub fn code(kind: FailureKind) -> u8 {
    match kind {
        FailureKind::Failed => 1,
        FailureKind::Input => 2,
        FailureKind::Infrastructure => 3,
        FailureKind::Interrupted => 130,
    }
}

/// The exit code of an outcome: success, or the kind of failure.
pub fn of(outcome: Option<FailureKind>) -> u8 {
    outcome.map(code).unwrap_or(SUCCESS)
}

/// Prints the error (its whole chain, on one line) and returns its code.
pub fn fail<E: Failure + Send + Sync + 'static>(err: E) -> u8 {
    let kind = err.kind();
    report(kind, &anyhow::Error::new(err))
}

/// For errors the CLI itself finds (arguments, output files).
pub fn fail_with(kind: FailureKind, err: &anyhow::Error) -> u8 {
    report(kind, err)
}

fn report(kind: FailureKind, err: &anyhow::Error) -> u8 {
    eprintln!("strata: error: {err:#}");
    code(kind)
}

/// Shorthand for bad input found by the CLI.
pub fn input(msg: impl std::fmt::Display) -> u8 {
    fail_with(FailureKind::Input, &anyhow::anyhow!("{msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_code_per_kind() {
        assert_eq!(of(None), 0);
        assert_eq!(code(FailureKind::Failed), 1);
        assert_eq!(code(FailureKind::Input), 2);
        assert_eq!(code(FailureKind::Infrastructure), 3);
        assert_eq!(code(FailureKind::Interrupted), 130);
    }
}
