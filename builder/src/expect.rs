//! What a booted image must show — the one input of the VM checks. Built
//! from a build manifest (everything the build did, moved files included)
//! or read off an image that has none (an image built by someone else: the
//! default version, its state subvolumes, the root device of its boot
//! entry; no list of moved files).

use crate::bootloader::{self, cmdline};
use crate::layout::{self, NameError, Version};
use crate::manifest::{Manifest, MovedFile};
use crate::model::ImageLayout;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectations {
    /// The version that must be booted (`/` is its `run`).
    pub version: Version,
    pub fs_uuid: String,
    /// As on the kernel command line and in fstab.
    pub root_device: String,
    /// Names of the state dirs that must be mounted, in order.
    pub state_dirs: Vec<String>,
    /// Every file the build moved into state, as the booted system sees it.
    /// Empty when the source is the image itself.
    pub moved_files: Vec<MovedFile>,
    pub source: Source,
}

/// Where the expectations come from: the report says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Manifest(PathBuf),
    /// No build manifest: read off the image.
    Image,
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Manifest(p) => format!("build manifest {}", p.display()),
            Source::Image => "read off the image (no build manifest)".to_owned(),
        }
    }

    /// Whether the list of moved files is known.
    pub fn knows_moved_files(&self) -> bool {
        matches!(self, Source::Manifest(_))
    }
}

impl Expectations {
    /// From a manifest already loaded (and so validated) from `path`: the
    /// version `label` names, or the manifest's default.
    pub fn from_manifest(
        m: &Manifest,
        path: PathBuf,
        label: Option<&str>,
    ) -> Result<Expectations, String> {
        let v = match label {
            None => m.default_version(),
            Some(l) => m.version(l).ok_or_else(|| {
                format!(
                    "{}: no version {l:?} (it has {})",
                    path.display(),
                    m.versions
                        .iter()
                        .map(|v| v.label.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
        };
        let name_error = |e: NameError| format!("{}: {e}", path.display());
        for d in &v.state_dirs.created {
            layout::validate_state_dir(d).map_err(name_error)?;
        }
        Ok(Expectations {
            version: Version::new(&v.label).map_err(name_error)?,
            fs_uuid: m.fs_uuid.clone(),
            root_device: v.root_device.clone(),
            state_dirs: v.state_dirs.created.clone(),
            moved_files: v.moved_files.clone(),
            source: Source::Manifest(path),
        })
    }

    /// From an image's layout as the image reader found it.
    /// From an image's layout as the image reader found it: the version
    /// `label` names, or the one `systems/default` names.
    pub fn from_layout(layout: &ImageLayout, label: Option<&str>) -> Result<Expectations, String> {
        let label = match label {
            Some(l) if layout.versions.iter().any(|v| v.label == l) => l.to_owned(),
            Some(l) => {
                return Err(format!(
                    "{}: no version {l:?} (it has {})",
                    layout.image,
                    layout
                        .versions
                        .iter()
                        .map(|v| v.label.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            None => layout.default.version.clone().ok_or_else(|| {
                format!(
                    "{}: no build manifest, and no {} pointing at a version to read expectations from",
                    layout.image,
                    layout::DEFAULT_LINK
                )
            })?,
        };
        // The names end up in guest shell scripts and paths: hold them to
        // the rules strata builds with.
        let version = Version::new(&label)
            .map_err(|e| format!("{}: {}: {e}", layout.image, layout::DEFAULT_LINK))?;
        // Every state subvolume present is expected to be mounted, whatever
        // the (possibly broken) fstab says: that is what the checks are for.
        let mut state_dirs = Vec::new();
        for d in layout.state_dirs.iter().filter(|d| d.subvolume.is_some()) {
            layout::validate_state_dir(&d.name)
                .map_err(|e| format!("{}: {}/: {e}", layout.image, layout::STATE_DIR))?;
            state_dirs.push(d.name.clone());
        }
        let rank = |n: &String| {
            layout::DEFAULT_STATE_DIRS
                .iter()
                .position(|d| d == n)
                .unwrap_or(layout::DEFAULT_STATE_DIRS.len())
        };
        state_dirs.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
        // The entry for the version, as upgrades and versions find it: by
        // its label, else the one that boots it (a 2014-style `label
        // default` entry going through the link).
        let root_device = bootloader::menu_entry(layout, &label)
            .and_then(|e| e.append.as_deref())
            .and_then(cmdline::root_device)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("UUID={}", layout.filesystem.uuid));
        Ok(Expectations {
            version,
            fs_uuid: layout.filesystem.uuid.clone(),
            root_device,
            state_dirs,
            moved_files: Vec::new(),
            source: Source::Image,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Boot, BootEntry, DefaultLink, Filesystem, StateDir};

    fn layout(default: &str, states: &[(&str, bool)]) -> ImageLayout {
        ImageLayout {
            image: "their.img".into(),
            filesystem: Filesystem {
                uuid: "abcd".into(),
                label: None,
            },
            default: DefaultLink {
                link: Some(default.into()),
                version: Some(default.into()),
            },
            versions: vec![],
            state_dirs: states
                .iter()
                .enumerate()
                .map(|(i, (n, sv))| StateDir {
                    name: (*n).into(),
                    subvolume: sv.then_some(256 + i as u64),
                    mounted_by: vec![],
                })
                .collect(),
            subvolumes: vec![],
            boot: Some(Boot {
                path: layout::BOOT_MENU.into(),
                default: Some("v1".into()),
                timeout: None,
                entries: vec![BootEntry {
                    label: "v1".into(),
                    kernel: Some("/systems/v1/kernel".into()),
                    initrd: None,
                    append: Some("root=/dev/vda rw".into()),
                    kernel_present: true,
                    initrd_present: None,
                }],
            }),
            problems: vec![],
        }
    }

    #[test]
    fn expectations_come_from_the_image() {
        let e = Expectations::from_layout(
            &layout("v1", &[("var", true), ("home", true), ("extra", false)]),
            None,
        )
        .unwrap();
        assert_eq!(e.version.label(), "v1");
        assert_eq!(e.root_device, "/dev/vda");
        // Plain directories under state/ are not subvolumes to mount.
        assert_eq!(e.state_dirs, ["home", "var"]);
        assert!(e.moved_files.is_empty());
        assert!(!e.source.knows_moved_files());
    }

    #[test]
    fn root_device_from_an_entry_booting_through_the_default_link() {
        let mut l = layout("v1", &[]);
        let e = &mut l.boot.as_mut().unwrap().entries[0];
        e.label = "default".into();
        e.append = Some("root=LABEL=strata rootflags=subvol=systems/default/run rw".into());
        let e = Expectations::from_layout(&l, None).unwrap();
        assert_eq!(e.root_device, "LABEL=strata");
    }

    #[test]
    fn names_from_a_foreign_image_follow_the_builders_rules() {
        let e = Expectations::from_layout(&layout("v1;reboot", &[]), None).unwrap_err();
        assert!(e.contains("invalid version label \"v1;reboot\""), "{e}");
        let e = Expectations::from_layout(&layout("v1", &[("a b", true)]), None).unwrap_err();
        assert!(e.contains("invalid state directory"), "{e}");
    }
}
