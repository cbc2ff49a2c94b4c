//! The verdict and its renderings: a table for people, JSON for tools,
//! JUnit XML for CI servers. Rendering is pure so it can be snapshot-tested.

use crate::journal::WarningKind;
use crate::qemu::BootMode;
use crate::stage::Stage;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub status: Status,
    /// One line: what was proven, or what is wrong.
    pub detail: String,
    /// The observations behind the verdict, one per line.
    pub evidence: Vec<String>,
    pub seconds: f64,
    /// Upgrade lifecycle only: the stage whose boot this row judged...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Stage>,
    /// ...and the version that boot was to run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl CheckResult {
    pub fn new(
        name: &str,
        status: Status,
        detail: impl Into<String>,
        evidence: Vec<String>,
    ) -> Self {
        CheckResult {
            name: name.to_owned(),
            status,
            detail: detail.into(),
            evidence,
            seconds: 0.0,
            phase: None,
            label: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    pub kind: WarningKind,
    pub mountpoint: Option<String>,
    pub message: String,
    /// Paths hidden under the mountpoint, as they would appear without the mount.
    pub shadowed: Vec<String>,
    pub shadowed_count: usize,
    pub shadowed_bytes: u64,
    pub unit: Option<String>,
    /// Upgrade lifecycle only: the stage whose boot logged it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Stage>,
}

/// One boot of an upgrade lifecycle (`strata test --upgrade-to`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseRecord {
    pub phase: Stage,
    /// The version the boot runs: `/` must be its `run` subvolume.
    pub label: String,
    /// The run's boot number, once this phase's boot started.
    pub boot: Option<u32>,
    /// What was done to the (powered-off) copy before this boot.
    pub change: Option<String>,
    /// How long that took, in seconds.
    pub change_seconds: Option<f64>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// One guest boot of the run, in order: how QEMU got to the kernel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootRecord {
    pub boot: u32,
    /// Why it happened ("first boot", "clean reboot (systemctl reboot)").
    pub why: String,
    /// `extlinux`: firmware, then the image's own bootloader reading the
    /// kernel from the disk; `direct`: QEMU's `-kernel/-initrd/-append`
    /// with the files and command line of the image's default entry.
    pub via: BootMode,
    /// From power-on (the reboot command, for a reboot) to the system
    /// settling; None when it did not come up.
    pub seconds: Option<f64>,
    /// From power-on (or the guest's reset) to the kernel's first console
    /// line: firmware and bootloader, or QEMU's loader.
    pub firmware: Option<f64>,
    /// The boot that ran at the same time as this one (the power cut's
    /// cold boot beside the clean reboot), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beside: Option<u32>,
}

/// One scenario of the run (`run::Scenario`): each starts from the
/// booted guest saved after the first boot's checks, restored into a QEMU
/// of its own on a disk overlay of its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioRecord {
    pub name: String,
    /// From starting QEMU to the restored guest's agent answering.
    pub restore_seconds: f64,
    /// The whole scenario: restore, commands, checks, QEMU's exit.
    pub seconds: f64,
    /// Why the scenario's guest could not be judged to the end (its
    /// restore failed, a command failed or killed the guest agent): the
    /// scenario's unjudged rows fail saying so; the run goes on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line on how the run's boots were made, grouping neighbours made
/// alike: "boot 1 through the image's extlinux; boots 2-3 direct kernel
/// boot of the same kernel, initramfs and command line".
pub fn describe_boots(log: &[BootRecord]) -> String {
    let mut groups: Vec<(u32, u32, BootMode)> = Vec::new();
    for r in log {
        match groups.last_mut() {
            Some((_, last, via)) if *via == r.via && *last + 1 == r.boot => *last = r.boot,
            _ => groups.push((r.boot, r.boot, r.via)),
        }
    }
    let mut parts = Vec::new();
    let mut extlinux_before = false;
    for (first, last, via) in groups {
        let which = match first == last {
            true => format!("boot {first}"),
            false => format!("boots {first}-{last}"),
        };
        let how = match via {
            BootMode::Extlinux => {
                extlinux_before = true;
                "through the image's extlinux"
            }
            BootMode::Direct if extlinux_before => {
                "direct kernel boot of the same kernel, initramfs and command line"
            }
            BootMode::Direct => {
                "direct kernel boot of the kernel, initramfs and command line of the image's default entry"
            }
        };
        parts.push(format!("{which} {how}"));
    }
    for r in log {
        if let Some(b) = r.beside {
            parts.push(format!("boot {} ran beside boot {b}", r.boot));
        }
    }
    parts.join("; ")
}

/// Seconds. Guest-side numbers come from systemd's own boot timestamps.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    /// KVM probing that was abandoned before the real boot (0 if none).
    pub accel_probe: f64,
    /// Power-on to the kernel's first instruction: SeaBIOS + extlinux
    /// loading kernel and initramfs (or QEMU's loader with --boot direct).
    pub firmware: Option<f64>,
    /// Kernel start to the initramfs handing over (includes the initramfs).
    pub kernel: Option<f64>,
    pub userspace: Option<f64>,
    /// Host-measured power-on to "systemctl is-system-running" settling.
    pub boot: f64,
    pub checks: f64,
    /// Clean reboot and power cut with their boots.
    pub persistence: f64,
    /// Saving the booted guest for the scenarios (it stood still so long).
    #[serde(skip_serializing_if = "is_zero")]
    pub save: f64,
    /// The scenarios: restores, commands and checks.
    #[serde(skip_serializing_if = "is_zero")]
    pub scenarios: f64,
    /// Recording and comparing the `[state] preserve` paths.
    #[serde(skip_serializing_if = "is_zero")]
    pub contract: f64,
    /// Whole run, overlay creation to verdict.
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub accel: crate::qemu::Accel,
    pub accel_requested: crate::accel::AccelChoice,
    pub accel_reason: String,
    /// How the host's cached KVM verdict took part (`--accel auto` with
    /// /dev/kvm present; null otherwise): `used` means no probe ran.
    pub accel_cache: Option<crate::accel::cache::CacheUse>,
    /// Where KVM failed and what QEMU said, when `auto` fell back to TCG
    /// (in this run, or by a cached verdict that recorded it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel_kvm_failure: Option<crate::accel::KvmFailure>,
    /// "extlinux" or "direct".
    pub boot: String,
    pub disk_bus: crate::qemu::DiskBus,
    /// Guest boots this run performed (persistence adds a reboot and a
    /// fresh start after the power cut).
    pub boots: u32,
    /// Those boots in order: how each was made, how long it took. With
    /// `--boot extlinux` boot 1 goes through the image's bootloader; the
    /// later boots of a plain run are direct (`--later-boots`).
    pub boot_log: Vec<BootRecord>,
    /// Why later boots went through extlinux although `--later-boots
    /// direct` asked otherwise (the kernel could not be extracted, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub later_boots_fallback: Option<String>,
    pub image: String,
    pub label: String,
    pub checks: Vec<CheckResult>,
    pub warnings: Vec<Warning>,
    pub timings: Timings,
    pub artifacts: Option<String>,
    /// Set when the run could not finish (exit 3); the checks that did not
    /// run are marked skip.
    pub error: Option<String>,
    /// The signal that stopped the run (exit 130), when one did: the report
    /// holds what was proven before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// Upgrade lifecycle only: its boots, in order, and the version each
    /// ran. Its check rows are named `<phase>/<check>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseRecord>,
    /// The scenarios, in the order they ran (none: not serialised).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scenarios: Vec<ScenarioRecord>,
}

impl Report {
    pub fn verdict_of(checks: &[CheckResult], error: Option<&str>) -> Verdict {
        if error.is_some() || checks.iter().any(|c| c.status == Status::Fail) {
            Verdict::Fail
        } else {
            Verdict::Pass
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises") + "\n"
    }

    /// The human report: a table, the evidence for failures, and a
    /// plain-language explanation of every mount warning.
    pub fn to_table(&self) -> String {
        let mut o = String::new();
        let name_w = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(
            o,
            "strata test {}: boot {} on {}, {} ({})",
            self.image, self.boot, self.disk_bus, self.accel, self.accel_reason
        );
        let _ = writeln!(o);
        if !self.phases.is_empty() {
            o.push_str(&self.phases_table());
            let _ = writeln!(o);
        }
        // A lifecycle's rows also say which version their boot ran.
        let version_w = self
            .checks
            .iter()
            .filter_map(|c| c.label.as_ref().map(|l| l.len()))
            .max()
            .map(|w| w.max("VERSION".len()));
        let version = |v: &str| match version_w {
            Some(w) => format!("{v:<w$}  "),
            None => String::new(),
        };
        let _ = writeln!(
            o,
            "  {:<name_w$}  {}{:<6} {:>6}  DETAIL",
            "CHECK",
            version("VERSION"),
            "RESULT",
            "TIME"
        );
        for c in &self.checks {
            let _ = writeln!(
                o,
                "  {:<name_w$}  {}{:<6} {:>5.1}s  {}",
                c.name,
                version(c.label.as_deref().unwrap_or("")),
                c.status.label(),
                c.seconds,
                c.detail
            );
        }
        for c in self.checks.iter().filter(|c| c.status == Status::Fail) {
            let _ = writeln!(o, "\n{} failed:", c.name);
            for e in c.evidence.iter().take(30) {
                let _ = writeln!(o, "  - {e}");
            }
            if c.evidence.len() > 30 {
                let _ = writeln!(o, "  ... and {} more (see --json)", c.evidence.len() - 30);
            }
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(o, "\nWarnings from the guest journal:");
            for w in &self.warnings {
                o.push_str(&explain(w));
            }
        }
        let opt = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1}s"));
        if !self.boot_log.is_empty() {
            let _ = writeln!(o, "\nBoots: {}", describe_boots(&self.boot_log));
            let n_w = self
                .boot_log
                .iter()
                .map(|b| b.boot.to_string().len())
                .max()
                .unwrap_or(1);
            for b in &self.boot_log {
                let _ = writeln!(
                    o,
                    "  boot {:<n_w$}  {:<8}  {:>6}  firmware {:>5}  {}",
                    b.boot,
                    b.via.name(),
                    b.seconds.map_or("-".to_owned(), |v| format!("{v:.1}s")),
                    opt(b.firmware),
                    b.why
                );
            }
            if let Some(why) = &self.later_boots_fallback {
                let _ = writeln!(o, "  Later boots not direct: {why}");
            }
        }
        if !self.scenarios.is_empty() {
            let _ = writeln!(
                o,
                "\nScenarios: each restored from the guest saved after boot 1's checks (saved in {:.1}s)",
                self.timings.save
            );
            let n_w = self
                .scenarios
                .iter()
                .map(|s| s.name.len())
                .max()
                .unwrap_or(0);
            for sc in &self.scenarios {
                let failed = match &sc.error {
                    Some(e) => format!("  guest failed: {e}"),
                    None => String::new(),
                };
                let _ = writeln!(
                    o,
                    "  {:<n_w$}  restored in {:>5.1}s  {:>6.1}s in all{failed}",
                    sc.name, sc.restore_seconds, sc.seconds
                );
            }
        }
        let t = &self.timings;
        // A lifecycle does not run persistence; its image changes take time.
        let between = match self.phases.is_empty() {
            true if t.scenarios > 0.0 => format!(
                "persistence {:.1}s, scenarios {:.1}s",
                t.persistence, t.scenarios
            ),
            true => format!("persistence {:.1}s", t.persistence),
            false => format!(
                "image changes {:.1}s",
                self.phases
                    .iter()
                    .filter_map(|p| p.change_seconds)
                    .sum::<f64>()
            ),
        };
        let _ = writeln!(
            o,
            "\nTimings: firmware {} + kernel {} + userspace {} (boot {:.1}s), checks {:.1}s, {between}, total {:.1}s{}",
            opt(t.firmware),
            opt(t.kernel),
            opt(t.userspace),
            t.boot,
            t.checks,
            t.total,
            match (t.accel_probe > 0.0, &self.accel_cache) {
                (true, _) => format!(" (incl. {:.1}s abandoned KVM attempt)", t.accel_probe),
                (false, Some(c)) if c.used => " (cached KVM verdict)".to_owned(),
                _ => String::new(),
            }
        );
        if let Some(a) = &self.artifacts {
            let _ = writeln!(o, "Artifacts: {a}");
        }
        if let Some(e) = &self.error {
            let _ = writeln!(o, "\nERROR: {e}");
        }
        let passed = self.count(Status::Pass);
        let failed = self.count(Status::Fail);
        let skipped = self.count(Status::Skip);
        let _ = writeln!(
            o,
            "\nVerdict: {} ({passed} passed, {failed} failed, {skipped} skipped)",
            match self.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
            }
        );
        o
    }

    /// The lifecycle's boots: which version each ran and what changed the
    /// image before it.
    fn phases_table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Upgrade lifecycle on a private copy of the image (the image itself is not modified):"
        );
        let boot = |p: &PhaseRecord| {
            p.boot
                .map_or("not booted".to_owned(), |b| format!("boot {b}"))
        };
        let boot_w = self.phases.iter().map(|p| boot(p).len()).max().unwrap_or(0);
        let label_w = self.phases.iter().map(|p| p.label.len()).max().unwrap_or(0);
        for p in &self.phases {
            let what = match (&p.change, p.change_seconds) {
                (Some(c), Some(t)) => format!("after: {c} ({t:.1}s)"),
                (Some(c), None) => format!("after: {c}"),
                (None, _) => p.phase.why().to_owned(),
            };
            let _ = writeln!(
                o,
                "  {:<boot_w$}  {:<8}  {:<label_w$}  {what}",
                boot(p),
                p.phase.name(),
                p.label,
            );
        }
        o
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// JUnit XML, written by `quick-junit` (the crate cargo-nextest uses):
    /// one suite, one test case per check row, an `error` case named `boot`
    /// when the run itself failed, and the run's facts as properties.
    pub fn to_junit(&self) -> String {
        use quick_junit::{
            NonSuccessKind, Property, Report as Junit, TestCase, TestCaseStatus, TestSuite,
        };
        // Seconds as the report holds them; a negative or non-finite one
        // (never expected) is written as 0 rather than panicking.
        let secs = |s: f64| std::time::Duration::try_from_secs_f64(s).unwrap_or_default();
        let name = format!("strata.{}.{}.{}", self.boot, self.disk_bus, self.accel);
        let mut suite = TestSuite::new(name.as_str());
        suite.set_time(secs(self.timings.total));
        suite.add_property(Property::new("image", &self.image));
        suite.add_property(Property::new("label", &self.label));
        suite.add_property(Property::new("accel_reason", &self.accel_reason));
        if let Some(f) = &self.accel_kvm_failure {
            suite.add_property(Property::new("accel_kvm_stage", f.stage.name()));
            suite.add_property(Property::new("accel_kvm_qemu_said", &f.qemu_said));
        }
        if let Some(c) = &self.accel_cache {
            let value = match (c.used, &c.probed_at) {
                (true, Some(at)) => format!("used, probed {at}, {}: {}", c.file, c.note),
                _ => format!("not used, {}: {}", c.file, c.note),
            };
            suite.add_property(Property::new("accel_cache", value));
        }
        if !self.boot_log.is_empty() {
            suite.add_property(Property::new("boots", describe_boots(&self.boot_log)));
        }
        for b in &self.boot_log {
            let value = format!(
                "{}, {}, {}",
                b.via.name(),
                b.seconds
                    .map_or("did not come up".to_owned(), |v| format!("{v:.1} s")),
                b.why
            );
            suite.add_property(Property::new(format!("boot.{}", b.boot), value));
        }
        if let Some(why) = &self.later_boots_fallback {
            suite.add_property(Property::new("later_boots_fallback", why));
        }
        for p in &self.phases {
            let value = format!(
                "{}, version {}{}",
                p.boot
                    .map_or("not booted".to_owned(), |b| format!("boot {b}")),
                p.label,
                p.change
                    .as_ref()
                    .map(|c| format!(", after: {c}"))
                    .unwrap_or_default()
            );
            suite.add_property(Property::new(format!("phase.{}", p.phase.name()), value));
        }
        for c in &self.checks {
            let status = match c.status {
                Status::Pass => TestCaseStatus::success(),
                Status::Fail => {
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    s.set_message(&c.detail)
                        .set_description(c.evidence.join("\n"));
                    s
                }
                Status::Skip => {
                    let mut s = TestCaseStatus::skipped();
                    s.set_message(&c.detail);
                    s
                }
            };
            let mut case = TestCase::new(&c.name, status);
            case.set_classname(name.as_str()).set_time(secs(c.seconds));
            suite.add_test_case(case);
        }
        if let Some(e) = &self.error {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
            status.set_message(e);
            let mut case = TestCase::new("boot", status);
            case.set_classname(name.as_str());
            suite.add_test_case(case);
        }
        if !self.warnings.is_empty() {
            let text: String = self.warnings.iter().map(explain).collect();
            suite.set_system_out(text);
        }
        let mut junit = Junit::new("strata test");
        junit.set_time(secs(self.timings.total));
        junit.add_test_suite(suite);
        // Into a Vec: the only errors quick-xml could report are I/O errors.
        junit
            .to_string()
            .unwrap_or_else(|e| unreachable!("JUnit XML written into memory cannot fail: {e}"))
    }
}

/// What a warning means, for someone who has never heard of overmounting.
pub fn explain(w: &Warning) -> String {
    let mut o = String::new();
    let mp = w.mountpoint.as_deref().unwrap_or("(unknown mountpoint)");
    // A lifecycle has several boots: say whose journal it was.
    let boot = w.phase.map(|p| format!("[{p}] ")).unwrap_or_default();
    match w.kind {
        WarningKind::Overmount => {
            let _ = writeln!(
                o,
                "\n  {boot}{mp}: the directory was not empty when its state subvolume was mounted over it."
            );
            let _ = writeln!(o, "    systemd: \"{}\"", w.message);
            let _ = writeln!(
                o,
                "    {} hidden entr{} ({}) under {mp} in the system subvolume are invisible while the \
                 subvolume is mounted: the running system reads and writes the subvolume's copy, \
                 so these files are stale duplicates that waste space and reappear if the mount fails.",
                w.shadowed_count,
                if w.shadowed_count == 1 { "y" } else { "ies" },
                human_bytes(w.shadowed_bytes)
            );
            for p in w.shadowed.iter().take(10) {
                let _ = writeln!(o, "      {p}");
            }
            if w.shadowed.len() > 10 {
                let _ = writeln!(o, "      ... and {} more", w.shadowed.len() - 10);
            }
            if w.phase == Some(Stage::Upgrade) {
                let _ = writeln!(
                    o,
                    "    Fix: upgrade with the default `strata upgrade --state-migration move`, \
                     which leaves {mp} empty in the new version (the state subvolume stays authoritative)."
                );
            } else {
                let _ = writeln!(
                    o,
                    "    Fix: rebuild the image with the default `strata build --state-migration move`, \
                     which moves the data into the subvolume and leaves {mp} empty in the system."
                );
            }
        }
        WarningKind::FailedMount => {
            let _ = writeln!(o, "\n  {boot}{mp}: a mount failed at boot.");
            let _ = writeln!(o, "    systemd: \"{}\"", w.message);
            if let Some(u) = &w.unit {
                let _ = writeln!(o, "    See `journalctl -u {u}` in the exported journal.");
            }
        }
        WarningKind::BtrfsError => {
            let _ = writeln!(
                o,
                "\n  {boot}The kernel reported a Btrfs error: \"{}\"",
                w.message
            );
        }
    }
    o
}

/// Like the builder's sizes, but small ones spelled out ("5 bytes").
pub fn human_bytes(b: u64) -> String {
    if b < 1024 {
        format!("{b} bytes")
    } else {
        strata_builder::size::human(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::AccelChoice;
    use crate::qemu::{Accel, DiskBus};

    fn sample(failing: bool) -> Report {
        let mut checks = vec![
            CheckResult::new(
                "root",
                Status::Pass,
                "/ is btrfs 3f1c… at /systems/factory/run",
                vec![],
            ),
            CheckResult::new(
                "state-mounts",
                Status::Pass,
                "5 state subvolumes mounted",
                vec!["/var: btrfs, fsroot /state/var".into()],
            ),
            CheckResult::new(
                "fstab",
                Status::Pass,
                "findmnt --verify clean; 6 entries mounted; no failed units",
                vec![],
            ),
            CheckResult::new(
                "moved-files",
                if failing { Status::Fail } else { Status::Pass },
                if failing {
                    "1 of 745 moved files differ"
                } else {
                    "745 moved files intact"
                },
                if failing {
                    vec!["/root/.ssh/authorized_keys: mode 0644, expected 0600".into()]
                } else {
                    vec![]
                },
            ),
            CheckResult::new(
                "overmount",
                if failing { Status::Fail } else { Status::Pass },
                if failing {
                    "1 mountpoint had files under it: /var"
                } else {
                    "no overmount entries in the journal"
                },
                vec![],
            ),
            CheckResult::new(
                "persistence",
                Status::Skip,
                "not requested (--checks)",
                vec![],
            ),
        ];
        for (i, c) in checks.iter_mut().enumerate() {
            c.seconds = 0.5 * i as f64;
        }
        let warnings = if failing {
            vec![Warning {
                kind: WarningKind::Overmount,
                mountpoint: Some("/var".into()),
                message: "Directory /var to mount over is not empty, mounting anyway.".into(),
                shadowed: vec!["/var/left-behind.txt".into(), "/var/lib/x <&>".into()],
                shadowed_count: 2,
                shadowed_bytes: 5000,
                unit: Some("var.mount".into()),
                phase: None,
            }]
        } else {
            vec![]
        };
        Report {
            verdict: Report::verdict_of(&checks, None),
            accel: Accel::Tcg,
            accel_requested: AccelChoice::Auto,
            accel_reason:
                "KVM unusable (/dev/kvm: No such file or directory); TCG used for this run".into(),
            accel_cache: None,
            accel_kvm_failure: None,
            boot: "extlinux".into(),
            disk_bus: DiskBus::VirtioBlk,
            boots: 1,
            boot_log: vec![BootRecord {
                boot: 1,
                why: "first boot".into(),
                via: BootMode::Extlinux,
                seconds: Some(23.4),
                firmware: Some(1.9),
                beside: None,
            }],
            later_boots_fallback: None,
            image: "/images/debian.img".into(),
            label: "factory".into(),
            checks,
            warnings,
            timings: Timings {
                accel_probe: 6.2,
                firmware: Some(1.9),
                kernel: Some(7.7),
                userspace: Some(13.6),
                boot: 23.4,
                checks: 3.1,
                persistence: 0.0,
                save: 0.0,
                scenarios: 0.0,
                contract: 0.0,
                total: 33.0,
            },
            artifacts: Some("/tmp/artifacts".into()),
            error: None,
            interrupted: None,
            phases: vec![],
            scenarios: vec![],
        }
    }

    /// A lifecycle whose upgrade left /srv's data under the mountpoint
    /// (`--state-migration copy`): phase 2 fails overmount, the rollback
    /// passes.
    fn lifecycle_sample() -> Report {
        use crate::lifecycle;
        use crate::stage::Stage;
        let mut phases = lifecycle::plan("factory", "v2");
        for (i, p) in phases.iter_mut().enumerate() {
            p.boot = Some(i as u32 + 1);
        }
        phases[1].change = Some(
            "upgraded to v2 from /var/tmp/rootfs-v2 (state migration copy, state data keep)".into(),
        );
        phases[1].change_seconds = Some(14.2);
        phases[2].change = Some("set factory as the default".into());
        phases[2].change_seconds = Some(0.8);
        let mut checks = Vec::new();
        for p in &phases {
            let (label, stage) = (p.label.as_str(), p.phase);
            let run = format!("/systems/{label}/run");
            let mut rows = vec![
                CheckResult::new(
                    "root",
                    Status::Pass,
                    format!("/ is btrfs 3f1c… at {run}"),
                    vec![format!(
                        "/ is btrfs from /dev/vda[{run}], UUID 3f1c…, fsroot {run}, options rw"
                    )],
                ),
                CheckResult::new(
                    "state-mounts",
                    Status::Pass,
                    "2 state subvolumes mounted: /root /srv",
                    vec![],
                ),
                CheckResult::new("fstab", Status::Pass, "findmnt --verify clean", vec![]),
                CheckResult::new(
                    "moved-files",
                    Status::Skip,
                    "not requested (--checks)",
                    vec![],
                ),
                if stage == Stage::Upgrade {
                    CheckResult::new(
                        "overmount",
                        Status::Fail,
                        "files hidden under /srv",
                        vec!["/srv: 3 hidden entries, 63 bytes (/srv/www, /srv/www/index.html, /srv/www/new.html)".into()],
                    )
                } else {
                    CheckResult::new(
                        "overmount",
                        Status::Pass,
                        "no journal entry with MESSAGE_ID 1dee…",
                        vec![],
                    )
                },
            ];
            if stage != Stage::Before {
                let from = if stage == Stage::Upgrade {
                    "before"
                } else {
                    "before, upgrade"
                };
                rows.push(CheckResult::new(
                    "tokens",
                    Status::Pass,
                    format!("token(s) written in {from} intact on the state subvolumes"),
                    vec![
                        format!("/root: tokens from {from} intact on /state/root"),
                        format!("/srv: tokens from {from} intact on /state/srv"),
                    ],
                ));
            }
            checks.extend(rows.into_iter().map(|c| lifecycle::tag(stage, label, c)));
        }
        let mut r = sample(false);
        r.boots = 3;
        r.checks = checks;
        r.warnings = vec![Warning {
            kind: WarningKind::Overmount,
            mountpoint: Some("/srv".into()),
            message: "Directory /srv to mount over is not empty, mounting anyway.".into(),
            shadowed: vec![
                "/srv/www".into(),
                "/srv/www/index.html".into(),
                "/srv/www/new.html".into(),
            ],
            shadowed_count: 3,
            shadowed_bytes: 63,
            unit: Some("srv.mount".into()),
            phase: Some(Stage::Upgrade),
        }];
        r.boot_log = phases
            .iter()
            .zip([31.2, 29.8, 30.5])
            .map(|(p, seconds)| BootRecord {
                boot: p.boot.unwrap(),
                why: p.phase.why().into(),
                via: BootMode::Extlinux,
                seconds: Some(seconds),
                firmware: Some(8.1),
                beside: None,
            })
            .collect();
        r.phases = phases;
        r.verdict = Report::verdict_of(&r.checks, None);
        r
    }

    /// A plain run with persistence: boot 1 through extlinux, the clean
    /// reboot and the fresh start after the power cut direct.
    fn three_boots() -> Report {
        let mut r = sample(false);
        r.checks[5] = CheckResult::new(
            "persistence",
            Status::Pass,
            "tokens survived a clean reboot and a power cut in 5 state dirs",
            vec![],
        );
        r.boots = 3;
        r.boot_log.extend([
            BootRecord {
                boot: 2,
                why: "clean reboot (systemctl reboot)".into(),
                via: BootMode::Direct,
                seconds: Some(17.9),
                firmware: Some(0.4),
                beside: None,
            },
            BootRecord {
                boot: 3,
                why: "fresh start after the power cut".into(),
                via: BootMode::Direct,
                seconds: Some(14.6),
                firmware: Some(0.4),
                beside: None,
            },
        ]);
        r.timings.persistence = 33.8;
        r
    }

    #[test]
    fn three_boots_table() {
        insta::assert_snapshot!(three_boots().to_table());
    }

    #[test]
    fn three_boots_junit() {
        insta::assert_snapshot!(three_boots().to_junit());
    }

    #[test]
    fn three_boots_json_says_how_each_boot_was_made() {
        let json: serde_json::Value = serde_json::from_str(&three_boots().to_json()).unwrap();
        let via: Vec<&str> = json["boot_log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["via"].as_str().unwrap())
            .collect();
        assert_eq!(via, ["extlinux", "direct", "direct"]);
        assert_eq!(
            json["boot_log"][1]["why"],
            "clean reboot (systemctl reboot)"
        );
        assert!(
            json.get("later_boots_fallback").is_none(),
            "absent unless used"
        );
    }

    /// A run with two scenarios: the first boot's rows pass, each
    /// scenario's rows are judged on its own restore of the saved guest.
    fn with_scenarios() -> Report {
        let mut r = sample(false);
        r.timings.save = 1.6;
        r.timings.scenarios = 6.5;
        r.checks.push(CheckResult::new(
            "hidden/overmount",
            Status::Pass,
            "nothing hidden under 5 mountpoint(s)",
            vec![],
        ));
        r.checks.push(CheckResult::new(
            "tmpfs/state-mounts",
            Status::Fail,
            "not mounted as expected: /srv",
            vec!["/srv: fstype tmpfs; fsroot /, expected /state/srv".into()],
        ));
        r.verdict = Report::verdict_of(&r.checks, None);
        r.scenarios = vec![
            ScenarioRecord {
                name: "hidden".into(),
                restore_seconds: 1.5,
                seconds: 3.6,
                error: None,
            },
            ScenarioRecord {
                name: "tmpfs".into(),
                restore_seconds: 0.8,
                seconds: 2.9,
                error: None,
            },
        ];
        r
    }

    #[test]
    fn scenarios_table() {
        insta::assert_snapshot!(with_scenarios().to_table());
    }

    #[test]
    fn scenarios_only_in_the_json_of_a_run_that_had_them() {
        let json: serde_json::Value = serde_json::from_str(&with_scenarios().to_json()).unwrap();
        assert_eq!(json["scenarios"][1]["name"], "tmpfs");
        assert_eq!(json["timings"]["save"], 1.6);
        let plain: serde_json::Value = serde_json::from_str(&sample(false).to_json()).unwrap();
        assert!(plain.get("scenarios").is_none() && plain["timings"].get("save").is_none());
    }

    #[test]
    fn a_fallback_to_extlinux_is_said() {
        let mut r = three_boots();
        for b in &mut r.boot_log {
            b.via = BootMode::Extlinux;
        }
        r.later_boots_fallback = Some(
            "the kernel could not be extracted for a direct boot: btrfs restore failed".into(),
        );
        let table = r.to_table();
        assert!(
            table.contains("Boots: boots 1-3 through the image's extlinux\n"),
            "{table}"
        );
        assert!(
            table.contains("  Later boots not direct: the kernel could not be extracted"),
            "{table}"
        );
        assert!(r
            .to_junit()
            .contains(r#"<property name="later_boots_fallback" value="the kernel could not"#));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(json["later_boots_fallback"]
            .as_str()
            .unwrap()
            .contains("btrfs restore failed"));
    }

    #[test]
    fn boots_are_described_in_groups() {
        let rec = |boot, via| BootRecord {
            boot,
            why: String::new(),
            via,
            seconds: None,
            firmware: None,
            beside: None,
        };
        use BootMode::{Direct, Extlinux};
        assert_eq!(describe_boots(&[]), "");
        assert_eq!(
            describe_boots(&[rec(1, Extlinux)]),
            "boot 1 through the image's extlinux"
        );
        assert_eq!(
            describe_boots(&[rec(1, Extlinux), rec(2, Direct), rec(3, Direct)]),
            "boot 1 through the image's extlinux; boots 2-3 direct kernel boot of the same \
             kernel, initramfs and command line"
        );
        // One later boot could not be direct (the reboot), the next was.
        assert_eq!(
            describe_boots(&[rec(1, Extlinux), rec(2, Extlinux), rec(3, Direct)]),
            "boots 1-2 through the image's extlinux; boot 3 direct kernel boot of the same \
             kernel, initramfs and command line"
        );
        // --boot direct: no bootloader ran, nothing is "the same".
        assert_eq!(
            describe_boots(&[rec(1, Direct), rec(2, Direct)]),
            "boots 1-2 direct kernel boot of the kernel, initramfs and command line of the \
             image's default entry"
        );
    }

    #[test]
    fn lifecycle_table() {
        insta::assert_snapshot!(lifecycle_sample().to_table());
    }

    #[test]
    fn lifecycle_json() {
        insta::assert_snapshot!(lifecycle_sample().to_json());
    }

    #[test]
    fn lifecycle_junit() {
        insta::assert_snapshot!(lifecycle_sample().to_junit());
    }

    #[test]
    fn table_pass() {
        insta::assert_snapshot!(sample(false).to_table());
    }

    #[test]
    fn table_fail_with_overmount_explanation() {
        insta::assert_snapshot!(sample(true).to_table());
    }

    #[test]
    fn json_fail() {
        let r = sample(true);
        assert_eq!(r.verdict, Verdict::Fail);
        insta::assert_snapshot!(r.to_json());
    }

    #[test]
    fn junit_fail() {
        insta::assert_snapshot!(sample(true).to_junit());
    }

    /// What a report says of the accelerator: the table's first line and
    /// timings, the JSON's accel fields, the JUnit properties.
    fn accel_said(r: &Report) -> String {
        let table = r.to_table();
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let junit = r.to_junit();
        let picked = serde_json::json!({
            "accel": json["accel"],
            "accel_requested": json["accel_requested"],
            "accel_reason": json["accel_reason"],
            "accel_kvm_failure": json["accel_kvm_failure"],
            "accel_cache": json["accel_cache"],
            "timings.accel_probe": json["timings"]["accel_probe"],
        });
        let lines = |text: &str, keep: &dyn Fn(&str) -> bool| {
            text.lines()
                .filter(|l| keep(l))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let first_and_timings = |l: &str| l.starts_with("strata test") || l.starts_with("Timings");
        format!(
            "table:\n{}\n\njson:\n{}\n\njunit:\n{}\n",
            lines(&table, &first_and_timings),
            serde_json::to_string_pretty(&picked).unwrap(),
            lines(&junit, &|l| l.contains("property name=\"accel")),
        )
    }

    fn kvm_failure() -> crate::accel::KvmFailure {
        crate::accel::KvmFailure {
            stage: crate::accel::Stage::Bootloader,
            qemu_said: "KVM internal error. Suberror: 1; emulation failure".into(),
            error: "the VM stopped (QMP STOP): QEMU paused the guest, which cannot go on by \
                    itself"
                .into(),
        }
    }

    /// `--accel auto` whose KVM boot 1 failed in this run: where, QEMU's
    /// words, the seconds it cost, and the verdict stored for next time.
    #[test]
    fn kvm_failed_in_this_run() {
        let mut r = sample(false);
        r.accel_reason = "KVM failed at bootloader (KVM internal error. Suberror: 1; emulation \
                          failure); TCG used for this run"
            .into();
        r.accel_kvm_failure = Some(kvm_failure());
        r.accel_cache = Some(crate::accel::cache::CacheUse {
            used: false,
            probed_at: Some("2026-12-06T20:00:00Z".into()),
            file: "/var/cache/strata/kvm-verdict.json".into(),
            note: "no cached verdict yet; stored \"KVM unusable\" for the next runs".into(),
        });
        r.timings.accel_probe = 2.4;
        insta::assert_snapshot!(accel_said(&r));
    }

    /// `--accel auto` trusting the host's cached "KVM unusable": said in the
    /// table's first line and timings, in JSON (`accel_cache`, no attempt
    /// seconds) and in JUnit's properties.
    #[test]
    fn cached_kvm_verdict() {
        let mut r = sample(false);
        r.accel_reason = "KVM failed at bootloader (KVM internal error. Suberror: 1; emulation \
                          failure) (cached verdict of 2026-11-27T04:00:00Z); TCG used for this run"
            .into();
        r.accel_kvm_failure = Some(kvm_failure());
        r.accel_cache = Some(crate::accel::cache::CacheUse {
            used: true,
            probed_at: Some("2026-11-27T04:00:00Z".into()),
            file: "/var/cache/strata/kvm-verdict.json".into(),
            note: "verdict reused; `strata test --accel-probe` tries KVM again".into(),
        });
        r.timings.accel_probe = 0.0;
        insta::assert_snapshot!(accel_said(&r));
    }

    #[test]
    fn infrastructure_error_is_a_failed_verdict() {
        let mut r = sample(false);
        r.error = Some("guest console: \"Kernel panic\"".into());
        r.verdict = Report::verdict_of(&r.checks, r.error.as_deref());
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r
            .to_junit()
            .contains("<error message=\"guest console: &quot;Kernel panic&quot;\"/>"));
    }

    /// The JUnit XML reads back with quick-junit's own parser: what a run
    /// failed with, QEMU's colours and control characters included, stays
    /// well-formed, and the `boot` error case counts as a test.
    #[test]
    fn junit_reads_back_with_an_error_and_control_characters() {
        let mut r = sample(true);
        r.error = Some("guest console: \u{1b}[31m\"Kernel panic\"\u{1b}[0m <&> \u{7}".into());
        let xml = r.to_junit();
        let back = quick_junit::Report::deserialize_from_str(&xml).expect(&xml);
        assert_eq!(
            (back.tests, back.failures, back.errors, back.skipped),
            (7, 2, 1, 1)
        );
        let suite = &back.test_suites[0];
        let boot = suite.test_cases.last().unwrap();
        assert_eq!(boot.name.as_str(), "boot");
        match &boot.status {
            quick_junit::TestCaseStatus::NonSuccess { kind, message, .. } => {
                assert_eq!(*kind, quick_junit::NonSuccessKind::Error);
                assert_eq!(
                    message.as_deref(),
                    Some("guest console: \"Kernel panic\" <&> ")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(suite.properties.len(), 5);
    }

    #[test]
    fn an_interrupted_run_is_marked_in_json_and_junit() {
        let mut r = sample(false);
        assert!(
            !r.to_json().contains("interrupted"),
            "absent unless interrupted"
        );
        r.error = Some("interrupted (SIGINT); QEMU killed".into());
        r.interrupted = Some("SIGINT".into());
        r.verdict = Report::verdict_of(&r.checks, r.error.as_deref());
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["interrupted"], "SIGINT");
        assert_eq!(json["verdict"], "fail");
        assert!(r
            .to_junit()
            .contains(r#"<error message="interrupted (SIGINT); QEMU killed"/>"#));
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(5), "5 bytes");
        assert_eq!(human_bytes(5000), "4.9 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
