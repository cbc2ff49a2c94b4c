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

/// How many of a streaming command's last output lines its error keeps.
const TAIL_LINES: usize = 40;

/// Runs to completion, handing each line of stdout and stderr (interleaved
/// as they arrive) to `on_line`; on failure the error carries the command
/// and its last lines. For long-running tools whose progress is worth
/// showing (mmdebstrap).
pub fn run_streaming(cmd: &mut Command, on_line: &mut dyn FnMut(&str)) -> Result<(), CmdError> {
    use std::io::{BufRead, BufReader, Read};
    let program = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(command = %describe(cmd), "run (streaming)");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| spawn_error(program.clone(), source))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let streams: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = streams
        .into_iter()
        .flatten()
        .map(|stream| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    if tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut tail = std::collections::VecDeque::new();
    for line in rx {
        on_line(&line);
        tail.push_back(line);
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(|source| CmdError::Spawn {
        program: program.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(CmdError::Failed {
            command: describe(cmd),
            status: status.to_string(),
            stderr: format!("last output:\n{}", Vec::from(tail).join("\n")),
        })
    }
}
