//! The kernel command line: the one place it is composed and the one place
//! it is read.
//!
//! Reading follows the kernel, not the order of the words: each `root=` and
//! each `rootflags=` overwrites the one before, so the LAST one is the one
//! the system boots with (and btrfs takes the last `subvol=` among the
//! mount options). Every reader (upgrade, versions, expect, the image
//! reader, the CLI) asks this module, so a line with two `root=` means the
//! same device to all of them, and the same device the kernel mounts.

use crate::layout::{self, Version};

/// The words strata puts on every line after `root=` and `rootflags=`, and
/// that a reading of a line in another form leaves out of the extra
/// arguments (they are strata's to write, not the user's to keep).
const OWN_WORDS: [&str; 3] = ["rw", "console=tty0", "console=ttyS0,115200"];
const OWN_KEYS: [&str; 5] = ["root", "rootfstype", "rootflags", "init", "initrd"];

/// The line strata writes for `version` booting from `root_device`, then
/// the extra arguments (trimmed; none when empty).
pub fn compose(root_device: &str, version: &Version, extra: &str) -> String {
    let mut s = format!(
        "root={root_device} rootfstype=btrfs rootflags=subvol={} init=/sbin/init {}",
        layout::rootflags_subvol(version),
        OWN_WORDS.join(" ")
    );
    let extra = extra.trim();
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// The value of the last `key=` on the line: the one the kernel keeps.
fn last<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

/// The root device the kernel mounts: the last `root=`.
pub fn root_device(line: &str) -> Option<&str> {
    last(line, "root")
}

/// The root's mount options: the last `rootflags=`.
pub fn rootflags(line: &str) -> Option<&str> {
    last(line, "rootflags")
}

/// The subvolume the root is mounted from: btrfs's last `subvol=` among
/// the last `rootflags=`.
pub fn root_subvol(line: &str) -> Option<&str> {
    rootflags(line)?
        .split(',')
        .rev()
        .find_map(|f| f.strip_prefix("subvol="))
}

/// The extra arguments of a line `compose` made for `version` (whatever
/// its root device): the words after strata's own. None when the line is
/// not one `compose` makes for `version` (another tool's, another
/// version's, no `root=`).
pub fn strata_extra(line: &str, version: &Version) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let fixed = compose(root_device(line)?, version, "");
    let fixed: Vec<&str> = fixed.split_whitespace().collect();
    words
        .starts_with(&fixed)
        .then(|| words[fixed.len()..].join(" "))
}

/// One of the words strata writes itself: `OWN_WORDS`, or `key=…` with a
/// key of `OWN_KEYS`.
fn is_own(word: &str) -> bool {
    OWN_WORDS.contains(&word)
        || word
            .split_once('=')
            .is_some_and(|(k, _)| OWN_KEYS.contains(&k))
}

/// The extra arguments of any line booting `version`: as `strata_extra`
/// reads them, for the version or for the entry through `systems/default`;
/// for a line in another form, every word but the ones strata writes
/// itself (which the next line it composes carries anyway).
pub fn extra_args(line: &str, version: &Version) -> String {
    strata_extra(line, version)
        .or_else(|| strata_extra(line, &layout::via_default_link()))
        .unwrap_or_else(|| {
            line.split_whitespace()
                .filter(|w| !is_own(w))
                .collect::<Vec<_>>()
                .join(" ")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(label: &str) -> Version {
        Version::new(label).unwrap()
    }

    /// The kernel's rule: the last `root=` wins, and every reading agrees.
    #[test]
    fn the_last_root_wins() {
        let line = "root=/dev/sda rootfstype=btrfs quiet root=/dev/vda";
        assert_eq!(root_device(line), Some("/dev/vda"));
        // Not strata's line for any root: the first word is not the root.
        assert_eq!(strata_extra(line, &v("v1")), None);
        let mine = format!("{} root=/dev/vdb", compose("/dev/sda", &v("v1"), "quiet"));
        assert_eq!(root_device(&mine), Some("/dev/vdb"));
        assert_eq!(strata_extra(&mine, &v("v1")), None);
        assert_eq!(extra_args(&mine, &v("v1")), "quiet");
        assert_eq!(root_device("quiet"), None);
        assert_eq!(root_device("rootfstype=btrfs"), None);
        assert_eq!(root_device("root="), Some(""));
    }

    #[test]
    fn the_last_rootflags_and_subvol_win() {
        let line = "rootflags=subvol=systems/a/run root=/dev/vda \
                    rootflags=compress=zstd,subvol=x,subvol=systems/b/run";
        assert_eq!(
            rootflags(line),
            Some("compress=zstd,subvol=x,subvol=systems/b/run")
        );
        assert_eq!(root_subvol(line), Some("systems/b/run"));
        assert_eq!(root_subvol("rootflags=compress=zstd"), None);
        assert_eq!(root_subvol("root=/dev/vda"), None);
    }

    #[test]
    fn composed_lines_read_back() {
        let line = compose("UUID=abc", &v("v1"), "  quiet loglevel=3 ");
        assert_eq!(
            line,
            "root=UUID=abc rootfstype=btrfs rootflags=subvol=systems/v1/run init=/sbin/init rw console=tty0 console=ttyS0,115200 quiet loglevel=3"
        );
        assert_eq!(root_device(&line), Some("UUID=abc"));
        assert_eq!(root_subvol(&line), Some("systems/v1/run"));
        assert_eq!(
            strata_extra(&line, &v("v1")).as_deref(),
            Some("quiet loglevel=3")
        );
        assert_eq!(extra_args(&line, &v("v1")), "quiet loglevel=3");
        // Another version's line.
        assert_eq!(strata_extra(&line, &v("v2")), None);
        // Strata's own words given as extra arguments stay extra.
        let line = compose("/dev/vda", &v("v1"), "init=/bin/sh rw");
        assert_eq!(extra_args(&line, &v("v1")), "init=/bin/sh rw");
        let plain = compose("/dev/vda", &v("v1"), "");
        assert_eq!(strata_extra(&plain, &v("v1")).as_deref(), Some(""));
    }

    #[test]
    fn extra_arguments_of_other_lines() {
        // The entry through systems/default.
        let through = compose("/dev/sda", &layout::via_default_link(), "quiet");
        assert_eq!(extra_args(&through, &v("v1")), "quiet");
        // Another tool's line: strata's own words go, the rest stays.
        assert_eq!(
            extra_args(
                "root=/dev/sda rootflags=subvol=systems/default/run rw quiet initrd=/i console=tty0 console=ttyS1",
                &v("v1")
            ),
            "quiet console=ttyS1"
        );
        assert_eq!(extra_args("", &v("v1")), "");
    }
}
