//! The artifacts directory: what a person opens when a run fails.

use std::path::{Path, PathBuf};

pub const SERIAL_LOG: &str = "serial.log";
pub const QMP_EVENTS: &str = "qmp-events.json";
pub const SCREENDUMP: &str = "screen.png";
pub const QEMU_COMMAND: &str = "qemu-command.txt";
pub const REPORT_JSON: &str = "report.json";

pub fn journal(boot: u32) -> String {
    format!("journal-boot{boot}.json")
}

#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    /// Uses `dir` (created if needed), or a fresh directory under the system
    /// temp dir that is kept after the run.
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
        Ok(Artifacts { dir })
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
            REPORT_JSON,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        names.extend((1..=3).map(journal));
        for name in names {
            match std::fs::remove_file(self.path(&name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(self.path(SERIAL_LOG))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_starts_from_a_clean_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(Some(dir.path())).unwrap();
        for name in [SERIAL_LOG, SCREENDUMP, &journal(3), "notes.txt"] {
            a.write(name, "old").unwrap();
        }
        assert_eq!(a.clear_previous().unwrap(), dir.path().join(SERIAL_LOG));
        assert!(!a.path(SERIAL_LOG).exists());
        assert!(!a.path(SCREENDUMP).exists());
        assert!(!a.path(&journal(3)).exists());
        assert!(a.path("notes.txt").exists(), "files that are not ours stay");
    }
}
