//! Reading fstab the way util-linux's libmount does, since that is the parser
//! systemd uses at boot: what libmount does not see as an entry never gets
//! mounted, whatever it looks like to a human.

use serde::Serialize;

/// One mount entry. Lines that are not entries (comments, blanks, lines with
/// fewer than three fields) are never turned into an `Entry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// 1-based line number in the file.
    pub line: usize,
    /// The line as written, without its line terminator.
    pub raw: String,
    /// The source field as written (still escaped: it is copied into other
    /// fstab lines and onto the kernel command line as is).
    pub source: String,
    /// The target with octal escapes decoded and trailing slashes removed.
    pub target: String,
    pub fstype: String,
    pub options: String,
}

/// Parses fstab text. Invalid UTF-8 is decoded lossily: it can only occur in
/// fields strata compares, never in bytes it writes back.
pub fn parse(text: &[u8]) -> Vec<Entry> {
    let text = String::from_utf8_lossy(text);
    text.split('\n')
        .enumerate()
        .filter_map(|(i, raw)| parse_line(i + 1, raw))
        .collect()
}

fn parse_line(line: usize, raw: &str) -> Option<Entry> {
    let raw = raw.strip_suffix('\r').unwrap_or(raw);
    let body = raw.trim_start_matches([' ', '\t']);
    if body.is_empty() || body.starts_with('#') {
        return None;
    }
    let mut fields = body.split([' ', '\t']).filter(|f| !f.is_empty());
    let source = fields.next()?;
    let target = fields.next()?;
    let fstype = fields.next()?;
    let options = fields.next().unwrap_or("defaults");
    Some(Entry {
        line,
        raw: raw.to_owned(),
        source: source.to_owned(),
        target: normalize_target(&unescape(target)),
        fstype: unescape(fstype),
        options: unescape(options),
    })
}

/// Decodes fstab's octal escapes (`\040` is a space), as libmount's unmangle.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// "/home/" and "/home" name the same mount point; "/" stays "/".
pub fn normalize_target(target: &str) -> String {
    let trimmed = target.trim_end_matches('/');
    if trimmed.is_empty() && target.starts_with('/') {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// The entry that mounts something at `target` (already normalised), if any.
/// libmount uses the last matching line; so does systemd.
pub fn find_target<'a>(entries: &'a [Entry], target: &str) -> Option<&'a Entry> {
    entries.iter().rev().find(|e| e.target == target)
}

/// Whether systemd mounts an fstab entry at boot: the one rule the build's
/// mountpoint check, `strata inspect --lint` and the guest's `fstab` check
/// share. Swap is not a mount; `noauto` entries wait to be asked for; a
/// target that is not an absolute path (`none`) is not a mount point.
pub fn is_boot_mount(target: &str, fstype: &str, options: &str) -> bool {
    target.starts_with('/') && fstype != "swap" && !options.split(',').any(|o| o == "noauto")
}

/// The entries mounted at boot, `/` included, in file order.
pub fn boot_mounts(entries: &[Entry]) -> impl Iterator<Item = &Entry> {
    entries
        .iter()
        .filter(|e| is_boot_mount(&e.target, &e.fstype, &e.options))
}

/// The boot mounts other than `/`: the directories of the root tree that a
/// mount covers, where data would be hidden.
pub fn mounts_over_root(entries: &[Entry]) -> impl Iterator<Item = &Entry> {
    boot_mounts(entries).filter(|e| e.target != "/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_mounts_skip_swap_noauto_and_non_paths() {
        let e = parse(
            b"/dev/vda / btrfs defaults 0 1
/dev/vdb none swap sw 0 0
/dev/vdc /swapfile swap sw
/dev/vdd /mnt ext4 noauto,ro
/dev/vde /data ext4 ro,noautox
",
        );
        let boot: Vec<&str> = boot_mounts(&e).map(|e| e.target.as_str()).collect();
        assert_eq!(boot, ["/", "/data"]);
        let over: Vec<&str> = mounts_over_root(&e).map(|e| e.target.as_str()).collect();
        assert_eq!(over, ["/data"]);
    }

    use super::*;

    #[test]
    fn comments_blanks_and_short_lines_are_not_entries() {
        let e = parse(b"# c\n\n   \t# indented comment\nonly two\n/dev/vda / btrfs\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 5);
        assert_eq!(e[0].options, "defaults");
    }

    #[test]
    fn tabs_escapes_and_trailing_slashes() {
        let e = parse(b"LABEL=data\t/my\\040dir/\text4\tdefaults 0 2");
        assert_eq!(e[0].target, "/my dir");
        assert_eq!(e[0].source, "LABEL=data");
        assert_eq!(e[0].fstype, "ext4");
    }

    #[test]
    fn root_stays_root() {
        assert_eq!(normalize_target("/"), "/");
        assert_eq!(normalize_target("//"), "/");
        assert_eq!(normalize_target("none"), "none");
    }

    #[test]
    fn incomplete_escape_is_literal() {
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("\\011x"), "\tx");
    }

    #[test]
    fn last_entry_wins() {
        let e = parse(b"a /home ext4\nb /home/ xfs\n");
        assert_eq!(find_target(&e, "/home").unwrap().source, "b");
    }
}
