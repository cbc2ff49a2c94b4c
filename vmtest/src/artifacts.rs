//! The artifacts directory: what a person opens when a run fails.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SERIAL_LOG: &str = "serial.log";
/// The power-cut branch's console: it boots beside the clean reboot, so
/// its lines go to a file of their own, not between the reboot's.
pub const SERIAL_LOG_POWER_CUT: &str = "serial-power-cut.log";
pub const QMP_EVENTS: &str = "qmp-events.json";
pub const SCREENDUMP: &str = "screen.png";
pub const QEMU_COMMAND: &str = "qemu-command.txt";
/// The later boots' command line when they are direct (`--later-boots`).
pub const QEMU_COMMAND_LATER: &str = "qemu-command-later.txt";
pub const REPORT_JSON: &str = "report.json";
/// SeaBIOS's debug console during a KVM boot 1 that `--accel auto`
/// abandoned: how far the firmware got.
pub const KVM_DEBUGCON: &str = "firmware-debugcon-boot1-kvm.log";
/// Held (flock) by the run using the directory; says which run that is.
pub const LOCK: &str = ".strata-test.lock";

pub fn journal(boot: u32) -> String {
    format!("journal-boot{boot}.json")
}

/// A scenario's guest's journal (`run::Scenario`), by the scenario's own
/// boot count: 1 is the saved boot it started from, 2 and 3 its reboot
/// and power cut (persistence).
pub fn scenario_journal(scenario: &str, boot: u32) -> String {
    format!("{SCENARIO_PREFIX}{scenario}-journal-boot{boot}.json")
}

const SCENARIO_PREFIX: &str = "scenario-";

/// QEMU's stdout and stderr, one file per QEMU process, named by the boot
/// it started: `attempt` is "-kvm" for a KVM boot 1 that was abandoned
/// for TCG (so both attempts' words are kept).
pub fn qemu_output(boot: u32, attempt: &str) -> String {
    format!("{QEMU_OUTPUT_PREFIX}{boot}{attempt}.log")
}

/// A scenario's guest's QEMU output, by the scenario's own boot count.
pub fn scenario_qemu_output(scenario: &str, boot: u32) -> String {
    format!("{SCENARIO_PREFIX}{scenario}-{QEMU_OUTPUT_PREFIX}{boot}.log")
}

const QEMU_OUTPUT_PREFIX: &str = "qemu-stderr-boot";

/// A power-cut point's own files (`run::power_cut`), by its place in the
/// matrix: `serial` (the restored guest's console, then the cold boot's),
/// `upgrade` (what the upgrade in the guest said up to the cut),
/// `qemu-restore` (the restoring QEMU's stdout and stderr).
pub fn cut_point(i: usize, what: &str) -> String {
    format!("cut{i:02}-{what}.log")
}

#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
    /// The lock on the directory, held while any clone lives.
    _lock: Arc<std::fs::File>,
}

impl Artifacts {
    /// Uses `dir` (created if needed), or a fresh directory under the system
    /// temp dir that is kept after the run. Two runs never share one
    /// directory: the second is refused (`ErrorKind::WouldBlock`, naming
    /// the first) instead of interleaving its files with the first's.
    pub fn open(dir: Option<&Path>) -> std::io::Result<Artifacts> {
        let dir = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                std::path::absolute(d)?
            }
            None => tempfile::Builder::new()
                .prefix("strata-test.")
                .tempdir()?
                .keep(),
        };
        let lock = lock(&dir)?;
        Ok(Artifacts {
            dir,
            _lock: Arc::new(lock),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> std::io::Result<PathBuf> {
        let p = self.path(name);
        std::fs::write(&p, bytes)?;
        Ok(p)
    }

    /// Removes what an earlier run left under our names: QEMU appends to
    /// the serial log, and a stale screendump or journal would be mistaken
    /// for this run's. Returns the serial log's path.
    pub fn clear_previous(&self) -> std::io::Result<PathBuf> {
        let mut names: Vec<String> = [
            SERIAL_LOG,
            QMP_EVENTS,
            SCREENDUMP,
            QEMU_COMMAND,
            QEMU_COMMAND_LATER,
            REPORT_JSON,
            KVM_DEBUGCON,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        names.extend((1..=3).map(journal));
        // Scenarios are named by the run that had them: a later run
        // without them must not show them as its own.
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let scenario = name.starts_with(SCENARIO_PREFIX)
                && (name.ends_with(".json") || name.ends_with(".log"));
            if scenario || name.starts_with(QEMU_OUTPUT_PREFIX) {
                names.push(name);
            }
        }
        for name in names {
            match std::fs::remove_file(self.path(&name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(self.path(SERIAL_LOG))
    }
}

/// Takes the directory's lock or says who holds it. The lock file keeps
/// the holder's pid and start time; flock, not the file, is the lock, so a
/// run that was killed never blocks the next one.
fn lock(dir: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join(LOCK);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another `strata test` run ({}); give each run its own --artifacts",
                dir.display(),
                if holder.is_empty() {
                    "pid unknown"
                } else {
                    holder
                }
            ),
        ));
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(
        f,
        "pid {}, started {}",
        std::process::id(),
        crate::qmp::now_epoch() as u64
    )?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_starts_from_a_clean_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(Some(dir.path())).unwrap();
        let scenario = scenario_journal("tmpfs", 2);
        for name in [SERIAL_LOG, SCREENDUMP, &journal(3), &scenario, "notes.txt"] {
            a.write(name, "old").unwrap();
        }
        assert_eq!(a.clear_previous().unwrap(), dir.path().join(SERIAL_LOG));
        assert!(!a.path(SERIAL_LOG).exists());
        assert!(!a.path(SCREENDUMP).exists());
        assert!(!a.path(&journal(3)).exists());
        assert!(!a.path(&scenario).exists(), "an earlier run's scenario");
        assert!(a.path("notes.txt").exists(), "files that are not ours stay");
    }

    #[test]
    fn a_second_run_on_the_same_artifacts_dir_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = Artifacts::open(Some(dir.path())).unwrap();
        let err = Artifacts::open(Some(dir.path())).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("in use by another `strata test` run"), "{msg}");
        // A clone is the same run: the lock lasts until the last one goes.
        let clone = first.clone();
        drop(first);
        assert!(Artifacts::open(Some(dir.path())).is_err());
        drop(clone);
        Artifacts::open(Some(dir.path())).expect("free again once the run is gone");
    }
}
