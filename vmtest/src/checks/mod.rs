//! The checks of layout.md §5, one module each. A check observes the guest
//! through [`Vm`] and hands what it saw to a pure `judge` function that
//! turns observations into a verdict with evidence (unit-tested without a
//! VM). [`CheckId`] is the registry: the report lists the checks in its
//! order, `run` dispatches on it, `--checks` and `--list-checks` read its
//! names. A new check is a module here and an arm in each `CheckId` match.

pub mod boot_health;
pub mod fstab;
pub mod guest;
pub mod moved_files;
pub mod overmount;
pub mod persistence;
pub mod root;
pub mod shutdown;
pub mod state_contract;
pub mod state_mounts;
pub mod user;

#[cfg(test)]
pub(crate) mod testdata;

pub use guest::Mount;

use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status, Warning};
use std::future::Future;
use strata_builder::expect::Expectations;

/// One check. The order of the variants is the order of the report and of
/// the run (`ALL` ascends by phase; a unit test holds it to that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckId {
    Root,
    StateMounts,
    Fstab,
    MovedFiles,
    Overmount,
    Persistence,
    BootHealth,
    Shutdown,
    StateContract,
}

/// When a check runs in the story of a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// On the system as it first came up; the check changes nothing.
    FirstBoot,
    /// The check reboots the machine and cuts its power (boots 2 and 3).
    Reboots,
    /// The session judges it from what it kept across every phase of the
    /// run (`Vm::across_phases`); in a scenario, on the scenario's guest.
    AcrossPhases,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::FirstBoot => "first boot",
            Phase::Reboots => "reboot and power cut",
            Phase::AcrossPhases => "every phase",
        }
    }
}

impl CheckId {
    pub const ALL: [CheckId; 9] = [
        CheckId::Root,
        CheckId::StateMounts,
        CheckId::Fstab,
        CheckId::MovedFiles,
        CheckId::Overmount,
        CheckId::Persistence,
        CheckId::BootHealth,
        CheckId::Shutdown,
        CheckId::StateContract,
    ];

    /// The name in `--checks`, the report and JUnit.
    pub fn name(self) -> &'static str {
        match self {
            CheckId::Root => "root",
            CheckId::StateMounts => "state-mounts",
            CheckId::Fstab => "fstab",
            CheckId::MovedFiles => "moved-files",
            CheckId::Overmount => "overmount",
            CheckId::Persistence => "persistence",
            CheckId::BootHealth => boot_health::NAME,
            CheckId::Shutdown => shutdown::NAME,
            CheckId::StateContract => state_contract::NAME,
        }
    }

    /// One line for `strata test --list-checks`.
    pub fn description(self) -> &'static str {
        match self {
            CheckId::Root => {
                "/ is the expected version's run subvolume on the image's btrfs filesystem"
            }
            CheckId::StateMounts => {
                "every state dir is mounted from its own state subvolume of the same filesystem"
            }
            CheckId::Fstab => {
                "findmnt --verify is clean, every fstab entry mounted at boot is mounted, no unit failed"
            }
            CheckId::MovedFiles => {
                "files moved into state keep type, mode, owner and contents; the mountpoints under them are empty"
            }
            CheckId::Overmount => {
                "nothing is hidden under any mountpoint, by looking and by the journal, in every boot"
            }
            CheckId::Persistence => {
                "a token written to each state dir survives a clean reboot and a power cut"
            }
            CheckId::BootHealth => {
                "no panic, oops, BUG, kernel warning, emergency mode, failed unit, ordering cycle, segfault or OOM kill in any boot"
            }
            CheckId::Shutdown => {
                "the clean reboot's shutdown unmounts every filesystem and stops every unit in time"
            }
            CheckId::StateContract => {
                "the [state] preserve paths keep contents, type, mode, owner, xattrs, links after every later phase"
            }
        }
    }

    pub fn phase(self) -> Phase {
        match self {
            CheckId::Root
            | CheckId::StateMounts
            | CheckId::Fstab
            | CheckId::MovedFiles
            | CheckId::Overmount => Phase::FirstBoot,
            CheckId::Persistence => Phase::Reboots,
            CheckId::BootHealth | CheckId::Shutdown | CheckId::StateContract => Phase::AcrossPhases,
        }
    }

    /// Starts this check's guest observation and returns at once, for the
    /// checks whose observation is a slow guest script that only reads
    /// (moved-files' stat and hash, overmount's look under every
    /// mountpoint): the session starts them when a phase's checks begin,
    /// so they run beside the checks before them and the journal export.
    /// None for the others. `run` collects what was started
    /// ([`Vm::started`]) and judges it as if observed then.
    pub async fn start(
        self,
        vm: &mut impl Vm,
        expect: &Expectations,
    ) -> Result<Option<Started>, MachineError> {
        Ok(match self {
            CheckId::MovedFiles => Some(Started::MovedFiles(
                moved_files::start(vm.machine(), expect).await?,
            )),
            CheckId::Overmount => Some(Started::Overmount(overmount::start(vm).await?)),
            _ => None,
        })
    }

    /// Observes and judges. Fails only when the machine does (exit 3); a
    /// layout that is wrong is a `CheckResult` that says so, and so is a
    /// guest command the check needs that fails in the guest (see
    /// [`verdict_of_failed_command`]).
    pub async fn run(
        self,
        vm: &mut impl Vm,
        expect: &Expectations,
    ) -> Result<Outcome, MachineError> {
        match self.observe_and_judge(vm, expect).await {
            Err(e) => Ok(Outcome {
                result: verdict_of_failed_command(self, e)?,
                warnings: None,
            }),
            ok => ok,
        }
    }

    async fn observe_and_judge(
        self,
        vm: &mut impl Vm,
        expect: &Expectations,
    ) -> Result<Outcome, MachineError> {
        let result = match self {
            CheckId::Root => root::run(vm, expect).await?,
            CheckId::StateMounts => state_mounts::run(vm, expect).await?,
            CheckId::Fstab => fstab::run(vm).await?,
            CheckId::MovedFiles => moved_files::run(vm, expect).await?,
            CheckId::Overmount => {
                let (result, warnings) = overmount::run(vm).await?;
                return Ok(Outcome {
                    result,
                    warnings: Some(warnings),
                });
            }
            CheckId::Persistence => persistence::run(vm, expect).await?,
            CheckId::BootHealth | CheckId::Shutdown | CheckId::StateContract => {
                vm.across_phases(self).await?
            }
        };
        Ok(Outcome {
            result,
            warnings: None,
        })
    }
}

/// A check's guest observation, started ([`CheckId::start`]) and not yet
/// collected.
#[derive(Debug)]
pub enum Started {
    MovedFiles(moved_files::Started),
    Overmount(overmount::Started),
}

/// Image defects are verdicts, not infrastructure: a guest command a check
/// needs that runs and fails in the guest (a state dir that cannot be
/// written, a mount that fails, a tool the image lacks) fails that check,
/// naming the command and its complaint (exit 1). What stays an error
/// (exit 3) is QEMU, the agent, the host and timeouts.
pub fn verdict_of_failed_command(
    id: CheckId,
    e: MachineError,
) -> Result<CheckResult, MachineError> {
    match e {
        MachineError::CommandFailed {
            command,
            code,
            stderr,
        } => {
            let first = command.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let first = first.trim();
            let shown = if command.trim().lines().count() > 1 {
                format!("{first} …")
            } else {
                first.to_owned()
            };
            Ok(CheckResult::new(
                id.name(),
                Status::Fail,
                format!(
                    "a guest command the check needs failed (exit {code}): {}",
                    stderr.trim()
                ),
                vec![
                    format!("command: {shown}"),
                    format!("exit {code}; stderr: {}", stderr.trim()),
                ],
            ))
        }
        other => Err(other),
    }
}

impl std::fmt::Display for CheckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown check {name:?} (known: {})", known())]
pub struct UnknownCheck {
    pub name: String,
}

fn known() -> String {
    CheckId::ALL.map(CheckId::name).join(", ")
}

impl std::str::FromStr for CheckId {
    type Err = UnknownCheck;

    fn from_str(s: &str) -> Result<CheckId, UnknownCheck> {
        CheckId::ALL
            .into_iter()
            .find(|id| id.name() == s)
            .ok_or_else(|| UnknownCheck { name: s.to_owned() })
    }
}

/// What running one check gives the report.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub result: CheckResult,
    /// The journal's mount warnings with what each one hides, when the check
    /// examined them (overmount).
    pub warnings: Option<Vec<Warning>>,
}

/// The machine under test as a check sees it: a guest to run commands in,
/// what the current boot has shown (taken once per boot and shared by the
/// checks that judge it), and the two disruptive verbs of the story.
/// `run::Session` is the implementation; checks never start QEMU.
pub trait Vm {
    /// The running guest.
    fn machine(&mut self) -> &mut Machine;

    /// This boot's mount table (`findmnt`), taken on first use.
    fn mount_table(&mut self) -> impl Future<Output = Result<&[Mount], MachineError>>;

    /// This boot's journal (JSON lines), exported once and kept as an artifact.
    fn journal(&mut self) -> impl Future<Output = Result<&str, MachineError>>;

    /// `systemctl reboot`, then waits for the new boot to settle.
    fn reboot(&mut self) -> impl Future<Output = Result<(), MachineError>>;

    /// Whether the power cut branches off before the clean reboot
    /// (`fork_power_cut`) rather than following it.
    fn power_cut_beside(&self) -> bool;

    /// Syncs and takes the disk as a power cut now would leave it, for
    /// `crash`; its cold boot starts now and runs beside what comes next
    /// (the clean reboot). Only when `power_cut_beside`.
    fn fork_power_cut(&mut self) -> impl Future<Output = Result<(), MachineError>>;

    /// The power cut: the boot of the disk as `fork_power_cut` took it, or
    /// (without a fork) syncs, cuts the power now and starts the machine
    /// again from the same disk; then waits for the boot to settle.
    fn crash(&mut self) -> impl Future<Output = Result<(), MachineError>>;

    /// This check's guest observation if the session started it when the
    /// phase's checks began ([`CheckId::start`]: it then ran in the guest
    /// beside the checks before it); taken, so it is collected once. None:
    /// the check observes now.
    fn started(&mut self, _id: CheckId) -> Option<Started> {
        None
    }

    /// Since when (guest clock, seconds since the epoch) the system has been
    /// running off this disk, when that is before the current boot (the
    /// later boots of an upgrade lifecycle): what changed in state after it
    /// is the running system's doing. None: since the current boot.
    fn running_since(&self) -> Option<f64> {
        None
    }

    /// A check of `Phase::AcrossPhases` judged now, on this guest, against
    /// what the session kept (the state record taken after setup).
    fn across_phases(
        &mut self,
        id: CheckId,
    ) -> impl Future<Output = Result<CheckResult, MachineError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for id in CheckId::ALL {
            assert_eq!(id.name().parse::<CheckId>(), Ok(id));
            assert!(!id.description().is_empty() && !id.description().contains('\n'));
        }
        let mut names = CheckId::ALL.map(CheckId::name).to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CheckId::ALL.len());
    }

    #[test]
    fn registry_order_is_report_order_and_run_order() {
        assert_eq!(
            CheckId::ALL.map(CheckId::name),
            [
                "root",
                "state-mounts",
                "fstab",
                "moved-files",
                "overmount",
                "persistence",
                "boot-health",
                "shutdown",
                "state-contract"
            ]
        );
        let mut sorted = CheckId::ALL;
        sorted.sort();
        assert_eq!(sorted, CheckId::ALL, "ALL is in declaration order");
        assert!(CheckId::ALL
            .windows(2)
            .all(|w| w[0].phase() <= w[1].phase()));
    }

    #[test]
    fn a_guest_command_that_fails_is_a_failed_check_not_infrastructure() {
        let e = MachineError::CommandFailed {
            command: "set -e\nprintf '%s\\n' 'x' > '/srv/.token'\n".into(),
            code: "1".into(),
            stderr: "sh: 2: cannot create /srv/.token: Read-only file system\n".into(),
        };
        let r = verdict_of_failed_command(CheckId::Persistence, e).unwrap();
        assert_eq!(r.name, "persistence");
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.detail,
            "a guest command the check needs failed (exit 1): sh: 2: cannot create /srv/.token: Read-only file system"
        );
        assert_eq!(r.evidence[0], "command: set -e …");
        // QEMU, the agent and timeouts stay infrastructure.
        let e = MachineError::Timeout {
            what: "guest poweroff".into(),
            seconds: 5.0,
        };
        assert!(verdict_of_failed_command(CheckId::Persistence, e).is_err());
        let e = MachineError::Exited {
            status: "signal 9".into(),
            stderr: String::new(),
        };
        assert!(verdict_of_failed_command(CheckId::Root, e).is_err());
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = "bogus".parse::<CheckId>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown check \"bogus\" (known: root, state-mounts, fstab, moved-files, overmount, persistence, boot-health, shutdown, state-contract)"
        );
    }
}
