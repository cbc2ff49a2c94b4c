//! The build manifest: what the builder did, in the form the VM harness
//! reads to know what to expect inside the guest.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub label: String,
    pub fs_uuid: String,
    /// The root device as written into fstab and the kernel command line.
    pub root_device: String,
    pub state_dirs: StateDirs,
    /// Lines strata appended to etc/fstab (without trailing newlines).
    pub fstab_lines_added: Vec<String>,
    /// "move" or "copy".
    pub state_migration: String,
    /// Every entry moved into a state subvolume, as seen from the booted system.
    pub moved_files: Vec<MovedFile>,
    /// Image-relative paths, e.g. "systems/factory/kernel".
    pub kernel: String,
    pub initramfs: Option<String>,
    /// Where the kernel and initramfs came from inside the rootfs.
    pub kernel_source: String,
    pub initramfs_source: Option<String>,
    pub kernel_args: String,
    pub image_size: u64,
    /// Step name -> seconds, in the order the steps ran.
    pub timings: Vec<StepTiming>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDirs {
    /// Names like "home", in configured order.
    pub created: Vec<String>,
    pub skipped: Vec<SkippedStateDir>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedStateDir {
    pub dir: String,
    /// The rootfs fstab line that already mounts something there.
    pub fstab_entry: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedFile {
    /// Absolute path in the booted system, e.g. "/root/.ssh/authorized_keys".
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Hex sha256 of the contents, regular files only.
    pub sha256: Option<String>,
    /// Permission bits and setuid/setgid/sticky (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Symlink target, symlinks only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
}

impl Eq for StepTiming {}

impl Manifest {
    pub fn default_path(image: &Path) -> std::path::PathBuf {
        let mut s = image.as_os_str().to_owned();
        s.push(".manifest.json");
        s.into()
    }

    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let bytes = std::fs::read(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ManifestError::Parse {
                path: path.to_owned(),
                source,
            })?;
        // Names end up in paths and guest commands: the builder's rules hold.
        let invalid = |e: crate::layout::NameError| ManifestError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        crate::layout::validate_label(&m.label).map_err(invalid)?;
        for d in &m.state_dirs.created {
            crate::layout::validate_state_dir(d).map_err(invalid)?;
        }
        Ok(m)
    }

    /// Moved files grouped by state dir name ("root" -> entries under /root).
    pub fn moved_by_dir(&self) -> BTreeMap<String, Vec<&MovedFile>> {
        let mut map: BTreeMap<String, Vec<&MovedFile>> = BTreeMap::new();
        for f in &self.moved_files {
            let dir = f
                .path
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            map.entry(dir).or_default().push(f);
        }
        map
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {}: {reason}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("manifest {} is not a strata build manifest: {source}", path.display())]
    Parse {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let m = Manifest {
            manifest_version: MANIFEST_VERSION,
            label: "factory".into(),
            fs_uuid: "u".into(),
            root_device: "/dev/vda".into(),
            state_dirs: StateDirs {
                created: vec!["var".into(), "x';reboot;'".into()],
                skipped: vec![],
            },
            fstab_lines_added: vec![],
            state_migration: "move".into(),
            moved_files: vec![],
            kernel: String::new(),
            initramfs: None,
            kernel_source: String::new(),
            initramfs_source: None,
            kernel_args: String::new(),
            image_size: 0,
            timings: vec![],
        };
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(e.contains("invalid state directory"), "{e}");
    }
}
