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

    /// QEMU appends to its serial chardev file; a rerun into the same
    /// directory must not mix two runs.
    pub fn reset_serial_log(&self) -> std::io::Result<PathBuf> {
        let p = self.path(SERIAL_LOG);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(p)
    }
}
