//! One `strata test` run as a story: prepare an overlay, pick the
//! accelerator and boot, prove the layout, reboot cleanly, cut the power,
//! prove persistence, and write down what happened. The engine never
//! prints: it reports `Progress` and returns a `Report` or a `RunError`.

use crate::accel::{self, AccelChoice, AccelDecision};
use crate::agent::Running;
use crate::artifacts::{self, Artifacts};
use crate::bootfiles;
use crate::checks::{self, guest, CheckId, Mount, Phase, Vm};
use crate::machine::{Machine, MachineError};
use crate::qemu::{DiskBus, KernelBoot, QemuCommand};
use crate::qmp::EventLog;
use crate::report::{CheckResult, Report, Status, Timings, Warning};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_builder::cmd;
use strata_builder::error::FailureKind;
use strata_builder::expect::Expectations;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    Extlinux,
    Direct,
}

impl BootMode {
    pub fn name(self) -> &'static str {
        match self {
            BootMode::Extlinux => "extlinux",
            BootMode::Direct => "direct",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestConfig {
    pub image: PathBuf,
    /// What the booted image must show.
    pub expect: Expectations,
    pub artifacts: Option<PathBuf>,
    pub accel: AccelChoice,
    pub disk_bus: DiskBus,
    pub boot: BootMode,
    /// Whole run, first QEMU start to verdict.
    pub timeout: Duration,
    /// The checks to run; the rest are reported as skipped.
    pub checks: Vec<CheckId>,
    pub qemu_binary: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
}

impl TestConfig {
    pub fn new(image: PathBuf, expect: Expectations) -> TestConfig {
        TestConfig {
            image,
            expect,
            artifacts: None,
            accel: AccelChoice::Auto,
            disk_bus: DiskBus::VirtioBlk,
            boot: BootMode::Extlinux,
            timeout: Duration::from_secs(600),
            checks: CheckId::ALL.to_vec(),
            qemu_binary: "qemu-system-x86_64".into(),
            memory_mib: 1024,
            cpus: 2,
        }
    }
}

/// What the engine is doing, for the CLI to show.
#[derive(Debug, Clone)]
pub enum Progress {
    Artifacts(PathBuf),
    QemuCommand(String),
    Accel(AccelDecision),
    Booting {
        boot: u32,
        why: &'static str,
    },
    Booted {
        boot: u32,
        seconds: f64,
        state: String,
    },
    CheckStarted(CheckId),
    CheckFinished(CheckResult),
    Step(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad usage or input: exit 2.
    #[error("{0}")]
    Input(String),
    /// QEMU, the agent, a timeout or an image that does not boot: exit 3.
    /// The report (when there is one) has what was proven before it happened.
    #[error("{message}")]
    Infra {
        message: String,
        report: Option<Box<Report>>,
    },
    /// SIGINT or SIGTERM: QEMU was killed (exit 130). The report, marked
    /// interrupted, has what was proven before.
    #[error("{message}")]
    Interrupted {
        message: String,
        report: Option<Box<Report>>,
    },
}

impl strata_builder::error::Failure for RunError {
    fn kind(&self) -> FailureKind {
        match self {
            RunError::Input(_) => FailureKind::Input,
            RunError::Infra { .. } => FailureKind::Infrastructure,
            RunError::Interrupted { .. } => FailureKind::Interrupted,
        }
    }
}

/// How a finished run ended: None when every check passed.
pub fn failure(report: &Report) -> Option<FailureKind> {
    match report.verdict {
        crate::report::Verdict::Pass => None,
        crate::report::Verdict::Fail => Some(FailureKind::Failed),
    }
}

const MAX_BOOT: Duration = Duration::from_secs(240);

struct Session {
    cfg: TestConfig,
    artifacts: Artifacts,
    workdir: crate::workdir::WorkDir,
    progress: UnboundedSender<Progress>,
    events: EventLog,
    started: Instant,
    checks: BTreeMap<CheckId, CheckResult>,
    /// The journal's mount warnings, once the first boot's are known.
    warnings: Option<Vec<Warning>>,
    timings: Timings,
    accel: Option<AccelDecision>,
    template: Option<QemuCommand>,
    /// The running QEMU; kept here so that a run stopped by the timeout
    /// can still take a screendump and quit it.
    machine: Option<Machine>,
    /// What the current boot has shown so far.
    seen: Seen,
    boots: u32,
}

/// Observations of one boot that several checks judge, taken once.
#[derive(Default)]
struct Seen {
    table: Option<Vec<Mount>>,
    journal_export: Option<Running>,
    journal: Option<String>,
}

impl Session {
    fn emit(&self, p: Progress) {
        let _ = self.progress.send(p);
    }

    /// Counts a boot as it starts (so `boots` includes one that fails);
    /// what the previous boot showed no longer holds.
    fn begin_boot(&mut self, why: &'static str) {
        self.boots += 1;
        self.seen = Seen::default();
        self.emit(Progress::Booting {
            boot: self.boots,
            why,
        });
    }

    fn booted(&self, seconds: f64, state: String) {
        self.emit(Progress::Booted {
            boot: self.boots,
            seconds,
            state,
        });
    }

    fn wanted(&self, id: CheckId) -> bool {
        self.cfg.checks.contains(&id)
    }

    fn remaining(&self) -> Duration {
        self.cfg.timeout.saturating_sub(self.started.elapsed())
    }

    fn boot_budget(&self) -> Duration {
        self.remaining().min(MAX_BOOT)
    }

    fn overlay(&self) -> PathBuf {
        self.workdir.path().join("overlay.qcow2")
    }

    /// A fresh qcow2 overlay backed by the image: the image is only read.
    fn create_overlay(&self) -> Result<(), String> {
        recreate_overlay(&self.cfg.image, &self.overlay())
    }

    /// Runs the requested checks of one phase in registry order; returns
    /// how many ran. `expect` is the config's, lent separately because the
    /// session itself is lent to the checks as the machine.
    async fn run_checks(&mut self, phase: Phase, expect: &Expectations) -> Result<usize, String> {
        let ids: Vec<CheckId> = CheckId::ALL
            .into_iter()
            .filter(|id| id.phase() == phase && self.wanted(*id))
            .collect();
        for &id in &ids {
            let t = Instant::now();
            self.emit(Progress::CheckStarted(id));
            let outcome = id.run(self, expect).await.map_err(me)?;
            if let Some(w) = outcome.warnings {
                self.warnings = Some(w);
            }
            self.record(id, outcome.result, t);
        }
        Ok(ids.len())
    }

    fn record(&mut self, id: CheckId, mut c: CheckResult, t: Instant) {
        c.seconds = t.elapsed().as_secs_f64();
        self.emit(Progress::CheckFinished(c.clone()));
        self.checks.insert(id, c);
    }

    fn report(&self, error: Option<String>) -> Report {
        let mut checks = Vec::new();
        for id in CheckId::ALL {
            let name = id.name();
            match self.checks.get(&id) {
                Some(c) => checks.push(c.clone()),
                None if !self.wanted(id) => checks.push(CheckResult::new(
                    name,
                    Status::Skip,
                    "not requested (--checks)",
                    vec![],
                )),
                None => checks.push(CheckResult::new(
                    name,
                    Status::Skip,
                    "not run: the run stopped before it",
                    vec![],
                )),
            }
        }
        let mut timings = self.timings.clone();
        timings.total = self.started.elapsed().as_secs_f64();
        let accel = self.accel.clone();
        Report {
            verdict: Report::verdict_of(&checks, error.as_deref()),
            accel: accel
                .as_ref()
                .map(|a| a.used)
                .unwrap_or(crate::qemu::Accel::Tcg),
            accel_requested: self.cfg.accel,
            accel_reason: accel
                .map(|a| a.reason)
                .unwrap_or_else(|| "not decided: the run stopped before QEMU started".into()),
            boot: self.cfg.boot.name().into(),
            disk_bus: self.cfg.disk_bus,
            boots: self.boots,
            image: self.cfg.image.display().to_string(),
            label: self.cfg.expect.version.label().to_owned(),
            checks,
            warnings: self.warnings.clone().unwrap_or_default(),
            timings,
            artifacts: Some(self.artifacts.dir().display().to_string()),
            error,
            interrupted: None,
        }
    }

    fn save_event_log(&self) {
        let events = self.events.lock().expect("event log poisoned").clone();
        if let Ok(json) = serde_json::to_string_pretty(&events) {
            let _ = self.artifacts.write(artifacts::QMP_EVENTS, json + "\n");
        }
    }
}

/// Validates the inputs; errors here are the user's (exit 2).
fn prepare(cfg: &TestConfig) -> Result<(), RunError> {
    let meta = std::fs::metadata(&cfg.image)
        .map_err(|e| RunError::Input(format!("image {}: {e}", cfg.image.display())))?;
    if !meta.is_file() {
        return Err(RunError::Input(format!(
            "image {} is not a regular file",
            cfg.image.display()
        )));
    }
    Ok(())
}

/// Runs the whole test. Dropping the future (timeout, Ctrl-C) kills QEMU:
/// every `Machine` owns its process with kill-on-drop.
pub async fn run(cfg: TestConfig, progress: UnboundedSender<Progress>) -> Result<Report, RunError> {
    run_until(cfg, progress, std::future::pending()).await
}

/// Like [`run`], but stops when `stop` resolves (to the reason, e.g.
/// "SIGINT"): QEMU is killed and the report so far is still written,
/// marked interrupted (`RunError::Interrupted` carries it).
pub async fn run_until(
    cfg: TestConfig,
    progress: UnboundedSender<Progress>,
    stop: impl std::future::Future<Output = String>,
) -> Result<Report, RunError> {
    prepare(&cfg)?;
    let artifacts = Artifacts::open(cfg.artifacts.as_deref())
        .map_err(|e| RunError::Input(format!("artifacts dir: {e}")))?;
    let workdir =
        crate::workdir::WorkDir::create().map_err(|e| infra(format!("private temp dir: {e}")))?;
    let mut s = Session {
        cfg,
        artifacts,
        workdir,
        progress,
        events: EventLog::default(),
        started: Instant::now(),
        checks: BTreeMap::new(),
        warnings: None,
        timings: Timings::default(),
        accel: None,
        template: None,
        machine: None,
        seen: Seen::default(),
        boots: 0,
    };
    s.emit(Progress::Artifacts(s.artifacts.dir().to_owned()));
    let budget = s.remaining();
    let (outcome, interrupted) = tokio::select! {
        o = tokio::time::timeout(budget, story(&mut s)) => (Some(o), None),
        why = stop => (None, Some(why)),
    };
    let error = match outcome {
        Some(Ok(Ok(()))) => None,
        Some(Ok(Err(e))) => Some(e),
        Some(Err(_)) => Some(format!(
            "timed out after {} s (--timeout)",
            s.cfg.timeout.as_secs()
        )),
        None => Some(interruption(interrupted.as_deref().unwrap_or("?"))),
    };
    let failed = error.is_some() || s.checks.values().any(|c| c.status == Status::Fail);
    if let Some(m) = s.machine.as_mut() {
        // Interrupted: be quick, the user is waiting.
        if failed && interrupted.is_none() {
            let png = s.artifacts.path(artifacts::SCREENDUMP);
            let _ = tokio::time::timeout(Duration::from_secs(5), m.screendump(&png)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), m.qmp().quit()).await;
        m.kill().await;
    }
    s.machine = None;
    s.save_event_log();
    let mut report = s.report(error.clone().map(|e| {
        let tail = tail_of(&s.artifacts.path(artifacts::SERIAL_LOG), 15);
        if tail.is_empty() {
            e
        } else {
            format!(
                "{e}\nlast console lines ({}):\n{tail}",
                artifacts::SERIAL_LOG
            )
        }
    }));
    report.interrupted = interrupted.clone();
    let _ = s.artifacts.write(artifacts::REPORT_JSON, report.to_json());
    match (error, interrupted) {
        (None, _) => Ok(report),
        (Some(_), Some(why)) => Err(RunError::Interrupted {
            message: interruption(&why),
            report: Some(Box::new(report)),
        }),
        (Some(_), None) => Err(RunError::Infra {
            message: report.error.clone().unwrap_or_default(),
            report: Some(Box::new(report)),
        }),
    }
}

fn interruption(signal: &str) -> String {
    format!("interrupted ({signal}); QEMU killed")
}

fn infra(message: String) -> RunError {
    RunError::Infra {
        message,
        report: None,
    }
}

fn tail_of(path: &Path, n: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn me(e: MachineError) -> String {
    e.to_string()
}

async fn story(s: &mut Session) -> Result<(), String> {
    let serial = s
        .artifacts
        .clear_previous()
        .map_err(|e| format!("artifacts: {e}"))?;
    s.create_overlay()?;
    let mut template = QemuCommand::new(
        s.cfg.qemu_binary.clone(),
        crate::qemu::Accel::Tcg,
        s.overlay(),
        s.workdir.path(),
    );
    template.serial_log = serial;
    template.memory_mib = s.cfg.memory_mib;
    template.cpus = s.cfg.cpus;
    template.disk_bus = s.cfg.disk_bus;
    if s.cfg.boot == BootMode::Direct {
        s.emit(Progress::Step(
            "extracting kernel and initramfs from the image".into(),
        ));
        let files = bootfiles::extract(&s.cfg.image, &s.workdir.path().join("boot"))
            .map_err(|e| format!("--boot direct: {e}"))?;
        template.boot = KernelBoot::Direct {
            kernel: files.kernel,
            initrd: files.initrd,
            append: files.entry.append,
        };
    }
    s.template = Some(template.clone());

    // Boot 1: accelerator choice and the layout checks.
    s.begin_boot("first boot");
    let overlay_for_retry = {
        let overlay = s.overlay();
        let image = s.cfg.image.clone();
        move || recreate_overlay(&image, &overlay)
    };
    let (m, decision) = accel::start(s.cfg.accel, &template, s.events.clone(), &overlay_for_retry)
        .await
        .map_err(me)?;
    s.emit(Progress::Accel(decision.clone()));
    s.timings.accel_probe = decision.probe_seconds;
    s.accel = Some(decision);
    let cmd_line = m.command().to_string();
    let _ = s
        .artifacts
        .write(artifacts::QEMU_COMMAND, format!("{cmd_line}\n"));
    s.emit(Progress::QemuCommand(cmd_line));
    s.machine = Some(m);
    let budget = s.boot_budget();
    let state = s.machine().wait_booted(budget).await.map_err(me)?;
    let powered_on = s.machine().started();
    s.timings.boot = powered_on.elapsed().as_secs_f64();
    s.booted(s.timings.boot, state);
    let kernel_start = s.machine().serial().snapshot().kernel_start;
    if let Some(k) = kernel_start {
        s.timings.firmware = Some(k.saturating_duration_since(powered_on).as_secs_f64());
    }
    if let Ok(out) = s
        .machine()
        .succeed("systemctl show -p InitRDTimestampMonotonic -p UserspaceTimestampMonotonic -p FinishTimestampMonotonic")
        .await
    {
        let (kernel, userspace) = systemd_split(&out);
        s.timings.kernel = kernel;
        s.timings.userspace = userspace;
    }

    let expect = s.cfg.expect.clone();
    let t_checks = Instant::now();
    // The journal export is the slowest guest command; it overlaps the checks.
    let export = guest::start_journal_export(s.machine()).await.map_err(me)?;
    s.seen.journal_export = Some(export);
    s.run_checks(Phase::FirstBoot, &expect).await?;
    // The journal is exported whether or not overmount is checked: it is
    // the first thing anyone reads after a failure. Its mount warnings are
    // reported either way; overmount adds what each one hides.
    let journal = s.journal().await.map_err(me)?;
    let warnings = checks::overmount::unexamined(journal);
    s.warnings.get_or_insert(warnings);
    s.timings.checks = t_checks.elapsed().as_secs_f64();

    // Boots 2 and 3: a clean reboot and a power cut, driven by the checks
    // that need them.
    let t = Instant::now();
    if s.run_checks(Phase::Reboots, &expect).await? > 0 {
        s.timings.persistence = t.elapsed().as_secs_f64();
    }
    Ok(())
}

/// The machine as the checks drive it: the current boot's shared
/// observations, taken once, and the reboot and crash of the story.
impl Vm for Session {
    fn machine(&mut self) -> &mut Machine {
        self.machine.as_mut().expect("the machine is running")
    }

    async fn mount_table(&mut self) -> Result<&[Mount], MachineError> {
        if self.seen.table.is_none() {
            let table = guest::mount_table(self.machine()).await?;
            self.seen.table = Some(table);
        }
        Ok(self.seen.table.as_deref().unwrap_or_default())
    }

    async fn journal(&mut self) -> Result<&str, MachineError> {
        if self.seen.journal.is_none() {
            let running = match self.seen.journal_export.take() {
                Some(r) => r,
                None => guest::start_journal_export(self.machine()).await?,
            };
            let journal = guest::finish_journal_export(self.machine(), &running).await?;
            let _ = self
                .artifacts
                .write(&artifacts::journal(self.boots), &journal);
            self.seen.journal = Some(journal);
        }
        Ok(self.seen.journal.as_deref().unwrap_or_default())
    }

    async fn reboot(&mut self) -> Result<(), MachineError> {
        self.begin_boot("clean reboot (systemctl reboot)");
        let t = Instant::now();
        let budget = self.boot_budget();
        let state = self.machine().reboot(budget).await?;
        self.booted(t.elapsed().as_secs_f64(), state);
        self.overmount_again().await
    }

    async fn crash(&mut self) -> Result<(), MachineError> {
        self.emit(Progress::Step("sync, then power cut (QMP quit)".into()));
        let m = self.machine.take().expect("the machine is running");
        m.power_cut().await?;
        self.begin_boot("fresh start after the power cut");
        let t = Instant::now();
        let template = self.template.clone().expect("template set");
        let cmd = QemuCommand {
            accel: self
                .accel
                .as_ref()
                .map(|a| a.used)
                .unwrap_or(template.accel),
            ..template
        };
        self.machine = Some(Machine::start(cmd, self.events.clone()).await?);
        let budget = self.boot_budget();
        let state = self.machine().wait_booted(budget).await?;
        self.booted(t.elapsed().as_secs_f64(), state);
        self.overmount_again().await
    }
}

impl Session {
    /// overmount judges every boot of the run, not only the first: after a
    /// later boot it looks again, and its verdict takes this boot in.
    async fn overmount_again(&mut self) -> Result<(), MachineError> {
        let Some(earlier) = self.checks.get(&CheckId::Overmount).cloned() else {
            return Ok(());
        };
        let t = Instant::now();
        let boot = self.boots;
        self.emit(Progress::Step(format!(
            "overmount: looking again in boot {boot}"
        )));
        let warnings = self.warnings.take().unwrap_or_default();
        let (mut result, warnings) =
            checks::overmount::again(self, boot, earlier, warnings).await?;
        result.seconds += t.elapsed().as_secs_f64();
        self.warnings = Some(warnings);
        self.emit(Progress::CheckFinished(result.clone()));
        self.checks.insert(CheckId::Overmount, result);
        Ok(())
    }
}

/// A fresh qcow2 overlay backed by the image (the image is only read).
fn recreate_overlay(image: &Path, overlay: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(overlay);
    let backing =
        std::path::absolute(image).map_err(|e| format!("image {}: {e}", image.display()))?;
    cmd::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&backing)
            .arg(overlay),
    )
    .map(drop)
    .map_err(|e| e.to_string())
}

/// (kernel incl. initramfs, userspace) in seconds from systemd's monotonic
/// boot timestamps (µs since the kernel started), as systemd-analyze does.
pub fn systemd_split(show: &str) -> (Option<f64>, Option<f64>) {
    let get = |key: &str| -> Option<f64> {
        show.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
    };
    let userspace_start = get("UserspaceTimestampMonotonic");
    let finish = get("FinishTimestampMonotonic");
    let kernel = userspace_start.map(|u| u / 1e6);
    let userspace = match (userspace_start, finish) {
        (Some(u), Some(f)) => Some((f - u) / 1e6),
        _ => None,
    };
    (kernel, userspace)
}

/// A blocking entry point for the CLI: builds the runtime, and turns SIGINT
/// and SIGTERM into an orderly stop (QEMU killed, artifacts kept).
pub fn run_blocking(
    cfg: TestConfig,
    mut on_progress: impl FnMut(Progress),
) -> Result<Report, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| infra(format!("tokio runtime: {e}")))?;
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let signals = crate::interrupt::Signals::install()
            .map_err(|e| infra(format!("signal handlers: {e}")))?;
        let fut = run_until(cfg, tx, signals.first());
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => {
                    while let Ok(p) = rx.try_recv() { on_progress(p); }
                    return r;
                }
                Some(p) = rx.recv() => on_progress(p),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_builder::error::Failure;

    #[test]
    fn systemd_timestamps_split() {
        let show = "InitRDTimestampMonotonic=1900000\nUserspaceTimestampMonotonic=7700000\nFinishTimestampMonotonic=21300000\n";
        assert_eq!(systemd_split(show), (Some(7.7), Some(13.6)));
        assert_eq!(systemd_split("FinishTimestampMonotonic=0\n"), (None, None));
    }

    fn expectations() -> Expectations {
        crate::checks::testdata::expectations()
    }

    #[test]
    fn overlay_errors_carry_the_command_and_its_complaint() {
        let dir = tempfile::tempdir().unwrap();
        let err = recreate_overlay(
            &dir.path().join("missing.img"),
            &dir.path().join("overlay.qcow2"),
        )
        .unwrap_err();
        // Without qemu-img installed the runner says so instead.
        assert!(
            err.contains("qemu-img create -q -f qcow2 -F raw -b") && err.contains("missing.img")
                || err.contains("qemu-img not found"),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_are_exit_2() {
        let cfg = TestConfig::new("/nonexistent/x.img".into(), expectations());
        assert_eq!(prepare(&cfg).unwrap_err().kind(), FailureKind::Input);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TestConfig::new(dir.path().to_owned(), expectations());
        assert_eq!(prepare(&cfg).unwrap_err().kind(), FailureKind::Input);
        let img = dir.path().join("x.img");
        std::fs::write(&img, b"").unwrap();
        cfg.image = img;
        assert!(prepare(&cfg).is_ok());
    }
}
