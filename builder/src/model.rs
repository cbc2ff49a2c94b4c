//! What `strata inspect` reports: plain data, serialised as the `--json`
//! output and rendered by `render` (pure functions, snapshot-tested).

use serde::Serialize;

/// The layout of one image, read from its top-level subvolume.
#[derive(Debug, Clone, Serialize)]
pub struct ImageLayout {
    pub image: String,
    pub filesystem: Filesystem,
    /// `systems/default`: its raw link target and the version it names.
    pub default: DefaultLink,
    pub versions: Vec<Version>,
    pub state_dirs: Vec<StateDir>,
    pub subvolumes: Vec<Subvolume>,
    pub boot: Option<Boot>,
    /// Departures from the contract (docs/layout.md), in plain words.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Filesystem {
    pub uuid: String,
    pub label: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DefaultLink {
    /// The symlink's target as stored (`factory`), None when absent.
    pub link: Option<String>,
    /// The version label it resolves to, when that version exists.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub label: String,
    pub default: bool,
    /// Subvolume IDs of `systems/<label>/orig` and `run` (None: missing or
    /// not a subvolume).
    pub orig: Option<u64>,
    pub run: Option<u64>,
    /// `run`'s parent UUID is `orig`'s UUID.
    pub run_is_snapshot_of_orig: bool,
    /// Sizes of `systems/<label>/kernel` and `initramfs`.
    pub kernel_size: Option<u64>,
    pub initramfs_size: Option<u64>,
    /// `orig/etc/fstab`.
    pub fstab: Option<Fstab>,
    /// `run/etc/fstab` when it differs from orig's.
    pub run_fstab: Option<Fstab>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fstab {
    /// Path in the image (`systems/factory/orig/etc/fstab`).
    pub path: String,
    /// Line number of the "# Added by strata" comment.
    pub marker_line: Option<usize>,
    pub lines: Vec<FstabLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FstabLine {
    /// 1-based.
    pub number: usize,
    pub text: String,
    /// After the "# Added by strata" line: strata wrote it.
    pub added: bool,
    /// Parsed as libmount does; None for comments, blanks and short lines.
    pub mount: Option<FstabMount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FstabMount {
    pub source: String,
    pub target: String,
    pub fstype: String,
    pub options: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subvolume {
    pub id: u64,
    pub generation: u64,
    /// ID of the subvolume it lives in (`parent` in `btrfs subvolume list -p`).
    pub parent_id: u64,
    pub top_level: u64,
    /// Path from the top-level subvolume.
    pub path: String,
    pub uuid: String,
    /// UUID of the subvolume it is a snapshot of.
    pub parent_uuid: Option<String>,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StateDir {
    pub name: String,
    /// Subvolume ID of `state/<name>` (None: a plain directory).
    pub subvolume: Option<u64>,
    /// Where versions mount it: `factory/run: /home`.
    pub mounted_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    /// `extlinux/extlinux.conf` (or the path the config was found at).
    pub path: String,
    pub default: Option<String>,
    pub timeout: Option<String>,
    pub entries: Vec<BootEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootEntry {
    pub label: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub kernel_present: bool,
    pub initrd_present: Option<bool>,
}

/// `strata inspect --lint`: every mountpoint checked, hidden files listed.
#[derive(Debug, Clone, Serialize)]
pub struct Lint {
    pub image: String,
    /// No mountpoint hides anything.
    pub clean: bool,
    pub hidden_files: u64,
    pub hidden_bytes: u64,
    pub mountpoints: Vec<MountpointCheck>,
    /// Versions whose trees were checked (`factory/orig`, `factory/run`).
    pub trees: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MountpointCheck {
    pub version: String,
    /// `orig` or `run`.
    pub tree: String,
    /// As seen in the booted system: `/srv`.
    pub mountpoint: String,
    /// The directory in the image under the mount: `systems/factory/run/srv`.
    pub dir: Option<String>,
    /// What gets mounted over it: `state/srv`, or a foreign source.
    pub mounted: String,
    /// Why it was checked: `fstab line 7`, or `state dir (no fstab entry)`.
    pub basis: String,
    pub status: MountpointStatus,
    pub file_count: u64,
    pub total_bytes: u64,
    pub files: Vec<HiddenFile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountpointStatus {
    /// An empty directory: fine.
    Empty,
    /// Files are hidden under the mount.
    NotEmpty,
    /// No such directory (systemd creates it at boot): fine.
    Missing,
    /// A file or symlink where the mountpoint should be, or a symlink on
    /// the way to it (never followed: it could lead out of the image).
    NotADirectory,
    /// Under a mount of another device: not on this image.
    NotOnImage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HiddenFile {
    /// As seen in the booted system with the mount removed: `/srv/stale.html`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: FileKind,
    /// Bytes (apparent size; symlinks: target length; directories: 0).
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    /// A nested subvolume (shown as a directory by readdir).
    Subvolume,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "char-device",
            FileKind::BlockDevice => "block-device",
            FileKind::Subvolume => "subvolume",
        }
    }
}
