//! The on-disk layout of a strata image (`docs/layout.md` §1, §4, §6): every
//! path and name, defined once. Everything else — the builder, the image
//! reader, the VM checks — asks this module instead of spelling a path.
//!
//! Paths are relative to the top-level subvolume (id 5) and have no leading
//! slash (`systems/factory/run`); `fsroot()` gives the form the kernel and
//! `findmnt` show for a mounted subvolume (`/systems/factory/run`).

/// The directory that holds one directory per version, and the default link.
pub const SYSTEMS_DIR: &str = "systems";
/// The directory that holds the shared state subvolumes.
pub const STATE_DIR: &str = "state";
/// `systems/default`: a relative symlink naming the default version's label.
pub const DEFAULT_LINK: &str = "systems/default";
/// The label a build uses when none is given.
pub const DEFAULT_LABEL: &str = "factory";
/// The state directories a build creates when none are given, in order.
pub const DEFAULT_STATE_DIRS: [&str; 5] = ["home", "root", "opt", "srv", "var"];
/// The filesystem label of every image strata makes.
pub const FS_LABEL: &str = "strata";

/// The boot menu strata writes.
pub const BOOT_MENU: &str = "extlinux/extlinux.conf";
/// The top-level name syslinux 6.04 looks for (measured: it does not search
/// `extlinux/` on its own). strata makes it a relative symlink to
/// `BOOT_MENU`; the 2014 layout kept the menu itself there.
pub const BOOT_MENU_LINK: &str = "extlinux.conf";
/// What the top-level link points at (relative to the top level).
pub const BOOT_MENU_LINK_TARGET: &str = BOOT_MENU;
/// Every place a boot menu of this layout may live, in the order readers
/// look: strata's own, the 2014 top-level file, and the two locations other
/// syslinux installers use.
pub const BOOT_CONFIGS: [&str; 4] = [
    BOOT_MENU,
    BOOT_MENU_LINK,
    "boot/extlinux/extlinux.conf",
    "syslinux/syslinux.cfg",
];

/// The prefix of the temporary name strata gives a file it is about to
/// rename into place (the boot menu, in `extlinux/`; the default link, in
/// `systems/`). A crash can leave one behind: it is strata's own debris,
/// never a version or a menu, and the next writer of that directory may
/// remove it.
pub const TEMP_PREFIX: &str = ".strata-tmp-";

/// Whether a name in `systems/` or `extlinux/` is strata's temporary debris.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// What every name strata gives its own work in progress starts with: the
/// temp names above, and whatever an interrupted run leaves in `systems/`
/// (a version deployed under a partial name). Such an entry is strata's
/// debris, never a version; labels may not start with it.
pub const RESERVED_PREFIX: &str = ".strata-";

/// Whether a name in `systems/` is strata's debris rather than a version.
pub fn is_debris_name(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// The prefix (under `RESERVED_PREFIX`) of the directory in `systems/` where an upgrade assembles a
/// version (`systems/.strata-partial-<label>/{orig,run,kernel,initramfs}`)
/// before one rename(2) makes it `systems/<label>`. A dot-name no label can
/// collide with in a listing: readers never list it as a version, and one
/// left by a killed upgrade is debris the next upgrade removes.
pub const PARTIAL_PREFIX: &str = ".strata-partial-";

/// Whether a name in `systems/` is an upgrade's partial version directory.
pub fn is_partial_name(name: &str) -> bool {
    name.starts_with(PARTIAL_PREFIX)
}

/// The comment line that precedes every line strata adds to an fstab.
pub const FSTAB_MARKER: &str = "# Added by strata build: system layout state subvolumes";
/// What readers match: any comment starting like this marks strata's lines
/// (older builds wrote shorter markers).
pub const FSTAB_MARKER_PREFIX: &str = "# Added by strata";

/// A version's two subvolumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tree {
    /// The deployed rootfs, pristine.
    Orig,
    /// The writable snapshot of `orig` that boots as `/`.
    Run,
}

impl Tree {
    pub const BOTH: [Tree; 2] = [Tree::Orig, Tree::Run];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Orig => "orig",
            Tree::Run => "run",
        }
    }
}

/// A name the layout accepts is unsafe nowhere it ends up: one path
/// component, a boot menu label, an fstab field, a guest shell word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid version label {0:?}: use letters, digits, '.', '_' or '-' (it becomes a directory name and a boot menu label; \"default\" and names starting with \".strata-\" are reserved)")]
    Label(String),
    #[error("invalid state directory {0:?}: expected a single directory name such as \"var\"")]
    StateDir(String),
}

/// Letters, digits, '.', '_' or '-', at most 64 bytes, and not "." or "..".
fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s != "default"
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The rule for version labels. `default` is refused: `systems/default` is
/// the link; so is `RESERVED_PREFIX…`: strata's debris.
pub fn validate_label(label: &str) -> Result<(), NameError> {
    (is_simple_name(label) && !is_debris_name(label))
        .then_some(())
        .ok_or_else(|| NameError::Label(label.to_owned()))
}

/// The rule for state directory names: `state/<name>` is a subvolume directly
/// under `state/` and `/<name>` a mount point directly under `/`.
pub fn validate_state_dir(name: &str) -> Result<(), NameError> {
    // "default" is a fine state dir name; only labels collide with the link.
    let ok = name == "default" || is_simple_name(name);
    ok.then_some(())
        .ok_or_else(|| NameError::StateDir(name.to_owned()))
}

/// One deployed version: `systems/<label>/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    label: String,
}

impl Version {
    /// A version with a checked label.
    pub fn new(label: &str) -> Result<Version, NameError> {
        validate_label(label)?;
        Ok(Version {
            label: label.to_owned(),
        })
    }

    /// A version found on an image, its label taken as it is: an image built
    /// by someone else may use names `new` refuses. For building the paths
    /// a reader looks at only; a label that reaches a guest command or a
    /// new image must come through `new`.
    pub fn found(label: &str) -> Version {
        Version {
            label: label.to_owned(),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// `systems/<label>`
    pub fn dir(&self) -> String {
        format!("{SYSTEMS_DIR}/{}", self.label)
    }

    /// `systems/<label>/orig` or `…/run`
    pub fn tree(&self, tree: Tree) -> String {
        format!("{}/{}", self.dir(), tree.name())
    }

    pub fn orig(&self) -> String {
        self.tree(Tree::Orig)
    }

    pub fn run(&self) -> String {
        self.tree(Tree::Run)
    }

    /// `systems/<label>/kernel`: outside orig/run, because syslinux cannot
    /// enter subvolumes.
    pub fn kernel(&self) -> String {
        format!("{}/kernel", self.dir())
    }

    pub fn initramfs(&self) -> String {
        format!("{}/initramfs", self.dir())
    }

    /// `systems/<label>/<tree>/etc/fstab`
    pub fn fstab(&self, tree: Tree) -> String {
        format!("{}/etc/fstab", self.tree(tree))
    }

    /// Where an upgrade assembles this version: `systems/.strata-partial-<label>`,
    /// as a version for its paths (`orig()`, `run()`, `kernel()`…). Never a
    /// label: it is not listed, booted or linked.
    pub fn partial(&self) -> Version {
        Version {
            label: format!("{PARTIAL_PREFIX}{}", self.label),
        }
    }

    /// What `systems/default` stores to name this version: the bare label,
    /// relative, so it resolves the same inside and outside the image.
    pub fn default_link_target(&self) -> &str {
        &self.label
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// `state/<dir>`
pub fn state(dir: &str) -> String {
    format!("{STATE_DIR}/{dir}")
}

/// `/<dir>`: where a state subvolume is mounted in the booted system.
pub fn state_mountpoint(dir: &str) -> String {
    format!("/{dir}")
}

/// The state dir a subvolume path names (`state/var` → `var`), if it is one.
pub fn state_dir_of(subvolume: &str) -> Option<&str> {
    subvolume
        .strip_prefix(STATE_DIR)?
        .strip_prefix('/')
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

/// The form a mounted subvolume's path takes in `findmnt`'s FSROOT and in
/// `subvol=` options: `/` + the image-relative path.
pub fn fsroot(path: &str) -> String {
    format!("/{path}")
}

/// The label `systems/default` names, from its stored target. Accepts the
/// forms people write (`factory`, `./factory`, `systems/factory`,
/// `../systems/factory`); absolute targets name nothing (they resolve
/// differently inside the booted system).
pub fn label_of_default_target(target: &std::path::Path) -> Option<String> {
    if target.is_absolute() {
        return None;
    }
    let parts: Vec<String> = target
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    match parts.as_slice() {
        [one] => Some(one.clone()),
        [sys, one] if sys == SYSTEMS_DIR => Some(one.clone()),
        _ => None,
    }
}

/// `path` with a leading `systems/default` resolved to the directory of the
/// version the link names (`systems/default/kernel` → `systems/v2/kernel`):
/// boot entries may go through the link (§6). None when the path goes
/// through the link and it names no version; other paths come back as they
/// are.
pub fn resolve_default_link(path: &str, default_label: Option<&str>) -> Option<String> {
    match path.strip_prefix(DEFAULT_LINK) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            default_label.map(|l| format!("{}{rest}", Version::found(l).dir()))
        }
        _ => Some(path.to_owned()),
    }
}

/// The version a path lies in and the path below its directory
/// (`systems/v2/run` → `("v2", "run")`, `systems/v2` → `("v2", "")`); None
/// for paths outside `systems/<label>`. `systems/default` is not resolved.
pub fn split_version_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(SYSTEMS_DIR)?.strip_prefix('/')?;
    let (label, below) = rest.split_once('/').unwrap_or((rest, ""));
    (!label.is_empty()).then_some((label, below))
}

/// The boot menu label of the entry that boots whatever `systems/default`
/// names, through the link. Never a version label (`validate_label` refuses
/// it: `systems/default` is the link).
pub const DEFAULT_ENTRY_LABEL: &str = "default";

/// The version `systems/default` names, its paths spelled through the link
/// (`systems/default/kernel`, `systems/default/run`): what the menu's
/// `default` entry boots (§6), so that flipping the link alone changes what
/// boots. For writing boot entries; a reader resolves such paths with
/// `resolve_default_link`.
pub fn via_default_link() -> Version {
    Version {
        label: DEFAULT_ENTRY_LABEL.to_owned(),
    }
}

/// The stanza paths of a boot entry for `version`, as the menu spells them
/// (absolute from the top level, which is the root syslinux sees).
pub fn boot_kernel_path(version: &Version) -> String {
    fsroot(&version.kernel())
}

pub fn boot_initramfs_path(version: &Version) -> String {
    fsroot(&version.initramfs())
}

/// `rootflags=subvol=…` value for a version: its `run`, without a leading
/// slash (as the 2014 layout wrote it; the kernel accepts both).
pub fn rootflags_subvol(version: &Version) -> String {
    version.run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn version_paths() {
        let v = Version::new("factory").unwrap();
        assert_eq!(v.dir(), "systems/factory");
        assert_eq!(v.orig(), "systems/factory/orig");
        assert_eq!(v.run(), "systems/factory/run");
        assert_eq!(v.kernel(), "systems/factory/kernel");
        assert_eq!(v.initramfs(), "systems/factory/initramfs");
        assert_eq!(v.fstab(Tree::Run), "systems/factory/run/etc/fstab");
        assert_eq!(fsroot(&v.run()), "/systems/factory/run");
        assert_eq!(boot_kernel_path(&v), "/systems/factory/kernel");
        assert_eq!(state("var"), "state/var");
        assert_eq!(state_mountpoint("var"), "/var");
    }

    #[test]
    fn paths_through_the_link() {
        let d = via_default_link();
        assert_eq!(d.dir(), DEFAULT_LINK);
        assert_eq!(boot_kernel_path(&d), "/systems/default/kernel");
        assert_eq!(boot_initramfs_path(&d), "/systems/default/initramfs");
        assert_eq!(rootflags_subvol(&d), "systems/default/run");
        assert!(validate_label(DEFAULT_ENTRY_LABEL).is_err());
    }

    #[test]
    fn partial_version_paths() {
        let p = Version::new("v2").unwrap().partial();
        assert_eq!(p.dir(), "systems/.strata-partial-v2");
        assert_eq!(p.orig(), "systems/.strata-partial-v2/orig");
        assert_eq!(p.kernel(), "systems/.strata-partial-v2/kernel");
        assert!(is_partial_name(".strata-partial-v2"));
        assert!(!is_partial_name("v2"));
        // No label is a partial name, so no version can hide as one.
        assert!(validate_label(&p.label).is_err());
        assert!(validate_label(".v2").is_ok());
    }

    #[test]
    fn name_rules() {
        for ok in ["factory", "v2", "2026.11-1_a"] {
            assert!(validate_label(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "v1;reboot",
            "default",
            ".strata-partial-v2",
            &"x".repeat(65),
        ] {
            assert!(validate_label(bad).is_err(), "{bad:?}");
        }
        assert!(validate_state_dir("var").is_ok());
        assert!(validate_state_dir("default").is_ok());
        assert!(validate_state_dir("var/lib").is_err());
        assert!(validate_state_dir("").is_err());
    }

    #[test]
    fn state_dirs_of_subvolumes() {
        assert_eq!(state_dir_of("state/var"), Some("var"));
        assert_eq!(state_dir_of("state/var/lib"), None);
        assert_eq!(state_dir_of("state/"), None);
        assert_eq!(state_dir_of("statex/var"), None);
        assert_eq!(state_dir_of("systems/v1/run"), None);
    }

    #[test]
    fn paths_through_the_default_link() {
        assert_eq!(
            resolve_default_link("systems/default/kernel", Some("v2")).as_deref(),
            Some("systems/v2/kernel")
        );
        assert_eq!(
            resolve_default_link("systems/default", Some("v2")).as_deref(),
            Some("systems/v2")
        );
        assert_eq!(resolve_default_link("systems/default/run", None), None);
        for unchanged in ["systems/defaultx/kernel", "systems/v1/kernel", "vmlinuz"] {
            assert_eq!(
                resolve_default_link(unchanged, None).as_deref(),
                Some(unchanged)
            );
        }
        assert_eq!(split_version_path("systems/v2/run"), Some(("v2", "run")));
        assert_eq!(
            split_version_path("systems/v2/run/etc/fstab"),
            Some(("v2", "run/etc/fstab"))
        );
        assert_eq!(split_version_path("systems/v2"), Some(("v2", "")));
        assert_eq!(split_version_path("systems/"), None);
        assert_eq!(split_version_path("systemsx/v2/run"), None);
        assert_eq!(split_version_path("state/var"), None);
    }

    #[test]
    fn default_link_targets() {
        for (t, want) in [
            ("factory", Some("factory")),
            ("./factory", Some("factory")),
            ("systems/factory", Some("factory")),
            ("../systems/factory", Some("factory")),
            ("/systems/factory", None),
            ("a/b/c", None),
        ] {
            assert_eq!(
                label_of_default_target(Path::new(t)).as_deref(),
                want,
                "{t}"
            );
        }
    }
}
