//! `moved-files`: every file the build moved into state is where the booted
//! system expects it — same type, mode, owner, contents, symlink target,
//! xattrs (ACLs, capabilities), hardlink groups — on its state subvolume,
//! and the mountpoints of the system subvolumes under the state mounts are
//! empty.

use super::guest::{parse_getfattr, GETFATTR_XARGS};
use super::{CheckId, Vm};
use crate::agent::Running;
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use std::collections::{BTreeMap, HashMap};
use strata_builder::expect::Expectations;
use strata_builder::layout::{self, Tree};
use strata_builder::manifest::{FileType, MovedFile};
use strata_builder::pathenc::{decode_path, encode_path};

const ID: CheckId = CheckId::MovedFiles;

pub async fn run(vm: &mut impl Vm, expect: &Expectations) -> Result<CheckResult, MachineError> {
    // Started with the phase's first check when the session could (it has
    // run in the guest beside the checks before this one); else now.
    let started = match vm.started(ID) {
        Some(super::Started::MovedFiles(s)) => s,
        _ => start(vm.machine(), expect).await?,
    };
    let mut obs = finish(vm.machine(), started, expect).await?;
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

/// The record tags of [`observe_script`]'s stdin: which of its tools a
/// path goes to.
const TAG_STAT: u8 = b'S';
const TAG_HASH: u8 = b'H';
const TAG_XATTR: u8 = b'X';

/// The sections [`observe_script`] prints, in order, each as `wc -c`
/// sized it; the host cuts its stdout by these sizes, so a section may hold
/// any bytes (NULs, newlines in names).
const SECTIONS: [&str; 5] = ["stat", "sha", "xattr", "top", "misc"];

/// First line of the `top` section when the top-level subvolume could not
/// be mounted; the rest is mount's complaint.
const TOPLEVEL_MOUNT_FAILED: &str = "mount-failed";

/// One guest command that observes everything `moved-files` judges: each
/// guest command costs a round trip and a shell, and every process started
/// under TCG costs tens of milliseconds, so the observation is one script.
/// Its stdin is NUL-terminated records `<tag><path>` (tags above); it
/// hashes the `H` paths, stats the `S` paths and reads the xattrs of the
/// `X` paths, the three at once (side by side on a guest with two vCPUs), and, when
/// `whole` (the first batch), counts the entries of the orig/ and run/
/// mountpoints in the top-level view and reads the guest's boot time and
/// clock. It prints `wc -c` of its [`SECTIONS`] files, then their bytes.
fn observe_script(whole: bool, expect: &Expectations) -> String {
    let mut top = String::new();
    if whole {
        // Entries are counted by globbing, a shell builtin: no process per
        // directory. A glob that matches nothing stays literal, which
        // neither -e nor -L accepts unless such an entry exists.
        top.push_str(
            r#"count() { n=0; for e in "$1"/* "$1"/.[!.]* "$1"/..?*; do if [ -e "$e" ] || [ -L "$e" ]; then n=$((n+1)); fi; done; echo "$n"; }
dev=$(findmnt -n -o SOURCE --nofsroot /)
if err=$(mount -o subvolid=5 "$dev" "$top" 2>&1); then
mounted=1
"#,
        );
        for d in &expect.state_dirs {
            for tree in Tree::BOTH {
                let side = tree.name();
                top.push_str(&format!(
                    "p=\"$top/{dir}/{d}\"; if [ -d \"$p\" ]; then echo \"{side}/{d} $(count \"$p\")\"; else echo '{side}/{d} missing'; fi\n",
                    dir = expect.version.tree(tree)
                ));
            }
        }
        top.push_str(&format!(
            "else printf '{TOPLEVEL_MOUNT_FAILED}\\n%s\\n' \"$err\"; fi > \"$t/top\"\n\
             {{ awk '/^btime /{{print $2}}' /proc/stat; date +%s.%N; }} > \"$t/misc\"\n"
        ));
    }
    format!(
        r#"set -u
t=$(mktemp -d /run/strata-moved.XXXXXX) || exit 96
top="$t/mnt"
mounted=
mkdir "$top" || exit 96
# Never rm -r: the top-level subvolume may still be mounted under $t.
trap 'if [ -n "$mounted" ]; then umount "$top"; fi; rmdir "$top" && rm -f "$t"/in "$t"/stat "$t"/sha "$t"/xattr "$t"/top "$t"/misc && rmdir "$t"' EXIT
: > "$t/top"; : > "$t/misc"; : > "$t/xattr"
cat > "$t/in"
sed -z -n 's/^{h}//p' "$t/in" | xargs -0 -r sha256sum -- > "$t/sha" 2>/dev/null &
sed -z -n 's/^{s}//p' "$t/in" | xargs -0 -r sh -c 'find "$@" -maxdepth 0 -printf "%y %m %U %G %s %D %C@ %i\0%p\0%l\0" 2>/dev/null; exit 0' sh > "$t/stat" &
if command -v getfattr >/dev/null; then
sed -z -n 's/^{x}//p' "$t/in" | {GETFATTR_XARGS} > "$t/xattr" 2>/dev/null &
else echo no-getfattr > "$t/xattr"; fi
{top}wait
cd "$t" && wc -c {sections} && cat {sections}
"#,
        h = TAG_HASH as char,
        s = TAG_STAT as char,
        x = TAG_XATTR as char,
        sections = SECTIONS.join(" "),
    )
}

/// The stdin of [`observe_script`] for every path `expect` names,
/// split into batches for separate guest commands.
fn observe_input(expect: &Expectations) -> Vec<Vec<u8>> {
    let tagged = |tag: u8, p: Vec<u8>| {
        let mut r = Vec::with_capacity(p.len() + 1);
        r.push(tag);
        r.extend_from_slice(&p);
        r
    };
    let mountpoints = expect
        .state_dirs
        .iter()
        .map(|d| tagged(TAG_STAT, layout::state_mountpoint(d).into_bytes()));
    let files = expect.moved_files.iter().flat_map(|f| {
        let p = guest_path(&f.path);
        let mut recs = vec![tagged(TAG_STAT, p.clone())];
        if f.file_type == FileType::File {
            recs.push(tagged(TAG_HASH, p.clone()));
        }
        if !f.xattrs.is_empty() {
            recs.push(tagged(TAG_XATTR, p));
        }
        recs
    });
    batches(mountpoints.chain(files))
}

/// What one run of [`observe_script`] printed.
#[derive(Debug, Default, PartialEq)]
pub struct Observed {
    pub stats: HashMap<String, Stat>,
    pub sha256: HashMap<String, String>,
    /// Path -> xattrs; None when the guest has no getfattr.
    pub xattrs: Option<HashMap<String, BTreeMap<String, String>>>,
    pub toplevel_entries: BTreeMap<String, Option<usize>>,
    pub toplevel_error: Option<String>,
    pub boot_epoch: Option<f64>,
    pub guest_clock: Option<f64>,
}

/// Cuts [`observe_script`]'s stdout into its sections: `wc -c` lines
/// (`SIZE NAME`, then a `total` line), then the sections' bytes back to
/// back. None when it is not that (the script died half-way).
pub fn parse_observed(raw: &[u8]) -> Option<Observed> {
    let mut rest = raw;
    let mut sizes = Vec::new();
    for name in SECTIONS {
        let nl = rest.iter().position(|b| *b == b'\n')?;
        let line = std::str::from_utf8(&rest[..nl]).ok()?;
        rest = &rest[nl + 1..];
        let (size, got) = line.trim_start().split_once(' ')?;
        if got != name {
            return None;
        }
        sizes.push(size.parse::<usize>().ok()?);
    }
    // The `total` line.
    let nl = rest.iter().position(|b| *b == b'\n')?;
    rest = &rest[nl + 1..];
    if rest.len() != sizes.iter().sum::<usize>() {
        return None;
    }
    let mut sections = Vec::new();
    for size in sizes {
        let (section, after) = rest.split_at(size);
        sections.push(section);
        rest = after;
    }
    let [stat, sha, xattr, top, misc] = sections[..] else {
        return None;
    };
    let xattrs = (xattr != b"no-getfattr\n").then(|| parse_getfattr(xattr));
    let top = String::from_utf8_lossy(top);
    let (toplevel_entries, toplevel_error) =
        match top.strip_prefix(&format!("{TOPLEVEL_MOUNT_FAILED}\n")) {
            Some(why) => (
                BTreeMap::new(),
                Some(format!(
                    "cannot mount the top-level subvolume (subvolid=5) of /'s filesystem: {}",
                    why.trim()
                )),
            ),
            None => (parse_toplevel(&top), None),
        };
    let misc = String::from_utf8_lossy(misc);
    let mut times = misc.lines().map(|l| l.trim().parse::<f64>().ok());
    Some(Observed {
        stats: parse_stats(stat),
        sha256: parse_sha256sum(sha),
        xattrs,
        toplevel_entries,
        toplevel_error,
        boot_epoch: times.next().flatten(),
        guest_clock: times.next().flatten(),
    })
}

/// The guest commands of one observation (see [`start`]), running.
#[derive(Debug)]
pub struct Started {
    batches: Vec<Running>,
    /// The host's clock just before the first batch started: with the
    /// moment its result is collected, it brackets the guest's clock reading.
    host_before: f64,
}

/// Starts the observation in the guest and returns at once; [`finish`]
/// collects it. A session starts it before the other checks of the phase
/// (they only read), so that it runs beside them: it is the slowest.
pub async fn start(m: &mut Machine, expect: &Expectations) -> Result<Started, MachineError> {
    let host_before = crate::qmp::now_epoch();
    let mut batches = Vec::new();
    for (i, batch) in observe_input(expect).iter().enumerate() {
        let whole = i == 0;
        batches.push(
            m.start_script(&observe_script(whole, expect), Some(batch))
                .await?,
        );
    }
    Ok(Started {
        batches,
        host_before,
    })
}

/// Collects what [`start`] started and puts the batches together.
pub async fn finish(
    m: &mut Machine,
    started: Started,
    expect: &Expectations,
) -> Result<Observation, MachineError> {
    let mut stats = HashMap::new();
    let mut sha256 = HashMap::new();
    let mut xattrs: Option<HashMap<String, BTreeMap<String, String>>> = Some(HashMap::new());
    let mut first: Option<(Observed, f64)> = None;
    for (i, running) in started.batches.iter().enumerate() {
        let whole = i == 0;
        let out = m.finish(running).await?;
        let host_after = crate::qmp::now_epoch();
        let mut parsed = match (out.exit_code, parse_observed(&out.stdout)) {
            (Some(0), Some(p)) => p,
            (code, _) => {
                return Err(MachineError::CommandFailed {
                    command: "stat, hash and read the xattrs of the moved files; list the orig/ and run/ mountpoints in the top-level view".into(),
                    code: format!("{code:?}"),
                    stderr: out.stderr_str().trim().to_owned(),
                })
            }
        };
        stats.extend(std::mem::take(&mut parsed.stats));
        sha256.extend(std::mem::take(&mut parsed.sha256));
        match (&mut xattrs, parsed.xattrs.take()) {
            (Some(all), Some(got)) => all.extend(got),
            _ => xattrs = None,
        }
        if whole {
            first = Some((parsed, host_after));
        }
    }
    // Xattrs are judged only for the entries whose record has some; without
    // getfattr in the guest they stay unread (None), which the judge reports.
    if let Some(got) = &xattrs {
        for f in expect.moved_files.iter().filter(|f| !f.xattrs.is_empty()) {
            if let Some(st) = stats.get_mut(&f.path) {
                st.xattrs = Some(got.get(&f.path).cloned().unwrap_or_default());
            }
        }
    }
    let (top, host_after) = first.unwrap_or_default();
    // The guest read its clock between the start and the collection: the
    // bracket is wider when the script ran beside other checks (about a
    // second), which is nothing against CLOCK_TOLERANCE.
    let host_before = started.host_before;
    let clock = top.guest_clock.map(|guest| Clock {
        guest,
        host: (host_before + host_after) / 2.0,
        uncertainty: (host_after - host_before) / 2.0,
    });
    Ok(Observation {
        stats,
        sha256,
        toplevel_entries: top.toplevel_entries,
        toplevel_error: top.toplevel_error,
        boot_epoch: top.boot_epoch.unwrap_or(0.0),
        clock,
    })
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

    /// `observe_script`'s stdout for these sections, as `wc -c` and `cat`
    /// print them.
    fn printed(sections: [&[u8]; 5]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, bytes) in SECTIONS.iter().zip(sections) {
            out.extend_from_slice(format!("{:>4} {name}\n", bytes.len()).as_bytes());
        }
        let total: usize = sections.iter().map(|s| s.len()).sum();
        out.extend_from_slice(format!("{total:>4} total\n").as_bytes());
        for s in sections {
            out.extend_from_slice(s);
        }
        out
    }

    #[test]
    fn the_one_commands_sections_are_cut_by_size_whatever_the_names_hold() {
        // Names with spaces, newlines and a byte that is no UTF-8, in every
        // section that carries names.
        let stat: &[u8] = b"f 600 0 0 99 40 1700000000.5 12\0/srv/a b\nc\0\0d 755 0 0 0 41 1.0 7\0/srv/caf\xe9\0\0";
        let sha: &[u8] = b"\\abc  /srv/a b\\nc\n12  /srv/x y\n";
        let xattr: &[u8] = b"# file: /srv/a b\\012c\nuser.note=0x6869\n\n";
        let top: &[u8] = b"orig/srv 0\nrun/srv 2\norig/var missing\n";
        let misc: &[u8] = b"1700000000\n1700000100.25\n";
        let o = parse_observed(&printed([stat, sha, xattr, top, misc])).expect("parsed");
        assert_eq!(o.stats["/srv/a b\nc"].mode, 0o600);
        assert_eq!(o.stats["/srv/caf%E9"].kind, 'd');
        assert_eq!(o.sha256["/srv/a b\nc"], "abc");
        assert_eq!(o.sha256["/srv/x y"], "12");
        assert_eq!(
            o.xattrs.as_ref().unwrap()["/srv/a b\nc"]["user.note"],
            "6869"
        );
        assert_eq!(o.toplevel_entries["orig/srv"], Some(0));
        assert_eq!(o.toplevel_entries["run/srv"], Some(2));
        assert_eq!(o.toplevel_entries["orig/var"], None);
        assert_eq!(o.toplevel_error, None);
        assert_eq!(o.boot_epoch, Some(1_700_000_000.0));
        assert_eq!(o.guest_clock, Some(1_700_000_100.25));

        // No getfattr in the guest: xattrs unread, not empty.
        let o = parse_observed(&printed([stat, sha, b"no-getfattr\n", top, misc])).unwrap();
        assert_eq!(o.xattrs, None);
        // The top-level view could not be mounted: said, with mount's words.
        let o = parse_observed(&printed([
            stat,
            sha,
            xattr,
            b"mount-failed\nmount: /run/x: wrong fs type\n",
            misc,
        ]))
        .unwrap();
        assert!(o.toplevel_entries.is_empty());
        assert_eq!(
            o.toplevel_error.as_deref(),
            Some("cannot mount the top-level subvolume (subvolid=5) of /'s filesystem: mount: /run/x: wrong fs type")
        );
        // A later batch: no top-level view, no clock.
        let o = parse_observed(&printed([stat, sha, xattr, b"", b""])).unwrap();
        assert!(o.toplevel_entries.is_empty() && o.boot_epoch.is_none());
    }

    #[test]
    fn output_cut_short_is_no_observation() {
        let full = printed([b"a", b"b", b"c", b"d", b"e"]);
        assert!(parse_observed(&full).is_some());
        // A section missing its bytes, a header missing, nothing at all.
        assert!(parse_observed(&full[..full.len() - 1]).is_none());
        let headless: Vec<u8> = full.splitn(2, |b| *b == b'\n').nth(1).unwrap().to_vec();
        assert!(parse_observed(&headless).is_none());
        assert!(parse_observed(b"").is_none());
    }

    #[test]
    fn every_path_goes_to_the_tools_its_record_needs() {
        let (_, e) = kept();
        let input = observe_input(&e);
        assert_eq!(input.len(), 1);
        let recs: Vec<&[u8]> = input[0]
            .split(|b| *b == 0)
            .filter(|r| !r.is_empty())
            .collect();
        let has = |r: &[u8]| recs.contains(&r);
        // The mountpoints are stat'ed, to compare devices.
        assert!(has(b"S/root") && has(b"S/var"));
        // A file: stat, hash; with xattrs recorded: xattrs too.
        assert!(has(b"S/root/.ssh/authorized_keys"));
        assert!(has(b"H/root/.ssh/authorized_keys"));
        assert!(has(b"X/root/.ssh/authorized_keys"));
        // A symlink is stat'ed only (its target is in the stat).
        assert!(has(b"S/var/lib/current") && !has(b"H/var/lib/current"));
        assert!(!has(b"X/var/lib/current"));
        // The manifest's `%` escapes are decoded to the guest's bytes.
        let mut e = expectations();
        e.moved_files[0].path = "/root/caf%E9".into();
        assert!(observe_input(&e)[0]
            .split(|b| *b == 0)
            .any(|r| r == b"H/root/caf\xe9"));
    }

    #[test]
    fn the_one_command_is_valid_shell() {
        for whole in [true, false] {
            let script = observe_script(whole, &expectations());
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .expect("sh");
            assert!(
                out.status.success(),
                "{script}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
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
