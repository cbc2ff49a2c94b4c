//! Picking the accelerator. KVM is first-class where it works, but a
//! /dev/kvm that opens is no proof: on some hosts QEMU aborts setting up
//! the vCPU (`-cpu host`: "failed to set MSR 0x10a") or the vCPU hangs
//! (the firmware stalls; a kernel would stop at "Probing EDD") while QMP
//! happily reports KVM enabled. `auto` therefore first runs a probe that
//! needs nothing from the image: QEMU under KVM with the run's CPU model,
//! no disk, and SeaBIOS printing to the debug console (isa-debugcon, port
//! 0x402). Firmware that reaches its boot phase proves the vCPU runs;
//! anything else falls back to TCG, recording why.

pub mod cache;

use crate::machine::{Machine, MachineError};
use crate::qemu::{Accel, QemuCommand};
use crate::qmp::EventLog;
use cache::{CacheUse, CachedVerdict, HostKey, KvmCache, Lookup};
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
    /// How the host's cached KVM verdict took part (`auto` only).
    pub cache: Option<CacheUse>,
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
    let mut a: Vec<OsString> = [
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
    ]
    .iter()
    .map(OsString::from)
    .collect();
    a.extend(crate::qemu::debugcon_args(log));
    a
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
/// the TCG boot sees an untouched one. `cache` is the host's stored KVM
/// verdict, used by `auto` only (`kvm` always probes, `tcg` never does).
pub async fn start(
    choice: AccelChoice,
    cache: Option<&KvmCache>,
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
                cache: None,
            },
        ));
    }
    // Only a KVM QEMU started on the overlay (the probe passed, the real
    // start did not) leaves something to undo before the TCG boot.
    let mut started_on_disk = false;
    // The cache takes part only when the device opens: a missing or
    // forbidden /dev/kvm is known at once and may differ between users.
    let cache = cache.filter(|_| choice == AccelChoice::Auto && kvm_device().is_ok());
    let mut verdicts = cache.map(|c| Verdicts::new(c, &template.binary));
    let mut cached_no = false;
    let why_not = match kvm_device() {
        Err(e) => e,
        Ok(()) => match verdicts.as_mut().and_then(|v| v.cached().cloned()) {
            // The probe said no on this host before: straight to TCG.
            Some(v) if !v.usable => {
                cached_no = true;
                format!("{} (cached verdict of {})", v.reason, v.probed_at())
            }
            // The probe said yes before. The real boot's own firmware is
            // the probe this time: the same window, the same judge, read
            // from its debug console, and no probe QEMU started first. A
            // vCPU that does not run is caught within KVM_PROBE exactly as
            // the probe would catch it (a kernel would hang at "Probing
            // EDD" after it), and a usable KVM waits only until SeaBIOS
            // gets there (well under a second), no fixed time.
            Some(v) => {
                let cached = format!("of {}: {}", v.probed_at(), v.reason);
                match start_watched(template, events.clone()).await {
                    Ok((m, how)) => {
                        let cache = verdicts.map(Verdicts::into_use);
                        return Ok((
                            m,
                            AccelDecision {
                                requested: choice,
                                used: Accel::Kvm,
                                reason: format!(
                                    "KVM usable (cached verdict {cached}); this boot: {how}"
                                ),
                                probe_seconds: 0.0,
                                cache,
                            },
                        ));
                    }
                    Err(failed) => {
                        started_on_disk = true;
                        let why =
                            format!("the cached verdict said KVM works, but {}", failed.why());
                        if let Some(v) = verdicts.as_mut() {
                            match failed {
                                // The probe's own judgement: as good as a probe.
                                Watch::Stalled(_) => {
                                    v.record(false, &why, 0.0, "the cached verdict proved wrong")
                                }
                                // Maybe KVM, maybe this image or disk: the
                                // next run asks the probe, which needs neither.
                                Watch::Stopped(_) => v.forget("the cached verdict proved wrong"),
                            }
                        }
                        why
                    }
                }
            }
            None => match probe_kvm(&template.binary, &probe_log(template)).await {
                Err(why) => {
                    if let Some(v) = verdicts.as_mut() {
                        v.record(false, &why, t0.elapsed().as_secs_f64(), "");
                    }
                    why
                }
                Ok(how) => {
                    let probe_seconds = t0.elapsed().as_secs_f64();
                    match Machine::start(with(Accel::Kvm), events.clone()).await {
                        Ok(m) => {
                            if let Some(v) = verdicts.as_mut() {
                                v.record(true, &how, probe_seconds, "");
                            }
                            return Ok((
                                m,
                                AccelDecision {
                                    requested: choice,
                                    used: Accel::Kvm,
                                    reason: format!("KVM probe: {how}"),
                                    probe_seconds,
                                    cache: verdicts.map(Verdicts::into_use),
                                },
                            ));
                        }
                        Err(e) => {
                            started_on_disk = true;
                            // Not KVM's verdict (the probe passed) and not
                            // clearly usable either: nothing is stored.
                            if let Some(v) = verdicts.as_mut() {
                                v.wrote = Some(
                                    "the probe passed but the boot did not start: nothing stored"
                                        .into(),
                                );
                            }
                            format!(
                                "the KVM probe passed ({how}), but QEMU with KVM did not start: {e}"
                            )
                        }
                    }
                }
            },
        },
    };
    if choice == AccelChoice::Kvm {
        return Err(MachineError::NoKvm(why_not));
    }
    if started_on_disk {
        fresh_disk().map_err(MachineError::Setup)?;
        note_in_serial_log(&template.serial_log, &why_not);
    }
    let cache = verdicts.map(Verdicts::into_use);
    // A cached "no" ran no probe (reading the file takes microseconds); an
    // abandoned KVM start, probed or trusted from the cache, counts.
    let probe_seconds = match cached_no {
        true => 0.0,
        false => t0.elapsed().as_secs_f64(),
    };
    let m = Machine::start(with(Accel::Tcg), events).await?;
    Ok((
        m,
        AccelDecision {
            requested: choice,
            used: Accel::Tcg,
            reason: format!("KVM unusable, fell back to TCG: {why_not}"),
            probe_seconds,
            cache,
        },
    ))
}

/// The run's dealings with the verdict cache: what it found, what it
/// wrote, for the report.
struct Verdicts<'a> {
    cache: &'a KvmCache,
    key: HostKey,
    hit: Option<CachedVerdict>,
    /// Why the cache was not used.
    miss: Option<String>,
    /// What writing a fresh verdict did.
    wrote: Option<String>,
    /// When the verdict acted on was probed (a fresh one: now).
    probed_at: Option<String>,
}

impl<'a> Verdicts<'a> {
    fn new(cache: &'a KvmCache, binary: &Path) -> Self {
        Verdicts {
            cache,
            key: HostKey::of_this_host(binary),
            hit: None,
            miss: None,
            wrote: None,
            probed_at: None,
        }
    }

    /// The cached verdict for this host, unless `--accel-probe` asks for a
    /// fresh one.
    fn cached(&mut self) -> Option<&CachedVerdict> {
        if self.cache.reprobe {
            self.miss = Some("--accel-probe: probed again".into());
            return None;
        }
        match cache::lookup(&self.cache.path, &self.key) {
            Lookup::Hit(v) => {
                self.probed_at = Some(v.probed_at());
                self.hit = Some(v);
            }
            Lookup::Miss(why) => self.miss = Some(why),
        }
        self.hit.as_ref()
    }

    /// Stores a fresh verdict. A cache that cannot be written is said in
    /// the report and costs the next run a probe, nothing more.
    fn record(&mut self, usable: bool, reason: &str, probe_seconds: f64, why: &str) {
        let v = CachedVerdict::new(self.key.clone(), usable, reason.to_owned(), probe_seconds);
        let verdict = if usable { "usable" } else { "unusable" };
        let rewrite = if why.is_empty() {
            String::new()
        } else {
            format!("{why}; ")
        };
        self.wrote = Some(match cache::store(&self.cache.path, &v) {
            Ok(()) => format!("{rewrite}stored \"KVM {verdict}\" for the next runs"),
            Err(e) => format!("{rewrite}could not store the verdict: {e}"),
        });
        if self.hit.is_none() {
            self.probed_at = Some(v.probed_at());
        }
    }

    /// Removes the cached verdict: the next run probes.
    fn forget(&mut self, why: &str) {
        self.wrote = Some(match std::fs::remove_file(&self.cache.path) {
            Ok(()) => format!("{why}; removed it, the next run probes again"),
            Err(e) => format!("{why}; could not remove it: {e}"),
        });
    }

    fn into_use(self) -> CacheUse {
        let note = [self.miss, self.wrote]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
        CacheUse {
            used: self.hit.is_some(),
            probed_at: self.probed_at,
            file: self.cache.path.display().to_string(),
            note: if note.is_empty() {
                "verdict reused; `strata test --accel-probe` probes again".into()
            } else {
                note
            },
        }
    }
}

/// How a boot started on a cached "KVM usable" failed.
enum Watch {
    /// Its firmware did not reach its boot phase in time: the probe's
    /// verdict on a vCPU that does not run.
    Stalled(String),
    /// QEMU did not start or stopped early: not necessarily KVM's doing.
    Stopped(String),
}

impl Watch {
    fn why(&self) -> &str {
        match self {
            Watch::Stalled(w) | Watch::Stopped(w) => w,
        }
    }
}

/// The real first boot under KVM with the firmware's debug console on,
/// judged like the probe: returned once SeaBIOS reaches its boot phase,
/// killed if it does not within [`KVM_PROBE`] or QEMU stops first.
async fn start_watched(
    template: &QemuCommand,
    events: EventLog,
) -> Result<(Machine, String), Watch> {
    let log = probe_log(template);
    let _ = std::fs::remove_file(&log);
    let cmd = QemuCommand {
        accel: Accel::Kvm,
        debugcon: Some(log.clone()),
        ..template.clone()
    };
    let mut m = Machine::start(cmd, events)
        .await
        .map_err(|e| Watch::Stopped(format!("QEMU with KVM did not start: {e}")))?;
    loop {
        let debugcon =
            String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        match judge_probe(&debugcon, None, m.started().elapsed(), KVM_PROBE) {
            ProbeVerdict::Usable(how) => return Ok((m, how)),
            ProbeVerdict::Unusable(why) => {
                m.kill().await;
                return Err(Watch::Stalled(why));
            }
            ProbeVerdict::Undecided => {}
        }
        if let Err(e) = m.check_alive() {
            m.kill().await;
            return Err(Watch::Stopped(format!(
                "QEMU under KVM stopped before its firmware reached its boot phase: {e}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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

    fn verdicts_in(dir: &Path, reprobe: bool) -> KvmCache {
        KvmCache {
            path: dir.join("kvm-verdict.json"),
            reprobe,
        }
    }

    #[test]
    fn a_fresh_verdict_is_stored_and_the_next_run_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = verdicts_in(dir.path(), false);
        let sh = Path::new("sh");
        let mut first = Verdicts::new(&c, sh);
        assert!(first.cached().is_none());
        first.record(false, "QEMU with KVM and -cpu host exited at once", 0.6, "");
        let used = first.into_use();
        assert!(!used.used);
        assert_eq!(
            used.note,
            "no cached verdict yet; stored \"KVM unusable\" for the next runs"
        );
        assert!(used.probed_at.is_some());

        let mut second = Verdicts::new(&c, sh);
        let v = second.cached().cloned().expect("cached");
        assert!(!v.usable && v.reason.contains("exited at once"));
        let used = second.into_use();
        assert!(used.used);
        assert_eq!(used.probed_at, Some(v.probed_at()));
        assert!(used.note.contains("--accel-probe"), "{}", used.note);

        // --accel-probe ignores it and rewrites it.
        let forced = verdicts_in(dir.path(), true);
        let mut third = Verdicts::new(&forced, sh);
        assert!(third.cached().is_none());
        third.record(true, "firmware ran under KVM", 0.3, "");
        let used = third.into_use();
        assert!(!used.used);
        assert!(
            used.note
                .starts_with("--accel-probe: probed again; stored \"KVM usable\""),
            "{}",
            used.note
        );
        assert!(Verdicts::new(&c, sh).cached().unwrap().usable);
    }

    #[test]
    fn a_cached_usable_verdict_that_proves_wrong_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let c = verdicts_in(dir.path(), false);
        let sh = Path::new("sh");
        let mut v = Verdicts::new(&c, sh);
        v.record(true, "firmware ran under KVM", 0.3, "");
        let mut v = Verdicts::new(&c, sh);
        let cached_at = v.cached().unwrap().probed_at();
        v.record(
            false,
            "firmware did not reach its boot phase",
            0.0,
            "the cached verdict proved wrong",
        );
        let used = v.into_use();
        // It was acted on (no probe ran); the note says it was replaced.
        assert!(used.used);
        assert_eq!(used.probed_at, Some(cached_at));
        assert_eq!(
            used.note,
            "the cached verdict proved wrong; stored \"KVM unusable\" for the next runs"
        );
        assert!(!Verdicts::new(&c, sh).cached().unwrap().usable);
    }

    #[test]
    fn a_cached_usable_verdict_whose_boot_did_not_start_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let c = verdicts_in(dir.path(), false);
        let sh = Path::new("sh");
        Verdicts::new(&c, sh).record(true, "firmware ran under KVM", 0.3, "");
        let mut v = Verdicts::new(&c, sh);
        assert!(v.cached().is_some());
        v.forget("the cached verdict proved wrong");
        assert_eq!(
            v.into_use().note,
            "the cached verdict proved wrong; removed it, the next run probes again"
        );
        assert!(Verdicts::new(&c, sh).cached().is_none());
    }

    #[test]
    fn a_cache_that_cannot_be_written_is_said_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the cache directory should be.
        std::fs::write(dir.path().join("strata"), "").unwrap();
        let c = verdicts_in(&dir.path().join("strata"), false);
        let mut v = Verdicts::new(&c, Path::new("sh"));
        assert!(v.cached().is_none());
        v.record(false, "no", 0.1, "");
        let used = v.into_use();
        assert!(
            used.note.contains("could not store the verdict"),
            "{}",
            used.note
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
