//! The KVM verdict is a fact about the host, not the image: once a real
//! boot has shown whether KVM works here, later `--accel auto` runs reuse
//! the answer. A cached "unusable" saves them the abandoned KVM attempt (a
//! QEMU start, or up to `KVM_KERNEL_WITHIN` on a host whose vCPU stalls);
//! a cached "usable" changes nothing but the report, since every KVM boot
//! 1 is watched anyway and a verdict that proves wrong is replaced in that
//! run. The verdict is stored with what it depends on (`HostKey`: kernel,
//! QEMU binary, CPU, /dev/kvm, how it was judged); any change there, an
//! unreadable file, or `--accel-probe` means trying KVM again.
//!
//! The QEMU binary is identified by its resolved path, size and mtime, not
//! by `qemu-system-x86_64 --version`: a stat costs microseconds, running
//! QEMU 30-60 ms here (6.5 s for the first, cold run on this loaded
//! machine), and a package upgrade or rebuild changes size or mtime anyway.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped when the file's meaning changes: old files stop matching.
/// Format 1 held the firmware-only probe's verdict, which said "usable"
/// on hosts where SYSLINUX then dies under KVM: never trusted again.
const FORMAT: u32 = 2;

/// The cache file under strata's cache dir (the same rule as the fixture
/// cache: `strata_builder::host::cache_dir`).
pub fn default_path() -> PathBuf {
    strata_builder::host::cache_dir::default_cache_dir().join("kvm-verdict.json")
}

/// How a run uses the cache (`TestConfig::kvm_cache`; `--accel auto` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmCache {
    pub path: PathBuf,
    /// Probe even if the cache has a verdict for this host, and rewrite it
    /// (`strata test --accel-probe`).
    pub reprobe: bool,
}

impl Default for KvmCache {
    fn default() -> Self {
        KvmCache {
            path: default_path(),
            reprobe: false,
        }
    }
}

/// What the verdict depends on. Two runs with equal keys would get the
/// same answer from the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    /// `uname -r` (/proc/sys/kernel/osrelease): KVM is the kernel's.
    pub kernel: String,
    /// The QEMU binary, resolved through PATH and symlinks, with its size
    /// and mtime (ns since the epoch).
    pub qemu: String,
    /// /proc/cpuinfo's first `model name`, and which virtualisation flag
    /// (vmx/svm) it lists, if any: a migrated VM can change both.
    pub cpu: String,
    /// /dev/kvm's device number and mtime: the node is recreated when the
    /// kvm module is reloaded (e.g. with other parameters).
    pub kvm_device: String,
    /// How the verdict was reached: a different CPU model or judge is a
    /// different question.
    pub probe: String,
}

impl HostKey {
    /// This host's key for running `qemu_binary`. Whatever cannot be read
    /// is recorded as such (and so only matches the same failure).
    pub fn of_this_host(qemu_binary: &Path) -> HostKey {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| format!("? ({e})"));
        HostKey {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            qemu: qemu_identity(qemu_binary),
            cpu: cpu_identity(&read("/proc/cpuinfo")),
            kvm_device: file_identity(Path::new("/dev/kvm"), true),
            probe: format!(
                "boot 1 under KVM, -cpu {}",
                crate::qemu::Accel::Kvm.cpu_model()
            ),
        }
    }

    /// The fields that differ from `other`, as `name: old -> new`.
    pub fn changes_since(&self, old: &HostKey) -> Vec<String> {
        [
            ("kernel", &old.kernel, &self.kernel),
            ("QEMU", &old.qemu, &self.qemu),
            ("CPU", &old.cpu, &self.cpu),
            ("/dev/kvm", &old.kvm_device, &self.kvm_device),
            ("probe", &old.probe, &self.probe),
        ]
        .into_iter()
        .filter(|(_, o, n)| o != n)
        .map(|(what, o, n)| format!("{what}: {o} -> {n}"))
        .collect()
    }
}

/// `model name` of the first CPU and its virtualisation flag.
pub fn cpu_identity(cpuinfo: &str) -> String {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let model = field("model name").unwrap_or_else(|| "unknown model".into());
    let flags = field("flags").unwrap_or_default();
    let virt = flags
        .split_whitespace()
        .find(|f| *f == "vmx" || *f == "svm")
        .unwrap_or("no vmx/svm flag");
    format!("{model}, {virt}")
}

/// `binary` as the process would run it: a bare name through PATH.
fn resolve(binary: &Path) -> PathBuf {
    if binary.components().count() > 1 {
        return binary.to_path_buf();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| binary.to_path_buf())
}

fn qemu_identity(binary: &Path) -> String {
    let path = resolve(binary);
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    file_identity(&path, false)
}

/// `path` with its size or device number, and mtime.
fn file_identity(path: &Path, device: bool) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let what = match device {
                true => format!(
                    "device {}:{}",
                    rustix::fs::major(m.rdev()),
                    rustix::fs::minor(m.rdev())
                ),
                false => format!("{} bytes", m.len()),
            };
            format!(
                "{}, {what}, mtime {}.{:09}",
                path.display(),
                m.mtime(),
                m.mtime_nsec()
            )
        }
        Err(e) => format!("{}: {e}", path.display()),
    }
}

/// The file: a verdict and what it was found on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedVerdict {
    pub format: u32,
    pub key: HostKey,
    pub usable: bool,
    /// Why KVM works or does not, as the run that found out said it.
    pub reason: String,
    /// Where KVM failed, for an "unusable" verdict.
    #[serde(default)]
    pub failure: Option<crate::accel::KvmFailure>,
    /// When it was found out (seconds since the epoch).
    pub probed_at_unix: u64,
    /// How long the abandoned KVM attempt took.
    pub probe_seconds: f64,
}

impl CachedVerdict {
    pub fn new(key: HostKey, usable: bool, reason: String, probe_seconds: f64) -> Self {
        CachedVerdict {
            format: FORMAT,
            key,
            usable,
            reason,
            failure: None,
            probed_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            probe_seconds,
        }
    }

    /// When it was probed, e.g. `2026-11-27T04:01:02Z`.
    pub fn probed_at(&self) -> String {
        strata_builder::host::btrfs::rfc3339_of_unix(self.probed_at_unix as i64)
    }
}

/// What the cache had for this host.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Hit(CachedVerdict),
    /// Why it has nothing usable (for the report).
    Miss(String),
}

/// A cached "unusable" is tried again after this long: the host may have
/// been fixed (a kernel module reloaded with other parameters changes
/// /dev/kvm and so the key at once; a hypervisor-side fix may not). A
/// cached "usable" needs no expiry: every boot 1 under KVM is watched and
/// falls back by itself (see `accel::Plan`).
pub const UNUSABLE_TTL_SECS: u64 = 24 * 3600;

/// The most a verdict file can hold; anything larger is not one.
const MAX_FILE: u64 = 64 * 1024;

/// The file's bytes, looked at before they are read: a fifo, a device or a
/// symlink at the cache path must not block or flood the run.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{fstat, open, FileType, Mode, OFlags};
    use std::io::Read;
    let fd = open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(std::io::Error::other("not a regular file"));
    }
    if st.st_size as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "{} bytes, more than a verdict",
            st.st_size
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_FILE)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads the cache at `path` for a host with `key`. Never fails: a missing,
/// unreadable or foreign file is a miss.
pub fn lookup(path: &Path, key: &HostKey) -> Lookup {
    lookup_at(path, key, now_unix())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lookup_at(path: &Path, key: &HostKey, now: u64) -> Lookup {
    let bytes = match read_regular(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Lookup::Miss("no cached verdict yet".into())
        }
        Err(e) => return Lookup::Miss(format!("cached verdict unreadable ({e})")),
    };
    let cached: CachedVerdict = match serde_json::from_slice(&bytes) {
        Ok(c) => c,
        Err(e) => return Lookup::Miss(format!("cached verdict unreadable ({e})")),
    };
    if cached.format != FORMAT {
        return Lookup::Miss(format!(
            "cached verdict has format {} (this strata writes {FORMAT})",
            cached.format
        ));
    }
    let changes = key.changes_since(&cached.key);
    if !changes.is_empty() {
        return Lookup::Miss(format!(
            "the host changed since the cached verdict ({})",
            changes.join("; ")
        ));
    }
    if !cached.usable && now.saturating_sub(cached.probed_at_unix) > UNUSABLE_TTL_SECS {
        return Lookup::Miss(format!(
            "the cached 'KVM unusable' verdict of {} is more than {} h old",
            cached.probed_at(),
            UNUSABLE_TTL_SECS / 3600
        ));
    }
    Lookup::Hit(cached)
}

/// Writes `verdict` to `path` atomically (a temp file in the same directory,
/// renamed over it): a reader sees the old file or the new one, never half.
pub fn store(path: &Path, verdict: &CachedVerdict) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".kvm-verdict.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let json = serde_json::to_vec_pretty(verdict).expect("verdict serialises");
    tmp.write_all(&json)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    // Readable by everyone like the rest of the cache (tempfile makes 0600).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// How the cache took part in a run's accelerator decision (the report's
/// `accel_cache`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheUse {
    /// The verdict came from the cache: no probe QEMU ran before the boot
    /// (if it proved wrong, `note` says so and what was stored instead).
    pub used: bool,
    /// When the verdict acted on was probed (RFC 3339, UTC): the cached
    /// one's time, or this run's probe.
    pub probed_at: Option<String>,
    pub file: String,
    /// Why the cache was not used, and what was written to it.
    pub note: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HostKey {
        HostKey {
            kernel: "6.18.44".into(),
            qemu: "/usr/bin/qemu-system-x86_64, 28686560 bytes, mtime 1757030400.000000000".into(),
            cpu: "AMD EPYC, svm".into(),
            kvm_device: "/dev/kvm, device 10:232, mtime 1763585220.000000000".into(),
            probe: "boot 1 under KVM, -cpu host".into(),
        }
    }

    /// A minute after `verdict`'s probe.
    const SOON: u64 = 1_795_752_060;

    fn verdict(usable: bool) -> CachedVerdict {
        CachedVerdict {
            format: FORMAT,
            key: key(),
            usable,
            reason: "QEMU with KVM and -cpu host exited at once".into(),
            failure: None,
            probed_at_unix: 1_795_752_000,
            probe_seconds: 0.6,
        }
    }

    #[test]
    fn a_stored_verdict_is_found_for_the_same_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strata/kvm-verdict.json");
        assert_eq!(
            lookup_at(&path, &key(), SOON),
            Lookup::Miss("no cached verdict yet".into())
        );
        store(&path, &verdict(false)).unwrap();
        assert_eq!(lookup_at(&path, &key(), SOON), Lookup::Hit(verdict(false)));
        assert_eq!(verdict(false).probed_at(), "2026-11-27T04:00:00Z");
        // Rewriting replaces it.
        store(&path, &verdict(true)).unwrap();
        assert_eq!(lookup_at(&path, &key(), SOON), Lookup::Hit(verdict(true)));
    }

    #[test]
    fn an_unusable_verdict_is_probed_again_after_a_day_a_usable_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm-verdict.json");
        let later = 1_795_752_000 + UNUSABLE_TTL_SECS + 1;
        store(&path, &verdict(false)).unwrap();
        assert!(
            matches!(lookup_at(&path, &key(), later), Lookup::Miss(why) if why.contains("more than 24 h old"))
        );
        store(&path, &verdict(true)).unwrap();
        assert_eq!(lookup_at(&path, &key(), later), Lookup::Hit(verdict(true)));
    }

    #[test]
    fn a_fifo_or_symlink_at_the_cache_path_is_a_miss_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("kvm-verdict.json");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        assert!(
            matches!(lookup_at(&fifo, &key(), SOON), Lookup::Miss(why) if why.contains("not a regular file"))
        );
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(lookup_at(&link, &key(), SOON), Lookup::Miss(_)));
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; 100_000]).unwrap();
        assert!(
            matches!(lookup_at(&big, &key(), SOON), Lookup::Miss(why) if why.contains("more than a verdict"))
        );
    }

    #[test]
    fn any_key_change_means_probing_again_and_says_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm-verdict.json");
        store(&path, &verdict(true)).unwrap();
        let changes: [fn(&mut HostKey); 5] = [
            |k| k.kernel = "6.19.0".into(),
            |k| k.qemu = k.qemu.replace("28686560", "28690000"),
            |k| k.cpu = "AMD EPYC, no vmx/svm flag".into(),
            |k| k.kvm_device = k.kvm_device.replace("1763585220", "1763599999"),
            |k| k.probe = "boot 1 under KVM, -cpu max".into(),
        ];
        for change in changes {
            let mut k = key();
            change(&mut k);
            match lookup_at(&path, &k, SOON) {
                Lookup::Miss(why) => {
                    assert!(why.starts_with("the host changed"), "{why}");
                    assert!(why.contains(" -> "), "{why}");
                }
                hit => panic!("{k:?} found {hit:?}"),
            }
        }
        let mut k = key();
        k.kernel = "6.19.0".into();
        assert_eq!(
            lookup_at(&path, &k, SOON),
            Lookup::Miss(
                "the host changed since the cached verdict (kernel: 6.18.44 -> 6.19.0)".into()
            )
        );
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_a_miss_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm-verdict.json");
        for junk in ["", "{", "not json", "{\"usable\": true}", "[]"] {
            std::fs::write(&path, junk).unwrap();
            assert!(
                matches!(lookup_at(&path, &key(), SOON), Lookup::Miss(why) if why.starts_with("cached verdict unreadable")),
                "{junk:?}"
            );
        }
        let mut old = serde_json::to_value(verdict(false)).unwrap();
        old["format"] = 0.into();
        std::fs::write(&path, old.to_string()).unwrap();
        assert!(
            matches!(lookup_at(&path, &key(), SOON), Lookup::Miss(why) if why.contains("format 0"))
        );
        // A directory where the file should be: unreadable, and not writable
        // either (the caller reports that and carries on).
        let path = dir.path().join("a-dir");
        std::fs::create_dir(&path).unwrap();
        assert!(
            matches!(lookup_at(&path, &key(), SOON), Lookup::Miss(why) if why.starts_with("cached verdict unreadable"))
        );
        assert!(store(&path, &verdict(false)).is_err());
    }

    #[test]
    fn the_write_is_atomic_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvm-verdict.json");
        std::fs::write(&path, "old contents").unwrap();
        store(&path, &verdict(true)).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["kvm-verdict.json"]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("}\n") && text.contains("\"usable\": true"),
            "{text}"
        );
    }

    #[test]
    fn cpu_identity_is_the_model_and_its_virtualisation_flag() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\
                    flags\t\t: fpu vme sse svm nx\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n";
        assert_eq!(cpu_identity(info), "AMD EPYC, svm");
        assert_eq!(
            cpu_identity("model name : Intel Xeon\nflags : fpu vmx\n"),
            "Intel Xeon, vmx"
        );
        assert_eq!(
            cpu_identity("model name\t: AMD EPYC\nflags\t: fpu sse\n"),
            "AMD EPYC, no vmx/svm flag"
        );
    }

    #[test]
    fn this_hosts_key_names_the_resolved_qemu_binary() {
        let k = HostKey::of_this_host(Path::new("sh"));
        assert!(
            k.qemu.starts_with('/') && k.qemu.contains(" bytes, mtime "),
            "{k:?}"
        );
        assert!(!k.kernel.is_empty());
        assert_eq!(k, HostKey::of_this_host(Path::new("sh")));
    }
}
