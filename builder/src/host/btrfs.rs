//! The btrfs operations a layout needs, through btrfs-progs.

use crate::host::cmd::{self, CmdError};
use std::path::Path;
use std::process::Command;

pub fn mkfs(image: &Path, label: &str, uuid: &str) -> Result<(), CmdError> {
    // Plain defaults: syslinux 6.04 reads them. Never enable compression:
    // syslinux cannot read compressed extents.
    cmd::run(
        Command::new("mkfs.btrfs")
            .args(["--quiet", "--label", label, "--uuid", uuid])
            .arg(image),
    )
    .map(drop)
}

pub fn subvolume_create(path: &Path) -> Result<(), CmdError> {
    cmd::run(
        Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(path),
    )
    .map(drop)
}

/// A writable snapshot (run is mounted read-write as /).
pub fn snapshot(source: &Path, dest: &Path) -> Result<(), CmdError> {
    cmd::run(
        Command::new("btrfs")
            .args(["-q", "subvolume", "snapshot"])
            .arg(source)
            .arg(dest),
    )
    .map(drop)
}

/// Deletes subvolumes in the order given (a nested one before the one that
/// holds it), and waits for the transaction to reach the disk: without the
/// commit, a crash may bring them back.
pub fn subvolume_delete(paths: &[&Path]) -> Result<(), CmdError> {
    cmd::run(
        Command::new("btrfs")
            .args(["-q", "subvolume", "delete", "--commit-after"])
            .args(paths),
    )
    .map(drop)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeInfo {
    pub uuid: String,
    /// "-" when the subvolume is not a snapshot.
    pub parent_uuid: String,
    pub id: u64,
    /// When it was created, RFC 3339 in UTC (`2026-11-27T01:30:15Z`).
    pub created: Option<String>,
}

pub fn subvolume_show(path: &Path) -> Result<SubvolumeInfo, CmdError> {
    // btrfs prints local time with its offset: in UTC, whatever the host's
    // zone (the offset is still honoured below).
    let out = cmd::run(
        Command::new("btrfs")
            .env("TZ", "UTC")
            .args(["subvolume", "show"])
            .arg(path),
    )?;
    let field = |name: &str| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .next()
            .unwrap_or_default()
    };
    Ok(SubvolumeInfo {
        uuid: field("UUID:"),
        parent_uuid: field("Parent UUID:"),
        id: field("Subvolume ID:").parse().unwrap_or(0),
        created: rfc3339_utc(&field("Creation time:")),
    })
}

/// `2026-11-27 07:00:15 +0530` (as `btrfs subvolume show` prints it) as
/// `2026-11-27T01:30:15Z`. None for anything else (`-`, an old kernel's
/// missing otime).
pub fn rfc3339_utc(shown: &str) -> Option<String> {
    let mut parts = shown.split_whitespace();
    let (date, time, zone) = (parts.next()?, parts.next()?, parts.next()?);
    let nums =
        |s: &str, sep: char| -> Option<Vec<i64>> { s.split(sep).map(|n| n.parse().ok()).collect() };
    let (d, t) = (nums(date, '-')?, nums(time, ':')?);
    let ([y, mo, day], [h, mi, sec]) = (d.as_slice(), t.as_slice()) else {
        return None;
    };
    let (sign, hhmm) = match zone.split_at_checked(1)? {
        ("+", z) => (1, z),
        ("-", z) => (-1, z),
        _ => return None,
    };
    let (zh, zm): (i64, i64) = (hhmm.get(..2)?.parse().ok()?, hhmm.get(2..)?.parse().ok()?);
    let valid = (1..=12).contains(mo) && (1..=31).contains(day) && *h < 24 && *mi < 60 && *sec < 61;
    if !valid {
        return None;
    }
    let local = days_from_civil(*y, *mo, *day) * 86400 + h * 3600 + mi * 60 + sec;
    Some(rfc3339_of_unix(local - sign * (zh * 3600 + zm * 60)))
}

/// Seconds since the Unix epoch as `2026-11-27T01:30:15Z`.
pub fn rfc3339_of_unix(utc: i64) -> String {
    let (days, secs) = (utc.div_euclid(86400), utc.rem_euclid(86400));
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn sync(path: &Path) -> Result<(), CmdError> {
    cmd::run(Command::new("btrfs").args(["filesystem", "sync"]).arg(path)).map(drop)
}

/// Waits until every deleted subvolume of the filesystem at `path` is
/// cleaned: until then its extents are still allocated, and a read-only
/// mount (where btrfs's cleaner does not run) would never see them free.
pub fn subvolume_sync(path: &Path) -> Result<(), CmdError> {
    cmd::run(Command::new("btrfs").args(["subvolume", "sync"]).arg(path)).map(drop)
}

/// The space of a mounted btrfs as `btrfs filesystem usage` reckons it.
/// statvfs is not enough: on a read-only mount, once every chunk is
/// allocated, it reports 0 bytes available whatever the chunks hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// "Free (estimated)": room in the data chunks plus unallocated space
    /// (divided by the data ratio).
    pub data_free: u64,
    /// Room left in the metadata chunks, less the global reserve.
    pub metadata_free: u64,
    /// Copies of each metadata byte (2 for DUP): what a new metadata chunk
    /// takes out of the unallocated space, per byte it holds.
    pub metadata_ratio: f64,
}

pub fn usage(path: &Path) -> Result<Usage, CmdError> {
    let out = cmd::run(
        Command::new("btrfs")
            .env("LC_ALL", "C")
            .args(["filesystem", "usage", "-b"])
            .arg(path),
    )?;
    parse_usage(&out).ok_or_else(|| CmdError::Failed {
        command: format!("btrfs filesystem usage -b {}", path.display()),
        status: "exit status: 0".into(),
        stderr: format!("no \"Free (estimated)\" in its output: {out}"),
    })
}

/// Reads `btrfs filesystem usage -b` output (numbers in bytes).
pub fn parse_usage(out: &str) -> Option<Usage> {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
    };
    let first_number = |v: &str| v.split_whitespace().next()?.parse::<u64>().ok();
    let data_free = field("Free (estimated):").and_then(first_number)?;
    let metadata_ratio = field("Metadata ratio:")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(1.0);
    let reserve = field("Global reserve:").and_then(first_number).unwrap_or(0);
    // "Metadata,DUP: Size:33554432, Used:8617984 (25.68%)"; a mixed
    // filesystem ("Data+Metadata,…") has its metadata room in data_free.
    let metadata_free = out
        .lines()
        .find(|l| l.starts_with("Metadata,"))
        .and_then(|l| {
            let num = |key: &str| {
                let rest = &l[l.find(key)? + key.len()..];
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            };
            Some(num("Size:")?.saturating_sub(num("Used:")?))
        })
        .unwrap_or(0)
        .saturating_sub(reserve);
    Some(Usage {
        data_free,
        metadata_free,
        metadata_ratio,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_after_an_enospc_counts_the_free_chunks() {
        // A 300 MiB image after an upgrade ran out of space, read-only:
        // statfs says 0, the chunks hold 57 MiB of data room.
        let out = "Overall:
    Device size:\t\t         314572800
    Device allocated:\t\t         313524224
    Device unallocated:\t\t           1048576
    Free (estimated):\t\t          59822080\t(min: 59822080)
    Free (statfs, df):\t\t                 0
    Data ratio:\t\t\t              1.00
    Metadata ratio:\t\t              2.00
    Global reserve:\t\t           5767168\t(used: 0)

Data,single: Size:229638144, Used:169816064 (73.95%)
   /dev/loop1\t 229638144

Metadata,DUP: Size:33554432, Used:8617984 (25.68%)
   /dev/loop1\t  67108864
";
        let u = super::parse_usage(out).unwrap();
        assert_eq!(u.data_free, 59822080);
        assert_eq!(u.metadata_free, 33554432 - 8617984 - 5767168);
        assert_eq!(u.metadata_ratio, 2.0);
        assert_eq!(super::parse_usage("garbage"), None);
    }

    use super::*;

    #[test]
    fn creation_times_in_utc() {
        for (shown, want) in [
            ("2026-11-27 01:30:15 +0000", Some("2026-11-27T01:30:15Z")),
            ("2026-11-27 07:00:15 +0530", Some("2026-11-27T01:30:15Z")),
            ("2026-12-31 22:00:00 -0300", Some("2027-01-01T01:00:00Z")),
            ("2024-03-01 00:10:00 +0100", Some("2024-02-29T23:10:00Z")),
            ("1970-01-01 00:00:00 +0000", Some("1970-01-01T00:00:00Z")),
            ("-", None),
            ("", None),
            ("2026-13-01 00:00:00 +0000", None),
            ("2026-11-27 01:30:15", None),
        ] {
            assert_eq!(rfc3339_utc(shown).as_deref(), want, "{shown}");
        }
    }
}
