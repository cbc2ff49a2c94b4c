//! Paths inside an untrusted root filesystem.
//!
//! Every lookup goes through openat2(RESOLVE_IN_ROOT): `..` stops at the
//! rootfs top and absolute symlinks are taken relative to it, exactly as they
//! would be for a process chrooted there. So `etc/fstab -> /etc/fstab` means
//! the rootfs's own file, never the host's.

use rustix::fs::{openat2, statat, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("{path} in rootfs {root}: {source}")]
pub struct RootfsError {
    pub root: String,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

impl RootDir {
    pub fn open(path: &Path) -> std::io::Result<RootDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RootDir {
            fd,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, path: &str, source: impl Into<std::io::Error>) -> RootfsError {
        RootfsError {
            root: self.path.display().to_string(),
            path: path.to_owned(),
            source: source.into(),
        }
    }

    fn resolve(&self, path: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        openat2(
            &self.fd,
            path,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
    }

    /// Opens a regular file for reading; Ok(None) when nothing is there.
    ///
    /// The file is looked at before it is opened: resolved with O_PATH
    /// (which opens nothing), checked to be a regular file, and only then
    /// reopened for reading through `/proc/self/fd`, so the reopen reaches
    /// the very inode that was checked. A fifo would block an open forever
    /// and a device node would reach the host's hardware: both are refused,
    /// never opened.
    pub fn open_file(&self, path: &str) -> Result<Option<File>, RootfsError> {
        let fd = match self.resolve(path, OFlags::PATH) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.err(path, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.err(path, e))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::RegularFile {
            return Err(self.err(
                path,
                std::io::Error::other(format!(
                    "not a regular file ({}): refusing to open it",
                    describe_type(kind)
                )),
            ));
        }
        let reopened = rustix::fs::open(
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.err(path, e))?;
        Ok(Some(File::from(reopened)))
    }

    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>, RootfsError> {
        let Some(mut f) = self.open_file(path)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| self.err(path, e))?;
        Ok(Some(buf))
    }

    /// Opens a directory inside the rootfs (following links within it);
    /// Ok(None) when there is no directory at `path`.
    pub fn open_dir(&self, path: &str) -> Result<Option<OwnedFd>, RootfsError> {
        match self.resolve(path, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
            Err(e) => Err(self.err(path, e)),
        }
    }

    /// What is at `path` inside the rootfs (symlinks followed within it;
    /// the last one too when `follow`); Ok(None) when nothing is there.
    /// Nothing is opened but an O_PATH handle, so a fifo or device is safe.
    pub fn stat(&self, path: &str, follow: bool) -> Result<Option<rustix::fs::Stat>, RootfsError> {
        let flags = if follow {
            OFlags::PATH
        } else {
            OFlags::PATH | OFlags::NOFOLLOW
        };
        match self.resolve(path, flags) {
            Ok(fd) => rustix::fs::fstat(&fd)
                .map(Some)
                .map_err(|e| self.err(path, e)),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
            Err(e) => Err(self.err(path, e)),
        }
    }

    /// The target of the symlink at `path` (its parents resolved within the
    /// rootfs); Ok(None) when there is no symlink there.
    pub fn read_link(&self, path: &str) -> Result<Option<PathBuf>, RootfsError> {
        use std::os::unix::ffi::OsStringExt;
        let fd = match self.resolve(path, OFlags::PATH | OFlags::NOFOLLOW) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(self.err(path, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.err(path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
            return Ok(None);
        }
        // An empty path reads the link an O_PATH|O_NOFOLLOW handle names.
        let target = rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(|e| self.err(path, e))?;
        Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(
            target.into_bytes(),
        ))))
    }

    /// Opens a directory by a path that crosses no symlink at all, not
    /// even one pointing inside the rootfs: where one would be followed the
    /// lookup fails (ELOOP), and a non-directory at the end fails (ENOTDIR)
    /// without being opened. For paths whose meaning a symlink would change
    /// (a mountpoint is looked up from its tree's root, not the rootfs's).
    pub fn open_dir_no_symlinks(&self, path: &str) -> rustix::io::Result<OwnedFd> {
        openat2(
            &self.fd,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    }

    /// Names in a directory inside the rootfs.
    pub fn list_dir(&self, path: &str) -> Result<Vec<String>, RootfsError> {
        let Some(fd) = self.open_dir(path)? else {
            return Ok(Vec::new());
        };
        let dir = rustix::fs::Dir::read_from(&fd).map_err(|e| self.err(path, e))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| self.err(path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The type of a top-level entry (`name` is one component), without
    /// following it if it is a symlink.
    pub fn top_level_type(&self, name: &str) -> Result<Option<FileType>, RootfsError> {
        debug_assert!(!name.contains('/'));
        match statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }
}

fn describe_type(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a fifo",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of unknown type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fifo where strata reads a file would block `open` forever; it must
    /// be refused at once, and named.
    #[test]
    fn fifos_and_devices_are_refused_without_being_opened() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("etc/fstab"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::fs::write(d.path().join("etc/hostname"), "box\n").unwrap();
        let root = RootDir::open(d.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = root
                .read("etc/fstab")
                .map(|_| ())
                .map_err(|e| e.to_string());
            let ok = root.read("etc/hostname").unwrap();
            tx.send((r, ok)).unwrap();
        });
        let (fifo, hostname) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a fifo in the rootfs must not block");
        let e = fifo.unwrap_err();
        assert!(e.contains("etc/fstab") && e.contains("a fifo"), "{e}");
        assert_eq!(hostname.as_deref(), Some(&b"box\n"[..]));
    }
}
