//! `state-contract`: what the user says must survive does. A test file lists
//! guest paths in `[state] preserve` (absolute, shell globs allowed); after
//! the user's setup strata records each one recursively, and after every
//! later phase (reboot, power cut, upgrade, rollback, a scenario) records
//! again and compares. Any difference fails, naming each path and what
//! changed.
//!
//! Recorded for every entry: type, mode, owner, the size and sha256 of
//! regular files, symlink targets, device numbers of device nodes, every
//! xattr (ACLs and file capabilities are xattrs), and which recorded paths
//! share an inode (hardlink groups).
//!
//! Not recorded, on purpose:
//! - timestamps. atime moves when anything reads a file (the recording's own
//!   sha256sum does, under relatime); ctime moves on any chmod or link and
//!   no copy can keep it; a directory's mtime moves whenever something
//!   creates and removes a lock or temp file in it, though nothing listed
//!   changed. What users mean by "preserved" is the data and the metadata
//!   that decide access, which the content hash and the rest cover.
//! - inode numbers and `st_dev`: an upgrade may copy state (new inodes),
//!   and btrfs hands out a subvolume's anonymous device number at mount
//!   time. Hardlinks are recorded as groups of paths instead.
//! - directory sizes (the filesystem's bookkeeping: entries that come and
//!   go are reported as such) and link counts to paths outside the record.

use super::guest::{parse_getfattr, GETFATTR_XARGS, NO_GETFATTR};
use crate::machine::{Machine, MachineError};
use crate::report::{human_bytes, CheckResult, Status};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use strata_builder::pathenc::encode_path;

/// The check's name in the report (the engine owns `CheckId`).
pub const NAME: &str = "state-contract";

/// Changes shown in a failing result's evidence; the rest are counted.
pub const EVIDENCE_CAP: usize = 20;

/// The first field of a record's output: its format, so an output that is
/// not one (a different script, a shell that mangles NULs) is told apart.
const MAGIC: &[u8] = b"#strata-state 1";

/// The type of an entry, from `find -printf %y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

impl Kind {
    fn from_find(c: u8) -> Option<Kind> {
        Some(match c {
            b'f' => Kind::File,
            b'd' => Kind::Dir,
            b'l' => Kind::Symlink,
            b'c' => Kind::Char,
            b'b' => Kind::Block,
            b'p' => Kind::Fifo,
            b's' => Kind::Socket,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Char => "character device",
            Kind::Block => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One recorded entry. Paths and names are in `encode_path` form (lossless
/// for any bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`%m`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only (0 otherwise).
    pub size: u64,
    /// Regular files, lower-case hex; None when the file could not be read.
    pub sha256: Option<String>,
    /// Symlinks only.
    pub target: Option<String>,
    /// Character and block devices: (major, minor).
    pub device: Option<(u32, u32)>,
    /// Name -> lower-case hex value, every namespace.
    pub xattrs: BTreeMap<String, String>,
    /// The other recorded paths that share this entry's inode.
    pub hardlinks: BTreeSet<String>,
}

/// One recording of the preserved paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Patterns that matched nothing, as the test file wrote them.
    pub unmatched: Vec<String>,
    /// Every entry under every match, keyed by path.
    pub entries: BTreeMap<String, Entry>,
}

impl Record {
    /// Regular files recorded, and the bytes their hashes cover.
    pub fn files_and_bytes(&self) -> (usize, u64) {
        self.entries
            .values()
            .filter(|e| e.kind == Kind::File)
            .fold((0, 0), |(n, b), e| (n + 1, b + e.size))
    }

    /// The first recording must find every pattern: a pattern that matches
    /// nothing is a mistake in the test file (exit 2), not a verdict.
    pub fn require_matched(&self) -> Result<(), Unmatched> {
        if self.unmatched.is_empty() {
            Ok(())
        } else {
            Err(Unmatched {
                patterns: self.unmatched.clone(),
            })
        }
    }
}

/// `[state] preserve` patterns that matched nothing after setup: an input
/// error of the test file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "[state] preserve: {} matched nothing in the guest after setup",
    quoted_list(patterns)
)]
pub struct Unmatched {
    pub patterns: Vec<String>,
}

fn quoted_list(p: &[String]) -> String {
    p.iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a `[state] preserve` pattern cannot be used, for the test file's
/// reader: it must be absolute (the guest agent's working directory is
/// nobody's business) and a shell word (no NUL).
pub fn pattern_error(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        Some(format!("{p:?} is not an absolute path"))
    } else if p.contains('\0') {
        Some(format!("{p:?} contains a NUL byte"))
    } else {
        None
    }
}

/// The pattern as a shell word: `*`, `?` and bracket expressions stay
/// globs, everything else is single-quoted (spaces, quotes, `$`, `\`,
/// newlines are literal). Inside brackets a leading `!`/`^`, `-` (ranges)
/// and `]` stay bare and the rest is quoted: dash matches a quoted
/// character in a bracket literally. A trailing `/` is dropped so that
/// find names entries `dir/x`, not `dir//x`.
fn shell_glob(pattern: &str) -> String {
    let p = pattern.trim_end_matches('/');
    let p = if p.is_empty() { "/" } else { p };
    let c: Vec<char> = p.chars().collect();
    let mut out = String::new();
    let mut lit = String::new();
    let flush = |lit: &mut String, out: &mut String| {
        if !lit.is_empty() {
            out.push_str(&quote(lit));
            lit.clear();
        }
    };
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '*' | '?' => {
                flush(&mut lit, &mut out);
                out.push(c[i]);
            }
            '[' => match bracket_end(&c, i) {
                Some(end) => {
                    flush(&mut lit, &mut out);
                    out.push('[');
                    let mut j = i + 1;
                    if matches!(c[j], '!' | '^') {
                        out.push(c[j]);
                        j += 1;
                    }
                    for &ch in &c[j..end] {
                        if ch == '-' || ch == ']' || ch.is_ascii_alphanumeric() {
                            out.push(ch);
                        } else {
                            out.push_str(&quote(&ch.to_string()));
                        }
                    }
                    out.push(']');
                    i = end;
                }
                None => lit.push('['),
            },
            ch => lit.push(ch),
        }
        i += 1;
    }
    flush(&mut lit, &mut out);
    out
}

/// The index of the `]` closing the bracket expression opened at `open`
/// (a `]` right after `[`, `[!` or `[^` is a member, not the end).
fn bracket_end(c: &[char], open: usize) -> Option<usize> {
    let mut j = open + 1;
    if matches!(c.get(j), Some('!' | '^')) {
        j += 1;
    }
    if c.get(j) == Some(&']') {
        j += 1;
    }
    (j..c.len()).find(|&k| c[k] == ']')
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The one guest command that records every pattern (one agent round trip
/// however many files): plain sh, coreutils, findutils and getfattr. Its
/// output is NUL-separated fields, so any filename bytes pass; see
/// [`parse_record`]. It opens regular files only (sha256sum); fifos and
/// device nodes are only ever stat'ed (find, stat) or read by name
/// (getfattr's lgetxattr).
///
/// Each pattern is expanded by the guest's shell; a pattern that matches
/// nothing comes back as `U`, itself. The matches are walked by find four
/// times, each walk one process (plus xargs batches): stat fields, device
/// numbers, hashes, xattrs. Callers check patterns with [`pattern_error`];
/// one that fails it is reported unmatched rather than recorded.
pub fn record_script(patterns: &[String]) -> String {
    let mut s = format!(
        "set -u\n\
         command -v getfattr >/dev/null || {{ echo 'getfattr not found in the guest (Debian package attr)' >&2; exit {NO_GETFATTR}; }}\n\
         printf '%s\\0' '{magic}'\n\
         set --\n",
        magic = String::from_utf8_lossy(MAGIC)
    );
    for p in patterns {
        // A NUL cannot travel in the command; the pattern is reported with it spelled out.
        let unmatched = format!("printf 'U\\0%s\\0' {}", quote(&p.replace('\0', "\\0")));
        if pattern_error(p).is_some() {
            s.push_str(&unmatched);
            s.push('\n');
            continue;
        }
        // `-L`: a dangling symlink is a match too (`-e` follows it).
        s.push_str(&format!(
            "m=\nfor p in {}; do if [ -e \"$p\" ] || [ -L \"$p\" ]; then set -- \"$@\" \"$p\"; m=1; fi; done\n[ -n \"$m\" ] || {unmatched}\n",
            shell_glob(p)
        ));
    }
    s.push_str(&format!(
        r#"if [ $# -gt 0 ]; then
printf '#stat\0'
find "$@" -printf '%y %m %U %G %s %D %i %n\0%p\0%l\0' || {{ echo "find failed: the record is incomplete" >&2; exit 1; }}
printf '#dev\0'
find "$@" \( -type b -o -type c \) -print0 | xargs -0 -r stat --printf '%t %T\0%n\0' --
printf '#sha256\0'
find "$@" -type f -print0 | xargs -0 -r sha256sum -z --
printf '#xattr\0'
find "$@" -print0 | {GETFATTR_XARGS} 2>/dev/null
printf '\0'
fi
printf '#end\0'
"#
    ));
    s
}

/// Why a record's output could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "not a state record (it does not start with {:?})",
        String::from_utf8_lossy(MAGIC)
    )]
    NotARecord,
    #[error(
        "the state record ends early ({0} bytes, no end marker): the guest command was cut off"
    )]
    Truncated(usize),
    #[error("bad state record field {field:?} ({why})")]
    Malformed { field: String, why: &'static str },
}

fn malformed(field: &[u8], why: &'static str) -> ParseError {
    ParseError::Malformed {
        field: String::from_utf8_lossy(field).into_owned(),
        why,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Section {
    Unmatched,
    Stat,
    Dev,
    Sha256,
    Xattr,
}

/// Reads what [`record_script`] printed.
pub fn parse_record(out: &[u8]) -> Result<Record, ParseError> {
    let mut fields = out.split(|b| *b == 0);
    if fields.next() != Some(MAGIC) {
        return Err(ParseError::NotARecord);
    }
    let mut record = Record::default();
    // (st_dev, inode) -> paths, for the hardlink groups.
    let mut inodes: HashMap<(u64, u64), BTreeSet<String>> = HashMap::new();
    let mut devices = Vec::new();
    let mut hashes = Vec::new();
    let mut xattrs = HashMap::new();
    let mut section = Section::Unmatched;
    let mut ended = false;
    let truncated = || ParseError::Truncated(out.len());
    while let Some(field) = fields.next() {
        // Every section's records start with a field that cannot start
        // with `#` (a type letter, hex, `U`), so a marker is unambiguous.
        if field.first() == Some(&b'#') {
            section = match field {
                b"#stat" => Section::Stat,
                b"#dev" => Section::Dev,
                b"#sha256" => Section::Sha256,
                b"#xattr" => {
                    // One field: getfattr's text (its own lines start with
                    // `#`, so it is taken here, not looked at as a marker).
                    xattrs = parse_getfattr(fields.next().ok_or_else(truncated)?);
                    Section::Xattr
                }
                b"#end" => {
                    ended = true;
                    break;
                }
                _ => return Err(malformed(field, "unknown section")),
            };
            continue;
        }
        match section {
            Section::Unmatched => {
                if field != b"U" {
                    return Err(malformed(field, "expected U"));
                }
                let p = fields.next().ok_or_else(truncated)?;
                record
                    .unmatched
                    .push(String::from_utf8_lossy(p).into_owned());
            }
            Section::Stat => {
                let path = fields.next().ok_or_else(truncated)?;
                let target = fields.next().ok_or_else(truncated)?;
                let (path, entry, inode, links) = parse_stat(field, path, target)?;
                if entry.kind != Kind::Dir && links > 1 {
                    inodes.entry(inode).or_default().insert(path.clone());
                }
                record.entries.insert(path, entry);
            }
            Section::Dev => {
                let path = fields.next().ok_or_else(truncated)?;
                let text = String::from_utf8_lossy(field);
                let nums: Vec<u32> = text
                    .split(' ')
                    .filter_map(|n| u32::from_str_radix(n, 16).ok())
                    .collect();
                let [major, minor] = nums[..] else {
                    return Err(malformed(field, "expected hex major and minor"));
                };
                devices.push((encode_path(path), (major, minor)));
            }
            Section::Sha256 => {
                // `sha256sum -z`: "HASH  NAME", the name unescaped.
                let Some(sep) = field.windows(2).position(|w| w == b"  ") else {
                    return Err(malformed(field, "expected a sha256sum line"));
                };
                let hash = String::from_utf8_lossy(&field[..sep]).to_ascii_lowercase();
                hashes.push((encode_path(&field[sep + 2..]), hash));
            }
            Section::Xattr => return Err(malformed(field, "after the xattrs")),
        }
    }
    if !ended {
        return Err(ParseError::Truncated(out.len()));
    }
    for (path, dev) in devices {
        if let Some(e) = record.entries.get_mut(&path) {
            e.device = Some(dev);
        }
    }
    for (path, hash) in hashes {
        if let Some(e) = record.entries.get_mut(&path) {
            e.sha256 = Some(hash);
        }
    }
    for (path, x) in xattrs {
        if let Some(e) = record.entries.get_mut(&path) {
            e.xattrs = x;
        }
    }
    for group in inodes.into_values().filter(|g| g.len() > 1) {
        for p in &group {
            if let Some(e) = record.entries.get_mut(p) {
                e.hardlinks = group.iter().filter(|q| *q != p).cloned().collect();
            }
        }
    }
    Ok(record)
}

/// One `find -printf '%y %m %U %G %s %D %i %n\0%p\0%l\0'` record: the
/// entry, its (st_dev, inode) and link count.
fn parse_stat(
    head: &[u8],
    path: &[u8],
    target: &[u8],
) -> Result<(String, Entry, (u64, u64), u64), ParseError> {
    let text = std::str::from_utf8(head).map_err(|_| malformed(head, "not text"))?;
    let f: Vec<&str> = text.split(' ').collect();
    let bad = || malformed(head, "expected 8 stat fields");
    if f.len() != 8 || f[0].len() != 1 {
        return Err(bad());
    }
    let kind =
        Kind::from_find(f[0].as_bytes()[0]).ok_or_else(|| malformed(head, "unknown type"))?;
    let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
    let id = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let entry = Entry {
        kind,
        mode: u32::from_str_radix(f[1], 8).map_err(|_| bad())?,
        uid: id(f[2])?,
        gid: id(f[3])?,
        size: if kind == Kind::File { num(f[4])? } else { 0 },
        sha256: None,
        target: (kind == Kind::Symlink).then(|| encode_path(target)),
        device: None,
        xattrs: BTreeMap::new(),
        hardlinks: BTreeSet::new(),
    };
    Ok((
        encode_path(path),
        entry,
        (num(f[5])?, num(f[6])?),
        num(f[7])?,
    ))
}

/// Records the patterns in the guest: one guest command. A guest without
/// getfattr, a failed walk or an output that cannot be read is a failed
/// guest command (the check fails naming it, see
/// `checks::verdict_of_failed_command`).
pub async fn record(m: &mut Machine, patterns: &[String]) -> Result<Record, MachineError> {
    const COMMAND: &str = "record the [state] preserve paths (find, sha256sum, getfattr)";
    let out = m.exec(&record_script(patterns)).await?;
    if !out.success() {
        return Err(MachineError::CommandFailed {
            command: COMMAND.into(),
            code: out
                .exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| format!("signal {:?}", out.signal)),
            stderr: out.stderr_str().trim().to_owned(),
        });
    }
    let mut record = parse_record(&out.stdout).map_err(|e| MachineError::CommandFailed {
        command: COMMAND.into(),
        code: "0".into(),
        stderr: e.to_string(),
    })?;
    record.forget_strata_tokens();
    Ok(record)
}

impl Record {
    /// strata writes its own tokens into the state dirs between phases
    /// (persistence, the lifecycle): they are the run's, not the user's
    /// state, and a preserved state dir must not fail for holding them.
    pub fn forget_strata_tokens(&mut self) {
        let ours = |p: &str| {
            let base = p.rsplit('/').next().unwrap_or(p);
            base.starts_with(crate::checks::persistence::TOKEN_FILE)
                || base.starts_with(crate::tokens::TOKEN_FILE)
        };
        self.entries.retain(|p, _| !ours(p));
        for e in self.entries.values_mut() {
            e.hardlinks.retain(|p| !ours(p));
        }
    }
}

/// What changed about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// Gone; `below`: recorded entries under it, gone with it (not listed).
    Missing {
        kind: Kind,
        below: usize,
    },
    /// Not there before; `below`: new entries under it (not listed).
    New {
        kind: Kind,
        below: usize,
    },
    Type {
        before: Kind,
        after: Kind,
    },
    Mode {
        before: u32,
        after: u32,
    },
    Owner {
        before: (u32, u32),
        after: (u32, u32),
    },
    /// sha256 (None: unreadable) and size.
    Content {
        before: Option<String>,
        after: Option<String>,
        sizes: (u64, u64),
    },
    Target {
        before: String,
        after: String,
    },
    Device {
        before: (u32, u32),
        after: (u32, u32),
    },
    XattrRemoved {
        name: String,
    },
    XattrAdded {
        name: String,
    },
    XattrChanged {
        name: String,
        before: String,
        after: String,
    },
    /// No longer shares its inode with this path (which still exists).
    Unlinked {
        from: String,
    },
    /// Now shares its inode with this path (which existed before).
    Linked {
        with: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub what: What,
}

fn short_hash(h: &Option<String>) -> String {
    match h {
        Some(h) => format!("{}…", &h[..h.len().min(12)]),
        None => "unreadable".into(),
    }
}

/// Two xattr values for a person: whole when they fit on a line (an ACL
/// with a few entries does), else a window from just before where they
/// first differ, with their lengths (ACLs of many entries share a long
/// header, so their starts would look equal).
fn two_hex(before: &str, after: &str) -> (String, String) {
    const WHOLE: usize = 128;
    if before.len() <= WHOLE && after.len() <= WHOLE {
        return (format!("0x{before}"), format!("0x{after}"));
    }
    let first = before
        .bytes()
        .zip(after.bytes())
        .position(|(b, a)| b != a)
        .unwrap_or(before.len().min(after.len()));
    let start = (first / 2).saturating_sub(4) * 2;
    let window = |h: &str| {
        let end = h.len().min(start + 48);
        let pre = if start > 0 { "…" } else { "" };
        let post = if end < h.len() { "…" } else { "" };
        format!(
            "0x{pre}{}{post} ({} bytes)",
            h.get(start..end).unwrap_or(""),
            h.len() / 2
        )
    };
    (window(before), window(after))
}

/// What an xattr is, for the ones users know by another name.
fn xattr_name(name: &str) -> String {
    match name {
        "system.posix_acl_access" => format!("{name} (ACL)"),
        "system.posix_acl_default" => format!("{name} (default ACL)"),
        "security.capability" => format!("{name} (file capabilities)"),
        _ => name.to_owned(),
    }
}

fn below(kind: Kind, n: usize) -> String {
    match n {
        0 => String::new(),
        1 => format!(" ({kind} with 1 entry)"),
        n => format!(" ({kind} with {n} entries)"),
    }
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Missing { kind, below: n } => write!(f, "missing{}", below(*kind, *n)),
            What::New { kind, below: 1 } => write!(f, "new {kind} with 1 entry"),
            What::New { kind, below: 0 } => write!(f, "new {kind}"),
            What::New { kind, below: n } => write!(f, "new {kind} with {n} entries"),
            What::Type { before, after } => write!(f, "type {before} → {after}"),
            What::Mode { before, after } => write!(f, "mode {before:04o} → {after:04o}"),
            What::Owner { before, after } => write!(
                f,
                "owner {}:{} → {}:{}",
                before.0, before.1, after.0, after.1
            ),
            What::Content {
                before,
                after,
                sizes: (b, a),
            } => {
                write!(
                    f,
                    "content changed (sha256 {} → {}",
                    short_hash(before),
                    short_hash(after)
                )?;
                if b != a {
                    write!(f, ", {b} → {a} bytes")?;
                }
                f.write_str(")")
            }
            What::Target { before, after } => {
                write!(f, "symlink target {before:?} → {after:?}")
            }
            What::Device { before, after } => write!(
                f,
                "device {}:{} → {}:{}",
                before.0, before.1, after.0, after.1
            ),
            What::XattrRemoved { name } => write!(f, "xattr {} removed", xattr_name(name)),
            What::XattrAdded { name } => write!(f, "xattr {} added", xattr_name(name)),
            What::XattrChanged {
                name,
                before,
                after,
            } => {
                let (b, a) = two_hex(before, after);
                write!(f, "xattr {} changed ({b} → {a})", xattr_name(name))
            }
            What::Unlinked { from } => write!(f, "no longer hardlinked with {}", shown(from)),
            What::Linked { with } => write!(f, "now hardlinked with {}", shown(with)),
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", shown(&self.path), self.what)
    }
}

/// A path on one evidence line: as it is, or quoted with escapes when it
/// holds a newline or another control character.
fn shown(path: &str) -> String {
    if path.chars().any(char::is_control) {
        format!("{path:?}")
    } else {
        path.to_owned()
    }
}

/// The nearest ancestor of `path` in `dirs` (paths are `/`-separated;
/// `encode_path` never produces a `/` of its own).
fn ancestor_in(path: &str, dirs: &HashMap<&str, usize>) -> Option<usize> {
    path.match_indices('/')
        .rev()
        .filter(|(i, _)| *i > 0)
        .find_map(|(i, _)| dirs.get(&path[..i]).copied())
}

/// Entries only in `from` (not in `other`), as Missing or New changes; the
/// entries under a directory that is reported are counted in it, not listed.
fn only_in(
    from: &BTreeMap<String, Entry>,
    other: &BTreeMap<String, Entry>,
    make: fn(Kind, usize) -> What,
) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    let mut dirs: HashMap<&str, usize> = HashMap::new();
    for (path, e) in from.iter().filter(|(p, _)| !other.contains_key(*p)) {
        if let Some(i) = ancestor_in(path, &dirs) {
            match &mut out[i].what {
                What::Missing { below, .. } | What::New { below, .. } => *below += 1,
                _ => unreachable!("only_in makes Missing and New"),
            }
            continue;
        }
        if e.kind == Kind::Dir {
            dirs.insert(path, out.len());
        }
        out.push(Change {
            path: path.clone(),
            what: make(e.kind, 0),
        });
    }
    out
}

/// What changed about one path present in both records.
fn entry_changes(path: &str, b: &Entry, a: &Entry, after: &Record, before: &Record) -> Vec<What> {
    if b.kind != a.kind {
        return vec![What::Type {
            before: b.kind,
            after: a.kind,
        }];
    }
    let mut w = Vec::new();
    // A symlink's own mode is always 0777 on Linux.
    if b.mode != a.mode && b.kind != Kind::Symlink {
        w.push(What::Mode {
            before: b.mode,
            after: a.mode,
        });
    }
    if (b.uid, b.gid) != (a.uid, a.gid) {
        w.push(What::Owner {
            before: (b.uid, b.gid),
            after: (a.uid, a.gid),
        });
    }
    if b.kind == Kind::File && (b.sha256 != a.sha256 || b.size != a.size) {
        w.push(What::Content {
            before: b.sha256.clone(),
            after: a.sha256.clone(),
            sizes: (b.size, a.size),
        });
    }
    if b.target != a.target {
        w.push(What::Target {
            before: b.target.clone().unwrap_or_default(),
            after: a.target.clone().unwrap_or_default(),
        });
    }
    if let (Some(bd), Some(ad)) = (b.device, a.device) {
        if bd != ad {
            w.push(What::Device {
                before: bd,
                after: ad,
            });
        }
    }
    for (name, bv) in &b.xattrs {
        match a.xattrs.get(name) {
            None => w.push(What::XattrRemoved { name: name.clone() }),
            Some(av) if av != bv => w.push(What::XattrChanged {
                name: name.clone(),
                before: bv.clone(),
                after: av.clone(),
            }),
            Some(_) => {}
        }
    }
    for name in a.xattrs.keys().filter(|n| !b.xattrs.contains_key(*n)) {
        w.push(What::XattrAdded { name: name.clone() });
    }
    // Each pair once, under its first path; a partner that is gone or new
    // is reported as such.
    for q in b.hardlinks.difference(&a.hardlinks) {
        if q.as_str() > path && after.entries.contains_key(q) {
            w.push(What::Unlinked { from: q.clone() });
        }
    }
    for q in a.hardlinks.difference(&b.hardlinks) {
        if q.as_str() > path && before.entries.contains_key(q) {
            w.push(What::Linked { with: q.clone() });
        }
    }
    w
}

/// Every difference between two records, in path order. Patterns that
/// matched nothing are not compared here: what they matched before and
/// not now is missing.
pub fn compare(before: &Record, after: &Record) -> Vec<Change> {
    let mut out = only_in(&before.entries, &after.entries, |kind, below| {
        What::Missing { kind, below }
    });
    out.extend(only_in(&after.entries, &before.entries, |kind, below| {
        What::New { kind, below }
    }));
    for (path, b) in &before.entries {
        if let Some(a) = after.entries.get(path) {
            out.extend(
                entry_changes(path, b, a, after, before)
                    .into_iter()
                    .map(|what| Change {
                        path: path.clone(),
                        what,
                    }),
            );
        }
    }
    // Stable: one path's changes keep their order.
    out.sort_by(|x, y| x.path.cmp(&y.path));
    out
}

/// Fewest changes one evidence line stands for: a run of this many that
/// are the same change to entries of one directory (a recursive chown, a
/// cache emptied) is one line, so the evidence cap leaves room for others.
const GROUP_MIN: usize = 3;

/// The changes as evidence lines, each with how many changes it stands for.
fn evidence_lines(changes: &[Change]) -> Vec<(usize, String)> {
    let parent = |p: &str| p.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
    let mut out = Vec::new();
    let mut i = 0;
    while i < changes.len() {
        let c = &changes[i];
        let dir = parent(&c.path);
        let run = changes[i..]
            .iter()
            .take_while(|d| d.what == c.what && parent(&d.path) == dir)
            .count();
        if run >= GROUP_MIN {
            let name = |d: &Change| shown(&d.path[dir.len() + 1..]);
            out.push((
                run,
                format!(
                    "{run} entries in {} ({} … {}): {}",
                    shown(&dir),
                    name(c),
                    name(&changes[i + run - 1]),
                    c.what
                ),
            ));
            i += run;
        } else {
            out.push((1, c.to_string()));
            i += 1;
        }
    }
    out
}

/// The verdict after `phase` ("reboot", "upgrade", a scenario's name): pass
/// when nothing changed, saying how much was compared; else each change,
/// the first [`EVIDENCE_CAP`] of them.
pub fn judge(phase: &str, before: &Record, after: &Record) -> CheckResult {
    let changes = compare(before, after);
    let (files, bytes) = before.files_and_bytes();
    let n = before.entries.len();
    if changes.is_empty() {
        return CheckResult::new(
            NAME,
            Status::Pass,
            format!(
                "{n} preserved entries unchanged after {phase} ({files} files, {} compared by sha256)",
                human_bytes(bytes)
            ),
            Vec::new(),
        );
    }
    let lines = evidence_lines(&changes);
    let shown: usize = lines.iter().take(EVIDENCE_CAP).map(|(n, _)| n).sum();
    let mut evidence: Vec<String> = lines
        .into_iter()
        .take(EVIDENCE_CAP)
        .map(|(_, l)| l)
        .collect();
    if shown < changes.len() {
        evidence.push(format!("and {} more change(s)", changes.len() - shown));
    }
    CheckResult::new(
        NAME,
        Status::Fail,
        format!(
            "{} change(s) to the preserved state after {phase} ({n} entries recorded before)",
            changes.len()
        ),
        evidence,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::fs;
    use std::fs::hard_link;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{chown, symlink, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Runs the guest script on the host (same sh, coreutils, findutils
    /// and getfattr as the guest) and reads its output.
    fn host_record(patterns: &[String]) -> Record {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(record_script(patterns))
            .output()
            .expect("run /bin/sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(NO_GETFATTR as i32),
            "getfattr is missing on this host: install the attr package to run these tests ({stderr})"
        );
        assert!(
            out.status.success(),
            "record script: {}: {stderr}",
            out.status
        );
        parse_record(&out.stdout).expect("parse the record")
    }

    fn p(path: &Path) -> String {
        path.to_str().unwrap().to_owned()
    }

    const ACL: &str =
        "0200000001000600ffffffff02000400e803000004000400ffffffff10000400ffffffff20000400ffffffff";
    const CAP: &str = "0100000200040000000000000000000000000000";

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    fn setx(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
            .unwrap_or_else(|e| panic!("setting xattr {name} on {}: {e}", path.display()));
    }

    fn mknod(path: &Path, kind: rustix::fs::FileType, dev: (u32, u32)) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            kind,
            rustix::fs::Mode::from_raw_mode(0o644),
            rustix::fs::makedev(dev.0, dev.1),
        )
        .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
    }

    fn write(path: &Path, content: &str, mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    const ODD: &[u8] = b"odd\nname with space\xe9";

    /// A tree with one of everything the contract keeps.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let app = t.path().join("app");
        fs::create_dir(&app).unwrap();
        fs::set_permissions(&app, fs::Permissions::from_mode(0o755)).unwrap();
        write(&app.join("db"), "hello db", 0o644);
        setx(&app.join("db"), "user.x", b"hi");
        setx(&app.join("db"), "system.posix_acl_access", &unhex(ACL));
        write(&app.join("cap"), "cap", 0o755);
        setx(&app.join("cap"), "security.capability", &unhex(CAP));
        write(&app.join("pair1"), "pair", 0o644);
        hard_link(app.join("pair1"), app.join("pair2")).unwrap();
        write(&app.join("solo"), "same", 0o644);
        write(&app.join("twin"), "same", 0o644);
        write(&app.join(OsStr::from_bytes(ODD)), "odd", 0o644);
        symlink("db", app.join("link")).unwrap();
        mknod(&app.join("fifo"), rustix::fs::FileType::Fifo, (0, 0));
        mknod(
            &app.join("null"),
            rustix::fs::FileType::CharacterDevice,
            (1, 3),
        );
        fs::create_dir_all(app.join("sub/deeper")).unwrap();
        fs::set_permissions(app.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
        write(&app.join("sub/deep"), "deep", 0o600);
        write(&app.join("sub/deeper/x"), "x", 0o600);
        (t, app)
    }

    /// The changes one mutation of a fresh tree makes, rendered, with the
    /// temporary directory cut off the paths.
    fn after(mutate: impl FnOnce(&Path)) -> Vec<String> {
        let (t, app) = tree();
        let patterns = [p(&app)];
        let before = host_record(&patterns);
        assert!(before.unmatched.is_empty());
        mutate(&app);
        let after = host_record(&patterns);
        let root = p(t.path());
        compare(&before, &after)
            .iter()
            .map(|c| c.to_string().replace(&root, ""))
            .collect()
    }

    #[test]
    fn the_tree_is_recorded_whole() {
        let (_t, app) = tree();
        let r = host_record(&[p(&app)]);
        let at = |rel: &str| &r.entries[&format!("{}/{rel}", p(&app))];
        assert_eq!(r.entries.len(), 15, "{:#?}", r.entries.keys());
        assert_eq!(at("db").kind, Kind::File);
        assert_eq!(at("db").size, 8);
        assert_eq!(at("db").xattrs["user.x"], "6869");
        assert_eq!(at("db").xattrs["system.posix_acl_access"], ACL);
        assert_eq!(at("cap").xattrs["security.capability"], CAP);
        assert_eq!(at("cap").mode, 0o755);
        let pair2 = format!("{}/pair2", p(&app));
        assert_eq!(at("pair1").hardlinks, BTreeSet::from([pair2]));
        assert!(at("solo").hardlinks.is_empty());
        assert_eq!(at("link").target.as_deref(), Some("db"));
        assert_eq!(at("fifo").kind, Kind::Fifo);
        assert_eq!(at("fifo").sha256, None);
        assert_eq!(at("null").device, Some((1, 3)));
        assert_eq!(at("null").kind, Kind::Char);
        assert_eq!(at("sub").mode, 0o750);
        let odd = at("odd\nname with space%E9");
        assert_eq!(
            odd.sha256.as_deref().map(|h| &h[..12]),
            Some("990cb8ebd0af")
        );
        assert_eq!(r.files_and_bytes(), (9, 8 + 3 + 4 * 4 + 3 + 4 + 1));
    }

    #[test]
    fn an_untouched_tree_compares_equal_timestamps_and_reads_included() {
        let changes = after(|app| {
            // Reading (atime), touching (mtime, ctime) and a temp file
            // that comes and goes (the directory's mtime) change nothing
            // the contract keeps.
            fs::read(app.join("db")).unwrap();
            let f = fs::File::options()
                .write(true)
                .open(app.join("solo"))
                .unwrap();
            f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
            fs::write(app.join(".lock"), "").unwrap();
            fs::remove_file(app.join(".lock")).unwrap();
        });
        assert_eq!(changes, Vec::<String>::new());
    }

    #[test]
    fn content_changes_are_named_with_hashes_and_sizes() {
        let odd = |app: &Path| app.join(OsStr::from_bytes(ODD));
        assert_eq!(
            after(|app| fs::write(odd(app), "ODD").unwrap()),
            ["\"/app/odd\\nname with space%E9\": content changed (sha256 990cb8ebd0af… → ca60f1b27e0a…)"]
        );
        assert_eq!(
            after(|app| fs::write(odd(app), "longer-odd").unwrap()),
            ["\"/app/odd\\nname with space%E9\": content changed (sha256 990cb8ebd0af… → 0123b1b14ffc…, 3 → 10 bytes)"]
        );
    }

    #[test]
    fn mode_and_owner_changes_are_named() {
        assert_eq!(
            after(
                |app| fs::set_permissions(app.join("solo"), fs::Permissions::from_mode(0o600))
                    .unwrap()
            ),
            ["/app/solo: mode 0644 → 0600"]
        );
        assert_eq!(
            after(
                |app| fs::set_permissions(app.join("sub"), fs::Permissions::from_mode(0o2750))
                    .unwrap()
            ),
            ["/app/sub: mode 0750 → 2750"]
        );
        assert_eq!(
            after(|app| chown(app.join("solo"), Some(1000), Some(1000)).unwrap()),
            ["/app/solo: owner 0:0 → 1000:1000"]
        );
    }

    #[test]
    fn xattr_acl_and_capability_changes_are_named() {
        assert_eq!(
            after(|app| rustix::fs::lremovexattr(app.join("db"), "user.x").unwrap()),
            ["/app/db: xattr user.x removed"]
        );
        assert_eq!(
            after(|app| setx(&app.join("db"), "user.y", b"")),
            ["/app/db: xattr user.y added"]
        );
        assert_eq!(
            after(|app| setx(&app.join("db"), "user.x", b"ho")),
            ["/app/db: xattr user.x changed (0x6869 → 0x686f)"]
        );
        // The named user's entry loses its read bit; the mask (the mode's
        // group bits) stays, so only the ACL changes.
        let acl = ACL.replace("02000400e8030000", "02000000e8030000");
        assert_eq!(
            after(|app| setx(&app.join("db"), "system.posix_acl_access", &unhex(&acl))),
            [format!(
                "/app/db: xattr system.posix_acl_access (ACL) changed (0x{ACL} → 0x{acl})"
            )]
        );
        assert_eq!(
            after(|app| rustix::fs::lremovexattr(app.join("cap"), "security.capability").unwrap()),
            ["/app/cap: xattr security.capability (file capabilities) removed"]
        );
    }

    #[test]
    fn symlink_device_and_type_changes_are_named() {
        assert_eq!(
            after(|app| {
                fs::remove_file(app.join("link")).unwrap();
                symlink("solo", app.join("link")).unwrap();
            }),
            ["/app/link: symlink target \"db\" → \"solo\""]
        );
        assert_eq!(
            after(|app| {
                fs::remove_file(app.join("null")).unwrap();
                mknod(
                    &app.join("null"),
                    rustix::fs::FileType::CharacterDevice,
                    (1, 5),
                );
            }),
            ["/app/null: device 1:3 → 1:5"]
        );
        assert_eq!(
            after(|app| {
                fs::remove_file(app.join("fifo")).unwrap();
                write(&app.join("fifo"), "", 0o644);
            }),
            ["/app/fifo: type fifo → file"]
        );
    }

    #[test]
    fn hardlink_groups_are_compared_not_inode_numbers() {
        assert_eq!(
            after(|app| {
                fs::remove_file(app.join("pair2")).unwrap();
                fs::copy(app.join("pair1"), app.join("pair2")).unwrap();
            }),
            ["/app/pair1: no longer hardlinked with /app/pair2"]
        );
        assert_eq!(
            after(|app| {
                fs::remove_file(app.join("twin")).unwrap();
                hard_link(app.join("solo"), app.join("twin")).unwrap();
            }),
            ["/app/solo: now hardlinked with /app/twin"]
        );
        // Both halves copied to new inodes, still one group: kept.
        assert_eq!(
            after(|app| {
                fs::rename(app.join("pair1"), app.join("old")).unwrap();
                fs::copy(app.join("old"), app.join("pair1")).unwrap();
                fs::remove_file(app.join("pair2")).unwrap();
                fs::remove_file(app.join("old")).unwrap();
                hard_link(app.join("pair1"), app.join("pair2")).unwrap();
            }),
            Vec::<String>::new()
        );
    }

    #[test]
    fn missing_and_new_entries_are_named_once_per_tree() {
        assert_eq!(
            after(|app| fs::remove_dir_all(app.join("sub")).unwrap()),
            ["/app/sub: missing (directory with 3 entries)"]
        );
        assert_eq!(
            after(|app| fs::remove_file(app.join("sub/deep")).unwrap()),
            ["/app/sub/deep: missing"]
        );
        assert_eq!(
            after(|app| {
                fs::write(app.join("new"), "").unwrap();
                fs::create_dir_all(app.join("newdir/a")).unwrap();
                fs::write(app.join("newdir/a/b"), "").unwrap();
            }),
            [
                "/app/new: new file",
                "/app/newdir: new directory with 2 entries"
            ]
        );
    }

    #[test]
    fn patterns_that_match_nothing_are_returned_not_recorded() {
        let (t, app) = tree();
        let root = p(t.path());
        let patterns = [
            p(&app),
            format!("{root}/nope"),
            format!("{root}/nomatch*"),
            "relative/path".to_owned(),
        ];
        let r = host_record(&patterns);
        assert_eq!(r.unmatched, patterns[1..]);
        assert_eq!(r.entries.len(), 15);
        assert_eq!(
            r.require_matched().unwrap_err().to_string(),
            format!("[state] preserve: \"{root}/nope\", \"{root}/nomatch*\", \"relative/path\" matched nothing in the guest after setup")
        );
        // Nothing matched at all: no walk (find without paths walks ".").
        let r = host_record(&[format!("{root}/nope")]);
        assert!(r.entries.is_empty());
        assert_eq!(r.unmatched.len(), 1);
        assert!(host_record(&[p(&app)]).require_matched().is_ok());
        // A NUL cannot reach the guest; the pattern comes back spelled out.
        let r = host_record(&[p(&app), "/a\0b".to_owned()]);
        assert_eq!(r.unmatched, ["/a\\0b"]);
        assert_eq!(
            pattern_error("relative/path").unwrap(),
            "\"relative/path\" is not an absolute path"
        );
        assert_eq!(pattern_error("/home/*/.config"), None);
    }

    #[test]
    fn a_glob_matches_several_dirs_and_odd_characters_stay_literal() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        for user in ["alice", "bob", "carol", "it's $HOME [x]"] {
            fs::create_dir_all(home.join(user)).unwrap();
        }
        for user in ["alice", "bob", "it's $HOME [x]"] {
            fs::create_dir(home.join(user).join(".config")).unwrap();
            fs::write(home.join(user).join(".config/rc"), user).unwrap();
        }
        let h = p(&home);
        let keys = |pattern: String| -> Vec<String> {
            let r = host_record(&[pattern]);
            assert!(r.unmatched.is_empty());
            r.entries.keys().map(|k| k.replace(&h, "~")).collect()
        };
        assert_eq!(
            keys(format!("{h}/*/.config/")),
            [
                "~/alice/.config",
                "~/alice/.config/rc",
                "~/bob/.config",
                "~/bob/.config/rc",
                "~/it's $HOME [x]/.config",
                "~/it's $HOME [x]/.config/rc",
            ]
        );
        assert_eq!(
            keys(format!("{h}/[!a-b]*/.config")),
            ["~/it's $HOME [x]/.config", "~/it's $HOME [x]/.config/rc"]
        );
        assert_eq!(
            keys(format!("{h}/it's $HOME [x]/.config/rc")),
            ["~/it's $HOME [x]/.config/rc"],
            "no glob in a literal path with a quote, a $ and brackets that match nothing else"
        );
        assert_eq!(keys(format!("{h}/[b' ]*/.config/rc")), ["~/bob/.config/rc"]);
    }

    #[test]
    fn a_pattern_naming_a_file_records_that_file() {
        let (_t, app) = tree();
        let r = host_record(&[p(&app.join("db")), p(&app.join("fifo"))]);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[&p(&app.join("db"))].xattrs.len(), 2);
        assert_eq!(r.entries[&p(&app.join("fifo"))].kind, Kind::Fifo);
    }

    #[test]
    fn long_xattr_values_show_where_they_differ() {
        let b = format!("{}01{}", "ab".repeat(100), "cd".repeat(50));
        let a = format!("{}02{}", "ab".repeat(100), "cd".repeat(50));
        assert_eq!(
            two_hex(&b, &a),
            (
                format!("0x…abababab01{}… (151 bytes)", "cd".repeat(19)),
                format!("0x…abababab02{}… (151 bytes)", "cd".repeat(19))
            )
        );
        assert_eq!(two_hex("00", "0001"), ("0x00".into(), "0x0001".into()));
    }

    /// The guest command's cost for a thousand files, measured on the host
    /// (printed with --nocapture): time and output size, which the agent
    /// carries base64 in one reply.
    #[test]
    fn a_thousand_files_are_one_command_of_modest_output() {
        let t = tempfile::tempdir().unwrap();
        for d in 0..10 {
            let dir = t.path().join(format!("dir{d}"));
            fs::create_dir(&dir).unwrap();
            for f in 0..100 {
                fs::write(dir.join(format!("file-{f:03}.dat")), vec![b'x'; 4096]).unwrap();
            }
        }
        let script = record_script(&[p(t.path())]);
        let started = std::time::Instant::now();
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(out.status.success());
        let r = parse_record(&out.stdout).unwrap();
        assert_eq!(r.entries.len(), 1011);
        let per_entry = out.stdout.len() / r.entries.len();
        eprintln!(
            "1000 files of 4 KiB: {took:?}, {} bytes of output ({per_entry} per entry)",
            out.stdout.len()
        );
        // The temporary directory's name is most of each path here.
        assert!(per_entry < 300, "{per_entry} bytes per entry");
    }

    #[test]
    fn patterns_become_shell_words_with_only_their_globs_active() {
        assert_eq!(shell_glob("/home/*/.config"), "'/home/'*'/.config'");
        assert_eq!(shell_glob("/var/lib/app/"), "'/var/lib/app'");
        assert_eq!(shell_glob("/"), "'/'");
        assert_eq!(shell_glob("/a'b $x"), r"'/a'\''b $x'");
        assert_eq!(shell_glob("/srv/[!a-z]?"), "'/srv/'[!a-z]?");
        assert_eq!(shell_glob("/srv/[]x ]"), "'/srv/'[]x' ']");
        assert_eq!(shell_glob("/srv/[unclosed"), "'/srv/[unclosed'");
    }

    #[test]
    fn output_that_is_not_a_whole_record_is_an_error() {
        assert_eq!(parse_record(b"hello"), Err(ParseError::NotARecord));
        let full = b"#strata-state 1\0#stat\0f 644 0 0 1 5 7 1\0/a\0\0#end\0";
        assert_eq!(parse_record(full).unwrap().entries.len(), 1);
        let cut = &full[..full.len() - 5];
        assert_eq!(parse_record(cut), Err(ParseError::Truncated(cut.len())));
        assert!(matches!(
            parse_record(b"#strata-state 1\0#stat\0f 644 0\0/a\0\0#end\0"),
            Err(ParseError::Malformed { .. })
        ));
    }

    fn entry(kind: Kind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            sha256: None,
            target: None,
            device: None,
            xattrs: BTreeMap::new(),
            hardlinks: BTreeSet::new(),
        }
    }

    #[test]
    fn a_pass_says_how_much_was_compared() {
        let (_t, app) = tree();
        let r = host_record(&[p(&app)]);
        let v = judge("reboot", &r, &r);
        assert_eq!(v.status, Status::Pass);
        assert_eq!(
            v.detail,
            "15 preserved entries unchanged after reboot (9 files, 35 bytes compared by sha256)"
        );
    }

    #[test]
    fn a_failing_verdict_lists_the_first_changes() {
        let mut before = Record::default();
        let file = |size: u64, hash: &str| Entry {
            size,
            sha256: Some(hash.repeat(32)),
            ..entry(Kind::File, 0o644)
        };
        before
            .entries
            .insert("/var/lib/app".into(), entry(Kind::Dir, 0o755));
        before
            .entries
            .insert("/var/lib/app/db".into(), file(4096, "ab"));
        for i in 0..30 {
            before
                .entries
                .insert(format!("/var/lib/app/cache/{i:02}"), file(1, "00"));
        }
        before
            .entries
            .insert("/var/lib/app/cache".into(), entry(Kind::Dir, 0o700));
        let mut after = before.clone();
        after
            .entries
            .insert("/var/lib/app/db".into(), file(8192, "cd"));
        after.entries.get_mut("/var/lib/app").unwrap().mode = 0o700;
        for i in 0..30 {
            after
                .entries
                .get_mut(&format!("/var/lib/app/cache/{i:02}"))
                .unwrap()
                .uid = 1000;
        }
        // Each log rewritten: changes that do not group.
        for i in 0..25u8 {
            let path = format!("/var/lib/app/log.{i:02}");
            before
                .entries
                .insert(path.clone(), file(10, &format!("{i:02x}")));
            after
                .entries
                .insert(path, file(10, &format!("{:02x}", i + 100)));
        }
        after.entries.remove("/var/lib/app/log.24");
        let v = judge("upgrade", &before, &after);
        assert_eq!(v.evidence.len(), EVIDENCE_CAP + 1);
        insta::assert_json_snapshot!("state-contract-fail", v);
    }
}
