//! What makes a version boot, on an image mounted at its top level: the
//! menu for every version (in the boot loader's format, `BOOTLOADER`) and
//! the default flip.
//!
//! Both writes are crash-safe on their own (layout.md §6): the menu is a temp
//! file renamed over the old one, the default link one rename(2) of a fresh
//! symlink over `systems/default`. A caller adding a version writes the menu
//! first and flips the default last. The menu's default entry boots through
//! the link (`extlinux::render`), so the flip is the commit point: when the
//! versions agree on root device, arguments and initramfs, the menu written
//! before the flip is the menu that was already there.

use crate::bootloader::{BootEntry, Bootloader, BOOTLOADER};
use crate::error::{Context, StepError};
use crate::layout::{self, Version};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Writes the boot menu (`Bootloader::config_path`) with one entry per
/// version in `entries`, booting `default` unless the user picks another,
/// and makes sure the link the loader reads it through, if any
/// (`Bootloader::config_link`), points at it.
///
/// The new menu goes to a temp file in the same directory, reaches the disk,
/// and is renamed over the old one: a crash leaves the old menu or the new
/// one, never half of either.
pub fn write_menu(top: &Path, default: &Version, entries: &[BootEntry]) -> Result<(), StepError> {
    let path = BOOTLOADER.config_path();
    let what = || format!("writing {path}");
    if !entries.iter().any(|e| &e.version == default) {
        return Err(format!("the default version {default} has no menu entry")).context(what);
    }
    let menu = top.join(path);
    let dir = menu.parent().expect("the menu is inside a directory");
    fs::create_dir_all(dir).context(what)?;
    remove_debris(dir).context(what)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(layout::TEMP_PREFIX)
        .tempfile_in(dir)
        .context(what)?;
    tmp.write_all(BOOTLOADER.render_menu(default, entries).as_bytes())
        .context(what)?;
    // tempfile makes 0600; a menu is as readable as any boot file.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .context(what)?;
    tmp.as_file().sync_all().context(what)?;
    tmp.persist(&menu).map_err(|e| e.error).context(what)?;
    sync_dir(dir).context(what)?;
    match BOOTLOADER.config_link() {
        Some((at, target)) => link_menu(top, at, target),
        None => Ok(()),
    }
}

/// The link `at` (from the top level) the loader reads the menu through,
/// pointing at `target`: created if missing; anything else there would be
/// booted instead of our menu.
fn link_menu(top: &Path, at: &str, target: &str) -> Result<(), StepError> {
    let what = || format!("linking {at}");
    let link = top.join(at);
    match fs::read_link(&link) {
        Ok(t) if t == Path::new(target) => Ok(()),
        Ok(t) => Err(format!(
            "it points at {} instead of {target}: the boot loader would not boot from the menu",
            t.display(),
        ))
        .context(what),
        Err(_) if link.symlink_metadata().is_ok() => Err(format!(
            "it exists and is not a link to {target}: the boot loader would boot from it, not from the menu",
        ))
        .context(what),
        Err(_) => {
            std::os::unix::fs::symlink(target, &link).context(what)?;
            sync_dir(top).context(what)
        }
    }
}

/// Makes `version` the default: one rename(2) of a new relative symlink (made
/// under a temp name in `systems/`) over `layout::DEFAULT_LINK`. Atomic
/// whether or not the link existed: a reader sees the old target or the new
/// one, never no link.
pub fn set_default(top: &Path, version: &Version) -> Result<(), StepError> {
    let what = || format!("pointing {} at {version}", layout::DEFAULT_LINK);
    if !top.join(version.dir()).is_dir() {
        return Err(format!("{} does not exist", version.dir())).context(what);
    }
    let link = top.join(layout::DEFAULT_LINK);
    let dir = link.parent().expect("DEFAULT_LINK is inside a directory");
    remove_debris(dir).context(what)?;
    let target = version.default_link_target();
    let tmp = tempfile::Builder::new()
        .prefix(layout::TEMP_PREFIX)
        .make_in(dir, |p| std::os::unix::fs::symlink(target, p))
        .context(what)?;
    // On failure `tmp` removes the temp link when dropped.
    fs::rename(tmp.path(), &link).context(what)?;
    // Renamed away: nothing left to remove.
    let _ = tmp.into_temp_path().keep();
    sync_dir(dir).context(what)
}

/// TEST ONLY, unsafe: `systems/default` pointed at `version` whether or
/// not it exists (`steps::UnsafeUpgrade::FlipFirst`), by the same rename.
/// A boot through the link fails until the version is there.
pub fn set_default_unchecked(top: &Path, version: &Version) -> Result<(), StepError> {
    let what = || format!("pointing {} at {version} (unsafe)", layout::DEFAULT_LINK);
    let link = top.join(layout::DEFAULT_LINK);
    let dir = link.parent().expect("DEFAULT_LINK is inside a directory");
    let tmp = tempfile::Builder::new()
        .prefix(layout::TEMP_PREFIX)
        .make_in(dir, |p| {
            std::os::unix::fs::symlink(version.default_link_target(), p)
        })
        .context(what)?;
    fs::rename(tmp.path(), &link).context(what)?;
    let _ = tmp.into_temp_path().keep();
    sync_dir(dir).context(what)
}

/// Temp files and links a crash left in `dir` (named `layout::TEMP_PREFIX…`).
fn remove_debris(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_dir = entry.file_type()?.is_dir();
        if !is_dir && layout::is_temp_name(&entry.file_name().to_string_lossy()) {
            match fs::remove_file(entry.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Makes a rename or new name in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(label: &str) -> BootEntry {
        BootEntry::for_test(label, "/dev/vda", true, "")
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    /// A top level with `systems/<label>/` for each label.
    fn top_with(labels: &[&str]) -> tempfile::TempDir {
        let top = tempfile::tempdir().unwrap();
        for l in labels {
            fs::create_dir_all(top.path().join(Version::new(l).unwrap().dir())).unwrap();
        }
        top
    }

    #[test]
    fn the_menu_is_replaced_whole_and_leaves_no_temp_file() {
        let top = top_with(&[]);
        let (v1, v2) = (entry("v1"), entry("v2"));
        write_menu(top.path(), &v1.version, std::slice::from_ref(&v1)).unwrap();
        // A crash's leftover from an earlier write goes too.
        let debris = format!("{}abc", layout::TEMP_PREFIX);
        fs::write(top.path().join("extlinux").join(&debris), "half").unwrap();
        let both = [v1.clone(), v2.clone()];
        write_menu(top.path(), &v2.version, &both).unwrap();

        let menu = top.path().join(layout::BOOT_MENU);
        assert_eq!(
            fs::read_to_string(&menu).unwrap(),
            BOOTLOADER.render_menu(&v2.version, &both)
        );
        assert_eq!(names(menu.parent().unwrap()), ["extlinux.conf"]);
        assert_eq!(
            fs::metadata(&menu).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // The top-level link: relative, and read through it is the menu.
        let link = top.path().join(layout::BOOT_MENU_LINK);
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new(layout::BOOT_MENU_LINK_TARGET)
        );
        assert!(fs::read_link(&link).unwrap().is_relative());
        assert_eq!(
            fs::read(&link).unwrap(),
            fs::read(&menu).unwrap(),
            "the link does not reach the menu"
        );
    }

    #[test]
    fn the_menu_refuses_a_default_without_an_entry_and_a_foreign_top_level_file() {
        let top = top_with(&[]);
        let v1 = entry("v1");
        let e =
            write_menu(top.path(), &entry("v2").version, std::slice::from_ref(&v1)).unwrap_err();
        assert!(format!("{e:?}").contains("has no menu entry"), "{e:?}");
        assert!(!top.path().join(layout::BOOT_MENU).exists());

        // A 2014-style image keeps its menu in the top-level file itself.
        fs::write(top.path().join(layout::BOOT_MENU_LINK), "default old\n").unwrap();
        let e = write_menu(top.path(), &v1.version, std::slice::from_ref(&v1)).unwrap_err();
        assert!(format!("{e:?}").contains("not a link"), "{e:?}");
    }

    #[test]
    fn set_default_creates_a_missing_link() {
        let top = top_with(&["factory"]);
        let factory = Version::new("factory").unwrap();
        set_default(top.path(), &factory).unwrap();
        let link = top.path().join(layout::DEFAULT_LINK);
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("factory"));
        assert!(
            link.is_dir(),
            "the link does not resolve to systems/factory"
        );
        assert_eq!(names(link.parent().unwrap()), ["default", "factory"]);
    }

    #[test]
    fn set_default_replaces_an_existing_link_with_a_relative_one() {
        let top = top_with(&["factory", "v2"]);
        let link = top.path().join(layout::DEFAULT_LINK);
        // As a hand-made (or older) image might have it: absolute.
        std::os::unix::fs::symlink(top.path().join("systems/factory"), &link).unwrap();
        // And the leftover of a flip that was killed before its rename.
        let debris = top
            .path()
            .join("systems")
            .join(format!("{}xyz", layout::TEMP_PREFIX));
        std::os::unix::fs::symlink("factory", &debris).unwrap();

        let v2 = Version::new("v2").unwrap();
        set_default(top.path(), &v2).unwrap();
        let target = fs::read_link(&link).unwrap();
        assert_eq!(target, Path::new("v2"));
        assert!(target.is_relative());
        assert_eq!(names(link.parent().unwrap()), ["default", "factory", "v2"]);

        // Flipping back (a rollback) is the same operation.
        set_default(top.path(), &Version::new("factory").unwrap()).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("factory"));
    }

    #[test]
    fn set_default_refuses_a_version_that_is_not_there() {
        let top = top_with(&["factory"]);
        let e = set_default(top.path(), &Version::new("v9").unwrap()).unwrap_err();
        assert!(
            format!("{e:?}").contains("systems/v9 does not exist"),
            "{e:?}"
        );
        assert!(top
            .path()
            .join(layout::DEFAULT_LINK)
            .symlink_metadata()
            .is_err());
    }
}
