//! Octal escapes in tools' output, decoded in one place.
//!
//! Several tools print a name's awkward bytes as a backslash and octal
//! digits: libmount and the kernel (fstab, mountinfo: `\040`), rsync
//! (`\#040`), getfattr (`\040`, `\\`) and GNU tar's `escape` quoting style
//! (`\40`, `\n`, `\\`). They differ only in the details a [`Style`] names,
//! so each reader passes its tool's style to [`unescape`] instead of
//! keeping a decoder of its own.

/// What a tool's escapes look like.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// What comes before the digits: `\`, or rsync's `\#`.
    lead: &'static [u8],
    /// The fewest digits an escape has (at most 3 are read): 3, or 1 for
    /// GNU tar, which stops at the first non-digit.
    min_digits: usize,
    /// What three digits over 255 (`\400`…`\777`) are.
    over_255: Over255,
    /// Escapes by a letter after the lead: (letter, byte).
    named: &'static [(u8, u8)],
    /// What any other lead is.
    other: Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over255 {
    /// The value modulo 256, as C's `char` takes it.
    Wrap,
    /// Not an escape: the lead's bytes stand for themselves.
    Literal,
    /// The text is not the tool's output.
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Other {
    /// The lead stands for itself.
    Literal,
    /// `\c` is `c` (C's quoting); a lead at the very end is invalid.
    Unquote,
}

/// libmount's unmangle, for fstab and /proc/self/mountinfo (the kernel
/// escapes space, tab, newline and backslash so): `\` and exactly three
/// octal digits, modulo 256; anything else is itself. A decoded NUL is
/// left for the caller (fstab ends the field there).
pub const LIBMOUNT: Style = Style {
    lead: b"\\",
    min_digits: 3,
    over_255: Over255::Wrap,
    named: &[],
    other: Other::Literal,
};

/// rsync's output (`--out-format %n`): `\#` and exactly three octal digits
/// for a byte; anything else, `\#400` and up too, is itself. rsync escapes
/// the backslash of a literal `\#ddd` in a name, so the result is exactly
/// the name's bytes.
pub const RSYNC: Style = Style {
    lead: b"\\#",
    min_digits: 3,
    over_255: Over255::Literal,
    named: &[],
    other: Other::Literal,
};

/// getfattr's names: `\` and exactly three octal digits (modulo 256), and
/// `\\` for a backslash; anything else is itself.
pub const GETFATTR: Style = Style {
    lead: b"\\",
    min_digits: 3,
    over_255: Over255::Wrap,
    named: &[(b'\\', b'\\')],
    other: Other::Literal,
};

/// GNU tar's `--quoting-style=escape`: C's letter escapes, `\\`, and one
/// to three octal digits for any other byte. A value over 255 or a
/// backslash at the end is invalid; `\c` for another letter is `c`.
pub const GNU_TAR: Style = Style {
    lead: b"\\",
    min_digits: 1,
    over_255: Over255::Invalid,
    named: &[
        (b'\\', b'\\'),
        (b'a', 0x07),
        (b'b', 0x08),
        (b'f', 0x0c),
        (b'n', b'\n'),
        (b'r', b'\r'),
        (b't', b'\t'),
        (b'v', 0x0b),
    ],
    other: Other::Unquote,
};

/// The escape at this byte offset cannot be the tool's output (only
/// [`GNU_TAR`] finds any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    pub at: usize,
}

/// `s` with `style`'s escapes decoded to the bytes they stand for.
/// Never fails for [`LIBMOUNT`], [`RSYNC`] and [`GETFATTR`].
pub fn unescape(s: &[u8], style: &Style) -> Result<Vec<u8>, Invalid> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if !s[i..].starts_with(style.lead) {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let after = i + style.lead.len();
        let digits = s[after..]
            .iter()
            .take(3)
            .take_while(|d| (b'0'..=b'7').contains(*d))
            .count();
        if digits >= style.min_digits {
            let v = s[after..after + digits]
                .iter()
                .fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            let byte = match (u8::try_from(v), style.over_255) {
                (Ok(b), _) => Some(b),
                (Err(_), Over255::Wrap) => Some(v as u8),
                (Err(_), Over255::Literal) => None,
                (Err(_), Over255::Invalid) => return Err(Invalid { at: i }),
            };
            if let Some(b) = byte {
                out.push(b);
                i = after + digits;
                continue;
            }
        } else if let Some(&c) = s.get(after) {
            if let Some(&(_, b)) = style.named.iter().find(|(n, _)| *n == c) {
                out.push(b);
                i = after + 1;
                continue;
            }
            if style.other == Other::Unquote {
                out.push(c);
                i = after + 1;
                continue;
            }
        } else if style.other == Other::Unquote {
            return Err(Invalid { at: i });
        }
        out.push(s[i]);
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &[u8], style: &Style) -> Vec<u8> {
        unescape(s, style).unwrap()
    }

    #[test]
    fn libmount_fstab_and_mountinfo() {
        // fstab fields and mountinfo paths as the kernel writes them.
        assert_eq!(ok(br"/my\040dir", &LIBMOUNT), b"/my dir");
        assert_eq!(ok(br"/a\011b\012c\134d", &LIBMOUNT), b"/a\tb\nc\\d");
        assert_eq!(
            ok(br"/tmp/my\040img/strata-mnt.1.q/fs", &LIBMOUNT),
            b"/tmp/my img/strata-mnt.1.q/fs"
        );
        // Exactly three digits; a fourth is itself.
        assert_eq!(ok(br"\0401", &LIBMOUNT), b" 1");
        // Incomplete escapes, a lone backslash and rsync's `\#` are literal.
        assert_eq!(ok(br"a\04", &LIBMOUNT), br"a\04");
        assert_eq!(ok(br"a\", &LIBMOUNT), br"a\");
        assert_eq!(ok(br"a\\b\#040", &LIBMOUNT), br"a\\b\#040");
        assert_eq!(ok(br"\8\n", &LIBMOUNT), br"\8\n");
        // Over 255 wraps like libmount's char; NUL is decoded, not cut.
        assert_eq!(ok(br"/b\777\400c", &LIBMOUNT), b"/b\xff\0c");
        assert_eq!(ok(br"\303\251", &LIBMOUNT), "\u{e9}".as_bytes());
        // Raw bytes pass through.
        assert_eq!(ok(b"/caf\xc3\xa9 \xff", &LIBMOUNT), b"/caf\xc3\xa9 \xff");
    }

    #[test]
    fn rsync_names() {
        assert_eq!(
            ok(br"etc/bad\#377\#012name with  spaces", &RSYNC),
            b"etc/bad\xff\nname with  spaces"
        );
        // A literal "\#123" in a name: rsync escapes its backslash.
        assert_eq!(ok(br"etc/a b\#134#123", &RSYNC), br"etc/a b\#123");
        // Not `\#` and three octal digits, or over 255: itself.
        assert_eq!(ok(br"a\b\#12x\#9999\#400", &RSYNC), br"a\b\#12x\#9999\#400");
        assert_eq!(ok(br"\040\\", &RSYNC), br"\040\\");
        assert_eq!(ok(br"\#000\#101", &RSYNC), b"\0A");
        assert_eq!(ok(br"x\#", &RSYNC), br"x\#");
        assert_eq!(ok(b"caf\xc3\xa9", &RSYNC), b"caf\xc3\xa9");
    }

    #[test]
    fn getfattr_names() {
        assert_eq!(ok(br"/srv/caf\351", &GETFATTR), b"/srv/caf\xe9");
        assert_eq!(ok(br"/a\\b\040c", &GETFATTR), b"/a\\b c");
        // Digits first: `\\123` is a backslash then "123"; `\134` too.
        assert_eq!(ok(br"\\123", &GETFATTR), br"\123");
        assert_eq!(ok(br"\134123", &GETFATTR), br"\123");
        // Over 255 wraps; incomplete and unknown escapes are themselves.
        assert_eq!(ok(br"\777", &GETFATTR), b"\xff");
        assert_eq!(ok(br"\12x\n\", &GETFATTR), br"\12x\n\");
    }

    #[test]
    fn gnu_tar_escape_style() {
        assert_eq!(
            ok(br"we ird\nx\\y\303\251", &GNU_TAR),
            b"we ird\nx\\y\xc3\xa9"
        );
        assert_eq!(ok(br"\a\b\f\n\r\t\v", &GNU_TAR), b"\x07\x08\x0c\n\r\t\x0b");
        // One to three digits, stopping at a non-digit or after three.
        assert_eq!(ok(br"\0x\12y\1234", &GNU_TAR), b"\0x\ny\x534");
        assert_eq!(ok(br"\377", &GNU_TAR), b"\xff");
        // Another letter is itself, without its backslash.
        assert_eq!(ok(br"\q\#", &GNU_TAR), b"q#");
        // Over 255, or a backslash at the end: not tar's output.
        assert_eq!(unescape(br"ab\400", &GNU_TAR), Err(Invalid { at: 2 }));
        assert_eq!(unescape(br"ab\", &GNU_TAR), Err(Invalid { at: 2 }));
    }

    #[test]
    fn the_lenient_styles_never_fail() {
        for style in [&LIBMOUNT, &RSYNC, &GETFATTR] {
            for s in [&br"\"[..], br"\#", br"\400", br"\#777", br"\\", br"a\\\"] {
                assert!(unescape(s, style).is_ok(), "{style:?} {s:?}");
            }
        }
    }
}
