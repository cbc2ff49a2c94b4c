//! One `strata test` run as a story: prepare an overlay, pick the
//! accelerator and boot, prove the layout, reboot cleanly, cut the power,
//! prove persistence, and write down what happened. The engine never
//! prints: it reports `Progress` and returns a `Report` or a `RunError`.
//! With `TestConfig::lifecycle` the same session tells the upgrade
//! lifecycle instead (`lifecycle`): three boots of a private copy.

mod lifecycle;
mod power_cut;
mod scenario;

pub use scenario::{valid_name, Scenario};

use crate::accel::{self, AccelChoice, AccelDecision};
use crate::agent::Running;
use crate::artifacts::{self, Artifacts};
use crate::bootfiles;
use crate::checks::user::{self, When};
use crate::checks::{self, guest, CheckId, Mount, Phase, Vm};
use crate::checks::{boot_health, shutdown, state_contract};
use crate::lifecycle::{self as life, Lifecycle, Row};
use crate::machine::{Machine, MachineError, SavedState};
use crate::qemu::{Accel, BootMode, DiskBus, DiskFormat, KernelBoot, QemuCommand};
use crate::qmp::EventLog;
use crate::report::{
    BootRecord, CheckResult, PhaseRecord, Report, ScenarioRecord, Status, Timings, Warning,
};
use crate::stage::Stage;
use crate::workdir::{self, WorkDir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_builder::error::FailureKind;
use strata_builder::expect::Expectations;
use strata_builder::host::cmd;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, Clone)]
pub struct TestConfig {
    pub image: PathBuf,
    /// What the booted image must show.
    pub expect: Expectations,
    pub artifacts: Option<PathBuf>,
    pub accel: AccelChoice,
    /// The host's stored KVM verdict, for `--accel auto` (None: always probe).
    pub kvm_cache: Option<accel::cache::KvmCache>,
    pub disk_bus: DiskBus,
    pub boot: BootMode,
    /// How the plain run's later boots (the clean reboot, the fresh start
    /// after the power cut) are made when `boot` is extlinux. The
    /// bootloader is proven by boot 1; `Direct` hands the later boots the
    /// same kernel, initramfs and command line without firmware and
    /// extlinux reading them through BIOS disk calls (seconds per boot
    /// under TCG). An upgrade lifecycle ignores it: every one of its boots
    /// proves the default flip through the bootloader.
    pub later_boots: BootMode,
    /// Whole run, first QEMU start to verdict.
    pub timeout: Duration,
    /// The checks to run; the rest are reported as skipped.
    pub checks: Vec<CheckId>,
    pub qemu_binary: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Run the upgrade lifecycle (`strata test --upgrade-to`) on a private
    /// copy of the image instead of the plain test: the first-boot checks
    /// in each of its three boots (`persistence` is not run).
    pub lifecycle: Option<Lifecycle>,
    /// Changes made in the running guest, each in its own restore of the
    /// guest saved after boot 1's checks, judged by its checks without a
    /// boot of its own (`scenario`).
    pub scenarios: Vec<Scenario>,
    /// Guest commands run once after boot 1, before any check (`[[setup]]`):
    /// the data the user cares about, services enabled.
    pub setup: Vec<String>,
    /// The user's own checks, each in the phases it names.
    pub user_checks: Vec<crate::checks::user::UserCheck>,
    /// Guest paths (globs allowed) recorded after setup and compared after
    /// every later phase (`[state] preserve`, the `state-contract` check).
    pub preserve: Vec<String>,
    /// boot-health excuses console and journal lines matching these.
    pub boot_health_ignore: Vec<regex::Regex>,
    /// The plain run's power cut boots beside its clean reboot: its disk
    /// is taken once the tokens are synced, and its cold boot runs while
    /// the clean reboot does (default: when the host has two CPUs or more).
    pub power_cut_beside: bool,
}

impl TestConfig {
    pub fn new(image: PathBuf, expect: Expectations) -> TestConfig {
        TestConfig {
            image,
            expect,
            artifacts: None,
            accel: AccelChoice::Auto,
            kvm_cache: Some(Default::default()),
            disk_bus: DiskBus::VirtioBlk,
            boot: BootMode::Extlinux,
            later_boots: BootMode::Direct,
            timeout: Duration::from_secs(600),
            checks: CheckId::ALL.to_vec(),
            qemu_binary: "qemu-system-x86_64".into(),
            memory_mib: 1024,
            cpus: 2,
            lifecycle: None,
            scenarios: Vec::new(),
            setup: Vec::new(),
            user_checks: Vec::new(),
            preserve: Vec::new(),
            boot_health_ignore: Vec::new(),
            power_cut_beside: std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
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
        via: BootMode,
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
    /// The lifecycle's image change refused its input (the upgrade's
    /// rootfs or label) once the run had begun: exit 2, as `strata upgrade`
    /// would. The report has what was proven before.
    #[error("{message}")]
    Refused {
        message: String,
        report: Option<Box<Report>>,
    },
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
            RunError::Input(_) | RunError::Refused { .. } => FailureKind::Input,
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
    workdir: WorkDir,
    /// What QEMU boots: an overlay in `workdir`, or the lifecycle's copy.
    disk: Disk,
    /// The directory holding the lifecycle's copy (pid-named and locked
    /// like `workdir`, so a killed run's copy is swept by the next run);
    /// removed with it.
    _copy_dir: Option<WorkDir>,
    progress: UnboundedSender<Progress>,
    events: EventLog,
    started: Instant,
    checks: BTreeMap<CheckId, CheckResult>,
    /// The journal's mount warnings, once the first boot's are known; in
    /// a lifecycle each stage's boot's.
    warnings: BTreeMap<Option<Stage>, Vec<Warning>>,
    timings: Timings,
    accel: Option<AccelDecision>,
    template: Option<QemuCommand>,
    /// The running QEMU; kept here so that a run stopped by the timeout
    /// can still take a screendump and quit it.
    machine: Option<Machine>,
    /// What the current boot has shown so far.
    seen: Seen,
    boots: u32,
    /// How each boot so far was made, and how long it took.
    boot_log: Vec<BootRecord>,
    /// The later boots' direct kernel boot (`TestConfig::later_boots`),
    /// extracted from the image at the first later boot; Err says why
    /// they go through extlinux after all.
    later: Option<Result<KernelBoot, String>>,
    /// Why a later boot went through extlinux although asked to be direct.
    later_fallback: Option<String>,
    /// The lifecycle's stages and rows (empty in a plain run).
    life: LifeState,
    /// The scenarios' rows, in the order they ran.
    scenario_rows: Vec<CheckResult>,
    /// The booted guest the scenarios start from (saved after boot 1's
    /// checks when there are scenarios).
    saved: Option<SavedState>,
    /// The scenario whose guest is running, if one is, and how many boots
    /// that guest has had (1: the saved one).
    scenario: Option<String>,
    scenario_boots: u32,
    /// How each scenario went, in order.
    scenario_log: Vec<ScenarioRecord>,
    /// The newest QEMU's stdout and stderr (an artifact): its last lines
    /// go into the message of an infrastructure failure.
    last_qemu_log: Option<PathBuf>,
    /// The plain run's user-check rows (`PHASE/NAME`) and a failed setup's
    /// row, in the order they ran.
    user_rows: Vec<CheckResult>,
    /// The `[state] preserve` paths as recorded after setup: what every
    /// later phase is compared with (the `state-contract` check).
    contract_base: Option<state_contract::Record>,
    /// The plain run's comparisons, one per later phase.
    contract_rows: Vec<CheckResult>,
    /// Where each boot's console starts in the serial log (its size when
    /// the boot began: before a reboot's `systemctl reboot`), by boot, and
    /// where the running scenario's restored guest starts.
    console_marks: BTreeMap<u32, (PathBuf, u64)>,
    scenario_mark: Option<u64>,
    /// What each boot of the run (not a scenario's) showed besides its
    /// console, for boot-health: its journal and `systemctl --failed`.
    boot_seen: BTreeMap<u32, (Option<String>, Option<String>)>,
    /// The judged shutdowns of the clean reboots (and a lifecycle's
    /// poweroffs), newest last.
    shutdowns: Vec<CheckResult>,
    /// The power cut's cold boot, running beside the clean reboot until
    /// `crash` takes it over (`TestConfig::power_cut_beside`).
    cut_branch: Option<(Machine, Instant)>,
    /// The power-cut matrix's rows, one per cut point.
    cut_rows: Vec<CheckResult>,
}

/// What an upgrade lifecycle has done so far.
#[derive(Default)]
struct LifeState {
    /// The stage whose boot is running and the version it must run.
    current: Option<(Stage, String)>,
    phases: Vec<PhaseRecord>,
    results: life::Results,
    /// The first boot's start (guest clock): the system has been running
    /// off the copy since, so state it rewrote then is no finding later.
    running_since: Option<f64>,
    /// Resolves when the image change in progress (on its blocking thread)
    /// has returned; None when no change runs.
    changing: Option<lifecycle::InFlight>,
    /// The kind of the error that ended the story, when the story knew it
    /// (its errors are messages): a refused upgrade is bad input. None:
    /// infrastructure, as every other error of the story.
    error_kind: Option<FailureKind>,
}

/// The disk QEMU boots and how to make it from the image.
#[derive(Debug, Clone)]
struct Disk {
    path: PathBuf,
    /// Qcow2: an overlay backed by the image (the plain run: the image is
    /// only read). Raw: a private copy (the lifecycle changes it offline
    /// between boots, so no overlay is needed).
    format: DiskFormat,
}

impl Disk {
    /// Makes the disk what the image is, afresh (the KVM fallback's
    /// second start, from a blocking closure).
    fn recreate(&self, image: &Path) -> Result<(), String> {
        match self.format {
            DiskFormat::Qcow2 => recreate_overlay(image, &self.path),
            DiskFormat::Raw => {
                let _ = std::fs::remove_file(&self.path);
                cmd::run(&mut copy_command(image, &self.path))
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The same at the start of the run. The copy of a raw image takes
    /// a while (GiBs where reflinks do not work): `cp` runs as a child a
    /// stop kills (on drop, and with strata if it is SIGKILLed), so a
    /// signal meanwhile still ends the run at once with its report.
    async fn create(&self, image: &Path) -> Result<(), String> {
        if self.format == DiskFormat::Qcow2 {
            return self.recreate(image);
        }
        let _ = std::fs::remove_file(&self.path);
        let std_cmd = copy_command(image, &self.path);
        let what = cmd::describe(&std_cmd);
        let mut c = tokio::process::Command::from(std_cmd);
        c.stdin(std::process::Stdio::null());
        crate::qemu::tie_to_us(&mut c);
        let out = c
            .output()
            .await
            .map_err(|e| cmd::spawn_error("cp".into(), e).to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(cmd::CmdError::Failed {
                command: what,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }
            .to_string())
        }
    }
}

/// Observations of one boot that several checks judge, taken once.
#[derive(Default)]
struct Seen {
    table: Option<Vec<Mount>>,
    journal_export: Option<Running>,
    journal: Option<String>,
    /// Checks' observations running in the guest beside the checks before
    /// them (`run_checks`).
    started: Vec<(CheckId, checks::Started)>,
}

impl Session {
    fn emit(&self, p: Progress) {
        let _ = self.progress.send(p);
    }

    /// Counts a boot as it starts (so `boots` includes one that fails);
    /// what the previous boot showed no longer holds.
    fn begin_boot(&mut self, why: &'static str, via: BootMode) {
        self.boots += 1;
        // A scenario's guest reboots too: the report says whose boot it was.
        let why_logged = match &self.scenario {
            Some(sc) => {
                self.scenario_boots += 1;
                format!("scenario {sc}: {why}")
            }
            None => why.into(),
        };
        self.boot_log.push(BootRecord {
            boot: self.boots,
            why: why_logged,
            via,
            seconds: None,
            firmware: None,
            beside: None,
        });
        self.seen = Seen::default();
        if self.scenario.is_none() {
            let at = self.console_size();
            let log = self.serial_log();
            self.console_marks.insert(self.boots, (log, at));
        }
        if let Some((stage, _)) = &self.life.current {
            let boot = self.boots;
            if let Some(p) = self.life.phases.iter_mut().find(|p| p.phase == *stage) {
                p.boot = Some(boot);
            }
        }
        self.emit(Progress::Booting {
            boot: self.boots,
            why,
            via,
        });
    }

    fn booted(&mut self, seconds: f64, state: String) {
        let firmware = self.machine.as_ref().and_then(|m| {
            let k = m.serial().snapshot().kernel_start?;
            Some(k.saturating_duration_since(m.started()).as_secs_f64())
        });
        if let Some(r) = self.boot_log.last_mut() {
            r.seconds = Some(seconds);
            r.firmware = firmware;
        }
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

    /// Runs the requested checks of one phase in registry order; returns
    /// how many ran. `expect` is the config's, lent separately because the
    /// session itself is lent to the checks as the machine.
    async fn run_checks(&mut self, phase: Phase, expect: &Expectations) -> Result<usize, String> {
        let ids: Vec<CheckId> = CheckId::ALL
            .into_iter()
            .filter(|id| id.phase() == phase && self.wanted(*id))
            .collect();
        self.start_observations(&ids, expect).await.map_err(me)?;
        for &id in &ids {
            let t = Instant::now();
            self.emit(Progress::CheckStarted(id));
            let outcome = id.run(self, expect).await.map_err(me)?;
            if let Some(w) = outcome.warnings {
                self.set_warnings(w, true);
            }
            self.record(Row::Check(id), outcome.result, t);
        }
        Ok(ids.len())
    }

    /// Starts the slow guest observations of `ids` (`CheckId::start`), so
    /// that they run in the guest while the checks before them do. The
    /// mount table is read first: moved-files mounts the top-level
    /// subvolume (under /run) while it runs, and the checks judge the table
    /// the boot left. When it cannot be read, nothing is started: each
    /// check then meets the failure itself and judges it. The checks only
    /// read, so running side by side changes nothing any of them sees.
    async fn start_observations(
        &mut self,
        ids: &[CheckId],
        expect: &Expectations,
    ) -> Result<(), MachineError> {
        if self.mount_table().await.is_err() {
            return Ok(());
        }
        for &id in ids {
            if let Some(started) = id.start(self, expect).await? {
                self.seen.started.push((id, started));
            }
        }
        Ok(())
    }

    /// Keeps a result: the plain run's, or the current lifecycle stage's
    /// (named `<stage>/<check>`).
    fn record(&mut self, row: Row, mut c: CheckResult, t: Instant) {
        c.seconds = t.elapsed().as_secs_f64();
        if let Some((stage, label)) = &self.life.current {
            c = life::tag(*stage, label, c);
        }
        self.emit(Progress::CheckFinished(c.clone()));
        match (&self.life.current, row) {
            (Some((stage, _)), row) => {
                self.life.results.insert((*stage, row), c);
            }
            (None, Row::Check(id)) => {
                self.checks.insert(id, c);
            }
            (None, Row::User(_)) => self.user_rows.push(c),
            (None, Row::Tokens) => unreachable!("tokens are only written in a lifecycle"),
        }
    }

    /// This boot's journal warnings: `examined` ones (overmount listed
    /// what each hides) replace what is known; unexamined ones are kept
    /// only when nothing is known yet.
    fn set_warnings(&mut self, mut w: Vec<Warning>, examined: bool) {
        let stage = self.life.current.as_ref().map(|(s, _)| *s);
        for x in &mut w {
            x.phase = stage;
        }
        if examined {
            self.warnings.insert(stage, w);
        } else {
            self.warnings.entry(stage).or_insert(w);
        }
    }

    fn any_failed(&self) -> bool {
        self.checks
            .values()
            .chain(self.life.results.values())
            .chain(&self.scenario_rows)
            .chain(&self.user_rows)
            .chain(&self.cut_rows)
            .any(|c| c.status == Status::Fail)
    }

    /// The plain run's rows: every check in registry order, a skip row
    /// saying why for those that did not run.
    fn plain_rows(&self) -> Vec<CheckResult> {
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
                None if id == CheckId::StateContract && self.cfg.preserve.is_empty() => checks
                    .push(CheckResult::new(
                        name,
                        Status::Skip,
                        "no [state] preserve paths to hold to",
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
        checks.extend(self.user_rows.iter().cloned());
        checks.extend(self.scenario_rows.iter().cloned());
        checks
    }

    fn report(&self, error: Option<String>) -> Report {
        let checks = match self.cfg.lifecycle {
            None => self.plain_rows(),
            Some(_) => {
                let mut rows = life::rows(
                    &self.life.phases,
                    &self.cfg.checks,
                    &self.cfg.user_checks,
                    !self.cfg.preserve.is_empty() && self.wanted(CheckId::StateContract),
                    &self.life.results,
                );
                // A failed setup's row, the power-cut matrix.
                rows.extend(self.user_rows.iter().cloned());
                rows.extend(power_cut::rows(self));
                rows
            }
        };
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
            accel_cache: accel.as_ref().and_then(|a| a.cache.clone()),
            accel_kvm_failure: accel.as_ref().and_then(|a| a.kvm_failure.clone()),
            accel_reason: accel
                .map(|a| a.reason)
                .unwrap_or_else(|| "not decided: the run stopped before QEMU started".into()),
            boot: self.cfg.boot.name().into(),
            disk_bus: self.cfg.disk_bus,
            boots: self.boots,
            boot_log: self.boot_log.clone(),
            later_boots_fallback: self.later_fallback.clone(),
            image: self.cfg.image.display().to_string(),
            label: self.cfg.expect.version.label().to_owned(),
            checks,
            // Keyed by stage: the plain run's under None, a lifecycle's in
            // stage order.
            warnings: self.warnings.values().flatten().cloned().collect(),
            timings,
            artifacts: Some(self.artifacts.dir().display().to_string()),
            error,
            interrupted: None,
            phases: self.life.phases.clone(),
            scenarios: self.scenario_log.clone(),
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
    scenario::validate(&cfg.scenarios, cfg.lifecycle.is_some())?;
    validate_user_checks(cfg)?;
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

/// Whether a plain run has its reboot and power-cut boots: a check that
/// needs them (persistence, shutdown), paths to preserve across them, or a
/// user check that names one of their phases. (A user check with default
/// phases runs in them when they happen; it does not make them happen.)
pub fn plain_run_reboots(cfg: &TestConfig) -> bool {
    let wants = |id| cfg.checks.contains(&id);
    wants(CheckId::Persistence)
        || wants(CheckId::Shutdown)
        || (!cfg.preserve.is_empty() && wants(CheckId::StateContract))
        || cfg.user_checks.iter().any(|c| {
            c.phases
                .as_ref()
                .is_some_and(|p| p.contains(&When::Reboot) || p.contains(&When::PowerCut))
        })
}

/// The phases a run has: a plain run boots, reboots and loses power; a
/// lifecycle boots the image's version, the upgrade and the rollback.
pub fn phases_of(lifecycle: bool) -> [When; 3] {
    match lifecycle {
        false => [When::Boot, When::Reboot, When::PowerCut],
        true => [When::Boot, When::Upgrade, When::Rollback],
    }
}

/// User checks the run could not run as asked are the caller's mistake
/// (exit 2), found before anything starts: a name taken twice or by a
/// built-in check, a phase the run does not have, a scenario naming a
/// check nobody defined.
fn validate_user_checks(cfg: &TestConfig) -> Result<(), RunError> {
    let has = phases_of(cfg.lifecycle.is_some());
    let mut names: Vec<&str> = Vec::new();
    for c in &cfg.user_checks {
        if c.name.parse::<CheckId>().is_ok() {
            return Err(RunError::Input(format!(
                "user check {:?}: a built-in check has that name",
                c.name
            )));
        }
        if names.contains(&c.name.as_str()) {
            return Err(RunError::Input(format!(
                "user check {:?} defined twice",
                c.name
            )));
        }
        names.push(&c.name);
        if c.run.is_none() && c.wait_for_unit.is_none() {
            return Err(RunError::Input(format!(
                "user check {:?} has neither a command nor a unit to wait for",
                c.name
            )));
        }
        for w in c.phases.iter().flatten() {
            if !has.contains(w) {
                return Err(RunError::Input(format!(
                    "user check {:?}: this run has no phase {w} (it has: {})",
                    c.name,
                    has.map(When::name).join(", ")
                )));
            }
        }
    }
    for sc in &cfg.scenarios {
        if let Some(n) = sc.user_checks.iter().find(|n| !names.contains(&n.as_str())) {
            return Err(RunError::Input(format!(
                "scenario {:?} names the check {n:?}, which is neither built in nor defined",
                sc.name
            )));
        }
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
    // The image is read (an overlay's backing file, or the lifecycle's
    // copy) until QEMU is gone: no strata may change it meanwhile, and a
    // run does not start on an image a strata is changing. Held to the
    // end of this function, after QEMU is killed.
    let _image_lock = match strata_builder::lock::ImageLock::shared(&cfg.image) {
        Ok(lock) => Some(lock),
        // A filesystem without flock (some NFS, 9p, FUSE mounts): a reader
        // goes on unlocked rather than not at all.
        Err(strata_builder::lock::LockError::Lock { .. }) => None,
        Err(e) => {
            return Err(match strata_builder::error::Failure::kind(&e) {
                FailureKind::Input => RunError::Input(e.to_string()),
                _ => infra(e.to_string()),
            })
        }
    };
    let artifacts = Artifacts::open(cfg.artifacts.as_deref())
        .map_err(|e| RunError::Input(format!("artifacts dir: {e}")))?;
    let workdir = WorkDir::create().map_err(|e| infra(format!("private temp dir: {e}")))?;
    let (disk, copy_dir) = match cfg.lifecycle {
        None => (
            Disk {
                path: workdir.path().join("overlay.qcow2"),
                format: DiskFormat::Qcow2,
            },
            None,
        ),
        Some(_) => {
            let dir = private_dir(&cfg.image).map_err(infra)?;
            let name = cfg
                .image
                .file_name()
                .unwrap_or_else(|| std::ffi::OsStr::new("image.img"));
            let disk = Disk {
                path: dir.path().join(name),
                format: DiskFormat::Raw,
            };
            (disk, Some(dir))
        }
    };
    let mut s = Session {
        cfg,
        artifacts,
        workdir,
        disk,
        _copy_dir: copy_dir,
        progress,
        events: EventLog::default(),
        started: Instant::now(),
        checks: BTreeMap::new(),
        warnings: BTreeMap::new(),
        timings: Timings::default(),
        accel: None,
        template: None,
        machine: None,
        seen: Seen::default(),
        boots: 0,
        boot_log: Vec::new(),
        later: None,
        later_fallback: None,
        life: LifeState::default(),
        scenario_rows: Vec::new(),
        saved: None,
        scenario: None,
        scenario_boots: 0,
        scenario_log: Vec::new(),
        last_qemu_log: None,
        user_rows: Vec::new(),
        contract_base: None,
        contract_rows: Vec::new(),
        console_marks: BTreeMap::new(),
        scenario_mark: None,
        boot_seen: BTreeMap::new(),
        shutdowns: Vec::new(),
        cut_branch: None,
        cut_rows: Vec::new(),
    };
    if let Some(l) = &s.cfg.lifecycle {
        s.life.phases = life::plan(s.cfg.expect.version.label(), &l.label);
    }
    s.emit(Progress::Artifacts(s.artifacts.dir().to_owned()));
    let budget = s.remaining();
    let (outcome, interrupted) = tokio::select! {
        o = tokio::time::timeout(budget, story(&mut s)) => (Some(o), None),
        why = stop => (None, Some(why)),
    };
    // Stopped by the timeout or the stop future, not at the story's end.
    let stopped = !matches!(outcome, Some(Ok(_)));
    // Only an error the story returned has the kind it noted.
    let refused =
        matches!(outcome, Some(Ok(Err(_)))) && s.life.error_kind == Some(FailureKind::Input);
    let error = match outcome {
        Some(Ok(Ok(()))) => None,
        Some(Ok(Err(e))) => Some(e),
        Some(Err(_)) => Some(format!(
            "timed out after {} s (--timeout)",
            s.cfg.timeout.as_secs()
        )),
        None => Some(interruption(interrupted.as_deref().unwrap_or("?"))),
    };
    // Stopped by the timeout or a signal: a lifecycle's image change in
    // progress runs on a blocking thread that dropping the story cannot
    // stop. Raise its interrupt and let it undo what it began before the
    // report is written and its copy removed.
    if stopped {
        s.stop_change().await;
    }
    let failed = error.is_some() || s.any_failed();
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
    let mut report = s.report(error.clone().map(|mut e| {
        let tail = tail_of(&s.artifacts.path(artifacts::SERIAL_LOG), 15);
        if !tail.is_empty() {
            e = format!(
                "{e}\nlast console lines ({}):\n{tail}",
                artifacts::SERIAL_LOG
            );
        }
        // QEMU's own last words: why it stopped, exited or aborted.
        if let Some(log) = &s.last_qemu_log {
            let said = crate::qemu_output::last_lines(
                &crate::machine::read_tail(log),
                crate::machine::OUTPUT_TAIL_LINES,
            );
            // A QEMU that exited already said them in the error itself
            // (MachineError::Exited carries the same tail): not twice.
            if !said.is_empty() && !e.contains(&said) {
                let name = log.file_name().unwrap_or_default().to_string_lossy();
                e = format!("{e}\nlast QEMU output lines ({name}):\n{said}");
            }
        }
        e
    }));
    report.interrupted = interrupted.clone();
    let _ = s.artifacts.write(artifacts::REPORT_JSON, report.to_json());
    match (error, interrupted) {
        (None, _) => Ok(report),
        (Some(_), Some(why)) => Err(RunError::Interrupted {
            message: interruption(&why),
            report: Some(Box::new(report)),
        }),
        (Some(_), None) if refused => Err(RunError::Refused {
            message: report.error.clone().unwrap_or_default(),
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

/// Whether the plain run's later boots are direct: asked for, after a boot
/// 1 through extlinux (with `--boot direct` every boot is direct anyway),
/// and never in a lifecycle, whose every boot proves the default flip
/// through the bootloader.
fn later_boots_direct(cfg: &TestConfig) -> bool {
    cfg.lifecycle.is_none() && cfg.boot == BootMode::Extlinux && cfg.later_boots == BootMode::Direct
}

/// `--boot direct`: the kernel, initramfs and command line of `image`'s
/// default boot entry, extracted into `dir`.
fn direct_boot(image: &Path, dir: &Path) -> Result<KernelBoot, bootfiles::BootFilesError> {
    let files = bootfiles::extract(image, dir)?;
    Ok(KernelBoot::Direct {
        kernel: files.kernel,
        initrd: files.initrd,
        append: files.entry.append,
    })
}

async fn story(s: &mut Session) -> Result<(), String> {
    let serial = s
        .artifacts
        .clear_previous()
        .map_err(|e| format!("artifacts: {e}"))?;
    if s.disk.format == DiskFormat::Raw {
        s.emit(Progress::Step(format!(
            "copying the image to {} (the image itself is not modified)",
            s.disk.path.display()
        )));
    }
    s.disk.create(&s.cfg.image).await?;
    let mut template = QemuCommand::new(
        s.cfg.qemu_binary.clone(),
        crate::qemu::Accel::Tcg,
        s.disk.path.clone(),
        s.workdir.path(),
    );
    template.disk_format = s.disk.format;
    template.serial_log = serial;
    template.memory_mib = s.cfg.memory_mib;
    template.cpus = s.cfg.cpus;
    template.disk_bus = s.cfg.disk_bus;
    if s.cfg.boot == BootMode::Direct {
        s.emit(Progress::Step(
            "extracting kernel and initramfs from the image".into(),
        ));
        template.boot = direct_boot(&s.cfg.image, &s.workdir.path().join("boot"))
            .map_err(|e| format!("--boot direct: {e}"))?;
    }
    if let Some(g) = s.cfg.lifecycle.as_ref().and_then(|l| l.in_guest.clone()) {
        template.payload = Some(lifecycle::payload_for(s, &g).await?);
    }
    s.template = Some(template);
    match s.cfg.lifecycle.clone() {
        None => plain_story(s).await,
        Some(l) => match l.power_cut.clone() {
            None => lifecycle::story(s, l).await,
            Some(plan) => power_cut::story(s, l, plan).await,
        },
    }
}

/// The plain test: the layout checks on the first boot, then the checks
/// that reboot and cut the power.
async fn plain_story(s: &mut Session) -> Result<(), String> {
    s.first_boot("first boot").await?;
    if !s.setup().await? {
        return Ok(());
    }
    let expect = s.cfg.expect.clone();
    let t_checks = Instant::now();
    s.layout_checks(&expect).await?;
    s.user_checks(When::Boot).await.map_err(me)?;
    s.record_contract().await?;
    s.timings.checks = t_checks.elapsed().as_secs_f64();
    // The scenarios start from this moment: saved before the reboots.
    if !s.cfg.scenarios.is_empty() {
        s.save_for_scenarios().await?;
    }

    // Boots 2 and 3: a clean reboot and a power cut, driven by the checks
    // that need them; without such a check, by the phases the user's
    // checks asked for (their checks run in the `Vm` hooks of each boot).
    let t = Instant::now();
    if s.run_checks(Phase::Reboots, &expect).await? > 0 {
        s.timings.persistence = t.elapsed().as_secs_f64();
    } else if plain_run_reboots(&s.cfg) {
        if s.power_cut_beside() {
            s.fork_power_cut().await.map_err(me)?;
        }
        s.reboot().await.map_err(me)?;
        s.crash().await.map_err(me)?;
        s.timings.persistence = t.elapsed().as_secs_f64();
    }
    s.judge_boots();
    s.run_scenarios().await
}

impl Session {
    /// The run's serial log (the power-cut branch's boot has its own).
    fn serial_log(&self) -> PathBuf {
        self.template
            .as_ref()
            .map(|t| t.serial_log.clone())
            .unwrap_or_default()
    }

    /// The serial log's size now: where what the guest prints next starts.
    fn console_size(&self) -> u64 {
        std::fs::metadata(self.serial_log())
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The serial log from `from` to `to` (None: its end).
    fn console(&self, from: u64, to: Option<u64>) -> String {
        console_of(&self.serial_log(), from, to)
    }

    /// Keeps what this boot showed for boot-health: its journal (exported
    /// once per boot, shared with the checks) and its failed units.
    async fn keep_boot_health(&mut self) -> Result<(), MachineError> {
        if self.scenario.is_some() || !self.wanted(CheckId::BootHealth) {
            return Ok(());
        }
        let journal = self.journal().await?.to_owned();
        let failed = boot_health::failed_units(self.machine()).await?;
        self.boot_seen
            .insert(self.boots, (Some(journal), Some(failed)));
        Ok(())
    }

    /// What boot `boot` of the run showed, its console cut out of the
    /// serial log (without the previous boot's shutdown at its head).
    fn boot_observation(&self, boot: u32) -> boot_health::BootObservation {
        let (log, from) = self
            .console_marks
            .get(&boot)
            .cloned()
            .unwrap_or_else(|| (self.serial_log(), 0));
        // Up to where the next boot on the same log began.
        let to = self
            .console_marks
            .range(boot + 1..)
            .find(|(_, (l, _))| *l == log)
            .map(|(_, (_, at))| *at);
        let text = console_of(&log, from, to);
        let console = match boot {
            1 => text,
            _ => boot_health::split_at_next_kernel(&text).1.to_owned(),
        };
        let (journal, failed_units) = self.boot_seen.get(&boot).cloned().unwrap_or_default();
        boot_health::BootObservation {
            boot,
            console,
            journal,
            failed_units,
        }
    }

    /// The plain run's boot-health and shutdown rows, from every boot it
    /// kept (before the scenarios, whose consoles follow in the same log).
    fn judge_boots(&mut self) {
        if self.wanted(CheckId::BootHealth) {
            let t = Instant::now();
            let boots: Vec<u32> = self.boot_seen.keys().copied().collect();
            let all: Vec<_> = boots.iter().map(|b| self.boot_observation(*b)).collect();
            let row = boot_health::judge(&all, &self.cfg.boot_health_ignore);
            self.record(Row::Check(CheckId::BootHealth), row, t);
        }
        if self.wanted(CheckId::Shutdown) {
            if let Some(row) = self.shutdowns.first().cloned() {
                self.emit(Progress::CheckFinished(row.clone()));
                self.checks.insert(CheckId::Shutdown, row);
            }
        }
    }

    /// Judges the shutdown of boot `boot`, whose console starts at `from`
    /// (before `systemctl reboot`/`poweroff`) and ends at the next kernel.
    fn judge_shutdown(&mut self, boot: u32, from: u64) {
        let console = self.console(from, None);
        let row = shutdown::judge(boot, &console, None, &self.cfg.boot_health_ignore);
        self.shutdowns.push(row);
    }

    /// Records the `[state] preserve` paths (after setup and the first
    /// boot's checks): the state every later phase must show unchanged.
    /// Paths that match nothing are the caller's mistake (exit 2).
    async fn record_contract(&mut self) -> Result<(), String> {
        if self.cfg.preserve.is_empty() || !self.wanted(CheckId::StateContract) {
            return Ok(());
        }
        self.emit(Progress::Step(format!(
            "state contract: recording {}",
            self.cfg.preserve.join(" ")
        )));
        let t = Instant::now();
        let preserve = self.cfg.preserve.clone();
        match state_contract::record(self.machine(), &preserve).await {
            Ok(base) => {
                if let Err(e) = base.require_matched() {
                    self.life.error_kind = Some(FailureKind::Input);
                    return Err(e.to_string());
                }
                self.timings.contract += t.elapsed().as_secs_f64();
                if self.life.current.is_some() {
                    // The lifecycle's first stage shows what later ones are held to.
                    let (files, bytes) = base.files_and_bytes();
                    let row = CheckResult::new(
                        state_contract::NAME,
                        Status::Pass,
                        format!(
                            "recorded {} entries ({files} files, {}): the later stages are held to them",
                            base.entries.len(),
                            crate::report::human_bytes(bytes)
                        ),
                        self.cfg.preserve.clone(),
                    );
                    self.record(Row::Check(CheckId::StateContract), row, t);
                }
                self.contract_base = Some(base);
                Ok(())
            }
            // The guest cannot record (no getfattr): the check's failure.
            Err(e) => {
                let row =
                    checks::verdict_of_failed_command(CheckId::StateContract, e).map_err(me)?;
                self.record(Row::Check(CheckId::StateContract), row, t);
                Ok(())
            }
        }
    }

    /// Records the preserved paths again and judges them against the
    /// record taken after setup (None: nothing to compare).
    async fn compare_contract(&mut self, phase: &str) -> Result<Option<CheckResult>, MachineError> {
        let Some(base) = self.contract_base.clone() else {
            return Ok(None);
        };
        let t = Instant::now();
        self.emit(Progress::Step(format!("state contract after {phase}")));
        let preserve = self.cfg.preserve.clone();
        let mut row = match state_contract::record(self.machine(), &preserve).await {
            Ok(now) => state_contract::judge(phase, &base, &now),
            Err(e) => checks::verdict_of_failed_command(CheckId::StateContract, e)?,
        };
        row.seconds = t.elapsed().as_secs_f64();
        self.timings.contract += row.seconds;
        Ok(Some(row))
    }

    /// The test file's `[[setup]]` commands, once, after boot 1 and before
    /// any check. False when one failed: that is the run's verdict (a
    /// `setup` row saying which and why) and nothing after it can be
    /// judged on the system the user meant.
    async fn setup(&mut self) -> Result<bool, String> {
        for (i, command) in self.cfg.setup.clone().iter().enumerate() {
            let t = Instant::now();
            self.emit(Progress::Step(format!("setup {}: {command}", i + 1)));
            let out = self.machine().exec(command).await.map_err(me)?;
            if !out.success() {
                let exit = match out.exit_code {
                    Some(c) => format!("exit {c}"),
                    None => format!("signal {:?}", out.signal),
                };
                let mut evidence = vec![format!("command: {command}"), exit.clone()];
                for (what, text) in [("stdout", out.stdout_str()), ("stderr", out.stderr_str())] {
                    let lines: Vec<&str> = text.lines().collect();
                    for l in &lines[lines.len().saturating_sub(10)..] {
                        evidence.push(format!("{what}: {l}"));
                    }
                }
                let mut row = CheckResult::new(
                    "setup",
                    Status::Fail,
                    format!(
                        "setup command {} failed ({exit}): nothing else was judged",
                        i + 1
                    ),
                    evidence,
                );
                row.seconds = t.elapsed().as_secs_f64();
                self.emit(Progress::CheckFinished(row.clone()));
                match &self.life.current {
                    None => self.user_rows.push(row),
                    Some((stage, label)) => {
                        let row = life::tag(*stage, label, row);
                        self.user_rows.push(row)
                    }
                }
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The user's checks of phase `when`, in the order of the test file.
    async fn user_checks(&mut self, when: When) -> Result<(), MachineError> {
        for (i, check) in self.cfg.user_checks.clone().iter().enumerate() {
            if !check.runs_in(when) {
                continue;
            }
            let t = Instant::now();
            self.emit(Progress::Step(user::row_name(when, check)));
            let seen = user::observe(self.machine(), check).await?;
            let mut row = user::judge(when, check, &seen);
            if self.life.current.is_some() {
                // The lifecycle prefixes its stage.
                row.name = check.name.clone();
            }
            self.record(Row::User(i), row, t);
        }
        Ok(())
    }

    /// Boot 1, which also decides the accelerator (`accel::Plan`): under
    /// KVM first unless that is known not to work, and when a KVM boot
    /// fails before the guest is up, again under TCG from a fresh disk.
    /// Then the guest's own boot timings.
    async fn first_boot(&mut self, why: &'static str) -> Result<(), String> {
        let template = self.template.clone().expect("template set");
        self.begin_boot(why, BootMode::of(&template.boot));
        let cache = self.cfg.kvm_cache.clone();
        let mut plan = accel::Plan::new(self.cfg.accel, cache.as_ref(), &template.binary);
        let decision = match plan.first().map_err(me)? {
            Accel::Tcg => match self.boot_first_under(Accel::Tcg).await {
                Ok(()) => plan.tcg_booted(),
                Err(e) => {
                    self.accel = Some(plan.tcg_failed());
                    return Err(me(e));
                }
            },
            Accel::Kvm => {
                self.emit(Progress::Step(format!(
                    "trying KVM: boot 1 itself is the proof (the kernel must print or the \
                     guest agent appear within {} s)",
                    accel::KVM_KERNEL_WITHIN.as_secs()
                )));
                let t = Instant::now();
                match self.boot_first_under(Accel::Kvm).await {
                    Ok(()) => {
                        let how = self.kvm_proof();
                        plan.kvm_booted(&how)
                    }
                    Err(e) => {
                        let failure = self.abandon_kvm(&e).await;
                        let summary = failure.summary();
                        if let Err(e) = plan.kvm_failed(failure, t.elapsed().as_secs_f64()) {
                            // --accel kvm: the report says where KVM failed.
                            self.accel = Some(plan.kvm_refused());
                            return Err(me(e));
                        }
                        self.emit(Progress::Step(format!(
                            "{summary}: boot 1 starts again under TCG"
                        )));
                        // A lifecycle's raw copy takes a while: a child
                        // that a stop or the timeout ends.
                        if let Err(e) = self.disk.create(&self.cfg.image).await {
                            self.accel = Some(plan.tcg_failed());
                            return Err(e);
                        }
                        accel::note_in_serial_log(&template.serial_log, &summary);
                        match self.boot_first_under(Accel::Tcg).await {
                            Ok(()) => plan.tcg_booted(),
                            Err(e) => {
                                self.accel = Some(plan.tcg_failed());
                                return Err(format!(
                                    "{} (boot 1 under TCG, after {summary})",
                                    me(e)
                                ));
                            }
                        }
                    }
                }
            }
        };
        self.emit(Progress::Accel(decision.clone()));
        self.timings.accel_probe = decision.probe_seconds;
        self.accel = Some(decision);
        let powered_on = self.machine().started();
        let kernel_start = self.machine().serial().snapshot().kernel_start;
        if let Some(k) = kernel_start {
            self.timings.firmware = Some(k.saturating_duration_since(powered_on).as_secs_f64());
        }
        // The journal export (the slowest guest command) overlaps this one,
        // unless setup commands will run first: their lines belong in it.
        if self.cfg.setup.is_empty() {
            self.start_journal_export().await.map_err(me)?;
        }
        if let Ok(out) = self
            .machine()
            .succeed("systemctl show -p InitRDTimestampMonotonic -p UserspaceTimestampMonotonic -p FinishTimestampMonotonic")
            .await
        {
            let (kernel, userspace) = systemd_split(&out);
            self.timings.kernel = kernel;
            self.timings.userspace = userspace;
        }
        Ok(())
    }

    /// Starts boot 1 under `accel` and waits for it to come up. A KVM
    /// attempt shows its firmware's debug console (where it stopped, if it
    /// fails) and must show the kernel within `accel::KVM_KERNEL_WITHIN`.
    async fn boot_first_under(&mut self, accel: Accel) -> Result<(), MachineError> {
        let template = self.template.clone().expect("template set");
        let mut cmd = QemuCommand { accel, ..template };
        if accel == Accel::Kvm {
            let log = self.kvm_debugcon();
            let _ = std::fs::remove_file(&log);
            cmd.debugcon = Some(log);
        }
        let cmd_line = cmd.to_string();
        let _ = self
            .artifacts
            .write(artifacts::QEMU_COMMAND, format!("{cmd_line}\n"));
        self.emit(Progress::QemuCommand(cmd_line));
        let attempt = match accel {
            Accel::Kvm => "-kvm",
            Accel::Tcg => "",
        };
        let mut m = self.start_machine(cmd, attempt).await?;
        // Only `auto` has somewhere to fall back to: `--accel kvm` waits
        // for the guest as any boot does.
        let watched = accel == Accel::Kvm && self.cfg.accel == AccelChoice::Auto;
        if watched {
            m.kernel_within = Some(accel::KVM_KERNEL_WITHIN);
        }
        self.machine = Some(m);
        let mut budget = self.boot_budget();
        if watched {
            // A KVM boot that printed and then stalls must not eat the
            // TCG boot's time: a working KVM is up long before this.
            budget = budget.min(accel::KVM_BOOT_WITHIN);
        }
        let state = self.machine().wait_booted(budget).await?;
        self.timings.boot = self.machine().started().elapsed().as_secs_f64();
        self.booted(self.timings.boot, state);
        Ok(())
    }

    /// Where a KVM attempt's firmware writes its debug console.
    fn kvm_debugcon(&self) -> PathBuf {
        self.workdir.path().join("kvm-debugcon.log")
    }

    /// What the KVM boot 1 that came up showed.
    fn kvm_proof(&self) -> String {
        let m = self.machine.as_ref().expect("the machine is running");
        match m.serial().snapshot().kernel_start {
            Some(k) => format!(
                "boot 1 came up under KVM (kernel console after {:.1} s, system up after {:.1} s)",
                k.saturating_duration_since(m.started()).as_secs_f64(),
                self.timings.boot
            ),
            None => format!(
                "boot 1 came up under KVM (system up after {:.1} s)",
                self.timings.boot
            ),
        }
    }

    /// Ends a failed KVM boot 1 and says how far it got and what QEMU
    /// said (its output stays in the artifacts).
    async fn abandon_kvm(&mut self, e: &MachineError) -> accel::KvmFailure {
        let debugcon =
            String::from_utf8_lossy(&std::fs::read(self.kvm_debugcon()).unwrap_or_default())
                .into_owned();
        // Where the firmware got to is evidence too: kept beside QEMU's words.
        if !debugcon.is_empty() {
            let _ = self.artifacts.write(artifacts::KVM_DEBUGCON, &debugcon);
        }
        let (stage, qemu_said) = match self.machine.take() {
            Some(mut m) => {
                let kernel = m.serial().snapshot().kernel_start.is_some();
                let agent = m.qmp().state().agent_port_opened.is_some();
                m.kill().await;
                (
                    accel::stage_reached(true, &debugcon, kernel, agent),
                    m.qemu_said(),
                )
            }
            None => {
                let out = self
                    .last_qemu_log
                    .as_deref()
                    .map(crate::machine::read_tail)
                    .unwrap_or_default();
                (
                    accel::stage_reached(false, &debugcon, false, false),
                    crate::qemu_output::qemu_words(&out),
                )
            }
        };
        accel::KvmFailure {
            stage,
            qemu_said,
            error: e.to_string(),
        }
    }

    /// Starts QEMU for the current boot with its output in the artifacts
    /// (`qemu-stderr-boot<N><attempt>.log`, a scenario's under its name).
    async fn start_machine(
        &mut self,
        mut cmd: QemuCommand,
        attempt: &str,
    ) -> Result<Machine, MachineError> {
        let name = match &self.scenario {
            None => artifacts::qemu_output(self.boots, attempt),
            Some(sc) => artifacts::scenario_qemu_output(sc, self.scenario_boots),
        };
        cmd.output_log = self.artifacts.path(&name);
        self.last_qemu_log = Some(cmd.output_log.clone());
        Machine::start(cmd, self.events.clone()).await
    }

    /// The checks that judge a boot as it came up, and its journal's
    /// mount warnings.
    async fn layout_checks(&mut self, expect: &Expectations) -> Result<(), String> {
        // The journal export is the slowest guest command; it overlaps the
        // checks (boot 1's started as soon as the guest was up).
        self.start_journal_export().await.map_err(me)?;
        self.run_checks(Phase::FirstBoot, expect).await?;
        // The journal is exported whether or not overmount is checked: it is
        // the first thing anyone reads after a failure. Its mount warnings are
        // reported either way; overmount adds what each one hides.
        let journal = self.journal().await.map_err(me)?;
        let warnings = checks::overmount::unexamined(journal);
        self.set_warnings(warnings, false);
        self.keep_boot_health().await.map_err(me)?;
        Ok(())
    }

    /// Starts this boot's journal export, unless it runs already.
    async fn start_journal_export(&mut self) -> Result<(), MachineError> {
        if self.seen.journal_export.is_none() && self.seen.journal.is_none() {
            let export = guest::start_journal_export(self.machine()).await?;
            self.seen.journal_export = Some(export);
        }
        Ok(())
    }

    /// Starts QEMU again on the same disk with the accelerator already
    /// chosen, and waits for the boot to settle. `boot` replaces the
    /// template's way to the kernel (a plain run's later direct boots).
    async fn start_again(
        &mut self,
        why: &'static str,
        boot: Option<KernelBoot>,
    ) -> Result<(), MachineError> {
        let cmd = self.next_command(boot);
        self.begin_boot(why, BootMode::of(&cmd.boot));
        let t = Instant::now();
        let m = self.start_machine(cmd, "").await?;
        self.machine = Some(m);
        let budget = self.boot_budget();
        let state = self.machine().wait_booted(budget).await?;
        self.booted(t.elapsed().as_secs_f64(), state);
        Ok(())
    }

    /// The template with the accelerator already chosen, booting `boot`
    /// when given.
    fn next_command(&self, boot: Option<KernelBoot>) -> QemuCommand {
        let template = self.template.clone().expect("template set");
        QemuCommand {
            accel: self
                .accel
                .as_ref()
                .map(|a| a.used)
                .unwrap_or(template.accel),
            boot: boot.unwrap_or(template.boot),
            ..template
        }
    }

    /// The direct kernel boot for a later boot of the plain run, when it is
    /// to be direct (`TestConfig::later_boots`, with `--boot extlinux`; a
    /// lifecycle never). Extracted once, at the first later boot, from the
    /// image itself: the overlay QEMU writes is not a filesystem `btrfs
    /// restore` can read, and the image is what the overlay showed boot
    /// 1's extlinux. None when the files cannot be had: the later boots
    /// then go through extlinux, and the report says why.
    async fn later_direct(&mut self) -> Option<KernelBoot> {
        if !later_boots_direct(&self.cfg) {
            return None;
        }
        if self.later.is_none() {
            self.emit(Progress::Step(
                "extracting boot 1's kernel, initramfs and command line from the image \
                 for the later boots (--later-boots direct)"
                    .into(),
            ));
            let image = self.cfg.image.clone();
            let dir = self.workdir.path().join("boot");
            let extracted = tokio::task::spawn_blocking(move || direct_boot(&image, &dir))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match &extracted {
                // The run's own later boots' line; a scenario's differs
                // only in its disk.
                Ok(boot) if self.scenario.is_none() => {
                    let cmd_line = self.next_command(Some(boot.clone())).to_string();
                    let _ = self
                        .artifacts
                        .write(artifacts::QEMU_COMMAND_LATER, format!("{cmd_line}\n"));
                    self.emit(Progress::QemuCommand(cmd_line));
                }
                Ok(_) => {}
                Err(e) => {
                    self.later_fallback = Some(format!(
                        "the kernel could not be extracted for a direct boot, so the later \
                         boots went through extlinux: {e}"
                    ));
                }
            }
            self.later = Some(extracted);
        }
        self.later.as_ref()?.as_ref().ok().cloned()
    }

    /// `systemctl poweroff`, and waits for QEMU to exit: the disk is
    /// consistent and nobody else has it open.
    async fn shutdown(&mut self) -> Result<(), MachineError> {
        self.emit(Progress::Step(
            "clean shutdown (systemctl poweroff), waiting for QEMU to exit".into(),
        ));
        let from = self.console_size();
        let boot = self.boots;
        let m = self.machine.take().expect("the machine is running");
        let budget = self.boot_budget();
        m.shutdown(budget).await?;
        self.judge_shutdown(boot, from);
        Ok(())
    }
}

/// The machine as the checks drive it: the current boot's shared
/// observations, taken once, and the reboot and crash of the story.
impl Vm for Session {
    fn machine(&mut self) -> &mut Machine {
        self.machine.as_mut().expect("the machine is running")
    }

    fn started(&mut self, id: CheckId) -> Option<checks::Started> {
        let i = self.seen.started.iter().position(|(s, _)| *s == id)?;
        Some(self.seen.started.remove(i).1)
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
            let name = match &self.scenario {
                None => artifacts::journal(self.boots),
                Some(sc) => artifacts::scenario_journal(sc, self.scenario_boots),
            };
            let _ = self.artifacts.write(&name, &journal);
            self.seen.journal = Some(journal);
        }
        Ok(self.seen.journal.as_deref().unwrap_or_default())
    }

    /// The guest's own `systemctl reboot`, to its final reset. A direct
    /// later boot has QEMU exit at that reset and starts it again with the
    /// kernel handed over; otherwise QEMU restarts the guest through the
    /// firmware, as a reset does.
    async fn reboot(&mut self) -> Result<(), MachineError> {
        const WHY: &str = "clean reboot (systemctl reboot)";
        // The shutdown's console starts here, before `systemctl reboot`.
        let shutdown_from = self.console_size();
        let shut_down = match &self.scenario {
            None => self.boots,
            Some(_) => self.scenario_boots,
        };
        let mut direct = self.later_direct().await;
        if direct.is_some() {
            if let Err(e) = self.machine().qmp().exit_on_guest_reset().await {
                self.later_fallback = Some(format!(
                    "QEMU could not be told to exit at the guest's reset ({e}), so the clean \
                     reboot went through extlinux"
                ));
                direct = None;
            }
        }
        let t = Instant::now();
        let budget = self.boot_budget();
        let state = match direct {
            None => {
                let via = BootMode::of(&self.machine().command().boot);
                self.begin_boot(WHY, via);
                self.machine().reboot(budget).await?
            }
            Some(boot) => {
                let cmd = self.next_command(Some(boot));
                self.begin_boot(WHY, BootMode::Direct);
                let m = self.machine.take().expect("the machine is running");
                m.reboot_to_exit(budget).await?;
                let m = self.start_machine(cmd, "").await?;
                self.machine = Some(m);
                let budget = self.boot_budget();
                self.machine().wait_booted(budget).await?
            }
        };
        self.booted(t.elapsed().as_secs_f64(), state);
        self.judge_shutdown(shut_down, shutdown_from);
        self.overmount_again().await?;
        self.later_phase(When::Reboot).await
    }

    fn power_cut_beside(&self) -> bool {
        self.cfg.power_cut_beside && self.scenario.is_none() && self.life.current.is_none()
    }

    async fn fork_power_cut(&mut self) -> Result<(), MachineError> {
        self.emit(Progress::Step(
            "sync; the disk as a power cut now leaves it starts booting beside the clean reboot"
                .into(),
        ));
        self.machine().succeed("sync").await?;
        let next = self.workdir.path().join("after-power-cut-fork.qcow2");
        let (frozen, format) = self.machine().freeze_disk(&next).await?;
        if let Some(t) = self.template.as_mut() {
            t.disk = next;
            t.disk_format = DiskFormat::Qcow2;
        }
        let disk = self.workdir.path().join("power-cut.qcow2");
        scenario::overlay_on(&frozen, format, &disk).map_err(MachineError::Setup)?;
        let direct = self.later_direct().await;
        let mut cmd = self.next_command(direct);
        cmd.disk = disk;
        cmd.disk_format = DiskFormat::Qcow2;
        // Its own console, sockets and output log: two guests run at once.
        cmd.serial_log = self.artifacts.path(artifacts::SERIAL_LOG_POWER_CUT);
        cmd.qmp_socket = self.workdir.path().join("qmp-power-cut.sock");
        cmd.qga_socket = self.workdir.path().join("qga-power-cut.sock");
        // The clean reboot is the next boot; this one follows it.
        cmd.output_log = self
            .artifacts
            .path(&artifacts::qemu_output(self.boots + 2, ""));
        let m = Machine::start(cmd, self.events.clone()).await?;
        self.cut_branch = Some((m, Instant::now()));
        Ok(())
    }

    async fn crash(&mut self) -> Result<(), MachineError> {
        if let Some((m, started)) = self.cut_branch.take() {
            return self.take_over_cut_branch(m, started).await;
        }
        self.emit(Progress::Step("sync, then power cut (QMP quit)".into()));
        let m = self.machine.take().expect("the machine is running");
        m.power_cut().await?;
        let direct = self.later_direct().await;
        self.start_again("fresh start after the power cut", direct)
            .await?;
        self.overmount_again().await?;
        self.later_phase(When::PowerCut).await
    }

    /// In a scenario: the preserved paths on the scenario's guest now,
    /// against the record taken after setup.
    async fn across_phases(&mut self, id: CheckId) -> Result<CheckResult, MachineError> {
        let phase = match &self.scenario {
            Some(sc) => format!("scenario {sc}"),
            None => "this phase".into(),
        };
        match id {
            CheckId::StateContract => match self.compare_contract(&phase).await? {
                Some(row) => Ok(row),
                None => Ok(CheckResult::new(
                    id.name(),
                    Status::Skip,
                    "no [state] preserve paths to hold to",
                    vec![],
                )),
            },
            CheckId::BootHealth => {
                let (journal, failed) = match self.scenario.is_some() {
                    true => {
                        self.seen = Default::default();
                        let journal = self.journal().await?.to_owned();
                        (
                            Some(journal),
                            Some(boot_health::failed_units(self.machine()).await?),
                        )
                    }
                    false => (None, None),
                };
                let from = self.scenario_mark.unwrap_or(0);
                let obs = boot_health::BootObservation {
                    boot: self.scenario_boots,
                    console: self.console(from, None),
                    journal,
                    failed_units: failed,
                };
                Ok(boot_health::judge(&[obs], &self.cfg.boot_health_ignore))
            }
            CheckId::Shutdown => {
                // A scenario's guest shuts down for this check: its own
                // clean reboot, judged like the run's.
                let before = self.shutdowns.len();
                self.reboot().await?;
                match self.shutdowns.get(before) {
                    Some(row) => Ok(row.clone()),
                    None => Err(MachineError::Setup("the reboot kept no shutdown".into())),
                }
            }
            other => Err(MachineError::Setup(format!(
                "{other} is not judged across phases"
            ))),
        }
    }

    /// A scenario's guest was booted before the save: its files were
    /// rewritten since that boot, whatever btime its reset clock now shows.
    fn running_since(&self) -> Option<f64> {
        match (&self.scenario, &self.saved) {
            (Some(_), Some(saved)) => Some(saved.boot_epoch),
            _ => self.life.running_since,
        }
    }
}

impl Session {
    /// The power cut that branched off before the clean reboot: the clean
    /// reboot's guest is done, the cut's cold boot (running since the
    /// fork) is the machine now.
    async fn take_over_cut_branch(
        &mut self,
        m: Machine,
        started: Instant,
    ) -> Result<(), MachineError> {
        self.emit(Progress::Step(format!(
            "power cut: the disk as it was when the tokens were synced, booting beside the clean \
             reboot for {:.1}s",
            started.elapsed().as_secs_f64()
        )));
        if let Some(mut done) = self.machine.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done.qmp().quit()).await;
            done.kill().await;
        }
        let via = BootMode::of(&m.command().boot);
        let log = m.command().serial_log.clone();
        self.begin_boot("fresh start after the power cut", via);
        self.console_marks.insert(self.boots, (log, 0));
        let beside = self.boots - 1;
        if let Some(r) = self.boot_log.last_mut() {
            r.beside = Some(beside);
        }
        self.last_qemu_log = Some(m.output_log().to_owned());
        self.machine = Some(m);
        let budget = self.boot_budget();
        let state = self.machine().wait_booted(budget).await?;
        // It came up while nobody waited: its console says when.
        let up = self.machine().serial().snapshot().up.map(|(t, _)| t);
        let seconds = up
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(started);
        self.booted(seconds.as_secs_f64(), state);
        self.overmount_again().await?;
        self.later_phase(When::PowerCut).await
    }

    /// What the plain run judges in each later boot besides overmount:
    /// the user's checks of that phase. A scenario's reboots are its own.
    async fn later_phase(&mut self, when: When) -> Result<(), MachineError> {
        if self.scenario.is_some() || self.life.current.is_some() {
            return Ok(());
        }
        self.keep_boot_health().await?;
        self.user_checks(when).await?;
        if let Some(row) = self.compare_contract(when.name()).await? {
            self.contract_rows.push(row);
            let merged = merge_phases(&self.contract_rows);
            self.emit(Progress::CheckFinished(merged.clone()));
            self.checks.insert(CheckId::StateContract, merged);
        }
        Ok(())
    }

    /// overmount judges every boot of the run, not only the first: after a
    /// later boot of the plain run (the reboot, the power cut) it looks
    /// again, and its verdict takes this boot in. (Each boot of a lifecycle
    /// runs the first-boot checks, overmount among them, as its own row.)
    async fn overmount_again(&mut self) -> Result<(), MachineError> {
        // A scenario's reboots are its own: the run's overmount row judged
        // the run's boots, not the scenario's guest.
        if self.scenario.is_some() {
            return Ok(());
        }
        let Some(earlier) = self.checks.get(&CheckId::Overmount).cloned() else {
            return Ok(());
        };
        let t = Instant::now();
        let boot = self.boots;
        self.emit(Progress::Step(format!(
            "overmount: looking again in boot {boot}"
        )));
        let warnings = self.warnings.remove(&None).unwrap_or_default();
        let (mut result, warnings) =
            checks::overmount::again(self, boot, earlier, warnings).await?;
        result.seconds += t.elapsed().as_secs_f64();
        self.warnings.insert(None, warnings);
        self.emit(Progress::CheckFinished(result.clone()));
        self.checks.insert(CheckId::Overmount, result);
        Ok(())
    }
}

/// `log` from `from` to `to` (None: its end), as text.
fn console_of(log: &Path, from: u64, to: Option<u64>) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    boot_health::console_between(&bytes, from, to)
}

/// One row of a check judged in several phases (each row's detail says
/// after which): failed when any failed, each phase's evidence prefixed
/// with its detail.
fn merge_phases(rows: &[CheckResult]) -> CheckResult {
    let failed: Vec<&CheckResult> = rows.iter().filter(|r| r.status == Status::Fail).collect();
    let name = rows.first().map(|r| r.name.as_str()).unwrap_or("?");
    let (status, detail) = match failed.as_slice() {
        [] => (
            Status::Pass,
            rows.iter()
                .map(|r| r.detail.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        f => (
            Status::Fail,
            f.iter()
                .map(|r| r.detail.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let mut evidence = Vec::new();
    for r in rows {
        if rows.len() > 1 && !r.evidence.is_empty() {
            evidence.push(format!("{}:", r.detail));
        }
        evidence.extend(r.evidence.iter().cloned());
    }
    let mut merged = CheckResult::new(name, status, detail, evidence);
    merged.seconds = rows.iter().map(|r| r.seconds).sum();
    merged
}

/// Where the lifecycle's copy goes: beside the image, so that
/// `--reflink=auto` can share its extents and the copy lands on the image's
/// (disk-backed) filesystem rather than a /tmp that may be a tmpfs; the
/// temp dir when the image's directory is not writable. Claimed like the
/// work dir: a killed run's copy is removed by the next.
fn private_dir(image: &Path) -> Result<WorkDir, String> {
    let beside = std::path::absolute(image)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned));
    if let Some(dir) = beside {
        if let Ok(d) = WorkDir::create_named(&dir, workdir::COPY_PREFIX) {
            return Ok(d);
        }
    }
    WorkDir::create_named(&std::env::temp_dir(), workdir::COPY_PREFIX)
        .map_err(|e| format!("private dir for the image copy: {e}"))
}

/// A private copy of the image: reflinked where the filesystem can, sparse
/// (the image's apparent size is GiBs, its data much less); the caller
/// removes an earlier copy first.
fn copy_command(image: &Path, copy: &Path) -> Command {
    let mut c = Command::new("cp");
    c.args(["--reflink=auto", "--sparse=always", "--"])
        .arg(image)
        .arg(copy);
    c
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

    /// Image changes a run that never gets past its first start must not ask for.
    struct Untouchable;

    impl life::ImageChanges for Untouchable {
        fn upgrade(
            &self,
            _: &Path,
            _: &str,
            _: &strata_builder::host::interrupt::Interrupt,
            _: &mut dyn FnMut(String),
        ) -> Result<life::Changed, life::ChangeError> {
            panic!("upgrade called")
        }

        fn set_default(
            &self,
            _: &Path,
            _: &str,
            _: &strata_builder::host::interrupt::Interrupt,
            _: &mut dyn FnMut(String),
        ) -> Result<life::Changed, life::ChangeError> {
            panic!("set_default called")
        }

        fn read(&self, _: &Path, _: &str) -> Result<life::Changed, life::ChangeError> {
            panic!("read called")
        }
    }

    #[test]
    fn a_lifecycle_that_cannot_start_reports_every_row_and_leaves_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
        // The copy takes the manifest along (its contents do not matter here).
        let manifest = dir.path().join("a.img.manifest.json");
        std::fs::write(&manifest, "{}").unwrap();
        let mut expect = expectations();
        expect.source = strata_builder::expect::Source::Manifest(manifest.clone());
        let mut cfg = TestConfig::new(img.clone(), expect);
        cfg.accel = AccelChoice::Tcg;
        cfg.qemu_binary = "/nonexistent/qemu-system-x86_64".into();
        cfg.artifacts = Some(dir.path().join("art"));
        cfg.lifecycle = Some(Lifecycle {
            changes: std::sync::Arc::new(Untouchable),
            label: "v2".into(),
            interrupt: Default::default(),
            in_guest: None,
            power_cut: None,
        });
        let mut steps = Vec::new();
        let err = run_blocking(cfg, |p| {
            if let Progress::Step(s) = p {
                steps.push(s)
            }
        })
        .unwrap_err();
        assert!(steps[0].starts_with("copying the image to "), "{steps:?}");
        let RunError::Infra {
            report: Some(r), ..
        } = err
        else {
            panic!("expected an infrastructure failure with a report: {err}")
        };
        assert!(
            r.error.as_deref().unwrap().contains("starting QEMU"),
            "{r:?}"
        );
        assert_eq!(r.boots, 1);
        let phases: Vec<(&str, Option<u32>)> = r
            .phases
            .iter()
            .map(|p| (p.label.as_str(), p.boot))
            .collect();
        assert_eq!(
            phases,
            [("factory", Some(1)), ("v2", None), ("factory", None)]
        );
        assert_eq!(r.checks.len(), 7 + 8 + 7);
        assert!(r
            .checks
            .iter()
            .all(|c| c.status == Status::Skip && c.detail == "not run: the run stopped before it"));
        assert_eq!(r.checks[7].name, "upgrade/root");
        // The private copy went beside the image and is gone with its directory.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".strata-lifecycle."))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 1 << 20]);
        assert_eq!(std::fs::read_to_string(&manifest).unwrap(), "{}");
    }

    /// A lifecycle refused for its input ends as bad input (exit 2), with
    /// its report, and before anything boots: the QEMU here does not
    /// exist, so a boot would have ended in "starting QEMU" (exit 3). This
    /// is the path of every refusal the story notes, the upgrade's too.
    #[test]
    fn a_lifecycle_refused_for_its_input_is_exit_2_before_any_boot() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
        let expect = expectations();
        let current = expect.version.label().to_owned();
        let mut cfg = TestConfig::new(img.clone(), expect);
        cfg.accel = AccelChoice::Tcg;
        cfg.qemu_binary = "/nonexistent/qemu-system-x86_64".into();
        cfg.artifacts = Some(dir.path().join("art"));
        cfg.lifecycle = Some(Lifecycle {
            changes: std::sync::Arc::new(Untouchable),
            label: current.clone(),
            interrupt: Default::default(),
            in_guest: None,
            power_cut: None,
        });
        let err = run_blocking(cfg, |_| {}).unwrap_err();
        assert_eq!(err.kind(), FailureKind::Input, "{err}");
        let RunError::Refused {
            message,
            report: Some(r),
        } = err
        else {
            panic!("expected a refusal with a report: {err}")
        };
        assert!(
            message.contains(&format!(
                "the upgrade label {current:?} is the current default's"
            )),
            "{message}"
        );
        assert_eq!(r.boots, 0, "nothing booted");
        assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 1 << 20]);
    }

    #[test]
    fn only_a_plain_run_through_extlinux_makes_its_later_boots_direct() {
        let mut cfg = TestConfig::new("x.img".into(), expectations());
        assert!(later_boots_direct(&cfg), "the default");
        cfg.later_boots = BootMode::Extlinux;
        assert!(!later_boots_direct(&cfg), "--later-boots extlinux");
        cfg.later_boots = BootMode::Direct;
        cfg.boot = BootMode::Direct;
        assert!(!later_boots_direct(&cfg), "--boot direct: already direct");
        cfg.boot = BootMode::Extlinux;
        cfg.lifecycle = Some(Lifecycle {
            changes: std::sync::Arc::new(Untouchable),
            label: "v2".into(),
            interrupt: Default::default(),
            in_guest: None,
            power_cut: None,
        });
        assert!(
            !later_boots_direct(&cfg),
            "a lifecycle boots through extlinux every time"
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
