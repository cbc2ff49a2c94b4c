//! Finding the kernel and initramfs inside the rootfs (layout.md §4).

use crate::rootfs::{RootDir, RootfsError};
use std::cmp::Ordering;
use std::io::Read;

/// The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst):
/// `boot_flag` 0xAA55 at 0x1FE, `header` "HdrS" at 0x202, `version` at
/// 0x206. extlinux boots nothing else, so a file without them (a text
/// file, a link to the rootfs's /etc/shadow) is refused as a kernel.
const BOOT_FLAG_AT: usize = 0x1FE;
const MAGIC_AT: usize = 0x202;
const MAGIC: &[u8; 4] = b"HdrS";
const VERSION_AT: usize = 0x206;
/// Protocol 2.00 (Linux 1.3.73): the first with a loadable bzImage.
const MIN_PROTOCOL: u16 = 0x0200;
/// Bytes read to judge a file: the header up to and past the version.
pub const HEADER_LEN: usize = 0x210;

/// Why the file whose first bytes are `head` is not an x86 Linux kernel,
/// or None when it carries the boot protocol's setup header.
pub fn not_a_kernel(head: &[u8]) -> Option<String> {
    if head.len() < HEADER_LEN {
        return Some(format!(
            "{} bytes long, shorter than an x86 boot header ({HEADER_LEN} bytes)",
            head.len()
        ));
    }
    if &head[MAGIC_AT..MAGIC_AT + 4] != MAGIC {
        return Some(format!(
            "no \"HdrS\" boot header magic at offset {MAGIC_AT:#x}"
        ));
    }
    if head[BOOT_FLAG_AT..BOOT_FLAG_AT + 2] != [0x55, 0xAA] {
        return Some(format!("no 0xAA55 boot flag at offset {BOOT_FLAG_AT:#x}"));
    }
    let version = u16::from_le_bytes([head[VERSION_AT], head[VERSION_AT + 1]]);
    if version < MIN_PROTOCOL {
        return Some(format!(
            "boot protocol {}.{:02} is older than {}.{:02}",
            version >> 8,
            version & 0xff,
            MIN_PROTOCOL >> 8,
            MIN_PROTOCOL & 0xff
        ));
    }
    None
}

/// Reads the first [`HEADER_LEN`] bytes of an open file (or fewer, if it is
/// shorter) and judges them with [`not_a_kernel`].
pub fn check(file: &mut impl Read) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    file.take(HEADER_LEN as u64).read_to_end(&mut head)?;
    Ok(not_a_kernel(&head))
}

/// A file that passes [`check`]: the setup header's boot flag, magic and
/// protocol 2.15, zeros elsewhere, then `tail`. It boots nothing; tests
/// and synthetic rootfs trees use it where a kernel must only be copied.
pub fn fake_kernel(tail: &[u8]) -> Vec<u8> {
    let mut k = vec![0u8; HEADER_LEN];
    k[BOOT_FLAG_AT..BOOT_FLAG_AT + 2].copy_from_slice(&[0x55, 0xAA]);
    k[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(MAGIC);
    k[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
    k.extend_from_slice(tail);
    k
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Paths inside the rootfs, e.g. "boot/vmlinuz-6.1.0-9-amd64".
    pub kernel: String,
    pub initramfs: Option<String>,
}

/// The newest `boot/vmlinuz-<ver>` with its matching initramfs, else
/// `boot/vmlinuz` or `vmlinuz` with `boot/initrd.img` or `initrd.img`.
pub fn find(root: &RootDir) -> Result<Option<BootFiles>, RootfsError> {
    let boot = root.list_dir("boot")?;
    let mut versions: Vec<&str> = boot
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .collect();
    versions.sort_by(|a, b| version_cmp(b, a));
    for ver in versions {
        let kernel = format!("boot/vmlinuz-{ver}");
        if root.open_file(&kernel)?.is_some() {
            let initramfs = first_file(
                root,
                &[
                    format!("boot/initrd.img-{ver}"),
                    format!("boot/initramfs-{ver}.img"),
                ],
            )?;
            return Ok(Some(BootFiles { kernel, initramfs }));
        }
    }
    let Some(kernel) = first_file(root, &["boot/vmlinuz".into(), "vmlinuz".into()])? else {
        return Ok(None);
    };
    let initramfs = first_file(root, &["boot/initrd.img".into(), "initrd.img".into()])?;
    Ok(Some(BootFiles { kernel, initramfs }))
}

fn first_file(root: &RootDir, candidates: &[String]) -> Result<Option<String>, RootfsError> {
    for c in candidates {
        if root.open_file(c)?.is_some() {
            return Ok(Some(c.clone()));
        }
    }
    Ok(None)
}

/// Orders "6.1.0-10-amd64" after "6.1.0-9-amd64": digit runs compare as numbers.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|c| **c == b'0').count();
    &d[z..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn only_a_file_with_the_x86_boot_header_is_a_kernel() {
        assert_eq!(not_a_kernel(&fake_kernel(b"payload")), None);
        let shadow = b"root:*:19000:0:99999:7:::\n".repeat(30);
        assert!(not_a_kernel(&shadow).unwrap().contains("HdrS"));
        assert!(not_a_kernel(b"short").unwrap().contains("shorter"));
        let mut old = fake_kernel(b"");
        old[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x0105u16.to_le_bytes());
        assert!(not_a_kernel(&old).unwrap().contains("1.05"));
        let mut no_flag = fake_kernel(b"");
        no_flag[BOOT_FLAG_AT] = 0;
        assert!(not_a_kernel(&no_flag).unwrap().contains("0xAA55"));
    }

    #[test]
    fn numeric_runs_compare_as_numbers() {
        assert_eq!(version_cmp("6.1.0-10-amd64", "6.1.0-9-amd64"), Greater);
        assert_eq!(version_cmp("6.10.0", "6.9.12"), Greater);
        assert_eq!(version_cmp("5.4", "5.4.1"), Less);
        assert_eq!(version_cmp("6.1.0-9-amd64", "6.1.0-9-amd64"), Equal);
    }
}
