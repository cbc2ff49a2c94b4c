//! QMP over the `qapi` crate, with the events read by us.
//!
//! `qapi`'s stream parses every line into its generated `Event` enum, so an
//! event or enum value newer than the crate's schema kills the stream, and
//! `spawn_tokio` throws events away. A pump task therefore reads the socket
//! line by line, keeps events for itself (raw JSON, whatever their shape) and
//! hands only greetings and responses to `qapi` through an in-memory pipe.

use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

type Service = qapi::futures::QapiService<qapi::futures::QmpStreamTokio<WriteHalf<UnixStream>>>;

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
}

/// Every event this connection saw, shared with whoever writes artifacts.
pub type EventLog = Arc<Mutex<Vec<QmpEvent>>>;

pub struct Qmp {
    service: Service,
    events: mpsc::UnboundedReceiver<QmpEvent>,
    log: EventLog,
    pump: tokio::task::JoinHandle<()>,
    driver: tokio::task::JoinHandle<()>,
    call_timeout: Duration,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.pump.abort();
        self.driver.abort();
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
        let (read, write) = tokio::io::split(stream);
        let (to_qapi, from_pump) = tokio::io::duplex(1 << 20);
        let (tx, events) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump_lines(read, to_qapi, tx, log.clone()));
        let call_timeout = Duration::from_secs(10);
        let negotiation = tokio::time::timeout(
            call_timeout,
            qapi::futures::QmpStreamTokio::open_split(from_pump, write),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            command: "greeting",
            seconds: call_timeout.as_secs_f64(),
        })?
        .map_err(|e| QmpError::Command {
            command: "greeting",
            message: e.to_string(),
        })?;
        let stream = tokio::time::timeout(call_timeout, negotiation.negotiate())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "qmp_capabilities",
                seconds: call_timeout.as_secs_f64(),
            })?
            .map_err(|e| QmpError::Command {
                command: "qmp_capabilities",
                message: e.to_string(),
            })?;
        let (service, qapi_events) = stream.into_parts();
        // Dropping the service must end the driver task, not leave it waiting.
        let _ = qapi_events.release();
        let driver = tokio::spawn(async move {
            use futures::StreamExt;
            let mut qapi_events = qapi_events;
            // Responses are routed inside poll; events never reach it (the pump
            // filtered them), so this only ends when the socket closes.
            while let Some(item) = qapi_events.next().await {
                if item.is_err() {
                    break;
                }
            }
        });
        Ok(Qmp {
            service,
            events,
            log,
            pump,
            driver,
            call_timeout,
        })
    }

    async fn call<C>(&self, name: &'static str, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::qmp::QmpCommand + qapi::Command,
    {
        match tokio::time::timeout(self.call_timeout, self.service.execute(command)).await {
            Err(_) => Err(QmpError::Timeout {
                command: name,
                seconds: self.call_timeout.as_secs_f64(),
            }),
            Ok(Err(e)) => Err(QmpError::Command {
                command: name,
                message: e.to_string(),
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    pub async fn cont(&self) -> Result<(), QmpError> {
        self.call("cont", qapi::qmp::cont {}).await.map(|_| ())
    }

    /// (present, enabled)
    pub async fn query_kvm(&self) -> Result<(bool, bool), QmpError> {
        let info = self.call("query-kvm", qapi::qmp::query_kvm {}).await?;
        Ok((info.present, info.enabled))
    }

    pub async fn status(&self) -> Result<String, QmpError> {
        let info = self
            .call("query-status", qapi::qmp::query_status {})
            .await?;
        Ok(serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default())
    }

    /// QEMU exits at once: for the guest this is a power cut.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.call("quit", qapi::qmp::quit {}).await {
            // QEMU may close the socket before its reply gets through.
            Err(QmpError::Command { message, .. })
                if message.contains("disconnected") || message.contains("EOF") =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    pub async fn screendump(&self, png: &Path) -> Result<(), QmpError> {
        self.call(
            "screendump",
            qapi::qmp::screendump {
                filename: png.display().to_string(),
                format: Some(qapi::qmp::ImageFormat::png),
                device: None,
                head: None,
            },
        )
        .await
        .map(|_| ())
    }

    /// Waits for the first event accepted by `want`; events seen on the way
    /// are consumed (they stay in the log).
    pub async fn wait_event(
        &mut self,
        within: Duration,
        want: impl Fn(&QmpEvent) -> bool,
    ) -> Option<QmpEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if want(&ev) => return Some(ev),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
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

async fn pump_lines(
    read: tokio::io::ReadHalf<UnixStream>,
    mut to_qapi: DuplexStream,
    events: mpsc::UnboundedSender<QmpEvent>,
    log: EventLog,
) {
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parsed: Option<serde_json::Value> = serde_json::from_str(&line).ok();
        if let Some(ev) = parsed.as_ref().and_then(QmpEvent::from_json) {
            tracing::debug!(event = %ev.event, data = %ev.data, "QMP event");
            log.lock().expect("event log poisoned").push(ev.clone());
            let _ = events.send(ev);
            continue;
        }
        if to_qapi.write_all(line.as_bytes()).await.is_err()
            || to_qapi.write_all(b"\n").await.is_err()
        {
            break;
        }
    }
    // Dropping `to_qapi` gives qapi an EOF, failing any pending call at once.
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
}
