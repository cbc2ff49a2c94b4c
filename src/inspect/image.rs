//! Opening an image read-only: superblock check without any tool, then a
//! read-only loop device and a read-only mount of the top-level subvolume
//! (subvolid=5, whatever the default subvolume is). Both are undone on drop.

use super::scan;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use strata_builder::image::model::{Filesystem, Subvolume};
use strata_builder::{cmd, loopdev::LoopDevice, mount::Mount};

/// The primary superblock's offset and the fields read from it.
const SUPERBLOCK: u64 = 0x10000;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
const MAGIC_AT: usize = 0x40;
const FSID_AT: usize = 0x20;
const LABEL_AT: usize = 0x12b;
const LABEL_LEN: usize = 256;

/// Bad input (exit 2) versus trouble with the tools (exit 3).
#[derive(Debug)]
pub enum OpenError {
    BadInput(String),
    Infra(anyhow::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::BadInput(m) => f.write_str(m),
            OpenError::Infra(e) => write!(f, "{e:#}"),
        }
    }
}

/// Reads the btrfs superblock of an image file or block device.
pub fn read_superblock(image: &Path) -> Result<Filesystem, OpenError> {
    let bad = |m: String| OpenError::BadInput(m);
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
pub struct Opened {
    pub filesystem: Filesystem,
    pub subvolumes: Vec<Subvolume>,
    mount: Option<Mount>,
    device: Option<LoopDevice>,
}

impl Opened {
    pub fn top(&self) -> &Path {
        self.mount.as_ref().expect("mounted until closed").path()
    }

    /// Unmounts and detaches now, reporting failures.
    pub fn close(mut self) -> anyhow::Result<()> {
        if let Some(m) = self.mount.take() {
            m.unmount()?;
        }
        if let Some(d) = self.device.take() {
            d.detach()?;
        }
        Ok(())
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        // Order matters: the mount goes before its loop device.
        drop(self.mount.take());
        drop(self.device.take());
    }
}

pub fn open(image: &Path) -> Result<Opened, OpenError> {
    let filesystem = read_superblock(image)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(OpenError::BadInput(format!(
            "strata inspect must run as root (uid {euid}): it attaches a read-only \
             loop device and mounts the image read-only"
        )));
    }
    let infra = |e: anyhow::Error| OpenError::Infra(e);
    let is_block = std::fs::metadata(image)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let device = if is_block {
        None
    } else {
        Some(LoopDevice::attach(image, true).map_err(|e| {
            infra(anyhow::Error::new(e).context("attaching a read-only loop device"))
        })?)
    };
    let dev_path = device
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_else(|| image.to_path_buf());
    // A filesystem with a dirty log tree cannot be mounted from a read-only
    // device without skipping log replay.
    let mount = match Mount::btrfs(&dev_path, "ro,subvolid=5") {
        Ok(m) => m,
        Err(first) => {
            Mount::btrfs(&dev_path, "ro,subvolid=5,rescue=nologreplay").map_err(|_| {
                infra(
                    anyhow::Error::new(first)
                        .context(format!("mounting {} read-only", image.display())),
                )
            })?
        }
    };
    let mut opened = Opened {
        filesystem,
        subvolumes: Vec::new(),
        mount: Some(mount),
        device,
    };
    let list = cmd::run_args(
        "btrfs",
        [
            "subvolume".as_ref(),
            "list".as_ref(),
            "-puq".as_ref(),
            opened.top().as_os_str(),
        ],
    )
    .map_err(|e| infra(anyhow::Error::new(e).context("listing subvolumes")))?;
    let readonly = cmd::run_args(
        "btrfs",
        [
            "subvolume".as_ref(),
            "list".as_ref(),
            "-r".as_ref(),
            opened.top().as_os_str(),
        ],
    )
    .map(|t| {
        scan::parse_subvolume_list(&t)
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    })
    .unwrap_or_default();
    let mut subvolumes = scan::parse_subvolume_list(&list);
    for s in &mut subvolumes {
        s.readonly = readonly.contains(&s.id);
    }
    opened.subvolumes = subvolumes;
    Ok(opened)
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
        assert!(matches!(read_superblock(&img), Err(OpenError::BadInput(_))));
        assert!(matches!(
            read_superblock(&d.path().join("missing")),
            Err(OpenError::BadInput(_))
        ));
        assert!(matches!(
            read_superblock(d.path()),
            Err(OpenError::BadInput(_))
        ));
    }
}
