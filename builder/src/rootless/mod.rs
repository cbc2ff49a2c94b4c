//! `strata build` as an ordinary user (no root, no sudo, no loop devices,
//! no mounts).
//!
//! ```text
//! outer (the user)                   worker (user namespace: unshare --map-auto --map-root-user)
//! checks, partial image, staging  →  rootfs into staging (owners kept, device nodes listed)
//!                                    deploy + menu + default into staging   (build::deploy_and_boot)
//!                                    mkfs.btrfs --rootdir staging --subvol rw:…
//!                                 ←  manifest + work for the appliance; staging emptied
//! appliance VM (libguestfs):         device nodes, run snapshot, extlinux --install
//! persist (fsync, 0644, rename, manifest)                                  (build::persist)
//! ```
//!
//! The layout comes from the same code as the privileged build: the worker
//! deploys through `toplevel::TopLevel` (`staging::Staging`), which makes
//! subvolumes as directories for mkfs and records what needs a mounted
//! btrfs for the appliance.

pub mod appliance;
pub mod extract;
pub mod prereq;
pub mod staging;
pub mod wire;
pub mod worker;

use crate::build::{self, BuildOptions};
use crate::error::{BuildError, Context, StepError};
use crate::host::claim::{self, Claim};
use crate::host::cmd;
use crate::host::debris;
use crate::host::guestfish::Accel;
use crate::host::interrupt::Interrupt;
use crate::manifest::{Backend, Manifest};
use crate::progress::{Event, Step};
use crate::steps::Steps;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The hidden subcommand of the `strata` binary that runs `worker::serve`.
pub const WORKER_COMMAND: &str = "rootless-worker";

#[derive(Debug, Clone, Default)]
pub struct RootlessOptions {
    pub accel: Accel,
}

/// `--backend` (`auto`, `privileged`, `rootless`); `help = None` keeps the
/// variant's docs out of `--help`, which explains the values itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// Privileged when running as root (it is the fastest), else rootless.
    #[default]
    #[value(help = None::<&str>)]
    Auto,
    Privileged,
    Rootless,
}

impl BackendChoice {
    pub fn resolve(self) -> Backend {
        match self {
            BackendChoice::Privileged => Backend::Privileged,
            BackendChoice::Rootless => Backend::Rootless,
            BackendChoice::Auto if rustix::process::geteuid().is_root() => Backend::Privileged,
            BackendChoice::Auto => Backend::Rootless,
        }
    }
}

/// Builds with the backend `choice` resolves to, saying which.
pub fn build_with(
    choice: BackendChoice,
    opts: &BuildOptions,
    rootless: &RootlessOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<Manifest, BuildError> {
    let backend = choice.resolve();
    let why = match (choice, backend) {
        (BackendChoice::Auto, Backend::Privileged) => " (running as root)",
        (BackendChoice::Auto, Backend::Rootless) => " (not running as root)",
        _ => "",
    };
    on_event(Event::Note(format!("backend: {}{why}", backend.name())));
    match backend {
        Backend::Privileged => build::build(opts, interrupt, on_event),
        Backend::Rootless => build(opts, rootless, interrupt, on_event),
    }
}

/// The rootless build.
pub fn build(
    opts: &BuildOptions,
    rootless: &RootlessOptions,
    interrupt: &Interrupt,
    on_event: &mut dyn FnMut(Event),
) -> Result<Manifest, BuildError> {
    let kind = prereq::check(opts, rootless)?;
    // As the privileged build: the image --force replaces stays locked.
    let _lock = build::lock_output(opts)?;
    let mut steps = Steps::new(interrupt, on_event);
    let out_dir = build::parent_dir(&opts.output).to_owned();
    for c in debris::clean(&debris::find(Some(&out_dir))) {
        steps.emit(Event::Note(c.to_string()));
    }
    build::refuse_attached_output(opts)?;
    let image = steps.run(Step::CreateImage, |_| build::create_file(opts))?;
    let staging = StagingDir::create(opts).map_err(|e| e.in_step(Step::CreateImage))?;
    let request = wire::Request {
        build: opts.clone(),
        rootfs_kind: kind,
        image: image.path().to_owned(),
        staging: staging.path.clone(),
    };
    let (mut manifest, work) = run_worker(&request, &mut steps)?;
    staging.remove();
    steps.run(Step::Appliance, |s| {
        appliance::run(image.path(), &work, rootless.accel, s.interrupt()).map_err(|e| match e {
            cmd::CmdError::Interrupted { .. } => StepError::Interrupted,
            e => StepError::Failed {
                what: "running the libguestfs appliance (snapshot, extlinux)".into(),
                cause: e.into(),
            },
        })
    })?;
    // create-image, the worker's steps, then the appliance.
    let outer = steps.into_timings();
    let record = &mut manifest.versions[0];
    let worker_timings = std::mem::take(&mut record.timings);
    record.timings = outer[..1].to_vec();
    record.timings.extend(worker_timings);
    record.timings.extend(outer[1..].iter().cloned());
    build::persist(image, &manifest, opts).map_err(|e| e.in_step(Step::Finish))?;
    Ok(manifest)
}

/// The staging directory next to the output, claimed by the outer process
/// (`claim`; named with its pid for humans). Its contents belong to ids of
/// the user namespace: removed from inside it.
struct StagingDir {
    path: PathBuf,
    /// Dropped after `Drop` has removed the directory.
    _claim: Claim,
}

impl StagingDir {
    fn create(opts: &BuildOptions) -> Result<StagingDir, StepError> {
        let dir = build::parent_dir(&opts.output);
        let name = opts
            .output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (path, claim) =
            claim::claimed_dir(dir, &format!(".{name}{}", debris::STAGING_MARKER), "")
                .context(|| format!("creating a staging directory in {}", dir.display()))?;
        Ok(StagingDir {
            path,
            _claim: claim,
        })
    }

    fn remove(self) {
        // Drop does it.
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = crate::host::debris::remove_tree(&self.path);
    }
}

/// Starts the worker in a user namespace, hands it the request, forwards
/// its events, and returns its result. SIGINT/SIGTERM of strata reach it as
/// SIGTERM (it stops and empties the staging directory); it dies with
/// strata.
fn run_worker(
    req: &wire::Request,
    steps: &mut Steps,
) -> Result<(Manifest, wire::Work), BuildError> {
    let exe = std::env::current_exe()
        .context(|| "finding the strata executable".into())
        .map_err(|e| e.in_step(Step::ExtractRootfs))?;
    let mut c = Command::new("unshare");
    c.args(["--map-auto", "--map-root-user", "--"])
        .arg(exe)
        .arg(WORKER_COMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd::tie_to_us(&mut c);
    let fail = |what: &str, cause: String| BuildError::Step {
        step: Step::ExtractRootfs,
        what: what.into(),
        cause: cause.into(),
    };
    // Before the worker starts; `prereq::utf8_paths` refused what JSON
    // cannot hold.
    let request = serde_json::to_vec(req)
        .map_err(|e| fail("handing the request to the rootless worker", e.to_string()))?;
    let mut child = c
        .spawn()
        .map_err(|e| fail("starting the rootless worker (unshare)", e.to_string()))?;
    let stdin = child.stdin.take().expect("piped");
    // Written from a thread: the worker may answer before reading it all.
    let writer = std::thread::spawn(move || {
        let mut stdin = stdin;
        let _ = stdin.write_all(&request);
    });
    let stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut lines: Vec<String> = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect();
        let n = lines.len();
        lines.drain(..n.saturating_sub(20));
        lines.join("\n")
    });
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pgid = rustix::process::Pid::from_child(&child);
    // When SIGTERM was sent, and whether SIGKILL followed: the worker gets
    // the grace `cmd::run_interruptible` gives its commands to empty the
    // staging directory, then its group is killed (a wedged worker must
    // not keep strata waiting forever).
    let mut signalled: Option<std::time::Instant> = None;
    let mut killed = false;
    let mut outcome = None;
    loop {
        if steps.interrupt().raised() && signalled.is_none() {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::TERM);
            signalled = Some(std::time::Instant::now());
        }
        if !killed && signalled.is_some_and(|t| t.elapsed() >= cmd::GRACE) {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            killed = true;
        }
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(line) => match serde_json::from_str::<wire::Message>(&line) {
                Ok(wire::Message::Done { manifest, work }) => outcome = Some(Ok((*manifest, work))),
                Ok(wire::Message::Failed(e)) => outcome = Some(Err(e.into_build_error())),
                Ok(m) => {
                    if let Some(e) = m.event() {
                        steps.emit(e);
                    }
                }
                Err(_) => tracing::debug!(line, "rootless worker: not a message"),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait();
    let _ = writer.join();
    let stderr = err_reader.join().unwrap_or_default();
    match outcome {
        Some(Ok(r)) if steps.interrupt().raised() => {
            drop(r);
            Err(BuildError::Interrupted)
        }
        Some(r) => r,
        None if steps.interrupt().raised() => Err(BuildError::Interrupted),
        None => Err(fail(
            "the rootless worker ended without a result",
            format!(
                "{}: {}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                stderr.trim()
            ),
        )),
    }
}
