//! A small machine API so scenarios read like stories: start, succeed,
//! wait_for_unit, reboot, power_cut, shutdown. Every way out of a `Machine`
//! (drop included) kills QEMU.

use crate::agent::{Agent, AgentError, ExecOutput, Running};
use crate::qemu::{DiskFormat, QemuCommand, DISK_NODE};
use crate::qmp::{EventLog, Qmp, QmpError, QmpEvent};
use crate::serial::SerialWatch;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::process::Child;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("starting QEMU ({binary}): {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}): {stderr}")]
    Exited { status: String, stderr: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("guest console: \"{line}\"")]
    GuestFatal { line: String },
    #[error(
        "the guest agent went away while strata waited for it (the guest closed the \
         org.qemu.guest_agent.0 port: qemu-guest-agent stopped or was killed)"
    )]
    AgentGone,
    #[error("guest panicked (QMP GUEST_PANICKED)")]
    Panicked,
    #[error("guest powered off unexpectedly (QMP SHUTDOWN, reason {reason})")]
    UnexpectedShutdown { reason: String },
    #[error("--accel kvm: KVM is not usable here: {0}")]
    NoKvm(String),
    #[error("{0}")]
    Setup(String),
    #[error("boot loop: the guest reset {resets} times without coming up")]
    BootLoop { resets: u32 },
    #[error("{what} did not happen within {seconds:.0} s")]
    Timeout { what: String, seconds: f64 },
    #[error(
        "the guest came up without a guest agent: the console showed {line:?} {seconds:.0} s ago, \
         but nothing opened the org.qemu.guest_agent.0 port (QMP VSERPORT_CHANGE); \
         install and enable qemu-guest-agent in the image"
    )]
    NoAgent { line: String, seconds: f64 },
    #[error("guest command `{command}` failed (exit {code}): {stderr}")]
    CommandFailed {
        command: String,
        code: String,
        stderr: String,
    },
}

/// Guest-initiated resets while waiting for one boot that count as a loop.
const BOOT_LOOP_RESETS: u32 = 3;

/// How long the agent's port may stay closed after the console showed the
/// guest up (multi-user reached, or a login prompt) before the guest is
/// declared to have no agent. qemu-guest-agent starts from udev alongside
/// the other services, within a few seconds of multi-user even under TCG.
pub const AGENT_GRACE: Duration = Duration::from_secs(10);

/// Whether a guest that came up has no guest agent: `up` is when (and by
/// which console line) the guest showed it reached multi-user, `port_open`
/// whether its agent holds the agent port open now. None: keep waiting.
pub fn agent_missing(
    up: Option<&(Instant, String)>,
    port_open: bool,
    now: Instant,
    grace: Duration,
) -> Option<MachineError> {
    let (at, line) = up?;
    let waited = now.saturating_duration_since(*at);
    (!port_open && waited >= grace).then(|| MachineError::NoAgent {
        line: line.clone(),
        seconds: waited.as_secs_f64(),
    })
}

/// QEMU's stdout and stderr: a file (appended), read from where this
/// process began writing. A file rather than a pipe: QEMU's last words
/// survive strata, a pipe nobody drains cannot stall QEMU, and the file is
/// the artifact.
#[derive(Debug, Clone)]
struct OutputLog {
    path: PathBuf,
    offset: u64,
}

/// The most of QEMU's output read back into a message.
const OUTPUT_READ_MAX: u64 = 256 * 1024;

impl OutputLog {
    fn open(path: &Path) -> std::io::Result<(OutputLog, std::fs::File)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let offset = file.metadata()?.len();
        Ok((
            OutputLog {
                path: path.to_owned(),
                offset,
            },
            file,
        ))
    }

    /// This process's output so far (its last 256 KiB at most).
    fn text(&self) -> String {
        read_tail_from(&self.path, self.offset)
    }

    /// Its last lines, for an error message.
    fn tail(&self) -> String {
        crate::qemu_output::last_lines(&self.text(), OUTPUT_TAIL_LINES)
    }
}

/// The last 256 KiB of QEMU's output file at `path`, from `offset` on.
fn read_tail_from(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = offset.max(len.saturating_sub(OUTPUT_READ_MAX));
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_ok() {
        let _ = f.take(OUTPUT_READ_MAX).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last 256 KiB of a QEMU output file (an artifact).
pub fn read_tail(path: &Path) -> String {
    read_tail_from(path, 0)
}

/// Lines of QEMU's output an error message carries.
pub const OUTPUT_TAIL_LINES: usize = 15;

pub struct Machine {
    cmd: QemuCommand,
    child: Child,
    qmp: Qmp,
    pub agent: Agent,
    serial: SerialWatch,
    /// QEMU's stdout and stderr, as it wrote them to `cmd.output_log`.
    stderr: OutputLog,
    /// Host instant the CPUs were started (`cont`).
    started: Instant,
    pub command_timeout: Duration,
    /// The block node the disk device reads and writes: the command
    /// line's, or the newest external snapshot's (`save`).
    disk_node: String,
    /// Snapshots taken so far: names the next snapshot's node.
    saves: u32,
    /// A boot that must show the kernel's first console line (or the
    /// guest agent) within this long after the CPUs started, or be
    /// declared stalled: how an `--accel auto` KVM attempt tells a vCPU
    /// that does not run from a slow boot (see `accel`).
    pub kernel_within: Option<Duration>,
}

/// A running guest saved for later restores ([`Machine::save`]): its RAM
/// and device state in one file, and the disk file frozen at the same
/// instant. Each restore gets its own overlay on that disk, so any number
/// of restores start from the same moment, one after another or at once.
#[derive(Debug, Clone)]
pub struct SavedState {
    /// RAM and devices (QMP `migrate` to a file).
    pub state: PathBuf,
    /// The disk at the moment of the save; never written again.
    pub disk: PathBuf,
    /// The guest's boot time (`btime`, seconds since the epoch, its own
    /// clock) when saved: a restore's clock is set forward, which moves
    /// the btime the guest reports, but not the times its files got.
    pub boot_epoch: f64,
    /// Seconds the save took (the guest stood still that long).
    pub seconds: f64,
    /// The saved machine's command line: a restore needs the same
    /// machine, memory and devices.
    cmd: QemuCommand,
}

impl SavedState {
    /// The format of `disk`: an overlay's qcow2, a lifecycle copy's raw.
    pub fn disk_format(&self) -> DiskFormat {
        self.cmd.disk_format
    }

    /// The saved machine's command line, for a restore that needs its own
    /// sockets and console ([`Machine::restore_as`]).
    pub fn command(&self) -> &QemuCommand {
        &self.cmd
    }
}

/// How long writing or loading a saved state may take: a GiB of RAM at
/// disk speed (measured: 1.5 s for the fixture's 200 MB under TCG).
const MIGRATION_WITHIN: Duration = Duration::from_secs(120);

impl Drop for Machine {
    fn drop(&mut self) {
        // kill_on_drop also covers this; being explicit keeps the intent local.
        let _ = self.child.start_kill();
    }
}

impl Machine {
    /// Spawns QEMU paused, attaches QMP, then lets the CPUs run.
    pub async fn start(cmd: QemuCommand, events: EventLog) -> Result<Machine, MachineError> {
        let mut m = Machine::spawn(cmd, events).await?;
        if m.cmd.start_paused {
            m.qmp.cont().await?;
        }
        m.started = Instant::now();
        Ok(m)
    }

    /// Spawns QEMU and attaches QMP; the CPUs run only if the command
    /// line does not hold them (`start_paused`).
    async fn spawn(cmd: QemuCommand, events: EventLog) -> Result<Machine, MachineError> {
        let serial_offset = std::fs::metadata(&cmd.serial_log)
            .map(|m| m.len())
            .unwrap_or(0);
        // The chardev appends; start from what the previous boot left.
        let (stderr, file) = OutputLog::open(&cmd.output_log).map_err(|e| {
            MachineError::Setup(format!(
                "QEMU's output log {}: {e}",
                cmd.output_log.display()
            ))
        })?;
        let mut command = cmd.to_command();
        let file2 = file.try_clone().map_err(|e| {
            MachineError::Setup(format!(
                "QEMU's output log {}: {e}",
                cmd.output_log.display()
            ))
        })?;
        command.stdout(file).stderr(file2);
        let mut child = command.spawn().map_err(|source| MachineError::Spawn {
            binary: cmd.binary.display().to_string(),
            source,
        })?;
        let serial = SerialWatch::follow(cmd.serial_log.clone(), serial_offset);
        let qmp = tokio::select! {
            r = Qmp::connect(&cmd.qmp_socket, Duration::from_secs(10), events) => r,
            status = child.wait() => {
                return Err(MachineError::Exited {
                    status: status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    stderr: stderr.tail(),
                });
            }
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                // QEMU creates the QMP socket before it parses -device options:
                // a QMP failure is often QEMU exiting with a better message.
                if let Ok(Ok(status)) =
                    tokio::time::timeout(Duration::from_secs(2), child.wait()).await
                {
                    return Err(MachineError::Exited {
                        status: status.to_string(),
                        stderr: stderr.tail(),
                    });
                }
                let _ = child.start_kill();
                return Err(e.into());
            }
        };
        let agent = Agent::new(&cmd.qga_socket);
        Ok(Machine {
            cmd,
            child,
            qmp,
            agent,
            serial,
            stderr,
            started: Instant::now(),
            command_timeout: Duration::from_secs(60),
            disk_node: DISK_NODE.to_owned(),
            saves: 0,
            kernel_within: None,
        })
    }

    /// Saves the running guest for [`Machine::restore`] and lets it run
    /// on: the vCPUs stop, the disk's writes move to `next_disk` (an
    /// external snapshot, so the current disk file is frozen as the
    /// saved instant's), RAM and devices go to `state`, and the vCPUs run
    /// again. The guest only loses the seconds it stood still; its clock
    /// is left alone (setting it would move the btime it reports).
    pub async fn save(
        &mut self,
        state: &Path,
        next_disk: &Path,
    ) -> Result<SavedState, MachineError> {
        let t = Instant::now();
        let btime = self.succeed("awk '/^btime /{print $2}' /proc/stat").await?;
        // Without it moved-files could not tell the image's defects from
        // what the guest rewrote before the save: no guessing.
        let boot_epoch = btime
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|t| *t > 0.0)
            .ok_or_else(|| MachineError::Setup(format!("the guest's btime: {btime:?}")))?;
        let saved_cmd = self.cmd.clone();
        let new_node = format!("{DISK_NODE}-after-save{}", self.saves + 1);
        self.qmp.stop().await?;
        let saved = async {
            self.qmp
                .snapshot_disk(&self.disk_node, next_disk, &new_node)
                .await?;
            self.saves += 1;
            self.disk_node = new_node;
            self.cmd.disk = next_disk.to_owned();
            self.cmd.disk_format = DiskFormat::Qcow2;
            self.qmp.migrate_to_file(state, MIGRATION_WITHIN).await
        }
        .await;
        if saved.is_err() {
            // Not left running live behind the run's back.
            self.qmp.migrate_cancel().await;
        }
        // Running again whether or not the save worked; the save's own
        // error is the one worth reporting.
        let resumed = self.qmp.cont().await;
        saved?;
        resumed?;
        Ok(SavedState {
            state: state.to_owned(),
            disk: saved_cmd.disk.clone(),
            boot_epoch,
            seconds: t.elapsed().as_secs_f64(),
            cmd: saved_cmd,
        })
    }

    /// Freezes the disk as it is now and lets the guest run on: its writes
    /// move to `next_disk` (an external snapshot), the current disk file
    /// keeps this instant's contents, which is what a power cut now would
    /// leave. Returns that frozen disk. No RAM is saved (`save` does that).
    pub async fn freeze_disk(
        &mut self,
        next_disk: &Path,
    ) -> Result<(PathBuf, DiskFormat), MachineError> {
        let frozen = (self.cmd.disk.clone(), self.cmd.disk_format);
        let new_node = format!("{DISK_NODE}-after-save{}", self.saves + 1);
        self.qmp.stop().await?;
        let snap = self
            .qmp
            .snapshot_disk(&self.disk_node, next_disk, &new_node)
            .await;
        let resumed = self.qmp.cont().await;
        snap?;
        resumed?;
        self.saves += 1;
        self.disk_node = new_node;
        self.cmd.disk = next_disk.to_owned();
        self.cmd.disk_format = DiskFormat::Qcow2;
        Ok(frozen)
    }

    /// A new QEMU that continues the saved guest from the moment of the
    /// save, on `disk`: a qcow2 overlay backed by `saved.disk` (made by
    /// the caller; this machine writes only there). Its clock is set to
    /// the host's once the agent answers.
    pub async fn restore(
        saved: &SavedState,
        disk: &Path,
        output_log: &Path,
        events: EventLog,
    ) -> Result<Machine, MachineError> {
        let cmd = QemuCommand {
            disk: disk.to_owned(),
            output_log: output_log.to_owned(),
            disk_format: DiskFormat::Qcow2,
            ..saved.cmd.clone()
        };
        Machine::restore_as(saved, cmd, events).await
    }

    /// [`Machine::restore`] with a command line of the caller's: the saved
    /// one (`SavedState::command`) with its own disk overlay, sockets and
    /// console, so that two restores of one save run at once.
    pub async fn restore_as(
        saved: &SavedState,
        cmd: QemuCommand,
        events: EventLog,
    ) -> Result<Machine, MachineError> {
        let cmd = QemuCommand {
            incoming: true,
            start_paused: true,
            ..cmd
        };
        let mut m = Machine::spawn(cmd, events).await?;
        m.qmp
            .migrate_from_file(&saved.state, MIGRATION_WITHIN)
            .await?;
        m.qmp.cont().await?;
        m.started = Instant::now();
        // The agent in the guest never went away: its port is open in
        // the loaded state, so this answers at once (unless QEMU died).
        {
            let Machine {
                agent,
                child,
                qmp,
                stderr,
                ..
            } = &mut m;
            unless_exited(child, stderr, qmp, agent.sync(Duration::from_secs(30))).await?;
        }
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        };
        if let Err(e) = m.agent.set_time(now()).await {
            // guest-set-time also writes the RTC with hwclock, which a
            // guest may lack; the system clock is what matters here.
            let t = now();
            m.succeed(&format!(
                "date -u -s @{}.{:09}",
                t.as_secs(),
                t.subsec_nanos()
            ))
            .await
            .map_err(|e2| {
                MachineError::Setup(format!(
                    "setting the restored guest's clock: guest-set-time: {e}; date -s: {e2}"
                ))
            })?;
        }
        Ok(m)
    }

    pub fn command(&self) -> &QemuCommand {
        &self.cmd
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn serial(&self) -> &SerialWatch {
        &self.serial
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// What this QEMU wrote on stdout and stderr, register dumps left
    /// out (see [`crate::qemu_output::qemu_words`]).
    pub fn qemu_said(&self) -> String {
        crate::qemu_output::qemu_words(&self.stderr.text())
    }

    /// The file QEMU's stdout and stderr go to.
    pub fn output_log(&self) -> &Path {
        &self.cmd.output_log
    }

    /// Fails if QEMU died, the guest panicked or powered off, or its console
    /// shows that it cannot come up.
    pub fn check_alive(&mut self) -> Result<(), MachineError> {
        let mut ignore_resets = BootWatch::default();
        health(
            &mut self.child,
            &self.stderr,
            &mut self.qmp,
            &self.serial,
            &mut ignore_resets,
        )
    }

    /// Waits until the kernel prints timestamped console lines: the first
    /// sign that the guest CPU really runs.
    pub async fn wait_for_kernel(&mut self, within: Duration) -> Result<Instant, MachineError> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive()?;
            if let Some(t) = self.serial.snapshot().kernel_start {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                return Err(MachineError::Timeout {
                    what: "kernel console output".into(),
                    seconds: within.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the agent, then for systemd to finish starting up
    /// (`running` or `degraded`: failed units are a check's business). The
    /// agent is talked to once its port opens (QMP `VSERPORT_CHANGE`), not
    /// polled for; a guest that reaches multi-user without ever opening it
    /// has no agent, said within [`AGENT_GRACE`] rather than at the timeout.
    pub async fn wait_booted(&mut self, within: Duration) -> Result<String, MachineError> {
        let deadline = Instant::now() + within;
        {
            let Machine {
                agent,
                child,
                qmp,
                serial,
                stderr,
                kernel_within,
                started,
                ..
            } = self;
            let port_opened = qmp.agent_port_opened();
            let sync = async {
                port_opened.await;
                let left = deadline.saturating_duration_since(Instant::now());
                agent.sync(left.max(Duration::from_secs(1))).await
            };
            tokio::pin!(sync);
            let mut watch = BootWatch::default();
            let kernel_within = *kernel_within;
            let started = *started;
            loop {
                tokio::select! {
                    r = &mut sync => match r {
                        Ok(()) => break,
                        Err(AgentError::NoAgent { seconds, last }) => {
                            return Err(MachineError::Timeout {
                                what: format!("the guest coming up (qemu-guest-agent silent; last attempt: {last})"),
                                seconds,
                            })
                        }
                        Err(e) => return Err(e.into()),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        health(child, stderr, qmp, serial, &mut watch)?;
                        let now = Instant::now();
                        if let Some(bound) = kernel_within {
                            let showed_life = serial.snapshot().kernel_start.is_some()
                                || qmp.state().agent_port_opened.is_some();
                            if !showed_life && now.saturating_duration_since(started) >= bound {
                                return Err(MachineError::Timeout {
                                    what: "the kernel's first console line (or the guest agent)".into(),
                                    seconds: bound.as_secs_f64(),
                                });
                            }
                        }
                        let up = serial.snapshot().up;
                        if let Some(e) = agent_missing(up.as_ref(), qmp.state().agent_port_open, now, AGENT_GRACE) {
                            return Err(e);
                        }
                        if now >= deadline {
                            return Err(MachineError::Timeout {
                                what: "the guest coming up (the guest agent's port never opened)".into(),
                                seconds: within.as_secs_f64(),
                            });
                        }
                    }
                }
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let out = self
            .exec_within(
                &["systemctl", "is-system-running", "--wait"],
                None,
                remaining.max(Duration::from_secs(5)),
            )
            .await?;
        let state = out.stdout_str().trim().to_owned();
        match state.as_str() {
            "running" | "degraded" => Ok(state),
            _ => Err(MachineError::CommandFailed {
                command: "systemctl is-system-running --wait".into(),
                code: format!("{:?}", out.exit_code),
                stderr: format!("system state {state:?}"),
            }),
        }
    }

    async fn exec_within(
        &mut self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        within: Duration,
    ) -> Result<ExecOutput, MachineError> {
        let Machine {
            agent,
            child,
            qmp,
            stderr,
            ..
        } = self;
        unless_exited(child, stderr, qmp, agent.exec(argv, stdin, within)).await
    }

    /// Starts a shell script in the guest and returns at once; `finish`
    /// collects it. Lets independent observations overlap.
    pub async fn start_script(
        &mut self,
        script: &str,
        stdin: Option<&[u8]>,
    ) -> Result<Running, MachineError> {
        let Machine {
            agent,
            child,
            qmp,
            stderr,
            ..
        } = self;
        unless_exited(
            child,
            stderr,
            qmp,
            agent.start(&["/bin/sh", "-c", script], stdin),
        )
        .await
    }

    pub async fn finish(&mut self, running: &Running) -> Result<ExecOutput, MachineError> {
        let t = self.command_timeout;
        let Machine {
            agent,
            child,
            qmp,
            stderr,
            ..
        } = self;
        unless_exited(child, stderr, qmp, agent.wait(running, t)).await
    }

    /// Runs a shell script in the guest; returns its output whatever the exit code.
    pub async fn exec(&mut self, script: &str) -> Result<ExecOutput, MachineError> {
        let t = self.command_timeout;
        self.exec_within(&["/bin/sh", "-c", script], None, t).await
    }

    /// Like `exec`, feeding `stdin` to the script.
    pub async fn exec_stdin(
        &mut self,
        script: &str,
        stdin: &[u8],
    ) -> Result<ExecOutput, MachineError> {
        let t = self.command_timeout;
        self.exec_within(&["/bin/sh", "-c", script], Some(stdin), t)
            .await
    }

    /// Runs a shell script that must succeed; returns its stdout.
    pub async fn succeed(&mut self, script: &str) -> Result<String, MachineError> {
        let out = self.exec(script).await?;
        if out.success() {
            Ok(out.stdout_str())
        } else {
            Err(MachineError::CommandFailed {
                command: script.to_owned(),
                code: out
                    .exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| format!("signal {:?}", out.signal)),
                stderr: out.stderr_str().trim().to_owned(),
            })
        }
    }

    pub async fn wait_for_unit(
        &mut self,
        unit: &str,
        within: Duration,
    ) -> Result<(), MachineError> {
        let deadline = Instant::now() + within;
        loop {
            let out = self
                .exec_within(&["systemctl", "is-active", unit], None, within)
                .await?;
            match out.stdout_str().trim() {
                "active" => return Ok(()),
                "failed" => {
                    return Err(MachineError::CommandFailed {
                        command: format!("systemctl is-active {unit}"),
                        code: "failed".into(),
                        stderr: format!("unit {unit} failed"),
                    })
                }
                _ if Instant::now() >= deadline => {
                    return Err(MachineError::Timeout {
                        what: format!("unit {unit} active"),
                        seconds: within.as_secs_f64(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// A clean reboot from inside the guest; returns when the guest has booted again.
    pub async fn reboot(&mut self, within: Duration) -> Result<String, MachineError> {
        let _ = self.qmp.drain_events();
        self.agent.spawn(&["systemctl", "reboot"]).await?;
        let reset = self
            .qmp
            .wait_event(within, |e| e.event == "RESET" || e.event == "SHUTDOWN")
            .await?;
        match reset {
            Some(ev) if ev.event == "RESET" => {}
            Some(ev) => {
                return Err(MachineError::UnexpectedShutdown {
                    reason: ev.data["reason"].as_str().unwrap_or("?").to_owned(),
                })
            }
            None => {
                return Err(self
                    .no_event("guest reset after `systemctl reboot`", within)
                    .await)
            }
        }
        self.agent.disconnect();
        self.serial.new_boot();
        self.started = Instant::now();
        self.wait_booted(within).await
    }

    /// A clean reboot from inside the guest whose final reset ends QEMU
    /// (set up with [`Qmp::exit_on_guest_reset`]): the guest goes through
    /// its whole `systemctl reboot` (services stopped, filesystems
    /// unmounted and synced, the reset), and the caller starts the next
    /// boot however it likes. A guest that powers off or halts instead,
    /// or a QEMU that dies before the reset, is reported as such.
    pub async fn reboot_to_exit(mut self, within: Duration) -> Result<(), MachineError> {
        let _ = self.qmp.drain_events();
        self.agent.spawn(&["systemctl", "reboot"]).await?;
        let ev = self
            .qmp
            .wait_event(within, |e| e.event == "SHUTDOWN" || e.event == "RESET")
            .await?;
        match ev {
            Some(ev) => reset_ended_qemu(&ev)?,
            None => {
                return Err(self
                    .no_event("guest reset after `systemctl reboot`", within)
                    .await)
            }
        }
        self.wait_exit(Duration::from_secs(10)).await.map(drop)
    }

    /// Why an awaited event never came: QEMU exited (the event stream ends
    /// with it), or it did not happen in time.
    async fn no_event(&mut self, what: &str, within: Duration) -> MachineError {
        match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => MachineError::Exited {
                status: status.to_string(),
                stderr: self.stderr.tail(),
            },
            _ => MachineError::Timeout {
                what: what.into(),
                seconds: within.as_secs_f64(),
            },
        }
    }

    /// Flushes the guest's page cache, then pulls the plug (QMP `quit`).
    pub async fn power_cut(mut self) -> Result<ExitStatus, MachineError> {
        self.succeed("sync").await?;
        self.qmp.quit().await?;
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Powers off from inside the guest and waits for QEMU to exit.
    pub async fn shutdown(mut self, within: Duration) -> Result<ExitStatus, MachineError> {
        self.agent.spawn(&["systemctl", "poweroff"]).await?;
        let ev = self
            .qmp
            .wait_event(within, QmpEvent::is_guest_shutdown)
            .await?;
        if ev.is_none() {
            return Err(MachineError::Timeout {
                what: "guest poweroff".into(),
                seconds: within.as_secs_f64(),
            });
        }
        self.wait_exit(Duration::from_secs(10)).await
    }

    async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus, MachineError> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(MachineError::Exited {
                status: e.to_string(),
                stderr: self.stderr.tail(),
            }),
            Err(_) => {
                self.kill().await;
                Err(MachineError::Timeout {
                    what: "QEMU exit".into(),
                    seconds: within.as_secs_f64(),
                })
            }
        }
    }

    /// Kills QEMU and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    pub async fn screendump(&self, png: &std::path::Path) -> Result<(), MachineError> {
        Ok(self.qmp.screendump(png).await?)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Runs an agent request, giving up at once if QEMU reports that the VM
/// cannot go on, and within half a second if QEMU dies under it.
async fn unless_exited<T>(
    child: &mut Child,
    stderr: &OutputLog,
    qmp: &Qmp,
    fut: impl std::future::Future<Output = Result<T, AgentError>>,
) -> Result<T, MachineError> {
    let closes = qmp.state().agent_port_closes;
    let stopped = unless_stopped(qmp, fut);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            // An answer that is there wins over a port closed after it.
            biased;
            r = &mut stopped => return r,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(MachineError::Exited {
                        status: status.to_string(),
                        stderr: stderr.tail(),
                    });
                }
                if qmp.state().agent_port_closes > closes {
                    return Err(MachineError::AgentGone);
                }
            }
        }
    }
}

/// Runs `fut` unless QEMU reports first that the VM cannot go on (`STOP`,
/// `BLOCK_IO_ERROR`, `GUEST_PANICKED`): a paused guest never answers.
pub async fn unless_stopped<T, E: Into<MachineError>>(
    qmp: &Qmp,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, MachineError> {
    tokio::select! {
        biased;
        e = qmp.fatal() => Err(e.into()),
        r = fut => r.map_err(Into::into),
    }
}

/// Whether `ev`, awaited after `systemctl reboot` with QEMU told to exit at
/// a guest reset, is that reset: QMP `SHUTDOWN` with reason `guest-reset`.
/// A guest that powered off (`guest-shutdown`) or halted (`guest-panic`,
/// ...) did not reboot; a `RESET` means QEMU restarted the guest itself.
pub fn reset_ended_qemu(ev: &QmpEvent) -> Result<(), MachineError> {
    let reason = ev
        .data
        .get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or("?");
    match (ev.event.as_str(), reason) {
        ("SHUTDOWN", "guest-reset") => Ok(()),
        ("SHUTDOWN", _) => Err(MachineError::UnexpectedShutdown {
            reason: reason.to_owned(),
        }),
        _ => Err(MachineError::Setup(format!(
            "QEMU restarted the guest at its reset (QMP {}, reason {reason}) although told to \
             exit (QMP set-action reboot=shutdown)",
            ev.event
        ))),
    }
}

/// Guest resets seen while waiting for one boot. QEMU reports one reset as
/// a burst of RESET events, so events close together count once.
#[derive(Default)]
struct BootWatch {
    resets: u32,
    last_reset: f64,
}

impl BootWatch {
    /// True when the guest keeps resetting: a kernel that cannot start
    /// (corrupt image, triple fault) is booted again and again by the
    /// firmware, and there is no need to wait for the timeout.
    fn reset_at(&mut self, timestamp: f64) -> bool {
        if timestamp - self.last_reset > 0.5 {
            self.resets += 1;
        }
        self.last_reset = timestamp;
        self.resets >= BOOT_LOOP_RESETS
    }
}

fn health(
    child: &mut Child,
    stderr: &OutputLog,
    qmp: &mut Qmp,
    serial: &SerialWatch,
    watch: &mut BootWatch,
) -> Result<(), MachineError> {
    if let Ok(Some(status)) = child.try_wait() {
        return Err(MachineError::Exited {
            status: status.to_string(),
            stderr: stderr.tail(),
        });
    }
    if let Some(e) = qmp.fatal_now() {
        return Err(e.into());
    }
    for ev in qmp.drain_events() {
        match ev.event.as_str() {
            "GUEST_PANICKED" => return Err(MachineError::Panicked),
            "SHUTDOWN" => {
                return Err(MachineError::UnexpectedShutdown {
                    reason: ev.data["reason"].as_str().unwrap_or("?").to_owned(),
                })
            }
            "RESET" if watch.reset_at(ev.timestamp) => {
                return Err(MachineError::BootLoop {
                    resets: watch.resets,
                })
            }
            _ => {}
        }
    }
    if let Some(line) = serial.snapshot().fatal {
        return Err(MachineError::GuestFatal { line });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_without_an_agent_is_diagnosed_soon_after_multi_user() {
        let t0 = Instant::now();
        let up = (t0, "debian login:".to_owned());
        let grace = Duration::from_secs(10);
        // Still booting: nothing to say, however long it takes.
        assert!(agent_missing(None, false, t0 + Duration::from_secs(200), grace).is_none());
        // Up, the agent may still be starting.
        assert!(agent_missing(Some(&up), false, t0 + Duration::from_secs(3), grace).is_none());
        // Up for the grace period and the port never opened: no agent,
        // seconds after multi-user instead of at the 240 s boot timeout.
        let err = agent_missing(Some(&up), false, t0 + Duration::from_secs(10), grace)
            .expect("diagnosed");
        let msg = err.to_string();
        assert!(msg.contains("without a guest agent"), "{msg}");
        assert!(msg.contains("\"debian login:\""), "{msg}");
        assert!(msg.contains("org.qemu.guest_agent.0"), "{msg}");
        // The port is open: the agent is there, however slow its answer.
        assert!(agent_missing(Some(&up), true, t0 + Duration::from_secs(60), grace).is_none());
    }

    fn shutdown(event: &str, reason: &str) -> QmpEvent {
        QmpEvent {
            event: event.into(),
            timestamp: 1.0,
            data: serde_json::json!({"guest": true, "reason": reason}),
        }
    }

    #[test]
    fn only_the_guests_reset_counts_as_the_reboot_ending_qemu() {
        assert!(reset_ended_qemu(&shutdown("SHUTDOWN", "guest-reset")).is_ok());
        // Powered off instead of rebooting: said as such, not a reboot.
        let err = reset_ended_qemu(&shutdown("SHUTDOWN", "guest-shutdown")).unwrap_err();
        assert!(
            matches!(&err, MachineError::UnexpectedShutdown { reason } if reason == "guest-shutdown"),
            "{err}"
        );
        assert!(err.to_string().contains("powered off"), "{err}");
        // The host quit QEMU meanwhile: not the guest's reboot either.
        let err = reset_ended_qemu(&shutdown("SHUTDOWN", "host-qmp-quit")).unwrap_err();
        assert!(err.to_string().contains("host-qmp-quit"), "{err}");
        // QEMU restarted the guest itself: the action did not take.
        let err = reset_ended_qemu(&shutdown("RESET", "guest-reset")).unwrap_err();
        assert!(err.to_string().contains("set-action"), "{err}");
    }

    #[test]
    fn a_burst_of_reset_events_is_one_reset() {
        let mut w = BootWatch::default();
        // What QEMU sent for a kernel that triple-faults at once.
        let bursts = [1.26, 1.33, 2.16, 2.21, 3.0, 3.04];
        let looped: Vec<bool> = bursts.iter().map(|t| w.reset_at(*t)).collect();
        assert_eq!(looped, [false, false, false, false, true, true]);
        assert_eq!(w.resets, 3);
    }
}
