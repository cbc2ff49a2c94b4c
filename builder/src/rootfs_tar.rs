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

use crate::cmd::{self, CmdError};
use crate::interrupt::Interrupt;
use std::ffi::OsString;
use std::io::Read;
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
        .arg(archive);
    cmd
}

/// Every character and block device in `archive`, in archive order.
pub fn list_device_nodes(
    archive: &Path,
    interrupt: &Interrupt,
) -> Result<Vec<DeviceNode>, TarError> {
    let mut cmd = tar_command(archive);
    cmd.args([
        "--list",
        "--verbose",
        "--numeric-owner",
        "--quoting-style=escape",
    ]);
    let mut nodes = Vec::new();
    let mut bad = None;
    cmd::run_interruptible(&mut cmd, interrupt, &mut |line| {
        if bad.is_none() {
            match parse_listing_line(line) {
                Ok(Some(n)) => nodes.push(n),
                Ok(None) => {}
                Err(()) => bad = Some(String::from_utf8_lossy(line).into_owned()),
            }
        }
    })
    .map_err(|e| tool_error(archive, "listing", e))?;
    if let Some(line) = bad {
        return Err(TarError::Io {
            what: format!("listing {}", archive.display()),
            source: std::io::Error::other(format!("unexpected `tar --list` line {line:?}")),
        });
    }
    Ok(nodes)
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
    interrupt: &Interrupt,
) -> Result<Vec<DeviceNode>, TarError> {
    let skipped = match device_nodes {
        DeviceNodes::Create => Vec::new(),
        DeviceNodes::Skip => list_device_nodes(archive, interrupt)?,
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
    const ARCHIVE_PROBLEMS: [&str; 6] = [
        "Member name contains '..'",
        "does not look like a tar archive",
        "Unexpected EOF in archive",
        "Skipping to next header",
        "Cannot open: Not a directory",
        "Cannot hard link to",
    ];
    match e {
        CmdError::Interrupted { .. } => TarError::Interrupted,
        e if ARCHIVE_PROBLEMS.iter().any(|p| e.stderr().contains(p)) => {
            // One line: GNU tar's complaints, in its order.
            let said: Vec<&str> = e.stderr().lines().map(str::trim).collect();
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

/// One line of `tar --list --verbose --numeric-owner --quoting-style=escape`
/// in the C locale:
///
/// ```text
/// crw-rw-rw- 0/0             1,3 2026-11-27 03:59 ./dev/null
/// ```
///
/// Ok(None) for members that are not devices; Err for a device line that
/// does not parse.
fn parse_listing_line(line: &[u8]) -> Result<Option<DeviceNode>, ()> {
    let kind = match line.first() {
        Some(b'c') => DeviceKind::Char,
        Some(b'b') => DeviceKind::Block,
        _ => return Ok(None),
    };
    // Five space-separated fields (mode, uid/gid, major,minor, date, time),
    // then one space, then the name: the name is taken as the rest of the
    // line, spaces and all.
    let mut rest = line;
    let mut fields = Vec::with_capacity(5);
    for _ in 0..5 {
        let start = rest.iter().position(|&b| b != b' ').ok_or(())?;
        rest = &rest[start..];
        let end = rest.iter().position(|&b| b == b' ').ok_or(())?;
        fields.push(std::str::from_utf8(&rest[..end]).map_err(|_| ())?);
        rest = &rest[end + 1..];
    }
    let mode = parse_mode(fields[0])?;
    let (uid, gid) = fields[1].split_once('/').ok_or(())?;
    let (major, minor) = fields[2].split_once(',').ok_or(())?;
    let num = |s: &str| s.parse::<u32>().map_err(|_| ());
    Ok(Some(DeviceNode {
        path: PathBuf::from(OsString::from_vec(unescape(rest)?)),
        kind,
        major: num(major)?,
        minor: num(minor)?,
        mode,
        uid: num(uid)?,
        gid: num(gid)?,
    }))
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

/// Undoes GNU tar's `escape` quoting style: `\\`, `\n` and friends, and
/// `\ooo` for any other byte.
fn unescape(s: &[u8]) -> Result<Vec<u8>, ()> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] != b'\\' {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let c = *s.get(i + 1).ok_or(())?;
        i += 2;
        out.push(match c {
            b'\\' => b'\\',
            b'a' => 0x07,
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            b'0'..=b'7' => {
                let digits = s[i - 1..]
                    .iter()
                    .take(3)
                    .take_while(|d| (b'0'..=b'7').contains(d));
                let mut v: u32 = 0;
                let mut n = 0;
                for d in digits {
                    v = v * 8 + u32::from(d - b'0');
                    n += 1;
                }
                i += n - 1;
                u8::try_from(v).map_err(|_| ())?
            }
            other => other,
        });
    }
    Ok(out)
}

/// A rootfs archive extracted next to the output image (same filesystem,
/// so its space is the output's), removed when dropped: on success, on
/// error and on interruption alike. Named `.<output>.strata-extract.<pid>.
/// <random>` (`debris::EXTRACT_MARKER`): a run killed with SIGKILL leaves
/// it for the next run to remove.
///
/// The named directory is mode 0700 and the tree is one level below it:
/// the archive's setuid binaries and device nodes are never reachable by
/// another user, whatever modes the archive gives them.
#[derive(Debug)]
pub struct Extraction {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    /// Device nodes left out (`DeviceNodes::Skip`).
    pub skipped_devices: Vec<DeviceNode>,
}

/// The name `Extraction::rootfs` has inside the 0700 directory.
const ROOTFS_DIR: &str = "rootfs";

impl Extraction {
    /// Extracts `archive` into a new directory next to `output` (see the
    /// type).
    pub fn next_to(
        output: &Path,
        archive: &Path,
        device_nodes: DeviceNodes,
        interrupt: &Interrupt,
    ) -> Result<Extraction, TarError> {
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                ".{name}{}{}.",
                crate::debris::EXTRACT_MARKER,
                std::process::id()
            ))
            .tempdir_in(parent)
            .map_err(|source| TarError::Io {
                what: format!(
                    "creating a directory for the extracted rootfs in {}",
                    parent.display()
                ),
                source,
            })?;
        // tempfile makes it 0700; this is what keeps the tree private, so
        // not left to a library default.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(
            |source| TarError::Io {
                what: format!("making {} private", dir.path().display()),
                source,
            },
        )?;
        let rootfs = dir.path().join(ROOTFS_DIR);
        // 0755 (not subject to the umask) until the archive's `./` entry,
        // if it has one, says otherwise: docker export has none.
        std::fs::create_dir(&rootfs)
            .and_then(|()| {
                std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
            })
            .map_err(|source| TarError::Io {
                what: format!("creating {}", rootfs.display()),
                source,
            })?;
        let skipped_devices = extract(archive, &rootfs, device_nodes, interrupt)?;
        Ok(Extraction {
            dir,
            rootfs,
            skipped_devices,
        })
    }

    /// The extracted tree: the rootfs to build from.
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let n = parse_listing_line(
            b"crwsr-x--T 12/34           1,3 2026-11-27 03:59 ./dev/we ird\\nx\\\\y\\303\\251",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            n,
            DeviceNode {
                path: PathBuf::from(OsString::from_vec(b"./dev/we ird\nx\\y\xc3\xa9".to_vec())),
                kind: DeviceKind::Char,
                major: 1,
                minor: 3,
                mode: 0o4750 | 0o1000,
                uid: 12,
                gid: 34,
            }
        );
        let b = parse_listing_line(b"brw-rw---- 0/6          259,65536 2026-11-27 03:59 dev/x")
            .unwrap()
            .unwrap();
        assert_eq!((b.kind, b.major, b.minor), (DeviceKind::Block, 259, 65536));
        assert_eq!(
            parse_listing_line(b"-rw-r--r-- 0/0 5 2026-11-27 03:59 ./crw-fake").unwrap(),
            None
        );
        assert!(parse_listing_line(b"crw-r--r-- garbage").is_err());
        assert_eq!(parse_mode("-rwxr-sr-x"), Ok(0o2755));
        assert_eq!(parse_mode("drwxrwxrwt"), Ok(0o1777));
        assert_eq!(parse_mode("-rwSr--r--"), Ok(0o4644));
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
        let skipped = extract(&path, &dest, DeviceNodes::Skip, &interrupt).unwrap();
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
        let e = extract(&path, &dest, DeviceNodes::Create, &Interrupt::default()).unwrap_err();
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
        let x =
            Extraction::next_to(&out, &path, DeviceNodes::Create, &Interrupt::default()).unwrap();
        let name = x.dir().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!(
                ".sys.img{}{}.",
                crate::debris::EXTRACT_MARKER,
                std::process::id()
            )),
            "{name}"
        );
        let mode = std::fs::metadata(x.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(x.rootfs().join("etc").is_dir());
        let dir = x.dir().to_owned();
        drop(x);
        assert!(!dir.exists());
    }
}
