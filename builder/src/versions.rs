//! The versions of an image (layout.md §6): what `strata versions` lists,
//! the default flip (`strata set-default`: rollback and roll-forward) and
//! removal (`strata remove`).
//!
//! Changes are ordered so that a crash at any point leaves a menu whose
//! every per-version entry boots, and a `systems/default` naming a whole
//! version:
//!
//! - set-default: the menu (temp file + rename) first, the flip of
//!   `systems/default` (one rename) last, the manifest after. When the
//!   versions agree on root device, arguments and initramfs, the menu does
//!   not change and the flip is the only change. Otherwise a crash between
//!   the two leaves the `default` entry with the new version's command line
//!   and the old version's kernel (see `extlinux`): each version's own entry
//!   still boots it, and running the command again completes the change.
//! - remove: the menu without the version first, then its subvolumes
//!   (nested ones first), then its directory (kernel, initramfs), then the
//!   manifest. Killed half way, the version is still listed (partial once
//!   its subvolumes started to go) and `remove` again finishes it.
//!
//! Both decide on a read-only mount before changing anything, so a refusal
//! leaves the image byte for byte as it was.
//!
//! Which versions are whole, and the menu entries they get, is
//! `bootloader`'s rule (`bootloader::problems`, `bootloader::menu_entries`),
//! the one the upgrade follows too; a partial version is never made the
//! default. Names starting with `layout::RESERVED_PREFIX` are strata's
//! debris, not versions: listed apart.

use crate::boot;
use crate::bootloader::{self, BootEntry};
use crate::error::StepError;
use crate::host::btrfs;
use crate::image::{self, ImageError, Mode, OpenImage};
use crate::layout::{self, Version};
use crate::lock::ImageLock;
use crate::manifest::{Manifest, VersionRecord};
use crate::model::ImageLayout;
use crate::rootfs::RootDir;
use crate::unshared::{self, Owner};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One version as `strata versions` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub label: String,
    /// `systems/default` names it.
    pub default: bool,
    pub kernel: KernelInfo,
    /// Data bytes its `orig` and `run` reference and nothing else on the
    /// image does (`unshared`): about what removing it gives back.
    pub unshared_bytes: Option<u64>,
    /// When its `orig` subvolume was created, RFC 3339 in UTC.
    pub deployed_at: Option<String>,
    pub status: Status,
    /// Why a partial version is partial (empty for a whole one).
    pub problems: Vec<String>,
    pub initramfs_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelInfo {
    /// `6.1.0-28-amd64`: from the `boot/vmlinuz-<version>` in its `orig`
    /// with the same bytes, else from the name the manifest recorded.
    pub version: Option<String>,
    /// Size of `systems/<label>/kernel`.
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Whole,
    /// Missing a tree or its kernel (an interrupted deploy or removal):
    /// never made the default; `remove` deletes it.
    Partial,
}

/// Every version of an image, and strata's debris beside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Versions {
    /// The label `systems/default` names (None: no link, or it names no
    /// version).
    pub default: Option<String>,
    /// Sorted by label.
    pub versions: Vec<VersionInfo>,
    /// Image paths of entries in `systems/` an interrupted strata left
    /// (`systems/.strata-…`): not versions.
    pub debris: Vec<String>,
}

impl Versions {
    pub fn get(&self, label: &str) -> Option<&VersionInfo> {
        self.versions.iter().find(|v| v.label == label)
    }
}

/// The versions of the image at `path` (read-only), the agreed short form.
pub fn list(image: &Path) -> Result<Vec<VersionInfo>, ImageError> {
    Ok(list_all(image)?.versions)
}

/// The versions of the image at `path` and its debris, through a read-only
/// mount. Uses `IMG.manifest.json` when it describes this image (kernel
/// version names, required initramfs); never needs it.
pub fn list_all(image: &Path) -> Result<Versions, ImageError> {
    let _lock = ImageLock::shared(image)?;
    let fs = image::read_superblock(image)?;
    let manifest = Manifest::load(&Manifest::default_path(image))
        .ok()
        .filter(|m| m.fs_uuid == fs.uuid);
    let img = image::open(image, Mode::ReadOnly)?;
    if !img.top().join(layout::SYSTEMS_DIR).is_dir() {
        return Err(ImageError::Input(format!(
            "{}: no {}/ directory at the top level: not a strata system layout",
            image.display(),
            layout::SYSTEMS_DIR
        )));
    }
    let layout = img.layout();
    let mut versions = examine(img.top(), &layout, manifest.as_ref());
    measure(img.top(), &mut versions)?;
    img.close()?;
    Ok(versions)
}

/// Makes `label` the default: writes the menu for every whole version
/// with `label` as default, flips `systems/default`, and records the new
/// default in the manifest (`manifest`, else `IMG.manifest.json` when it
/// exists). Refused, with nothing changed: an unknown label, a partial
/// version, a manifest of another image or without `label`, a menu strata
/// cannot rewrite.
pub fn set_default(image: &Path, label: &str, manifest: Option<&Path>) -> Result<(), ImageError> {
    let version = Version::new(label).map_err(|e| ImageError::Input(e.to_string()))?;
    let _lock = lock_to_write(image)?;
    let fs = image::read_superblock(image)?;
    let mut manifest = load_manifest(image, manifest, &fs.uuid)?;
    let record = manifest.as_ref();
    decide_then_act(
        image,
        |img| entries_for_default(img, label, record),
        |img, entries| {
            boot::write_menu(img.top(), &version, &entries).map_err(step)?;
            boot::set_default(img.top(), &version).map_err(step)
        },
    )?;
    if let Some((path, m)) = &mut manifest {
        m.default = label.to_owned();
        save(m, path)?;
    }
    Ok(())
}

/// The menu entries with `label` as the new default, or why not.
fn entries_for_default(
    img: &OpenImage,
    label: &str,
    manifest: Option<&(PathBuf, Manifest)>,
) -> Result<Vec<BootEntry>, ImageError> {
    let shown = img.path().display().to_string();
    let layout = img.layout();
    let versions = examine(img.top(), &layout, manifest.map(|m| &m.1));
    let info = known(&shown, &versions, label)?;
    if info.status == Status::Partial {
        return Err(ImageError::Input(format!(
            "{shown}: version {label} is partial ({}): it cannot boot; not made the default",
            info.problems.join("; ")
        )));
    }
    if let Some((path, m)) = manifest {
        if m.version(label).is_none() {
            return Err(ImageError::Input(format!(
                "manifest {} has no version {label:?} (it has {}): it does not describe this image's versions; give --manifest",
                path.display(),
                labels_of(m.versions.iter().map(|v| v.label.as_str()))
            )));
        }
    }
    menu_entries(img, &layout, manifest.map(|m| &m.1), None)
}

/// Removes version `label`: the menu without it first, then its
/// subvolumes (nested ones first), its directory, and its manifest record.
/// Refused, with nothing changed: the default version (set another one
/// first), an unknown label, a manifest of another image, a menu strata
/// cannot rewrite.
pub fn remove(image: &Path, label: &str, manifest: Option<&Path>) -> Result<(), ImageError> {
    let version = Version::new(label).map_err(|e| ImageError::Input(e.to_string()))?;
    let fs = image::read_superblock(image)?;
    let mut manifest = load_manifest(image, manifest, &fs.uuid)?;
    let record = manifest.as_ref();
    let mut default = None;
    decide_then_act(
        image,
        |img| entries_without(img, label, record),
        |img, (d, entries)| {
            boot::write_menu(img.top(), &d, &entries).map_err(step)?;
            delete_version(img, &version)?;
            default = Some(d);
            Ok(())
        },
    )?;
    if let (Some((path, m)), Some(default)) = (&mut manifest, default) {
        m.versions.retain(|v| v.label != label);
        if m.default == label {
            m.default = default.label().to_owned();
        }
        save(m, path)?;
    }
    Ok(())
}

/// `remove` on the running system (`crate::running`): the booted version
/// is refused first, naming it (its `run` is `/`; deleting it would pull
/// the system from under itself), then `remove` on its device.
pub fn remove_running(
    running: &crate::running::Running,
    label: &str,
    manifest: Option<&Path>,
) -> Result<(), ImageError> {
    refuse_booted(running, label)?;
    remove(&running.device, label, manifest)
}

/// The refusal of `remove_running`.
pub fn refuse_booted(running: &crate::running::Running, label: &str) -> Result<(), ImageError> {
    if running.booted.label() == label {
        return Err(ImageError::Input(format!(
            "{label} is the booted version (/ is {} of {}): it cannot be removed while it runs; boot another version first",
            layout::fsroot(&running.booted.run()),
            running.device.display()
        )));
    }
    Ok(())
}

/// The default and the menu entries once `label` is gone, or why it may
/// not go.
fn entries_without(
    img: &OpenImage,
    label: &str,
    manifest: Option<&(PathBuf, Manifest)>,
) -> Result<(Version, Vec<BootEntry>), ImageError> {
    let shown = img.path().display().to_string();
    let layout = img.layout();
    let versions = examine(img.top(), &layout, manifest.map(|m| &m.1));
    known(&shown, &versions, label)?;
    let default = match versions.default.as_deref() {
        Some(d) if d == label => {
            return Err(ImageError::Input(format!(
                "{shown}: {label} is the default version: make another version the default first (strata set-default {shown} OTHER)"
            )))
        }
        Some(d) => Version::new(d).map_err(|e| ImageError::Input(e.to_string()))?,
        None => {
            return Err(ImageError::Input(format!(
                "{shown}: {} names no version: set a default first (strata set-default)",
                layout::DEFAULT_LINK
            )))
        }
    };
    if let Some((path, m)) = manifest {
        if m.default == label && m.version(default.label()).is_none() {
            return Err(ImageError::Input(format!(
                "manifest {}: its default is {label} and it has no record of {default}, the image's default: it does not describe this image",
                path.display()
            )));
        }
    }
    let entries = menu_entries(img, &layout, manifest.map(|m| &m.1), Some(label))?;
    Ok((default, entries))
}

/// The exclusive lock for the whole command (the manifest too), then no
/// loop device but a killed strata's (cleaned) on the image: refused
/// before even the read-only look, which would mount the filesystem a
/// second time beside a hand mount.
fn lock_to_write(image: &Path) -> Result<ImageLock, ImageError> {
    let lock = ImageLock::exclusive(image)?;
    if std::fs::metadata(image).is_ok_and(|m| m.is_file()) {
        crate::host::debris::clean(&crate::host::debris::find_for_image(image));
        crate::lock::refuse_attached(image)?;
    }
    Ok(lock)
}

/// Decides on a read-only mount first, so that a refusal leaves the image
/// byte for byte as it was (a read-write mount alone writes to it); then
/// decides again on the read-write mount `act` changes the image through.
fn decide_then_act<T>(
    image: &Path,
    decide: impl Fn(&OpenImage) -> Result<T, ImageError>,
    act: impl FnOnce(&OpenImage, T) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let img = image::open(image, Mode::ReadOnly)?;
    let decided = decide(&img);
    img.close()?;
    decided?;
    let img = image::open(image, Mode::ReadWrite)?;
    let decided = decide(&img)?;
    act(&img, decided)?;
    img.close()
}

// ---------------------------------------------------------------------------

/// The versions as found, without the costly measures (`measure`).
fn examine(top: &Path, layout: &ImageLayout, manifest: Option<&Manifest>) -> Versions {
    let default = layout
        .default
        .version
        .clone()
        .filter(|l| !layout::is_debris_name(l));
    let mut versions = Vec::new();
    for v in &layout.versions {
        if layout::is_debris_name(&v.label) {
            continue;
        }
        let record = manifest.and_then(|m| m.version(&v.label));
        let version = Version::found(&v.label);
        let problems = bootloader::problems(top, layout, manifest, v);
        versions.push(VersionInfo {
            label: v.label.clone(),
            default: default.as_deref() == Some(v.label.as_str()),
            kernel: KernelInfo {
                version: kernel_version(top, &version, v.kernel_size, record),
                bytes: v.kernel_size,
            },
            unshared_bytes: None,
            deployed_at: None,
            status: if problems.is_empty() {
                Status::Whole
            } else {
                Status::Partial
            },
            problems,
            initramfs_bytes: v.initramfs_size,
        });
    }
    let mut debris: Vec<String> = std::fs::read_dir(top.join(layout::SYSTEMS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| layout::is_debris_name(n))
        .map(|n| format!("{}/{n}", layout::SYSTEMS_DIR))
        .collect();
    debris.sort();
    Versions {
        default,
        versions,
        debris,
    }
}

/// Deployment times and unshared bytes (one walk of the whole image).
fn measure(top: &Path, versions: &mut Versions) -> Result<(), ImageError> {
    let owners: Vec<Owner> = versions
        .versions
        .iter()
        .map(|v| {
            let version = Version::found(&v.label);
            Owner {
                dir: version.dir(),
                trees: vec![version.orig(), version.run()],
            }
        })
        .collect();
    let unshared = unshared::unshared_bytes(top, &owners)
        .map_err(|e| ImageError::tool("measuring the bytes each version holds alone", e))?;
    for (v, bytes) in versions.versions.iter_mut().zip(unshared) {
        v.unshared_bytes = Some(bytes);
        let orig = Version::found(&v.label).orig();
        match btrfs::subvolume_show(&top.join(&orig)) {
            Ok(shown) => v.deployed_at = shown.created,
            // A partial version may have no orig subvolume at all.
            Err(_) if v.status == Status::Partial => {}
            Err(e) => return Err(ImageError::tool(format!("reading {orig}"), e)),
        }
    }
    Ok(())
}

/// The kernel version: the `boot/vmlinuz-<version>` in `orig` whose bytes
/// are the installed kernel's, else the name the manifest recorded.
fn kernel_version(
    top: &Path,
    version: &Version,
    size: Option<u64>,
    record: Option<&VersionRecord>,
) -> Option<String> {
    let from_record = || {
        record
            .map(|r| r.kernel_source.as_str())
            .and_then(|s| s.rsplit('/').next())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let size = size?;
    // orig is the deployed rootfs: its links resolve inside it, never on
    // the host.
    let Ok(orig) = RootDir::open(&top.join(version.orig())) else {
        return from_record();
    };
    let names = orig.list_dir("boot").unwrap_or_default();
    let mut candidates: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .collect();
    candidates.sort_by(|a, b| crate::kernel::version_cmp(b, a));
    for v in candidates {
        let Ok(Some(file)) = orig.open_file(&format!("boot/vmlinuz-{v}")) else {
            continue;
        };
        if file
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() == size)
            && same_bytes(file, &top.join(version.kernel()))
        {
            return Some(v.to_owned());
        }
    }
    from_record()
}

fn same_bytes(mut a: std::fs::File, b: &Path) -> bool {
    let Ok(mut b) = std::fs::File::open(b) else {
        return false;
    };
    let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match a.read(&mut x) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return false;
        }
        if n == 0 {
            // Both at their end: b must have nothing more.
            return matches!(b.read(&mut y[..1]), Ok(0));
        }
    }
}

/// The version labelled `label`, or an input error naming the versions.
fn known<'a>(
    shown: &str,
    versions: &'a Versions,
    label: &str,
) -> Result<&'a VersionInfo, ImageError> {
    versions.get(label).ok_or_else(|| {
        ImageError::Input(format!(
            "{shown}: no version {label:?} (it has {})",
            labels_of(versions.versions.iter().map(|v| v.label.as_str()))
        ))
    })
}

fn labels_of<'a>(labels: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = labels.collect();
    if all.is_empty() {
        "none".to_owned()
    } else {
        all.join(", ")
    }
}

/// The entries of a new menu: every whole version but `without`
/// (`bootloader::menu_entries`). A whole version no menu entry or record
/// describes (an upgrade cut between its rename and its menu entry) gets
/// the image's root device, as `upgrade` gives it: a version `versions`
/// calls whole can be made the default, and the upgrade so cut can be
/// completed with `set-default` (the power-cut matrix's
/// `power-cut/commit-version` found it refused here).
fn menu_entries(
    img: &OpenImage,
    layout: &ImageLayout,
    manifest: Option<&Manifest>,
    without: Option<&str>,
) -> Result<Vec<BootEntry>, ImageError> {
    let root = bootloader::image_root_device(layout, manifest);
    bootloader::menu_entries(img.top(), layout, manifest, without, Some(&root))
        .map_err(ImageError::Input)
}

/// Deletes `systems/<label>/`: the subvolumes in it, deepest first, then
/// the directory with what is left (kernel, initramfs).
fn delete_version(img: &OpenImage, version: &Version) -> Result<(), ImageError> {
    let prefix = format!("{}/", version.dir());
    let mut nested: Vec<&str> = img
        .subvolumes
        .iter()
        .map(|s| s.path.as_str())
        .filter(|p| p.starts_with(&prefix))
        .collect();
    let depth = |p: &str| p.matches('/').count();
    nested.sort_by(|a, b| depth(b).cmp(&depth(a)).then(b.cmp(a)));
    let paths: Vec<PathBuf> = nested.iter().map(|p| img.top().join(p)).collect();
    if !paths.is_empty() {
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        btrfs::subvolume_delete(&refs).map_err(|e| {
            ImageError::tool(format!("deleting the subvolumes of {}", version.dir()), e)
        })?;
    }
    let dir = img.top().join(version.dir());
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ImageError::tool(format!("removing {}", version.dir()), e))
        }
        _ => {}
    }
    // btrfs frees a deleted subvolume's extents in the background: wait
    // for it, so that what `remove` gives back is there for the next
    // command (an upgrade's space check) and not still being cleaned.
    if !paths.is_empty() {
        btrfs::subvolume_sync(img.top()).map_err(|e| {
            ImageError::tool(
                format!("waiting for the space of {} to be freed", version.dir()),
                e,
            )
        })?;
    }
    Ok(())
}

/// The manifest to keep up to date: `given` (must exist), else
/// `IMG.manifest.json` when there is one. Refused when it is another
/// image's.
fn load_manifest(
    image: &Path,
    given: Option<&Path>,
    fs_uuid: &str,
) -> Result<Option<(PathBuf, Manifest)>, ImageError> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => {
            let p = Manifest::default_path(image);
            if p.symlink_metadata().is_err() {
                return Ok(None);
            }
            p
        }
    };
    let m = Manifest::load(&path).map_err(|e| ImageError::Input(e.to_string()))?;
    if m.fs_uuid != fs_uuid {
        return Err(ImageError::Input(format!(
            "manifest {} describes filesystem {}, not this image's ({fs_uuid}): give the right --manifest",
            path.display(),
            m.fs_uuid
        )));
    }
    Ok(Some((path, m)))
}

fn save(m: &Manifest, path: &Path) -> Result<(), ImageError> {
    m.save(path).map_err(|e| {
        ImageError::tool(
            format!(
                "writing manifest {} (the image is changed; the manifest is not)",
                path.display()
            ),
            e,
        )
    })
}

fn step(e: StepError) -> ImageError {
    match e {
        StepError::Input(m) => ImageError::Input(m),
        StepError::Failed { what, cause } => ImageError::Tool {
            context: what,
            error: cause,
        },
        StepError::Interrupted => ImageError::tool("changing the boot files", "interrupted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootloader::extlinux;
    use crate::layout::Tree;
    use crate::manifest::{Deployment, StateDirs};
    use crate::model::{Filesystem, Subvolume};

    /// `remove --running` of the booted version: refused as input (exit
    /// 2), naming it and where `/` comes from; another version passes.
    #[test]
    fn the_booted_version_is_never_removed() {
        let running = crate::running::parse(
            "28 1 0:26 /systems/v2/run / rw,noatime shared:1 - btrfs /dev/vda rw,subvolid=262,subvol=/systems/v2/run\n",
        )
        .unwrap();
        let e = refuse_booted(&running, "v2").unwrap_err();
        assert!(e.is_input(), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("v2 is the booted version (/ is /systems/v2/run of /dev/vda)"),
            "{msg}"
        );
        // Refused before the device is even looked at (a path that is no
        // device would fail otherwise).
        let e = remove_running(&running, "v2", None).unwrap_err();
        assert!(e.to_string().contains("booted version"), "{e}");
        assert!(refuse_booted(&running, "factory").is_ok());
    }

    /// A plain directory shaped like a top level, and the subvolumes a
    /// real one would list.
    struct Top {
        dir: tempfile::TempDir,
        subvols: Vec<Subvolume>,
    }

    impl Top {
        fn new() -> Top {
            Top {
                dir: tempfile::tempdir().unwrap(),
                subvols: Vec::new(),
            }
        }
        fn path(&self) -> &Path {
            self.dir.path()
        }
        fn write(&self, rel: &str, bytes: &[u8]) {
            let p = self.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        /// `systems/<label>/` with the trees named and a kernel when given.
        fn version(&mut self, label: &str, trees: &[Tree], kernel: Option<&[u8]>) {
            let v = Version::new(label).unwrap();
            std::fs::create_dir_all(self.path().join(v.dir())).unwrap();
            for t in trees {
                std::fs::create_dir_all(self.path().join(v.tree(*t))).unwrap();
                self.subvols.push(Subvolume {
                    id: 256 + self.subvols.len() as u64,
                    generation: 1,
                    parent_id: 5,
                    top_level: 5,
                    path: v.tree(*t),
                    uuid: format!("{label}-{}", t.name()),
                    parent_uuid: (*t == Tree::Run).then(|| format!("{label}-orig")),
                    readonly: false,
                });
            }
            if let Some(k) = kernel {
                self.write(&v.kernel(), k);
            }
        }
        fn link(&self, label: &str) {
            std::os::unix::fs::symlink(label, self.path().join(layout::DEFAULT_LINK)).unwrap();
        }
        fn layout(&self) -> ImageLayout {
            let fs = Filesystem {
                uuid: "abcd".into(),
                label: None,
            };
            image::read_dir_layout(self.path(), "img", fs, self.subvols.clone())
        }
    }

    fn record(label: &str, root: &str, kernel_args: &str, source: &str) -> VersionRecord {
        VersionRecord {
            label: label.into(),
            deployed_by: Deployment::Upgrade,
            based_on: None,
            deployed_at: 0,
            root_device: root.into(),
            state_dirs: StateDirs {
                created: vec![],
                skipped: vec![],
            },
            fstab_lines_added: vec![],
            state_migration: "move".into(),
            state_data: None,
            moved_files: vec![],
            kernel: format!("systems/{label}/kernel"),
            initramfs: None,
            kernel_source: source.into(),
            initramfs_source: None,
            kernel_args: kernel_args.into(),
            timings: vec![],
            backend: None,
        }
    }

    fn manifest(default: &str, records: Vec<VersionRecord>) -> Manifest {
        Manifest {
            manifest_version: crate::manifest::MANIFEST_VERSION,
            fs_uuid: "abcd".into(),
            image_size: 1 << 30,
            default: default.into(),
            versions: records,
        }
    }

    #[test]
    fn whole_partial_and_debris() {
        let mut t = Top::new();
        t.version("factory", &Tree::BOTH, Some(b"kernel 1"));
        t.version("v2", &[Tree::Orig], None);
        t.version("v3", &Tree::BOTH, Some(b"kernel 3"));
        t.link("factory");
        std::fs::create_dir_all(t.path().join("systems/.strata-partial-v4/orig")).unwrap();
        std::os::unix::fs::symlink("v3", t.path().join("systems/.strata-tmp-x")).unwrap();
        // v3's entry names an initramfs it does not have.
        let menu = extlinux::render(
            &Version::new("factory").unwrap(),
            &[
                BootEntry::for_test("factory", "UUID=u", false, ""),
                BootEntry::for_test("v3", "UUID=u", true, ""),
            ],
        );
        t.write(layout::BOOT_MENU, menu.as_bytes());

        let v = examine(t.path(), &t.layout(), None);
        assert_eq!(v.default.as_deref(), Some("factory"));
        assert_eq!(
            v.debris,
            ["systems/.strata-partial-v4", "systems/.strata-tmp-x"]
        );
        let labels: Vec<(&str, Status, bool)> = v
            .versions
            .iter()
            .map(|i| (i.label.as_str(), i.status, i.default))
            .collect();
        assert_eq!(
            labels,
            [
                ("factory", Status::Whole, true),
                ("v2", Status::Partial, false),
                ("v3", Status::Partial, false),
            ]
        );
        assert_eq!(
            v.get("v2").unwrap().problems,
            ["systems/v2/run is missing", "systems/v2/kernel is missing"]
        );
        assert_eq!(
            v.get("v3").unwrap().problems,
            ["systems/v3/initramfs is missing (its boot entry names one)"]
        );
        assert_eq!(v.get("factory").unwrap().kernel.bytes, Some(8));
    }

    #[test]
    fn the_kernel_version_is_the_rootfs_kernel_with_the_same_bytes() {
        let mut t = Top::new();
        t.version("factory", &Tree::BOTH, Some(b"the old kernel"));
        t.write(
            "systems/factory/orig/boot/vmlinuz-6.1.0-9-amd64",
            b"the old kernel",
        );
        t.write(
            "systems/factory/orig/boot/vmlinuz-6.1.0-10-amd64",
            b"the new kernel",
        );
        // A link in the rootfs must not reach the host.
        std::os::unix::fs::symlink(
            "/etc/hostname",
            t.path().join("systems/factory/orig/boot/vmlinuz-9.9"),
        )
        .unwrap();
        t.version("v2", &Tree::BOTH, Some(b"from the host"));
        t.link("factory");
        let m = manifest(
            "factory",
            vec![
                record("factory", "UUID=u", "", "/boot/vmlinuz-6.1.0-9-amd64"),
                record("v2", "UUID=u", "", "/srv/kernels/vmlinuz-6.2.0-1-amd64"),
            ],
        );
        let v = examine(t.path(), &t.layout(), Some(&m));
        assert_eq!(
            v.get("factory").unwrap().kernel.version.as_deref(),
            Some("6.1.0-9-amd64")
        );
        // Not in its rootfs: the name the manifest recorded.
        assert_eq!(
            v.get("v2").unwrap().kernel.version.as_deref(),
            Some("6.2.0-1-amd64")
        );
        let v = examine(t.path(), &t.layout(), None);
        assert_eq!(v.get("v2").unwrap().kernel.version, None);
    }

    #[test]
    fn menu_entries_come_from_the_menu_then_the_manifest() {
        let mut t = Top::new();
        for l in ["factory", "v2", "v3"] {
            t.version(l, &Tree::BOTH, Some(b"k"));
        }
        t.write("systems/v2/initramfs", b"i");
        t.version("half", &[Tree::Orig], None);
        t.link("v2");
        let (factory, v2) = (
            BootEntry::for_test("factory", "UUID=u", false, "quiet"),
            BootEntry::for_test("v2", "/dev/vda", true, "loglevel=3"),
        );
        // As an upgrade that was killed before its menu: v3 is on disk, not
        // in the menu.
        let menu = extlinux::render(&v2.version, &[factory.clone(), v2.clone()]);
        t.write(layout::BOOT_MENU, menu.as_bytes());
        let l = t.layout();
        let e = bootloader::menu_entries(t.path(), &l, None, None, None).unwrap_err();
        assert!(
            e.to_string().contains("version v3 has no boot entry"),
            "{e}"
        );
        // What versions (set-default, remove) and upgrade give it: the
        // image's root device, the default's (v2's entry's), no extras.
        let root = bootloader::image_root_device(&l, None);
        assert_eq!(root, "/dev/vda");
        let got = bootloader::menu_entries(t.path(), &l, None, None, Some(&root)).unwrap();
        assert_eq!(got[2], BootEntry::for_test("v3", "/dev/vda", false, ""));
        // Its record says how it boots (the manifest keeps the whole line).
        let v3 = BootEntry::for_test("v3", "UUID=w", false, "debug");
        let m = manifest(
            "v2",
            vec![
                record("v3", "UUID=w", &v3.append(), ""),
                record("factory", "x", "x", ""),
            ],
        );
        let got = bootloader::menu_entries(t.path(), &l, Some(&m), None, None).unwrap();
        assert_eq!(got, [factory.clone(), v2.clone(), v3.clone()]);
        // Without one of them.
        let got = bootloader::menu_entries(t.path(), &l, Some(&m), Some("factory"), None).unwrap();
        assert_eq!(got, [v2.clone(), v3]);
    }

    #[test]
    fn the_default_entry_alone_says_how_the_default_boots() {
        let mut t = Top::new();
        t.version("old", &Tree::BOTH, Some(b"k"));
        t.link("old");
        t.write(
            layout::BOOT_MENU,
            b"default default\nlabel default\n  kernel /systems/default/kernel\n  \
              append root=/dev/sda rootfstype=btrfs rootflags=subvol=systems/default/run init=/sbin/init rw console=tty0 console=ttyS0,115200 quiet\n",
        );
        let l = t.layout();
        let got = bootloader::menu_entries(t.path(), &l, None, None, None).unwrap();
        assert_eq!(
            got,
            [BootEntry::for_test("old", "/dev/sda", false, "quiet")]
        );
    }

    #[test]
    fn a_menu_elsewhere_is_not_rewritten() {
        let mut t = Top::new();
        t.version("old", &Tree::BOTH, Some(b"k"));
        t.link("old");
        t.write(
            layout::BOOT_MENU_LINK,
            b"default old\nlabel old\n  kernel /systems/old/kernel\n",
        );
        let l = t.layout();
        let e = bootloader::menu_entries(t.path(), &l, None, None, None).unwrap_err();
        assert!(
            e.to_string().contains("its boot menu is extlinux.conf"),
            "{e}"
        );
    }

    #[test]
    fn same_bytes_compares_whole_files() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p("a"), vec![7u8; 200_000]).unwrap();
        std::fs::write(p("b"), vec![7u8; 200_000]).unwrap();
        let mut c = vec![7u8; 200_000];
        c[150_000] = 8;
        std::fs::write(p("c"), c).unwrap();
        std::fs::write(p("d"), vec![7u8; 200_001]).unwrap();
        let open = |n: &str| std::fs::File::open(p(n)).unwrap();
        assert!(same_bytes(open("a"), &p("b")));
        assert!(!same_bytes(open("a"), &p("c")));
        assert!(!same_bytes(open("a"), &p("d")));
        assert!(!same_bytes(open("d"), &p("a")));
        assert!(!same_bytes(open("a"), &p("missing")));
    }
}
