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

/// NUL-terminated `paths`, split into batches for separate guest commands.
fn batches<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<Vec<u8>> {
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
        b.extend_from_slice(p.as_bytes());
        b.push(0);
        count += 1;
    }
    out
}

const STAT_SCRIPT: &str = r#"xargs -0 -r sh -c 'find "$@" -maxdepth 0 -printf "%y %m %U %G %s %D %C@\0%p\0%l\0" 2>/dev/null; exit 0' sh"#;
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
        .map(String::as_str)
        .chain(expect.moved_files.iter().map(|f| f.path.as_str()));
    let files = expect
        .moved_files
        .iter()
        .filter(|f| f.file_type == FileType::File)
        .map(|f| f.path.as_str());
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
        sha256.extend(parse_sha256sum(&m.finish(running).await?.stdout_str()));
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
        let b = batches(paths.iter().map(String::as_str));
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
        let raw = b"f 600 0 0 99 40 1700000000.5\0/root/.ssh/authorized_keys\0\0l 777 0 0 7 41 1.0\0/var/run\0/run\0";
        let s = parse_stats(raw);
        assert_eq!(s["/root/.ssh/authorized_keys"].mode, 0o600);
        assert_eq!(s["/var/run"].target, "/run");
        let h = parse_sha256sum("abc  /a b\n\\def  /x\\ny\n");
        assert_eq!(h["/a b"], "abc");
        assert_eq!(h["/x\ny"], "def");
    }
}
