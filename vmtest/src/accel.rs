//! Picking the accelerator. KVM is first-class where it works, but a
//! /dev/kvm that opens is no proof: on some hosts QEMU aborts setting up
//! the vCPU (`-cpu host`: "failed to set MSR 0x10a") or the vCPU hangs
//! (the firmware stalls; a kernel would stop at "Probing EDD") while QMP
//! happily reports KVM enabled. `auto` therefore first runs a probe that
//! needs nothing from the image: QEMU under KVM with the run's CPU model,
//! no disk, and SeaBIOS printing to the debug console (isa-debugcon, port
//! 0x402). Firmware that reaches its boot phase proves the vCPU runs;
//! anything else falls back to TCG, recording why.

use crate::machine::{Machine, MachineError};
use crate::qemu::{Accel, QemuCommand};
use crate::qmp::EventLog;
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
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

/// How long the firmware may take to reach its boot phase under KVM. With
/// a working KVM SeaBIOS gets there in well under a second (nested
/// virtualisation included); a stuck vCPU never does.
pub const KVM_PROBE: Duration = Duration::from_secs(5);

/// What SeaBIOS prints on the debug console once its power-on self test is
/// done and it looks for something to boot: the vCPU really runs.
const FIRMWARE_BOOT_PHASE: &[&str] = &["Booting from ", "No bootable device", "Boot failed"];

/// The probe's QEMU: the run's CPU model under KVM, no disk, no display,
/// SeaBIOS's debug output to `log`.
pub fn probe_args(log: &Path) -> Vec<OsString> {
    [
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "pc,accel=kvm",
        "-cpu",
        Accel::Kvm.cpu_model(),
        "-m",
        "64",
        "-display",
        "none",
        "-serial",
        "none",
        "-chardev",
        &format!(
            "file,id=dbg,path={}",
            log.display().to_string().replace(',', ",,")
        ),
        "-device",
        "isa-debugcon,iobase=0x402,chardev=dbg",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// What the probe saw so far, and what it means.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeVerdict {
    /// KVM works: why we think so.
    Usable(String),
    /// KVM does not work here: why.
    Unusable(String),
    /// Not known yet: keep watching.
    Undecided,
}

/// Judges the probe: `debugcon` is what the firmware printed, `exited` the
/// QEMU exit (status and stderr) if it ended, `elapsed` the time since it
/// started; after `window` silence is a verdict.
pub fn judge_probe(
    debugcon: &str,
    exited: Option<(&str, &str)>,
    elapsed: Duration,
    window: Duration,
) -> ProbeVerdict {
    if FIRMWARE_BOOT_PHASE.iter().any(|m| debugcon.contains(m)) {
        return ProbeVerdict::Usable(format!(
            "firmware ran under KVM with -cpu {} (SeaBIOS reached its boot phase after {:.1} s)",
            Accel::Kvm.cpu_model(),
            elapsed.as_secs_f64()
        ));
    }
    if let Some((status, stderr)) = exited {
        let said = stderr
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no message");
        return ProbeVerdict::Unusable(format!(
            "QEMU with KVM and -cpu {} exited at once ({status}): {said}",
            Accel::Kvm.cpu_model()
        ));
    }
    if elapsed < window {
        return ProbeVerdict::Undecided;
    }
    let last = debugcon
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(|l| format!(", last line {l:?}"))
        .unwrap_or_default();
    ProbeVerdict::Unusable(format!(
        "QEMU started under KVM, but its firmware did not reach its boot phase within {} s \
         (a vCPU that cannot run; SeaBIOS printed {} bytes{last})",
        window.as_secs(),
        debugcon.len()
    ))
}

/// Runs the probe: QEMU (tied to us like every QEMU) until the verdict,
/// then killed. `log` is a scratch file in the run's work dir.
pub async fn probe_kvm(binary: &Path, log: &Path) -> Result<String, String> {
    let _ = std::fs::remove_file(log);
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(probe_args(log))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    crate::qemu::tie_to_us(&mut cmd);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {} for the KVM probe: {e}", binary.display()))?;
    loop {
        let exited = match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        };
        let stderr = match &exited {
            Some(_) => match child.stderr.take() {
                Some(mut pipe) => {
                    use tokio::io::AsyncReadExt;
                    let mut text = String::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        pipe.read_to_string(&mut text),
                    )
                    .await;
                    text
                }
                None => String::new(),
            },
            None => String::new(),
        };
        let debugcon =
            String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        let verdict = judge_probe(
            &debugcon,
            exited.as_deref().map(|s| (s, stderr.as_str())),
            t0.elapsed(),
            KVM_PROBE,
        );
        match verdict {
            ProbeVerdict::Undecided => tokio::time::sleep(Duration::from_millis(20)).await,
            done => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return match done {
                    ProbeVerdict::Usable(why) => Ok(why),
                    ProbeVerdict::Unusable(why) => Err(why),
                    ProbeVerdict::Undecided => unreachable!(),
                };
            }
        }
    }
}

/// Where the probe's firmware output goes: next to QEMU's sockets, in the
/// run's work dir.
fn probe_log(template: &QemuCommand) -> PathBuf {
    template.qmp_socket.with_file_name("kvm-probe-debugcon.log")
}

/// Starts the first machine on the accelerator that works. `fresh_disk` is
/// called before a fallback start when a KVM QEMU ran on the overlay, so
/// the TCG boot sees an untouched one.
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
    // Only a KVM QEMU started on the overlay (the probe passed, the real
    // start did not) leaves something to undo before the TCG boot.
    let mut started_on_disk = false;
    let why_not = match kvm_device() {
        Err(e) => e,
        Ok(()) => match probe_kvm(&template.binary, &probe_log(template)).await {
            Err(why) => why,
            Ok(how) => {
                let probe_seconds = t0.elapsed().as_secs_f64();
                match Machine::start(with(Accel::Kvm), events.clone()).await {
                    Ok(m) => {
                        return Ok((
                            m,
                            AccelDecision {
                                requested: choice,
                                used: Accel::Kvm,
                                reason: format!("KVM probe: {how}"),
                                probe_seconds,
                            },
                        ))
                    }
                    Err(e) => {
                        started_on_disk = true;
                        format!(
                            "the KVM probe passed ({how}), but QEMU with KVM did not start: {e}"
                        )
                    }
                }
            }
        },
    };
    if choice == AccelChoice::Kvm {
        return Err(MachineError::NoKvm(why_not));
    }
    if started_on_disk {
        fresh_disk().map_err(MachineError::Setup)?;
        note_in_serial_log(&template.serial_log, &why_not);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const SEABIOS_START: &str = "SeaBIOS (version 1.16.3-debian-1.16.3-2~bpo12+1)\n\
        Running on KVM\nFound QEMU fw_cfg\nRelocating init from 0x000d7d20 to 0x03fa8b40 (size 86976)\n";

    #[test]
    fn firmware_reaching_its_boot_phase_proves_kvm_runs() {
        let log = format!("{SEABIOS_START}enter handle_19:\n  NULL\nBooting from Hard Disk...\n");
        let v = judge_probe(&log, None, Duration::from_millis(300), KVM_PROBE);
        assert!(
            matches!(&v, ProbeVerdict::Usable(why) if why.contains("-cpu host") && why.contains("0.3 s")),
            "{v:?}"
        );
    }

    #[test]
    fn kvm_that_aborts_or_stalls_is_unusable_whatever_the_image() {
        // This machine: -cpu host aborts at once.
        let v = judge_probe(
            "",
            Some((
                "signal: 6 (SIGABRT) (core dumped)",
                "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069\nqemu-system-x86_64: ../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion failed.\n",
            )),
            Duration::from_millis(120),
            KVM_PROBE,
        );
        assert_eq!(
            v,
            ProbeVerdict::Unusable(
                "QEMU with KVM and -cpu host exited at once (signal: 6 (SIGABRT) (core dumped)): \
                 qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069"
                    .into()
            )
        );
        // This machine with the default CPU: SeaBIOS stalls after relocating.
        assert_eq!(
            judge_probe(SEABIOS_START, None, Duration::from_secs(1), KVM_PROBE),
            ProbeVerdict::Undecided
        );
        let v = judge_probe(SEABIOS_START, None, KVM_PROBE, KVM_PROBE);
        assert!(
            matches!(&v, ProbeVerdict::Unusable(why) if why.contains("did not reach its boot phase within 5 s")
                && why.contains("Relocating init")),
            "{v:?}"
        );
        // Nothing at all (no debug console output) is no proof either.
        assert!(matches!(
            judge_probe("", None, KVM_PROBE, KVM_PROBE),
            ProbeVerdict::Unusable(_)
        ));
    }

    #[test]
    fn the_probe_needs_no_image_and_uses_the_runs_cpu_model() {
        let args: Vec<String> = probe_args(Path::new("/tmp/w/probe.log"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "-nodefaults -no-user-config -machine pc,accel=kvm -cpu host -m 64 -display none \
             -serial none -chardev file,id=dbg,path=/tmp/w/probe.log \
             -device isa-debugcon,iobase=0x402,chardev=dbg"
        );
    }

    /// Measures the probe on this host (not a verdict on the code: run by
    /// hand with --ignored to see what `auto` decides here and how fast).
    #[tokio::test]
    #[ignore]
    async fn probe_on_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let r = probe_kvm(
            Path::new("qemu-system-x86_64"),
            &dir.path().join("probe.log"),
        )
        .await;
        eprintln!("{:.2} s: {r:?}", t.elapsed().as_secs_f64());
    }
}
