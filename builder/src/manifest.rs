//! The image manifest (`IMG.manifest.json`): what strata deployed into an
//! image, one record per version, in the form the VM harness reads to know
//! what to expect inside the guest.
//!
//! Schema 2 (this one) describes the image: `default` and `versions[]`, each
//! version with its own state dirs, moved files and (for an upgrade) what
//! happened to the new rootfs's state data. Schema 1 (one build, its fields
//! at the top level) is still read: it becomes one version.
//!
//! Paths are bytes (a file under a state dir may be named `caf\xe9`): every
//! path and symlink target here — `moved_files[].path` and `.target`,
//! `state_data.merged` and `.left_out` — is in the lossless
//! [`crate::pathenc::encode_path`] form: valid UTF-8 as is, `%` as `%25`,
//! each byte that is not valid UTF-8 as `%XX` (`/var/caf%E9`,
//! `/srv/100%25`). [`crate::pathenc::decode_path`] gives the bytes back.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub fs_uuid: String,
    pub image_size: u64,
    /// The version `systems/default` names, as strata last set it.
    pub default: String,
    /// In the order they were deployed.
    pub versions: Vec<VersionRecord>,
}

/// Which build engine wrote a version (`strata build --backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// As root: loop device, mount, btrfs-progs on the host.
    Privileged,
    /// As an ordinary user: a user namespace, `mkfs.btrfs --rootdir`, and
    /// an appliance VM for the snapshot and the bootloader.
    Rootless,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Privileged => "privileged",
            Backend::Rootless => "rootless",
        }
    }
}

/// How a version came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deployment {
    Build,
    Upgrade,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub label: String,
    pub deployed_by: Deployment,
    /// An upgrade's `orig` starts as a snapshot of this version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub based_on: Option<String>,
    /// Seconds since the epoch (0: unknown, e.g. read from schema 1).
    #[serde(default)]
    pub deployed_at: u64,
    /// The root device as written into fstab and the kernel command line.
    pub root_device: String,
    pub state_dirs: StateDirs,
    /// Lines strata appended to etc/fstab (without trailing newlines).
    pub fstab_lines_added: Vec<String>,
    /// "move" or "copy".
    pub state_migration: String,
    /// Upgrades: what became of the data the new rootfs had in state dirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_data: Option<StateData>,
    /// Every entry moved (or merged) into a state subvolume, as seen from
    /// the booted system.
    pub moved_files: Vec<MovedFile>,
    /// Image-relative paths, e.g. "systems/factory/kernel".
    pub kernel: String,
    pub initramfs: Option<String>,
    /// Where the kernel and initramfs came from.
    pub kernel_source: String,
    pub initramfs_source: Option<String>,
    pub kernel_args: String,
    /// Step name -> seconds, in the order the steps ran.
    pub timings: Vec<StepTiming>,
    /// The engine that deployed it; absent in manifests written before
    /// there was a choice (those were all privileged) and for versions read
    /// off an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
}

/// An upgrade's handling of the new rootfs's files under state dirs: the
/// state subvolumes hold the machine's live data and stay authoritative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateData {
    /// "merge" (files the state lacks are added, nothing overwritten) or
    /// "keep" (the state is left as it is).
    pub policy: String,
    /// Paths added to the state (also in `moved_files`).
    pub merged: Vec<String>,
    /// Paths of the new rootfs not taken because the state has its own (or
    /// because the policy is "keep").
    pub left_out: Vec<String>,
}

/// Schema 1: one build, its fields at the top level.
#[derive(Debug, Clone, Deserialize)]
struct ManifestV1 {
    label: String,
    fs_uuid: String,
    root_device: String,
    state_dirs: StateDirs,
    fstab_lines_added: Vec<String>,
    state_migration: String,
    moved_files: Vec<MovedFile>,
    kernel: String,
    initramfs: Option<String>,
    kernel_source: String,
    initramfs_source: Option<String>,
    kernel_args: String,
    image_size: u64,
    timings: Vec<StepTiming>,
}

impl From<ManifestV1> for Manifest {
    fn from(v1: ManifestV1) -> Manifest {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            fs_uuid: v1.fs_uuid,
            image_size: v1.image_size,
            default: v1.label.clone(),
            versions: vec![VersionRecord {
                label: v1.label,
                deployed_by: Deployment::Build,
                based_on: None,
                deployed_at: 0,
                root_device: v1.root_device,
                state_dirs: v1.state_dirs,
                fstab_lines_added: v1.fstab_lines_added,
                state_migration: v1.state_migration,
                state_data: None,
                moved_files: v1.moved_files,
                kernel: v1.kernel,
                initramfs: v1.initramfs,
                kernel_source: v1.kernel_source,
                initramfs_source: v1.initramfs_source,
                kernel_args: v1.kernel_args,
                timings: v1.timings,
                backend: None,
            }],
        }
    }
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
    /// Absolute path in the booted system, e.g. "/root/.ssh/authorized_keys",
    /// in [`crate::pathenc::encode_path`] form (see the module doc).
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
    /// Symlink target, symlinks only ([`crate::pathenc::encode_path`] form).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// Extended attributes the move kept, POSIX ACLs
    /// (`system.posix_acl_access`/`_default`) and `security.capability`
    /// included: name ([`crate::pathenc::encode_path`] form) -> value in
    /// lower-case hex. Absent when the entry has none (and in manifests
    /// written before strata recorded them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Entries that are one inode within a state dir share this id: the
    /// path of the group's first member (sorted). Absent for an entry with
    /// no other link among the moved entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardlink: Option<String>,
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
        let parse = |source| ManifestError::Parse {
            path: path.to_owned(),
            source,
        };
        #[derive(Deserialize)]
        struct Schema {
            manifest_version: u32,
        }
        let schema: Schema = serde_json::from_slice(&bytes).map_err(parse)?;
        let m: Manifest = match schema.manifest_version {
            1 => serde_json::from_slice::<ManifestV1>(&bytes)
                .map_err(parse)?
                .into(),
            MANIFEST_VERSION => serde_json::from_slice(&bytes).map_err(parse)?,
            other => {
                return Err(ManifestError::Invalid {
                    path: path.to_owned(),
                    reason: format!(
                        "manifest_version {other} is not one this strata reads (1 or {MANIFEST_VERSION}): a newer strata wrote it"
                    ),
                })
            }
        };
        // Names end up in paths and guest commands: the builder's rules hold.
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.to_owned(),
            reason,
        };
        for v in &m.versions {
            crate::layout::validate_label(&v.label).map_err(|e| invalid(e.to_string()))?;
            for d in &v.state_dirs.created {
                crate::layout::validate_state_dir(d).map_err(|e| invalid(e.to_string()))?;
            }
        }
        if m.version(&m.default).is_none() {
            return Err(invalid(format!(
                "default {:?} is not one of its versions",
                m.default
            )));
        }
        Ok(m)
    }

    /// Writes the manifest next to where it goes and renames it into place:
    /// a reader sees the old or the new one, never half of either. Mode 0644.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut f = tempfile::Builder::new()
            .prefix(".strata-manifest-")
            .tempfile_in(dir)?;
        let mut json = serde_json::to_vec_pretty(self).expect("manifest serialises");
        json.push(b'\n');
        f.write_all(&json)?;
        f.as_file().sync_all()?;
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    pub fn version(&self, label: &str) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.label == label)
    }

    /// The record of the version `default` names (`load` checked it exists).
    pub fn default_version(&self) -> &VersionRecord {
        self.version(&self.default)
            .expect("a loaded or built manifest's default is one of its versions")
    }
}

impl VersionRecord {
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

impl crate::error::Failure for ManifestError {
    fn kind(&self) -> crate::error::FailureKind {
        crate::error::FailureKind::Input
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_json() -> serde_json::Value {
        serde_json::json!({
            "manifest_version": 1, "label": "factory",
            "fs_uuid": "3f1c0000-0000-4000-8000-000000000001",
            "root_device": "/dev/vda",
            "state_dirs": {"created": ["var"], "skipped": []},
            "fstab_lines_added": [], "state_migration": "move", "moved_files": [],
            "kernel": "systems/factory/kernel", "initramfs": null,
            "kernel_source": "boot/vmlinuz", "initramfs_source": null,
            "kernel_args": "", "image_size": 4096, "timings": []
        })
    }

    #[test]
    fn schema_1_is_read_as_one_version_and_saved_as_schema_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, v1_json().to_string()).unwrap();
        let m = Manifest::load(&path).unwrap();
        assert_eq!(m.manifest_version, MANIFEST_VERSION);
        assert_eq!(m.default, "factory");
        assert_eq!(m.image_size, 4096);
        assert_eq!(m.versions.len(), 1);
        assert_eq!(m.default_version().state_dirs.created, ["var"]);
        assert_eq!(m.default_version().deployed_by, Deployment::Build);
        m.save(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(raw["manifest_version"], 2);
        assert_eq!(raw["versions"][0]["label"], "factory");
    }

    #[test]
    fn moved_files_without_xattrs_or_hardlink_load_and_save_without_them() {
        let f: MovedFile = serde_json::from_value(serde_json::json!({
            "path": "/var/x", "type": "file", "sha256": null,
            "mode": 420, "uid": 0, "gid": 0, "size": 1
        }))
        .unwrap();
        assert!(f.xattrs.is_empty() && f.hardlink.is_none());
        let back = serde_json::to_value(&f).unwrap();
        assert!(back.get("xattrs").is_none() && back.get("hardlink").is_none());
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut v = v1_json();
        v["state_dirs"]["created"] = serde_json::json!(["var", "x';reboot;'"]);
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(e.contains("invalid state directory"), "{e}");
    }

    #[test]
    fn a_default_that_names_no_version_and_future_schemas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut m: Manifest = serde_json::from_value::<ManifestV1>(v1_json())
            .unwrap()
            .into();
        m.default = "v2".into();
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("default \"v2\" is not one of its versions"),
            "{e}"
        );
        m.default = "factory".into();
        m.manifest_version = 3;
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(e.contains("manifest_version 3"), "{e}");
    }
}
