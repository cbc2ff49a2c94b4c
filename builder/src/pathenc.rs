//! Paths (any bytes) as strings, losslessly: the one encoding of every path
//! strata writes into a manifest, a report or a message meant to be read
//! back (moved files, symlink targets, merged and left-out state entries).
//!
//! Linux names are bytes, not text: a rootfs may hold `caf\xe9` (Latin-1),
//! which JSON strings cannot carry. Valid UTF-8 is kept as is (so ordinary
//! paths read naturally), `%` becomes `%25`, and each byte that is not part
//! of valid UTF-8 becomes `%XX`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// A path (any bytes) as a string, losslessly: valid UTF-8 is kept as is,
/// except `%`, which becomes `%25`; every byte that is not part of valid
/// UTF-8 becomes `%XX` (two upper-case hex digits). [`decode_path`] gives
/// the bytes back. Examples: `/var/café` stays `/var/café`;
/// `/var/caf\xe9` (Latin-1) is `/var/caf%E9`; `/srv/100%` is `/srv/100%25`.
pub fn encode_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bytes an [`encode_path`] string stands for; None when a `%` is not
/// followed by two hex digits.
pub fn decode_path(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// [`decode_path`] as a path.
pub fn decode_to_path(s: &str) -> Option<PathBuf> {
    decode_path(s).map(|b| PathBuf::from(OsString::from_vec(b)))
}

/// The file an encoded absolute path (`/var/lib/x`, as the booted system
/// sees it) names below `root` (the `state/` directory, whose children are
/// the state subvolumes mounted at `/<dir>`).
pub fn path_below(root: &Path, encoded: &str) -> std::io::Result<PathBuf> {
    let rel = decode_to_path(encoded).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad path encoding {encoded:?}"),
        )
    })?;
    Ok(root.join(rel.strip_prefix("/").unwrap_or(&rel)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn path_encoding_is_lossless() {
        for (bytes, text) in [
            (&b"/var/lib/foo"[..], "/var/lib/foo"),
            ("/var/café".as_bytes(), "/var/café"),
            (b"/var/caf\xe9", "/var/caf%E9"),
            (b"/srv/100%", "/srv/100%25"),
            (b"/srv/%E9", "/srv/%25E9"),
            (b"/x/\xff\xfe\n", "/x/%FF%FE\n"),
            // A truncated UTF-8 sequence: each byte on its own.
            (b"/x/\xe2\x82", "/x/%E2%82"),
        ] {
            assert_eq!(encode_path(bytes), text);
            assert_eq!(decode_path(text).as_deref(), Some(bytes));
        }
        assert_eq!(decode_path("/bad%4"), None);
        assert_eq!(decode_path("/bad%zz"), None);
        assert_eq!(
            decode_to_path("/a%FF").unwrap().as_os_str().as_bytes(),
            b"/a\xff"
        );
    }
}
