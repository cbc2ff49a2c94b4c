//! Picking the accelerator. KVM is first-class where it works, but a
//! /dev/kvm that opens is no proof: on some hosts the guest hangs in the
//! kernel's real-mode setup ("Probing EDD") while QMP happily reports KVM
//! enabled. `auto` therefore demands kernel console output within a short
//! probe window and otherwise falls back to TCG, recording why.

use crate::machine::{Machine, MachineError};
use crate::qemu::{Accel, QemuCommand};
use crate::qmp::EventLog;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccelDecision {
    pub requested: AccelChoice,
    pub used: Accel,
    pub reason: String,
    /// Time spent finding out (the KVM attempt when it was abandoned).
    pub probe_seconds: f64,
}

/// Can this process open /dev/kvm read-write? (The cheap first test.)
pub fn kvm_device() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// How long a KVM guest may stay silent on the console before KVM is
/// declared unusable. Under working KVM the kernel prints within ~2 s of
/// power-on, extlinux menu included.
pub const KVM_PROBE: Duration = Duration::from_secs(6);

/// Starts the first machine on the accelerator that works. `fresh_disk` is
/// called before a fallback start so the TCG boot sees an untouched overlay.
pub async fn start(
    choice: AccelChoice,
    template: &QemuCommand,
    events: EventLog,
    fresh_disk: &dyn Fn() -> Result<(), String>,
) -> Result<(Machine, AccelDecision), MachineError> {
    let t0 = Instant::now();
    let with = |accel| QemuCommand {
        accel,
        ..template.clone()
    };
    if choice == AccelChoice::Tcg {
        let m = Machine::start(with(Accel::Tcg), events).await?;
        return Ok((
            m,
            AccelDecision {
                requested: choice,
                used: Accel::Tcg,
                reason: "requested with --accel tcg".into(),
                probe_seconds: 0.0,
            },
        ));
    }
    let why_not = match kvm_device() {
        Err(e) => e,
        Ok(()) => match probe_kvm(with(Accel::Kvm), events.clone()).await {
            Ok((m, reason)) => {
                return Ok((
                    m,
                    AccelDecision {
                        requested: choice,
                        used: Accel::Kvm,
                        reason,
                        probe_seconds: t0.elapsed().as_secs_f64(),
                    },
                ))
            }
            // The image's own failure would repeat under TCG: report it as is.
            Err(ProbeFailure::Guest(e)) => return Err(e),
            Err(ProbeFailure::Kvm(why)) => why,
        },
    };
    if choice == AccelChoice::Kvm {
        return Err(MachineError::NoKvm(why_not));
    }
    fresh_disk().map_err(MachineError::Setup)?;
    note_in_serial_log(&template.serial_log, &why_not);
    let probe_seconds = t0.elapsed().as_secs_f64();
    let m = Machine::start(with(Accel::Tcg), events).await?;
    Ok((
        m,
        AccelDecision {
            requested: choice,
            used: Accel::Tcg,
            reason: format!("KVM unusable, fell back to TCG: {why_not}"),
            probe_seconds,
        },
    ))
}

enum ProbeFailure {
    Kvm(String),
    Guest(MachineError),
}

async fn probe_kvm(cmd: QemuCommand, events: EventLog) -> Result<(Machine, String), ProbeFailure> {
    let t0 = Instant::now();
    let mut m = match Machine::start(cmd, events).await {
        Ok(m) => m,
        Err(e) => {
            return Err(ProbeFailure::Kvm(format!(
                "QEMU with KVM did not start: {e}"
            )))
        }
    };
    match m.qmp().query_kvm().await {
        Ok((_, true)) => {}
        Ok((present, false)) => {
            m.kill().await;
            return Err(ProbeFailure::Kvm(format!(
                "QMP query-kvm: present={present}, enabled=false"
            )));
        }
        Err(e) => {
            m.kill().await;
            return Err(ProbeFailure::Kvm(format!("QMP query-kvm: {e}")));
        }
    }
    match m.wait_for_kernel(KVM_PROBE).await {
        Ok(_) => Ok((
            m,
            format!(
                "QMP query-kvm: enabled; kernel console output after {:.1} s",
                t0.elapsed().as_secs_f64()
            ),
        )),
        Err(MachineError::Timeout { .. }) => {
            m.kill().await;
            Err(ProbeFailure::Kvm(format!(
                "QMP query-kvm reports KVM enabled, but the guest printed no kernel \
                 console output within {} s (a stuck vCPU, e.g. hung at \"Probing EDD\")",
                KVM_PROBE.as_secs()
            )))
        }
        Err(e @ MachineError::Exited { .. }) => Err(ProbeFailure::Kvm(format!(
            "QEMU with KVM exited during boot: {e}"
        ))),
        Err(e) => {
            m.kill().await;
            Err(ProbeFailure::Guest(e))
        }
    }
}

/// The serial log is an artifact people read: mark where the abandoned KVM
/// attempt ends and the TCG boot begins.
fn note_in_serial_log(path: &std::path::Path, why: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = writeln!(
            f,
            "\n==== strata: KVM attempt abandoned ({why}); restarting under TCG ===="
        );
    }
}
