//! `moved-files`: every file the build moved into state is where the booted
//! system expects it — same type, mode, owner, contents — on its state
//! subvolume, and the mountpoints of the system subvolumes under the state
//! mounts are empty.

use super::{CheckId, Vm};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use std::collections::{BTreeMap, HashMap};
use strata_builder::expect::Expectations;
use strata_builder::layout::{self, Tree};
use strata_builder::manifest::FileType;

const ID: CheckId = CheckId::MovedFiles;

pub async fn run(vm: &mut impl Vm, expect: &Expectations) -> Result<CheckResult, MachineError> {
    let mut obs = observe(vm.machine(), expect).await?;
    // Earlier boots of the same disk (a lifecycle) rewrote state too.
    if let Some(since) = vm.running_since().filter(|t| *t > 0.0) {
        obs.boot_epoch = since;
    }
    Ok(judge(&obs, expect))
}

/// What the guest says about one path.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub dev: u64,
    pub ctime: f64,
    pub target: String,
}

pub struct Observation {
    pub stats: HashMap<String, Stat>,
    pub sha256: HashMap<String, String>,
    /// "orig/var" -> number of entries in the top-level view ("missing" = None).
    pub toplevel_entries: BTreeMap<String, Option<usize>>,
    /// Guest boot time, seconds since the epoch (in a lifecycle: of its
    /// first boot); later changes are the running system's.
    pub boot_epoch: f64,
}

const STAT_SCRIPT: &str = r#"xargs -0 -r sh -c 'find "$@" -maxdepth 0 -printf "%y %m %U %G %s %D %C@\0%p\0%l\0" 2>/dev/null; exit 0' sh"#;
const SHA_SCRIPT: &str = "xargs -0 -r sha256sum -- 2>/dev/null; exit 0";

/// Mounts the top-level subvolume (id 5) of /'s filesystem for `body`, which
/// sees its path as $top. The trap unmounts on every exit.
fn with_toplevel(body: &str) -> String {
    format!(
        r#"set -u
dev=$(findmnt -n -o SOURCE --nofsroot /)
top=$(mktemp -d /run/strata-top.XXXXXX)
trap 'umount "$top" 2>/dev/null; rmdir "$top"' EXIT
mount -o subvolid=5 "$dev" "$top" || exit 97
{body}
"#
    )
}

pub async fn observe(m: &mut Machine, expect: &Expectations) -> Result<Observation, MachineError> {
    let mut paths: Vec<u8> = Vec::new();
    for d in &expect.state_dirs {
        paths.extend_from_slice(layout::state_mountpoint(d).as_bytes());
        paths.push(0);
    }
    let mut files: Vec<u8> = Vec::new();
    for f in &expect.moved_files {
        paths.extend_from_slice(f.path.as_bytes());
        paths.push(0);
        if f.file_type == FileType::File {
            files.extend_from_slice(f.path.as_bytes());
            files.push(0);
        }
    }
    // Hashing is the slow part: let it run while the rest is gathered.
    let hashing = m.start_script(SHA_SCRIPT, Some(&files)).await?;
    let out = m.exec_stdin(STAT_SCRIPT, &paths).await?;
    let stats = parse_stats(&out.stdout);
    let mut body = String::new();
    for d in &expect.state_dirs {
        for tree in Tree::BOTH {
            let side = tree.name();
            body.push_str(&format!(
                "p=\"$top/{dir}/{d}\"; if [ -d \"$p\" ]; then printf '{side}/{d} %s\\n' \"$(ls -A \"$p\" | wc -l)\"; else echo '{side}/{d} missing'; fi\n",
                dir = expect.version.tree(tree)
            ));
        }
    }
    let top = m.succeed(&with_toplevel(&body)).await?;
    let toplevel_entries = top
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()))
        })
        .collect();
    let btime = m.succeed("awk '/^btime /{print $2}' /proc/stat").await?;
    let sha256 = parse_sha256sum(&m.finish(&hashing).await?.stdout_str());
    Ok(Observation {
        stats,
        sha256,
        toplevel_entries,
        boot_epoch: btime.trim().parse().unwrap_or(0.0),
    })
}

pub fn parse_stats(raw: &[u8]) -> HashMap<String, Stat> {
    let mut out = HashMap::new();
    let fields: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    for rec in fields.chunks(3) {
        let [head, path, target] = rec else { continue };
        let head = String::from_utf8_lossy(head);
        let f: Vec<&str> = head.split(' ').collect();
        if f.len() != 7 {
            continue;
        }
        let stat = Stat {
            kind: f[0].chars().next().unwrap_or('?'),
            mode: u32::from_str_radix(f[1], 8).unwrap_or(u32::MAX),
            uid: f[2].parse().unwrap_or(u32::MAX),
            gid: f[3].parse().unwrap_or(u32::MAX),
            size: f[4].parse().unwrap_or(0),
            dev: f[5].parse().unwrap_or(0),
            ctime: f[6].parse().unwrap_or(0.0),
            target: String::from_utf8_lossy(target).into_owned(),
        };
        out.insert(String::from_utf8_lossy(path).into_owned(), stat);
    }
    out
}

/// `sha256sum` output; names with a backslash or newline come escaped with
/// a leading backslash on the line.
pub fn parse_sha256sum(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (escaped, l) = match l.strip_prefix('\\') {
                Some(rest) => (true, rest),
                None => (false, l),
            };
            let (hash, name) = l.split_once("  ")?;
            let name = if escaped {
                name.replace("\\n", "\n").replace("\\\\", "\\")
            } else {
                name.to_owned()
            };
            Some((name, hash.to_owned()))
        })
        .collect()
}

fn kind_char(t: FileType) -> char {
    match t {
        FileType::File => 'f',
        FileType::Dir => 'd',
        FileType::Symlink => 'l',
        FileType::Char => 'c',
        FileType::Block => 'b',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
    }
}

pub fn judge(obs: &Observation, expect: &Expectations) -> CheckResult {
    let mut evidence = Vec::new();
    let mut bad = 0usize;
    let mut changed_since_boot: Vec<String> = Vec::new();
    for f in &expect.moved_files {
        let dir = f
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        let Some(st) = obs.stats.get(&f.path) else {
            bad += 1;
            evidence.push(format!("{}: missing in the booted system", f.path));
            continue;
        };
        let mut wrong = Vec::new();
        if st.kind != kind_char(f.file_type) {
            wrong.push(format!(
                "type {}, expected {}",
                st.kind,
                kind_char(f.file_type)
            ));
        }
        // A symlink's own mode is meaningless on Linux (always 0777).
        if f.file_type != FileType::Symlink && st.mode != f.mode {
            wrong.push(format!("mode {:04o}, expected {:04o}", st.mode, f.mode));
        }
        if st.uid != f.uid || st.gid != f.gid {
            wrong.push(format!(
                "owner {}:{}, expected {}:{}",
                st.uid, st.gid, f.uid, f.gid
            ));
        }
        if let Some(t) = &f.target {
            if &st.target != t {
                wrong.push(format!("symlink to {:?}, expected {t:?}", st.target));
            }
        }
        let mut content_changed = false;
        if let Some(want) = &f.sha256 {
            match obs.sha256.get(&f.path) {
                Some(got) if got.eq_ignore_ascii_case(want) => {}
                Some(_) => content_changed = true,
                None => wrong.push("unreadable (no sha256)".into()),
            }
        }
        let mountpoint = layout::state_mountpoint(dir);
        match obs.stats.get(&mountpoint) {
            Some(d) if d.dev == st.dev => {}
            Some(d) => wrong.push(format!(
                "on device {} but {mountpoint} is device {}: not on the state subvolume",
                st.dev, d.dev
            )),
            None => wrong.push(format!("{mountpoint} itself is missing")),
        }
        // The running system legitimately rewrites some state (random seed,
        // logs, caches): a change made after this boot started is its doing,
        // not the image's.
        let touched_after_boot = obs.boot_epoch > 0.0 && st.ctime >= obs.boot_epoch;
        if content_changed {
            if touched_after_boot {
                changed_since_boot.push(f.path.clone());
            } else {
                wrong.push("contents differ (sha256)".into());
            }
        }
        if !wrong.is_empty() {
            if touched_after_boot
                && !content_changed
                && wrong
                    .iter()
                    .all(|w| w.starts_with("mode") || w.starts_with("owner"))
            {
                changed_since_boot.push(f.path.clone());
                continue;
            }
            bad += 1;
            evidence.push(format!("{}: {}", f.path, wrong.join("; ")));
        }
    }
    let mut nonempty = Vec::new();
    for (k, v) in &obs.toplevel_entries {
        match v {
            Some(0) => {}
            Some(n) => nonempty.push(format!("{k} has {n} entries")),
            None => nonempty.push(format!("{k} is missing")),
        }
    }
    if !nonempty.is_empty() {
        evidence.push(format!(
            "top-level view of {}: {} (state data left in the system subvolume)",
            expect.version.dir(),
            nonempty.join(", ")
        ));
    }
    if !changed_since_boot.is_empty() {
        evidence.push(format!(
            "{} file(s) changed by the running system after boot (not counted): {}",
            changed_since_boot.len(),
            changed_since_boot
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let total = expect.moved_files.len();
    if bad == 0 && nonempty.is_empty() {
        CheckResult::new(
            ID.name(),
            Status::Pass,
            format!(
                "{total} moved entries intact on their state subvolumes; orig/ and run/ mountpoints empty"
            ),
            evidence,
        )
    } else {
        let mut what = Vec::new();
        if bad > 0 {
            what.push(format!("{bad} of {total} moved entries wrong or missing"));
        }
        if !nonempty.is_empty() {
            what.push(format!("non-empty mountpoints: {}", nonempty.join(", ")));
        }
        CheckResult::new(ID.name(), Status::Fail, what.join("; "), evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testdata::expectations;

    fn stat(kind: char, mode: u32, dev: u64, ctime: f64) -> Stat {
        Stat {
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            dev,
            ctime,
            target: String::new(),
        }
    }

    fn obs() -> Observation {
        let mut stats = HashMap::new();
        stats.insert("/root".to_owned(), stat('d', 0o700, 40, 1.0));
        stats.insert("/var".to_owned(), stat('d', 0o755, 41, 1.0));
        stats.insert(
            "/root/.ssh/authorized_keys".to_owned(),
            stat('f', 0o600, 40, 1.0),
        );
        // Rewritten by systemd during this boot (ctime after btime).
        stats.insert(
            "/var/lib/systemd/random-seed".to_owned(),
            stat('f', 0o600, 41, 2000.0),
        );
        let mut sha256 = HashMap::new();
        sha256.insert("/root/.ssh/authorized_keys".to_owned(), "ab".repeat(32));
        sha256.insert("/var/lib/systemd/random-seed".to_owned(), "ee".repeat(32));
        let toplevel_entries = [
            ("orig/root", Some(0)),
            ("run/root", Some(0)),
            ("orig/var", Some(0)),
            ("run/var", Some(0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Observation {
            stats,
            sha256,
            toplevel_entries,
            boot_epoch: 1000.0,
        }
    }

    #[test]
    fn tolerate_changes_made_by_the_running_system() {
        let r = judge(&obs(), &expectations());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert!(r.evidence[0].contains("changed by the running system after boot"));
    }

    #[test]
    fn catch_mode_device_and_leftovers() {
        let mut obs = obs();
        obs.stats
            .get_mut("/root/.ssh/authorized_keys")
            .unwrap()
            .mode = 0o644;
        obs.stats.get_mut("/root/.ssh/authorized_keys").unwrap().dev = 7;
        obs.toplevel_entries.insert("run/var".into(), Some(1));
        let r = judge(&obs, &expectations());
        assert_eq!(r.status, Status::Fail);
        assert!(r.evidence[0].starts_with("/root/.ssh/authorized_keys: mode 0644, expected 0600; on device 7 but /root is device 40"), "{:?}", r.evidence);
        assert!(r.detail.contains("run/var has 1 entries"));
    }

    #[test]
    fn stat_and_sha_parsers() {
        let raw = b"f 600 0 0 99 40 1700000000.5\0/root/.ssh/authorized_keys\0\0l 777 0 0 7 41 1.0\0/var/run\0/run\0";
        let s = parse_stats(raw);
        assert_eq!(s["/root/.ssh/authorized_keys"].mode, 0o600);
        assert_eq!(s["/var/run"].target, "/run");
        let h = parse_sha256sum("abc  /a b\n\\def  /x\\ny\n");
        assert_eq!(h["/a b"], "abc");
        assert_eq!(h["/x\ny"], "def");
    }
}
