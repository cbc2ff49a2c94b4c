//! The pure half of a build: from the rootfs's fstab and the options, decide
//! the root device, which state directories get subvolumes, and the exact
//! bytes of the completed fstab. Nothing here touches the disk.

use crate::fstab::{self, Entry, Format, Rejected};
use crate::layout::{self, validate_label, validate_state_dir, NameError, FSTAB_MARKER};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub label: String,
    pub state_dirs: Vec<String>,
    /// Set explicitly by the user (`--root-device`, ROOT_DEVICE).
    pub root_device: Option<String>,
    pub fs_uuid: String,
    /// Whether the system being deployed has an initramfs.
    pub has_initramfs: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootOrigin {
    /// The rootfs's fstab already mounts `/` from this source.
    FstabEntry,
    /// Given by the user.
    Explicit,
    /// The new filesystem's UUID.
    FsUuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum StateDirAction {
    /// A `state/<name>` subvolume, an fstab line, and the data moved into it.
    Create { fstab_line: String },
    /// The rootfs fstab already mounts something there; left alone.
    Skip { fstab_entry: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateDirPlan {
    pub name: String,
    #[serde(flatten)]
    pub action: StateDirAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum FstabChange {
    Unchanged,
    /// Write these bytes; `created` when the rootfs had no fstab.
    Write {
        #[serde(skip)]
        contents: Vec<u8>,
        created: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub label: String,
    pub root_device: String,
    pub root_origin: RootOrigin,
    pub state_dirs: Vec<StateDirPlan>,
    /// Lines appended to fstab, without the marker comment.
    pub fstab_lines_added: Vec<String>,
    /// Lines of the rootfs's fstab that libmount rejects: kept byte for
    /// byte, never mounted; the build warns about each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fstab_rejected: Vec<Rejected>,
    pub fstab: FstabChange,
}

impl Plan {
    pub fn created_state_dirs(&self) -> impl Iterator<Item = &str> {
        self.state_dirs.iter().filter_map(|d| match d.action {
            StateDirAction::Create { .. } => Some(d.name.as_str()),
            StateDirAction::Skip { .. } => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("state directory {0:?} is listed twice")]
    DuplicateStateDir(String),
    #[error("invalid root device {0:?}: it must be one word (e.g. /dev/vda or UUID=...)")]
    RootDevice(String),
    #[error("etc/fstab mounts / from {fstab} but the root device was given as {explicit}: remove one of them")]
    RootConflict { fstab: String, explicit: String },
    #[error("etc/fstab line {line}: {what}, so libmount (which systemd mounts with) reads the whole file as a {table} table: none of its lines would be mounted, not even the ones strata adds; fix or comment out that line")]
    NotAnFstab {
        line: usize,
        what: &'static str,
        table: &'static str,
    },
    #[error("root device {0} needs an initramfs to be found at boot, and the rootfs has none: give an explicit device with --root-device (e.g. /dev/vda)")]
    NeedsInitramfs(String),
}

/// Kernels resolve only device paths and PARTUUID=/PARTLABEL= themselves;
/// UUID= and LABEL= are looked up by udev/blkid in the initramfs.
fn needs_initramfs(device: &str) -> bool {
    device.starts_with("UUID=") || device.starts_with("LABEL=")
}

/// What `plan` refuses in its options alone, before any rootfs is read:
/// the label, the state dir names (and duplicates), the root device.
pub fn check_options(
    label: &str,
    state_dirs: &[String],
    root_device: Option<&str>,
) -> Result<(), PlanError> {
    validate_label(label)?;
    for (i, d) in state_dirs.iter().enumerate() {
        validate_state_dir(d)?;
        if state_dirs[..i].contains(d) {
            return Err(PlanError::DuplicateStateDir(d.clone()));
        }
    }
    if let Some(r) = root_device {
        if r.is_empty() || r.chars().any(char::is_whitespace) {
            return Err(PlanError::RootDevice(r.to_owned()));
        }
    }
    Ok(())
}

/// Decides everything about the fstab and state directories. `fstab` is the
/// rootfs's etc/fstab, or None when it has none.
pub fn plan(fstab: Option<&[u8]>, opts: &PlanOptions) -> Result<Plan, PlanError> {
    check_options(&opts.label, &opts.state_dirs, opts.root_device.as_deref())?;

    let parsed = fstab.map(fstab::parse_full);
    if let Some(p) = &parsed {
        let not_fstab = match p.format {
            Format::Fstab => None,
            Format::Mountinfo => Some(("it starts with two numbers", "mountinfo")),
            Format::Swaps => Some(("it starts with \"Filename<TAB>\"", "swaps")),
        };
        if let (Some((what, table)), Some(line)) = (not_fstab, p.format_line) {
            return Err(PlanError::NotAnFstab { line, what, table });
        }
    }
    let (entries, rejected) = parsed.map(|p| (p.entries, p.rejected)).unwrap_or_default();
    let root_entry = fstab::find_target(&entries, "/");
    let (root_device, root_origin) = match (root_entry, &opts.root_device) {
        (Some(e), Some(explicit)) if &e.source != explicit => {
            return Err(PlanError::RootConflict {
                fstab: e.source.clone(),
                explicit: explicit.clone(),
            })
        }
        (Some(e), _) => (e.source.clone(), RootOrigin::FstabEntry),
        (None, Some(explicit)) => (explicit.clone(), RootOrigin::Explicit),
        (None, None) => (format!("UUID={}", opts.fs_uuid), RootOrigin::FsUuid),
    };
    if root_origin != RootOrigin::Explicit && !opts.has_initramfs && needs_initramfs(&root_device) {
        return Err(PlanError::NeedsInitramfs(root_device));
    }

    let mut added = Vec::new();
    if root_entry.is_none() {
        added.push(format!("{root_device} / btrfs defaults,rw,noatime 0 1"));
    }
    let state_dirs: Vec<StateDirPlan> = opts
        .state_dirs
        .iter()
        .map(|name| {
            let action = match fstab::find_target(&entries, &layout::state_mountpoint(name)) {
                Some(Entry { raw, .. }) => StateDirAction::Skip {
                    fstab_entry: raw.clone(),
                },
                None => {
                    let line = format!(
                        "{root_device} {} btrfs subvol={},defaults,rw,noatime 0 2",
                        layout::state_mountpoint(name),
                        layout::fsroot(&layout::state(name))
                    );
                    added.push(line.clone());
                    StateDirAction::Create { fstab_line: line }
                }
            };
            StateDirPlan {
                name: name.clone(),
                action,
            }
        })
        .collect();

    let change = if added.is_empty() {
        FstabChange::Unchanged
    } else {
        FstabChange::Write {
            contents: completed_fstab(fstab.unwrap_or_default(), &added),
            created: fstab.is_none(),
        }
    };
    Ok(Plan {
        label: opts.label.clone(),
        root_device,
        root_origin,
        state_dirs,
        fstab_lines_added: added,
        fstab_rejected: rejected,
        fstab: change,
    })
}

/// Every existing byte, in order, then (after a newline if the file lacked
/// one) the marker and the added lines.
fn completed_fstab(existing: &[u8], added: &[String]) -> Vec<u8> {
    let mut out = existing.to_vec();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(FSTAB_MARKER.as_bytes());
    out.push(b'\n');
    for line in added {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}
