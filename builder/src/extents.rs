//! A file's physical extents (FS_IOC_FIEMAP). Two files whose data extents
//! are the same physical ranges hold the same bytes: that is how a reflinked
//! copy is verified without reading it.

use std::fs::File;
use std::os::fd::AsRawFd;

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Not yet on disk, or no physical address to report.
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
/// Referenced from elsewhere too (another file, a snapshot).
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Data stored inside metadata (small files): never shared, compare bytes.
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
const BATCH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct RawFiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// The file's extents, or None when some of its data is inline or unaligned
/// (those bytes have no physical range of their own to compare).
pub fn extents(file: &File) -> std::io::Result<Option<Vec<Extent>>> {
    let mut out = Vec::new();
    let mut inline = false;
    each_extent(file, |e| {
        if e.flags & (FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED) != 0 {
            inline = true;
            return false;
        }
        out.push(Extent {
            logical: e.logical,
            physical: e.physical,
            length: e.length,
        });
        true
    })?;
    Ok((!inline).then_some(out))
}

/// A data extent on disk, and whether the filesystem says something else
/// references it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataExtent {
    pub physical: u64,
    pub length: u64,
    pub shared: bool,
}

/// The file's extents that have a physical range of their own: inline and
/// unaligned data (kept in metadata) and extents not yet on disk are left
/// out.
pub fn data_extents(file: &File) -> std::io::Result<Vec<DataExtent>> {
    let skip = FIEMAP_EXTENT_DATA_INLINE
        | FIEMAP_EXTENT_NOT_ALIGNED
        | FIEMAP_EXTENT_UNKNOWN
        | FIEMAP_EXTENT_DELALLOC;
    let mut out = Vec::new();
    each_extent(file, |e| {
        if e.flags & skip == 0 {
            out.push(DataExtent {
                physical: e.physical,
                length: e.length,
                shared: e.flags & FIEMAP_EXTENT_SHARED != 0,
            });
        }
        true
    })?;
    Ok(out)
}

/// Calls `f` with each extent of the file, in order, until it returns false.
fn each_extent(file: &File, mut f: impl FnMut(&RawExtent) -> bool) -> std::io::Result<()> {
    let mut start = 0u64;
    loop {
        let mut map = RawFiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `map` is a properly laid out struct fiemap with room for
        // `extent_count` extents, alive for the duration of the call.
        let rc =
            unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map as *mut RawFiemap) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = map.mapped_extents as usize;
        if n == 0 {
            return Ok(());
        }
        for e in &map.extents[..n] {
            if !f(e) {
                return Ok(());
            }
        }
        let last = map.extents[n - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(());
        }
        start = last.logical + last.length;
    }
}
