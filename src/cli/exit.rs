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
    eprintln!("strata: error: {}", chain(err));
    code(kind)
}

/// The error and its causes on one line, each said once. Many error types
/// put their cause into their own message (`reading X: <cause>`) and also
/// expose it as `source()`; printing both would repeat it ("X: Y: Y").
pub fn chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Shorthand for bad input found by the CLI.
pub fn input(msg: impl std::fmt::Display) -> u8 {
    fail_with(FailureKind::Input, &anyhow::anyhow!("{msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading manifest m.json: {source}")]
    struct SaysItsCause {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading expectations")]
    struct Wraps(#[source] SaysItsCause);

    #[test]
    fn causes_are_said_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(SaysItsCause { source: io() });
        assert_eq!(chain(&e), format!("reading manifest m.json: {}", io()));
        let e = anyhow::Error::new(Wraps(SaysItsCause { source: io() }));
        assert_eq!(
            chain(&e),
            format!("loading expectations: reading manifest m.json: {}", io())
        );
        let e = anyhow::anyhow!("plain").context("doing it");
        assert_eq!(chain(&e), "doing it: plain");
    }

    #[test]
    fn one_code_per_kind() {
        assert_eq!(of(None), 0);
        assert_eq!(code(FailureKind::Failed), 1);
        assert_eq!(code(FailureKind::Input), 2);
        assert_eq!(code(FailureKind::Infrastructure), 3);
        assert_eq!(code(FailureKind::Interrupted), 130);
    }
}
