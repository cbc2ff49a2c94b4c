//! Opening an image: superblock check without any tool, then a loop device
//! and a mount of the top-level subvolume (subvolid=5, whatever the default
//! subvolume is). Both are undone on drop, the mount first.
//!
//! Read-only is for looking (`strata inspect`, expectations of a foreign
//! image); read-write is for changing an image in place (an upgrade).
//!
//! Opening takes no lock: the command does, once for its whole run
//! (`crate::lock`), as an open of its own would conflict with it.

use super::{lint, read, subvolumes, ImageError};
use crate::host::interrupt::Interrupt;
use crate::host::{loopdev::LoopDevice, mount::Mount};
use crate::model::{Filesystem, ImageLayout, Lint, Subvolume};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The primary superblock's offset and the fields read from it.
const SUPERBLOCK: u64 = 0x10000;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
const MAGIC_AT: usize = 0x40;
const FSID_AT: usize = 0x20;
const LABEL_AT: usize = 0x12b;
const LABEL_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read-only loop device and mount: the image is not written, not even
    /// by log replay.
    ReadOnly,
    /// Writable loop device and mount, for changes in place.
    ReadWrite,
}

/// Reads the btrfs superblock of an image file or block device.
pub fn read_superblock(image: &Path) -> Result<Filesystem, ImageError> {
    let bad = |m: String| ImageError::Input(m);
    let mut f = std::fs::File::open(image).map_err(|e| bad(format!("{}: {e}", image.display())))?;
    let md = f
        .metadata()
        .map_err(|e| bad(format!("{}: {e}", image.display())))?;
    if !(md.is_file() || md.file_type().is_block_device()) {
        return Err(bad(format!(
            "{}: not an image file or block device",
            image.display()
        )));
    }
    let mut sb = vec![0u8; LABEL_AT + LABEL_LEN];
    let read = f
        .seek(SeekFrom::Start(SUPERBLOCK))
        .and_then(|_| f.read_exact(&mut sb));
    if read.is_err() || &sb[MAGIC_AT..MAGIC_AT + 8] != MAGIC {
        return Err(bad(format!(
            "{}: not a Btrfs filesystem (no superblock magic at 64 KiB; \
             a partitioned disk is not a strata whole-disk image)",
            image.display()
        )));
    }
    let id = &sb[FSID_AT..FSID_AT + 16];
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let label_bytes = &sb[LABEL_AT..LABEL_AT + LABEL_LEN];
    let end = label_bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(LABEL_LEN);
    let label = String::from_utf8_lossy(&label_bytes[..end]).into_owned();
    Ok(Filesystem {
        uuid,
        label: (!label.is_empty()).then_some(label),
    })
}

/// A mounted image; unmounted and detached when dropped (mount first).
pub struct OpenImage {
    pub filesystem: Filesystem,
    /// What a killed strata had left mounted on this image, cleaned before
    /// opening it (for the caller to report).
    pub cleaned: Vec<crate::host::debris::Cleaned>,
    /// As listed when the image was opened.
    pub subvolumes: Vec<Subvolume>,
    path: PathBuf,
    mode: Mode,
    mount: Option<Mount>,
    device: Option<LoopDevice>,
    /// Instead of the loop mount, for a user who is not root: the image
    /// served read-only by the libguestfs appliance (`open_to_read`).
    appliance: Option<super::appliance::Session>,
}

impl OpenImage {
    /// The mounted top-level subvolume.
    pub fn top(&self) -> &Path {
        match (&self.mount, &self.appliance) {
            (Some(m), _) => m.path(),
            (None, Some(a)) => a.path(),
            (None, None) => unreachable!("mounted until closed"),
        }
    }

    /// The image as given to `open`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The image's layout as it is now.
    pub fn layout(&self) -> ImageLayout {
        read::layout(
            self.top(),
            &self.path.display().to_string(),
            self.filesystem.clone(),
            self.subvolumes.clone(),
        )
    }

    /// Every mountpoint of every version's orig and run checked for hidden
    /// files. Refused on an image without the layout: there is nothing to
    /// check, and "clean" would be a lie.
    pub fn lint(&self) -> Result<Lint, ImageError> {
        let shown = self.path.display().to_string();
        // Looked at, not followed: lint never follows a symlink in the
        // image, so a `systems` symlink (maybe out of it) is no layout.
        let systems_is_dir = crate::rootfs::RootDir::open(self.top())
            .ok()
            .and_then(|r| r.stat(crate::layout::SYSTEMS_DIR, false).ok().flatten())
            .is_some_and(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
            });
        if !systems_is_dir {
            return Err(ImageError::Input(format!(
                "{shown}: no {}/ directory at the top level: not a strata system layout",
                crate::layout::SYSTEMS_DIR
            )));
        }
        Ok(lint::mountpoints(self.top(), &shown, &self.subvolumes))
    }

    /// Unmounts and detaches now, reporting failures (drop can only log
    /// them).
    pub fn close(mut self) -> Result<(), ImageError> {
        let what = match self.mode {
            Mode::ReadOnly => "cleaning up the read-only mount",
            Mode::ReadWrite => "cleaning up the mount",
        };
        if let Some(m) = self.mount.take() {
            m.unmount().map_err(|e| ImageError::tool(what, e))?;
        }
        if let Some(d) = self.device.take() {
            d.detach().map_err(|e| ImageError::tool(what, e))?;
        }
        if let Some(a) = self.appliance.take() {
            a.close()?;
        }
        Ok(())
    }
}

impl Drop for OpenImage {
    fn drop(&mut self) {
        // Order matters: the mount goes before its loop device.
        drop(self.mount.take());
        drop(self.device.take());
        drop(self.appliance.take());
    }
}

/// Opens an image for reading, as whoever runs strata can: root gets the
/// read-only loop mount (`open`, the fastest); anyone else the libguestfs
/// appliance serving the image over FUSE (`appliance`), read by the same
/// code. `interrupt` stops the appliance while it starts.
pub fn open_to_read(image: &Path, interrupt: &Interrupt) -> Result<OpenImage, ImageError> {
    if rustix::process::geteuid().is_root() {
        return open(image, Mode::ReadOnly);
    }
    let filesystem = read_superblock(image)?;
    let (session, subvolumes, cleaned) =
        super::appliance::open(image, crate::host::guestfish::Accel::default(), interrupt)?;
    Ok(OpenImage {
        filesystem,
        cleaned,
        subvolumes,
        path: image.to_path_buf(),
        mode: Mode::ReadOnly,
        mount: None,
        device: None,
        appliance: Some(session),
    })
}

/// Opens an image file or block device: checks it is Btrfs, attaches a
/// loop device (files only) and mounts the top-level subvolume.
pub fn open(image: &Path, mode: Mode) -> Result<OpenImage, ImageError> {
    let filesystem = read_superblock(image)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(ImageError::Input(format!(
            "strata must run as root (uid {euid}) to open an image: it attaches a {} \
             loop device and mounts the image {}",
            rw_words(mode).0,
            rw_words(mode).1,
        )));
    }
    let is_block = std::fs::metadata(image)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    // A strata killed with the image mounted left the mount (its pid is in
    // the mount dir's name) and its loop device: while they stay, a second
    // mount of the same filesystem fails. The next command cleans them.
    let cleaned = if is_block {
        Vec::new()
    } else {
        crate::host::debris::clean(&crate::host::debris::find_for_image(image))
    };
    // A writer holds the image's exclusive lock (`crate::lock`): a loop
    // device still bound to the file now is no strata's, and a second
    // read-write mount beside it would corrupt the filesystem (the kernel
    // mounts it as an independent copy).
    if mode == Mode::ReadWrite && !is_block {
        crate::lock::refuse_attached(image)?;
    }
    let device = if is_block {
        None
    } else {
        let read_only = mode == Mode::ReadOnly;
        Some(LoopDevice::attach(image, read_only).map_err(|e| {
            ImageError::tool(format!("attaching a {} loop device", rw_words(mode).0), e)
        })?)
    };
    let dev_path = device
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_else(|| image.to_path_buf());
    let mounting = |e| {
        ImageError::tool(
            format!("mounting {} {}", image.display(), rw_words(mode).1),
            e,
        )
    };
    // nodev/nosuid/noexec: the image's device nodes and binaries are data,
    // never usable on the host through this mount.
    let mount_with = |opts: &str| {
        let opts = format!("{opts},nodev,nosuid,noexec");
        if device.is_some() {
            Mount::btrfs_on_own_loop(&dev_path, &opts)
        } else {
            Mount::btrfs(&dev_path, &opts)
        }
    };
    let mount = match mode {
        // A filesystem with a dirty log tree cannot be mounted from a
        // read-only device without skipping log replay.
        Mode::ReadOnly => match mount_with("ro,subvolid=5") {
            Ok(m) => m,
            Err(first) => {
                mount_with("ro,subvolid=5,rescue=nologreplay").map_err(|_| mounting(first))?
            }
        },
        // Writing: the log is replayed as the kernel always does; skipping
        // it would lose the last fsynced writes. noatime: reading a file
        // (an upgrade compares every file of a snapshot) must not rewrite
        // its inode, which would unshare the metadata of the whole tree.
        Mode::ReadWrite => mount_with("subvolid=5,noatime").map_err(mounting)?,
    };
    let mut opened = OpenImage {
        filesystem,
        cleaned,
        subvolumes: Vec::new(),
        path: image.to_path_buf(),
        mode,
        mount: Some(mount),
        device,
        appliance: None,
    };
    opened.subvolumes = subvolumes::list(opened.top())?;
    Ok(opened)
}

/// How the loop device and the mount are described in messages.
fn rw_words(mode: Mode) -> (&'static str, &'static str) {
    match mode {
        Mode::ReadOnly => ("read-only", "read-only"),
        Mode::ReadWrite => ("writable", "read-write"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_fields() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        let mut data = vec![0u8; 0x10000 + 4096];
        data[0x10000 + MAGIC_AT..0x10000 + MAGIC_AT + 8].copy_from_slice(MAGIC);
        data[0x10000 + FSID_AT..0x10000 + FSID_AT + 16].copy_from_slice(&[
            0x7e, 0x8f, 0xa8, 0x0d, 0x1b, 0xbb, 0x4e, 0x94, 0xbb, 0x4e, 0xc0, 0x6a, 0x90, 0x3d,
            0xf5, 0x89,
        ]);
        data[0x10000 + LABEL_AT..0x10000 + LABEL_AT + 6].copy_from_slice(b"strata");
        std::fs::write(&img, &data).unwrap();
        let fs = read_superblock(&img).unwrap();
        assert_eq!(fs.uuid, "7e8fa80d-1bbb-4e94-bb4e-c06a903df589");
        assert_eq!(fs.label.as_deref(), Some("strata"));

        std::fs::write(&img, vec![0u8; 100]).unwrap();
        assert!(matches!(read_superblock(&img), Err(ImageError::Input(_))));
        assert!(matches!(
            read_superblock(&d.path().join("missing")),
            Err(ImageError::Input(_))
        ));
        assert!(matches!(
            read_superblock(d.path()),
            Err(ImageError::Input(_))
        ));
    }
}
