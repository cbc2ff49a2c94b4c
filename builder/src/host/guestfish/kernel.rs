//! The appliance's kernel, uncompressed. libguestfs boots the host's
//! `/boot/vmlinuz-*` under TCG, and there the kernel's own xz decompressor
//! is the slowest part of the boot: 7 s from QEMU's start to the first
//! kernel line, against 0.55 s for the same kernel handed over as the
//! uncompressed ELF `vmlinux` (QEMU starts it at its PVH entry point),
//! measured on a 2-core host (2026-12-06).
//!
//! So the kernel is decompressed once into strata's cache, keyed by the
//! vmlinuz file (path, size, mtime), and supermin is told to use it
//! (`SUPERMIN_KERNEL`, with its version and modules, which stay the host's).
//! The appliance supermin builds with it lives in its own libguestfs cache
//! directory next to it (`LIBGUESTFS_CACHEDIR`), never mixed with one
//! built around another kernel. Anything unexpected (another compression,
//! no PVH entry point, no `xz`, an unwritable cache) leaves libguestfs's
//! defaults: slower, never wrong.

use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The start of an xz stream (Debian compresses its kernels with xz).
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
/// ELF note type of the 32-bit PVH entry point, in notes named "Xen":
/// QEMU's `-kernel` starts an ELF kernel only through it.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What the user may have set to choose libguestfs's appliance: theirs
/// stays.
const USER_CHOICES: [&str; 3] = ["LIBGUESTFS_PATH", "LIBGUESTFS_CACHEDIR", "SUPERMIN_KERNEL"];

/// libguestfs's environment for the fast kernel, or nothing (its defaults).
pub fn environment(cache: &Path) -> Vec<(&'static str, OsString)> {
    if USER_CHOICES.iter().any(|v| std::env::var_os(v).is_some()) {
        return Vec::new();
    }
    match prepare(cache) {
        Ok(Some(k)) => vec![
            ("LIBGUESTFS_CACHEDIR", k.guestfs_cache.into_os_string()),
            ("SUPERMIN_KERNEL", k.vmlinux.into_os_string()),
            ("SUPERMIN_KERNEL_VERSION", k.version.into()),
            ("SUPERMIN_MODULES", k.modules.into_os_string()),
        ],
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::debug!(error = %e, "appliance kernel: libguestfs's default kernel");
            Vec::new()
        }
    }
}

struct Kernel {
    vmlinux: PathBuf,
    version: String,
    modules: PathBuf,
    guestfs_cache: PathBuf,
}

/// The kernel supermin would pick: the newest `/boot/vmlinuz-<version>`
/// that is readable and has `/lib/modules/<version>`.
fn host_kernel() -> Option<(PathBuf, String, PathBuf)> {
    let mut found: Vec<(String, PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            let modules = Path::new("/lib/modules").join(&version);
            (modules.is_dir() && std::fs::File::open(e.path()).is_ok())
                .then(|| (version, e.path(), modules))
        })
        .collect();
    found.sort_by(|a, b| version_cmp(&a.0, &b.0));
    let (version, path, modules) = found.pop()?;
    Some((path, version, modules))
}

/// Compares versions chunk by chunk, digits as numbers (6.10 > 6.9).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

fn prepare(cache: &Path) -> Result<Option<Kernel>, Box<dyn std::error::Error>> {
    let Some((vmlinuz, version, modules)) = host_kernel() else {
        return Ok(None);
    };
    let meta = std::fs::metadata(&vmlinuz)?;
    let key = {
        let mut h = Sha256::new();
        h.update(vmlinuz.as_os_str().as_encoded_bytes());
        h.update(meta.size().to_le_bytes());
        h.update(meta.mtime().to_le_bytes());
        h.update(meta.mtime_nsec().to_le_bytes());
        let d = h.finalize();
        d[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let parent = cache.join("appliance-kernel");
    let dir = parent.join(&key);
    let vmlinux = dir.join("vmlinux");
    let guestfs_cache = dir.join("guestfs");
    if !vmlinux.is_file() {
        let Some(elf) = decompress(&std::fs::read(&vmlinuz)?)? else {
            return Ok(None);
        };
        if !has_pvh_entry(&elf) {
            return Ok(None);
        }
        std::fs::create_dir_all(&dir)?;
        // Whole or not at all: written aside, then renamed (a concurrent
        // build writes the same bytes).
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        tmp.write_all(&elf)?;
        tmp.persist(&vmlinux)?;
        // Kernels (and their appliances) of earlier keys are not used again.
        for e in std::fs::read_dir(&parent)?.flatten() {
            if e.file_name() != key.as_str() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    std::fs::create_dir_all(&guestfs_cache)?;
    Ok(Some(Kernel {
        vmlinux,
        version,
        modules,
        guestfs_cache,
    }))
}

/// The ELF kernel inside a bzImage compressed with xz, by `xz` (which
/// stops at the end of the stream; what follows it in the bzImage is not
/// its concern). None: not xz, or no `xz` on the host.
fn decompress(bzimage: &[u8]) -> Result<Option<Vec<u8>>, Box<dyn std::error::Error>> {
    let Some(at) = bzimage.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC) else {
        return Ok(None);
    };
    let mut child = match Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stream = bzimage[at..].to_vec();
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&stream));
    let out = child.wait_with_output()?;
    // xz stops reading at the stream's end: a broken pipe for the rest.
    let _ = writer.join();
    if !out.status.success() {
        return Err(format!("xz: {}", out.status).into());
    }
    Ok(out.stdout.starts_with(b"\x7fELF").then_some(out.stdout))
}

/// Whether a 64-bit little-endian ELF has the PVH entry point note.
fn has_pvh_entry(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(4..6) != Some(&[2, 1]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let align4 = |n: usize| (n + 3) & !3;
    for i in 0..phnum as usize {
        let ph = (phoff as usize).saturating_add(i * phentsize as usize);
        // PT_NOTE
        if u32_at(ph) != Some(4) {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 0x20)) else {
            return false;
        };
        let (mut at, end) = (off as usize, (off as usize).saturating_add(size as usize));
        while at.saturating_add(12) <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(at), u32_at(at + 4), u32_at(at + 8))
            else {
                return false;
            };
            let name = elf.get(at + 12..(at + 12).saturating_add(namesz as usize));
            if name == Some(b"Xen\0") && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                return true;
            }
            at = at
                .saturating_add(12)
                .saturating_add(align4(namesz as usize))
                .saturating_add(align4(descsz as usize));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("6.10.0-1-amd64", "6.9.0-1-amd64"), Greater);
        assert_eq!(version_cmp("6.1.0-57-amd64", "6.1.0-9-amd64"), Greater);
        assert_eq!(version_cmp("6.1.0-57-amd64", "6.1.0-57-amd64"), Equal);
    }

    /// A minimal ELF64 with one PT_NOTE segment holding `note`.
    fn elf_with_note(name: &[u8], kind: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x40];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut note = Vec::new();
        note.extend((name.len() as u32).to_le_bytes());
        note.extend(4u32.to_le_bytes());
        note.extend(kind.to_le_bytes());
        note.extend(name);
        note.resize(12 + name.len().next_multiple_of(4), 0);
        note.extend(0x1000000u32.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&(0x40u64 + 56).to_le_bytes());
        ph[0x20..0x28].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend(ph);
        e.extend(note);
        e
    }

    #[test]
    fn the_pvh_note_is_found_and_nothing_else_passes() {
        assert!(has_pvh_entry(&elf_with_note(b"Xen\0", 18)));
        assert!(!has_pvh_entry(&elf_with_note(b"Xen\0", 5)));
        assert!(!has_pvh_entry(&elf_with_note(b"GNU\0", 18)));
        assert!(!has_pvh_entry(b"\x7fELF"));
        let mut truncated = elf_with_note(b"Xen\0", 18);
        truncated.truncate(0x50);
        assert!(!has_pvh_entry(&truncated));
    }
}
