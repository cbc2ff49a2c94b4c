//! Replacing `etc/fstab` inside the untrusted rootfs copy: the directory is
//! resolved inside the rootfs, the new file is written next to the old one
//! and renamed over it, so a crash leaves either the old or the new file and
//! a symlinked fstab is replaced rather than followed out of the rootfs.

use crate::rootfs::{RootDir, RootfsError};
use rustix::fs::{Gid, Mode, OFlags, Uid};
use std::io::Write;
use std::os::unix::fs::MetadataExt;

#[derive(Debug, thiserror::Error)]
pub enum EtcFileError {
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Replaces `etc/<name>` with `contents`, keeping the old file's mode and
/// owner, or 0644 root:root for a new file.
pub fn replace(root: &RootDir, name: &str, contents: &[u8]) -> Result<(), EtcFileError> {
    let path = format!("etc/{name}");
    let (mode, uid, gid) = match root.open_file(&path)? {
        Some(f) => {
            let m = f
                .metadata()
                .map_err(|e| EtcFileError::Io(path.clone(), e))?;
            (m.mode() & 0o7777, m.uid(), m.gid())
        }
        None => (0o644, 0, 0),
    };
    let etc = root
        .open_dir("etc")?
        .ok_or_else(|| EtcFileError::Io("etc".into(), std::io::ErrorKind::NotFound.into()))?;
    let tmp = format!(".{name}.strata-new");
    let io = |e: rustix::io::Errno| EtcFileError::Io(format!("etc/{tmp}"), e.into());
    let _ = rustix::fs::unlinkat(&etc, tmp.as_str(), rustix::fs::AtFlags::empty());
    let fd = rustix::fs::openat(
        &etc,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io)?;
    let mut file = std::fs::File::from(fd);
    let write = (|| {
        file.write_all(contents)?;
        rustix::fs::fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
        // No fsync: the build syncs the whole filesystem before unmounting.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(std::io::Error::from)
    })();
    if let Err(e) = write {
        let _ = rustix::fs::unlinkat(&etc, tmp.as_str(), rustix::fs::AtFlags::empty());
        return Err(EtcFileError::Io(format!("etc/{tmp}"), e));
    }
    rustix::fs::renameat(&etc, tmp.as_str(), &etc, name).map_err(io)
}
