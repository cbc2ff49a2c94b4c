//! The power-cut matrix of an in-guest upgrade, told with the session:
//! boot the image's default once, write the state tokens, save the booted
//! guest; then for each cut point restore it, start `strata upgrade
//! --running` from the payload disk, cut the power at the point (QMP
//! `quit`: the guest's page cache and uncommitted btrfs transactions are
//! lost), boot the disk as it was left through its own bootloader, and
//! judge (`crate::power_cut`): a whole version boots (before the flip the
//! old one), `strata versions` there agrees with what booted and lists no
//! debris as a version, the tokens are intact, and the upgrade run again
//! completes and its version boots.

use super::{me, scenario, Progress, Session};
use crate::checks::user::sh_quote;
use crate::checks::Vm;
use crate::lifecycle::tokens::{self, Token};
use crate::lifecycle::{InGuest, Lifecycle, Stage};
use crate::machine::{Machine, MachineError, SavedState};
use crate::payload;
use crate::power_cut::{self, AfterCut, CutPoint, Plan};
use crate::report::CheckResult;
use std::time::{Duration, Instant};
use strata_builder::error::FailureKind;
use strata_builder::expect::Expectations;

/// A test-only environment variable strata passes on to the upgrade in the
/// guest (`STRATA_UNSAFE_UPGRADE`): it makes the upgrade unsafe, so the
/// matrix can be shown to fail.
const UNSAFE_ENV: &str = "STRATA_UNSAFE_UPGRADE";

/// How long the upgrade in the guest may take to reach a point.
const UPGRADE_WITHIN: Duration = Duration::from_secs(900);

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
    let tar = !g.rootfs.is_dir();
    let steps: Vec<String> = strata_builder::upgrade::step_names(tar, true)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let flip = steps.iter().position(|x| x == power_cut::FLIP_STEP);
    // Random moments fall within a whole upgrade: as long as the last
    // step point took, or a minute before any was measured.
    let mut span_ms = 60_000;
    let points = plan.points(&steps, span_ms);
    s.emit(Progress::Step(format!(
        "power-cut matrix: {} points (seed {}), each from the guest saved after boot 1",
        points.len(),
        plan.seed
    )));
    for (i, point) in points.iter().enumerate() {
        let point = match point {
            // Drawn again now that a whole upgrade has been timed.
            CutPoint::After { .. } if span_ms != 60_000 => plan
                .points(&steps, span_ms)
                .get(i)
                .cloned()
                .unwrap_or(point.clone()),
            p => p.clone(),
        };
        let flipped = match (&point, flip) {
            (CutPoint::AfterStep(x), Some(f)) => {
                Some(steps.iter().position(|y| y == x).is_some_and(|k| k >= f))
            }
            _ => None,
        };
        let t = Instant::now();
        let (seen, upgrade_ms) = s
            .cut_at(&g, &l.label, &point, &saved, &written, &before, i)
            .await
            .map_err(|e| format!("{}: {e}", point.row()))?;
        if let (CutPoint::AfterStep(x), Some(ms)) = (&point, upgrade_ms) {
            if x == "finish" {
                span_ms = ms;
            }
        }
        let mut row = power_cut::judge(&point, flipped, &old, &l.label, &seen);
        row.seconds = t.elapsed().as_secs_f64();
        s.emit(Progress::CheckFinished(row.clone()));
        s.cut_rows.push(row);
    }
    Ok(())
}

impl Session {
    /// One cut point: restore, upgrade up to the point, cut, boot, look,
    /// run the upgrade again, boot. Returns what it saw and how long the
    /// upgrade ran before the cut. Errors are the machine's (exit 3).
    #[allow(clippy::too_many_arguments)]
    async fn cut_at(
        &mut self,
        g: &InGuest,
        new: &str,
        point: &CutPoint,
        saved: &SavedState,
        written: &[Token],
        before: &Expectations,
        i: usize,
    ) -> Result<(AfterCut, Option<u64>), String> {
        let row = point.row();
        self.emit(Progress::Step(format!("{row}: restoring the booted guest")));
        let disk = self.workdir.path().join(format!("cut-{i}.qcow2"));
        scenario::overlay_on(&saved.disk, saved.disk_format(), &disk)?;
        if let Some(t) = self.template.as_mut() {
            t.disk = disk.clone();
        }
        let output = self.artifacts.path(&crate::artifacts::qemu_output(
            self.boots + 1,
            &format!("-cut{i}"),
        ));
        self.last_qemu_log = Some(output.clone());
        let m = Machine::restore(saved, &disk, &output, self.events.clone())
            .await
            .map_err(|e| format!("restoring the booted guest: {e}"))?;
        self.machine = Some(m);

        let stop = match point {
            CutPoint::AfterStep(x) => format!("STRATA_STOP_AFTER_STEP={} ", sh_quote(x)),
            CutPoint::After { .. } => String::new(),
        };
        let unsafe_env = match std::env::var(UNSAFE_ENV) {
            Ok(v) => format!("{UNSAFE_ENV}={} ", sh_quote(&v)),
            Err(_) => String::new(),
        };
        let upgrade = upgrade_command(g, new);
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
                self.emit(Progress::Step(format!(
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
                self.emit(Progress::Step(format!("{row}: upgrading for {millis} ms")));
                tokio::time::sleep(Duration::from_millis(*millis)).await;
            }
        }
        // The cut: no sync, no flush; the guest's page cache is lost.
        self.emit(Progress::Step(format!(
            "{row}: power cut (QMP quit, nothing flushed)"
        )));
        self.quit_machine().await;

        let mut seen = AfterCut::default();
        if let Err(e) = self.boot_after_cut().await {
            seen.booted_error = Some(format!("{e}"));
            self.quit_machine().await;
            return Ok((seen, upgrade_ms));
        }
        self.look_after_cut(&mut seen, written, before)
            .await
            .map_err(me)?;
        seen.rerun = Some(self.run_again(g, new, &seen).await);
        self.quit_machine().await;
        Ok((seen, upgrade_ms))
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
    async fn boot_after_cut(&mut self) -> Result<(), MachineError> {
        let mut cmd = self.next_command(None);
        cmd.boot = crate::qemu::KernelBoot::Firmware;
        self.begin_boot("after the power cut", super::BootMode::Extlinux);
        let t = Instant::now();
        let m = self.start_machine(cmd, "").await?;
        self.machine = Some(m);
        let budget = self.boot_budget();
        let state = self.machine().wait_booted(budget).await?;
        self.booted(t.elapsed().as_secs_f64(), state);
        Ok(())
    }

    /// What booted, what `strata versions` says there, the tokens.
    async fn look_after_cut(
        &mut self,
        seen: &mut AfterCut,
        written: &[Token],
        before: &Expectations,
    ) -> Result<(), MachineError> {
        seen.booted = Some(self.booted_label().await?);
        let tokens_seen = tokens::read(self.machine(), written).await?;
        seen.tokens = Some(tokens::judge(&tokens_seen, before));
        let json = self
            .machine()
            .succeed(&format!(
                "{} && {}/strata versions --running --json",
                payload::mount_command(),
                payload::GUEST_DIR
            ))
            .await;
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

    /// The version `/` is the run subvolume of.
    async fn booted_label(&mut self) -> Result<String, MachineError> {
        let opts = self.machine().succeed("findmnt -no OPTIONS /").await?;
        Ok(opts
            .split(',')
            .find_map(|o| o.strip_prefix("subvol="))
            .and_then(|v| v.trim().strip_prefix("/systems/"))
            .and_then(|v| v.strip_suffix("/run"))
            .unwrap_or("?")
            .to_owned())
    }

    /// Completes what the cut interrupted: the upgrade run again (or, when
    /// the new version is whole already, made the default), then a clean
    /// reboot through the bootloader. Ok: the version that booted.
    async fn run_again(
        &mut self,
        g: &InGuest,
        new: &str,
        seen: &AfterCut,
    ) -> Result<String, String> {
        let whole =
            seen.versions.iter().any(|v| v == new) && !seen.partial.iter().any(|v| v == new);
        let command = match (whole, seen.default.as_deref() == Some(new)) {
            (true, true) => None,
            (true, false) => Some(format!(
                "{}/strata set-default --running {}",
                payload::GUEST_DIR,
                sh_quote(new)
            )),
            (false, _) => Some(upgrade_command(g, new)),
        };
        if let Some(c) = &command {
            self.emit(Progress::Step(format!("again: {c}")));
            let m = self.machine();
            let saved = m.command_timeout;
            m.command_timeout = UPGRADE_WITHIN;
            let out = m.exec(c).await;
            m.command_timeout = saved;
            let out = out.map_err(me)?;
            if !out.success() {
                return Err(format!(
                    "`{c}`: exit {:?}: {}",
                    out.exit_code,
                    out.stderr_str().trim()
                ));
            }
        }
        let budget = self.boot_budget();
        self.begin_boot(
            "the upgrade completed after the cut",
            super::BootMode::Extlinux,
        );
        let t = Instant::now();
        let state = self.machine().reboot(budget).await.map_err(me)?;
        self.booted(t.elapsed().as_secs_f64(), state);
        self.booted_label().await.map_err(me)
    }
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
