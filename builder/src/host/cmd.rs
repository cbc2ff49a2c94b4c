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
    /// The interrupt flag was raised; the command was stopped (see
    /// `run_interruptible`).
    #[error("{program} stopped: interrupted")]
    Interrupted { program: String },
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

/// How many of an interruptible command's first stderr lines its error
/// keeps (besides the last `TAIL_LINES`).
const HEAD_LINES: usize = 10;
/// How often `run_interruptible` looks at the interrupt flag while the
/// command is silent.
const POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// How long a stopped command gets to clean up after SIGTERM before SIGKILL
/// (also the rootless worker's: `rootless::run_worker`).
pub(crate) const GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs to completion, handing each stdout line (raw bytes, without the
/// newline: tools print file names, which need not be UTF-8) to `on_line`;
/// on failure the error carries the command and its last stderr lines.
///
/// For long-running tools that write into the image (rsync): when
/// `interrupt` is raised the command's whole process group gets SIGTERM (so
/// it can remove its temporary files), SIGKILL after a grace period, and the
/// result is `CmdError::Interrupted`. The command runs in its own process
/// group (a terminal's Ctrl-C reaches only us; we decide) and is sent
/// SIGTERM if this thread dies first (even by SIGKILL), so it never keeps
/// writing into an image nobody is watching.
pub fn run_interruptible(
    cmd: &mut Command,
    interrupt: &crate::host::interrupt::Interrupt,
    on_line: &mut dyn FnMut(&[u8]),
) -> Result<(), CmdError> {
    run_interruptible_stderr(cmd, interrupt, on_line).map(drop)
}

/// [`run_interruptible`], returning on success what it kept of stderr
/// (the first and last lines): for tools that print a summary there
/// (`tar --totals`).
pub fn run_interruptible_stderr(
    cmd: &mut Command,
    interrupt: &crate::host::interrupt::Interrupt,
    on_line: &mut dyn FnMut(&[u8]),
) -> Result<String, CmdError> {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc::RecvTimeoutError;
    let program = cmd.get_program().to_string_lossy().into_owned();
    if interrupt.raised() {
        return Err(CmdError::Interrupted { program });
    }
    tracing::debug!(command = %describe(cmd), "run (interruptible)");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tie_to_us(cmd);
    let mut child = cmd
        .spawn()
        .map_err(|source| spawn_error(program.clone(), source))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let stdout_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first lines name the cause (ENOSPC, a refused option), the last
    // ones how it ended: keep both, not everything.
    let stderr_reader = std::thread::spawn(move || {
        let mut head = Vec::new();
        let mut tail = std::collections::VecDeque::new();
        let mut skipped = 0usize;
        for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            if head.len() < HEAD_LINES {
                head.push(line);
                continue;
            }
            tail.push_back(line);
            if tail.len() > TAIL_LINES {
                tail.pop_front();
                skipped += 1;
            }
        }
        if skipped > 0 {
            head.push(format!("[{skipped} lines]"));
        }
        head.extend(tail);
        head.join("\n")
    });
    let mut stopped = false;
    loop {
        if interrupt.raised() {
            stop(&mut child);
            stopped = true;
            break;
        }
        match rx.recv_timeout(POLL) {
            Ok(line) => on_line(&line),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // stdout is closed (or the child stopped); wait for the exit while
    // still honouring the flag. A child that closed stdout is usually
    // exiting: look again after 1 ms, then back off to POLL (a fixed
    // POLL cost each command 25 ms on average, six commands per build).
    let mut pause = std::time::Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|source| CmdError::Spawn {
            program: program.clone(),
            source,
        })? {
            break status;
        }
        if interrupt.raised() && !stopped {
            stop(&mut child);
            stopped = true;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL);
    };
    if stopped {
        // Not joining the readers: a straggler that ignored SIGTERM may
        // still hold the pipes; the threads end when it does.
        return Err(CmdError::Interrupted { program });
    }
    let _ = stdout_reader.join();
    let stderr = stderr_reader.join().unwrap_or_default();
    if status.success() {
        Ok(stderr)
    } else {
        Err(CmdError::Failed {
            command: describe(cmd),
            status: status.to_string(),
            stderr: stderr.trim().to_owned(),
        })
    }
}

/// SIGTERM to the child's process group, then SIGKILL if it has not exited
/// within `GRACE`. Returns once the child has exited.
fn stop(child: &mut std::process::Child) {
    use rustix::process::{kill_process_group, Pid, Signal};
    let Some(pgid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let _ = kill_process_group(pgid, Signal::TERM);
    let deadline = std::time::Instant::now() + GRACE;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = kill_process_group(pgid, Signal::KILL);
    let _ = child.wait();
}

/// Puts `cmd`'s child in its own process group (so a stop can signal it and
/// everything it starts, and the terminal's Ctrl-C reaches strata alone)
/// and has the kernel send it SIGTERM when strata dies, even by SIGKILL.
pub(crate) fn tie_to_us(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one prctl(2) call, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::interrupt::Interrupt;
    use std::time::{Duration, Instant};

    #[test]
    fn interruptible_hands_over_raw_lines_and_reports_failure() {
        let mut lines = Vec::new();
        run_interruptible(
            Command::new("printf").arg("a\\377\\nb c\\n"),
            &Interrupt::default(),
            &mut |l| lines.push(l.to_vec()),
        )
        .unwrap();
        assert_eq!(lines, [b"a\xff".to_vec(), b"b c".to_vec()]);

        let e = run_interruptible(
            Command::new("sh").args([
                "-c",
                "echo first >&2; i=0; while [ $i -lt 100 ]; do echo $i >&2; i=$((i+1)); done; exit 3",
            ]),
            &Interrupt::default(),
            &mut |_| {},
        )
        .unwrap_err();
        let stderr = e.stderr();
        assert!(stderr.starts_with("first\n0\n"), "{stderr}");
        assert!(stderr.contains("[51 lines]"), "{stderr}");
        assert!(stderr.ends_with("\n99"), "{stderr}");
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }

    #[test]
    fn interruptible_stops_the_whole_process_group() {
        let interrupt = Interrupt::default();
        let raiser = interrupt.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            raiser.raise();
        });
        let start = Instant::now();
        // The grandchild `sleep` keeps stdout open: only a group kill ends
        // it.
        let e = run_interruptible(
            Command::new("sh").args(["-c", "sleep 60 & sleep 60; wait"]),
            &interrupt,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, CmdError::Interrupted { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // Raised before the start: nothing runs.
        let e = run_interruptible(&mut Command::new("true"), &interrupt, &mut |_| {}).unwrap_err();
        assert!(matches!(e, CmdError::Interrupted { .. }));
    }
}
