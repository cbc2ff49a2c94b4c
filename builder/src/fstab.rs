//! Reading fstab the way util-linux's libmount does, since that is the parser
//! systemd uses at boot: what libmount does not see as an entry never gets
//! mounted, whatever it looks like to a human.

use crate::octal;
use serde::Serialize;
use std::fmt;

/// One mount entry: a line libmount reads as an fstab entry. Comments, blank
/// lines and lines libmount rejects are never turned into an `Entry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// 1-based line number in the file.
    pub line: usize,
    /// The line as written, without its line terminator.
    pub raw: String,
    /// The source field as written (still escaped: it is copied into other
    /// fstab lines and onto the kernel command line as is). Bytes that are
    /// not UTF-8 are written as octal escapes, which libmount decodes back to
    /// the same bytes.
    pub source: String,
    /// The target with octal escapes decoded, then normalised
    /// ([`normalize_target`]).
    pub target: String,
    pub fstype: String,
    /// Decoded; "defaults" when the field is missing or decodes to nothing
    /// (libmount then has no options, which mounts with the defaults).
    pub options: String,
}

/// A line that is neither a comment nor blank but that libmount refuses
/// ("parse error at line N -- ignored"): systemd never mounts it. Its bytes
/// stay in the file as they are; the build warns about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub line: usize,
    /// The line as written, without its line terminator.
    pub raw: String,
    pub reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// A NUL byte ends libmount's view of a line before its newline.
    NulByte,
    /// Source, target and fstype are required.
    TooFewFields,
    /// The 5th field is there but is not a number libmount accepts: an
    /// optional sign and digits, fitting a C long unless the number ends the
    /// line, followed by a blank or the end of the line.
    BadFreq,
    /// The 6th field, likewise.
    BadPassno,
    /// libmount read the whole file as another kind of table.
    NotFstab(Format),
}

/// How libmount reads a table file: it guesses from the first line that is
/// neither blank nor a comment (`mnt_table_parse_file`, which systemd
/// uses for /etc/fstab).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Fstab,
    /// The first entry line starts with two numbers: read as
    /// /proc/self/mountinfo, where no fstab line is valid.
    Mountinfo,
    /// The first entry line starts with `Filename<TAB>`: read as
    /// /proc/swaps, where every line is a swap area, not a mount.
    Swaps,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NulByte => f.write_str("it contains a NUL byte"),
            Reason::TooFewFields => {
                f.write_str("it has fewer than 3 fields: source, mount point, type")
            }
            Reason::BadFreq => f.write_str("its 5th field, the dump frequency, is not a number"),
            Reason::BadPassno => f.write_str("its 6th field, the fsck pass, is not a number"),
            Reason::NotFstab(Format::Mountinfo) => f.write_str(
                "the file's first entry line starts with two numbers, so the whole file is read as a mountinfo table",
            ),
            Reason::NotFstab(Format::Swaps) => f.write_str(
                "the file's first entry line starts with \"Filename<TAB>\", so the whole file is read as a swaps table",
            ),
            Reason::NotFstab(Format::Fstab) => f.write_str("it is not an fstab entry"),
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "warning: etc/fstab line {} is ignored by libmount, so systemd never mounts it ({}): {:?}",
            self.line, self.reason, self.raw
        )
    }
}

/// Everything libmount makes of an fstab text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub format: Format,
    /// The 1-based line the format was guessed from, if any.
    pub format_line: Option<usize>,
    pub entries: Vec<Entry>,
    pub rejected: Vec<Rejected>,
}

/// The entries libmount reads from an fstab text, in file order.
pub fn parse(text: &[u8]) -> Vec<Entry> {
    parse_full(text).entries
}

/// Reads fstab text the way libmount 2.38 does (`mnt_table_parse_file`):
/// lines end at '\n' (the last may lack it), one CR before the newline is
/// dropped, blanks are spaces and tabs, '#' after them starts a comment.
/// Fields are compared as bytes; invalid UTF-8 is decoded lossily only at
/// the end, in fields strata compares, never in bytes it writes back.
pub fn parse_full(text: &[u8]) -> Parsed {
    let mut parsed = Parsed {
        format: Format::Fstab,
        format_line: None,
        entries: Vec::new(),
        rejected: Vec::new(),
    };
    let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    // The piece after a final newline is no line: getline never returns it.
    let last_terminated = lines.last() == Some(&&b""[..]);
    if last_terminated {
        lines.pop();
    }
    let count = lines.len();
    for (i, full) in lines.into_iter().enumerate() {
        let number = i + 1;
        let raw = lossy(strip_cr(full));
        let reject = |reason| Rejected {
            line: number,
            raw: raw.clone(),
            reason,
        };
        // libmount finds the newline with strchr, which stops at a NUL: a
        // line with one is an error, unless it is the file's unterminated
        // last line, which then ends at the NUL.
        let line = match full.iter().position(|&b| b == 0) {
            Some(_) if number < count || last_terminated => {
                parsed.rejected.push(reject(Reason::NulByte));
                continue;
            }
            Some(nul) => &full[..nul],
            None => full,
        };
        let body = skip_blanks(strip_cr(line));
        if body.is_empty() || body[0] == b'#' {
            continue;
        }
        if parsed.format_line.is_none() {
            parsed.format_line = Some(number);
            parsed.format = guess_format(body);
        }
        match parsed.format {
            Format::Fstab => match parse_line(body) {
                Ok(fields) => parsed.entries.push(Entry {
                    line: number,
                    raw,
                    source: escape_non_utf8(fields.source),
                    target: normalize_target(&lossy(&unescape_bytes(fields.target))),
                    fstype: lossy(&unescape_bytes(fields.fstype)),
                    options: match fields.options.map(unescape_bytes) {
                        Some(o) if !o.is_empty() => lossy(&o),
                        _ => "defaults".to_owned(),
                    },
                }),
                Err(reason) => parsed.rejected.push(reject(reason)),
            },
            // The swaps header is skipped, not an error.
            Format::Swaps if body.starts_with(SWAPS_HEADER) => {}
            other => parsed.rejected.push(reject(Reason::NotFstab(other))),
        }
    }
    parsed
}

const SWAPS_HEADER: &[u8] = b"Filename\t";

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `field` as text that libmount reads back as the same bytes: invalid UTF-8
/// becomes `\ooo` (an escape is always 3 digits, so it cannot merge with
/// what is around it).
fn escape_non_utf8(field: &[u8]) -> String {
    let mut out = String::with_capacity(field.len());
    for chunk in field.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\{b:03o}"));
        }
    }
    out
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// libmount's separators: only space and tab.
fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blanks(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| is_blank(b)).count();
    &s[n..]
}

/// The next field and what follows it; empty when there is none.
fn next_field(s: &[u8]) -> (&[u8], &[u8]) {
    let s = skip_blanks(s);
    let n = s.iter().take_while(|&&b| !is_blank(b)).count();
    s.split_at(n)
}

/// C's isspace, which strtol and scanf skip (the line has no '\n' left).
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// What strtol in base 10 accepts at the start of `s`: leading isspace, an
/// optional sign, at least one digit. Returns the rest and whether the value
/// fits a C long (strtol sets ERANGE otherwise).
fn c_number(s: &[u8]) -> Option<(&[u8], bool)> {
    let n = s.iter().take_while(|&&b| is_c_space(b)).count();
    let mut s = &s[n..];
    let mut negative = false;
    if let [sign @ (b'+' | b'-'), rest @ ..] = s {
        negative = *sign == b'-';
        s = rest;
    }
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let magnitude = s[..digits].iter().fold(0u128, |v, d| {
        (v * 10 + u128::from(d - b'0')).min(u128::from(u64::MAX))
    });
    let limit = if negative {
        1u128 << 63
    } else {
        (1u128 << 63) - 1
    };
    Some((&s[digits..], magnitude <= limit))
}

/// `sscanf(line, "%u %u")` matching twice makes libmount read mountinfo.
fn guess_format(body: &[u8]) -> Format {
    let first = c_number(body).map(|(rest, _)| rest);
    if first.and_then(c_number).is_some() {
        Format::Mountinfo
    } else if body.starts_with(SWAPS_HEADER) {
        Format::Swaps
    } else {
        Format::Fstab
    }
}

/// freq and passno as libmount 2.38 reads them: a number that fits a long
/// and ends at a blank; measured, a number ending the line is accepted even
/// out of range. Returns what follows, or None for a parse error.
fn number_field(s: &[u8]) -> Option<&[u8]> {
    let (rest, in_range) = c_number(s)?;
    match rest.first() {
        None => Some(rest),
        Some(&b) if in_range && is_blank(b) => Some(rest),
        Some(_) => None,
    }
}

struct Fields<'a> {
    source: &'a [u8],
    target: &'a [u8],
    fstype: &'a [u8],
    options: Option<&'a [u8]>,
}

/// One fstab line (blanks before it already skipped), as
/// `mnt_parse_table_line`: three fields required, options, freq and passno
/// optional but numeric when present, anything after passno ignored.
fn parse_line(body: &[u8]) -> Result<Fields<'_>, Reason> {
    let (source, rest) = next_field(body);
    let (target, rest) = next_field(rest);
    let (fstype, rest) = next_field(rest);
    if source.is_empty() || target.is_empty() || fstype.is_empty() {
        return Err(Reason::TooFewFields);
    }
    let (options, rest) = next_field(rest);
    let mut fields = Fields {
        source,
        target,
        fstype,
        options: None,
    };
    if options.is_empty() {
        return Ok(fields);
    }
    fields.options = Some(options);
    let rest = skip_blanks(rest);
    if rest.is_empty() {
        return Ok(fields);
    }
    let rest = skip_blanks(number_field(rest).ok_or(Reason::BadFreq)?);
    if rest.is_empty() {
        return Ok(fields);
    }
    number_field(rest).ok_or(Reason::BadPassno)?;
    Ok(fields)
}

/// Decodes fstab's octal escapes (`\040` is a space), as libmount's
/// unmangle: exactly three octal digits, the value taken modulo 256; a
/// decoded NUL ends the field, as it ends libmount's C string.
fn unescape_bytes(field: &[u8]) -> Vec<u8> {
    let mut out = octal::unescape(field, &octal::LIBMOUNT).expect("LIBMOUNT never fails");
    if let Some(nul) = out.iter().position(|&b| b == 0) {
        out.truncate(nul);
    }
    out
}

/// Decodes fstab's octal escapes (`\040` is a space), as libmount's
/// unmangle: exactly three octal digits, the value taken modulo 256; a
/// decoded NUL ends the field. Bytes that are not UTF-8 come out lossily.
pub fn unescape(field: &str) -> String {
    lossy(&unescape_bytes(field.as_bytes()))
}

/// The mount point systemd ends up with for an absolute target: repeated
/// slashes, `.` components and trailing slashes go (`//var`, `/./var`,
/// `/var/.`, `/var/` are all `/var`), and `..` takes the component before it
/// away (`/srv/../var` is `/var`, `/..` is `/`), as systemd's path_simplify
/// and chase do when no component is a symlink — strata does not look at the
/// rootfs here. Anything not starting with '/' (`none`, `swap`) is returned
/// as is.
pub fn normalize_target(target: &str) -> String {
    if !target.starts_with('/') {
        return target.to_owned();
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The entry that mounts something at `target`, compared after
/// normalisation. libmount uses the last matching line; so does systemd.
pub fn find_target<'a>(entries: &'a [Entry], target: &str) -> Option<&'a Entry> {
    let target = normalize_target(target);
    entries
        .iter()
        .rev()
        .find(|e| normalize_target(&e.target) == target)
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

    fn lines(text: &[u8]) -> (Vec<usize>, Vec<(usize, Reason)>) {
        let p = parse_full(text);
        (
            p.entries.iter().map(|e| e.line).collect(),
            p.rejected.iter().map(|r| (r.line, r.reason)).collect(),
        )
    }

    #[test]
    fn comments_blanks_and_short_lines_are_not_entries() {
        let text = b"# c\n\n   \t# indented comment\nonly two\n/dev/vda / btrfs\n";
        let e = parse(text);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 5);
        assert_eq!(e[0].options, "defaults");
        assert_eq!(lines(text).1, [(4, Reason::TooFewFields)]);
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
        assert_eq!(normalize_target("/."), "/");
        assert_eq!(normalize_target("/.."), "/");
        assert_eq!(normalize_target("none"), "none");
    }

    #[test]
    fn targets_systemd_treats_as_one_path_normalise_alike() {
        for t in [
            "/var",
            "//var",
            "/./var",
            "/var/.",
            "/var/",
            "///var//",
            "/srv/../var",
        ] {
            assert_eq!(normalize_target(t), "/var", "{t}");
        }
        assert_eq!(normalize_target("/var/lib//docker/"), "/var/lib/docker");
        assert_eq!(normalize_target("/var/.hidden"), "/var/.hidden");
        assert_eq!(normalize_target("/var/..."), "/var/...");
    }

    #[test]
    fn find_target_sees_through_path_spellings() {
        let e = parse(b"a //var ext4\nb /opt/. xfs\nc /./srv/ xfs\n");
        assert_eq!(find_target(&e, "/var").unwrap().source, "a");
        assert_eq!(find_target(&e, "/opt").unwrap().source, "b");
        assert_eq!(find_target(&e, "/srv/").unwrap().source, "c");
        assert!(find_target(&e, "/home").is_none());
    }

    #[test]
    fn incomplete_escape_is_literal() {
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("\\011x"), "\tx");
        assert_eq!(unescape("\\0401"), " 1");
    }

    #[test]
    fn escapes_decode_to_bytes_and_nul_ends_the_field() {
        // \777 wraps to 0xff like libmount's char; \400 wraps to NUL.
        assert_eq!(unescape_bytes(b"/b\\777"), b"/b\xff");
        assert_eq!(unescape_bytes(b"/b\\400c"), b"/b");
        assert_eq!(unescape_bytes(b"/b\\000x"), b"/b");
        // A raw byte and an escaped one make one UTF-8 character.
        let e = parse(b"a /\xc3\\251 c\n");
        assert_eq!(e[0].target, "/\u{e9}");
        // A source keeps its bytes through octal escapes.
        let e = parse(b"\\303\xa9 /b c\n\xff\\ /d e\n");
        assert_eq!(e[0].source, "\\303\\251");
        assert_eq!(unescape(&e[0].source), "\u{e9}");
        assert_eq!(e[1].source, "\\377\\");
        // Options that decode to nothing are no options.
        assert_eq!(parse(b"a /b c \\000 1 2\n")[0].options, "defaults");
    }

    #[test]
    fn last_entry_wins() {
        let e = parse(b"a /home ext4\nb /home/ xfs\n");
        assert_eq!(find_target(&e, "/home").unwrap().source, "b");
    }

    #[test]
    fn freq_and_passno_must_be_numbers_as_strtol_reads_them() {
        for ok in [
            "0 0",
            "+1 -1",
            "08 99999999999999999999",
            "1",
            "\x0b1 \x0c2",
            "\r1 2",
            "0 0 extra",
            "0 0\r",
            "99999999999999999999",
            "0 9223372036854775807 ",
            "-9223372036854775808 0",
        ] {
            let text = format!("a /b c d {ok}\n");
            assert_eq!(lines(text.as_bytes()), (vec![1], vec![]), "{ok:?}");
        }
        for (bad, reason) in [
            ("x", Reason::BadFreq),
            ("1x 0", Reason::BadFreq),
            ("0x1 0", Reason::BadFreq),
            ("+ 0", Reason::BadFreq),
            ("1\x0b 2", Reason::BadFreq),
            ("0 x", Reason::BadPassno),
            ("0 +", Reason::BadPassno),
            ("0 \\061", Reason::BadPassno),
            ("0 0\r\r", Reason::BadPassno),
            // Out of a long's range is an error unless it ends the line.
            ("99999999999999999999 0", Reason::BadFreq),
            ("-9223372036854775809 0", Reason::BadFreq),
            ("0 9223372036854775808 ", Reason::BadPassno),
        ] {
            let text = format!("a /b c d {bad}\n");
            assert_eq!(
                lines(text.as_bytes()),
                (vec![], vec![(1, reason)]),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cr_is_dropped_only_before_the_newline() {
        let e = parse(b"a /b c d\r\nx /y\r z\n");
        assert_eq!(e[0].options, "d");
        assert_eq!(e[1].target, "/y\r");
        // A lone CR line is blank; CR then a space is a one-field line.
        assert_eq!(
            lines(b"\r\n\r \n"),
            (vec![], vec![(2, Reason::TooFewFields)])
        );
        // '#' after a CR is no comment.
        assert_eq!(lines(b"\r#x /b c\n").0, [1]);
    }

    #[test]
    fn nul_bytes_reject_a_line_unless_it_is_the_unterminated_last() {
        let (entries, rejected) = lines(b"# c\0x\na /b c\0d\nx /y z\nq /r s\r\0t");
        assert_eq!(entries, [3, 4]);
        assert_eq!(rejected, [(1, Reason::NulByte), (2, Reason::NulByte)]);
        assert_eq!(parse(b"q /r s\r\0t")[0].fstype, "s");
    }

    #[test]
    fn two_leading_numbers_make_libmount_read_mountinfo() {
        let p = parse_full(b"# c\n\n 1-2 x\na /b c\n");
        assert_eq!(p.format, Format::Mountinfo);
        assert_eq!(p.format_line, Some(3));
        assert!(p.entries.is_empty());
        assert_eq!(p.rejected.len(), 2);
        for first in ["1 2 ext4", "+1 +2", "1\x0b2 /b c", "\r1 0 /"] {
            let text = format!("{first}\na /b c\n");
            assert_eq!(
                parse_full(text.as_bytes()).format,
                Format::Mountinfo,
                "{first:?}"
            );
        }
        for first in ["12 /b c", "1x2 a b", "0x1 2 /b c", "10.0.0.1:/x /b nfs"] {
            let text = format!("{first}\na /b c\n");
            assert_eq!(
                parse_full(text.as_bytes()).format,
                Format::Fstab,
                "{first:?}"
            );
        }
        // A line rejected for its NUL byte is not looked at for the guess.
        assert_eq!(parse_full(b"1 2\0\na /b c\n").entries.len(), 1);
    }

    #[test]
    fn a_swaps_header_makes_libmount_read_swaps() {
        let p = parse_full(b"Filename\tType\n/dev/sda2 partition 1 0 -2\n");
        assert_eq!(p.format, Format::Swaps);
        assert!(p.entries.is_empty());
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].line, 2);
    }

    #[test]
    fn the_warning_names_the_line() {
        let p = parse_full(b"a /b c d 0 x\n");
        let w = p.rejected[0].to_string();
        assert!(w.contains("etc/fstab line 1 "), "{w}");
        assert!(w.contains("fsck pass"), "{w}");
        assert!(w.contains("\"a /b c d 0 x\""), "{w}");
    }
}
