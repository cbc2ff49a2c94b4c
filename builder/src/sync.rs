//! Synchronising a version's tree with a new rootfs, and what happens to the
//! data a new rootfs has under a state directory (layout.md §6). Both go
//! through rsync.
//!
//! An upgrade's `orig` starts as a snapshot of the current default's `orig`;
//! [`sync_tree`] then makes it identical to the new rootfs. rsync is the
//! tool morph used for the same step ("snapshot, then rsync") and it keeps
//! every attribute layout.md §2 lists. Two of its properties carry the
//! design:
//! - `--checksum`: "unchanged" is decided by comparing contents, not size
//!   and mtime (reproducible rootfs builds clamp mtimes, so a changed file
//!   of the same size can keep its mtime).
//! - no `--inplace`: a changed file is written to a temporary file and
//!   renamed over the old one, so it gets new extents and the snapshot's
//!   copy is untouched, while an unchanged file is not written at all and
//!   keeps sharing its extents with the snapshot. The image grows with the
//!   change, not with the rootfs.
//!
//! The new rootfs is untrusted: archive mode copies symlinks as symlinks and
//! recreates device nodes and fifos (`-D`) without opening them, and none of
//! the options that make rsync follow links (`-L`, `--copy-links`,
//! `--copy-unsafe-links`, `--keep-dirlinks`) is ever used.
//!
//! Paths are bytes. rsync prints a name's odd bytes as `\#ooo` (octal);
//! [`unescape`] turns them back into the exact bytes, and the lists handed
//! to people and manifests use the lossless [`encode_path`] form.

use crate::host::cmd::{self, CmdError};
use crate::host::interrupt::Interrupt;
use crate::layout::{self, NameError};
use crate::manifest::FileType;
use crate::octal;
pub use crate::pathenc::{decode_path, decode_to_path, encode_path};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What every rsync here keeps: archive mode (`-a`: recursion, symlinks as
/// symlinks, permissions, times, owner, group, device nodes and fifos
/// recreated), hardlinks (`-H`), POSIX ACLs (`-A`), xattrs (`-X`; as root
/// every namespace, security.capability included), holes (`-S`), ids as
/// numbers (the rootfs's users are not the host's), and no crossing into
/// another filesystem mounted inside the tree (`-x`, as `cp
/// --one-file-system` does for a build).
const ARCHIVE: [&str; 3] = ["-aHAXS", "--numeric-ids", "--one-file-system"];

/// Starts every itemized line (`--out-format`), so rsync's other messages
/// ("cannot delete non-empty directory: var") are told apart from changes.
const MARK: &[u8] = b"=strata= ";

/// `%i`: the 11-character change summary (`YXcstpoguax`, or `*deleting`);
/// `%l`: the length in bytes; `%n`: the name (escaped, last so it may hold
/// spaces; directories end with `/`).
fn out_format() -> String {
    format!("--out-format={}%i %l %n", String::from_utf8_lossy(MARK))
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("no space left on the image's filesystem")]
    NoSpace,
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Cmd(CmdError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("unexpected rsync output {line:?}: {reason}")]
    Parse { line: String, reason: &'static str },
}

impl From<CmdError> for SyncError {
    fn from(e: CmdError) -> SyncError {
        match e {
            CmdError::Interrupted { .. } => SyncError::Interrupted,
            // rsync: "write failed on …: No space left on device (28)".
            e if e.stderr().contains("No space left on device") => SyncError::NoSpace,
            e => SyncError::Cmd(e),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOptions {
    /// State dir names (`var`) whose contents are not transferred. The
    /// directory itself is synchronised like any other (it is the empty
    /// mountpoint, with the new rootfs's mode and owner); nothing under
    /// `dest/<name>` is written or deleted (rsync's excludes protect the
    /// receiver's side too unless `--delete-excluded`, which is not used).
    pub exclude_contents_of: Vec<String>,
}

/// What [`sync_tree`] changed, paths as the booted system sees them
/// (`/etc/hostname`, the root is `/`) in [`encode_path`] form, in rsync's
/// order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// Entries that did not exist (a hardlink to another new entry too).
    pub created: Vec<String>,
    /// Entries rewritten: files whose contents changed (written anew, so
    /// they no longer share extents with the snapshot), symlinks with a new
    /// target.
    pub updated: Vec<String>,
    /// Entries whose metadata only changed (mode, owner, times, ACLs,
    /// xattrs): their contents are still shared.
    pub attributes: Vec<String>,
    pub deleted: Vec<String>,
    /// Bytes of file contents written: the lengths of the files transferred
    /// (holes included, so an upper bound for sparse files).
    pub bytes_written: u64,
    /// What rsync said besides the changes, e.g. "cannot delete non-empty
    /// directory: var" when an excluded directory has to stay.
    pub messages: Vec<String>,
}

impl SyncReport {
    /// Nothing but metadata (or nothing at all) changed.
    pub fn contents_unchanged(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }

    fn add(&mut self, change: &Change) {
        let path = encode_path(&shown_as(b"", &change.path));
        if change.data_written {
            self.bytes_written += change.length;
        }
        match change.kind {
            ChangeKind::Created => self.created.push(path),
            ChangeKind::Updated => self.updated.push(path),
            ChangeKind::Attributes => self.attributes.push(path),
            ChangeKind::Deleted => self.deleted.push(path),
            ChangeKind::Unchanged => {}
        }
    }
}

/// Makes `dest` (an existing directory, e.g. a snapshot of the previous
/// version's `orig`) identical to `src`, except under the directories in
/// `opts.exclude_contents_of` (see [`SyncOptions`]).
///
/// Unchanged files are not touched (compared by contents), changed and new
/// ones are written, entries missing from `src` are deleted. When
/// `interrupt` is raised rsync is stopped (it removes its temporary file)
/// and `dest` is left part-way: the caller discards it.
pub fn sync_tree(
    src: &Path,
    dest: &Path,
    opts: &SyncOptions,
    interrupt: &Interrupt,
) -> Result<SyncReport, SyncError> {
    let mut c = sync_command(src, dest, &opts.exclude_contents_of, &[])?;
    let mut report = SyncReport::default();
    let mut bad = None;
    let ran = cmd::run_interruptible(&mut c, interrupt, &mut |line| match parse_line(line) {
        Ok(Line::Change(change)) => report.add(&change),
        Ok(Line::Message(m)) => report.messages.push(m),
        Err(e) => {
            bad.get_or_insert(e);
        }
    });
    if let Err(e) = ran {
        return Err(match SyncError::from(e) {
            // rsync's receiver can die of ENOSPC with its message lost: the
            // sender then says only "Broken pipe (32)" and "code 10". A
            // destination left with no room is the cause.
            SyncError::Cmd(_) if no_room(dest) => SyncError::NoSpace,
            e => e,
        });
    }
    match bad {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The filesystem of `path` has nothing left for ordinary writes
/// (statvfs's available blocks: 0 also when btrfs's metadata is full).
fn no_room(path: &Path) -> bool {
    rustix::fs::statvfs(path).is_ok_and(|st| st.f_bavail.saturating_mul(st.f_frsize) < 1 << 20)
}

/// The bytes [`sync_tree`] would write into `dest`: rsync's dry run with the
/// same options ("Total transferred file size"). On a snapshot only these
/// bytes need new space (deleting shared files frees nothing), so an
/// upgrade that needs more than the free space is refused up front. A dry
/// run writes nothing, so `dest` can be the tree the snapshot will be taken
/// of (the current default's `orig`). It reads both trees in full
/// (contents are compared), like the sync itself.
pub fn estimate_sync_bytes(
    src: &Path,
    dest: &Path,
    exclude_contents_of: &[String],
    interrupt: &Interrupt,
) -> Result<u64, SyncError> {
    let mut c = sync_command(
        src,
        dest,
        exclude_contents_of,
        &["--dry-run", "--stats", "--no-human-readable"],
    )?;
    let mut total = None;
    cmd::run_interruptible(&mut c, interrupt, &mut |line| {
        if let Some(n) = parse_transferred_size(&String::from_utf8_lossy(line)) {
            total = Some(n);
        }
    })?;
    total.ok_or(SyncError::Parse {
        line: String::new(),
        reason: "rsync --stats printed no \"Total transferred file size\"",
    })
}

/// The number in rsync's `--stats` line "Total transferred file size: N
/// bytes" (digit separators tolerated).
pub fn parse_transferred_size(line: &str) -> Option<u64> {
    let rest = line
        .trim()
        .strip_prefix("Total transferred file size:")?
        .trim()
        .strip_suffix("bytes")?
        .trim();
    let digits: String = rest.chars().filter(|c| !",._".contains(*c)).collect();
    digits.parse().ok()
}

fn sync_command(
    src: &Path,
    dest: &Path,
    exclude_contents_of: &[String],
    extra: &[&str],
) -> Result<Command, SyncError> {
    require_dir(src, true)?;
    require_dir(dest, false)?;
    let mut c = rsync();
    c.args(ARCHIVE)
        .args([
            // Receiver-side entries missing from src go; excluded ones are
            // protected (no --delete-excluded).
            "--delete",
            "--checksum",
            // The whole file list up front: hardlinks are found across
            // directories and deletions see the complete tree.
            "--no-inc-recursive",
        ])
        .arg(out_format())
        .args(extra);
    for name in exclude_contents_of {
        layout::validate_state_dir(name)?;
        // Anchored at the transfer root; `*` also matches dot files. The
        // name has no wildcard characters (validated above).
        c.arg(format!("--filter=- /{name}/*"));
    }
    c.arg(dir_arg(src)).arg(dir_arg(dest));
    Ok(c)
}

/// rsync with the C locale, so the escaping of names does not depend on the
/// caller's locale (every byte >= 0x80 is printed as `\#ooo`).
fn rsync() -> Command {
    let mut c = Command::new("rsync");
    c.env("LC_ALL", "C");
    c
}

/// `path/` as rsync's "the contents of this directory"; a relative path gets
/// `./` so neither a `:` (remote host) nor a leading `-` (option) can be
/// read into it.
fn dir_arg(path: &Path) -> OsString {
    let mut arg = OsString::new();
    if path.is_relative() {
        arg.push("./");
    }
    arg.push(path);
    arg.push("/");
    arg
}

/// `path` must be a directory. `follow`: the caller's own argument (a
/// symlink to a directory is what they meant); otherwise a symlink is
/// refused (it would redirect writes out of the image).
fn require_dir(path: &Path, follow: bool) -> Result<(), SyncError> {
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .map_err(io(path))?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(SyncError::NotADirectory {
            path: path.to_owned(),
        })
    }
}

// ---------------------------------------------------------------------------
// State data policy.

/// What happens to the data a new rootfs has under a state dir D, given
/// the live `state/D` subvolume. In both cases nothing in `state/D` is
/// changed or deleted: the state subvolumes hold the machine's data.
/// `--state-data` takes it as it is (`keep`, `merge`); `help = None` keeps
/// these docs out of `--help`, which explains the values itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StatePolicy {
    /// State untouched; everything the new rootfs has under D is left out.
    #[value(help = None::<&str>)]
    Keep,
    /// Entries absent from `state/D` are copied in (new files a new release
    /// ships, e.g. a new package's `/var/lib/foo`); entries that exist are
    /// never overwritten and are listed as left out.
    #[value(help = None::<&str>)]
    Merge,
}

impl StatePolicy {
    pub fn name(self) -> &'static str {
        match self {
            StatePolicy::Keep => "keep",
            StatePolicy::Merge => "merge",
        }
    }
}

/// An entry copied into a state subvolume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathEntry {
    /// As the booted system sees it (`/var/lib/foo`), [`encode_path`] form.
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Regular files only; 0 otherwise.
    pub size: u64,
}

/// What [`apply_state_policy`] did, in rsync's (sorted, parents first)
/// order, paths as the booted system sees them in [`encode_path`] form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateOutcome {
    /// Entries of the new rootfs's D now in `state/D`.
    pub merged: Vec<PathEntry>,
    /// Every other entry of the new rootfs's D: not copied, because of the
    /// policy, because `state/D` has an entry of that name (a directory
    /// that exists is listed too: its attributes stay the state's, though
    /// new entries may be merged into it), or because a parent in `state/D`
    /// is not a directory.
    pub left_out: Vec<String>,
}

/// Applies `policy` for the state dir `mountpoint_name` (`var`): `src_dir`
/// is the new rootfs's `var`, `state_dir` the live `state/var`.
///
/// The lists are exact: rsync's dry run enumerates `src_dir`, each entry is
/// looked up in `state_dir` without following symlinks, the entries to
/// merge are handed to rsync by name (`--files-from`, `--ignore-existing`,
/// `--no-implied-dirs` so existing directories keep their attributes), and
/// `merged` is what that run reports having created.
pub fn apply_state_policy(
    src_dir: &Path,
    state_dir: &Path,
    mountpoint_name: &str,
    policy: StatePolicy,
    interrupt: &Interrupt,
) -> Result<StateOutcome, SyncError> {
    layout::validate_state_dir(mountpoint_name)?;
    let prefix = layout::state_mountpoint(mountpoint_name);
    let shown = |rel: &[u8]| encode_path(&shown_as(prefix.as_bytes(), rel));
    match std::fs::symlink_metadata(src_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateOutcome::default()),
        Err(e) => return Err(io(src_dir)(e)),
        // A symlink here would make rsync read outside the rootfs.
        Ok(meta) if !meta.is_dir() => {
            return Err(SyncError::NotADirectory {
                path: src_dir.to_owned(),
            })
        }
        Ok(_) => {}
    }
    require_dir(state_dir, false)?;

    let entries = list_entries(src_dir, interrupt)?;
    let mut outcome = StateOutcome::default();
    if policy == StatePolicy::Keep {
        outcome.left_out = entries.iter().map(|e| shown(e)).collect();
        return Ok(outcome);
    }

    let mut to_merge = Vec::new();
    for rel in &entries {
        if lookup(state_dir, rel)? == Lookup::Absent {
            to_merge.push(rel.clone());
        }
    }
    let created: std::collections::HashSet<Vec<u8>> = if to_merge.is_empty() {
        Default::default()
    } else {
        copy_listed(src_dir, state_dir, &to_merge, interrupt)?
            .into_iter()
            .collect()
    };
    for rel in &entries {
        if created.contains(rel) {
            let path = state_dir.join(std::ffi::OsStr::from_bytes(rel));
            let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            outcome.merged.push(PathEntry {
                path: shown(rel),
                file_type: crate::migrate::file_type(&meta),
                size: if meta.is_file() { meta.len() } else { 0 },
            });
        } else {
            outcome.left_out.push(shown(rel));
        }
    }
    Ok(outcome)
}

/// Every entry under `dir` (relative, raw bytes, parents before children),
/// from an rsync dry run into an empty directory.
fn list_entries(dir: &Path, interrupt: &Interrupt) -> Result<Vec<Vec<u8>>, SyncError> {
    let empty = tempfile::Builder::new()
        .prefix("strata-list-")
        .tempdir()
        .map_err(io(&std::env::temp_dir()))?;
    let mut c = rsync();
    c.args(ARCHIVE)
        .args(["--dry-run", "--no-inc-recursive"])
        .arg(out_format())
        .arg(dir_arg(dir))
        .arg(dir_arg(empty.path()));
    collect_changes(&mut c, interrupt)
}

/// Runs `c` and returns the paths of the entries it reports as changed
/// (anything but unchanged and the transfer root itself).
fn collect_changes(c: &mut Command, interrupt: &Interrupt) -> Result<Vec<Vec<u8>>, SyncError> {
    let mut paths = Vec::new();
    let mut bad = None;
    cmd::run_interruptible(c, interrupt, &mut |line| match parse_line(line) {
        Ok(Line::Change(ch)) if ch.kind != ChangeKind::Unchanged && !ch.path.is_empty() => {
            paths.push(ch.path)
        }
        Ok(_) => {}
        Err(e) => {
            bad.get_or_insert(e);
        }
    })?;
    match bad {
        Some(e) => Err(e),
        None => Ok(paths),
    }
}

/// Copies exactly the `listed` entries of `src` into `dest`; returns those
/// rsync created.
fn copy_listed(
    src: &Path,
    dest: &Path,
    listed: &[Vec<u8>],
    interrupt: &Interrupt,
) -> Result<Vec<Vec<u8>>, SyncError> {
    use std::io::Write;
    let mut list = tempfile::Builder::new()
        .prefix("strata-merge-")
        .tempfile()
        .map_err(io(&std::env::temp_dir()))?;
    for rel in listed {
        list.write_all(rel)
            .and_then(|()| list.write_all(b"\0"))
            .map_err(io(list.path()))?;
    }
    list.flush().map_err(io(list.path()))?;
    let mut files_from = OsString::from("--files-from=");
    files_from.push(list.path());
    let mut c = rsync();
    c.args(ARCHIVE)
        .args(["--ignore-existing", "--no-implied-dirs", "--from0"])
        .arg(files_from)
        .arg(out_format())
        .arg(dir_arg(src))
        .arg(dir_arg(dest));
    collect_changes(&mut c, interrupt)
}

#[derive(Debug, PartialEq, Eq)]
enum Lookup {
    Absent,
    /// Exists, or cannot be created because a parent is not a directory.
    Taken,
}

/// Looks `rel` up under `root` one component at a time without following
/// symlinks (a symlink in the live state could point anywhere on the
/// host). A missing parent counts as absent: parents come first in the
/// list, so it is being merged too.
fn lookup(root: &Path, rel: &[u8]) -> Result<Lookup, SyncError> {
    let mut path = root.to_owned();
    let parts: Vec<&[u8]> = rel
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(std::ffi::OsStr::from_bytes(part));
        match std::fs::symlink_metadata(&path) {
            Ok(_) if i + 1 == parts.len() => return Ok(Lookup::Taken),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Ok(Lookup::Taken),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::Absent),
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(Lookup::Taken)
}

// ---------------------------------------------------------------------------
// rsync's itemized output.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Attributes,
    /// Listed only with `-ii`.
    Unchanged,
    Deleted,
}

/// rsync's file type letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    File,
    Dir,
    Symlink,
    /// Character or block device.
    Device,
    /// Fifo or socket.
    Special,
}

/// One itemized line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    /// None for deletions (rsync does not say, except that directories end
    /// with `/`, which gives `Dir`).
    pub item: Option<ItemType>,
    pub length: u64,
    /// Relative to the transfer root, raw bytes, no trailing `/`; empty for
    /// the root itself.
    pub path: Vec<u8>,
    /// The file's contents were written (received), not only linked or
    /// touched.
    pub data_written: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Change(Change),
    /// Anything rsync printed that is not an itemized change.
    Message(String),
}

/// Parses one stdout line of an rsync run with this module's
/// `--out-format` (`<MARK>%i %l %n`).
pub fn parse_line(line: &[u8]) -> Result<Line, SyncError> {
    let Some(rest) = line.strip_prefix(MARK) else {
        return Ok(Line::Message(String::from_utf8_lossy(line).into_owned()));
    };
    let bad = |reason| SyncError::Parse {
        line: String::from_utf8_lossy(line).into_owned(),
        reason,
    };
    if rest.len() < 13 || rest[11] != b' ' {
        return Err(bad("no 11-character change summary"));
    }
    let (flags, rest) = (&rest[..11], &rest[12..]);
    let space = rest
        .iter()
        .position(|b| *b == b' ')
        .ok_or_else(|| bad("no length"))?;
    let length = std::str::from_utf8(&rest[..space])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad("length is not a number"))?;
    // rsync escapes control characters other than tab, bytes not printable
    // in its locale, and the backslash of a literal `\#ddd` in a name.
    let mut path = octal::unescape(&rest[space + 1..], &octal::RSYNC).expect("RSYNC never fails");
    let is_dir_name = path.ends_with(b"/");
    while path.ends_with(b"/") {
        path.pop();
    }
    if path == b"." {
        path.clear();
    }
    if flags.starts_with(b"*deleting") {
        return Ok(Line::Change(Change {
            kind: ChangeKind::Deleted,
            item: is_dir_name.then_some(ItemType::Dir),
            length,
            path,
            data_written: false,
        }));
    }
    let item = match flags[1] {
        b'f' => ItemType::File,
        b'd' => ItemType::Dir,
        b'L' => ItemType::Symlink,
        b'D' => ItemType::Device,
        b'S' => ItemType::Special,
        _ => return Err(bad("unknown file type letter")),
    };
    let attrs = &flags[2..];
    let all_new = attrs.iter().all(|b| *b == b'+');
    let kind = match flags[0] {
        b'<' | b'>' | b'c' | b'h' if all_new => ChangeKind::Created,
        b'<' | b'>' | b'c' | b'h' => ChangeKind::Updated,
        b'.' if attrs.iter().all(|b| *b == b'.' || *b == b' ') => ChangeKind::Unchanged,
        b'.' => ChangeKind::Attributes,
        _ => return Err(bad("unknown update type")),
    };
    Ok(Line::Change(Change {
        kind,
        item: Some(item),
        length,
        path,
        data_written: matches!(flags[0], b'<' | b'>') && item == ItemType::File,
    }))
}

/// `prefix` + `/` + `rel`, or `prefix` alone (`/` when empty) for the root.
fn shown_as(prefix: &[u8], rel: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    if !rel.is_empty() || out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(rel);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(line: &str) -> Change {
        match parse_line(line.as_bytes()).unwrap() {
            Line::Change(c) => c,
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_created_updated_deleted_and_attribute_changes() {
        let c = change("=strata= >f+++++++++ 5242880 etc/sparse");
        assert_eq!(c.kind, ChangeKind::Created);
        assert_eq!(c.item, Some(ItemType::File));
        assert_eq!(c.length, 5242880);
        assert_eq!(c.path, b"etc/sparse");
        assert!(c.data_written);

        let c = change("=strata= >fcs....... 2 etc/a");
        assert_eq!((c.kind, c.data_written), (ChangeKind::Updated, true));

        let c = change("=strata= *deleting   0 etc/gone");
        assert_eq!((c.kind, c.item), (ChangeKind::Deleted, None));
        assert_eq!(c.path, b"etc/gone");
        let c = change("=strata= *deleting   0 usr/share/old/");
        assert_eq!((c.kind, c.item), (ChangeKind::Deleted, Some(ItemType::Dir)));
        assert_eq!(c.path, b"usr/share/old");

        let c = change("=strata= .d..t...... 4096 etc/");
        assert_eq!(
            (c.kind, c.item),
            (ChangeKind::Attributes, Some(ItemType::Dir))
        );
        assert_eq!(c.path, b"etc");
        let c = change("=strata= .f...p..... 10 usr/bin/su");
        assert_eq!((c.kind, c.data_written), (ChangeKind::Attributes, false));
        let c = change("=strata= .d          4096 ./");
        assert_eq!(c.kind, ChangeKind::Unchanged);
        assert!(c.path.is_empty());

        let c = change("=strata= cL+++++++++ 11 etc/evil");
        assert_eq!(
            (c.kind, c.item),
            (ChangeKind::Created, Some(ItemType::Symlink))
        );
        assert!(!c.data_written);
        let c = change("=strata= cLc.t...... 7 etc/alternatives/editor");
        assert_eq!(c.kind, ChangeKind::Updated);
        let c = change("=strata= cS+++++++++ 0 etc/fifo");
        assert_eq!(c.item, Some(ItemType::Special));
        let c = change("=strata= cD+++++++++ 0 dev/null");
        assert_eq!(c.item, Some(ItemType::Device));
        let c = change("=strata= hf+++++++++ 2 etc/b");
        assert_eq!((c.kind, c.data_written), (ChangeKind::Created, false));
    }

    #[test]
    fn names_keep_spaces_and_unescape_to_their_bytes() {
        let c = change(r"=strata= >f+++++++++ 1 etc/bad\#377\#012name with  spaces");
        assert_eq!(c.path, b"etc/bad\xff\nname with  spaces");
        // A literal "\#123" in a name: rsync escapes its backslash.
        let c = change(r"=strata= >f+++++++++ 2 etc/a b\#134#123");
        assert_eq!(c.path, b"etc/a b\\#123");
        // -8 output (raw high bytes) needs no unescaping at all.
        let c = change("=strata= >f+++++++++ 3 etc/caf\u{e9}");
        assert_eq!(c.path, "etc/caf\u{e9}".as_bytes());
    }

    #[test]
    fn other_output_is_a_message_and_garbage_is_an_error() {
        assert_eq!(
            parse_line(b"cannot delete non-empty directory: var").unwrap(),
            Line::Message("cannot delete non-empty directory: var".into())
        );
        for bad in [
            "=strata= >f+++ 1 x",
            "=strata= >f+++++++++ x y",
            "=strata= >Q+++++++++ 1 x",
            "=strata= ?f+++++++++ 1 x",
            "=strata= >f+++++++++ 12",
        ] {
            assert!(
                matches!(parse_line(bad.as_bytes()), Err(SyncError::Parse { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn report_counts_bytes_of_received_files_only() {
        let mut r = SyncReport::default();
        for l in [
            "=strata= *deleting   0 etc/gone",
            "=strata= >fcs....... 2 etc/a",
            "=strata= >f+++++++++ 100 etc/new",
            "=strata= hf+++++++++ 100 etc/new-link",
            "=strata= .f..t...... 7 etc/touched",
            "=strata= .d..t...... 4096 ./",
        ] {
            r.add(&change(l));
        }
        assert_eq!(r.bytes_written, 102);
        assert_eq!(r.created, ["/etc/new", "/etc/new-link"]);
        assert_eq!(r.updated, ["/etc/a"]);
        assert_eq!(r.attributes, ["/etc/touched", "/"]);
        assert_eq!(r.deleted, ["/etc/gone"]);
        assert!(!r.contents_unchanged());
    }

    #[test]
    fn stats_transferred_size() {
        let stats = "Number of files: 12 (reg: 6, dir: 3)\n\
                     Total file size: 5242900 bytes\n\
                     Total transferred file size: 5242887 bytes\n";
        let found: Vec<u64> = stats.lines().filter_map(parse_transferred_size).collect();
        assert_eq!(found, [5242887]);
        assert_eq!(
            parse_transferred_size("Total transferred file size: 1,234,567 bytes"),
            Some(1234567)
        );
        assert_eq!(parse_transferred_size("Total file size: 5 bytes"), None);
    }

    #[test]
    fn shown_paths() {
        assert_eq!(shown_as(b"", b""), b"/");
        assert_eq!(shown_as(b"", b"etc/a"), b"/etc/a");
        assert_eq!(shown_as(b"/var", b"lib/x"), b"/var/lib/x");
        assert_eq!(shown_as(b"/var", b""), b"/var");
    }

    #[test]
    fn arguments_are_local_directories() {
        assert_eq!(dir_arg(Path::new("/a/b")), "/a/b/");
        assert_eq!(dir_arg(Path::new("host:dir")), "./host:dir/");
        assert_eq!(dir_arg(Path::new("-rf")), "./-rf/");
    }
}
