//! Kernel, initramfs and command line for `--boot direct`, taken from the
//! image itself: the entry extlinux would boot, read out of the unmounted
//! filesystem with `btrfs restore` (read-only, no loop device or mount to
//! clean up, and no clash with another mounted copy of the same fs UUID).

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum BootFilesError {
    #[error("running btrfs restore: {0}")]
    Spawn(std::io::Error),
    #[error("btrfs restore could not read {wanted} from {image}: {stderr}")]
    Restore {
        image: String,
        wanted: String,
        stderr: String,
    },
    #[error("the image has no extlinux/extlinux.conf (or /extlinux.conf)")]
    NoConfig,
    #[error("extlinux.conf: {0}")]
    Config(String),
    #[error("the image has no {0}")]
    Missing(String),
}

/// One `label` stanza of extlinux.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub label: String,
    pub kernel: String,
    pub initrd: Option<String>,
    pub append: String,
}

/// The entry extlinux boots, read with the builder's parser (one parser
/// for every reader of boot menus). Stricter than syslinux on one point: a
/// `default` naming no label is an error rather than a guess.
pub fn default_entry(conf: &str) -> Result<BootEntry, String> {
    let config = strata_builder::extlinux::parse(conf);
    if let Some(d) = &config.default {
        if !config.entries.iter().any(|e| &e.label == d) {
            let labels: Vec<&str> = config.entries.iter().map(|e| e.label.as_str()).collect();
            return Err(format!("default {d:?} names no label (labels: {labels:?})"));
        }
    }
    let e = config.default_entry().ok_or("no label entries")?;
    let kernel = e
        .kernel
        .clone()
        .ok_or_else(|| format!("label {:?} has no kernel line", e.label))?;
    Ok(BootEntry {
        label: e.label.clone(),
        kernel,
        initrd: e.initrd.clone(),
        append: e.cmdline(),
    })
}

/// Files extracted into a directory the caller owns.
#[derive(Debug, Clone)]
pub struct DirectBootFiles {
    pub entry: BootEntry,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

pub fn extract(image: &Path, into: &Path) -> Result<DirectBootFiles, BootFilesError> {
    let conf_dir = into.join("conf");
    restore(
        image,
        &conf_dir,
        r"^/(|extlinux(|/extlinux\.conf)|extlinux\.conf)$",
        "extlinux.conf",
    )?;
    let conf = [
        conf_dir.join("extlinux/extlinux.conf"),
        conf_dir.join("extlinux.conf"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .ok_or(BootFilesError::NoConfig)?;
    let entry = default_entry(&conf).map_err(BootFilesError::Config)?;
    let files_dir = into.join("files");
    let mut wanted = vec![entry.kernel.clone()];
    wanted.extend(entry.initrd.clone());
    restore(image, &files_dir, &path_regex(&wanted), &wanted.join(", "))?;
    let local = |p: &str| files_dir.join(p.trim_start_matches('/'));
    let kernel = local(&entry.kernel);
    if !kernel.is_file() {
        return Err(BootFilesError::Missing(entry.kernel.clone()));
    }
    let initrd = match &entry.initrd {
        Some(i) if local(i).is_file() => Some(local(i)),
        Some(i) => return Err(BootFilesError::Missing(i.clone())),
        None => None,
    };
    Ok(DirectBootFiles {
        entry,
        kernel,
        initrd,
    })
}

/// `btrfs restore` matches every directory on the way down, so each wanted
/// path becomes nested optional groups: /a/b -> ^/(|a(|/b))$.
pub fn path_regex(paths: &[String]) -> String {
    fn escape(s: &str) -> String {
        s.chars()
            .flat_map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/' {
                    vec![c]
                } else {
                    vec!['\\', c]
                }
            })
            .collect()
    }
    fn group(parts: &[Vec<&str>], depth: usize) -> Vec<String> {
        // Children of this level, first component unique, order kept.
        let mut heads: Vec<&str> = Vec::new();
        for p in parts {
            if let Some(h) = p.get(depth) {
                if !heads.contains(h) {
                    heads.push(h);
                }
            }
        }
        heads
            .iter()
            .map(|h| {
                let sub: Vec<Vec<&str>> = parts
                    .iter()
                    .filter(|p| p.get(depth) == Some(h))
                    .cloned()
                    .collect();
                let inner = group(&sub, depth + 1);
                if inner.is_empty() {
                    escape(h)
                } else {
                    format!("{}(|/{})", escape(h), inner.join("|/"))
                }
            })
            .collect()
    }
    let split: Vec<Vec<&str>> = paths
        .iter()
        .map(|p| p.split('/').filter(|c| !c.is_empty()).collect())
        .collect();
    format!("^/(|{})$", group(&split, 0).join("|"))
}

fn restore(image: &Path, into: &Path, regex: &str, wanted: &str) -> Result<(), BootFilesError> {
    std::fs::create_dir_all(into).map_err(BootFilesError::Spawn)?;
    let out = Command::new("btrfs")
        .args(["restore", "-i", "--path-regex", regex])
        .arg(image)
        .arg(into)
        .output()
        .map_err(BootFilesError::Spawn)?;
    if !out.status.success() {
        return Err(BootFilesError::Restore {
            image: image.display().to_string(),
            wanted: wanted.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "serial 0 115200\ndefault factory\ntimeout 10\n\
        label old\n  kernel /systems/old/kernel\n  append root=/dev/sda\n\
        label factory\n  kernel /systems/factory/kernel\n  initrd /systems/factory/initramfs\n  \
        append root=UUID=abc rootfstype=btrfs rootflags=subvol=systems/factory/run init=/sbin/init rw console=tty0 console=ttyS0,115200\n";

    #[test]
    fn picks_the_default_label() {
        let e = default_entry(CONF).unwrap();
        assert_eq!(e.label, "factory");
        assert_eq!(e.kernel, "/systems/factory/kernel");
        assert_eq!(e.initrd.as_deref(), Some("/systems/factory/initramfs"));
        assert!(e.append.starts_with("root=UUID=abc rootfstype=btrfs"));
    }

    #[test]
    fn initrd_inside_append_and_missing_default() {
        let e = default_entry("label a\n kernel /k\n append initrd=/i quiet\n").unwrap();
        assert_eq!(e.initrd.as_deref(), Some("/i"));
        assert_eq!(e.append, "quiet");
        assert!(default_entry("default b\nlabel a\n kernel /k\n")
            .unwrap_err()
            .contains("names no label"));
    }

    #[test]
    fn regex_nests_every_directory_level() {
        let r = path_regex(&[
            "/systems/factory/kernel".into(),
            "/systems/factory/initramfs".into(),
        ]);
        assert_eq!(r, r"^/(|systems(|/factory(|/kernel|/initramfs)))$");
        let r = path_regex(&["/vmlinuz".into(), "/boot/initrd.img-6.1".into()]);
        assert_eq!(r, r"^/(|vmlinuz|boot(|/initrd\.img-6\.1))$");
    }
}
