//! `moved-files`: every file the build moved into state is where the booted
//! system expects it — same type, mode, owner, contents, symlink target,
//! xattrs (ACLs, capabilities), hardlink groups — on its state subvolume,
//! and the mountpoints of the system subvolumes under the state mounts are
//! empty.

use super::guest::{parse_getfattr, GETFATTR_XARGS, NO_GETFATTR};
use super::{CheckId, Vm};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use std::collections::{BTreeMap, HashMap};
use strata_builder::expect::Expectations;
use strata_builder::layout::{self, Tree};
use strata_builder::manifest::{FileType, MovedFile};
use strata_builder::pathenc::{decode_path, encode_path};

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
    /// Inode number, to tell hardlink groups.
    pub ino: u64,
    /// Name -> lower-case hex value, as `getfattr` read them; None when
    /// they were not read (no entry there records any, or no getfattr).
    pub xattrs: Option<BTreeMap<String, String>>,
}

pub struct Observation {
    pub stats: HashMap<String, Stat>,
    pub sha256: HashMap<String, String>,
    /// "orig/var" -> number of entries in the top-level view ("missing" = None).
    pub toplevel_entries: BTreeMap<String, Option<usize>>,
    /// Why the top-level view could not be seen (its mount failed).
    pub toplevel_error: Option<String>,
    /// Guest boot time, seconds since the epoch (in a lifecycle: of its
    /// first boot); later changes are the running system's.
    pub boot_epoch: f64,
    /// The guest's clock when observed, and the host's at the same moment
    /// (the middle of the round trip), both seconds since the epoch.
    pub clock: Option<Clock>,
}

/// One reading of the guest clock against the host's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub guest: f64,
    pub host: f64,
    /// Half the round trip: how far `host` may be from the true moment.
    pub uncertainty: f64,
}

/// How far the guest clock may be from the host's for "changed after this
/// boot" to mean anything. QEMU starts the guest clock from the host's
/// (`-rtc base=utc,clock=host`), to the second.
pub const CLOCK_TOLERANCE: f64 = 60.0;

impl Clock {
    /// Guest minus host, seconds (negative: the guest is behind).
    pub fn skew(&self) -> f64 {
        self.guest - self.host
    }

    pub fn agrees(&self) -> bool {
        self.skew().abs() <= CLOCK_TOLERANCE + self.uncertainty
    }
}

/// Most paths per guest command, and most bytes of paths: a command's
/// output must stay far below the guest agent's cap (16 MiB), and its input
/// travels base64 in one JSON request.
const BATCH_PATHS: usize = 20_000;
const BATCH_BYTES: usize = 1 << 20;

/// The bytes a manifest path (`encode_path` form) names in the guest.
fn guest_path(encoded: &str) -> Vec<u8> {
    decode_path(encoded).unwrap_or_else(|| encoded.as_bytes().to_vec())
}

/// NUL-terminated `paths` (bytes, as the guest names them), split into
/// batches for separate guest commands.
fn batches(paths: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut count = 0;
    for p in paths {
        let full = match out.last() {
            None => true,
            Some(b) => count >= BATCH_PATHS || b.len() + p.len() + 1 > BATCH_BYTES,
        };
        if full {
            out.push(Vec::new());
            count = 0;
        }
        let b = out.last_mut().expect("pushed above");
        b.extend_from_slice(&p);
        b.push(0);
        count += 1;
    }
    out
}

const STAT_SCRIPT: &str = r#"xargs -0 -r sh -c 'find "$@" -maxdepth 0 -printf "%y %m %U %G %s %D %C@ %i\0%p\0%l\0" 2>/dev/null; exit 0' sh"#;
const SHA_SCRIPT: &str = "xargs -0 -r sha256sum -- 2>/dev/null; exit 0";

/// Exit code of [`with_toplevel`] when the mount fails (its stderr says why).
const TOPLEVEL_MOUNT_FAILED: i64 = 97;

/// Mounts the top-level subvolume (id 5) of /'s filesystem for `body`, which
/// sees its path as $top. The trap unmounts on every exit.
fn with_toplevel(body: &str) -> String {
    format!(
        r#"set -u
dev=$(findmnt -n -o SOURCE --nofsroot /)
top=$(mktemp -d /run/strata-top.XXXXXX)
trap 'umount "$top" 2>/dev/null; rmdir "$top"' EXIT
mount -o subvolid=5 "$dev" "$top" || exit {TOPLEVEL_MOUNT_FAILED}
{body}
"#
    )
}

pub async fn observe(m: &mut Machine, expect: &Expectations) -> Result<Observation, MachineError> {
    let mountpoints: Vec<String> = expect
        .state_dirs
        .iter()
        .map(|d| layout::state_mountpoint(d))
        .collect();
    let all = mountpoints
        .iter()
        .map(|m| m.as_bytes().to_vec())
        .chain(expect.moved_files.iter().map(|f| guest_path(&f.path)));
    let files = expect
        .moved_files
        .iter()
        .filter(|f| f.file_type == FileType::File)
        .map(|f| guest_path(&f.path));
    // Hashing is the slow part: let it run while the rest is gathered.
    let mut hashing = Vec::new();
    for batch in batches(files) {
        hashing.push(m.start_script(SHA_SCRIPT, Some(&batch)).await?);
    }
    let mut stats = HashMap::new();
    for batch in batches(all) {
        let out = m.exec_stdin(STAT_SCRIPT, &batch).await?;
        stats.extend(parse_stats(&out.stdout));
    }
    read_xattrs(m, expect, &mut stats).await?;
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
    let top = m.exec(&with_toplevel(&body)).await?;
    let (toplevel_entries, toplevel_error) = match top.exit_code {
        Some(0) => (parse_toplevel(&top.stdout_str()), None),
        Some(TOPLEVEL_MOUNT_FAILED) => (
            BTreeMap::new(),
            Some(format!(
                "cannot mount the top-level subvolume (subvolid=5) of /'s filesystem: {}",
                top.stderr_str().trim()
            )),
        ),
        code => {
            return Err(MachineError::CommandFailed {
                command: "list orig/ and run/ mountpoints in the top-level view".into(),
                code: format!("{code:?}"),
                stderr: top.stderr_str().trim().to_owned(),
            })
        }
    };
    let host_before = crate::qmp::now_epoch();
    let times = m
        .succeed("awk '/^btime /{print $2}' /proc/stat; date +%s.%N")
        .await?;
    let host_after = crate::qmp::now_epoch();
    let mut times = times.lines().map(|l| l.trim().parse::<f64>().ok());
    let boot_epoch = times.next().flatten().unwrap_or(0.0);
    let clock = times.next().flatten().map(|guest| Clock {
        guest,
        host: (host_before + host_after) / 2.0,
        uncertainty: (host_after - host_before) / 2.0,
    });
    let mut sha256 = HashMap::new();
    for running in &hashing {
        sha256.extend(parse_sha256sum(&m.finish(running).await?.stdout));
    }
    Ok(Observation {
        stats,
        sha256,
        toplevel_entries,
        toplevel_error,
        boot_epoch,
        clock,
    })
}

/// The xattrs of the NUL-separated paths on stdin; exit [`NO_GETFATTR`]
/// without getfattr in the guest.
fn xattr_script() -> String {
    format!("command -v getfattr >/dev/null || exit {NO_GETFATTR}; {GETFATTR_XARGS} 2>/dev/null; exit 0")
}

/// Reads the xattrs of the entries whose record has some into `stats`.
/// Without getfattr in the guest they stay unread (None), which the judge
/// reports.
async fn read_xattrs(
    m: &mut Machine,
    expect: &Expectations,
    stats: &mut HashMap<String, Stat>,
) -> Result<(), MachineError> {
    let wanted = expect.moved_files.iter().filter(|f| !f.xattrs.is_empty());
    for batch in batches(wanted.map(|f| guest_path(&f.path))) {
        let out = m.exec_stdin(&xattr_script(), &batch).await?;
        if out.exit_code == Some(NO_GETFATTR) {
            return Ok(());
        }
        let got = parse_getfattr(&out.stdout);
        for p in batch.split(|b| *b == 0).filter(|p| !p.is_empty()) {
            let key = encode_path(p);
            if let Some(st) = stats.get_mut(&key) {
                st.xattrs = Some(got.get(&key).cloned().unwrap_or_default());
            }
        }
    }
    Ok(())
}

/// What the move must keep beyond one entry's own stat: every xattr the
/// manifest records (ACLs and capabilities are xattrs) with its value.
/// Extra xattrs in the guest are not judged (the running system may add
/// some).
fn xattrs_wrong(f: &MovedFile, st: &Stat) -> Vec<String> {
    if f.xattrs.is_empty() {
        return Vec::new();
    }
    let Some(got) = &st.xattrs else {
        return vec!["xattrs could not be read in the guest (no getfattr)".into()];
    };
    let mut wrong = Vec::new();
    for (name, want) in &f.xattrs {
        match got.get(name) {
            None => wrong.push(format!("xattr {name} lost")),
            Some(v) if !v.eq_ignore_ascii_case(want) => {
                wrong.push(format!("xattr {name} is 0x{v}, expected 0x{want}"))
            }
            Some(_) => {}
        }
    }
    wrong
}

/// Hardlink groups the manifest records that are no longer one inode in
/// the guest, as evidence lines (missing members are reported elsewhere).
fn hardlinks_split(expect: &Expectations, stats: &HashMap<String, Stat>) -> Vec<String> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in &expect.moved_files {
        if let Some(id) = &f.hardlink {
            groups.entry(id).or_default().push(&f.path);
        }
    }
    let mut out = Vec::new();
    for (id, paths) in groups {
        let inodes: Vec<(&str, (u64, u64))> = paths
            .iter()
            .filter_map(|p| stats.get(*p).map(|st| (*p, (st.dev, st.ino))))
            .collect();
        if inodes.windows(2).any(|w| w[0].1 != w[1].1) {
            let shown: Vec<String> = inodes
                .iter()
                .map(|(p, (_, ino))| format!("{p} (inode {ino})"))
                .collect();
            out.push(format!("hardlink group {id} split: {}", shown.join(", ")));
        }
    }
    out
}

fn parse_toplevel(text: &str) -> BTreeMap<String, Option<usize>> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()))
        })
        .collect()
}

pub fn parse_stats(raw: &[u8]) -> HashMap<String, Stat> {
    let mut out = HashMap::new();
    let fields: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    for rec in fields.chunks(3) {
        let [head, path, target] = rec else { continue };
        let head = String::from_utf8_lossy(head);
        let f: Vec<&str> = head.split(' ').collect();
        if f.len() != 8 {
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
            target: encode_path(target),
            ino: f[7].parse().unwrap_or(0),
            xattrs: None,
        };
        out.insert(encode_path(path), stat);
    }
    out
}

/// `sha256sum` output, names keyed in `encode_path` form (as the manifest
/// has them); names with a backslash or newline come escaped with a leading
/// backslash on the line, every other byte as it is.
pub fn parse_sha256sum(raw: &[u8]) -> HashMap<String, String> {
    raw.split(|b| *b == b'\n')
        .filter_map(|l| {
            let (escaped, l) = match l.strip_prefix(b"\\") {
                Some(rest) => (true, rest),
                None => (false, l),
            };
            let sep = l.windows(2).position(|w| w == b"  ")?;
            let (hash, name) = (std::str::from_utf8(&l[..sep]).ok()?, &l[sep + 2..]);
            let name = if escaped {
                unescape_sha_name(name)
            } else {
                name.to_vec()
            };
            Some((encode_path(&name), hash.to_owned()))
        })
        .collect()
}

/// Undoes sha256sum's escaping of a name (`\\`, `\n`, and `\r` in
/// newer coreutils).
fn unescape_sha_name(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    let mut it = name.iter().copied();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    out
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

/// Why changes made after this boot can be told from the image's: the
/// guest clock agrees with the host's, so a ctime after the guest's boot
/// time really is after the boot. None (with the reason in the evidence)
/// when the clock cannot be trusted: then nothing is excused.
fn leniency(obs: &Observation) -> Result<String, String> {
    if obs.boot_epoch <= 0.0 {
        return Err("the guest's boot time is unknown".into());
    }
    let Some(clock) = obs.clock else {
        return Err("the guest clock could not be read".into());
    };
    let skew = clock.skew();
    if !clock.agrees() {
        return Err(format!(
            "the guest clock is {:.0} s {} the host's",
            skew.abs(),
            if skew < 0.0 { "behind" } else { "ahead of" }
        ));
    }
    Ok(format!(
        "guest clock within {:.0} s of the host's",
        skew.abs().max(1.0)
    ))
}

pub fn judge(obs: &Observation, expect: &Expectations) -> CheckResult {
    let mut evidence = Vec::new();
    let mut bad = 0usize;
    let mut changed_since_boot: Vec<String> = Vec::new();
    let lenient = leniency(obs);
    let guest_now = obs.clock.map_or(f64::INFINITY, |c| c.guest);
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
        wrong.extend(xattrs_wrong(f, st));
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
        // not the image's — provided the guest clock can tell (see
        // `leniency`), and the change is not from the guest's future.
        let touched_after_boot = lenient.is_ok()
            && st.ctime >= obs.boot_epoch
            && st.ctime <= guest_now + CLOCK_TOLERANCE;
        let excuse = || {
            format!(
                "{} (changed {:.0} s after boot)",
                f.path,
                st.ctime - obs.boot_epoch
            )
        };
        if content_changed {
            if touched_after_boot {
                changed_since_boot.push(excuse());
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
                changed_since_boot.push(excuse());
                continue;
            }
            bad += 1;
            evidence.push(format!("{}: {}", f.path, wrong.join("; ")));
        }
    }
    let split = hardlinks_split(expect, &obs.stats);
    bad += split.len();
    evidence.extend(split);
    let mut nonempty = Vec::new();
    if let Some(e) = &obs.toplevel_error {
        nonempty.push(e.clone());
    }
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
    match &lenient {
        Ok(why) if !changed_since_boot.is_empty() => evidence.push(format!(
            "{} file(s) changed by the running system after boot (not counted; {why}, boot at {:.0}): {}",
            changed_since_boot.len(),
            obs.boot_epoch,
            changed_since_boot
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Ok(_) => {}
        Err(why) => evidence.push(format!(
            "changes made after boot are not told apart from the image's: {why}"
        )),
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
            ino: 0,
            xattrs: None,
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
            toplevel_error: None,
            boot_epoch: 1000.0,
            clock: Some(Clock {
                guest: 2100.0,
                host: 2100.4,
                uncertainty: 0.1,
            }),
        }
    }

    #[test]
    fn tolerate_changes_made_by_the_running_system() {
        let r = judge(&obs(), &expectations());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert_eq!(
            r.evidence[0],
            "1 file(s) changed by the running system after boot (not counted; guest clock within 1 s of the host's, boot at 1000): /var/lib/systemd/random-seed (changed 1000 s after boot)"
        );
    }

    #[test]
    fn a_guest_clock_behind_the_build_time_excuses_nothing() {
        // The guest booted at "1000" by its own clock, but the host says it
        // is 5000: every file of the image (built at 2000, before the run)
        // would look "changed after boot". Nothing may be excused.
        let mut o = obs();
        o.clock = Some(Clock {
            guest: 1100.0,
            host: 5000.0,
            uncertainty: 0.1,
        });
        o.stats.get_mut("/root/.ssh/authorized_keys").unwrap().ctime = 2000.0;
        o.sha256
            .insert("/root/.ssh/authorized_keys".into(), "00".repeat(32));
        let r = judge(&o, &expectations());
        assert_eq!(r.status, Status::Fail, "{r:?}");
        assert!(r
            .evidence
            .iter()
            .any(|e| e == "/root/.ssh/authorized_keys: contents differ (sha256)"));
        assert!(r
            .evidence
            .iter()
            .any(|e| e == "/var/lib/systemd/random-seed: contents differ (sha256)"));
        assert!(
            r.evidence.contains(
                &"changes made after boot are not told apart from the image's: the guest clock is 3900 s behind the host's"
                    .to_owned()
            ),
            "{:?}",
            r.evidence
        );
        // Without a clock reading, likewise.
        let mut o = obs();
        o.clock = None;
        assert_eq!(judge(&o, &expectations()).status, Status::Fail);
    }

    #[test]
    fn a_top_level_view_that_cannot_be_mounted_fails_the_check_naming_it() {
        let mut o = obs();
        o.toplevel_entries.clear();
        o.toplevel_error = Some(
            "cannot mount the top-level subvolume (subvolid=5) of /'s filesystem: mount: /run/strata-top.x: unknown filesystem type 'ext4'"
                .into(),
        );
        let r = judge(&o, &expectations());
        assert_eq!(r.status, Status::Fail);
        assert!(
            r.detail.contains("cannot mount the top-level subvolume"),
            "{}",
            r.detail
        );
    }

    #[test]
    fn many_paths_are_split_into_batches_below_the_agents_output_cap() {
        let long = "x".repeat(100);
        let paths: Vec<String> = (0..30_000).map(|i| format!("/{long}/{i}")).collect();
        let b = batches(paths.iter().map(|p| p.clone().into_bytes()));
        assert!(b.len() >= 3, "{}", b.len());
        assert!(b.iter().all(|b| b.len() <= BATCH_BYTES));
        let back: usize = b
            .iter()
            .map(|b| b.iter().filter(|c| **c == 0).count())
            .sum();
        assert_eq!(back, 30_000);
        assert!(batches(std::iter::empty()).is_empty());
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
        let raw = b"f 600 0 0 99 40 1700000000.5 12\0/root/.ssh/authorized_keys\0\0l 777 0 0 7 41 1.0 13\0/var/run\0/run\0";
        let s = parse_stats(raw);
        assert_eq!(s["/root/.ssh/authorized_keys"].mode, 0o600);
        assert_eq!(s["/var/run"].target, "/run");
        assert_eq!(s["/var/run"].ino, 13);
        let h = parse_sha256sum(b"abc  /a b\n\\def  /x\\ny\n12  /caf\xe9\n34  /100%\n");
        assert_eq!(h["/a b"], "abc");
        assert_eq!(h["/x\ny"], "def");
        // Keyed as the manifest names them (lossless `encode_path` form).
        assert_eq!(h["/caf%E9"], "12");
        assert_eq!(h["/100%25"], "34");
        assert_eq!(guest_path("/caf%E9"), b"/caf\xe9");
        let s = parse_stats(b"f 600 0 0 9 40 1.0 5\0/caf\xe9\0\0");
        assert!(s.contains_key("/caf%E9"));
    }

    /// The `obs()` world where the two moved files carry what a move must
    /// keep: an ACL, a capability and a user xattr, one hardlink group, and
    /// a symlink; all intact in the guest.
    fn kept() -> (Observation, Expectations) {
        let mut e = expectations();
        let x = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        e.moved_files[0].xattrs = x(&[
            ("system.posix_acl_access", "0200000001000600ffffffff"),
            ("user.note", "6869"),
        ]);
        e.moved_files[1].xattrs = x(&[("security.capability", "01000002")]);
        let mut link = e.moved_files[0].clone();
        link.path = "/root/.ssh/keys-link".into();
        e.moved_files[0].hardlink = Some("/root/.ssh/authorized_keys".into());
        link.hardlink = Some("/root/.ssh/authorized_keys".into());
        let sym = MovedFile {
            path: "/var/lib/current".into(),
            file_type: FileType::Symlink,
            sha256: None,
            mode: 0o777,
            uid: 0,
            gid: 0,
            size: 3,
            target: Some("v1%25".into()),
            xattrs: BTreeMap::new(),
            hardlink: None,
        };
        e.moved_files.push(link);
        e.moved_files.push(sym);

        let mut o = obs();
        let keys = o.stats.get_mut("/root/.ssh/authorized_keys").unwrap();
        keys.ino = 300;
        keys.xattrs = Some(e.moved_files[0].xattrs.clone());
        let keys = keys.clone();
        o.stats.insert("/root/.ssh/keys-link".into(), keys);
        o.sha256
            .insert("/root/.ssh/keys-link".into(), "ab".repeat(32));
        // random-seed is rewritten after boot (its content change is
        // excused); its capability must still be there.
        o.stats
            .get_mut("/var/lib/systemd/random-seed")
            .unwrap()
            .xattrs = Some(e.moved_files[1].xattrs.clone());
        let mut l = stat('l', 0o777, 41, 1.0);
        l.target = "v1%25".into();
        o.stats.insert("/var/lib/current".into(), l);
        (o, e)
    }

    fn failing(o: &Observation, e: &Expectations) -> Vec<String> {
        let r = judge(o, e);
        assert_eq!(r.status, Status::Fail, "{r:?}");
        r.evidence
    }

    #[test]
    fn xattrs_acls_capabilities_hardlinks_and_symlinks_kept_pass() {
        let (o, e) = kept();
        let r = judge(&o, &e);
        assert_eq!(r.status, Status::Pass, "{r:?}");
    }

    #[test]
    fn a_lost_xattr_fails() {
        let (mut o, e) = kept();
        let st = o.stats.get_mut("/root/.ssh/authorized_keys").unwrap();
        st.xattrs.as_mut().unwrap().remove("user.note");
        let ev = failing(&o, &e);
        assert!(
            ev.contains(&"/root/.ssh/authorized_keys: xattr user.note lost".to_owned()),
            "{ev:?}"
        );
    }

    #[test]
    fn a_changed_acl_fails() {
        let (mut o, e) = kept();
        let st = o.stats.get_mut("/root/.ssh/authorized_keys").unwrap();
        st.xattrs.as_mut().unwrap().insert(
            "system.posix_acl_access".into(),
            "0200000001000400ffffffff".into(),
        );
        let ev = failing(&o, &e);
        assert!(
            ev[0].starts_with("/root/.ssh/authorized_keys: xattr system.posix_acl_access is 0x0200000001000400ffffffff, expected 0x0200000001000600ffffffff"),
            "{ev:?}"
        );
    }

    #[test]
    fn a_dropped_capability_fails_even_on_a_file_changed_after_boot() {
        let (mut o, e) = kept();
        o.stats
            .get_mut("/var/lib/systemd/random-seed")
            .unwrap()
            .xattrs = Some(BTreeMap::new());
        let ev = failing(&o, &e);
        assert!(
            ev.iter()
                .any(|l| l
                    .starts_with("/var/lib/systemd/random-seed: xattr security.capability lost")),
            "{ev:?}"
        );
        // Xattrs that could not be read are not taken as kept.
        let (mut o, e) = kept();
        o.stats
            .get_mut("/var/lib/systemd/random-seed")
            .unwrap()
            .xattrs = None;
        let ev = failing(&o, &e);
        assert!(ev.iter().any(|l| l.contains("no getfattr")), "{ev:?}");
    }

    #[test]
    fn a_split_hardlink_group_fails() {
        let (mut o, e) = kept();
        o.stats.get_mut("/root/.ssh/keys-link").unwrap().ino = 301;
        let ev = failing(&o, &e);
        assert!(
            ev.contains(
                &"hardlink group /root/.ssh/authorized_keys split: /root/.ssh/authorized_keys (inode 300), /root/.ssh/keys-link (inode 301)"
                    .to_owned()
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn a_retargeted_symlink_fails() {
        let (mut o, e) = kept();
        o.stats.get_mut("/var/lib/current").unwrap().target = "v2".into();
        let ev = failing(&o, &e);
        assert!(
            ev.contains(&"/var/lib/current: symlink to \"v2\", expected \"v1%25\"".to_owned()),
            "{ev:?}"
        );
    }
}
