//! Picking the accelerator, judged by the boot it serves.
//!
//! A /dev/kvm that opens is no proof, and neither is firmware that runs:
//! machines of one type break in at least two ways (QEMU aborts setting
//! up the vCPU, "failed to set MSR 0x10a"; or SeaBIOS runs and the image's
//! SYSLINUX then dies in protected mode with "KVM internal error …
//! emulation failure", or a kernel prints nothing). So `auto` proves KVM
//! with the run's own first boot: it starts under KVM, and counts KVM as
//! usable only once that boot has come up. A KVM boot that fails in any
//! way before then (QEMU exits or aborts, QEMU stops the guest, the guest
//! panics or loops, or it shows no kernel console line and no guest agent
//! within [`KVM_KERNEL_WITHIN`]) is abandoned, and boot 1 starts again
//! under TCG on a fresh disk, in the same run. The report says where KVM
//! failed ([`Stage`]) and what QEMU said.
//!
//! With a working KVM this costs nothing: the proof is the boot the run
//! needs anyway, and no probe QEMU runs before it. On a broken one it costs
//! the abandoned attempt (an abort: a QEMU start; a stall: the bound),
//! once: the host's verdict is cached (`cache`), written from what the
//! real boots showed — "unusable" only when TCG then booted where KVM had
//! failed (so an image that fails either way says nothing about KVM).
//! `--accel kvm` boots under KVM without the 20 s bound (there is nothing
//! to fall back to) and, when boot 1 fails, says where and what QEMU said.

pub mod cache;

use crate::machine::MachineError;
use crate::qemu::Accel;
use cache::{CacheUse, CachedVerdict, HostKey, KvmCache, Lookup};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// `strata test --accel` (`auto`, `kvm`, `tcg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// How far a boot under KVM got before it failed: the first stage it did
/// not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// QEMU itself: it exited or could not be driven before the guest ran.
    Start,
    /// SeaBIOS did not reach its boot phase.
    Firmware,
    /// The firmware handed over (to extlinux, or QEMU's kernel loader),
    /// but the kernel printed nothing.
    Bootloader,
    /// The kernel printed, but the guest agent never came up.
    Kernel,
    /// The guest agent came up, but the system did not settle.
    Userspace,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Start => "start",
            Stage::Firmware => "firmware",
            Stage::Bootloader => "bootloader",
            Stage::Kernel => "kernel",
            Stage::Userspace => "userspace",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a boot under KVM was abandoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmFailure {
    pub stage: Stage,
    /// QEMU's own words (stdout and stderr, register dumps left out);
    /// empty when it said nothing.
    pub qemu_said: String,
    /// How strata saw it fail (the machine error).
    pub error: String,
}

impl KvmFailure {
    /// Whether the failure is evidence against KVM itself, worth caching
    /// for the host: QEMU exited (an abort setting up the vCPU), QEMU
    /// named KVM, or the guest never got past the firmware or bootloader.
    /// A stall once the kernel printed (or a QMP socket slow on a loaded
    /// host) may be the moment's: the run falls back, nothing is stored.
    pub fn is_kvms_own(&self) -> bool {
        matches!(self.stage, Stage::Firmware | Stage::Bootloader)
            || self.qemu_said.contains("KVM")
            || self.error.starts_with("QEMU exited")
    }

    /// "KVM failed at <stage> (<QEMU's words, else strata's>)".
    pub fn summary(&self) -> String {
        let words = match self.qemu_said.is_empty() {
            true => &self.error,
            false => &self.qemu_said,
        };
        format!("KVM failed at {} ({words})", self.stage)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccelDecision {
    pub requested: AccelChoice,
    pub used: Accel,
    pub reason: String,
    /// Where KVM failed, when this run or the cached verdict it acted on
    /// saw it fail.
    pub kvm_failure: Option<KvmFailure>,
    /// Seconds spent on a KVM attempt that was abandoned (0 if none).
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

/// How long a boot under KVM may go without the kernel's first console
/// line (or, for an image whose kernel does not print to the serial
/// console, the guest agent) before it counts as stalled. A working KVM
/// gets there in a few seconds (SeaBIOS well under one, extlinux loading
/// kernel and initramfs through BIOS calls about one); a vCPU that does
/// not run never does.
pub const KVM_KERNEL_WITHIN: Duration = Duration::from_secs(20);

/// The most a KVM boot 1 under `auto` may take to come up once it showed
/// life: a working KVM brings a Debian guest to multi-user in seconds; one
/// that printed and then stalls (timers, SMP bring-up on a nested host)
/// must leave the TCG boot its time.
pub const KVM_BOOT_WITHIN: Duration = Duration::from_secs(90);

/// What SeaBIOS prints on its debug console once its power-on self test
/// is done and it looks for something to boot.
const FIRMWARE_BOOT_PHASE: &[&str] = &["Booting from ", "No bootable device", "Boot failed"];

/// The stage a failed KVM boot was in: `machine` is false when QEMU never
/// got as far as running the guest; `debugcon` is what SeaBIOS printed on
/// its debug console; `kernel_printed` whether the serial console showed
/// the kernel's timestamped lines; `agent_up` whether the guest agent
/// opened its port.
pub fn stage_reached(machine: bool, debugcon: &str, kernel_printed: bool, agent_up: bool) -> Stage {
    if agent_up {
        Stage::Userspace
    } else if kernel_printed {
        Stage::Kernel
    } else if !machine {
        Stage::Start
    } else if FIRMWARE_BOOT_PHASE.iter().any(|m| debugcon.contains(m)) {
        Stage::Bootloader
    } else {
        Stage::Firmware
    }
}

/// The run's accelerator, from before the first QEMU starts until boot 1
/// has come up: what to try first, and what the outcome means for the
/// report and the host's cached verdict.
pub struct Plan<'a> {
    choice: AccelChoice,
    verdicts: Option<Verdicts<'a>>,
    /// Why KVM is not tried at all (`--accel tcg`, no usable /dev/kvm, a
    /// cached "unusable"); None: boot 1 starts under KVM.
    skip_kvm: Option<Skip>,
    /// The KVM attempt that was abandoned, and its seconds.
    failed: Option<(KvmFailure, f64)>,
    /// `--accel kvm` without a usable /dev/kvm: why (said by `first`).
    no_device: Option<String>,
}

struct Skip {
    reason: String,
    /// The failure a cached verdict recorded.
    failure: Option<KvmFailure>,
}

impl<'a> Plan<'a> {
    /// `cache` is the host's stored verdict (used by `auto` only: `kvm`
    /// always tries, `tcg` never does).
    pub fn new(choice: AccelChoice, cache: Option<&'a KvmCache>, binary: &Path) -> Plan<'a> {
        let device = match choice {
            AccelChoice::Tcg => Ok(()),
            _ => kvm_device(),
        };
        Plan::with_device(choice, cache, binary, device)
    }

    fn with_device(
        choice: AccelChoice,
        cache: Option<&'a KvmCache>,
        binary: &Path,
        device: Result<(), String>,
    ) -> Plan<'a> {
        let mut plan = Plan {
            choice,
            verdicts: None,
            skip_kvm: None,
            failed: None,
            no_device: None,
        };
        match (choice, device) {
            (AccelChoice::Tcg, _) => {
                plan.skip_kvm = Some(Skip {
                    reason: "requested with --accel tcg".into(),
                    failure: None,
                })
            }
            // `--accel kvm` says so in `first`.
            (AccelChoice::Kvm, device) => plan.no_device = device.err(),
            // A missing or forbidden /dev/kvm is known at once, and may
            // differ between users: the cache takes no part.
            (AccelChoice::Auto, Err(e)) => {
                plan.skip_kvm = Some(Skip {
                    reason: format!("KVM unusable ({e}); TCG used for this run"),
                    failure: None,
                })
            }
            (AccelChoice::Auto, Ok(())) => {
                let mut verdicts = cache.map(|c| Verdicts::new(c, binary));
                if let Some(v) = verdicts.as_mut().and_then(|v| v.cached().cloned()) {
                    if !v.usable {
                        let what = match &v.failure {
                            Some(f) => f.summary(),
                            None => v.reason.clone(),
                        };
                        plan.skip_kvm = Some(Skip {
                            reason: format!(
                                "{what} (cached verdict of {}); TCG used for this run",
                                v.probed_at()
                            ),
                            failure: v.failure.clone(),
                        });
                    }
                }
                plan.verdicts = verdicts;
            }
        }
        plan
    }

    /// The accelerator boot 1 starts under; `--accel kvm` without a
    /// usable /dev/kvm is an error here.
    pub fn first(&self) -> Result<Accel, MachineError> {
        if let Some(e) = &self.no_device {
            return Err(MachineError::NoKvm(e.clone()));
        }
        Ok(match self.skip_kvm {
            Some(_) => Accel::Tcg,
            None => Accel::Kvm,
        })
    }

    /// The host's cached verdict this run found, if any.
    fn cached(&self) -> Option<&CachedVerdict> {
        self.verdicts.as_ref().and_then(|v| v.hit.as_ref())
    }

    /// Whether the cached verdict this run found says "usable".
    fn cached_usable(&self) -> bool {
        self.cached().is_some_and(|v| v.usable)
    }

    /// Boot 1 came up under KVM (`how`: what it showed): KVM is usable.
    pub fn kvm_booted(mut self, how: &str) -> AccelDecision {
        let cached_usable = self.cached_usable();
        let reason = match self.cached() {
            Some(v) if cached_usable => format!(
                "KVM usable (cached verdict of {}); this boot: {how}",
                v.probed_at()
            ),
            _ => format!("KVM usable: {how}"),
        };
        if !cached_usable {
            if let Some(v) = self.verdicts.as_mut() {
                v.record(true, &reason, None, 0.0, "");
            }
        }
        self.decision(Accel::Kvm, reason)
    }

    /// Boot 1 under KVM failed: with `--accel kvm` that is the run's error;
    /// with `auto` boot 1 starts again under TCG.
    pub fn kvm_failed(&mut self, failure: KvmFailure, seconds: f64) -> Result<(), MachineError> {
        if self.choice == AccelChoice::Kvm {
            let words = match failure.qemu_said.is_empty() {
                true => String::new(),
                false => format!("; QEMU said: {}", failure.qemu_said),
            };
            let err = MachineError::NoKvm(format!(
                "boot 1 failed at the {} stage: {}{words}",
                failure.stage, failure.error
            ));
            self.failed = Some((failure, seconds));
            return Err(err);
        }
        self.failed = Some((failure, seconds));
        Ok(())
    }

    /// `--accel kvm` whose boot 1 failed: the decision for the report.
    pub fn kvm_refused(self) -> AccelDecision {
        let reason = match &self.failed {
            Some((f, _)) => f.summary(),
            None => "KVM failed".into(),
        };
        self.decision(Accel::Kvm, reason)
    }

    /// Boot 1 came up under TCG: after a KVM failure, that failure was
    /// KVM's, and the host's verdict becomes "unusable".
    pub fn tcg_booted(mut self) -> AccelDecision {
        let reason = match (&self.skip_kvm, &self.failed) {
            (Some(skip), _) => skip.reason.clone(),
            (None, Some((f, seconds))) => {
                let summary = f.summary();
                let why = match self.cached_usable() {
                    true => "the cached verdict proved wrong",
                    false => "",
                };
                let (failure, seconds) = (f.clone(), *seconds);
                if let Some(v) = self.verdicts.as_mut() {
                    if failure.is_kvms_own() {
                        // The attempt's cost: what the cache saves the next runs.
                        v.record(false, &summary, Some(failure), seconds, why);
                    } else {
                        v.wrote = Some(format!(
                            "nothing stored: a stall after the {} stage may be this moment's, \
                             not this host's",
                            failure.stage
                        ));
                    }
                }
                format!("{summary}; TCG used for this run")
            }
            (None, None) => "TCG".into(),
        };
        self.decision(Accel::Tcg, reason)
    }

    /// Boot 1 failed under TCG as well (or under TCG alone): nothing is
    /// learnt about KVM, nothing stored. The decision, for the report.
    pub fn tcg_failed(self) -> AccelDecision {
        let reason = match (&self.skip_kvm, &self.failed) {
            (Some(skip), _) => skip.reason.clone(),
            (None, Some((f, _))) => format!(
                "{}; TCG used for this run (boot 1 failed under TCG too: the image, not KVM)",
                f.summary()
            ),
            (None, None) => "TCG".into(),
        };
        self.decision(Accel::Tcg, reason)
    }

    fn decision(self, used: Accel, reason: String) -> AccelDecision {
        let kvm_failure = match (&self.failed, &self.skip_kvm) {
            (Some((f, _)), _) => Some(f.clone()),
            (None, Some(skip)) => skip.failure.clone(),
            (None, None) => None,
        };
        AccelDecision {
            requested: self.choice,
            used,
            reason,
            kvm_failure,
            probe_seconds: self.failed.as_ref().map_or(0.0, |(_, s)| *s),
            cache: self.verdicts.map(Verdicts::into_use),
        }
    }
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
    /// When the verdict acted on was found (a fresh one: now).
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
            self.miss = Some("--accel-probe: tried KVM again".into());
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
    /// the report and costs the next run a KVM attempt, nothing more.
    fn record(
        &mut self,
        usable: bool,
        reason: &str,
        failure: Option<KvmFailure>,
        seconds: f64,
        why: &str,
    ) {
        let mut v = CachedVerdict::new(self.key.clone(), usable, reason.to_owned(), seconds);
        v.failure = failure;
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
                "verdict reused; `strata test --accel-probe` tries KVM again".into()
            } else {
                note
            },
        }
    }
}

/// The serial log is an artifact people read: mark where the abandoned KVM
/// attempt ends and the TCG boot begins.
pub fn note_in_serial_log(path: &Path, why: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = writeln!(
            f,
            "\n==== strata: KVM attempt abandoned ({why}); restarting boot 1 under TCG ===="
        );
    }
}

#[cfg(test)]
mod tests;
