//! The power-cut matrix of an in-guest upgrade, told with the session:
//! boot the image's default once, write the state tokens, save the booted
//! guest; then for each cut point restore it, start `strata upgrade
//! --running` from the payload disk, cut the power at the point (QMP
//! `quit`: the guest's page cache and uncommitted btrfs transactions are
//! lost), boot the disk as it was left through its own bootloader, and
//! judge (`crate::power_cut`): a whole version boots (before the flip the
//! old one), `strata versions` there agrees with what booted and lists no
//! debris as a version, the tokens and the `[state] preserve` paths are
//! intact, and the upgrade run again completes and its version boots.
//!
//! The points do not depend on each other (each starts from the same
//! save, on its own overlay), so on a host with two CPUs two of them run
//! at once, each in a lane of its own: its own sockets, console and
//! QEMU logs (`TestConfig::power_cut_beside`; `--one-guest-at-a-time`
//! runs one).

use super::{me, scenario, Progress, Session, MAX_BOOT};
use crate::artifacts::{self, Artifacts};
use crate::checks::state_contract;
use crate::checks::user::sh_quote;
use crate::checks::Vm;
use crate::lifecycle::{InGuest, Lifecycle};
use crate::machine::{Machine, MachineError, SavedState};
use crate::payload;
use crate::power_cut::{self, AfterCut, CutPoint, Plan};
use crate::qemu::BootMode;
use crate::qemu::{KernelBoot, QemuCommand};
use crate::qmp::EventLog;
use crate::report::{BootRecord, CheckResult};
use crate::stage::Stage;
use crate::tokens::{self, Token};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use strata_builder::error::FailureKind;
use strata_builder::expect::Expectations;
use tokio::sync::mpsc::UnboundedSender;

/// A test-only environment variable strata passes on to the upgrade in the
/// guest (`STRATA_UNSAFE_UPGRADE`): it makes the upgrade unsafe, so the
/// matrix can be shown to fail.
const UNSAFE_ENV: &str = strata_builder::steps::UNSAFE_UPGRADE_ENV;

/// How long the upgrade in the guest may take to reach a point.
const UPGRADE_WITHIN: Duration = Duration::from_secs(900);

/// How long `strata versions --running` in the guest may take.
const LOOK_WITHIN: Duration = Duration::from_secs(300);

/// Random moments fall within a whole upgrade: as long as the `finish`
/// point's upgrade took (it runs first), or this before one was timed.
const SPAN_BEFORE_TIMED_MS: u64 = 60_000;

/// The console lines kept as evidence of a boot that did not come up.
const CONSOLE_TAIL: usize = 12;

pub(super) async fn story(s: &mut Session, l: Lifecycle, plan: Plan) -> Result<(), String> {
    let Some(g) = l.in_guest.clone() else {
        s.life.error_kind = Some(FailureKind::Input);
        return Err("--power-cut cuts the upgrade the guest runs: it needs --in-guest".into());
    };
    let before = s.cfg.expect.clone();
    let old = before.version.label().to_owned();
    if l.label == old {
        s.life.error_kind = Some(FailureKind::Input);
        return Err(format!(
            "the upgrade label {:?} is the current default's: pick a new one",
            l.label
        ));
    }
    let steps: Vec<String> = strata_builder::upgrade::step_names(!g.rootfs.is_dir(), true)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Err(e) = plan.check(&steps) {
        s.life.error_kind = Some(FailureKind::Input);
        return Err(e);
    }
    // Only the first stage boots as a stage; the rest are the cut points.
    s.life.phases.truncate(1);
    s.enter(Stage::Before, &before);
    s.first_boot(Stage::Before.why()).await?;
    if !s.setup().await? {
        return Ok(());
    }
    s.layout_checks(&before).await?;
    s.stage_health();
    let written = s.write_tokens(&before, Stage::Before).await?;
    s.machine()
        .succeed(&format!("{} && sync", payload::mount_command()))
        .await
        .map_err(me)?;
    s.save_for_scenarios().await?;
    let saved = s.saved.clone().expect("just saved");
    s.quit_machine().await;

    let points = plan.points(&steps, SPAN_BEFORE_TIMED_MS);
    let lanes = if s.cfg.power_cut_beside && points.len() > 1 {
        2
    } else {
        1
    };
    s.emit(Progress::Step(format!(
        "power-cut matrix: {} points (seed {}), each from the guest saved after boot 1, {}",
        points.len(),
        plan.seed,
        if lanes == 2 {
            "two at a time"
        } else {
            "one at a time"
        }
    )));
    // The `finish` point first: its upgrade is a whole one, whose length
    // the random moments are drawn within.
    let mut queue: VecDeque<(usize, CutPoint)> = points.iter().cloned().enumerate().collect();
    if let Some(k) = queue
        .iter()
        .position(|(_, p)| *p == CutPoint::AfterStep("finish".into()))
    {
        let f = queue.remove(k).expect("found");
        queue.push_front(f);
    }
    let mut template = s.next_command(None);
    template.boot = KernelBoot::Firmware;
    let m = Matrix {
        g: &g,
        new: &l.label,
        old: &old,
        plan: &plan,
        steps: &steps,
        flip: steps.iter().position(|x| x == power_cut::FLIP_STEP),
        saved: &saved,
        written: &written,
        before: &before,
        preserve: &s.cfg.preserve,
        contract_base: s.contract_base.as_ref(),
        template,
        workdir: s.workdir.path().to_owned(),
        artifacts: &s.artifacts,
        events: s.events.clone(),
        progress: s.progress.clone(),
        deadline: s.started + s.cfg.timeout,
        lanes,
        boots: AtomicU32::new(s.boots),
        records: Mutex::new(Vec::new()),
        span_ms: Mutex::new(None),
        queue: Mutex::new(queue),
        rows: Mutex::new(Vec::new()),
    };
    let outcome = match lanes {
        2 => tokio::try_join!(Lane::new(&m, 1).run(), Lane::new(&m, 2).run()).map(|_| ()),
        _ => Lane::new(&m, 1).run().await,
    };
    // Whatever happened, the boots that were made are the run's.
    let Matrix {
        boots,
        records,
        rows,
        ..
    } = m;
    s.boots = boots.into_inner();
    let mut records = records.into_inner().expect("no lane panicked");
    records.sort_by_key(|r| r.boot);
    s.boot_log.extend(records);
    let mut rows = rows.into_inner().expect("no lane panicked");
    rows.sort_by_key(|(i, _)| *i);
    s.cut_rows.extend(rows.into_iter().map(|(_, r)| r));
    outcome
}

/// What every lane of the matrix shares.
struct Matrix<'a> {
    g: &'a InGuest,
    new: &'a str,
    old: &'a str,
    plan: &'a Plan,
    steps: &'a [String],
    /// Where the default flip is in `steps`.
    flip: Option<usize>,
    saved: &'a SavedState,
    written: &'a [Token],
    before: &'a Expectations,
    preserve: &'a [String],
    contract_base: Option<&'a state_contract::Record>,
    /// The cold boots' command line: firmware and the image's extlinux;
    /// each lane gives it its disk, sockets and logs.
    template: QemuCommand,
    workdir: PathBuf,
    artifacts: &'a Artifacts,
    events: EventLog,
    progress: UnboundedSender<Progress>,
    /// The run's `--timeout`.
    deadline: Instant,
    lanes: usize,
    /// The run's boot count: boots are numbered as they start.
    boots: AtomicU32,
    records: Mutex<Vec<BootRecord>>,
    /// How long the `finish` point's upgrade took.
    span_ms: Mutex<Option<u64>>,
    /// The points not yet taken, with their place in the report.
    queue: Mutex<VecDeque<(usize, CutPoint)>>,
    rows: Mutex<Vec<(usize, CheckResult)>>,
}

impl Matrix<'_> {
    fn emit(&self, p: Progress) {
        let _ = self.progress.send(p);
    }

    fn budget(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .min(MAX_BOOT)
    }

    /// The next point, a random moment drawn again within the length of a
    /// whole upgrade once one was timed (from the same seed: reported).
    fn next(&self) -> Option<(usize, CutPoint)> {
        let (i, point) = self.queue.lock().expect("queue").pop_front()?;
        let span = *self.span_ms.lock().expect("span");
        let point = match (&point, span) {
            (CutPoint::After { .. }, Some(span)) => self
                .plan
                .points(self.steps, span)
                .get(i)
                .cloned()
                .unwrap_or(point),
            _ => point,
        };
        Some((i, point))
    }
}

/// One guest of the matrix at a time, point after point.
struct Lane<'a> {
    m: &'a Matrix<'a>,
    n: usize,
    machine: Option<Machine>,
}

impl<'a> Lane<'a> {
    fn new(m: &'a Matrix<'a>, n: usize) -> Lane<'a> {
        Lane {
            m,
            n,
            machine: None,
        }
    }

    fn machine(&mut self) -> &mut Machine {
        self.machine.as_mut().expect("the lane's guest is running")
    }

    async fn run(mut self) -> Result<(), String> {
        while let Some((i, point)) = self.m.next() {
            let t = Instant::now();
            let out = self.cut_at(&point, i).await;
            self.quit().await;
            let (seen, upgrade_ms) = out.map_err(|e| format!("{}: {e}", point.row()))?;
            if let (CutPoint::AfterStep(x), Some(ms)) = (&point, upgrade_ms) {
                if x == "finish" {
                    *self.m.span_ms.lock().expect("span") = Some(ms);
                }
            }
            let flipped = match (&point, self.m.flip) {
                (CutPoint::AfterStep(x), Some(f)) => Some(
                    self.m
                        .steps
                        .iter()
                        .position(|y| y == x)
                        .is_some_and(|k| k >= f),
                ),
                _ => None,
            };
            let mut row = power_cut::judge(&point, flipped, self.m.old, self.m.new, &seen);
            if self.m.lanes > 1 {
                row.evidence.push(format!(
                    "ran in lane {} of {} (two cut points at once)",
                    self.n, self.m.lanes
                ));
            }
            row.seconds = t.elapsed().as_secs_f64();
            self.m.emit(Progress::CheckFinished(row.clone()));
            self.m.rows.lock().expect("rows").push((i, row));
        }
        Ok(())
    }

    /// Ends the lane's guest (a power cut: nothing of it is judged again).
    async fn quit(&mut self) {
        if let Some(mut m) = self.machine.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), m.qmp().quit()).await;
            m.kill().await;
        }
    }

    /// The lane's command line for point `i`: its disk, its sockets, the
    /// point's console.
    fn command(&self, i: usize, base: &QemuCommand) -> QemuCommand {
        let dir = &self.m.workdir;
        QemuCommand {
            disk: dir.join(format!("cut-{i}.qcow2")),
            disk_format: crate::qemu::DiskFormat::Qcow2,
            qmp_socket: dir.join(format!("qmp-lane{}.sock", self.n)),
            qga_socket: dir.join(format!("qga-lane{}.sock", self.n)),
            serial_log: self.m.artifacts.path(&artifacts::cut_point(i, "serial")),
            ..base.clone()
        }
    }

    /// Numbers a boot as it starts and tells the UI.
    fn begin_boot(&self, why: &'static str) -> u32 {
        let boot = self.m.boots.fetch_add(1, Ordering::SeqCst) + 1;
        self.m.records.lock().expect("records").push(BootRecord {
            boot,
            why: why.into(),
            via: BootMode::Extlinux,
            seconds: None,
            firmware: None,
            beside: None,
        });
        self.m.emit(Progress::Booting {
            boot,
            why,
            via: BootMode::Extlinux,
        });
        boot
    }

    fn booted(&mut self, boot: u32, seconds: f64, state: String) {
        let firmware = self.machine.as_ref().and_then(|m| {
            let k = m.serial().snapshot().kernel_start?;
            Some(k.saturating_duration_since(m.started()).as_secs_f64())
        });
        if let Some(r) = self
            .m
            .records
            .lock()
            .expect("records")
            .iter_mut()
            .find(|r| r.boot == boot)
        {
            r.seconds = Some(seconds);
            r.firmware = firmware;
        }
        self.m.emit(Progress::Booted {
            boot,
            seconds,
            state,
        });
    }

    /// One cut point: restore, upgrade up to the point, cut, boot, look,
    /// run the upgrade again, boot. Returns what it saw and how long the
    /// upgrade ran before the cut. Errors are the machine's (exit 3).
    async fn cut_at(
        &mut self,
        point: &CutPoint,
        i: usize,
    ) -> Result<(AfterCut, Option<u64>), String> {
        let m = self.m;
        let row = point.row();
        m.emit(Progress::Step(format!("{row}: restoring the booted guest")));
        let mut cmd = self.command(i, m.saved.command());
        cmd.output_log = m.artifacts.path(&artifacts::cut_point(i, "qemu-restore"));
        scenario::overlay_on(&m.saved.disk, m.saved.disk_format(), &cmd.disk)?;
        let restored = Machine::restore_as(m.saved, cmd, m.events.clone())
            .await
            .map_err(|e| format!("restoring the booted guest: {e}"))?;
        self.machine = Some(restored);

        let stop = match point {
            CutPoint::AfterStep(x) => format!("STRATA_STOP_AFTER_STEP={} ", sh_quote(x)),
            CutPoint::After { .. } => String::new(),
        };
        let unsafe_env = match std::env::var(UNSAFE_ENV) {
            Ok(v) => format!("{UNSAFE_ENV}={} ", sh_quote(&v)),
            Err(_) => String::new(),
        };
        let upgrade = upgrade_command(m.g, m.new);
        let started = Instant::now();
        let pid = self
            .machine()
            .succeed(&format!(
                "{stop}{unsafe_env}{upgrade} </dev/null >/run/strata-upgrade.log 2>&1 & echo $!"
            ))
            .await
            .map_err(me)?;
        let pid = pid.trim().to_owned();
        let mut upgrade_ms = None;
        match point {
            CutPoint::AfterStep(x) => {
                m.emit(Progress::Step(format!(
                    "{row}: upgrading up to the end of {x}"
                )));
                let state = self.wait_stopped(&pid).await.map_err(me)?;
                if state != "T" {
                    let log = self
                        .machine()
                        .succeed("tail -n 20 /run/strata-upgrade.log")
                        .await
                        .unwrap_or_default();
                    return Err(format!(
                        "the upgrade in the guest ended before the end of {x}: {}",
                        log.trim()
                    ));
                }
                upgrade_ms = Some(started.elapsed().as_millis() as u64);
            }
            CutPoint::After { millis } => {
                m.emit(Progress::Step(format!("{row}: upgrading for {millis} ms")));
                tokio::time::sleep(Duration::from_millis(*millis)).await;
            }
        }
        // What the upgrade said up to the cut is evidence; the file is on
        // the guest's tmpfs, so reading it flushes nothing to the disk.
        if let Ok(log) = self.machine().succeed("cat /run/strata-upgrade.log").await {
            let _ = m.artifacts.write(&artifacts::cut_point(i, "upgrade"), log);
        }
        // The cut: no sync, no flush; the guest's page cache is lost.
        m.emit(Progress::Step(format!(
            "{row}: power cut (QMP quit, nothing flushed)"
        )));
        self.quit().await;

        let mut seen = AfterCut::default();
        let console_from = std::fs::metadata(&self.command(i, &m.template).serial_log)
            .map(|md| md.len())
            .unwrap_or(0);
        if let Err(e) = self.boot_after_cut(i).await {
            seen.booted_error = Some(format!("{e}"));
            seen.console = self.console_tail(i, console_from);
            return Ok((seen, upgrade_ms));
        }
        self.look_after_cut(&mut seen).await.map_err(me)?;
        seen.rerun = Some(self.run_again(&seen).await);
        Ok((seen, upgrade_ms))
    }

    /// The last lines the point's console showed since `from`.
    fn console_tail(&self, i: usize, from: u64) -> Vec<String> {
        let path = self.command(i, &self.m.template).serial_log;
        let bytes = std::fs::read(&path).unwrap_or_default();
        let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(CONSOLE_TAIL)..]
            .iter()
            .map(|l| format!("console: {l}"))
            .collect()
    }

    /// Polls the upgrade's process state until it stopped itself (`T`) or
    /// is gone (`gone`), within `UPGRADE_WITHIN`.
    async fn wait_stopped(&mut self, pid: &str) -> Result<String, MachineError> {
        let deadline = Instant::now() + UPGRADE_WITHIN;
        let probe =
            format!("s=$(awk '{{print $3}}' /proc/{pid}/stat 2>/dev/null); echo ${{s:-gone}}");
        loop {
            let s = self.machine().succeed(&probe).await?;
            match s.trim() {
                "T" | "t" => return Ok("T".into()),
                "gone" | "Z" => return Ok("gone".into()),
                _ if Instant::now() > deadline => {
                    return Err(MachineError::Timeout {
                        what: "the upgrade in the guest reaching its cut point".into(),
                        seconds: UPGRADE_WITHIN.as_secs_f64(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// A cold boot of the disk as the cut left it, through the firmware
    /// and the image's own extlinux: its menu is part of what is judged.
    async fn boot_after_cut(&mut self, i: usize) -> Result<(), MachineError> {
        let boot = self.begin_boot("after the power cut");
        let mut cmd = self.command(i, &self.m.template);
        cmd.output_log = self
            .m
            .artifacts
            .path(&artifacts::qemu_output(boot, &format!("-cut{i}")));
        let t = Instant::now();
        let machine = Machine::start(cmd, self.m.events.clone()).await?;
        self.machine = Some(machine);
        let budget = self.m.budget();
        let state = self.machine().wait_booted(budget).await?;
        self.booted(boot, t.elapsed().as_secs_f64(), state);
        Ok(())
    }

    /// What booted, what `strata versions` says there, the tokens and the
    /// preserved paths.
    async fn look_after_cut(&mut self, seen: &mut AfterCut) -> Result<(), MachineError> {
        let m = self.m;
        seen.booted = Some(booted_label(self.machine()).await?);
        let tokens_seen = tokens::read(self.machine(), m.written).await?;
        seen.tokens = Some(tokens::judge(&tokens_seen, m.before));
        if let Some(base) = m.contract_base {
            let preserve = m.preserve;
            seen.contract = Some(
                match state_contract::record(self.machine(), preserve).await {
                    Ok(now) => state_contract::judge("the power cut", base, &now),
                    Err(e) => crate::checks::verdict_of_failed_command(
                        crate::checks::CheckId::StateContract,
                        e,
                    )?,
                },
            );
        }
        // Bounded like the upgrade: strata is read cold from the payload
        // disk and mounts the top level, which takes a minute under TCG
        // while the other lane's guest upgrades.
        let machine = self.machine();
        let within = machine.command_timeout;
        machine.command_timeout = LOOK_WITHIN;
        let json = machine
            .succeed(&format!(
                "{} && {}/strata versions --running --json",
                payload::mount_command(),
                payload::GUEST_DIR
            ))
            .await;
        machine.command_timeout = within;
        match json {
            Ok(j) => {
                if let Err(e) = power_cut::parse_versions(&j, seen) {
                    seen.default = Some(format!("(unreadable: {e})"));
                }
            }
            Err(MachineError::CommandFailed { stderr, .. }) => {
                seen.default = Some(format!("(strata versions failed: {stderr})"))
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Completes what the cut interrupted: the upgrade run again (or, when
    /// the new version is whole already, made the default), then a clean
    /// reboot through the bootloader. Ok: the version that booted.
    async fn run_again(&mut self, seen: &AfterCut) -> Result<String, String> {
        let new = self.m.new;
        let whole =
            seen.versions.iter().any(|v| v == new) && !seen.partial.iter().any(|v| v == new);
        let command = match (whole, seen.default.as_deref() == Some(new)) {
            (true, true) => None,
            (true, false) => Some(format!(
                "{}/strata set-default --running {}",
                payload::GUEST_DIR,
                sh_quote(new)
            )),
            (false, _) => Some(upgrade_command(self.m.g, new)),
        };
        if let Some(c) = &command {
            self.m.emit(Progress::Step(format!("again: {c}")));
            let machine = self.machine();
            let saved = machine.command_timeout;
            machine.command_timeout = UPGRADE_WITHIN;
            let out = machine.exec(c).await;
            machine.command_timeout = saved;
            let out = out.map_err(me)?;
            if !out.success() {
                return Err(format!(
                    "`{c}`: exit {:?}: {}",
                    out.exit_code,
                    out.stderr_str().trim()
                ));
            }
        }
        let boot = self.begin_boot("the upgrade completed after the cut");
        let budget = self.m.budget();
        let t = Instant::now();
        let state = self.machine().reboot(budget).await.map_err(me)?;
        self.booted(boot, t.elapsed().as_secs_f64(), state);
        booted_label(self.machine()).await.map_err(me)
    }
}

/// The version `/` is the run subvolume of.
async fn booted_label(m: &mut Machine) -> Result<String, MachineError> {
    let opts = m.succeed("findmnt -no OPTIONS /").await?;
    Ok(opts
        .split(',')
        .find_map(|o| o.strip_prefix("subvol="))
        .and_then(|v| v.trim().strip_prefix("/systems/"))
        .and_then(|v| v.strip_suffix("/run"))
        .unwrap_or("?")
        .to_owned())
}

/// `strata upgrade --running` from the payload disk, with the lifecycle's
/// own options.
fn upgrade_command(g: &InGuest, new: &str) -> String {
    format!(
        "{dir}/strata upgrade --running --rootfs {dir}/{} --label {} {}",
        sh_quote(&super::lifecycle::rootfs_payload_name(&g.rootfs)),
        sh_quote(new),
        g.upgrade_args
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
        dir = payload::GUEST_DIR
    )
}

/// Kept for the report: the rows this story adds.
pub(super) fn rows(s: &Session) -> Vec<CheckResult> {
    s.cut_rows.clone()
}
