//! strata's fstab parser against util-linux's libmount, the parser systemd
//! mounts with: thousands of generated fstab texts (octal escapes, comments,
//! blank lines, space/tab mixes, CR in odd places, junk freq/passno, missing
//! and extra fields, NUL and non-UTF-8 bytes), each read by
//! `findmnt --tab-file` and by `fstab::parse`; the entry lists must be equal.
//!
//! Deterministic: a fixed seed and case count, no regression files.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::path::Path;
use std::process::Command;
use strata_builder::fstab;

/// One entry as both sides see it: source, target, fstype, options, all
/// unescaped; targets normalised, missing options as "defaults".
type Seen = (String, String, String, String);

/// `\xNN` is how findmnt's raw output escapes spaces, control bytes, the
/// backslash itself and (under LC_ALL=C) every byte above 0x7f.
fn decode_findmnt(cell: &str) -> Vec<u8> {
    let b = cell.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&cell[i + 2..i + 4], 16) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// libmount's reading of `file`: its entries, and the lines it reported as
/// parse errors.
fn libmount(file: &Path) -> (Vec<Seen>, Vec<usize>) {
    let out = Command::new("findmnt")
        .env("LC_ALL", "C")
        .arg("--tab-file")
        .arg(file)
        .args(["-r", "-n", "-o", "SOURCE,TARGET,FSTYPE,OPTIONS"])
        .output()
        .expect("findmnt (util-linux) must be installed: run ci/setup");
    let stdout = String::from_utf8(out.stdout).expect("raw output is ASCII under LC_ALL=C");
    let entries = stdout
        .lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(' ').collect();
            assert_eq!(cells.len(), 4, "findmnt raw line {l:?}");
            let options = lossy(&decode_findmnt(cells[3]));
            (
                lossy(&decode_findmnt(cells[0])),
                fstab::normalize_target(&lossy(&decode_findmnt(cells[1]))),
                lossy(&decode_findmnt(cells[2])),
                if options.is_empty() {
                    "defaults".to_owned()
                } else {
                    options
                },
            )
        })
        .collect();
    let errors = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| {
            let rest = l.split("parse error at line ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    (entries, errors)
}

fn strata(entries: &[fstab::Entry]) -> Vec<Seen> {
    entries
        .iter()
        .map(|e| {
            (
                fstab::unescape(&e.source),
                e.target.clone(),
                e.fstype.clone(),
                e.options.clone(),
            )
        })
        .collect()
}

/// The physical line `n` (1-based) without its newline and one CR, as
/// `Entry::raw` and `Rejected::raw` keep it.
fn physical_line(text: &[u8], n: usize) -> String {
    let line = text.split(|&b| b == b'\n').nth(n - 1).unwrap_or_default();
    lossy(line.strip_suffix(b"\r").unwrap_or(line))
}

/// What the generated files exercised, so a weakened generator shows.
#[derive(Default, Debug)]
struct Coverage {
    entries: usize,
    rejected: [usize; 5],
    mountinfo: usize,
    swaps: usize,
}

/// One generated file through both parsers.
fn compare(file: &Path, text: &[u8], seen: &mut Coverage) -> Result<(), String> {
    std::fs::write(file, text).unwrap();
    let (theirs, errors) = libmount(file);
    let parsed = fstab::parse_full(text);
    let ours = strata(&parsed.entries);
    let rejected: Vec<usize> = parsed.rejected.iter().map(|r| r.line).collect();
    for (line, raw) in parsed
        .entries
        .iter()
        .map(|e| (e.line, &e.raw))
        .chain(parsed.rejected.iter().map(|r| (r.line, &r.raw)))
    {
        if *raw != physical_line(text, line) {
            return Err(format!("line {line} kept as {raw:?}"));
        }
    }
    assert_eq!(fstab::parse(text), parsed.entries);
    seen.entries += parsed.entries.len();
    for r in &parsed.rejected {
        seen.rejected[match r.reason {
            fstab::Reason::NulByte => 0,
            fstab::Reason::TooFewFields => 1,
            fstab::Reason::BadFreq => 2,
            fstab::Reason::BadPassno => 3,
            fstab::Reason::NotFstab(_) => 4,
        }] += 1;
    }
    match parsed.format {
        fstab::Format::Mountinfo => seen.mountinfo += 1,
        fstab::Format::Swaps => seen.swaps += 1,
        fstab::Format::Fstab => {}
    }
    match parsed.format {
        fstab::Format::Fstab => {
            if ours != theirs {
                return Err(format!("entries\nlibmount: {theirs:?}\nstrata:   {ours:?}"));
            }
            if rejected != errors {
                return Err(format!(
                    "rejected lines\nlibmount: {errors:?}\nstrata:   {rejected:?}"
                ));
            }
        }
        // No fstab line is a valid mountinfo line (that needs a lone "-"
        // field between spaces): libmount rejects every line it reads.
        fstab::Format::Mountinfo => {
            let lone_dash = text.windows(3).any(|w| w == b" - ");
            if !ours.is_empty() || (!lone_dash && (!theirs.is_empty() || rejected != errors)) {
                return Err(format!(
                    "read as mountinfo\nlibmount: {theirs:?} errors {errors:?}\nstrata:   {ours:?} rejected {rejected:?}"
                ));
            }
        }
        // Swap areas only, none of them a mount.
        fstab::Format::Swaps => {
            if !ours.is_empty()
                || theirs
                    .iter()
                    .any(|(_, t, f, _)| !t.is_empty() || f != "swap")
            {
                return Err(format!("read as swaps\nlibmount: {theirs:?}"));
            }
        }
    }
    Ok(())
}

fn pick(items: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(items).prop_map(<[u8]>::to_vec)
}

fn concat(parts: Vec<Vec<u8>>) -> Vec<u8> {
    parts.concat()
}

/// Pieces fields are made of: path parts, octal escapes (complete,
/// incomplete, out of range, decoding to NUL or to a separator), bytes that
/// are not UTF-8, CR and other whitespace libmount does not split on.
const PIECES: &[&[u8]] = &[
    b"/",
    b"/",
    b"//",
    b"var",
    b"home",
    b"opt",
    b".",
    b"..",
    b"/.",
    b"/..",
    b"a",
    b"UUID=1",
    b"LABEL=x",
    b"ext4",
    b"btrfs",
    b"swap",
    b"none",
    b"defaults",
    b"ro",
    b"noauto",
    b",",
    b"=",
    b"\"",
    b"#",
    b"-",
    b"1",
    b"08",
    b"\\040",
    b"\\011",
    b"\\012",
    b"\\134",
    b"\\000",
    b"\\400",
    b"\\777",
    b"\\04",
    b"\\0",
    b"\\",
    b"\\x41",
    b"\\303\\251",
    b"\\303",
    b"\xc3",
    b"\xa9",
    b"\xff",
    b"\xc3\xa9",
    b"\r",
    b"\x0b",
    b"\x0c",
];

/// freq and passno as written in real and broken files.
const NUMBERS: &[&[u8]] = &[
    b"0",
    b"0",
    b"1",
    b"2",
    b"+1",
    b"-1",
    b"1x",
    b"08",
    b"0x1",
    b"99999999999999999999",
    b"-99999999999999999999",
    b"+",
    b"-",
    b"x",
    b"\r1",
    b"1\r",
    b"\x0b2",
    b"2\x0b",
    b"\\061",
    b"#",
    b"1#",
];

const SEPARATORS: &[&[u8]] = &[b" ", b" ", b"\t", b"  ", b" \t", b"\t\t "];
const LEADING: &[&[u8]] = &[b"", b"", b"", b" ", b"\t", b" \t", b"\r", b"\x0b"];
const TRAILING: &[&[u8]] = &[
    b"", b"", b"", b" ", b"\t", b"\r", b" \r", b"\r\r", b"\x0b", b"\r ",
];
const JUNK: &[&[u8]] = &[
    b" ", b"\t", b"\r", b"#", b"\0", b"a", b"/", b"1", b"2", b"-", b"\\", b"\xff", b"\x0b",
];

fn field() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(pick(PIECES), 1..4).prop_map(concat)
}

fn entry_line() -> impl Strategy<Value = Vec<u8>> {
    let fields = prop::collection::vec(field(), 0..4);
    let numbers = prop::collection::vec(pick(NUMBERS), 0..3);
    let extra = prop::collection::vec(field(), 0..2);
    let seps = prop::collection::vec(pick(SEPARATORS), 8);
    (pick(LEADING), fields, numbers, extra, seps, pick(TRAILING)).prop_map(
        |(lead, fields, numbers, extra, seps, trail)| {
            let all: Vec<Vec<u8>> = fields.into_iter().chain(numbers).chain(extra).collect();
            let mut line = lead;
            for (i, f) in all.iter().enumerate() {
                if i > 0 {
                    line.extend_from_slice(&seps[i % seps.len()]);
                }
                line.extend_from_slice(f);
            }
            line.extend_from_slice(&trail);
            line
        },
    )
}

/// A well-formed line now and then, so files have real entries to compare.
fn good_line() -> impl Strategy<Value = Vec<u8>> {
    (
        pick(&[b"/dev/vda", b"UUID=abc", b"LABEL=d\\040x", b"tmpfs", b"1"]),
        pick(&[
            b"/",
            b"/var",
            b"//var",
            b"/var/.",
            b"/./var/",
            b"/home",
            b"/my\\040dir",
            b"2",
        ]),
        pick(&[b"ext4", b"btrfs", b"swap", b"tmpfs"]),
        pick(&[
            b" defaults 0 1",
            b"\tro,noauto",
            b"",
            b" subvol=/state/var 0 2",
        ]),
    )
        .prop_map(|(s, t, f, rest)| [s, b" ".to_vec(), t, b" ".to_vec(), f, rest].concat())
}

fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => entry_line(),
        9 => good_line(),
        3 => (pick(LEADING), pick(TRAILING)).prop_map(|(a, b)| [a, b].concat()),
        3 => (pick(LEADING), prop::collection::vec(pick(JUNK), 0..8))
            .prop_map(|(a, b)| [a, b"#".to_vec(), b.concat()].concat()),
        3 => prop::collection::vec(pick(JUNK), 0..12).prop_map(concat),
        // libmount guesses the table format from the first entry line.
        1 => Just(b"Filename\tType\tSize\tUsed\tPriority".to_vec()),
    ]
}

fn fstab_text() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((line(), pick(&[b"\n", b"\n", b"\n", b"\r\n"])), 0..9),
        any::<bool>(),
    )
        .prop_map(|(lines, last_terminated)| {
            let mut text = Vec::new();
            let n = lines.len();
            for (i, (l, end)) in lines.into_iter().enumerate() {
                text.extend_from_slice(&l);
                if i + 1 < n || last_terminated {
                    text.extend_from_slice(&end);
                }
            }
            text
        })
}

/// Fixed for CI; PROPTEST_RNG_SEED and PROPTEST_CASES explore further.
fn config() -> Config {
    let from_env = Config::default();
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            from_env.cases
        } else {
            2000
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            from_env.rng_seed
        } else {
            RngSeed::Fixed(0x5747_a7a5)
        },
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..from_env
    }
}

#[test]
fn entries_agree_with_libmount_on_generated_fstabs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fstab");
    let seen = std::cell::RefCell::new(Coverage::default());
    let mut runner = TestRunner::new(config());
    let result = runner.run(&fstab_text(), |text| {
        compare(&file, &text, &mut seen.borrow_mut())
            .map_err(|e| TestCaseError::fail(format!("fstab \"{}\": {e}", text.escape_ascii())))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    eprintln!("{seen:?}");
    assert!(
        seen.entries > 1000 && seen.rejected.iter().all(|&n| n > 10),
        "{seen:?}"
    );
    assert!(seen.mountinfo > 5 && seen.swaps > 5, "{seen:?}");
}

/// Hand-picked files the generator may take long to find.
#[test]
fn entries_agree_with_libmount_on_known_corner_cases() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fstab");
    let cases: &[&[u8]] = &[
        b"a /b c d 0 x\n",
        b"a /b c d 0 0\r\r\n",
        b"a /b\r c d 1x\n",
        b"a /\xc3\\251 c\n",
        b"a /b\\000x c\n",
        b"\\000 \\000 \\000 \\000\n",
        b"# c\0x\na /b c\0d\nx /y z\nq /r s\r\0t",
        b"1 2 ext4\na /var c\n",
        b"# c\n\n 1-2 x\na /b c\n",
        b"Filename\tType\n/dev/sda2 partition 100 0 -2\na /b c d 0 0\n",
        b"a //var c\nb /./opt/ c\nc /srv/. c\n",
        b"a /b c d \x0b1 \x0c2\n",
    ];
    for text in cases {
        if let Err(e) = compare(&file, text, &mut Coverage::default()) {
            panic!("fstab \"{}\": {e}", text.escape_ascii());
        }
    }
}
