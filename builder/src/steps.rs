//! The step runner: every named step of a build or an upgrade runs
//! through `Steps::run`, which reports it, times it, stops between steps on
//! an interrupt, and tags a failure with the step it happened in.

use crate::error::{BuildError, StepError};
use crate::host::interrupt::Interrupt;
use crate::host::stop_point::{self, STOP_AFTER_STEP_ENV};
use crate::manifest::StepTiming;
use crate::progress::{Event, Step};
use std::time::Instant;

/// Test hook, test-only and UNSAFE: with `STRATA_UNSAFE_UPGRADE=<mode>` an
/// upgrade breaks its own crash-safety on purpose, so that the power-cut
/// matrix (issue 19) can show it catches a broken order. Never set it on a
/// system whose data matters. Modes (`UnsafeUpgrade`):
///
/// - `skip-flush`: the `flush` step does not commit the filesystem, so the
///   flip may reach the disk (through the fsync of `systems/`) before the
///   new version and the menu do;
/// - `flip-first`: `systems/default` and the menu's default name the new
///   version at the end of `mount`, before any of it exists.
///
/// The CLI warns on stderr whenever it is set; an unknown mode is refused.
pub const UNSAFE_UPGRADE_ENV: &str = "STRATA_UNSAFE_UPGRADE";

/// The modes of `UNSAFE_UPGRADE_ENV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafeUpgrade {
    SkipFlush,
    FlipFirst,
}

impl UnsafeUpgrade {
    pub const ALL: [UnsafeUpgrade; 2] = [UnsafeUpgrade::SkipFlush, UnsafeUpgrade::FlipFirst];

    pub fn name(self) -> &'static str {
        match self {
            UnsafeUpgrade::SkipFlush => "skip-flush",
            UnsafeUpgrade::FlipFirst => "flip-first",
        }
    }

    /// The mode the environment asks for: `Ok(None)` when unset or empty,
    /// an error naming the value and the modes when unknown.
    pub fn from_env() -> Result<Option<UnsafeUpgrade>, String> {
        match std::env::var(UNSAFE_UPGRADE_ENV) {
            Err(_) => Ok(None),
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) => UnsafeUpgrade::ALL
                .into_iter()
                .find(|m| m.name() == v)
                .map(Some)
                .ok_or_else(|| {
                    format!(
                        "{UNSAFE_UPGRADE_ENV}={v:?} is no mode (test-only: skip-flush or flip-first)"
                    )
                }),
        }
    }
}

pub struct Steps<'a> {
    interrupt: &'a Interrupt,
    on_event: &'a mut dyn FnMut(Event),
    timings: Vec<StepTiming>,
    stop_after: Option<String>,
}

impl<'a> Steps<'a> {
    pub fn new(interrupt: &'a Interrupt, on_event: &'a mut dyn FnMut(Event)) -> Self {
        Steps {
            interrupt,
            on_event,
            timings: Vec::new(),
            stop_after: std::env::var(STOP_AFTER_STEP_ENV).ok(),
        }
    }

    /// Runs `step`. `f` says what it was doing when it fails; the error the
    /// caller gets names `step` too.
    pub fn run<T>(
        &mut self,
        step: Step,
        f: impl FnOnce(&mut Self) -> Result<T, StepError>,
    ) -> Result<T, BuildError> {
        if self.interrupt.raised() {
            return Err(BuildError::Interrupted);
        }
        (self.on_event)(Event::StepStarted(step));
        let start = Instant::now();
        let outer = stop_point::enter_step(Some(step.name()));
        let out = f(self);
        stop_point::enter_step(outer);
        let out = out.map_err(|e| {
            // A terminal's Ctrl-C reaches the whole process group: mkfs or
            // mount die of it and fail the step. With the flag raised the
            // failure is the interruption, not a failed step (exit 130).
            if self.interrupt.raised() {
                BuildError::Interrupted
            } else {
                e.in_step(step)
            }
        })?;
        let took = start.elapsed();
        self.timings.push(StepTiming {
            step: step.name().to_owned(),
            seconds: (took.as_secs_f64() * 1000.0).round() / 1000.0,
        });
        (self.on_event)(Event::StepFinished(step, took));
        if self.stop_after.as_deref() == Some(step.name()) {
            stop_point::stop();
        }
        if self.interrupt.raised() {
            return Err(BuildError::Interrupted);
        }
        Ok(out)
    }

    /// The flag long steps poll. Borrowed for as long as the runner lives,
    /// not from `self`, so a step can poll it while it emits events.
    pub fn interrupt(&self) -> &'a Interrupt {
        self.interrupt
    }

    pub fn emit(&mut self, event: Event) {
        (self.on_event)(event)
    }

    /// Step name → seconds, in the order the steps ran.
    pub fn into_timings(self) -> Vec<StepTiming> {
        self.timings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIGINT to the process group kills the tool a step runs: that step
    /// fails, but the run was interrupted, and says so.
    #[test]
    fn a_step_failing_under_a_raised_interrupt_is_an_interruption() {
        let interrupt = Interrupt::default();
        let mut sink = |_: Event| {};
        let mut steps = Steps::new(&interrupt, &mut sink);
        let e = steps
            .run(Step::Mkfs, |s| {
                s.interrupt().raise();
                Err::<(), _>(StepError::Failed {
                    what: "making the btrfs filesystem".into(),
                    cause: "mkfs.btrfs killed by signal 2".into(),
                })
            })
            .unwrap_err();
        assert!(matches!(e, BuildError::Interrupted), "{e:?}");
    }

    #[test]
    fn a_failing_step_is_named_once_and_not_timed() {
        let interrupt = Interrupt::default();
        let mut events = Vec::new();
        let mut sink = |e: Event| events.push(format!("{e:?}"));
        let mut steps = Steps::new(&interrupt, &mut sink);
        steps.run(Step::Mkfs, |_| Ok(())).unwrap();
        let e = steps
            .run(Step::Mount, |_| {
                Err::<(), _>(StepError::Failed {
                    what: "mounting /dev/loop9".into(),
                    cause: "boom".into(),
                })
            })
            .unwrap_err();
        assert_eq!(e.step(), Some(Step::Mount));
        assert_eq!(e.to_string(), "mounting /dev/loop9: boom");
        let timings = steps.into_timings();
        assert_eq!(timings.len(), 1);
        assert_eq!(timings[0].step, "mkfs");
        assert_eq!(events.len(), 3, "{events:?}");
    }

    #[test]
    fn an_interrupt_stops_before_the_next_step() {
        let interrupt = Interrupt::default();
        let mut sink = |_: Event| {};
        let mut steps = Steps::new(&interrupt, &mut sink);
        let e = steps
            .run(Step::Mkfs, |s| {
                s.interrupt().raise();
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(e, BuildError::Interrupted));
        let mut ran = false;
        let e = steps.run(Step::Mount, |_| {
            ran = true;
            Ok(())
        });
        assert!(matches!(e, Err(BuildError::Interrupted)) && !ran);
    }
}
