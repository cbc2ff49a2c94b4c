//! A loop device that goes away with strata, whatever way strata ends.
//!
//! The device is configured in one ioctl (`LOOP_CONFIGURE`) with
//! `LO_FLAGS_AUTOCLEAR`, through a file descriptor strata keeps open for as
//! long as it uses the device. Autoclear makes the kernel detach the device
//! on its last close: while strata only holds the descriptor (between
//! attach and mount, and between unmount and detach) that is strata's
//! exit, SIGKILL included; while the image is mounted it is the unmount.
//! `losetup --find --show` then `losetup -d` left a device no one would
//! ever close when strata was killed in between (issue 22, item 3), and
//! `losetup` has no option to set autoclear.
//!
//! Detaching is closing the descriptor: the kernel does the rest.

use crate::host::stop_point;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

// <linux/loop.h>
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

/// How many times a free device is looked for again when another process
/// configured it between `LOOP_CTL_GET_FREE` and our `LOOP_CONFIGURE`.
const ATTACH_TRIES: u32 = 20;

#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    /// The descriptor that keeps the device bound; closing it (drop, or the
    /// kernel when strata dies) detaches the device once no mount uses it.
    fd: Option<File>,
    /// sysfs `backing_file` as the device had it when attached: when it is
    /// gone (or names another file) the device is detached.
    backing: String,
}

fn with_path(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl LoopDevice {
    /// Binds a free loop device to `image`, autoclear set from the start.
    pub fn attach(image: &Path, read_only: bool) -> io::Result<LoopDevice> {
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image)
            .map_err(with_path(format!("opening {}", image.display())))?;
        let control = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(with_path("opening /dev/loop-control".into()))?;
        let mut info = zeroed_info();
        info.lo_flags = LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
        // What `losetup -a` shows; sysfs shows the real path anyway.
        let name = image.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        let mut last = None;
        for _ in 0..ATTACH_TRIES {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(with_path("finding a free loop device".into())(
                    io::Error::last_os_error(),
                ));
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = match open_device(&path) {
                Ok(d) => d,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            // SAFETY: `config` is a valid loop_config that outlives the call.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
            if r == 0 {
                let backing = std::fs::read_to_string(sysfs_backing(&path))
                    .unwrap_or_default()
                    .trim_end()
                    .to_owned();
                let device = LoopDevice {
                    path,
                    fd: Some(dev),
                    backing,
                };
                // The window a SIGKILL used to leave a device in: bound,
                // not yet mounted.
                stop_point::stop_point(stop_point::LOOP_ATTACHED);
                return Ok(device);
            }
            let e = io::Error::last_os_error();
            // Another process took this device first: look again.
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(with_path(format!(
                    "binding {} to {}",
                    path.display(),
                    image.display()
                ))(e));
            }
            last = Some(e);
        }
        Err(with_path(format!(
            "no free loop device for {} after {ATTACH_TRIES} tries",
            image.display()
        ))(last.unwrap_or_else(|| {
            io::Error::from_raw_os_error(libc::EBUSY)
        })))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches now: closes strata's descriptor (the mount must be gone
    /// already) and waits for the kernel to let go of the file.
    pub fn detach(mut self) -> io::Result<()> {
        // The other window: unmounted, still bound.
        stop_point::stop_point(stop_point::LOOP_UNMOUNTED);
        self.release();
        Ok(())
    }

    fn release(&mut self) {
        if self.fd.take().is_none() {
            return;
        }
        // Autoclear detaches on the last close: ours, unless something
        // (udev's probe, a lazily detached mount) still has the device open;
        // then a moment later. Callers (and the next run's checks) expect it
        // gone, so wait a little. A device number freed may at once be
        // bound again by another process: "gone" is "not our file".
        let sysfs = sysfs_backing(&self.path);
        for _ in 0..40 {
            match std::fs::read_to_string(&sysfs) {
                Ok(b) if b.trim_end() == self.backing => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!(
            "{} still has its backing file after strata let go of it: the kernel detaches it when its last user closes it",
            self.path.display()
        );
    }
}

/// The new device's node can lag its number by a moment.
fn open_device(path: &Path) -> io::Result<File> {
    let mut tries = 0;
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.map_err(with_path(format!("opening {}", path.display()))),
        }
    }
}

fn sysfs_backing(dev: &Path) -> PathBuf {
    let name = dev.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name).join("loop/backing_file")
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        self.release();
    }
}

/// The device and inode of the file a bound loop device reads, as
/// `stat(2)` gives them (`LOOP_GET_STATUS64`; needs the right to open the
/// device).
pub fn backing_id(dev: &Path) -> io::Result<(u64, u64)> {
    // Read-only, and no write ever: a close after a writable open makes
    // udev probe the device again.
    let f = File::open(dev)?;
    let mut info = zeroed_info();
    // SAFETY: `info` is a valid loop_info64 the kernel fills.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((kernel_dev_to_user(info.lo_device), info.lo_inode))
}

/// The kernel's `huge_encode_dev` → glibc's `makedev` (what `st_dev` is).
pub fn kernel_dev_to_user(dev: u64) -> u64 {
    let major = ((dev & 0xfff00) >> 8) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    libc::makedev(major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_device_numbers_read_as_stat_gives_them() {
        // 259:70000 (an NVMe partition with a large minor) and 0:45 (a
        // btrfs subvolume's anonymous device).
        let enc = |major: u64, minor: u64| (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        assert_eq!(
            kernel_dev_to_user(enc(259, 70000)),
            libc::makedev(259, 70000)
        );
        assert_eq!(kernel_dev_to_user(enc(0, 45)), libc::makedev(0, 45));
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    /// The kernel detaches the device when strata lets go of it: autoclear
    /// is set from the attach on, and the device reads the right file.
    #[test]
    fn attached_with_autoclear_and_gone_when_released() {
        use std::os::unix::fs::MetadataExt;
        assert!(
            rustix::process::geteuid().is_root(),
            "this test attaches a loop device: run it as root (ci/test does)"
        );
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let dev = LoopDevice::attach(&img, true).unwrap();
        let sys = Path::new("/sys/block").join(dev.path().file_name().unwrap());
        let flag = |f: &str| std::fs::read_to_string(sys.join("loop").join(f)).unwrap();
        assert_eq!(flag("autoclear").trim(), "1");
        assert_eq!(std::fs::read_to_string(sys.join("ro")).unwrap().trim(), "1");
        let md = std::fs::metadata(&img).unwrap();
        assert_eq!(backing_id(dev.path()).unwrap(), (md.dev(), md.ino()));
        let backing = sys.join("loop/backing_file");
        let path = dev.path().to_owned();
        dev.detach().unwrap();
        let now = std::fs::read_to_string(&backing).unwrap_or_default();
        assert!(
            !now.starts_with(&*d.path().to_string_lossy()),
            "{} still bound to {now}",
            path.display()
        );
    }
}
