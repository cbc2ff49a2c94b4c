//! A rootfs given as a tar archive (`--rootfs ROOTFS.tar[.gz|.xz|.zst]`),
//! as `mmdebstrap --mode=unshare`, `docker export` or `tar --xattrs
//! --xattrs-include='*' --acls --numeric-owner -cf` make it: recognised by
//! its bytes, extracted by GNU tar into a directory the build then reads
//! like any rootfs.
//!
//! GNU tar reads the archive, never strata: it knows every header format
//! (ustar, GNU long names, PAX, sparse members), keeps numeric owners,
//! modes (setuid included), mtimes, xattrs, POSIX ACLs, hardlinks,
//! symlinks and device nodes, and finds the compression by the file's
//! signature. The listing of device nodes (`list_device_nodes`) uses the
//! same GNU tar, so the names it excludes are exactly the names it would
//! extract.
//!
//! The archive is untrusted. What keeps its members inside `dest`
//! (GNU tar 1.34, checked with crafted archives):
//! - without `--absolute-names`, a member whose name has a `..` component
//!   is skipped (an error at the end) and a leading `/` is stripped, of
//!   member names and of hardlink targets alike;
//! - a symlink whose target is absolute or contains `..` is first created
//!   as an empty placeholder file and made a link only at the very end, after
//!   every other member: no member is ever written through it (`a -> /etc`
//!   then `a/passwd` fails with "Not a directory");
//! - the other symlinks point inside `dest` by construction;
//! - `dest` is new and empty (no symlink of someone else's to follow), and
//!   `--keep-directory-symlink` is not given, so an archive cannot turn an
//!   existing link into a path out;
//! - `--force-local`: an archive named `host:file` is a file, not a remote
//!   tape reached through rsh.
//!
//! The extracted tree holds the archive's setuid binaries and device nodes
//! on the host: it lives in a directory only root can enter (`Extraction`).

use crate::host::claim::ClaimedDir;
use crate::host::cmd::{self, CmdError};
use crate::host::interrupt::Interrupt;
use crate::octal;
use rustix::fs::Mode;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The archive itself is the problem (not a tar, a member escaping):
    /// the user can fix it (exit 2).
    #[error("{0}")]
    Input(String),
    #[error("{what}: {source}")]
    Tool {
        what: String,
        #[source]
        source: CmdError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("extracting the rootfs archive: interrupted")]
    Interrupted,
}

impl From<TarError> for crate::error::StepError {
    fn from(e: TarError) -> Self {
        use crate::error::StepError;
        match e {
            TarError::Input(m) => StepError::Input(m),
            TarError::Interrupted => StepError::Interrupted,
            TarError::Tool { what, source } => StepError::Failed {
                what,
                cause: source.into(),
            },
            TarError::Io { what, source } => StepError::Failed {
                what,
                cause: source.into(),
            },
        }
    }
}

/// What `--rootfs` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsInput {
    /// A directory (or a symlink to one): read in place.
    Dir,
    /// A tar archive, plain or compressed (`Compression` as its first bytes
    /// say): extracted first.
    Tar(Compression),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
}

/// Where POSIX puts the ustar magic in a tar header (GNU tar's own
/// `"ustar  \0"` starts with the same five bytes).
const USTAR_MAGIC_AT: usize = 257;
const USTAR_MAGIC: &[u8] = b"ustar";

/// Says what `path` is by looking at it, never at its name: a directory,
/// or a regular file starting with a tar header or a compression signature
/// (gzip, xz, zstd, bzip2). Anything else is an input error naming it.
/// A missing path is left to the directory checks (`deploy::open_rootfs`),
/// which name it.
pub fn classify(path: &Path) -> Result<RootfsInput, TarError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(RootfsInput::Dir),
    };
    if meta.is_dir() {
        return Ok(RootfsInput::Dir);
    }
    if !meta.is_file() {
        return Err(TarError::Input(format!(
            "rootfs {} is neither a directory nor a tar archive (not a regular file)",
            path.display()
        )));
    }
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| TarError::Input(format!("rootfs {}: {e}", path.display())))?;
    sniff(&head).map(RootfsInput::Tar).ok_or_else(|| {
        TarError::Input(format!(
            "rootfs {} is neither a directory nor a tar archive (no tar header, no gzip/xz/zstd/bzip2 signature)",
            path.display()
        ))
    })
}

/// The archive kind the first bytes of a file say.
fn sniff(head: &[u8]) -> Option<Compression> {
    const SIGNATURES: [(&[u8], Compression); 4] = [
        (&[0x1f, 0x8b], Compression::Gzip),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
        (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        (b"BZh", Compression::Bzip2),
    ];
    if head
        .get(USTAR_MAGIC_AT..USTAR_MAGIC_AT + USTAR_MAGIC.len())
        .is_some_and(|m| m == USTAR_MAGIC)
    {
        return Some(Compression::None);
    }
    SIGNATURES
        .iter()
        .find(|(sig, _)| head.starts_with(sig))
        .map(|(_, c)| *c)
}

/// What to do with the archive's device nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceNodes {
    /// Create them (needs CAP_MKNOD: the privileged build).
    Create,
    /// Leave them out and return them (`extract`'s result), for a caller
    /// that cannot mknod (a user namespace) and creates them elsewhere.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

/// A device node in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// As GNU tar names the member and would create it under `dest`
    /// (e.g. `./dev/null`, or `dev/null` for an archive without `./`).
    pub path: PathBuf,
    pub kind: DeviceKind,
    pub major: u32,
    pub minor: u32,
    /// Permission bits including setuid/setgid/sticky (no type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The GNU tar options that read an archive whose name may contain `:`.
fn tar_command(archive: &Path) -> Command {
    let mut cmd = Command::new("tar");
    // The C locale: listings escape every non-ASCII byte as `\ooo`, which
    // `unescape` turns back into the name's bytes.
    cmd.env("LC_ALL", "C")
        .arg("--force-local")
        .arg("-f")
        .arg(archive_arg(archive));
    cmd
}

/// `archive` as `-f` takes it: a relative name gets `./`, so a file named
/// `-` is that file, not standard input.
fn archive_arg(archive: &Path) -> PathBuf {
    if archive.is_relative() {
        Path::new(".").join(archive)
    } else {
        archive.to_owned()
    }
}

/// What an archive may hold, judged on its listing before anything is
/// extracted: a refusal then costs one read of the archive and leaves
/// nothing behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// What extraction writes (the smaller of the members' sizes added up
    /// and the tar stream's length) may be this much (the image's size):
    /// an archive that cannot fit is refused before it fills the disk.
    pub max_bytes: Option<u64>,
    /// Owners and groups above this id cannot be made (the rootless
    /// build's user namespace maps 65536 ids: 0 to 65535; its message says
    /// so).
    pub max_id: Option<u32>,
    /// Xattr name prefixes that cannot be set (`trusted.` needs
    /// CAP_SYS_ADMIN in the host's namespace).
    pub refused_xattrs: Vec<String>,
}

impl Limits {
    /// What a rootless extraction (a user namespace, `rootless`) can make.
    pub fn rootless(max_bytes: u64) -> Limits {
        Limits {
            max_bytes: Some(max_bytes),
            max_id: Some(ROOTLESS_MAX_ID),
            refused_xattrs: vec!["trusted.".into()],
        }
    }
}

/// The highest id a rootless build's user namespace maps (65536 ids from 0).
pub const ROOTLESS_MAX_ID: u32 = 65535;

/// What one listing of an archive says.
#[derive(Debug, Default)]
struct Scan {
    /// Devices by member index, names still empty.
    devices: Vec<(usize, DeviceNode)>,
    members: usize,
    /// The members' sizes added up (a sparse member counts its holes).
    bytes: u64,
    /// The tar stream's length (`--totals`): headers and the data stored,
    /// so a sparse member (`--sparse`) counts only its data.
    stream_bytes: Option<u64>,
    /// The biggest member: (index, size).
    largest: Option<(usize, u64)>,
    /// The first member past a limit: (index, why).
    refused: Option<(usize, String)>,
}

/// One pass of `tar --list -vv --xattrs` over `archive`: each member's
/// type, mode, owner, size or device numbers, and its xattr names (the
/// indented `  x: LEN NAME` lines after it), judged against `limits`.
fn scan(archive: &Path, limits: &Limits, interrupt: &Interrupt) -> Result<Scan, TarError> {
    let mut out = Scan::default();
    let mut bad = None;
    let mut cmd = tar_command(archive);
    // Escaped names here too: a newline in a name stays on its line.
    cmd.args([
        "--list",
        "--verbose",
        "--verbose",
        "--numeric-owner",
        "--quoting-style=escape",
        "--xattrs",
        "--xattrs-include=*",
        // "Total bytes read: N (…)" on stderr at the end.
        "--totals",
    ]);
    let stderr = cmd::run_interruptible_stderr(&mut cmd, interrupt, &mut |line| {
        if let Some(xattr) = line.strip_prefix(b"  x: ") {
            // "LEN NAME" of the member above.
            let name = xattr.splitn(2, |&b| b == b' ').nth(1).unwrap_or_default();
            let name = String::from_utf8_lossy(name);
            if let Some(p) = limits
                .refused_xattrs
                .iter()
                .find(|p| name.starts_with(p.as_str()))
            {
                out.refused.get_or_insert((
                    out.members.saturating_sub(1),
                    format!(
                        "it has the xattr {name}, and a rootless build cannot set {p}* xattrs (they need CAP_SYS_ADMIN on the host); build as root with --backend privileged"
                    ),
                ));
            }
            return;
        }
        let index = out.members;
        out.members += 1;
        match parse_member_line(line) {
            Ok(m) => {
                out.bytes = out.bytes.saturating_add(m.size);
                if out.largest.is_none_or(|(_, l)| m.size > l) {
                    out.largest = Some((index, m.size));
                }
                if let Some(max) = limits.max_id {
                    if m.uid > max || m.gid > max {
                        out.refused.get_or_insert((
                            index,
                            format!(
                                "it is owned by {}:{}, and a rootless build maps ids 0 to {max} only (65536 subordinate ids); give its files smaller ids or build as root with --backend privileged",
                                m.uid, m.gid
                            ),
                        ));
                    }
                }
                if let Some(d) = m.device {
                    out.devices.push((index, d));
                }
            }
            Err(()) => {
                bad.get_or_insert_with(|| String::from_utf8_lossy(line).into_owned());
            }
        }
    })
    .map_err(|e| tool_error(archive, "listing", e))?;
    out.stream_bytes = stderr.lines().find_map(|l| {
        l.strip_prefix("Total bytes read: ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    if let Some(line) = bad {
        return Err(TarError::Io {
            what: format!("listing {}", archive.display()),
            source: std::io::Error::other(format!(
                "unexpected `tar --list --verbose` line {line:?}"
            )),
        });
    }
    Ok(out)
}

/// The names of the members at `indices` (ascending), from `tar --list`,
/// which prints one escaped name per line. The name cannot be cut off the
/// verbose line: the columns before it change shape (an mtime out of
/// `localtime`'s range prints as one bare number instead of a date and a
/// time; column widths grow as the listing goes), so no split tells a
/// space in a name from padding.
fn names_at(
    archive: &Path,
    indices: &[usize],
    members: usize,
    interrupt: &Interrupt,
) -> Result<Vec<Vec<u8>>, TarError> {
    let listing_error = |why: String| TarError::Io {
        what: format!("listing {}", archive.display()),
        source: std::io::Error::other(why),
    };
    let mut names = Vec::with_capacity(indices.len());
    let mut wanted = indices.iter().copied().peekable();
    let mut name_lines = 0;
    let mut cmd = tar_command(archive);
    cmd.args(["--list", "--quoting-style=escape"]);
    cmd::run_interruptible(&mut cmd, interrupt, &mut |line| {
        while wanted.peek() == Some(&name_lines) {
            wanted.next();
            names.push(octal::unescape(line, &octal::GNU_TAR));
        }
        name_lines += 1;
    })
    .map_err(|e| tool_error(archive, "listing", e))?;
    if name_lines != members {
        return Err(listing_error(format!(
            "`tar --list` gave {name_lines} members, `tar --list --verbose` {members}"
        )));
    }
    names
        .into_iter()
        .map(|n| n.map_err(|_| listing_error("a name tar escaped badly".into())))
        .collect()
}

/// Every character and block device in `archive`, in archive order, after
/// refusing (`TarError::Input`, naming the member and the limit) an archive
/// that `limits` rule out.
pub fn list_device_nodes(
    archive: &Path,
    limits: &Limits,
    interrupt: &Interrupt,
) -> Result<Vec<DeviceNode>, TarError> {
    let scan = scan(archive, limits, interrupt)?;
    let shown = |name: &[u8]| crate::pathenc::encode_path(name);
    if let Some((index, why)) = &scan.refused {
        let name = names_at(archive, &[*index], scan.members, interrupt)?;
        return Err(TarError::Input(format!(
            "rootfs archive {}: member {} cannot be extracted: {why} (nothing was extracted)",
            archive.display(),
            shown(&name[0])
        )));
    }
    // What extraction writes is at most the members' sizes and at most the
    // tar stream (a sparse member stores only its data): the smaller.
    let stored = scan.bytes.min(scan.stream_bytes.unwrap_or(scan.bytes));
    if let (Some(max), Some((index, size))) = (limits.max_bytes, scan.largest) {
        if stored > max {
            let name = names_at(archive, &[index], scan.members, interrupt)?;
            return Err(TarError::Input(format!(
                "rootfs archive {} holds {} of files, more than the {} image can take (the largest member: {}, {}); nothing was extracted: give a bigger --size or a smaller archive",
                archive.display(),
                crate::size::human(stored),
                crate::size::human(max),
                shown(&name[0]),
                crate::size::human(size)
            )));
        }
    }
    if scan.devices.is_empty() {
        return Ok(Vec::new());
    }
    let indices: Vec<usize> = scan.devices.iter().map(|(i, _)| *i).collect();
    let names = names_at(archive, &indices, scan.members, interrupt)?;
    Ok(scan
        .devices
        .into_iter()
        .zip(names)
        .map(|((_, node), name)| DeviceNode {
            path: PathBuf::from(OsString::from_vec(name)),
            ..node
        })
        .collect())
}

/// Extracts `archive` into `dest` (an existing, empty directory; its own
/// mode and owner become the archive's `./` entry's, when it has one) with
/// every attribute the archive carries. With `DeviceNodes::Skip` the device
/// nodes are listed first, left out by exact name, and returned; with
/// `Create` they are made like any member and the result is empty.
///
/// GNU tar runs in its own process group and dies with strata; a raised
/// `interrupt` stops it (`TarError::Interrupted`), leaving `dest` half
/// filled for the caller to remove.
pub fn extract(
    archive: &Path,
    dest: &Path,
    device_nodes: DeviceNodes,
    limits: &Limits,
    interrupt: &Interrupt,
) -> Result<Vec<DeviceNode>, TarError> {
    // Listed first, always: what `limits` rule out is refused before a
    // byte is written (an archive bigger than the image would fill the
    // disk first), and a damaged archive is found by the listing too.
    let devices = list_device_nodes(archive, limits, interrupt)?;
    let skipped = match device_nodes {
        DeviceNodes::Create => Vec::new(),
        DeviceNodes::Skip => devices,
    };
    let mut cmd = tar_command(archive);
    cmd.arg("-C").arg(dest).args([
        "--extract",
        // Owners by number: the archive's uids are the rootfs's, not
        // whatever names this host's /etc/passwd gives them.
        "--numeric-owner",
        "--same-owner",
        "--same-permissions",
        // Every namespace (security.capability, trusted.*), not only the
        // user.* GNU tar restores by default.
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        // Directory modes and mtimes set at the end: a read-only directory
        // early in the archive still gets its contents, and its mtime is
        // not changed by them.
        "--delay-directory-restore",
    ]);
    if !skipped.is_empty() {
        // Exact names: given before the --exclude options they govern.
        // On the command line, not in an --exclude-from file: a name may
        // contain a newline, which no line of such a file can hold.
        cmd.args(["--no-wildcards", "--anchored"]);
        for n in &skipped {
            let mut arg = OsString::from("--exclude=");
            arg.push(n.path.as_os_str());
            cmd.arg(arg);
        }
    }
    cmd::run_interruptible(&mut cmd, interrupt, &mut |_| {})
        .map_err(|e| tool_error(archive, "extracting", e))?;
    Ok(skipped)
}

/// GNU tar's complaints about the archive's contents (the user's to fix)
/// are input errors; anything else (no space, a missing decompressor) is a
/// failed step.
fn tool_error(archive: &Path, doing: &str, e: CmdError) -> TarError {
    const ARCHIVE_PROBLEMS: [&str; 15] = [
        "Member name contains '..'",
        "does not look like a tar archive",
        "Unexpected EOF in archive",
        "Skipping to next header",
        "Cannot open: Not a directory",
        "Cannot hard link to",
        // The decompressors' words for a truncated or corrupt stream
        // (gzip, xz, zstd, bzip2): tar itself then may say no more than
        // "Child returned status 1".
        "unexpected end of file",
        "Unexpected end of input",
        "premature end",
        "Compressed file ends unexpectedly",
        "invalid compressed data",
        "not in gzip format",
        "Compressed data is corrupt",
        "File format not recognized",
        "data integrity (CRC) error",
    ];
    match e {
        CmdError::Interrupted { .. } => TarError::Interrupted,
        e if ARCHIVE_PROBLEMS.iter().any(|p| e.stderr().contains(p)) => {
            // One line: GNU tar's complaints, in its order.
            let said: Vec<&str> = e
                .stderr()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            TarError::Input(format!(
                "rootfs archive {} is damaged or unsafe (nothing was built): {}",
                archive.display(),
                said.join("; ")
            ))
        }
        source => TarError::Tool {
            what: format!("{doing} {}", archive.display()),
            source,
        },
    }
}

/// A member as one line of `tar --list --verbose --numeric-owner` in the
/// C locale shows it:
///
/// ```text
/// crw-rw-rw- 0/0             1,3 2026-11-27 03:59 ./dev/null
/// -rw-r--r--* 0/0           3 2026-11-27 03:59 ./etc/f
/// ```
///
/// (`*`: the member has xattrs, `+`: ACLs.) Only the first three columns
/// are read: mode, uid/gid, and the size or `major,minor`; the name comes
/// from the names-only listing (`names_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    uid: u32,
    gid: u32,
    /// Bytes of data (0 for what holds none: devices, links, directories).
    size: u64,
    /// A device, with an empty path.
    device: Option<DeviceNode>,
}

fn parse_member_line(line: &[u8]) -> Result<Member, ()> {
    let mut fields = line
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .map(|f| std::str::from_utf8(f).map_err(|_| ()));
    let mut field = || fields.next().ok_or(())?;
    let mode_field = field()?.trim_end_matches(['*', '+']);
    let (uid, gid) = field()?.split_once('/').ok_or(())?;
    let num = |s: &str| s.parse::<u32>().map_err(|_| ());
    let (uid, gid) = (num(uid)?, num(gid)?);
    let third = field()?;
    let kind = match mode_field.as_bytes().first() {
        Some(b'c') => Some(DeviceKind::Char),
        Some(b'b') => Some(DeviceKind::Block),
        _ => None,
    };
    let Some(kind) = kind else {
        // Links and directories list 0; a hardlink's size is its target's
        // (not extracted twice), but it shows 0 too.
        let size = third.parse::<u64>().map_err(|_| ())?;
        return Ok(Member {
            uid,
            gid,
            size,
            device: None,
        });
    };
    let mode = parse_mode(mode_field)?;
    let (major, minor) = third.split_once(',').ok_or(())?;
    Ok(Member {
        uid,
        gid,
        size: 0,
        device: Some(DeviceNode {
            path: PathBuf::new(),
            kind,
            major: num(major)?,
            minor: num(minor)?,
            mode,
            uid,
            gid,
        }),
    })
}

/// `crwsr-x--T` → 0o4750 | sticky: the nine permission letters with
/// s/S (setuid, setgid) and t/T (sticky), as `ls` prints them.
fn parse_mode(s: &str) -> Result<u32, ()> {
    let b = s.as_bytes();
    if b.len() != 10 {
        return Err(());
    }
    let mut mode = 0;
    for (i, &c) in b[1..].iter().enumerate() {
        let bit = 1 << (8 - i);
        let special = match i {
            2 => 0o4000,
            5 => 0o2000,
            8 => 0o1000,
            _ => 0,
        };
        mode |= match (c, special) {
            (b'-', _) => 0,
            (b'r' | b'w' | b'x', _) => bit,
            (b's' | b't', s) if s != 0 => bit | s,
            (b'S' | b'T', s) if s != 0 => s,
            _ => return Err(()),
        };
    }
    Ok(mode)
}

/// Where the archive for `target` (the output of a build, the image of an
/// upgrade) is extracted: next to it (same filesystem, so its space is the
/// image's), unless it is something other than a regular file (`strata
/// upgrade /dev/sdb`: its directory is /dev, a tiny devtmpfs), then under
/// the temp dir (`TMPDIR`, else /tmp).
pub fn extraction_parent(target: &Path) -> PathBuf {
    match std::fs::metadata(target) {
        Ok(m) if !m.is_file() => std::env::temp_dir(),
        _ => match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        },
    }
}

/// Refuses to extract into `dir` when users other than its owner may
/// rename or remove its entries: writable by group or others without the
/// sticky bit (/tmp, 1777, is fine; a 0777 or 0775 directory is not).
/// There, another user could swap the extraction directory for a link
/// between its creation and its use, and root's tar (`--same-owner`)
/// would extract wherever it points; or plant a directory named like a
/// killed run's extraction for the debris cleaner to remove. The
/// directory's owner is trusted: the output or image is theirs to replace
/// anyway. Ancestors are not looked at: whoever renames one moves the
/// extraction whole, and it is reached through a handle, never by name
/// (`Extraction`).
pub fn check_extraction_dir(dir: &Path) -> Result<(), TarError> {
    let mode = std::fs::metadata(dir)
        .map_err(|source| TarError::Io {
            what: format!("reading the permissions of {}", dir.display()),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(TarError::Input(format!(
            "refusing to extract the rootfs archive into {} (mode {:o}): other users can write there without the sticky bit, and could swap the extraction for a link to anywhere; use a directory only its owner can write (or a sticky one like /tmp)",
            dir.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

/// A rootfs archive extracted into a new directory (`extraction_parent`),
/// removed when dropped: on success, on error and on interruption alike.
/// Named `.<target>.strata-extract.<pid>.<random>` (`debris::EXTRACT_MARKER`)
/// and claimed (`claim`): a run killed with SIGKILL leaves it unheld, for
/// the next run to remove.
///
/// The named directory is mode 0700 and the tree is one level below it:
/// the archive's setuid binaries and device nodes are never reachable by
/// another user, whatever modes the archive gives them. Once created, the
/// directory is opened (no symlink followed) and checked to be ours; tar
/// and the build reach the tree through that handle
/// (`/proc/<pid>/fd/<n>/rootfs`), never through the name, which someone
/// could swap.
#[derive(Debug)]
pub struct Extraction {
    /// Claimed (`claim`): a run killed with SIGKILL leaves it unheld.
    dir: ClaimedDir,
    /// Keeps `rootfs`'s `/proc/<pid>/fd/<n>` valid.
    _handle: OwnedFd,
    rootfs: PathBuf,
    /// Device nodes left out (`DeviceNodes::Skip`).
    pub skipped_devices: Vec<DeviceNode>,
}

/// The name `Extraction::rootfs` has inside the 0700 directory.
const ROOTFS_DIR: &str = "rootfs";

impl Extraction {
    /// Extracts `archive` into a new directory in `parent`
    /// (`extraction_parent(target)`), named after `target` (see the type).
    pub fn new(
        parent: &Path,
        target: &Path,
        archive: &Path,
        device_nodes: DeviceNodes,
        limits: &Limits,
        interrupt: &Interrupt,
    ) -> Result<Extraction, TarError> {
        check_extraction_dir(parent)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Made closed to others (0700, mkdir's mode: the umask can only
        // take bits away), never open, not even for a moment; claimed
        // before it has its name.
        let dir = ClaimedDir::new(
            parent,
            &format!(".{name}{}", crate::host::debris::EXTRACT_MARKER),
        )
        .map_err(|source| TarError::Io {
            what: format!(
                "creating a directory for the extracted rootfs in {}",
                parent.display()
            ),
            source,
        })?;
        let handle = open_own_dir(dir.path()).map_err(|source| TarError::Io {
            what: format!("opening {}", dir.path().display()),
            source,
        })?;
        let rootfs = PathBuf::from(format!(
            "/proc/{}/fd/{}/{ROOTFS_DIR}",
            std::process::id(),
            handle.as_raw_fd()
        ));
        // 0755 (not subject to the umask) until the archive's `./` entry,
        // if it has one, says otherwise: docker export has none. Inside
        // the 0700 directory no one else can put anything in its way.
        rustix::fs::mkdirat(&handle, ROOTFS_DIR, Mode::from_raw_mode(0o755))
            .and_then(|()| {
                rustix::fs::chmodat(
                    &handle,
                    ROOTFS_DIR,
                    Mode::from_raw_mode(0o755),
                    rustix::fs::AtFlags::empty(),
                )
            })
            .map_err(|e| TarError::Io {
                what: format!("creating {}", dir.path().join(ROOTFS_DIR).display()),
                source: e.into(),
            })?;
        let skipped_devices = extract(archive, &rootfs, device_nodes, limits, interrupt)?;
        Ok(Extraction {
            dir,
            _handle: handle,
            rootfs,
            skipped_devices,
        })
    }

    /// The extracted tree: the rootfs to build from (a path through the
    /// handle: valid while this lives, in this process and its children).
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// Removes the tree now (dropping does too, ignoring errors); returns
    /// the note for the user: removing a large tree takes a while.
    pub fn remove(self) -> String {
        let started = std::time::Instant::now();
        let dir = self.dir.path().to_owned();
        match self.dir.close() {
            Ok(()) => format!(
                "removed the extracted rootfs archive ({:.1}s)",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => format!(
                "could not remove the extracted rootfs archive {}: {e}; the next strata build or upgrade in this directory removes it",
                dir.display()
            ),
        }
    }

    /// The 0700 directory holding it (what the debris cleaner would find).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Opens the directory just created at `path` without following a link,
/// and makes sure it is the one we made: owned by us, closed to others
/// (as created; a directory swapped in by someone else is theirs). Then
/// 0700, whatever the umask left.
fn open_own_dir(path: &Path) -> std::io::Result<OwnedFd> {
    use rustix::fs::OFlags;
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "not the private directory strata created (owner {}, mode {:o}): replaced by someone else?",
            st.st_uid,
            st.st_mode & 0o7777
        )));
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// One ustar header (and data) for `name`: `kind` is the typeflag.
    fn member(name: &[u8], kind: u8, mode: u32, dev: (u32, u32), data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, mode.into());
        octal(&mut h, 108, 8, 1234);
        octal(&mut h, 116, 8, 5678);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 1_700_000_000);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h, 329, 8, dev.0.into());
        octal(&mut h, 337, 8, dev.1.into());
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn archive(members: &[Vec<u8>]) -> Vec<u8> {
        let mut a: Vec<u8> = members.concat();
        a.extend_from_slice(&[0u8; 1024]);
        a
    }

    #[test]
    fn sniffs_tar_and_compression_by_bytes() {
        let tar = archive(&[member(b"etc/", b'5', 0o755, (0, 0), b"")]);
        assert_eq!(sniff(&tar), Some(Compression::None));
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]), Some(Compression::Gzip));
        assert_eq!(sniff(b"\xfd7zXZ\0rest"), Some(Compression::Xz));
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd, 1]), Some(Compression::Zstd));
        assert_eq!(sniff(b"BZh91AY"), Some(Compression::Bzip2));
        assert_eq!(sniff(b"hello, not an archive\n"), None);
        assert_eq!(sniff(b""), None);

        let d = tempfile::tempdir().unwrap();
        let garbage = d.path().join("rootfs.tar");
        std::fs::write(&garbage, "not a tar, whatever the name says\n").unwrap();
        let e = classify(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("rootfs.tar") && e.contains("neither a directory nor a tar archive"),
            "{e}"
        );
        let real = d.path().join("rootfs.bin");
        std::fs::write(&real, &tar).unwrap();
        assert_eq!(
            classify(&real).unwrap(),
            RootfsInput::Tar(Compression::None)
        );
        assert_eq!(classify(d.path()).unwrap(), RootfsInput::Dir);
    }

    #[test]
    fn listing_lines_parse_to_device_nodes() {
        let n = parse_member_line(b"crwsr-x--T 12/34           1,3 99999999999999999 ./dev/n ull")
            .unwrap()
            .device
            .unwrap();
        assert_eq!(
            n,
            DeviceNode {
                path: PathBuf::new(),
                kind: DeviceKind::Char,
                major: 1,
                minor: 3,
                mode: 0o4750 | 0o1000,
                uid: 12,
                gid: 34,
            }
        );
        let b = parse_member_line(b"brw-rw---- 0/6          259,65536 2026-11-27 03:59 dev/x")
            .unwrap()
            .device
            .unwrap();
        assert_eq!((b.kind, b.major, b.minor), (DeviceKind::Block, 259, 65536));
        assert_eq!(
            parse_member_line(b"-rw-r--r--* 70000/0 5 2026-11-27 03:59 ./crw-fake").unwrap(),
            Member {
                uid: 70000,
                gid: 0,
                size: 5,
                device: None
            }
        );
        assert!(parse_member_line(b"crw-r--r-- garbage").is_err());
        assert_eq!(parse_mode("-rwxr-sr-x"), Ok(0o2755));
        assert_eq!(parse_mode("drwxrwxrwt"), Ok(0o1777));
        assert_eq!(parse_mode("-rwSr--r--"), Ok(0o4644));
    }

    /// Names that a split of `tar -tv` lines got wrong: an mtime out of
    /// `localtime`'s range (a PAX header; tar prints a bare number for the
    /// date and time, and pads the columns after it differently), spaces in
    /// and at the start of a name. The archive is written by Python's
    /// tarfile, as another tool would.
    #[test]
    fn device_names_survive_odd_listings() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("odd.tar");
        let script = r#"
import sys, tarfile
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as t:
    for name, kind, mtime in [
        ("./dev/n ull", tarfile.CHRTYPE, "99999999999999999"),
        ("./etc/x y", tarfile.REGTYPE, "99999999999999999"),
        ("./dev/  lead", tarfile.BLKTYPE, "1700000000"),
        ("./dev/ok", tarfile.CHRTYPE, "1700000000"),
    ]:
        i = tarfile.TarInfo(name)
        i.type, i.devmajor, i.devminor, i.mode = kind, 1, 3, 0o640
        i.pax_headers = {"mtime": mtime}
        t.addfile(i)
"#;
        let made = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let nodes = list_device_nodes(&path, &Limits::default(), &Interrupt::default()).unwrap();
        let names: Vec<&Path> = nodes.iter().map(|n| n.path.as_path()).collect();
        assert_eq!(
            names,
            [
                Path::new("./dev/n ull"),
                Path::new("./dev/  lead"),
                Path::new("./dev/ok")
            ]
        );
        assert_eq!(
            (nodes[1].kind, nodes[1].major, nodes[1].minor, nodes[1].mode),
            (DeviceKind::Block, 1, 3, 0o640)
        );
    }

    /// Skipping device nodes: listed with their attributes, left out by
    /// their exact names (spaces, a newline, a backslash), everything else
    /// extracted. Needs no privilege: the archive is written by hand.
    #[test]
    fn skipped_device_nodes_are_listed_and_left_out() {
        let weird = b"./dev/we ird\nx\\y";
        let tar = archive(&[
            member(b"./", b'5', 0o755, (0, 0), b""),
            member(b"./dev/", b'5', 0o755, (0, 0), b""),
            member(b"./dev/null", b'3', 0o666, (1, 3), b""),
            member(weird, b'4', 0o660, (7, 0), b""),
            member(b"./dev/null.txt", b'0', 0o644, (0, 0), b"kept\n"),
            member(b"./etc/", b'5', 0o755, (0, 0), b""),
            member(b"./etc/hostname", b'0', 0o644, (0, 0), b"box\n"),
        ]);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r:oot.tar");
        std::fs::write(&path, &tar).unwrap();
        let dest = d.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let interrupt = Interrupt::default();
        let skipped = extract(
            &path,
            &dest,
            DeviceNodes::Skip,
            &Limits::default(),
            &interrupt,
        )
        .unwrap();
        let names: Vec<&[u8]> = skipped
            .iter()
            .map(|n| n.path.as_os_str().as_encoded_bytes())
            .collect();
        assert_eq!(names, [&b"./dev/null"[..], &weird[..]]);
        assert_eq!(
            (
                skipped[1].kind,
                skipped[1].mode,
                skipped[1].uid,
                skipped[1].gid
            ),
            (DeviceKind::Block, 0o660, 1234, 5678)
        );
        let mut found: Vec<String> = std::fs::read_dir(dest.join("dev"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, ["null.txt"]);
        assert_eq!(
            std::fs::read_to_string(dest.join("etc/hostname")).unwrap(),
            "box\n"
        );
    }

    /// `../escape` is refused (an input error naming the archive), and
    /// nothing is written outside `dest`.
    #[test]
    fn members_outside_dest_are_refused() {
        let tar = archive(&[
            member(b"../escape", b'0', 0o644, (0, 0), b"out\n"),
            member(b"link", b'2', 0o777, (0, 0), b""),
            member(b"etc/", b'5', 0o755, (0, 0), b""),
        ]);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("evil.tar");
        std::fs::write(&path, &tar).unwrap();
        let dest = d.path().join("a/dest");
        std::fs::create_dir_all(&dest).unwrap();
        let e = extract(
            &path,
            &dest,
            DeviceNodes::Create,
            &Limits::default(),
            &Interrupt::default(),
        )
        .unwrap_err();
        assert!(matches!(e, TarError::Input(_)), "{e:?}");
        assert!(e.to_string().contains("evil.tar"), "{e}");
        assert!(!d.path().join("a/escape").exists());
        assert!(!d.path().join("escape").exists());
    }

    #[test]
    fn an_extraction_is_private_and_removed_when_dropped() {
        let tar = archive(&[
            member(b"./", b'5', 0o755, (0, 0), b""),
            member(b"./etc/", b'5', 0o755, (0, 0), b""),
        ]);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.tar");
        std::fs::write(&path, &tar).unwrap();
        let out = d.path().join("sys.img");
        assert_eq!(extraction_parent(&out), d.path());
        let x = Extraction::new(
            d.path(),
            &out,
            &path,
            DeviceNodes::Create,
            &Limits::default(),
            &Interrupt::default(),
        )
        .unwrap();
        let name = x.dir().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!(
                ".sys.img{}{}.",
                crate::host::debris::EXTRACT_MARKER,
                std::process::id()
            )),
            "{name}"
        );
        let mode = std::fs::metadata(x.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(x.rootfs().join("etc").is_dir());
        assert_eq!(
            std::fs::metadata(x.dir().join("rootfs/etc")).unwrap().ino(),
            std::fs::metadata(x.rootfs().join("etc")).unwrap().ino()
        );
        let dir = x.dir().to_owned();
        drop(x);
        assert!(!dir.exists());
    }

    /// The tree is reached through the handle: renaming the directory (what
    /// a swap starts with) does not move where the build reads.
    #[test]
    fn the_tree_is_reached_through_a_handle_not_the_name() {
        let tar = archive(&[member(b"etc/", b'5', 0o755, (0, 0), b"")]);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.tar");
        std::fs::write(&path, &tar).unwrap();
        let x = Extraction::new(
            d.path(),
            &d.path().join("o.img"),
            &path,
            DeviceNodes::Create,
            &Limits::default(),
            &Interrupt::default(),
        )
        .unwrap();
        let moved = d.path().join("moved");
        std::fs::rename(x.dir(), &moved).unwrap();
        std::fs::create_dir_all(x.dir().join("rootfs/decoy")).unwrap();
        assert!(x.rootfs().join("etc").is_dir());
        assert!(!x.rootfs().join("decoy").exists());
    }

    /// One rule: a directory others may write into without the sticky bit
    /// is refused (naming it and why); a sticky or owner-only one is fine.
    #[test]
    fn extraction_dirs_others_can_write_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let tar = archive(&[member(b"etc/", b'5', 0o755, (0, 0), b"")]);
        let path = d.path().join("r.tar");
        std::fs::write(&path, &tar).unwrap();
        for (mode, ok) in [
            (0o755, true),
            (0o700, true),
            (0o1777, true),
            (0o1770, true),
            (0o777, false),
            (0o775, false),
            (0o757, false),
        ] {
            let dir = d.path().join(format!("m{mode:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = Extraction::new(
                &dir,
                &dir.join("o.img"),
                &path,
                DeviceNodes::Create,
                &Limits::default(),
                &Interrupt::default(),
            );
            match got {
                Ok(x) => {
                    assert!(ok, "{mode:o} accepted");
                    drop(x);
                }
                Err(TarError::Input(m)) => {
                    assert!(!ok, "{mode:o} refused: {m}");
                    assert!(m.contains(&dir.display().to_string()), "{m}");
                    assert!(m.contains("sticky"), "{m}");
                }
                Err(e) => panic!("{mode:o}: {e}"),
            }
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        }
    }

    /// A file named `-` is read, not standard input (which the test leaves
    /// empty: tar would say it does not look like an archive).
    #[test]
    fn an_archive_named_dash_is_a_file() {
        assert_eq!(archive_arg(Path::new("-")), Path::new("./-"));
        assert_eq!(archive_arg(Path::new("/a/-")), Path::new("/a/-"));
        let d = tempfile::tempdir().unwrap();
        let tar = archive(&[member(b"./dev/null", b'3', 0o666, (1, 3), b"")]);
        std::fs::write(d.path().join("-"), &tar).unwrap();
        let mut cmd = tar_command(Path::new("-"));
        cmd.current_dir(d.path())
            .stdin(std::process::Stdio::null())
            .arg("--list");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, b"./dev/null\n");
    }

    /// A device (an upgrade of /dev/sdb) is not a place to extract next to.
    #[test]
    fn a_device_target_extracts_under_the_temp_dir() {
        assert_eq!(
            extraction_parent(Path::new("/dev/null")),
            std::env::temp_dir()
        );
        assert_eq!(extraction_parent(Path::new("x.img")), Path::new("."));
        assert_eq!(
            extraction_parent(Path::new("/nonexistent/x.img")),
            Path::new("/nonexistent")
        );
    }
}
