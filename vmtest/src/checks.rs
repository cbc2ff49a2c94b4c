//! The checks of layout.md §5. Each one gathers what it needs from the
//! guest, then hands it to a pure `judge_*` function that turns observations
//! into a verdict with evidence (unit-tested without a VM).

use crate::agent::Running;
use crate::journal::{self, JournalWarning, WarningKind};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status, Warning};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use strata_builder::expect::Expectations;
use strata_builder::layout::{self, Tree};
use strata_builder::manifest::FileType;

pub const ALL: [&str; 6] = [
    "root",
    "state-mounts",
    "fstab",
    "moved-files",
    "overmount",
    "persistence",
];

/// One row of `findmnt -J -l`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Mount {
    pub target: String,
    pub source: Option<String>,
    pub fstype: Option<String>,
    pub fsroot: Option<String>,
    pub uuid: Option<String>,
    pub options: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FindmntJson {
    filesystems: Vec<Mount>,
}

pub fn parse_findmnt(json: &str) -> Result<Vec<Mount>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str::<FindmntJson>(json)
        .map(|f| f.filesystems)
        .map_err(|e| format!("findmnt -J output: {e}"))
}

/// The live mount table. Later mounts over the same target win, as in the kernel.
pub async fn mount_table(m: &mut Machine) -> Result<Vec<Mount>, MachineError> {
    let out = m
        .succeed("findmnt -J -l -o TARGET,SOURCE,FSTYPE,FSROOT,UUID,OPTIONS")
        .await?;
    parse_findmnt(&out).map_err(|e| MachineError::CommandFailed {
        command: "findmnt -J".into(),
        code: "0".into(),
        stderr: e,
    })
}

fn mounted_at<'a>(table: &'a [Mount], target: &str) -> Option<&'a Mount> {
    table.iter().rev().find(|m| m.target == target)
}

// ---------------------------------------------------------------- root

pub fn judge_root(table: &[Mount], expect: &Expectations) -> CheckResult {
    let want_root = layout::fsroot(&expect.version.run());
    let Some(root) = mounted_at(table, "/") else {
        return CheckResult::new("root", Status::Fail, "nothing is mounted at /", vec![]);
    };
    let fstype = root.fstype.as_deref().unwrap_or("?");
    let fsroot = root.fsroot.as_deref().unwrap_or("?");
    let uuid = root.uuid.as_deref().unwrap_or("?");
    let evidence = vec![format!(
        "/ is {fstype} from {}, UUID {uuid}, fsroot {fsroot}, options {}",
        root.source.as_deref().unwrap_or("?"),
        root.options.as_deref().unwrap_or("?")
    )];
    let mut wrong = Vec::new();
    if fstype != "btrfs" {
        wrong.push(format!("fstype {fstype}, expected btrfs"));
    }
    if !uuid.eq_ignore_ascii_case(&expect.fs_uuid) {
        wrong.push(format!(
            "filesystem UUID {uuid}, expected the image's {}",
            expect.fs_uuid
        ));
    }
    if fsroot != want_root {
        wrong.push(format!("fsroot {fsroot}, expected {want_root}"));
    }
    if wrong.is_empty() {
        CheckResult::new(
            "root",
            Status::Pass,
            format!("/ is btrfs {} at {want_root}", expect.fs_uuid),
            evidence,
        )
    } else {
        CheckResult::new(
            "root",
            Status::Fail,
            format!("/: {}", wrong.join("; ")),
            evidence,
        )
    }
}

// -------------------------------------------------------- state-mounts

pub fn judge_state_mounts(table: &[Mount], expect: &Expectations) -> CheckResult {
    let root_uuid = mounted_at(table, "/").and_then(|m| m.uuid.clone());
    let mut evidence = Vec::new();
    let mut bad = Vec::new();
    for d in &expect.state_dirs {
        let target = layout::state_mountpoint(d);
        let want_root = layout::fsroot(&layout::state(d));
        match mounted_at(table, &target) {
            None => {
                bad.push(target.clone());
                evidence.push(format!(
                    "{target}: not a mountpoint (expected subvolume {want_root})"
                ));
            }
            Some(m) => {
                let fstype = m.fstype.as_deref().unwrap_or("?");
                let fsroot = m.fsroot.as_deref().unwrap_or("?");
                let uuid = m.uuid.as_deref().unwrap_or("?");
                let mut wrong = Vec::new();
                if fstype != "btrfs" {
                    wrong.push(format!("fstype {fstype}"));
                }
                if fsroot != want_root {
                    wrong.push(format!("fsroot {fsroot}, expected {want_root}"));
                }
                if root_uuid.as_deref() != Some(uuid) {
                    wrong.push(format!(
                        "UUID {uuid} differs from /'s {}",
                        root_uuid.as_deref().unwrap_or("?")
                    ));
                }
                if wrong.is_empty() {
                    evidence.push(format!("{target}: btrfs, fsroot {fsroot}, UUID {uuid}"));
                } else {
                    bad.push(target.clone());
                    evidence.push(format!("{target}: {}", wrong.join("; ")));
                }
            }
        }
    }
    if bad.is_empty() {
        CheckResult::new(
            "state-mounts",
            Status::Pass,
            format!(
                "{} state subvolumes mounted: {}",
                expect.state_dirs.len(),
                expect
                    .state_dirs
                    .iter()
                    .map(|d| layout::state_mountpoint(d))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            evidence,
        )
    } else {
        CheckResult::new(
            "state-mounts",
            Status::Fail,
            format!("not mounted as expected: {}", bad.join(" ")),
            evidence,
        )
    }
}

// --------------------------------------------------------------- fstab

pub struct FstabObservation {
    pub verify_output: String,
    pub verify_exit: Option<i64>,
    pub entries: Vec<Mount>,
    pub failed_units: String,
}

pub async fn observe_fstab(m: &mut Machine) -> Result<FstabObservation, MachineError> {
    let verify = m.exec("findmnt --verify 2>&1").await?;
    let entries = m
        .succeed("findmnt -J -l --fstab -o TARGET,SOURCE,FSTYPE,OPTIONS")
        .await?;
    let failed = m
        .succeed("systemctl --failed --plain --no-legend --no-pager")
        .await?;
    Ok(FstabObservation {
        verify_output: verify.stdout_str(),
        verify_exit: verify.exit_code,
        entries: parse_findmnt(&entries).map_err(|e| MachineError::CommandFailed {
            command: "findmnt --fstab -J".into(),
            code: "0".into(),
            stderr: e,
        })?,
        failed_units: failed,
    })
}

pub fn judge_fstab(obs: &FstabObservation, table: &[Mount]) -> CheckResult {
    let mut evidence = Vec::new();
    let mut problems = Vec::new();
    let verify = obs.verify_output.trim();
    // findmnt prints "[W]"/"[E]" per finding and a summary; a clean table
    // exits 0 with "Success, no errors or warnings detected".
    let findings: Vec<&str> = verify
        .lines()
        .filter(|l| l.contains("[W]") || l.contains("[E]"))
        .collect();
    if obs.verify_exit != Some(0) || !findings.is_empty() {
        problems.push("findmnt --verify reports problems".to_owned());
        evidence.extend(
            verify
                .lines()
                .map(|l| format!("findmnt --verify: {}", l.trim())),
        );
    } else {
        evidence.push(format!(
            "findmnt --verify: {}",
            verify.lines().last().unwrap_or("")
        ));
    }
    let mut mounted = 0;
    for e in &obs.entries {
        let fstype = e.fstype.as_deref().unwrap_or("");
        let opts = e.options.as_deref().unwrap_or("");
        if fstype == "swap" || e.target == "none" || opts.split(',').any(|o| o == "noauto") {
            continue;
        }
        if mounted_at(table, &e.target).is_some() {
            mounted += 1;
            evidence.push(format!(
                "fstab {} ({} {fstype}): mounted",
                e.target,
                e.source.as_deref().unwrap_or("?")
            ));
        } else {
            problems.push(format!("{} not mounted", e.target));
            evidence.push(format!(
                "fstab {} ({} {fstype} {opts}): NOT mounted",
                e.target,
                e.source.as_deref().unwrap_or("?")
            ));
        }
    }
    let failed: Vec<&str> = obs
        .failed_units
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !failed.is_empty() {
        problems.push(format!("{} failed unit(s)", failed.len()));
        evidence.extend(failed.iter().map(|l| format!("systemctl --failed: {l}")));
    }
    if problems.is_empty() {
        CheckResult::new(
            "fstab",
            Status::Pass,
            format!("findmnt --verify clean; {mounted} fstab entries mounted; no failed units"),
            evidence,
        )
    } else {
        CheckResult::new("fstab", Status::Fail, problems.join("; "), evidence)
    }
}

// --------------------------------------------------------- moved-files

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

pub struct MovedObservation {
    pub stats: HashMap<String, Stat>,
    pub sha256: HashMap<String, String>,
    /// "orig/var" -> number of entries in the top-level view ("missing" = None).
    pub toplevel_entries: BTreeMap<String, Option<usize>>,
    /// Guest boot time, seconds since the epoch.
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

pub async fn observe_moved(
    m: &mut Machine,
    expect: &Expectations,
) -> Result<MovedObservation, MachineError> {
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
    Ok(MovedObservation {
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

pub fn judge_moved(obs: &MovedObservation, expect: &Expectations) -> CheckResult {
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
        match obs.stats.get(&format!("/{dir}")) {
            Some(d) if d.dev == st.dev => {}
            Some(d) => wrong.push(format!(
                "on device {} but /{dir} is device {}: not on the state subvolume",
                st.dev, d.dev
            )),
            None => wrong.push(format!("/{dir} itself is missing")),
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
            "moved-files",
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
        CheckResult::new("moved-files", Status::Fail, what.join("; "), evidence)
    }
}

// ----------------------------------------------------------- overmount

/// Hidden entries under one mountpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hidden {
    pub paths: Vec<String>,
    pub bytes: u64,
}

/// Lists what is underneath `mountpoint`: a non-recursive bind mount of the
/// filesystem holding the mountpoint's directory shows the directory
/// without whatever is mounted on it.
pub async fn list_hidden(m: &mut Machine, mountpoint: &str) -> Result<Hidden, MachineError> {
    let q = crate::qemu::shell_quote(mountpoint);
    let script = format!(
        r#"set -u
mp={q}
parent=$(findmnt -n -o TARGET -T "$(dirname "$mp")")
b=$(mktemp -d /run/strata-under.XXXXXX)
trap 'umount "$b" 2>/dev/null; rmdir "$b"' EXIT
mount --bind "$parent" "$b" || exit 97
rel=${{mp#"$parent"}}
cd "$b/$rel" || exit 0
find . -mindepth 1 -printf '%y %s %P\0'
"#
    );
    let out = m.exec(&script).await?;
    if !out.success() {
        return Err(MachineError::CommandFailed {
            command: format!("list files hidden under {mountpoint}"),
            code: format!("{:?}", out.exit_code),
            stderr: out.stderr_str(),
        });
    }
    Ok(parse_hidden(mountpoint, &out.stdout))
}

pub fn parse_hidden(mountpoint: &str, raw: &[u8]) -> Hidden {
    let mut h = Hidden::default();
    for rec in raw.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let rec = String::from_utf8_lossy(rec);
        let mut it = rec.splitn(3, ' ');
        let (Some(kind), Some(size), Some(rel)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if kind == "f" {
            h.bytes += size.parse::<u64>().unwrap_or(0);
        }
        h.paths
            .push(format!("{}/{rel}", mountpoint.trim_end_matches('/')));
    }
    h.paths.sort();
    h
}

/// The boot journal as JSON lines.
pub async fn export_journal(m: &mut Machine) -> Result<String, MachineError> {
    let running = start_journal_export(m).await?;
    finish_journal_export(m, &running).await
}

/// Starts `journalctl -b -o json` so it can run while other checks do.
pub async fn start_journal_export(m: &mut Machine) -> Result<Running, MachineError> {
    m.start_script("journalctl -b -o json --no-pager", None)
        .await
}

pub async fn finish_journal_export(
    m: &mut Machine,
    running: &Running,
) -> Result<String, MachineError> {
    let out = m.finish(running).await?;
    if !out.success() || out.truncated {
        return Err(MachineError::CommandFailed {
            command: "journalctl -b -o json".into(),
            code: format!(
                "{:?}{}",
                out.exit_code,
                if out.truncated {
                    " (output truncated)"
                } else {
                    ""
                }
            ),
            stderr: out.stderr_str(),
        });
    }
    Ok(out.stdout_str())
}

pub fn to_warning(j: &JournalWarning, hidden: Option<&Hidden>) -> Warning {
    Warning {
        kind: j.kind.clone(),
        mountpoint: j.mountpoint.clone(),
        message: j.message.clone(),
        shadowed: hidden.map(|h| h.paths.clone()).unwrap_or_default(),
        shadowed_count: hidden.map_or(0, |h| h.paths.len()),
        shadowed_bytes: hidden.map_or(0, |h| h.bytes),
        unit: j.unit.clone(),
    }
}

/// The overmount check plus every journal warning, hidden files attached.
pub async fn overmount(
    m: &mut Machine,
    journal_json: &str,
) -> Result<(CheckResult, Vec<Warning>), MachineError> {
    let found = journal::mount_warnings(journal_json);
    let mut warnings = Vec::new();
    for j in &found {
        let hidden = match (&j.kind, &j.mountpoint) {
            (WarningKind::Overmount, Some(mp)) => Some(list_hidden(m, mp).await?),
            _ => None,
        };
        warnings.push(to_warning(j, hidden.as_ref()));
    }
    Ok((judge_overmount(&warnings), warnings))
}

pub fn judge_overmount(warnings: &[Warning]) -> CheckResult {
    let over: Vec<&Warning> = warnings
        .iter()
        .filter(|w| w.kind == WarningKind::Overmount)
        .collect();
    if over.is_empty() {
        return CheckResult::new(
            "overmount",
            Status::Pass,
            format!(
                "no journal entry with MESSAGE_ID {}",
                journal::OVERMOUNT_MESSAGE_ID
            ),
            vec![],
        );
    }
    let evidence = over
        .iter()
        .map(|w| {
            format!(
                "{}: {} hidden entries, {} ({})",
                w.mountpoint.as_deref().unwrap_or("?"),
                w.shadowed_count,
                crate::report::human_bytes(w.shadowed_bytes),
                w.shadowed
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    CheckResult::new(
        "overmount",
        Status::Fail,
        format!(
            "files hidden under {}",
            over.iter()
                .map(|w| w.mountpoint.clone().unwrap_or_else(|| "?".into()))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        evidence,
    )
}

// --------------------------------------------------------- persistence

pub const TOKEN_FILE: &str = ".strata-persistence-token";

/// Writes a distinct token into each state dir; returns (dir, token).
pub async fn write_tokens(
    m: &mut Machine,
    dirs: &[String],
    phase: &str,
) -> Result<Vec<(String, String)>, MachineError> {
    let mut tokens = Vec::new();
    let mut script = String::from("set -e\n");
    for d in dirs {
        let token = format!("{phase}-{:016x}", crate::random_u64());
        script.push_str(&format!(
            "printf '%s\\n' '{token}' > '/{d}/{TOKEN_FILE}.{phase}'\n"
        ));
        tokens.push((d.clone(), token));
    }
    m.succeed(&script).await?;
    Ok(tokens)
}

/// Problems with the tokens (empty = all there, on the state subvolume).
pub async fn verify_tokens(
    m: &mut Machine,
    tokens: &[(String, String)],
    phase: &str,
) -> Result<Vec<String>, MachineError> {
    let mut problems = Vec::new();
    for (d, token) in tokens {
        let script = format!(
            "cat '/{d}/{TOKEN_FILE}.{phase}' 2>&1; echo; findmnt -n -o FSROOT --mountpoint '/{d}' || echo '(not a mountpoint)'"
        );
        let out = m.exec(&script).await?.stdout_str();
        let mut lines = out.lines();
        let got = lines.next().unwrap_or("").trim().to_owned();
        let _blank = lines.next();
        let fsroot = lines.next().unwrap_or("").trim().to_owned();
        if got != *token {
            problems.push(format!("/{d}: token {phase} lost (found {got:?})"));
        } else if fsroot != format!("/state/{d}") {
            problems.push(format!(
                "/{d}: token {phase} survived, but on {fsroot:?}, not the /state/{d} subvolume"
            ));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_builder::manifest::{Manifest, MovedFile, StateDirs};

    fn expectations() -> Expectations {
        Expectations::from_manifest(&manifest(), "x.img.manifest.json".into()).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            manifest_version: 1,
            label: "factory".into(),
            fs_uuid: "3f1c0000-0000-4000-8000-000000000001".into(),
            root_device: "UUID=3f1c0000-0000-4000-8000-000000000001".into(),
            state_dirs: StateDirs {
                created: vec!["root".into(), "var".into()],
                skipped: vec![],
            },
            fstab_lines_added: vec![],
            state_migration: "move".into(),
            moved_files: vec![
                MovedFile {
                    path: "/root/.ssh/authorized_keys".into(),
                    file_type: FileType::File,
                    sha256: Some("ab".repeat(32)),
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                    size: 99,
                    target: None,
                },
                MovedFile {
                    path: "/var/lib/systemd/random-seed".into(),
                    file_type: FileType::File,
                    sha256: Some("cd".repeat(32)),
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                    size: 512,
                    target: None,
                },
            ],
            kernel: "systems/factory/kernel".into(),
            initramfs: None,
            kernel_source: "boot/vmlinuz".into(),
            initramfs_source: None,
            kernel_args: String::new(),
            image_size: 1 << 30,
            timings: vec![],
        }
    }

    const UUID: &str = "3f1c0000-0000-4000-8000-000000000001";

    fn table(var_fsroot: &str) -> Vec<Mount> {
        let json = format!(
            r#"{{"filesystems": [
  {{"target":"/","source":"/dev/vda[/systems/factory/run]","fstype":"btrfs","fsroot":"/systems/factory/run","uuid":"{UUID}","options":"rw,noatime"}},
  {{"target":"/root","source":"/dev/vda[/state/root]","fstype":"btrfs","fsroot":"/state/root","uuid":"{UUID}","options":"rw"}},
  {{"target":"/var","source":"/dev/vda","fstype":"btrfs","fsroot":"{var_fsroot}","uuid":"{UUID}","options":"rw"}},
  {{"target":"/proc","source":"proc","fstype":"proc","fsroot":"/","uuid":null,"options":"rw"}}
]}}"#
        );
        parse_findmnt(&json).unwrap()
    }

    #[test]
    fn root_and_state_mounts_pass_on_the_expected_table() {
        let t = table("/state/var");
        assert_eq!(judge_root(&t, &expectations()).status, Status::Pass);
        let s = judge_state_mounts(&t, &expectations());
        assert_eq!(s.status, Status::Pass, "{s:?}");
    }

    #[test]
    fn wrong_subvolume_is_named() {
        let t = table("/systems/factory/run/var");
        let s = judge_state_mounts(&t, &expectations());
        assert_eq!(s.status, Status::Fail);
        assert!(s
            .evidence
            .iter()
            .any(|e| e.contains("/var: fsroot /systems/factory/run/var, expected /state/var")));
        let mut t = table("/state/var");
        t[0].fsroot = Some("/systems/factory/orig".into());
        let r = judge_root(&t, &expectations());
        assert_eq!(r.status, Status::Fail);
        assert!(r
            .detail
            .contains("fsroot /systems/factory/orig, expected /systems/factory/run"));
    }

    #[test]
    fn missing_mount_fails_state_mounts() {
        let t: Vec<Mount> = table("/state/var")
            .into_iter()
            .filter(|m| m.target != "/var")
            .collect();
        let s = judge_state_mounts(&t, &expectations());
        assert_eq!(s.status, Status::Fail);
        assert_eq!(s.detail, "not mounted as expected: /var");
    }

    #[test]
    fn fstab_needs_clean_verify_all_mounted_and_no_failed_units() {
        let t = table("/state/var");
        let mut obs = FstabObservation {
            verify_output: "Success, no errors or warnings detected\n".into(),
            verify_exit: Some(0),
            entries: vec![
                Mount {
                    target: "/var".into(),
                    source: Some(format!("UUID={UUID}")),
                    fstype: Some("btrfs".into()),
                    fsroot: None,
                    uuid: None,
                    options: Some("subvol=/state/var".into()),
                },
                Mount {
                    target: "none".into(),
                    source: Some("/swapfile".into()),
                    fstype: Some("swap".into()),
                    fsroot: None,
                    uuid: None,
                    options: Some("sw".into()),
                },
            ],
            failed_units: String::new(),
        };
        assert_eq!(judge_fstab(&obs, &t).status, Status::Pass);
        obs.entries.push(Mount {
            target: "/srv".into(),
            source: Some("LABEL=x".into()),
            fstype: Some("btrfs".into()),
            fsroot: None,
            uuid: None,
            options: Some("defaults".into()),
        });
        obs.failed_units = "srv.mount loaded failed failed /srv\n".into();
        let r = judge_fstab(&obs, &t);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "/srv not mounted; 1 failed unit(s)");
    }

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

    fn moved_obs() -> MovedObservation {
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
        MovedObservation {
            stats,
            sha256,
            toplevel_entries,
            boot_epoch: 1000.0,
        }
    }

    #[test]
    fn moved_files_tolerate_changes_made_by_the_running_system() {
        let r = judge_moved(&moved_obs(), &expectations());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert!(r.evidence[0].contains("changed by the running system after boot"));
    }

    #[test]
    fn moved_files_catch_mode_device_and_leftovers() {
        let mut obs = moved_obs();
        obs.stats
            .get_mut("/root/.ssh/authorized_keys")
            .unwrap()
            .mode = 0o644;
        obs.stats.get_mut("/root/.ssh/authorized_keys").unwrap().dev = 7;
        obs.toplevel_entries.insert("run/var".into(), Some(1));
        let r = judge_moved(&obs, &expectations());
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

    #[test]
    fn hidden_listing_counts_files_and_bytes() {
        let h = parse_hidden("/var", b"d 4096 lib\0f 10 lib/a\0f 5 left behind.txt\0");
        assert_eq!(h.paths, ["/var/left behind.txt", "/var/lib", "/var/lib/a"]);
        assert_eq!(h.bytes, 15);
    }
}
