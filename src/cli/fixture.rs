//! `strata fixture debian --output DIR [--cache-dir DIR] [--rebuild]`: a
//! Debian bookworm guest rootfs built with mmdebstrap from the recipe embedded
//! in the binary (fixtures/debian), cached by a hash of that recipe.
//!
//! Cache layout, under `--cache-dir`, `$XDG_CACHE_HOME/strata`,
//! `/var/cache/strata` (root) or `~/.cache/strata`:
//! ```text
//! fixtures/debian-<key16>/rootfs/     the rootfs
//! fixtures/debian-<key16>/info.json   full key, build time, package list
//! fixtures/.tmp-debian-<key16>-<pid>/ a build in progress (renamed when done)
//! ```
//! A build is renamed into place only when mmdebstrap succeeded, so an
//! interrupted build leaves no entry; its leftover temp dir is removed by the
//! next run once its pid is gone.
//!
//! `--output DIR` gets a private copy (`cp -a --reflink=auto`): the image
//! builder and tests may change it without touching the cache. DIR must not
//! exist, be empty, or be an earlier fixture output (it has the recipe's own
//! `var/lib/strata-fixture/` directory), which is replaced. No marker is
//! added: the output is exactly the cached tree. Without `--output` the
//! cache path is printed and must be treated as read-only. stdout: the rootfs
//! path, nothing else.

mod recipe;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use recipe::Recipe;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct FixtureArgs {
    /// The fixture to build.
    #[arg(value_enum)]
    which: Which,
    /// Put a copy of the rootfs here (replaced if it is an earlier fixture
    /// output). Without it, the cache path is printed.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Cache directory [default: $XDG_CACHE_HOME/strata, /var/cache/strata
    /// as root, else ~/.cache/strata].
    #[arg(long, env = "STRATA_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Build again even when the cache has this recipe.
    #[arg(long)]
    rebuild: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Which {
    /// Debian bookworm minbase + systemd, kernel, qemu-guest-agent.
    Debian,
}

/// A directory every fixture recipe's overlay creates: an existing --output
/// that has it is an earlier fixture output and may be replaced.
const FIXTURE_MARKER: &str = "var/lib/strata-fixture";

pub fn run(args: FixtureArgs) -> u8 {
    let recipe = match args.which {
        Which::Debian => recipe::DEBIAN,
    };
    match fixture(&recipe, &args) {
        Ok(path) => {
            println!("{}", path.display());
            0
        }
        Err(e) => {
            let code = if e.downcast_ref::<UsageError>().is_some() {
                2
            } else {
                3
            };
            super::fail(code, &e)
        }
    }
}

/// Bad input (as opposed to a failed build): exit code 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn usage(msg: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg))
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("strata");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/strata");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/strata"),
        None => PathBuf::from("/var/cache/strata"),
    }
}

fn fixture(recipe: &Recipe, args: &FixtureArgs) -> Result<PathBuf> {
    let started = Instant::now();
    let key = recipe.key();
    let short = &key[..16];
    let cache = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let fixtures = cache.join("fixtures");
    let entry = fixtures.join(format!("{}-{short}", recipe.name));
    let rootfs = entry.join("rootfs");

    // Check the output before spending a minute on a build.
    if let Some(out) = &args.output {
        check_output(out)?;
    }

    std::fs::create_dir_all(&fixtures)
        .with_context(|| format!("creating the cache directory {}", fixtures.display()))?;
    // One build per recipe at a time (parallel tests, CI jobs): the others
    // wait here and then find the entry. Released when `_lock` drops.
    let _lock = lock(
        &fixtures.join(format!(".lock-{}-{short}", recipe.name)),
        recipe.name,
    )?;
    remove_stale_builds(&fixtures);

    if args.rebuild && entry.exists() {
        let old = fixtures.join(format!(
            ".old-{}-{short}-{}",
            recipe.name,
            std::process::id()
        ));
        std::fs::rename(&entry, &old)
            .with_context(|| format!("moving {} aside", entry.display()))?;
        remove_tree(&old)?;
    }
    if rootfs.is_dir() {
        eprintln!(
            "strata: fixture {}: cached ({short}) at {}",
            recipe.name,
            rootfs.display()
        );
    } else {
        build(recipe, &key, &fixtures, &entry)?;
    }

    let Some(out) = &args.output else {
        return Ok(rootfs);
    };
    let copy_started = Instant::now();
    copy_out(&rootfs, out)?;
    eprintln!(
        "strata: fixture {}: copied to {} in {:.1} s (total {:.1} s)",
        recipe.name,
        out.display(),
        copy_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(out.clone())
}

/// An exclusive `flock` on `path`, waiting (and saying so) while another
/// strata holds it. The lock goes with the returned file.
fn lock(path: &Path, name: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(f);
    }
    eprintln!("strata: fixture {name}: waiting for another strata building it");
    // SAFETY: as above; blocks until the holder exits or unlocks.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(f)
}

/// `out` may be missing, an empty directory, or an earlier fixture output.
fn check_output(out: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("--output {}", out.display())),
        Ok(md) => md,
    };
    if !md.is_dir() {
        return Err(usage(format!(
            "--output {}: exists and is not a directory",
            out.display()
        )));
    }
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("reading --output {}", out.display()))?
        .next()
        .is_none();
    if empty || out.join(FIXTURE_MARKER).is_dir() {
        return Ok(());
    }
    Err(usage(format!(
        "--output {}: not empty and not an earlier `strata fixture` output; \
         refusing to replace it (remove it or pick another path)",
        out.display()
    )))
}

/// Removes `.tmp-*-<pid>` and `.old-*-<pid>` dirs whose process is gone
/// (an interrupted build or replace).
fn remove_stale_builds(fixtures: &Path) {
    let Ok(rd) = std::fs::read_dir(fixtures) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".tmp-") || name.starts_with(".old-")) {
            continue;
        }
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            tracing::info!("removing an interrupted build: {}", e.path().display());
            if let Err(err) = remove_tree(&e.path()) {
                eprintln!("strata: warning: {err:#}");
            }
        }
    }
}

/// Mount points at or under `dir`, from /proc/self/mountinfo. mmdebstrap
/// bind-mounts /dev, /proc and /sys into the chroot; a build killed hard may
/// leave them, and deleting through them would delete the host's files.
fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(canon) = dir.canonicalize() else {
        return Vec::new();
    };
    let prefix = canon.to_string_lossy().into_owned();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(strata_builder::fstab::unescape)
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

/// `remove_dir_all`, refusing when anything is mounted inside.
fn remove_tree(dir: &Path) -> Result<()> {
    let mounted = mounts_under(dir);
    if !mounted.is_empty() {
        bail!(
            "not removing {}: still mounted inside it: {} (unmount them first)",
            dir.display(),
            mounted.join(", ")
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn build(recipe: &Recipe, key: &str, fixtures: &Path, entry: &Path) -> Result<()> {
    let started = Instant::now();
    let tmp = fixtures.join(format!(
        ".tmp-{}-{}-{}",
        recipe.name,
        &key[..16],
        std::process::id()
    ));
    if tmp.exists() {
        remove_tree(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let result = build_in(recipe, key, &tmp, started).and_then(|()| {
        match std::fs::rename(&tmp, entry) {
            Ok(()) => Ok(()),
            // Another run finished the same recipe first: use theirs.
            Err(_) if entry.join("rootfs").is_dir() => remove_tree(&tmp),
            Err(e) => Err(e).with_context(|| format!("renaming the build to {}", entry.display())),
        }
    });
    if result.is_err() && tmp.exists() {
        if let Err(e) = remove_tree(&tmp) {
            eprintln!("strata: warning: {e:#}");
        }
    }
    result?;
    eprintln!(
        "strata: fixture {}: built in {:.0} s, cached at {}",
        recipe.name,
        started.elapsed().as_secs_f64(),
        entry.join("rootfs").display()
    );
    Ok(())
}

fn build_in(recipe: &Recipe, key: &str, tmp: &Path, started: Instant) -> Result<()> {
    let recipe_dir = tmp.join("recipe");
    recipe
        .write_to(&recipe_dir)
        .with_context(|| format!("writing the recipe to {}", recipe_dir.display()))?;
    let rootfs = tmp.join("rootfs");
    let hook = format!(
        "{} \"$1\"",
        shell_quote(&recipe_dir.join("customize.sh").to_string_lossy())
    );
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--variant={}", recipe.variant))
        .arg(format!("--include={}", recipe.packages().join(",")))
        .arg(format!("--customize-hook={hook}"))
        .arg(recipe.suite)
        .arg(&rootfs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::info!(command = ?cmd, "building the fixture");
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "mmdebstrap not found: the Debian fixture is built with it; \
                 install it with `ci/setup` (or `apt-get install mmdebstrap`)"
            )
        } else {
            anyhow::Error::new(e).context("starting mmdebstrap")
        }
    })?;
    // Ctrl-C reaches mmdebstrap too (same process group): let it clean up
    // its chroot mounts and exit, then fail and remove the partial build,
    // rather than dying first and leaving both behind.
    // SAFETY: installing SIG_IGN has no preconditions; restored below.
    let previous = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };

    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = ProgressBar::new_spinner()
            .with_style(
                ProgressStyle::with_template("{spinner} fixture {prefix}: {msg} [{elapsed}]")
                    .expect("valid template"),
            )
            .with_prefix(recipe.name)
            .with_message("starting mmdebstrap");
        b.enable_steady_tick(Duration::from_millis(120));
        b
    } else {
        ProgressBar::hidden()
    };
    let mut tail: VecDeque<String> = VecDeque::new();
    for line in rx {
        if let Some(phase) = line.strip_prefix("I: ") {
            if tty {
                bar.set_message(phase.to_owned());
            } else {
                eprintln!(
                    "strata: fixture {} [{:>3.0} s] {phase}",
                    recipe.name,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        tail.push_back(line);
        if tail.len() > 40 {
            tail.pop_front();
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait();
    // SAFETY: restores the disposition saved above.
    unsafe { libc::signal(libc::SIGINT, previous) };
    let status = status.context("waiting for mmdebstrap")?;
    bar.finish_and_clear();
    if !status.success() {
        bail!(
            "mmdebstrap failed ({status}); its last output:\n{}",
            Vec::from(tail).join("\n")
        );
    }
    if !rootfs.join("etc/os-release").exists() {
        bail!(
            "mmdebstrap succeeded but {} has no etc/os-release",
            rootfs.display()
        );
    }
    std::fs::remove_dir_all(&recipe_dir)?;
    let info = serde_json::json!({
        "recipe": recipe.name,
        "key": key,
        "suite": recipe.suite,
        "variant": recipe.variant,
        "packages": recipe.packages(),
        "build_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "built_at_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    std::fs::write(tmp.join("info.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(())
}

/// Copies the cached rootfs to `out` (through a temp sibling and a rename, so
/// `out` is either the old or the complete new tree), marking it as ours.
fn copy_out(rootfs: &Path, out: &Path) -> Result<()> {
    let out_abs = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir()?.join(out)
    };
    let parent = out_abs
        .parent()
        .context("--output has no parent directory")?
        .to_path_buf();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out_abs
        .file_name()
        .context("--output has no file name")?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.strata-tmp-{}", std::process::id()));
    if tmp.exists() {
        remove_tree(&tmp)?;
    }
    let out_cp = Command::new("cp")
        .args(["-a", "--reflink=auto", "--"])
        .arg(rootfs)
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()
        .context("running cp")?;
    if !out_cp.status.success() {
        let _ = remove_tree(&tmp);
        bail!(
            "copying {} to {} failed: {}",
            rootfs.display(),
            tmp.display(),
            String::from_utf8_lossy(&out_cp.stderr).trim()
        );
    }
    if out_abs.exists() {
        let old = parent.join(format!(".{name}.strata-old-{}", std::process::id()));
        std::fs::rename(&out_abs, &old)
            .with_context(|| format!("moving the old {} aside", out.display()))?;
        std::fs::rename(&tmp, &out_abs)
            .with_context(|| format!("renaming the copy to {}", out.display()))?;
        remove_tree(&old)?;
    } else {
        std::fs::rename(&tmp, &out_abs)
            .with_context(|| format!("renaming the copy to {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_hook_paths() {
        assert_eq!(shell_quote("/a b/c'd"), r"'/a b/c'\''d'");
    }

    #[test]
    fn finds_mounts_under_a_directory() {
        assert!(mounts_under(Path::new("/proc")).contains(&"/proc".to_owned()));
        let d = tempfile::tempdir().unwrap();
        assert!(mounts_under(d.path()).is_empty());
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        remove_tree(&d.path().join("a")).unwrap();
        assert!(!d.path().join("a").exists());
    }

    #[test]
    fn output_checks() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_output(&d.path().join("missing")).is_ok());
        assert!(check_output(d.path()).is_ok(), "empty dir is fine");
        std::fs::write(d.path().join("x"), "x").unwrap();
        let e = check_output(d.path()).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        std::fs::create_dir_all(d.path().join(FIXTURE_MARKER)).unwrap();
        assert!(
            check_output(d.path()).is_ok(),
            "an earlier output is replaced"
        );
        assert!(
            check_output(&d.path().join("x")).is_err(),
            "a file is refused"
        );
    }
}
