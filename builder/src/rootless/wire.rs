//! What the outer `strata build` and its worker in the user namespace say
//! to each other: one JSON request on the worker's stdin, then JSON lines
//! on its stdout (progress events, and last the result or the error).

use crate::build::BuildOptions;
use crate::error::{BuildError, FailureKind};
use crate::manifest::Manifest;
use crate::progress::{Event, Step};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// What the worker builds, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The user's options; `rootfs` is the directory or archive they named.
    pub build: BuildOptions,
    pub rootfs_kind: RootfsKind,
    /// The partial image file (created and owned by the outer process).
    pub image: PathBuf,
    /// The staging directory (created empty by the outer process; the
    /// worker empties it again: its files belong to mapped ids).
    pub staging: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsKind {
    Dir,
    Tar,
}

/// A device node the user namespace could not create (mknod is refused
/// there): made by the appliance, with its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Image-relative (`systems/<label>/orig/dev/null`).
    pub path: String,
    pub block: bool,
    /// Permission bits (incl. setuid/setgid/sticky).
    pub mode: u32,
    pub major: u32,
    pub minor: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch, when known (an archive listing lacks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
}

/// What only a mounted btrfs can do, left for the appliance, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    pub devices: Vec<DeviceNode>,
    /// (from, to): writable snapshots, image-relative.
    pub snapshots: Vec<(String, String)>,
    pub bootloader: bool,
}

/// One line of the worker's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    StepStarted { step: String },
    StepFinished { step: String, seconds: f64 },
    CopyProgress { done: u64, total: u64 },
    Note { text: String },
    Done { manifest: Box<Manifest>, work: Work },
    Failed(WireError),
}

/// A `BuildError` across the pipe: its kind, step and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: WireKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub what: String,
    #[serde(default)]
    pub cause: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireKind {
    Input,
    Step,
    Interrupted,
}

impl From<&Event> for Message {
    fn from(e: &Event) -> Message {
        match e {
            Event::StepStarted(s) => Message::StepStarted {
                step: s.name().into(),
            },
            Event::StepFinished(s, d) => Message::StepFinished {
                step: s.name().into(),
                seconds: d.as_secs_f64(),
            },
            Event::CopyProgress { done, total } => Message::CopyProgress {
                done: *done,
                total: *total,
            },
            Event::Note(t) => Message::Note { text: t.clone() },
        }
    }
}

impl Message {
    /// The progress event this line carries, if it is one.
    pub fn event(&self) -> Option<Event> {
        let step = |s: &str| Step::from_name(s);
        match self {
            Message::StepStarted { step: s } => step(s).map(Event::StepStarted),
            Message::StepFinished { step: s, seconds } => {
                step(s).map(|s| Event::StepFinished(s, Duration::from_secs_f64(seconds.max(0.0))))
            }
            Message::CopyProgress { done, total } => Some(Event::CopyProgress {
                done: *done,
                total: *total,
            }),
            Message::Note { text } => Some(Event::Note(text.clone())),
            Message::Done { .. } | Message::Failed(_) => None,
        }
    }
}

impl From<&BuildError> for WireError {
    fn from(e: &BuildError) -> WireError {
        match e {
            BuildError::Input(m) => WireError {
                kind: WireKind::Input,
                step: None,
                what: m.clone(),
                cause: String::new(),
            },
            BuildError::Step { step, what, cause } => WireError {
                kind: WireKind::Step,
                step: Some(step.name().into()),
                what: what.clone(),
                cause: cause.to_string(),
            },
            BuildError::Interrupted => WireError {
                kind: WireKind::Interrupted,
                step: None,
                what: String::new(),
                cause: String::new(),
            },
        }
    }
}

impl WireError {
    /// Back into the error the CLI maps to an exit code
    /// (`FailureKind` via `Failure for BuildError`).
    pub fn into_build_error(self) -> BuildError {
        match self.kind {
            WireKind::Input => BuildError::Input(self.what),
            WireKind::Interrupted => BuildError::Interrupted,
            WireKind::Step => BuildError::Step {
                // An unknown name (a newer worker?) still fails the build;
                // the appliance is the outer process's own step.
                step: self
                    .step
                    .as_deref()
                    .and_then(Step::from_name)
                    .unwrap_or(Step::Finish),
                what: self.what,
                cause: self.cause.into(),
            },
        }
    }

    pub fn kind(&self) -> FailureKind {
        match self.kind {
            WireKind::Input => FailureKind::Input,
            WireKind::Step => FailureKind::Failed,
            WireKind::Interrupted => FailureKind::Interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Failure;

    #[test]
    fn events_round_trip_through_json_lines() {
        for e in [
            Event::StepStarted(Step::ExtractRootfs),
            Event::StepFinished(Step::Mkfs, Duration::from_millis(1500)),
            Event::CopyProgress {
                done: 64,
                total: 900,
            },
            Event::Note("a \"note\"\nwith a newline".into()),
        ] {
            let line = serde_json::to_string(&Message::from(&e)).unwrap();
            assert!(!line.contains('\n'), "{line}");
            let back: Message = serde_json::from_str(&line).unwrap();
            assert_eq!(format!("{:?}", back.event().unwrap()), format!("{e:?}"));
        }
        let line = serde_json::to_string(&Message::StepStarted {
            step: "mkfs".into(),
        })
        .unwrap();
        assert_eq!(line, r#"{"type":"step-started","step":"mkfs"}"#);
    }

    #[test]
    fn errors_keep_their_kind_step_and_message() {
        let cases = [
            BuildError::Input("rootfs /x has no etc/ directory".into()),
            BuildError::Step {
                step: Step::Mkfs,
                what: "making the btrfs filesystem".into(),
                cause: "mkfs.btrfs failed (exit status: 1): no space".into(),
            },
            BuildError::Interrupted,
        ];
        for e in cases {
            let wire = WireError::from(&e);
            let line = serde_json::to_string(&Message::Failed(wire.clone())).unwrap();
            let Message::Failed(back) = serde_json::from_str(&line).unwrap() else {
                panic!("{line}")
            };
            assert_eq!(back.kind(), e.kind());
            let again = back.into_build_error();
            assert_eq!(again.to_string(), e.to_string());
            assert_eq!(again.step(), e.step());
            assert_eq!(again.kind(), e.kind());
        }
    }
}
