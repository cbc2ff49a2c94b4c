//! Finding the kernel and initramfs inside the rootfs (layout.md §4).

use crate::rootfs::{RootDir, RootfsError};
use std::cmp::Ordering;

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
    use super::version_cmp;
    use std::cmp::Ordering::*;

    #[test]
    fn numeric_runs_compare_as_numbers() {
        assert_eq!(version_cmp("6.1.0-10-amd64", "6.1.0-9-amd64"), Greater);
        assert_eq!(version_cmp("6.10.0", "6.9.12"), Greater);
        assert_eq!(version_cmp("5.4", "5.4.1"), Less);
        assert_eq!(version_cmp("6.1.0-9-amd64", "6.1.0-9-amd64"), Equal);
    }
}
