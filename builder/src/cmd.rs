//! Running the real tools (mkfs.btrfs, btrfs, losetup, mount, extlinux, cp)
//! with their stderr kept for the error message.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("{program} not found: install it (ci/setup does)")]
    NotFound { program: String },
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl CmdError {
    /// The tool's own complaint, for callers that map e.g. ENOSPC.
    pub fn stderr(&self) -> &str {
        match self {
            CmdError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// `program args...` as one string, for messages and logs.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs to completion; stdout on success, stderr in the error otherwise.
pub fn run(cmd: &mut Command) -> Result<String, CmdError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(command = %describe(cmd), "run");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| spawn_error(program, source))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CmdError::Failed {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

pub fn spawn_error(program: String, source: std::io::Error) -> CmdError {
    if source.kind() == std::io::ErrorKind::NotFound {
        CmdError::NotFound { program }
    } else {
        CmdError::Spawn { program, source }
    }
}

/// Shorthand for `run(Command::new(program).args(args))`.
pub fn run_args<I, S>(program: &str, args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(program).args(args))
}
