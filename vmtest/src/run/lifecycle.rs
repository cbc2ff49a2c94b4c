//! The story of `strata test --upgrade-to`, told with the same session as
//! the plain test: boot the current default of a private copy, check it,
//! write tokens, shut down; upgrade the copy offline and boot the new
//! version; set the old one default again and boot it. What needs no VM
//! (the trait the image is changed through, the rows, the tokens) is in
//! `crate::lifecycle`.

use super::{me, Progress, Session};
use crate::checks::user;
use crate::checks::{CheckId, Vm};
use crate::lifecycle::{Changed, InGuest, Lifecycle, Row};
use crate::payload;
use crate::qemu::BootMode;
use crate::stage::Stage;
use crate::tokens::{self, Token};
use std::path::Path;
use std::time::{Duration, Instant};
use strata_builder::error::FailureKind;
use strata_builder::expect::{Expectations, Source};
use strata_builder::host::interrupt::Interrupt;
use strata_builder::manifest::Manifest;
use tokio::sync::oneshot;

/// How long a stopped run waits for an image change to undo itself.
const CHANGE_STOP_GRACE: Duration = Duration::from_secs(60);

/// An image change running on a blocking thread, as the run sees it:
/// resolves once the change has returned (or panicked).
pub(super) struct InFlight(oneshot::Receiver<()>);

/// Runs `f` on a blocking thread, with its [`InFlight`] in `slot` while it
/// runs. Dropping this future (the story, on a stop or the timeout) does
/// not stop `f`: the slot outlives the story, so the run can still raise
/// the interrupt and wait for `f` ([`stop`]).
async fn on_blocking_thread<T: Send + 'static>(
    slot: &mut Option<InFlight>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let (returned, in_flight) = oneshot::channel::<()>();
    *slot = Some(InFlight(in_flight));
    let r = tokio::task::spawn_blocking(move || {
        let _returned = returned;
        f()
    })
    .await;
    *slot = None;
    r
}

/// Raises `interrupt` and waits, at most `grace`, for the change in
/// flight to return. False when it did not in time.
async fn stop(interrupt: &Interrupt, in_flight: Option<InFlight>, grace: Duration) -> bool {
    interrupt.raise();
    match in_flight {
        None => true,
        Some(InFlight(returned)) => tokio::time::timeout(grace, returned).await.is_ok(),
    }
}

pub(super) async fn story(s: &mut Session, l: Lifecycle) -> Result<(), String> {
    let before = s.cfg.expect.clone();
    let old = before.version.label().to_owned();
    if l.label == old {
        // The caller's mistake, found before anything boots: exit 2.
        s.life.error_kind = Some(FailureKind::Input);
        return Err(format!(
            "the upgrade label {:?} is the current default's: pick a new one",
            l.label
        ));
    }
    copy_manifest(&before.source, &s.disk.path)?;

    // 1. The current default, as the image came. A clean shutdown last,
    // so the copy is consistent for the offline upgrade.
    s.enter(Stage::Before, &before);
    s.first_boot(Stage::Before.why()).await?;
    if !s.setup().await? {
        return Ok(());
    }
    let btime = s
        .machine()
        .succeed("awk '/^btime /{print $2}' /proc/stat")
        .await
        .map_err(me)?;
    s.life.running_since = btime.trim().parse().ok();
    let t = Instant::now();
    s.layout_checks(&before).await?;
    s.user_checks(Stage::Before.when()).await.map_err(me)?;
    s.record_contract().await?;
    s.stage_health();
    s.timings.checks = t.elapsed().as_secs_f64();
    let mut written = s.write_tokens(&before, Stage::Before).await?;
    if let Some(g) = &l.in_guest {
        s.change_in_guest(g, Stage::Upgrade, &l.label).await?;
    }
    s.shutdown().await.map_err(me)?;
    s.stage_shutdown();

    // 2. Upgrade the copy; the new version boots, with every token.
    let upgraded = match &l.in_guest {
        None => s.change(&l, Stage::Upgrade, &l.label).await?,
        Some(_) => s.read_back(&l, &l.label).await?,
    };
    s.boot_stage(Stage::Upgrade, &upgraded.expect).await?;
    s.layout_checks(&upgraded.expect).await?;
    s.user_checks(Stage::Upgrade.when()).await.map_err(me)?;
    s.stage_contract(Stage::Upgrade).await.map_err(me)?;
    s.stage_health();
    s.check_tokens(&written, &upgraded.expect).await?;
    written.extend(s.write_tokens(&upgraded.expect, Stage::Upgrade).await?);
    if let Some(g) = &l.in_guest {
        s.change_in_guest(g, Stage::Rollback, &old).await?;
    }
    s.shutdown().await.map_err(me)?;
    s.stage_shutdown();

    // 3. Back to the old version: it boots, with the tokens of both.
    let rolled_back = match &l.in_guest {
        None => s.change(&l, Stage::Rollback, &old).await?,
        Some(_) => s.read_back(&l, &old).await?,
    };
    s.boot_stage(Stage::Rollback, &rolled_back.expect).await?;
    s.layout_checks(&rolled_back.expect).await?;
    s.user_checks(Stage::Rollback.when()).await.map_err(me)?;
    s.stage_contract(Stage::Rollback).await.map_err(me)?;
    s.stage_health();
    s.check_tokens(&written, &rolled_back.expect).await?;
    Ok(())
}

/// The copy's manifest goes next to it, where the builder looks for it
/// and updates it: the image's own manifest stays as it is.
fn copy_manifest(source: &Source, copy: &Path) -> Result<(), String> {
    if let Source::Manifest(path) = source {
        let to = Manifest::default_path(copy);
        std::fs::copy(path, &to).map_err(|e| {
            format!(
                "copying the manifest {} to {}: {e}",
                path.display(),
                to.display()
            )
        })?;
    }
    Ok(())
}

/// The payload disk of an in-guest lifecycle: the strata binary and the
/// new rootfs (a tar archive keeps its file name), in the run's work dir.
pub(super) async fn payload_for(s: &Session, g: &InGuest) -> Result<std::path::PathBuf, String> {
    s.emit(Progress::Step(format!(
        "writing the payload disk for the guest: {} and {}",
        g.strata.display(),
        g.rootfs.display()
    )));
    let disk = s.workdir.path().join("payload.img");
    let staging = s.workdir.path().join("payload");
    let (g, d) = (g.clone(), disk.clone());
    tokio::task::spawn_blocking(move || {
        let rootfs_name = rootfs_payload_name(&g.rootfs);
        payload::make(
            &d,
            &staging,
            &[("strata", &g.strata), (&rootfs_name, &g.rootfs)],
            "strata",
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(disk)
}

/// A directory is `rootfs`; an archive keeps its name (its suffix says
/// how it is compressed).
pub(super) fn rootfs_payload_name(rootfs: &Path) -> String {
    match rootfs.is_dir() {
        true => "rootfs".into(),
        false => rootfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "rootfs.tar".into()),
    }
}

impl Session {
    /// The change of `stage` made by strata inside the running guest:
    /// `upgrade --running` to `label`, or `set-default --running label`.
    /// Its refusals are bad input (exit 2), as on the host.
    async fn change_in_guest(
        &mut self,
        g: &InGuest,
        stage: Stage,
        label: &str,
    ) -> Result<(), String> {
        let strata = format!("{}/strata", payload::GUEST_DIR);
        let command = match stage {
            Stage::Upgrade => format!(
                "{strata} upgrade --running --rootfs {}/{} --label {} {}",
                payload::GUEST_DIR,
                user::sh_quote(&rootfs_payload_name(&g.rootfs)),
                user::sh_quote(label),
                g.upgrade_args
                    .iter()
                    .map(|a| user::sh_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Stage::Before | Stage::Rollback => {
                format!("{strata} set-default --running {}", user::sh_quote(label))
            }
        };
        self.emit(Progress::Step(format!("in the guest: {command}")));
        let t = Instant::now();
        self.machine()
            .succeed(&payload::mount_command())
            .await
            .map_err(|e| format!("mounting the payload disk in the guest: {}", me(e)))?;
        let budget = self.remaining();
        let m = self.machine();
        let saved = m.command_timeout;
        m.command_timeout = budget;
        let out = m.exec(&command).await;
        m.command_timeout = saved;
        let out = out.map_err(|e| format!("in the guest: {command}: {}", me(e)))?;
        if !out.success() {
            let code = out.exit_code;
            if code == Some(2) {
                self.life.error_kind = Some(FailureKind::Input);
            }
            return Err(format!(
                "in the guest: {command}: exit {}: {}",
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| format!("signal {:?}", out.signal)),
                out.stderr_str().trim()
            ));
        }
        if let Some(p) = self.life.phases.iter_mut().find(|p| p.phase == stage) {
            p.change = Some(format!("in the guest: {command}"));
            p.change_seconds = Some(t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// What the copy shows now that the guest changed it: read back on a
    /// blocking thread (the copy is powered off).
    async fn read_back(&mut self, l: &Lifecycle, label: &str) -> Result<Changed, String> {
        let (changes, image, label) = (l.changes.clone(), self.disk.path.clone(), label.to_owned());
        let changed = tokio::task::spawn_blocking(move || changes.read(&image, &label))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading the copy back: {e}"))?;
        Ok(changed)
    }

    /// The stage's boot-health row: its boot's console so far, journal
    /// and failed units.
    pub(super) fn stage_health(&mut self) {
        if !self.wanted(CheckId::BootHealth) {
            return;
        }
        let t = Instant::now();
        let obs = self.boot_observation(self.boots);
        let row = crate::checks::boot_health::judge(&[obs], &self.cfg.boot_health_ignore);
        self.record(Row::Check(CheckId::BootHealth), row, t);
    }

    /// The stage's shutdown row: its clean poweroff, just judged.
    fn stage_shutdown(&mut self) {
        if let (true, Some(row)) = (
            self.wanted(CheckId::Shutdown),
            self.shutdowns.last().cloned(),
        ) {
            self.record(Row::Check(CheckId::Shutdown), row, Instant::now());
        }
    }

    /// The state contract after a later stage's boot: its own row.
    async fn stage_contract(&mut self, stage: Stage) -> Result<(), crate::machine::MachineError> {
        let t = Instant::now();
        if let Some(row) = self.compare_contract(stage.name()).await? {
            self.record(Row::Check(CheckId::StateContract), row, t);
        }
        Ok(())
    }

    /// From here on, boots and results belong to `stage`, which must run
    /// `expect`'s version.
    pub(super) fn enter(&mut self, stage: Stage, expect: &Expectations) {
        self.life.current = Some((stage, expect.version.label().to_owned()));
    }

    /// Changes the powered-off copy through the trait, on a blocking
    /// thread, and notes what was done in the stage's record.
    async fn change(
        &mut self,
        l: &Lifecycle,
        stage: Stage,
        label: &str,
    ) -> Result<Changed, String> {
        let what = match stage {
            Stage::Upgrade => format!("upgrading the copy to {label}"),
            Stage::Before | Stage::Rollback => format!("setting {label} as the copy's default"),
        };
        self.emit(Progress::Step(what.clone()));
        let t = Instant::now();
        let (changes, interrupt, tx) = (
            l.changes.clone(),
            l.interrupt.clone(),
            self.progress.clone(),
        );
        let (image, label) = (self.disk.path.clone(), label.to_owned());
        let changed = on_blocking_thread(&mut self.life.changing, move || {
            let mut note = |n: String| {
                let _ = tx.send(Progress::Step(n));
            };
            match stage {
                Stage::Upgrade => changes.upgrade(&image, &label, &interrupt, &mut note),
                Stage::Before | Stage::Rollback => {
                    changes.set_default(&image, &label, &interrupt, &mut note)
                }
            }
            .map(|c| (c, label))
        })
        .await;
        let changed = changed.map_err(|e| format!("{what}: {e}"))?;
        let (changed, label) = changed.map_err(|e| {
            // The story's error is a message; its kind goes beside it, so
            // a refused upgrade ends the run as bad input (exit 2).
            self.life.error_kind = Some(e.kind);
            format!("{what}: {e}")
        })?;
        if changed.expect.version.label() != label {
            return Err(format!(
                "{what}: the change reports {} as what boots now, not {label}",
                changed.expect.version
            ));
        }
        if let Some(p) = self.life.phases.iter_mut().find(|p| p.phase == stage) {
            p.change = Some(changed.summary.clone());
            p.change_seconds = Some(t.elapsed().as_secs_f64());
        }
        Ok(changed)
    }

    /// The run stopped (signal, stop future, `--timeout`) with the story
    /// dropped: an image change in progress cannot be dropped with it (it
    /// runs on a blocking thread). Raises its interrupt and waits for it
    /// to return, so it undoes what it began (mounts, loop device, the
    /// half-made version) before the report is written and the copy
    /// removed. Nothing to do when no change runs.
    pub(super) async fn stop_change(&mut self) {
        let Some(l) = &self.cfg.lifecycle else {
            return;
        };
        let interrupt = l.interrupt.clone();
        let changing = self.life.changing.take();
        if changing.is_some() {
            self.emit(Progress::Step(
                "stopping the image change in progress (interrupt raised)".into(),
            ));
        }
        if !stop(&interrupt, changing, CHANGE_STOP_GRACE).await {
            self.emit(Progress::Step(format!(
                "the image change did not stop within {} s; not waiting for it",
                CHANGE_STOP_GRACE.as_secs()
            )));
        }
    }

    /// Boots the copy again for `stage`; `--boot direct` takes the kernel
    /// of the copy's new default.
    async fn boot_stage(&mut self, stage: Stage, expect: &Expectations) -> Result<(), String> {
        self.enter(stage, expect);
        if self.cfg.boot == BootMode::Direct {
            let dir = self.workdir.path().join(format!("boot-{stage}"));
            let boot = super::direct_boot(&self.disk.path, &dir)
                .map_err(|e| format!("--boot direct: {e}"))?;
            if let Some(t) = self.template.as_mut() {
                t.boot = boot;
            }
        }
        // Never a direct later boot: each boot of a lifecycle proves the
        // default flip through the bootloader.
        self.start_again(stage.why(), None).await.map_err(me)
    }

    pub(super) async fn write_tokens(
        &mut self,
        expect: &Expectations,
        stage: Stage,
    ) -> Result<Vec<Token>, String> {
        let t = tokens::new_tokens(&expect.state_dirs, stage);
        self.emit(Progress::Step(format!(
            "writing {} tokens ({})",
            t.len(),
            t.iter()
                .map(|t| t.path.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )));
        tokens::write(self.machine(), &t).await.map_err(me)?;
        Ok(t)
    }

    async fn check_tokens(
        &mut self,
        written: &[Token],
        expect: &Expectations,
    ) -> Result<(), String> {
        let t = Instant::now();
        let seen = tokens::read(self.machine(), written).await.map_err(me)?;
        self.record(Row::Tokens, tokens::judge(&seen, expect), t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A change that runs until interrupted, then takes a while to undo
    /// what it began; `undone` says when it has.
    fn slow_to_undo(interrupt: &Interrupt, undone: &Arc<AtomicBool>) -> impl FnOnce() + Send {
        let (i, u) = (interrupt.clone(), undone.clone());
        move || {
            while !i.raised() {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
            u.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_stopped_run_interrupts_the_change_and_waits_until_it_undid_itself() {
        let interrupt = Interrupt::default();
        let undone = Arc::new(AtomicBool::new(false));
        let mut slot = None;
        let change = on_blocking_thread(&mut slot, slow_to_undo(&interrupt, &undone));
        // The run stops meanwhile: the story, and this future with it, is
        // dropped; the change goes on on its thread.
        assert!(tokio::time::timeout(Duration::from_millis(50), change)
            .await
            .is_err());
        assert!(!interrupt.raised());
        let in_flight = slot.take();
        assert!(in_flight.is_some(), "the slot outlives the dropped story");
        assert!(stop(&interrupt, in_flight, Duration::from_secs(30)).await);
        assert!(interrupt.raised());
        assert!(undone.load(Ordering::SeqCst), "returned only once undone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_finished_change_leaves_nothing_in_flight_and_a_stuck_one_is_given_up_on() {
        let mut slot = None;
        assert_eq!(on_blocking_thread(&mut slot, || 7).await.unwrap(), 7);
        assert!(slot.is_none());
        let interrupt = Interrupt::default();
        assert!(stop(&interrupt, None, Duration::ZERO).await);
        assert!(interrupt.raised(), "raised even with nothing in flight");
        // A change that ignores the interrupt: not waited for past the grace.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let change = on_blocking_thread(&mut slot, move || {
            let _ = held.recv();
        });
        assert!(tokio::time::timeout(Duration::from_millis(20), change)
            .await
            .is_err());
        assert!(!stop(&interrupt, slot.take(), Duration::from_millis(50)).await);
        release.send(()).unwrap();
    }
}
