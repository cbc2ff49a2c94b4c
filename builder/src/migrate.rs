//! Moving a state directory's contents from `orig/<D>` into the `state/<D>`
//! subvolume (layout.md §2).
//!
//! A rename cannot cross btrfs subvolumes (EXDEV), so entries are reflinked
//! (`cp --reflink=always`: metadata only, no data bytes copied), the copy is
//! verified entry by entry against the original, and only then are the
//! originals removed. A failure before that point leaves `orig/<D>` intact.

use crate::copy::{copy_tree, CopyError};
use crate::extents::extents;
use crate::host::interrupt::Interrupt;
use crate::manifest::{FileType, MovedFile};
use crate::pathenc::encode_path;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `--state-migration`. The CLI takes it as it is (`ValueEnum`: `move`,
/// `copy`); `help = None` keeps these docs out of `--help`, which explains
/// the values in the option's own text.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Migration {
    /// Move: the mountpoint is left empty (the default, and the only way to
    /// get a boot without "not empty" warnings).
    #[value(help = None::<&str>)]
    Move,
    /// Copy: the data stays under the mountpoint too. Reproduces the 2014
    /// deployments' warnings on purpose.
    #[value(help = None::<&str>)]
    Copy,
}

impl Migration {
    pub fn name(self) -> &'static str {
        match self {
            Migration::Move => "move",
            Migration::Copy => "copy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("verifying {path}: {what} differs after the copy; originals left in place")]
    Mismatch { path: String, what: String },
    #[error("interrupted")]
    Interrupted,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MigrateError + '_ {
    move |source| MigrateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Moves (or copies) every entry of `from` into `to` (an empty subvolume),
/// giving `to` the attributes of `from`. Returns what now lives in `to`, with
/// paths as the booted system sees them under `/<name>`.
pub fn migrate(
    from: &Path,
    to: &Path,
    name: &str,
    how: Migration,
    clone: bool,
    interrupt: &Interrupt,
) -> Result<Vec<MovedFile>, MigrateError> {
    // `clone`: both ends on one btrfs, so extents are shared, not copied.
    // A rootless staging directory on another filesystem copies the bytes
    // (the verification below compares them).
    copy_tree(from, to, clone, interrupt, |_| {})?;
    let moved = verify(from, to, &format!("/{name}"), interrupt)?;
    if how == Migration::Move {
        empty_dir(from)?;
    }
    Ok(moved)
}

/// Removes every entry of `dir`, keeping `dir` itself with its mode, owner
/// and timestamps (it is the mountpoint).
pub(crate) fn empty_dir(dir: &Path) -> Result<(), MigrateError> {
    let meta = fs::symlink_metadata(dir).map_err(io(dir))?;
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        // file_type() of a DirEntry does not follow symlinks, and
        // remove_dir_all never follows them either.
        let is_dir = fs::symlink_metadata(&path).map_err(io(&path))?.is_dir();
        if is_dir {
            fs::remove_dir_all(&path).map_err(io(&path))?;
        } else {
            fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    let times = fs::FileTimes::new()
        .set_accessed(meta.accessed().map_err(io(dir))?)
        .set_modified(meta.modified().map_err(io(dir))?);
    fs::File::open(dir)
        .and_then(|f| f.set_times(times))
        .map_err(io(dir))
}

/// Compares the two trees entry by entry and describes what is in `to`.
fn verify(
    from: &Path,
    to: &Path,
    shown_as: &str,
    interrupt: &Interrupt,
) -> Result<Vec<MovedFile>, MigrateError> {
    compare(from, to, shown_as, false, interrupt)?;
    let mut moved = Vec::new();
    let mut links: HashMap<(u64, u64), u64> = HashMap::new();
    // Path of each moved entry that shares its inode, by that inode.
    let mut groups: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = from.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(&dir))?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            // Names are bytes: the record carries them losslessly.
            let mut bytes = format!("{shown_as}/").into_bytes();
            bytes.extend_from_slice(rel.as_os_str().as_bytes());
            let shown = encode_path(&bytes);
            let (a, b) = (from.join(&rel), to.join(&rel));
            let (entry, ma, mb) = compare(&a, &b, &shown, true, interrupt)?;
            if ma.nlink() > 1 && !ma.is_dir() {
                let first = *links.entry((ma.dev(), ma.ino())).or_insert(mb.ino());
                if first != mb.ino() {
                    return Err(mismatch(&shown, "hardlink structure"));
                }
                groups
                    .entry((ma.dev(), ma.ino()))
                    .or_default()
                    .push(shown.clone());
            }
            if ma.is_dir() {
                stack.push(rel);
            }
            moved.extend(entry);
        }
    }
    moved.sort_by(|a, b| a.path.cmp(&b.path));
    record_hardlinks(&mut moved, groups.into_values());
    Ok(moved)
}

/// Gives every entry of a hardlink group (two or more moved paths, one
/// inode) the group's id: its first path in sorted order.
fn record_hardlinks(moved: &mut [MovedFile], groups: impl IntoIterator<Item = Vec<String>>) {
    let mut id_of: HashMap<String, String> = HashMap::new();
    for mut paths in groups.into_iter().filter(|g| g.len() > 1) {
        paths.sort();
        for p in &paths {
            id_of.insert(p.clone(), paths[0].clone());
        }
    }
    for f in moved {
        f.hardlink = id_of.remove(&f.path);
    }
}

/// Xattrs as the manifest records them: name -> lower-case hex value.
pub fn xattrs_record(x: &Xattrs) -> std::collections::BTreeMap<String, String> {
    x.iter()
        .map(|(name, value)| {
            let hex = value.iter().map(|b| format!("{b:02x}")).collect();
            (encode_path(name), hex)
        })
        .collect()
}

fn mismatch(path: &str, what: &str) -> MigrateError {
    MigrateError::Mismatch {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

/// Checks one entry's copy; returns its manifest record (None for the root).
fn compare(
    a: &Path,
    b: &Path,
    shown: &str,
    record: bool,
    interrupt: &Interrupt,
) -> Result<(Option<MovedFile>, Metadata, Metadata), MigrateError> {
    let ma = fs::symlink_metadata(a).map_err(io(a))?;
    let mb = fs::symlink_metadata(b).map_err(io(b))?;
    let ty = file_type(&ma);
    let same = |what: &str, eq: bool| {
        if eq {
            Ok(())
        } else {
            Err(mismatch(shown, what))
        }
    };
    same("type", ty == file_type(&mb))?;
    same("mode", ma.mode() == mb.mode())?;
    same("owner", ma.uid() == mb.uid() && ma.gid() == mb.gid())?;
    let xa = xattrs(a)?;
    same("xattrs", xa == xattrs(b)?)?;
    if !ma.is_dir() {
        same("size", ma.size() == mb.size())?;
        same(
            "modification time",
            ma.mtime() == mb.mtime() && ma.mtime_nsec() == mb.mtime_nsec(),
        )?;
    }
    same("device number", ma.rdev() == mb.rdev())?;
    let mut target = None;
    match ty {
        FileType::File => same("content", same_content(a, b, ma.size(), interrupt)?)?,
        FileType::Symlink => {
            let t = fs::read_link(a).map_err(io(a))?;
            same("symlink target", t == fs::read_link(b).map_err(io(b))?)?;
            target = Some(encode_path(t.as_os_str().as_bytes()));
        }
        _ => {}
    }
    let entry = record.then(|| MovedFile {
        path: shown.to_owned(),
        file_type: ty,
        // Filled in by `hash_moved`, after the move.
        sha256: None,
        mode: ma.permissions().mode() & 0o7777,
        uid: ma.uid(),
        gid: ma.gid(),
        size: if ty == FileType::Dir { 0 } else { ma.size() },
        target,
        xattrs: xattrs_record(&xa),
        // Filled in by `verify` once every entry is seen.
        hardlink: None,
    });
    Ok((entry, ma, mb))
}

pub fn file_type(m: &Metadata) -> FileType {
    let t = m.file_type();
    if t.is_symlink() {
        FileType::Symlink
    } else if t.is_dir() {
        FileType::Dir
    } else if t.is_char_device() {
        FileType::Char
    } else if t.is_block_device() {
        FileType::Block
    } else if t.is_fifo() {
        FileType::Fifo
    } else if t.is_socket() {
        FileType::Socket
    } else {
        FileType::File
    }
}

fn open_nofollow(path: &Path) -> Result<fs::File, MigrateError> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(io(path))
}

/// Same bytes? Reflinked data shares its physical extents, which proves
/// equality without reading it; only inline (tiny) data and anything
/// unexpected (a copy onto another filesystem: the rootless staging) is
/// compared byte by byte, range by range of their extents: a hole in both
/// is equal without being read. Both are `len` bytes long (sizes were
/// compared first).
fn same_content(a: &Path, b: &Path, len: u64, interrupt: &Interrupt) -> Result<bool, MigrateError> {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (open_nofollow(a)?, open_nofollow(b)?);
    // FIEMAP unsupported (not btrfs) is not an error: compare the bytes.
    if let (Ok(Some(ea)), Ok(Some(eb))) = (extents(&fa), extents(&fb)) {
        if ea == eb {
            return Ok(true);
        }
    }
    let (mut ba, mut bb) = (
        vec![0u8; HASH_CHUNK as usize],
        vec![0u8; HASH_CHUNK as usize],
    );
    let mut pos = 0;
    while pos < len {
        let (data_a, end_a) = region(&fa, a, pos, len)?;
        let (data_b, end_b) = region(&fb, b, pos, len)?;
        let end = end_a.min(end_b);
        if !data_a && !data_b {
            pos = end;
            continue;
        }
        // Data in either: read both (a hole reads as zeros).
        while pos < end {
            if interrupt.raised() {
                return Err(MigrateError::Interrupted);
            }
            let n = (end - pos).min(HASH_CHUNK) as usize;
            fa.read_exact_at(&mut ba[..n], pos).map_err(io(a))?;
            fb.read_exact_at(&mut bb[..n], pos).map_err(io(b))?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
            pos += n as u64;
        }
    }
    Ok(true)
}

/// The region of `f` (`len` bytes long) that starts at `pos`: whether it
/// is data (else a hole) and where it ends. A filesystem without holes
/// reports the whole file as data (the kernel's generic lseek); ENXIO
/// means no data after `pos`.
fn region(f: &fs::File, path: &Path, pos: u64, len: u64) -> Result<(bool, u64), MigrateError> {
    use rustix::fs::SeekFrom;
    let seek = |whence: SeekFrom| match rustix::fs::seek(f, whence) {
        Ok(p) => Ok(p.min(len)),
        Err(rustix::io::Errno::NXIO) => Ok(len),
        Err(e) => Err(io(path)(e.into())),
    };
    let data = seek(SeekFrom::Data(pos))?;
    if data > pos {
        return Ok((false, data));
    }
    // Past `pos` at least: a file can end in data only at `len`.
    Ok((true, seek(SeekFrom::Hole(pos))?.max(pos + 1).min(len)))
}

/// Fills in the sha256 of every moved regular file, reading it from where
/// it now lives (`state` is the top of the state subvolumes; record paths
/// are in [`encode_path`] form). This is the one part of a move whose cost
/// grows with data size, kept as its own step.
pub fn hash_moved(
    files: &mut [MovedFile],
    state: &Path,
    interrupt: &Interrupt,
) -> Result<(), MigrateError> {
    for f in files.iter_mut().filter(|f| f.file_type == FileType::File) {
        f.sha256 = Some(hash(&state_path(state, &f.path)?, interrupt)?);
    }
    Ok(())
}

/// Where a record's path (`/var/lib/x`, [`encode_path`] form) lives under
/// `state` (the top of the state subvolumes).
fn state_path(state: &Path, encoded: &str) -> Result<PathBuf, MigrateError> {
    crate::pathenc::path_below(state, encoded).map_err(|source| MigrateError::Io {
        path: PathBuf::from(encoded),
        source,
    })
}

/// Zeros fed to the hash for a hole: static, so a hole costs no read and
/// no memory traffic beyond this buffer.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
/// Bytes hashed between two looks at the interrupt flag.
const HASH_CHUNK: u64 = 1 << 20;

/// The sha256 of the file's bytes (what `sha256sum` prints for it in the
/// booted system), following its extents: data ranges (`SEEK_DATA` to
/// `SEEK_HOLE`) are read, holes are hashed as the zeros they read as,
/// without reading them. A sparse file of a terabyte is still a terabyte of
/// input to sha256 (its compression function has no shortcut over a run of
/// zeros), so the interrupt is looked at every [`HASH_CHUNK`] bytes.
pub(crate) fn hash(path: &Path, interrupt: &Interrupt) -> Result<String, MigrateError> {
    use std::os::unix::fs::FileExt;
    let f = open_nofollow(path)?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK as usize];
    let mut pos = 0;
    while pos < len {
        let (data, end) = region(&f, path, pos, len)?;
        while pos < end {
            if interrupt.raised() {
                return Err(MigrateError::Interrupted);
            }
            let n = (end - pos).min(HASH_CHUNK) as usize;
            if data {
                let got = f.read_at(&mut buf[..n], pos).map_err(io(path))?;
                if got == 0 {
                    // Shorter than its size said: it changed under us.
                    return Err(MigrateError::Io {
                        path: path.to_owned(),
                        source: std::io::Error::other(format!(
                            "ended at byte {pos} of {len} while it was hashed"
                        )),
                    });
                }
                h.update(&buf[..got]);
                pos += got as u64;
            } else {
                let mut left = n;
                while left > 0 {
                    let k = left.min(ZEROS.len());
                    h.update(&ZEROS[..k]);
                    left -= k;
                }
                pos += n as u64;
            }
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Extended attributes (incl. ACLs and security.*) of `path` itself, sorted.
pub fn xattrs(path: &Path) -> Result<Xattrs, MigrateError> {
    let err = |e: rustix::io::Errno| MigrateError::Io {
        path: path.to_owned(),
        source: e.into(),
    };
    let len = rustix::fs::llistxattr_query(path).map_err(err)?;
    let mut names = vec![0u8; len];
    let n = rustix::fs::llistxattr(path, &mut names[..]).map_err(err)?;
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::ffi::CString::new(name).expect("split on NUL");
        let vlen = rustix::fs::lgetxattr_query(path, &name).map_err(err)?;
        let mut value = vec![0u8; vlen];
        let n = rustix::fs::lgetxattr(path, &name, &mut value[..]).map_err(err)?;
        value.truncate(n);
        out.push((name.into_bytes(), value));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("sub/f"), b"same bytes").unwrap();
        fs::hard_link(a.join("sub/f"), a.join("link")).unwrap();
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(&a)
            .arg(&b)
            .status()
            .unwrap();
        assert!(cp.success());
        (t, a, b)
    }

    #[test]
    fn identical_copy_verifies() {
        let (_t, a, b) = pair();
        let moved = verify(&a, &b, "/x", &Interrupt::default()).unwrap();
        let paths: Vec<&str> = moved.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/x/link", "/x/sub", "/x/sub/f"]);
    }

    #[test]
    fn hardlink_groups_and_xattrs_are_recorded() {
        let (_t, a, b) = pair();
        let moved = verify(&a, &b, "/x", &Interrupt::default()).unwrap();
        let link = |p: &str| moved.iter().find(|f| f.path == p).unwrap().hardlink.clone();
        assert_eq!(link("/x/link").as_deref(), Some("/x/link"));
        assert_eq!(link("/x/sub/f").as_deref(), Some("/x/link"));
        assert_eq!(link("/x/sub"), None);
        let x: Xattrs = vec![(b"security.capability".to_vec(), vec![0x01, 0xab])];
        assert_eq!(xattrs_record(&x)["security.capability"], "01ab");
    }

    #[test]
    fn changed_byte_mode_or_link_is_caught() {
        let (_t, a, b) = pair();
        fs::write(b.join("sub/f"), b"same bytez").unwrap();
        fs::hard_link(b.join("sub/f"), b.join("link2")).unwrap();
        fs::remove_file(b.join("link2")).unwrap();
        let e = verify(&a, &b, "/x", &Interrupt::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/") && e.contains("differs"), "{e}");

        let (_t, a, b) = pair();
        fs::set_permissions(b.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
        let e = verify(&a, &b, "/x", &Interrupt::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/sub: mode differs"), "{e}");

        let (_t, a, b) = pair();
        fs::remove_file(b.join("link")).unwrap();
        fs::copy(b.join("sub/f"), b.join("link")).unwrap();
        let e = verify(&a, &b, "/x", &Interrupt::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs"), "{e}");
    }

    /// The extent-following hash is the sha256 of every byte: data, holes
    /// between data, a leading and a trailing hole, data across a chunk
    /// boundary, and an empty file.
    #[test]
    fn extent_following_hash_equals_the_hash_of_all_bytes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("sparse");
        let f = fs::File::create(&p).unwrap();
        use std::os::unix::fs::FileExt;
        let mut data = vec![0u8; (3 << 20) + 123];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 + 1) as u8;
        }
        // Leading hole (1 MiB + 5), data, hole, data past a chunk boundary.
        f.write_at(&data[..4096], (1 << 20) + 5).unwrap();
        f.write_at(&data, 16 << 20).unwrap();
        // A trailing hole.
        f.set_len(40 << 20).unwrap();
        drop(f);
        let bytes = fs::read(&p).unwrap();
        let want = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(hash(&p, &Interrupt::default()).unwrap(), want);
        // The file really has holes here (else the test proves less).
        let allocated = fs::metadata(&p).unwrap().blocks() * 512;
        assert!(allocated < bytes.len() as u64 / 2, "{allocated}");

        let empty = t.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert_eq!(
            hash(&empty, &Interrupt::default()).unwrap(),
            format!("{:x}", Sha256::digest(b""))
        );
        let all_hole = t.path().join("hole");
        fs::File::create(&all_hole)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        assert_eq!(
            hash(&all_hole, &Interrupt::default()).unwrap(),
            format!("{:x}", Sha256::digest(vec![0u8; 3 << 20]))
        );
    }

    #[test]
    fn a_raised_interrupt_stops_the_hash() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("big");
        fs::File::create(&p).unwrap().set_len(1 << 40).unwrap();
        let interrupt = Interrupt::default();
        interrupt.raise();
        assert!(matches!(
            hash(&p, &interrupt),
            Err(MigrateError::Interrupted)
        ));
    }

    /// A copy that is not a reflink (the rootless staging on another
    /// filesystem) is compared range by range: holes in both are skipped,
    /// a hole against zeros written out is equal, one changed byte is not,
    /// and a raised interrupt stops the comparison.
    #[test]
    fn byte_comparison_follows_the_holes() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let fa = fs::File::create(&a).unwrap();
        fa.write_at(b"data", 5 << 20).unwrap();
        fa.set_len(1 << 40).unwrap();
        let fb = fs::File::create(&b).unwrap();
        fb.write_at(b"data", 5 << 20).unwrap();
        // Zeros written out where a has a hole.
        fb.write_at(&[0u8; 8192], 1 << 20).unwrap();
        fb.set_len(1 << 40).unwrap();
        let none = Interrupt::default();
        assert!(same_content(&a, &b, 1 << 40, &none).unwrap());
        fb.write_at(b"x", (1 << 20) + 100).unwrap();
        assert!(!same_content(&a, &b, 1 << 40, &none).unwrap());
        let raised = Interrupt::default();
        raised.raise();
        assert!(matches!(
            same_content(&a, &b, 1 << 40, &raised),
            Err(MigrateError::Interrupted)
        ));
    }
}
