//! The rootfs into the staging directory, inside the user namespace. mknod
//! is refused there, so device nodes are not created but listed (with
//! their attributes) for the appliance.
//!
//! TODO(lead): replace with rootfs_tar (branch `tarin`): its extractor skips
//! device nodes and returns them. Until then this drives GNU tar: device
//! nodes are found first (a walk of a directory, `tar -tv` of an archive)
//! and excluded by name.

use super::wire::DeviceNode;
use crate::cmd::{self, CmdError};
use crate::interrupt::Interrupt;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// GNU tar's flags that keep every attribute the layout contract lists.
const KEEP: [&str; 5] = [
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
];

/// The device nodes under `root` (paths relative to it), without crossing
/// into other filesystems (the walk `cp --one-file-system` makes).
pub fn devices_in_dir(root: &Path) -> std::io::Result<Vec<DeviceNode>> {
    let dev = std::fs::symlink_metadata(root)?.dev();
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            let t = m.file_type();
            if t.is_dir() && m.dev() == dev {
                stack.push(entry.path());
            } else if t.is_char_device() || t.is_block_device() {
                let rel = entry.path();
                let rel = rel.strip_prefix(root).expect("under root");
                out.push(DeviceNode {
                    path: String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned(),
                    block: t.is_block_device(),
                    mode: m.mode() & 0o7777,
                    major: rustix::fs::major(m.rdev()),
                    minor: rustix::fs::minor(m.rdev()),
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: m.mtime(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The device nodes in a tar archive, from `tar -tv` (GNU tar's listing).
pub fn devices_in_tar(archive: &Path) -> Result<Vec<DeviceNode>, CmdError> {
    let listing = cmd::run(
        Command::new("tar")
            .env("TZ", "UTC")
            .args(["--list", "--verbose", "--numeric-owner", "--full-time"])
            .arg("--file")
            .arg(archive),
    )?;
    Ok(listing.lines().filter_map(parse_tv_line).collect())
}

/// `crw-rw-rw- 0/0 1,3 2024-05-01 12:00:00 ./dev/null` → a device node.
fn parse_tv_line(line: &str) -> Option<DeviceNode> {
    let block = match line.as_bytes().first()? {
        b'c' => false,
        b'b' => true,
        _ => return None,
    };
    let mut rest = line;
    let mut field = || {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        f
    };
    let perms = field();
    let owner = field();
    let mut numbers = field().to_owned();
    if numbers.ends_with(',') {
        numbers.push_str(field());
    }
    let (date, time) = (field(), field());
    let name = rest.trim_start();
    let (uid, gid) = owner.split_once('/')?;
    let (major, minor) = numbers.split_once(',')?;
    Some(DeviceNode {
        path: name.strip_prefix("./").unwrap_or(name).to_owned(),
        block,
        mode: mode_of(perms)?,
        major: major.trim().parse().ok()?,
        minor: minor.trim().parse().ok()?,
        uid: uid.parse().ok()?,
        gid: gid.parse().ok()?,
        mtime: epoch(date, time).unwrap_or(0),
    })
}

/// `crwsr-xr-T` → 0o5754.
fn mode_of(perms: &str) -> Option<u32> {
    let p = perms.as_bytes();
    if p.len() != 10 {
        return None;
    }
    let mut mode = 0;
    for (i, c) in p[1..].iter().enumerate() {
        let bit = 1 << (8 - i);
        match c {
            b'-' => {}
            b'S' | b'T' => {}
            _ => mode |= bit,
        }
    }
    let special = [(3, 0o4000), (6, 0o2000), (9, 0o1000)];
    for (i, bit) in special {
        match p[i] {
            b's' | b't' => mode |= bit,
            b'S' | b'T' => mode |= bit,
            _ => {}
        }
    }
    Some(mode)
}

fn epoch(date: &str, time: &str) -> Option<i64> {
    // `--full-time` prints nanoseconds when the archive has them (pax);
    // the appliance sets whole seconds.
    let time = time.split('.').next()?;
    let rfc = crate::btrfs::rfc3339_utc(&format!("{date} {time} +0000"))?;
    let d: Vec<i64> = rfc[..10]
        .split('-')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<i64> = rfc[11..19]
        .split(':')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    Some(crate::btrfs::days_from_civil(d[0], d[1], d[2]) * 86400 + t[0] * 3600 + t[1] * 60 + t[2])
}

/// Fills `dest` (an existing empty directory) from the rootfs, leaving out
/// `devices`: an archive is extracted, a directory streamed through tar
/// (cp would fail on the first device node).
pub fn extract(
    rootfs: &Path,
    is_archive: bool,
    dest: &Path,
    devices: &[DeviceNode],
    interrupt: &Interrupt,
) -> Result<(), CmdError> {
    let mut excludes = tempfile::NamedTempFile::new().map_err(|source| CmdError::Spawn {
        program: "tar".into(),
        source,
    })?;
    for d in devices {
        writeln!(excludes, "./{}", d.path).map_err(|source| CmdError::Spawn {
            program: "tar".into(),
            source,
        })?;
    }
    let keep = KEEP.join(" ");
    // --no-wildcards --anchored: the list holds exact member names.
    let extract = format!(
        "tar --extract --same-owner --same-permissions {keep} --no-wildcards --anchored --exclude-from \"$2\" --directory \"$3\""
    );
    let script = if is_archive {
        format!("{extract} --file \"$1\"")
    } else {
        format!(
            "set -o pipefail; tar --create --one-file-system {keep} --no-wildcards --anchored --exclude-from \"$2\" --directory \"$1\" --file - . | {extract} --file -"
        )
    };
    cmd::run_interruptible(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("strata-extract")
            .arg(rootfs)
            .arg(excludes.path())
            .arg(dest),
        interrupt,
        &mut |_| {},
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_listing_lines() {
        let d = parse_tv_line("crw-rw-rw- 0/0         1,3 2024-05-01 12:00:00 ./dev/null").unwrap();
        assert_eq!(
            d,
            DeviceNode {
                path: "dev/null".into(),
                block: false,
                mode: 0o666,
                major: 1,
                minor: 3,
                uid: 0,
                gid: 0,
                mtime: 1714564800,
            }
        );
        let b = parse_tv_line("brw-rw---T 0/6   8, 16 2024-05-01 12:00:00 ./dev/my disk").unwrap();
        assert_eq!(
            (b.block, b.mode, b.major, b.minor, b.gid),
            (true, 0o1660, 8, 16, 6)
        );
        assert_eq!(b.path, "dev/my disk");
        let ns =
            parse_tv_line("crw-rw-rw- 0/0 1,3 2026-11-27 02:44:54.945356807 ./dev/null").unwrap();
        assert_eq!(ns.mtime, 1795747494);
        assert!(parse_tv_line("drwxr-xr-x 0/0 0 2024-05-01 12:00:00 ./dev/").is_none());
        assert!(parse_tv_line("-rw-r--r-- 0/0 5 2024-05-01 12:00:00 ./etc/x").is_none());
    }
}
