//! What a subvolume costs: `btrfs filesystem du`, which tells the bytes a
//! tree shares with others (snapshots, reflinks) from the bytes only it
//! holds. A version's `orig` that shares most of its extents with the
//! previous one costs only its exclusive bytes.

use crate::host::cmd::{self, CmdError};
use std::path::Path;
use std::process::Command;

/// One line of `btrfs filesystem du --raw`, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUsage {
    /// All data bytes referenced by the tree (inline data excluded).
    pub total: u64,
    /// Bytes referenced by this tree only.
    pub exclusive: u64,
    /// Bytes shared with other trees, counted once; None when btrfs prints
    /// `-` (the per-file lines without `-s`).
    pub set_shared: Option<u64>,
    /// As btrfs printed it.
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DuError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("unexpected `btrfs filesystem du` line {0:?}")]
    Parse(String),
}

/// `btrfs filesystem du -s --raw` of each path, in order.
pub fn filesystem_du(paths: &[&Path]) -> Result<Vec<DiskUsage>, DuError> {
    let out = cmd::run(
        Command::new("btrfs")
            .args(["filesystem", "du", "-s", "--raw"])
            .args(paths),
    )?;
    parse_fi_du(&out)
}

/// Parses `btrfs filesystem du --raw` output: a header line, then
/// `total exclusive set-shared path` per line (the path may hold spaces).
pub fn parse_fi_du(out: &str) -> Result<Vec<DiskUsage>, DuError> {
    let mut rows = Vec::new();
    for line in out.lines() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with("Total") {
            continue;
        }
        let bad = || DuError::Parse(line.to_owned());
        let mut rest = trimmed;
        let mut field = || {
            let (f, r) = rest.split_once(char::is_whitespace).ok_or_else(bad)?;
            rest = r.trim_start();
            Ok::<_, DuError>(f)
        };
        let number = |f: &str| f.parse::<u64>().map_err(|_| bad());
        let total = number(field()?)?;
        let exclusive = number(field()?)?;
        let set_shared = match field()? {
            "-" => None,
            f => Some(number(f)?),
        };
        if rest.is_empty() {
            return Err(bad());
        }
        rows.push(DiskUsage {
            total,
            exclusive,
            set_shared,
            path: rest.to_owned(),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_summary_and_per_file_lines() {
        let out = "     Total   Exclusive  Set shared  Filename\n\
                   \x20  8388608           0           -  m/B/big\n\
                   \x20        0           0           -  m/B/small file\n\
                   \x20  9437184     1048576     8388608  m/B\n";
        let rows = parse_fi_du(out).unwrap();
        assert_eq!(
            rows,
            [
                DiskUsage {
                    total: 8388608,
                    exclusive: 0,
                    set_shared: None,
                    path: "m/B/big".into()
                },
                DiskUsage {
                    total: 0,
                    exclusive: 0,
                    set_shared: None,
                    path: "m/B/small file".into()
                },
                DiskUsage {
                    total: 9437184,
                    exclusive: 1048576,
                    set_shared: Some(8388608),
                    path: "m/B".into()
                },
            ]
        );
    }

    #[test]
    fn refuses_human_readable_or_truncated_lines() {
        assert!(parse_fi_du("   9.00MiB     1.00MiB     8.00MiB  m/B\n").is_err());
        assert!(parse_fi_du("   9437184     1048576     8388608\n").is_err());
        assert!(parse_fi_du("   9437184     1048576\n").is_err());
        assert_eq!(parse_fi_du("").unwrap(), []);
    }
}
