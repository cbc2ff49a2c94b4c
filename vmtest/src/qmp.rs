//! QMP, with replies matched to calls by id and events read by us.
//!
//! One reader task owns the socket's read side. Every call gets a fresh id
//! and waits for the reply carrying that id; a call that times out forgets
//! its id, so a reply arriving later is dropped instead of being taken for
//! the answer to the next call (the connection stays usable for the rest of
//! the run). Events are kept as raw JSON whatever their shape (an event or
//! enum value newer than any schema is logged, never fatal to the stream),
//! and the ones that say the VM cannot go on (`STOP`, `BLOCK_IO_ERROR`,
//! `GUEST_PANICKED`) are published at once so that every wait can end.
//! The `qapi` crate supplies only the typed commands and their results.

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP {command} timed out after {seconds:.1} s")]
    Timeout { command: &'static str, seconds: f64 },
    #[error("QMP {command} failed: {message}")]
    Command {
        command: &'static str,
        message: String,
    },
    #[error("QMP {command}: the connection closed (QEMU exited)")]
    Disconnected { command: &'static str },
    /// QEMU reported that the VM cannot go on by itself.
    #[error("{detail}")]
    Fatal { event: String, detail: String },
}

/// One asynchronous QMP event, as QEMU sent it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    /// Seconds since the epoch, from QEMU's own timestamp.
    pub timestamp: f64,
    pub data: serde_json::Value,
}

impl QmpEvent {
    fn from_json(v: &serde_json::Value) -> Option<QmpEvent> {
        let event = v.get("event")?.as_str()?.to_owned();
        let ts = v.get("timestamp");
        let secs = ts
            .and_then(|t| t.get("seconds"))
            .and_then(|s| s.as_f64())
            .unwrap_or(0.0);
        let micros = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(|s| s.as_f64())
            .unwrap_or(0.0);
        Some(QmpEvent {
            event,
            timestamp: secs + micros / 1e6,
            data: v.get("data").cloned().unwrap_or(serde_json::Value::Null),
        })
    }

    /// SHUTDOWN caused by the guest itself (poweroff, or a reset with -no-reboot).
    pub fn is_guest_shutdown(&self) -> bool {
        self.event == "SHUTDOWN" && self.data.get("guest").and_then(|g| g.as_bool()) == Some(true)
    }

    /// What it means when this event says the VM cannot go on by itself:
    /// a paused VM must not wait out a boot or command timeout.
    pub fn fatal(&self) -> Option<String> {
        let field = |k: &str| self.data.get(k).and_then(Value::as_str).unwrap_or("?");
        match self.event.as_str() {
            "STOP" => Some(
                "the VM stopped (QMP STOP): QEMU paused the guest, which cannot go on by itself"
                    .into(),
            ),
            "BLOCK_IO_ERROR" => Some(format!(
                "disk I/O error on the host side (QMP BLOCK_IO_ERROR: device {:?}, node {:?}, \
                 operation {}, action {}{})",
                field("device"),
                field("node-name"),
                field("operation"),
                field("action"),
                match self.data.get("reason").and_then(Value::as_str) {
                    Some(r) => format!(", reason {r:?}"),
                    None if self.data.get("nospace").and_then(Value::as_bool) == Some(true) => {
                        ", no space left on the host".into()
                    }
                    None => String::new(),
                }
            )),
            "GUEST_PANICKED" => Some(format!(
                "guest panicked (QMP GUEST_PANICKED, action {})",
                field("action")
            )),
            _ => None,
        }
    }
}

/// Every event this connection saw, shared with whoever writes artifacts.
pub type EventLog = Arc<Mutex<Vec<QmpEvent>>>;

/// What the events so far say about the VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmState {
    /// The first event after which the VM cannot go on (see [`QmpEvent::fatal`]).
    pub fatal: Option<QmpEvent>,
    /// Whether the guest holds the agent's virtio-serial port open: set by
    /// `VSERPORT_CHANGE` for [`crate::qemu::AGENT_PORT_ID`], cleared by a reset.
    pub agent_port_open: bool,
    /// When the agent's port was last opened (host clock).
    pub agent_port_opened: Option<Instant>,
    /// How often the guest closed the agent's port (`VSERPORT_CHANGE`
    /// with open false): a request in flight when it rises has lost the
    /// agent that was to answer it (stopped, killed, the guest going down).
    pub agent_port_closes: u32,
    /// The reader saw the socket close.
    pub closed: bool,
    /// strata stopped the vCPUs itself ([`Qmp::stop`], to save the guest):
    /// the STOP that follows is no reason to give up; RESUME clears it.
    pub stopped_by_us: bool,
}

impl VmState {
    /// Folds one event in, in the order QEMU sent them.
    pub fn observe(&mut self, ev: &QmpEvent) {
        let ours = ev.event == "STOP" && self.stopped_by_us;
        if self.fatal.is_none() && !ours && ev.fatal().is_some() {
            self.fatal = Some(ev.clone());
        }
        match ev.event.as_str() {
            "RESUME" => self.stopped_by_us = false,
            "VSERPORT_CHANGE"
                if ev.data.get("id").and_then(Value::as_str)
                    == Some(crate::qemu::AGENT_PORT_ID) =>
            {
                let open = ev.data.get("open").and_then(Value::as_bool) == Some(true);
                if open && !self.agent_port_open {
                    self.agent_port_opened = Some(Instant::now());
                }
                if !open {
                    self.agent_port_closes += 1;
                }
                self.agent_port_open = open;
            }
            // A reset closes every virtio-serial port; the next boot's agent
            // opens it again.
            "RESET" => self.agent_port_open = false,
            _ => {}
        }
    }

    fn fatal_error(&self) -> Option<QmpError> {
        let ev = self.fatal.as_ref()?;
        Some(QmpError::Fatal {
            event: ev.event.clone(),
            detail: ev.fatal().unwrap_or_default(),
        })
    }
}

type Reply = Result<Value, String>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: mpsc::UnboundedReceiver<QmpEvent>,
    log: EventLog,
    /// Kept here too so the channel outlives the reader: a wait on it must
    /// not end just because QEMU closed the socket.
    _state_tx: Arc<watch::Sender<VmState>>,
    state: watch::Receiver<VmState>,
    reader: tokio::task::JoinHandle<()>,
    call_timeout: Duration,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects, retrying while QEMU has not created the socket yet.
    pub async fn connect(path: &Path, within: Duration, log: EventLog) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        };
        let call_timeout = Duration::from_secs(10);
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(call_timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting",
                seconds: call_timeout.as_secs_f64(),
            })?;
        match greeting {
            Ok(Some(line))
                if serde_json::from_str::<Value>(&line)
                    .map(|v| v.get("QMP").is_some())
                    .unwrap_or(false) => {}
            other => {
                return Err(QmpError::Command {
                    command: "greeting",
                    message: format!("expected a QMP greeting, got {other:?}"),
                })
            }
        }
        let pending = Pending::default();
        let (tx, events) = mpsc::unbounded_channel();
        let state_tx = Arc::new(watch::Sender::new(VmState::default()));
        let state = state_tx.subscribe();
        let reader = tokio::spawn(read_replies(
            lines,
            pending.clone(),
            tx,
            log.clone(),
            state_tx.clone(),
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            log,
            _state_tx: state_tx,
            state,
            reader,
            call_timeout,
        };
        qmp.call_raw("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Sends one command and waits for the reply with its id. On timeout
    /// the id is forgotten: the reader drops a late reply to it.
    async fn call_raw(&self, name: &'static str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending poisoned")
            .insert(id, tx);
        if self.state.borrow().closed {
            self.pending.lock().expect("pending poisoned").remove(&id);
            return Err(QmpError::Disconnected { command: name });
        }
        let line = json!({"execute": name, "arguments": arguments, "id": id}).to_string() + "\n";
        let exchange = async {
            self.writer
                .lock()
                .await
                .write_all(line.as_bytes())
                .await
                .map_err(|_| QmpError::Disconnected { command: name })?;
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(message)) => Err(QmpError::Command {
                    command: name,
                    message,
                }),
                Err(_) => Err(QmpError::Disconnected { command: name }),
            }
        };
        match tokio::time::timeout(self.call_timeout, exchange).await {
            Ok(r) => r,
            Err(_) => {
                self.pending.lock().expect("pending poisoned").remove(&id);
                Err(QmpError::Timeout {
                    command: name,
                    seconds: self.call_timeout.as_secs_f64(),
                })
            }
        }
    }

    async fn call<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::qmp::QmpCommand + qapi::Command,
    {
        let name = C::NAME;
        let arguments = serde_json::to_value(&command).map_err(|e| QmpError::Command {
            command: name,
            message: format!("encoding the arguments: {e}"),
        })?;
        let v = self.call_raw(name, arguments).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Command {
            command: name,
            message: format!("unexpected reply: {e}"),
        })
    }

    pub async fn cont(&self) -> Result<(), QmpError> {
        self.call(qapi::qmp::cont {}).await.map(|_| ())
    }

    /// (present, enabled)
    pub async fn query_kvm(&self) -> Result<(bool, bool), QmpError> {
        let info = self.call(qapi::qmp::query_kvm {}).await?;
        Ok((info.present, info.enabled))
    }

    pub async fn status(&self) -> Result<String, QmpError> {
        let info = self.call(qapi::qmp::query_status {}).await?;
        Ok(serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default())
    }

    /// From now on a guest reset makes QEMU exit (QMP `SHUTDOWN`, reason
    /// `guest-reset`) instead of restarting the guest: the reboot's last
    /// step is seen, and the next boot can be started differently. Set at
    /// run time (QEMU >= 6.0), not with `-action` on the command line, so
    /// that the boot before it keeps QEMU's usual reset handling (a guest
    /// that resets while booting is still seen looping).
    pub async fn exit_on_guest_reset(&self) -> Result<(), QmpError> {
        self.call_raw("set-action", json!({"reboot": "shutdown"}))
            .await
            .map(drop)
    }

    /// Stops the vCPUs (the guest does not notice beyond lost time).
    pub async fn stop(&self) -> Result<(), QmpError> {
        // Before the command: its STOP event may come before its reply.
        self._state_tx.send_modify(|s| s.stopped_by_us = true);
        self.call(qapi::qmp::stop {}).await.map(drop)
    }

    /// External snapshot of the disk node `node`: `file` (created, qcow2,
    /// backed by the node's current file) takes every write from now on
    /// as node `new_node`; the old file is frozen.
    pub async fn snapshot_disk(
        &self,
        node: &str,
        file: &Path,
        new_node: &str,
    ) -> Result<(), QmpError> {
        self.call(qapi::qmp::blockdev_snapshot_sync(
            qapi::qmp::BlockdevSnapshotSync {
                device: None,
                node_name: Some(node.to_owned()),
                snapshot_file: file.display().to_string(),
                snapshot_node_name: Some(new_node.to_owned()),
                format: Some("qcow2".into()),
                mode: Some(qapi::qmp::NewImageMode::absolute_paths),
            },
        ))
        .await
        .map(drop)
    }

    /// Writes the VM's state (RAM and devices, not the disk) to `file`;
    /// returns when it is complete. The VM should be stopped: then the
    /// state is one instant's.
    pub async fn migrate_to_file(&self, file: &Path, within: Duration) -> Result<(), QmpError> {
        // QEMU caps a migration at 128 MiB/s by default, a limit for
        // sharing a network; a file on this host takes what the disk gives.
        self.call_raw(
            "migrate-set-parameters",
            json!({"max-bandwidth": 64u64 << 30}),
        )
        .await?;
        self.call(qapi::qmp::migrate {
            uri: Some(format!("file:{}", file.display())),
            channels: None,
            detach: None,
            resume: None,
        })
        .await?;
        self.migration_done("migrate", within).await
    }

    /// Loads a state written by [`Qmp::migrate_to_file`] into a QEMU
    /// started with `-incoming defer` (and the same machine and devices);
    /// returns when it is loaded. The vCPUs stay stopped until `cont`.
    pub async fn migrate_from_file(&self, file: &Path, within: Duration) -> Result<(), QmpError> {
        self.call(qapi::qmp::migrate_incoming {
            uri: Some(format!("file:{}", file.display())),
            channels: None,
            exit_on_error: None,
        })
        .await?;
        self.migration_done("migrate-incoming", within).await
    }

    /// Stops a migration in progress (best effort: after a failed save).
    pub async fn migrate_cancel(&self) {
        let _ = self.call(qapi::qmp::migrate_cancel {}).await;
    }

    /// Polls `query-migrate` until the migration this side runs completed
    /// (Ok) or failed (its error).
    async fn migration_done(
        &self,
        command: &'static str,
        within: Duration,
    ) -> Result<(), QmpError> {
        use qapi::qmp::MigrationStatus as S;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let info = match self.call(qapi::qmp::query_migrate {}).await {
                Ok(info) => info,
                // Loading a state from a file may hold QEMU's main loop,
                // and with it QMP, for longer than one call's timeout.
                Err(QmpError::Timeout { .. }) if tokio::time::Instant::now() < deadline => continue,
                Err(e) => return Err(e),
            };
            match info.status {
                Some(S::completed) => return Ok(()),
                Some(S::failed) | Some(S::cancelled) => {
                    return Err(QmpError::Command {
                        command,
                        message: info
                            .error_desc
                            .unwrap_or_else(|| "the migration failed".into()),
                    })
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Timeout {
                        command,
                        seconds: within.as_secs_f64(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// QEMU exits at once: for the guest this is a power cut.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.call(qapi::qmp::quit {}).await {
            // QEMU may close the socket before its reply gets through.
            Err(QmpError::Disconnected { .. }) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    pub async fn screendump(&self, png: &Path) -> Result<(), QmpError> {
        self.call(qapi::qmp::screendump {
            filename: png.display().to_string(),
            format: Some(qapi::qmp::ImageFormat::png),
            device: None,
            head: None,
        })
        .await
        .map(|_| ())
    }

    /// Waits for the first event accepted by `want`; events seen on the way
    /// are consumed (they stay in the log). Ok(None) when `within` passed;
    /// an error at once when QEMU reports that the VM cannot go on.
    pub async fn wait_event(
        &mut self,
        within: Duration,
        want: impl Fn(&QmpEvent) -> bool,
    ) -> Result<Option<QmpEvent>, QmpError> {
        let deadline = tokio::time::Instant::now() + within;
        let fatal = self.fatal();
        tokio::pin!(fatal);
        loop {
            tokio::select! {
                biased;
                r = tokio::time::timeout_at(deadline, self.events.recv()) => match r {
                    Ok(Some(ev)) if want(&ev) => return Ok(Some(ev)),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return Ok(None),
                },
                e = &mut fatal => return Err(e),
            }
        }
    }

    /// Resolves when QEMU reports that the VM cannot go on (never otherwise).
    pub fn fatal(&self) -> impl std::future::Future<Output = QmpError> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            let fatal = match state.wait_for(|s| s.fatal.is_some()).await {
                Ok(s) => s.fatal_error(),
                // Unreachable while the Qmp lives (it holds the sender).
                Err(_) => None,
            };
            match fatal {
                Some(e) => e,
                None => std::future::pending().await,
            }
        }
    }

    /// The fatal event seen so far, if any, without waiting.
    pub fn fatal_now(&self) -> Option<QmpError> {
        self.state.borrow().fatal_error()
    }

    /// What the events so far say about the VM.
    pub fn state(&self) -> VmState {
        self.state.borrow().clone()
    }

    /// Resolves when the guest opens the agent's port (at once if it is open).
    pub fn agent_port_opened(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            if state.wait_for(|s| s.agent_port_open).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Events received since the last call, without waiting.
    pub fn drain_events(&mut self) -> Vec<QmpEvent> {
        let mut out = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            out.push(ev);
        }
        out
    }

    pub fn log(&self) -> EventLog {
        self.log.clone()
    }
}

async fn read_replies(
    mut lines: Lines<BufReader<OwnedReadHalf>>,
    pending: Pending,
    events: mpsc::UnboundedSender<QmpEvent>,
    log: EventLog,
    state: Arc<watch::Sender<VmState>>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::debug!(%line, "QMP: not JSON, ignored");
            continue;
        };
        if let Some(ev) = QmpEvent::from_json(&v) {
            tracing::debug!(event = %ev.event, data = %ev.data, "QMP event");
            log.lock().expect("event log poisoned").push(ev.clone());
            state.send_modify(|s| s.observe(&ev));
            let _ = events.send(ev);
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            tracing::debug!(%line, "QMP reply without an id, ignored");
            continue;
        };
        let Some(caller) = pending.lock().expect("pending poisoned").remove(&id) else {
            tracing::debug!(id, "late QMP reply to an abandoned call, dropped");
            continue;
        };
        let reply = match (v.get("return"), v.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(e
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("error without a description")
                .to_owned()),
            (None, None) => Err(format!("unexpected reply {line}")),
        };
        let _ = caller.send(reply);
    }
    // Closed first, then the waiting calls fail: a call starting in between
    // sees `closed` instead of waiting out its timeout.
    state.send_modify(|s| s.closed = true);
    pending.lock().expect("pending poisoned").clear();
}

/// Seconds since the epoch, on the same clock as QEMU's event timestamps.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, accepts qmp_capabilities, and before answering
    /// each later command sends events that qapi's generated types cannot
    /// parse (an event and a SHUTDOWN reason newer than its schema).
    async fn fake_qemu(listener: UnixListener) {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
            "package": ""}, "capabilities": ["oob"]}});
        w.write_all(format!("{greeting}\n").as_bytes())
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let req: Value = serde_json::from_str(&line).unwrap();
            let id = req.get("id").cloned();
            let reply = match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}}),
                "query-kvm" => {
                    for ev in [
                        json!({"event": "FROM_THE_FUTURE", "data": {"x": [1, 2]},
                               "timestamp": {"seconds": 100, "microseconds": 500000}}),
                        json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "some-new-reason"},
                               "timestamp": {"seconds": 101, "microseconds": 0}}),
                    ] {
                        w.write_all(format!("{ev}\n").as_bytes()).await.unwrap();
                    }
                    json!({"return": {"enabled": false, "present": true}})
                }
                "query-status" => {
                    // Never answered: the caller's timeout must fire.
                    continue;
                }
                other => panic!("unexpected {other}"),
            };
            let mut reply = reply;
            if let Some(id) = id {
                reply["id"] = id;
            }
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn unknown_events_are_logged_and_do_not_break_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_qemu(listener));
        let log = EventLog::default();
        let mut qmp = Qmp::connect(&path, Duration::from_secs(2), log.clone())
            .await
            .unwrap();
        assert_eq!(qmp.query_kvm().await.unwrap(), (true, false));
        let shutdown = qmp
            .wait_event(Duration::from_secs(2), QmpEvent::is_guest_shutdown)
            .await
            .unwrap()
            .expect("SHUTDOWN delivered");
        assert_eq!(shutdown.data["reason"], "some-new-reason");
        let logged: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.event.clone())
            .collect();
        assert_eq!(logged, ["FROM_THE_FUTURE", "SHUTDOWN"]);
        assert_eq!(log.lock().unwrap()[0].timestamp, 100.5);

        qmp.call_timeout = Duration::from_millis(200);
        let err = qmp.status().await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    }

    /// What the scriptable fake QEMU does when it receives a command.
    enum Act {
        /// Send this event now.
        Event(Value),
        /// Answer the command after this long (from a separate task, so
        /// later commands are read and answered meanwhile).
        ReplyAfter(Duration, Value),
    }

    /// A fake QEMU that greets, accepts qmp_capabilities and then does what
    /// `script` says for each command (by name). Replies carry the id.
    async fn scripted_qemu(
        listener: UnixListener,
        script: impl Fn(&str) -> Vec<Act> + Send + 'static,
    ) {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, w) = sock.into_split();
        let w = Arc::new(tokio::sync::Mutex::new(w));
        let mut lines = BufReader::new(r).lines();
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}});
        w.lock()
            .await
            .write_all(format!("{greeting}\n").as_bytes())
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let req: Value = serde_json::from_str(&line).unwrap();
            let name = req["execute"].as_str().unwrap().to_owned();
            let acts = if name == "qmp_capabilities" {
                vec![Act::ReplyAfter(Duration::ZERO, json!({"return": {}}))]
            } else {
                script(&name)
            };
            for act in acts {
                match act {
                    Act::Event(ev) => {
                        let mut w = w.lock().await;
                        w.write_all(format!("{ev}\n").as_bytes()).await.unwrap();
                    }
                    Act::ReplyAfter(delay, mut reply) => {
                        reply["id"] = req["id"].clone();
                        let w = w.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let mut w = w.lock().await;
                            let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                        });
                    }
                }
            }
        }
    }

    async fn connect_to(
        script: impl Fn(&str) -> Vec<Act> + Send + 'static,
    ) -> (Qmp, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(scripted_qemu(listener, script));
        let qmp = Qmp::connect(&path, Duration::from_secs(2), EventLog::default())
            .await
            .unwrap();
        (qmp, dir)
    }

    fn event(name: &str, data: Value) -> Value {
        json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}})
    }

    #[tokio::test]
    async fn a_reply_later_than_the_call_timeout_does_not_poison_the_connection() {
        let (mut qmp, _dir) = connect_to(|name| match name {
            // Answered, but only after the caller gave up.
            "query-status" => vec![Act::ReplyAfter(
                Duration::from_millis(400),
                json!({"return": {"status": "running", "running": true, "singlestep": false}}),
            )],
            "query-kvm" => vec![Act::ReplyAfter(
                Duration::from_millis(600),
                json!({"return": {"enabled": true, "present": true}}),
            )],
            other => panic!("unexpected {other}"),
        })
        .await;
        qmp.call_timeout = Duration::from_millis(150);
        let err = qmp.status().await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        // The late query-status reply arrives while this call waits; it must
        // be dropped, not taken as this call's answer (or kill the reader).
        qmp.call_timeout = Duration::from_secs(3);
        let started = Instant::now();
        assert_eq!(qmp.query_kvm().await.unwrap(), (true, true));
        assert!(started.elapsed() < Duration::from_secs(2));
        // And the connection still serves the next call.
        qmp.call_timeout = Duration::from_secs(3);
        assert_eq!(qmp.status().await.unwrap(), "running");
    }

    #[tokio::test]
    async fn stop_block_io_error_and_guest_panicked_end_a_wait_at_once() {
        for (name, data, needle) in [
            ("STOP", json!({}), "QMP STOP"),
            (
                "BLOCK_IO_ERROR",
                json!({"device": "", "node-name": "disk0", "operation": "write",
                       "action": "stop", "nospace": true, "reason": "No space left on device"}),
                "QMP BLOCK_IO_ERROR",
            ),
            (
                "GUEST_PANICKED",
                json!({"action": "pause"}),
                "QMP GUEST_PANICKED",
            ),
        ] {
            let ev = event(name, data);
            let (mut qmp, _dir) = connect_to(move |cmd| match cmd {
                "cont" => vec![
                    Act::Event(ev.clone()),
                    Act::ReplyAfter(Duration::ZERO, json!({"return": {}})),
                ],
                other => panic!("unexpected {other}"),
            })
            .await;
            qmp.cont().await.unwrap();
            // A boot's wait for a RESET, and any command wait, end at once.
            let started = Instant::now();
            let err = qmp
                .wait_event(Duration::from_secs(30), |e| e.event == "RESET")
                .await
                .unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2), "{name}");
            assert!(
                matches!(&err, QmpError::Fatal { event, .. } if event == name),
                "{err}"
            );
            assert!(err.to_string().contains(needle), "{err}");
            let never = std::future::pending::<Result<(), QmpError>>();
            let err = crate::machine::unless_stopped(&qmp, never)
                .await
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            assert!(qmp.fatal_now().is_some());
        }
    }

    #[test]
    fn only_a_stop_strata_asked_for_is_not_fatal() {
        let mut s = VmState {
            stopped_by_us: true,
            ..VmState::default()
        };
        let ev = |name| QmpEvent::from_json(&event(name, json!({}))).unwrap();
        s.observe(&ev("STOP"));
        assert!(s.fatal.is_none(), "the save's own stop");
        s.observe(&ev("RESUME"));
        assert!(!s.stopped_by_us);
        s.observe(&ev("STOP"));
        assert!(s.fatal.is_some(), "a stop after the resume is QEMU's");
    }

    #[tokio::test]
    async fn qemu_is_told_to_exit_at_the_guests_reset_or_says_why_not() {
        let (qmp, _dir) = connect_to(|name| match name {
            "set-action" => vec![Act::ReplyAfter(Duration::ZERO, json!({"return": {}}))],
            other => panic!("unexpected {other}"),
        })
        .await;
        qmp.exit_on_guest_reset().await.unwrap();
        // A QEMU older than 6.0 has no set-action: an error to fall back on.
        let (qmp, _dir) = connect_to(|name| match name {
            "set-action" => vec![Act::ReplyAfter(
                Duration::ZERO,
                json!({"error": {"class": "CommandNotFound",
                                 "desc": "The command set-action has not been found"}}),
            )],
            other => panic!("unexpected {other}"),
        })
        .await;
        let err = qmp.exit_on_guest_reset().await.unwrap_err();
        assert!(err.to_string().contains("set-action"), "{err}");
    }

    #[tokio::test]
    async fn the_agent_port_is_seen_opening_and_a_reset_closes_it() {
        let port = crate::qemu::AGENT_PORT_ID;
        let (qmp, _dir) = connect_to(move |cmd| match cmd {
            "cont" => vec![
                Act::Event(event(
                    "VSERPORT_CHANGE",
                    json!({"id": "other", "open": true}),
                )),
                Act::ReplyAfter(Duration::ZERO, json!({"return": {}})),
            ],
            "query-status" => vec![
                Act::Event(event("VSERPORT_CHANGE", json!({"id": port, "open": true}))),
                Act::ReplyAfter(
                    Duration::ZERO,
                    json!({"return": {"status": "running", "running": true}}),
                ),
            ],
            "query-kvm" => vec![
                Act::Event(event(
                    "RESET",
                    json!({"guest": true, "reason": "guest-reset"}),
                )),
                Act::ReplyAfter(
                    Duration::ZERO,
                    json!({"return": {"enabled": false, "present": false}}),
                ),
            ],
            other => panic!("unexpected {other}"),
        })
        .await;
        qmp.cont().await.unwrap();
        assert!(
            !qmp.state().agent_port_open,
            "another port opening is not the agent"
        );
        let opened = qmp.agent_port_opened();
        qmp.status().await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), opened)
            .await
            .expect("the port opening ends the wait");
        assert!(qmp.state().agent_port_open);
        qmp.query_kvm().await.unwrap();
        assert!(!qmp.state().agent_port_open, "a reset closes the port");
    }
}
