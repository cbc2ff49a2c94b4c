//! qemu-guest-agent client over the `qapi` crate.
//!
//! QGA responses carry no id, so a reply that arrives after its caller gave
//! up would be taken as the answer to the next command. After any timeout or
//! I/O error the connection is therefore thrown away; the next call opens a
//! fresh one and first re-synchronises with `guest-sync` and a random id,
//! retrying until the agent echoes exactly that id.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::time::Instant;

type Service = qapi::futures::QapiService<qapi::futures::QgaStreamTokio<WriteHalf<UnixStream>>>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent {command} timed out after {seconds:.1} s")]
    Timeout { command: String, seconds: f64 },
    #[error("guest agent did not answer guest-sync within {seconds:.0} s ({last})")]
    NoAgent { seconds: f64, last: String },
    #[error("guest agent {command} failed: {message}")]
    Command { command: String, message: String },
    /// The agent passes back at most 16 MiB of a command's output and says
    /// when it cut some off: what came back cannot be trusted (a listing
    /// cut short would read as missing files).
    #[error(
        "guest command `{command}` printed more than the guest agent passes back \
         ({stream} cut off after {bytes} bytes): its output cannot be trusted"
    )]
    OutputTruncated {
        command: String,
        stream: &'static str,
        bytes: usize,
    },
}

/// What a guest command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// None when the process was killed by a signal.
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A guest command started with `Agent::start`.
#[derive(Debug, Clone)]
pub struct Running {
    pid: i64,
    label: String,
    started: Instant,
}

struct Conn {
    service: Service,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

pub struct Agent {
    socket: PathBuf,
    conn: Option<Conn>,
    /// Upper bound for a single request/response round trip.
    pub call_timeout: Duration,
    /// How long one guest-sync attempt may take before reconnecting.
    pub sync_attempt: Duration,
    /// Budget for re-synchronising before a call, when the connection was lost.
    pub resync_within: Duration,
    syncs: u64,
}

impl Agent {
    pub fn new(socket: &Path) -> Agent {
        Agent {
            socket: socket.to_owned(),
            conn: None,
            call_timeout: Duration::from_secs(10),
            sync_attempt: Duration::from_millis(1500),
            resync_within: Duration::from_secs(15),
            syncs: 0,
        }
    }

    /// Number of successful guest-syncs so far (each one follows a (re)connect).
    pub fn sync_count(&self) -> u64 {
        self.syncs
    }

    /// Forgets the connection, e.g. because the guest rebooted under it.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Connects and waits until the agent answers a guest-sync with our id.
    pub async fn sync(&mut self, within: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + within;
        let mut last = String::from("no attempt");
        loop {
            self.conn = None;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(AgentError::NoAgent {
                    seconds: within.as_secs_f64(),
                    last,
                });
            }
            match self.try_sync(remaining.min(self.sync_attempt)).await {
                Ok(conn) => {
                    self.conn = Some(conn);
                    self.syncs += 1;
                    return Ok(());
                }
                Err(e) => {
                    tracing::trace!("guest-sync attempt: {e}");
                    last = e;
                    let pause = Duration::from_millis(200)
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn try_sync(&self, within: Duration) -> Result<Conn, String> {
        let attempt = async {
            let stream = qapi::futures::QgaStreamTokio::open_uds(&self.socket)
                .await
                .map_err(|e| format!("connect {}: {e}", self.socket.display()))?;
            let (service, events) = stream.into_parts();
            let _ = events.release();
            let driver = tokio::spawn(events.into_future());
            let conn = Conn { service, driver };
            let id = random_sync_id();
            conn.service
                .guest_sync(id)
                .await
                .map_err(|e| format!("guest-sync: {e}"))?;
            Ok(conn)
        };
        tokio::time::timeout(within, attempt)
            .await
            .map_err(|_| format!("no guest-sync reply within {:.1} s", within.as_secs_f64()))?
    }

    async fn call<C>(&mut self, name: &str, command: C) -> Result<C::Ok, AgentError>
    where
        C: qapi::qga::QgaCommand + qapi::Command,
    {
        if self.conn.is_none() {
            self.sync(self.resync_within).await?;
        }
        let conn = self.conn.as_ref().expect("connected above");
        match tokio::time::timeout(self.call_timeout, conn.service.execute(command)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(qapi::ExecuteError::Qapi(e))) => Err(AgentError::Command {
                command: name.to_owned(),
                message: e.to_string(),
            }),
            Ok(Err(qapi::ExecuteError::Io(e))) => {
                self.conn = None;
                Err(AgentError::Command {
                    command: name.to_owned(),
                    message: e.to_string(),
                })
            }
            Err(_) => {
                // The late reply would poison the next call: start over.
                self.conn = None;
                Err(AgentError::Timeout {
                    command: name.to_owned(),
                    seconds: self.call_timeout.as_secs_f64(),
                })
            }
        }
    }

    pub async fn ping(&mut self) -> Result<(), AgentError> {
        self.call("guest-ping", qapi::qga::guest_ping {})
            .await
            .map(|_| ())
    }

    /// Runs `argv` in the guest and waits for it, polling guest-exec-status.
    pub async fn exec(
        &mut self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        within: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let running = self.start(argv, stdin).await?;
        self.wait(&running, within).await
    }

    /// Starts `argv` with its output captured; `wait` collects it. Guest
    /// commands started this way run concurrently inside the guest.
    pub async fn start(
        &mut self,
        argv: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Running, AgentError> {
        let (path, args) = argv.split_first().expect("exec needs a program");
        let started = self
            .call(
                "guest-exec",
                qapi::qga::guest_exec {
                    path: (*path).to_owned(),
                    arg: Some(args.iter().map(|s| (*s).to_owned()).collect()),
                    env: None,
                    input_data: stdin.map(<[u8]>::to_vec),
                    capture_output: Some(qapi::qga::GuestExecCaptureOutput::flag(true)),
                },
            )
            .await?;
        Ok(Running {
            pid: started.pid,
            label: argv.join(" "),
            started: Instant::now(),
        })
    }

    /// Polls a started command until it exits or `within` has passed since
    /// it started. The agent keeps an exited command's status until it is
    /// read, so this also works across a reconnect.
    pub async fn wait(
        &mut self,
        running: &Running,
        within: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let deadline = running.started + within;
        // Most guest commands finish in tens of milliseconds; a short poll
        // interval keeps the checks close to the time the guest really needs.
        let mut pause = Duration::from_millis(5);
        loop {
            let st = self
                .call(
                    "guest-exec-status",
                    qapi::qga::guest_exec_status { pid: running.pid },
                )
                .await?;
            if st.exited {
                tracing::debug!(
                    command = %running.label,
                    exit = ?st.exitcode,
                    seconds = running.started.elapsed().as_secs_f64(),
                    "guest command"
                );
                let stdout = st.out_data.unwrap_or_default();
                let stderr = st.err_data.unwrap_or_default();
                let cut = match (st.out_truncated, st.err_truncated) {
                    (Some(true), _) => Some(("stdout", stdout.len())),
                    (_, Some(true)) => Some(("stderr", stderr.len())),
                    _ => None,
                };
                if let Some((stream, bytes)) = cut {
                    return Err(AgentError::OutputTruncated {
                        command: running.label.clone(),
                        stream,
                        bytes,
                    });
                }
                return Ok(ExecOutput {
                    exit_code: st.exitcode,
                    signal: st.signal,
                    stdout,
                    stderr,
                });
            }
            if Instant::now() >= deadline {
                return Err(AgentError::Timeout {
                    command: running.label.clone(),
                    seconds: within.as_secs_f64(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sets the guest's clock (system time and RTC) to `since_epoch`: a
    /// guest restored from a saved state wakes with the clock of the
    /// moment it was saved.
    pub async fn set_time(&mut self, since_epoch: Duration) -> Result<(), AgentError> {
        let ns = i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX);
        self.call(
            "guest-set-time",
            qapi::qga::guest_set_time { time: Some(ns) },
        )
        .await
        .map(drop)
    }

    /// Starts `argv` without waiting for it (e.g. `systemctl reboot`, whose
    /// status the agent cannot report once the guest goes down).
    pub async fn spawn(&mut self, argv: &[&str]) -> Result<(), AgentError> {
        let (path, args) = argv.split_first().expect("spawn needs a program");
        self.call(
            "guest-exec",
            qapi::qga::guest_exec {
                path: (*path).to_owned(),
                arg: Some(args.iter().map(|s| (*s).to_owned()).collect()),
                env: None,
                input_data: None,
                capture_output: None,
            },
        )
        .await
        .map(|_| ())
    }
}

/// guest-sync ids only need to differ from any stale reply still in flight.
fn random_sync_id() -> i32 {
    (crate::random_u64() & 0x3fff_ffff) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// What the fake guest agent does with one request.
    #[derive(Clone, Copy, PartialEq)]
    enum Behaviour {
        Answer,
        /// Never answer this one request (an agent stuck or a reply lost).
        Swallow,
        /// Answer with a stale guest-sync reply first, as a late reply would.
        StaleFirst,
        /// Answer guest-exec-status as for output over the agent's cap.
        Truncated,
    }

    #[derive(Default)]
    struct Seen {
        connections: usize,
        commands: Vec<String>,
    }

    /// A fake agent: `plan` decides per request (in arrival order).
    fn fake_agent(
        dir: &Path,
        plan: impl Fn(usize, &str) -> Behaviour + Send + Sync + 'static,
    ) -> (PathBuf, Arc<Mutex<Seen>>) {
        let path = dir.join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen2 = seen.clone();
        let plan = Arc::new(plan);
        tokio::spawn(async move {
            let counter = Arc::new(Mutex::new(0usize));
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                seen2.lock().unwrap().connections += 1;
                let (seen, plan, counter) = (seen2.clone(), plan.clone(), counter.clone());
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let req: Value = serde_json::from_str(&line).unwrap();
                        let cmd = req["execute"].as_str().unwrap().to_owned();
                        seen.lock().unwrap().commands.push(cmd.clone());
                        let n = {
                            let mut c = counter.lock().unwrap();
                            *c += 1;
                            *c - 1
                        };
                        let reply = match cmd.as_str() {
                            "guest-sync" => json!({"return": req["arguments"]["id"]}),
                            "guest-exec" => json!({"return": {"pid": 42}}),
                            "guest-exec-status" => json!({"return": {
                                "exited": true, "exitcode": 0, "out-data": "aGVsbG8K"}}),
                            "guest-ping" => json!({"return": {}}),
                            other => panic!("unexpected {other}"),
                        };
                        let behaviour = plan(n, &cmd);
                        let reply = if behaviour == Behaviour::Truncated {
                            json!({"return": {"exited": true, "exitcode": 0,
                                "out-data": "L3Jvb3QvYQAv", "out-truncated": true}})
                        } else {
                            reply
                        };
                        match behaviour {
                            Behaviour::Swallow => continue,
                            Behaviour::StaleFirst => {
                                let stale = json!({"return": 7});
                                w.write_all(format!("{stale}\n").as_bytes()).await.unwrap();
                            }
                            Behaviour::Answer | Behaviour::Truncated => {}
                        }
                        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (path, seen)
    }

    fn quick(agent: &mut Agent) {
        agent.call_timeout = Duration::from_millis(300);
        agent.sync_attempt = Duration::from_millis(300);
        agent.resync_within = Duration::from_secs(3);
    }

    #[tokio::test]
    async fn exec_returns_decoded_output() {
        let dir = tempfile::tempdir().unwrap();
        let (path, seen) = fake_agent(dir.path(), |_, _| Behaviour::Answer);
        let mut agent = Agent::new(&path);
        quick(&mut agent);
        let out = agent
            .exec(&["/bin/echo", "hello"], None, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout_str(), "hello\n");
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.commands,
            ["guest-sync", "guest-exec", "guest-exec-status"]
        );
    }

    #[tokio::test]
    async fn output_over_the_agents_cap_is_an_error_not_short_output() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fake_agent(dir.path(), |_, cmd| {
            if cmd == "guest-exec-status" {
                Behaviour::Truncated
            } else {
                Behaviour::Answer
            }
        });
        let mut agent = Agent::new(&path);
        quick(&mut agent);
        let err = agent
            .exec(
                &["/bin/sh", "-c", "find / -print0"],
                None,
                Duration::from_secs(2),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                AgentError::OutputTruncated {
                    stream: "stdout",
                    bytes: 9,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("`/bin/sh -c find / -print0`"), "{msg}");
        assert!(msg.contains("cannot be trusted"), "{msg}");
    }

    #[tokio::test]
    async fn timeout_then_reconnect_and_resync() {
        let dir = tempfile::tempdir().unwrap();
        // Request #1 (the first guest-ping after the sync) is never answered.
        let (path, seen) = fake_agent(dir.path(), |n, _| {
            if n == 1 {
                Behaviour::Swallow
            } else {
                Behaviour::Answer
            }
        });
        let mut agent = Agent::new(&path);
        quick(&mut agent);
        let started = std::time::Instant::now();
        let err = agent.ping().await.unwrap_err();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!agent.is_connected(), "a timed-out connection is dropped");
        agent.ping().await.unwrap();
        assert_eq!(agent.sync_count(), 2);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 2);
        assert_eq!(
            seen.commands,
            ["guest-sync", "guest-ping", "guest-sync", "guest-ping"]
        );
    }

    #[tokio::test]
    async fn stale_reply_makes_sync_retry_on_a_new_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (path, seen) = fake_agent(dir.path(), |n, cmd| {
            if n == 0 && cmd == "guest-sync" {
                Behaviour::StaleFirst
            } else {
                Behaviour::Answer
            }
        });
        let mut agent = Agent::new(&path);
        quick(&mut agent);
        agent.ping().await.unwrap();
        assert_eq!(agent.sync_count(), 1);
        assert_eq!(seen.lock().unwrap().connections, 2);
    }

    #[tokio::test]
    async fn silent_peer_gives_no_agent_error_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (path, seen) = fake_agent(dir.path(), |_, _| Behaviour::Swallow);
        let mut agent = Agent::new(&path);
        quick(&mut agent);
        // The budget ends the wait (a hang would never return); a loaded
        // machine may fit few retries into it, so count, don't time.
        let err = agent.sync(Duration::from_secs(3)).await.unwrap_err();
        assert!(matches!(err, AgentError::NoAgent { .. }), "{err}");
        assert!(seen.lock().unwrap().connections >= 2, "it kept retrying");
    }

    #[tokio::test]
    async fn missing_socket_is_no_agent_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::new(&dir.path().join("absent.sock"));
        quick(&mut agent);
        let err = agent.sync(Duration::from_millis(500)).await.unwrap_err();
        assert!(err.to_string().contains("connect"), "{err}");
    }
}
