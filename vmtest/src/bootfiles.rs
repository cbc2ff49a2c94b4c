//! Kernel, initramfs and command line for `--boot direct`, taken from the
//! image itself: the entry extlinux would boot, read out of the unmounted
//! filesystem with `btrfs restore` (read-only, no loop device or mount to
//! clean up, and no clash with another mounted copy of the same fs UUID).

use std::path::{Path, PathBuf};
use std::process::Command;
use strata_builder::bootloader::boot_entry;
use strata_builder::bootloader::{Bootloader, BOOTLOADER};
use strata_builder::layout;

#[derive(Debug, thiserror::Error)]
pub enum BootFilesError {
    #[error("running btrfs restore: {0}")]
    Spawn(std::io::Error),
    #[error("btrfs restore could not read {wanted} from {image}: {error}")]
    Restore {
        image: String,
        wanted: String,
        error: strata_builder::host::cmd::CmdError,
    },
    #[error("the image has no boot menu (looked for {})", layout::BOOT_CONFIGS.join(", "))]
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
    let config = BOOTLOADER.read_menu(conf);
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
    // Every place a menu may live, and the default link its entries may go
    // through; symlinks restored as links (-S), not followed.
    let conf_dir = into.join("conf");
    let mut wanted: Vec<String> = layout::BOOT_CONFIGS
        .iter()
        .map(|p| layout::fsroot(p))
        .collect();
    wanted.push(layout::fsroot(layout::DEFAULT_LINK));
    restore(
        image,
        &conf_dir,
        &path_regex(&wanted),
        "the boot menu",
        true,
    )?;
    // Regular files only, as before -S: strata's top-level extlinux.conf is
    // a link to the menu, which comes first in the list anyway.
    let (config_path, conf) = layout::BOOT_CONFIGS
        .iter()
        .filter(|p| {
            std::fs::symlink_metadata(conf_dir.join(p)).is_ok_and(|m| m.file_type().is_file())
        })
        .find_map(|p| Some((*p, std::fs::read_to_string(conf_dir.join(p)).ok()?)))
        .ok_or(BootFilesError::NoConfig)?;
    let entry = default_entry(&conf).map_err(BootFilesError::Config)?;
    let default_label = std::fs::read_link(conf_dir.join(layout::DEFAULT_LINK))
        .ok()
        .and_then(|t| boot_entry::default_label(&t));
    let (kernel_at, initrd_at) = locate(config_path, &entry, default_label.as_deref())?;
    let files_dir = into.join("files");
    let mut wanted = vec![kernel_at.clone()];
    wanted.extend(initrd_at.clone());
    restore(
        image,
        &files_dir,
        &path_regex(&wanted),
        &wanted.join(", "),
        false,
    )?;
    let local = |p: &str| files_dir.join(p.trim_start_matches('/'));
    let kernel = local(&kernel_at);
    if !kernel.is_file() {
        return Err(BootFilesError::Missing(kernel_at));
    }
    let initrd = match &initrd_at {
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

/// Where the entry's kernel and initrd are in the image (`/systems/v1/kernel`),
/// resolved as the boot loader does: relative paths from the menu's
/// directory, `systems/default` through the link.
fn locate(
    config_path: &str,
    entry: &BootEntry,
    default_label: Option<&str>,
) -> Result<(String, Option<String>), BootFilesError> {
    let at = |p: &str| {
        boot_entry::resolve(config_path, p, default_label)
            .map(|rel| layout::fsroot(&rel))
            .ok_or_else(|| BootFilesError::Missing(p.to_owned()))
    };
    Ok((
        at(&entry.kernel)?,
        entry.initrd.as_deref().map(at).transpose()?,
    ))
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

fn restore(
    image: &Path,
    into: &Path,
    regex: &str,
    wanted: &str,
    symlinks: bool,
) -> Result<(), BootFilesError> {
    std::fs::create_dir_all(into).map_err(BootFilesError::Spawn)?;
    strata_builder::host::cmd::run(
        Command::new("btrfs")
            .args(["restore", "-i", "--path-regex", regex])
            .args(symlinks.then_some("-S"))
            .arg(image)
            .arg(into),
    )
    .map_err(|error| BootFilesError::Restore {
        image: image.display().to_string(),
        wanted: wanted.to_owned(),
        error,
    })?;
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
    fn entry_paths_resolve_like_the_boot_loader() {
        let e = default_entry(
            "label default\n kernel /systems/default/kernel\n initrd ../systems/default/initramfs\n",
        )
        .unwrap();
        let (k, i) = locate(layout::BOOT_MENU, &e, Some("v2")).unwrap();
        assert_eq!(k, "/systems/v2/kernel");
        assert_eq!(i.as_deref(), Some("/systems/v2/initramfs"));
        assert!(matches!(
            locate(layout::BOOT_MENU, &e, None),
            Err(BootFilesError::Missing(p)) if p == "/systems/default/kernel"
        ));
        // Relative to the menu's directory.
        let e = default_entry("label a\n kernel vmlinuz\n").unwrap();
        let (k, i) = locate(layout::BOOT_MENU, &e, None).unwrap();
        assert_eq!((k.as_str(), i), ("/extlinux/vmlinuz", None));
        let (k, _) = locate(layout::BOOT_MENU_LINK, &e, None).unwrap();
        assert_eq!(k, "/vmlinuz");
    }

    /// The menu strata writes: `--boot direct` takes its `default` entry,
    /// which goes through `systems/default`, and finds the files of the
    /// version the link names.
    #[test]
    fn stratas_menu_boots_the_version_the_link_names() {
        use strata_builder::bootloader::{extlinux::render, BootEntry as Entry};
        use strata_builder::layout::Version;
        let entry = |label: &str, initramfs: bool| Entry {
            version: Version::new(label).unwrap(),
            root_device: "UUID=abc".into(),
            has_initramfs: initramfs,
            kernel_args: "quiet".into(),
        };
        let (factory, v2) = (entry("factory", true), entry("v2", false));
        let menu = render(&v2.version, &[factory.clone(), v2.clone()]);
        let e = default_entry(&menu).unwrap();
        assert_eq!(e.label, "default");
        assert_eq!(e.initrd, None, "v2 has no initramfs");
        assert_eq!(
            e.append,
            "root=UUID=abc rootfstype=btrfs rootflags=subvol=systems/default/run \
             init=/sbin/init rw console=tty0 console=ttyS0,115200 quiet"
        );
        let (k, i) = locate(layout::BOOT_MENU, &e, Some("v2")).unwrap();
        assert_eq!((k.as_str(), i), ("/systems/v2/kernel", None));

        let menu = render(&factory.version, &[factory.clone(), v2]);
        let e = default_entry(&menu).unwrap();
        let (k, i) = locate(layout::BOOT_MENU, &e, Some("factory")).unwrap();
        assert_eq!(k, "/systems/factory/kernel");
        assert_eq!(i.as_deref(), Some("/systems/factory/initramfs"));
    }

    #[test]
    fn the_menu_and_the_default_link_in_one_restore() {
        let mut wanted: Vec<String> = layout::BOOT_CONFIGS
            .iter()
            .map(|p| layout::fsroot(p))
            .collect();
        wanted.push(layout::fsroot(layout::DEFAULT_LINK));
        assert_eq!(
            path_regex(&wanted),
            r"^/(|extlinux(|/extlinux\.conf)|extlinux\.conf|boot(|/extlinux(|/extlinux\.conf))|syslinux(|/syslinux\.cfg)|systems(|/default))$"
        );
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
