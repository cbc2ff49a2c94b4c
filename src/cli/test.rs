//! `strata test`: arguments, progress lines on stderr, the report on stdout.
//! `--upgrade-to` runs vmtest's upgrade lifecycle; the image changes it
//! needs are the builder's (`changes`, `lifecycle`).

mod changes;
mod lifecycle;

use super::exit;
use changes::{CliChanges, UpgradePlan};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use strata_builder::error::{Failure, FailureKind};
use strata_builder::expect::Expectations;
use strata_builder::extlinux::BootEntry;
use strata_builder::image;
use strata_builder::interrupt::Interrupt;
use strata_builder::layout;
use strata_builder::manifest::{Manifest, VersionRecord};
use strata_builder::migrate::Migration;
use strata_builder::rootfs_tar::{self, RootfsInput};
use strata_builder::sync::StatePolicy;
use strata_vmtest::accel::AccelChoice;
use strata_vmtest::checks::CheckId;
use strata_vmtest::lifecycle::Lifecycle;
use strata_vmtest::qemu::DiskBus;
use strata_vmtest::report::{Report, Status};
use strata_vmtest::run::{self, BootMode, Progress, RunError, Scenario, TestConfig};

#[derive(clap::Args)]
pub struct TestArgs {
    /// The raw image to boot (never modified: QEMU writes to a qcow2 overlay).
    #[arg(required_unless_present = "list_checks")]
    image: Option<PathBuf>,
    /// Print each check's name and a one-line description, then exit.
    #[arg(long)]
    list_checks: bool,
    /// The image manifest (default: IMAGE.manifest.json).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Check this version instead of the default one (it must be the one
    /// that boots: `strata set-default` first).
    #[arg(long, value_name = "LABEL")]
    label: Option<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Serial log, journals, QMP events and screendumps go here
    /// (default: a new directory under the temp dir).
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// With `--accel auto`: try KVM again even if this host's verdict is
    /// cached (strata's cache dir, kvm-verdict.json), and store the outcome.
    #[arg(long)]
    accel_probe: bool,
    #[arg(long, value_enum, default_value_t = DiskBus::VirtioBlk)]
    disk_bus: DiskBus,
    /// `extlinux` boots through the image's bootloader; `direct` hands the
    /// image's kernel and initramfs to QEMU (-kernel/-initrd).
    #[arg(long, value_enum, default_value_t = BootMode::Extlinux)]
    boot: BootMode,
    /// How the boots after the first are made (the clean reboot, the
    /// fresh start after the power cut). Boot 1 proves the image's
    /// bootloader; `direct` hands the later boots the same kernel,
    /// initramfs and command line (-kernel/-initrd/-append; the guest
    /// still runs its whole `systemctl reboot`), `extlinux` takes each
    /// through firmware and bootloader again. Only with `--boot extlinux`;
    /// `--upgrade-to` boots every time through extlinux.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = BootMode::Direct)]
    later_boots: BootMode,
    /// Limit for the whole run, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout: u64,
    /// Run only these checks (comma-separated); the others are reported as skipped.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    checks: Option<Vec<String>>,
    /// A change to judge in the running guest, as NAME:CHECKS:COMMAND
    /// (repeatable; CHECKS comma-separated, COMMAND a shell command run as
    /// root). After the first boot's checks the booted guest is saved;
    /// each scenario starts from that moment in a QEMU of its own, runs
    /// COMMAND, and its checks report as NAME/CHECK. Seconds each, not a
    /// boot (persistence in a scenario reboots its own guest).
    #[arg(long, value_name = "NAME:CHECKS:COMMAND", value_parser = parse_scenario)]
    scenario: Vec<Scenario>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest vCPUs (TCG runs one host thread per vCPU).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// The QEMU binary.
    #[arg(long, env = "STRATA_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Upgrade lifecycle (needs root): on a private copy of IMAGE, boot the
    /// current default; upgrade the copy offline to ROOTFS (a directory or
    /// a tar archive, as `upgrade --rootfs` takes) and boot the new
    /// version; set the old one default again and boot it. The first-boot
    /// checks run in each boot (not persistence: tokens written to every
    /// state dir must survive both changes instead). IMAGE is not modified.
    #[arg(long, value_name = "ROOTFS", conflicts_with = "label")]
    upgrade_to: Option<PathBuf>,
    /// The new version's label (default: `upgrade`, or `upgrade-N` when
    /// the image has that one).
    #[arg(long, value_name = "LABEL", requires = "upgrade_to")]
    upgrade_label: Option<String>,
    /// The upgrade's `--state-migration`: `copy` leaves the new rootfs's
    /// state data under the new version's mountpoints, reproducing the
    /// "not empty" warnings (overmount then fails in the upgrade boot)
    /// [default: move].
    #[arg(long, value_enum, value_name = "HOW", requires = "upgrade_to")]
    state_migration: Option<Migration>,
    /// The upgrade's `--state-data`: what becomes of the new rootfs's data
    /// under state dirs (the state subvolumes stay authoritative); the same
    /// default as `strata upgrade` [default: merge].
    #[arg(long, value_enum, value_name = "POLICY", requires = "upgrade_to")]
    state_data: Option<StatePolicy>,
}

pub fn run(args: TestArgs) -> u8 {
    if args.list_checks {
        print!("{}", check_list());
        return exit::SUCCESS;
    }
    let Some(image) = args.image.clone() else {
        return exit::input("an IMAGE to test is required");
    };
    // Names first: a typo should not wait for an image to be read.
    let checks: Option<Vec<CheckId>> = match &args.checks {
        None => None,
        Some(names) => match names.iter().map(|n| n.parse()).collect() {
            Ok(ids) => Some(ids),
            Err(e) => return exit::input(e),
        },
    };
    let (expect, facts) = match expectations(&args, &image) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let lifecycle = match &args.upgrade_to {
        None => None,
        Some(rootfs) => match lifecycle_config(&args, rootfs, &facts) {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
    };
    let mut cfg = TestConfig::new(image, expect);
    cfg.artifacts = args.artifacts.clone();
    cfg.accel = args.accel;
    if let Some(c) = cfg.kvm_cache.as_mut() {
        c.reprobe = args.accel_probe;
    }
    cfg.disk_bus = args.disk_bus;
    cfg.boot = args.boot;
    cfg.later_boots = args.later_boots;
    cfg.timeout = Duration::from_secs(args.timeout);
    if let Some(c) = checks {
        cfg.checks = c;
    }
    cfg.memory_mib = args.memory;
    cfg.cpus = args.cpus;
    cfg.qemu_binary = args.qemu.clone();
    cfg.lifecycle = lifecycle;
    cfg.scenarios = args.scenario.clone();

    let started = std::time::Instant::now();
    let result = run::run_blocking(cfg, |p| show(&p, started));
    match result {
        Ok(report) => {
            print!("{}", report.to_table());
            if let Err(code) = write_outputs(&args, &report) {
                return code;
            }
            exit::of(run::failure(&report))
        }
        Err(e @ RunError::Input(_)) => exit::fail(e),
        Err(
            e @ (RunError::Infra { .. } | RunError::Refused { .. } | RunError::Interrupted { .. }),
        ) => {
            // Stopped by a failure, a refused upgrade or a signal: the
            // report so far is still shown and written where it was asked
            // for.
            if let RunError::Infra {
                report: Some(report),
                ..
            }
            | RunError::Refused {
                report: Some(report),
                ..
            }
            | RunError::Interrupted {
                report: Some(report),
                ..
            } = &e
            {
                print!("{}", report.to_table());
                if let Err(c) = write_outputs(&args, report) {
                    return c;
                }
            }
            let msg = match &e {
                RunError::Infra { message, .. } => format!(
                    "infrastructure failure: {}",
                    message.lines().next().unwrap_or("")
                ),
                // The console lines after it are the report's, not the
                // refusal's.
                RunError::Refused { message, .. } => {
                    message.lines().next().unwrap_or("").to_owned()
                }
                other => other.to_string(),
            };
            exit::fail_with(e.kind(), &anyhow::anyhow!("{msg}"))
        }
    }
}

/// `--scenario NAME:CHECKS:COMMAND`: the command is everything after the
/// second colon, so it may hold colons of its own.
fn parse_scenario(arg: &str) -> Result<Scenario, String> {
    let mut parts = arg.splitn(3, ':');
    let (Some(name), Some(checks), Some(command)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{arg:?}: expected NAME:CHECKS:COMMAND"));
    };
    let checks = checks
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().parse::<CheckId>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if command.trim().is_empty() {
        return Err(format!("{arg:?}: the COMMAND is empty"));
    }
    Ok(Scenario {
        name: name.to_owned(),
        commands: vec![command.to_owned()],
        checks,
        user_checks: vec![],
    })
}

/// What else the lifecycle needs to know of the image.
#[derive(Debug, Default)]
struct ImageFacts {
    /// Every version it has.
    labels: Vec<String>,
    /// The default version's extra kernel arguments (what `--kernel-args`
    /// gave), when a manifest says.
    kernel_args: String,
}

/// The extra kernel arguments of a version: its manifest record holds the
/// whole command line strata wrote (`root=… rootflags=subvol=systems/<label>/run …`),
/// and the upgrade wants only what follows strata's own words. Passing the
/// whole line made the new version's entry end in the old version's
/// `rootflags=`, which the kernel takes (the last one wins): the "upgraded"
/// version booted the old run. A line strata did not write: none.
fn extra_kernel_args(record: &VersionRecord) -> String {
    layout::Version::new(&record.label)
        .ok()
        .and_then(|v| BootEntry::from_append(&v, &record.kernel_args, false))
        .map(|e| e.kernel_args)
        .unwrap_or_default()
}

/// What the booted image must show: from the build manifest (given, or
/// IMG.manifest.json), or — for an image built by someone else, with no
/// manifest — read off the image through a read-only mount.
fn expectations(args: &TestArgs, image: &Path) -> Result<(Expectations, ImageFacts), u8> {
    // The image first: a missing image is the user's problem to hear about,
    // not the manifest that would sit next to it.
    match std::fs::metadata(image) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(exit::input(format!(
                "image {} is not a regular file",
                image.display()
            )))
        }
        Err(e) => return Err(exit::input(format!("image {}: {e}", image.display()))),
    }
    let bad = exit::input;
    let path = args
        .manifest
        .clone()
        .unwrap_or_else(|| Manifest::default_path(image));
    if args.manifest.is_some() || path.exists() {
        let m = Manifest::load(&path).map_err(exit::fail)?;
        let expect =
            Expectations::from_manifest(&m, path.clone(), args.label.as_deref()).map_err(bad)?;
        let facts = ImageFacts {
            labels: m.versions.iter().map(|v| v.label.clone()).collect(),
            kernel_args: extra_kernel_args(m.default_version()),
        };
        return Ok((expect, facts));
    }
    let layout = image::read(image).map_err(exit::fail)?;
    let expect = Expectations::from_layout(&layout, args.label.as_deref()).map_err(bad)?;
    let facts = ImageFacts {
        labels: layout.versions.iter().map(|v| v.label.clone()).collect(),
        kernel_args: String::new(),
    };
    eprintln!(
        "no build manifest next to {}: expecting what the image itself says (version {}, root {}, state dirs {}); moved-files can only check that mountpoints are empty",
        image.display(),
        expect.version,
        expect.root_device,
        expect.state_dirs.join(",")
    );
    Ok((expect, facts))
}

/// `--upgrade-to`: checked before anything boots (exit 2), so a mistake
/// does not cost a boot first.
fn lifecycle_config(args: &TestArgs, rootfs: &Path, facts: &ImageFacts) -> Result<Lifecycle, u8> {
    let bad = exit::input;
    // What `strata upgrade --rootfs` takes, told apart the same way: a
    // directory, or a tar archive (by its bytes) that the upgrade extracts.
    match rootfs_tar::classify(rootfs) {
        Ok(RootfsInput::Tar(_)) => {}
        Ok(RootfsInput::Dir) if rootfs.is_dir() => {}
        Ok(RootfsInput::Dir) => {
            return Err(bad(format!(
            "--upgrade-to {}: no such directory or tar archive (a root filesystem to upgrade to)",
            rootfs.display()
        )))
        }
        Err(e) => return Err(bad(format!("--upgrade-to: {e}"))),
    }
    let label = match &args.upgrade_label {
        None => free_label(&facts.labels),
        Some(l) => {
            layout::validate_label(l).map_err(|e| bad(format!("--upgrade-label: {e}")))?;
            if facts.labels.contains(l) {
                return Err(bad(format!(
                    "--upgrade-label {l}: the image already has that version (it has {})",
                    facts.labels.join(", ")
                )));
            }
            l.clone()
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(bad(
            "--upgrade-to upgrades a copy of the image through a loop mount: run as root".into(),
        ));
    }
    let plan = upgrade_plan(args, rootfs, facts);
    Ok(Lifecycle {
        changes: Arc::new(CliChanges {
            plan,
            ops: lifecycle::OPS,
        }),
        label,
        // The upgrade polls this flag and then undoes what it began. The
        // run raises it once it has stopped (SIGINT/SIGTERM, --timeout),
        // not the signal itself: an upgrade that returned "interrupted"
        // before the run saw the signal would end as a failure (exit 3)
        // instead of an interruption (130).
        interrupt: Interrupt::default(),
    })
}

/// The upgrade `--upgrade-to` asks for: `strata upgrade`'s defaults
/// (`--state-migration move`, `--state-data merge`), so the lifecycle
/// proves the upgrade a user gets.
fn upgrade_plan(args: &TestArgs, rootfs: &Path, facts: &ImageFacts) -> UpgradePlan {
    UpgradePlan {
        rootfs: rootfs.to_owned(),
        kernel_args: facts.kernel_args.clone(),
        migration: args.state_migration.unwrap_or(Migration::Move),
        state_data: args.state_data.unwrap_or(StatePolicy::Merge),
    }
}

/// `upgrade`, or `upgrade-2`, `upgrade-3`, … when the image has it.
fn free_label(taken: &[String]) -> String {
    (1..)
        .map(|n| match n {
            1 => "upgrade".to_owned(),
            n => format!("upgrade-{n}"),
        })
        .find(|l| !taken.contains(l))
        .expect("some label is free")
}

/// `--list-checks`: one check a line, in report order, names aligned.
fn check_list() -> String {
    let width = CheckId::ALL
        .map(|c| c.name().len())
        .into_iter()
        .max()
        .unwrap_or(0);
    CheckId::ALL
        .iter()
        .map(|c| format!("{:<width$}  {}\n", c.name(), c.description()))
        .collect()
}

fn write_outputs(args: &TestArgs, report: &Report) -> Result<(), u8> {
    let write = |path: &PathBuf, text: String, what: &str| {
        std::fs::write(path, text).map_err(|e| {
            exit::fail_with(
                FailureKind::Infrastructure,
                &anyhow::anyhow!("writing {what} report {}: {e}", path.display()),
            )
        })
    };
    if let Some(p) = &args.json {
        write(p, report.to_json(), "JSON")?;
    }
    if let Some(p) = &args.junit {
        write(p, report.to_junit(), "JUnit")?;
    }
    Ok(())
}

fn show(p: &Progress, started: std::time::Instant) {
    let t = started.elapsed().as_secs_f64();
    let line = match p {
        Progress::Artifacts(dir) => format!("artifacts in {}", dir.display()),
        Progress::QemuCommand(cmd) => {
            tracing::info!("QEMU: {cmd}");
            return;
        }
        Progress::Accel(d) => format!("accelerator: {} ({})", d.used, d.reason),
        Progress::Booting { boot, why, via } => format!("boot {boot}: {why} ({})", via.name()),
        Progress::Booted {
            boot,
            seconds,
            state,
        } => format!("boot {boot}: system {state} after {seconds:.1} s"),
        Progress::CheckStarted(name) => format!("check {name}..."),
        Progress::CheckFinished(c) => format!(
            "check {}: {}",
            c.name,
            match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            }
        ),
        Progress::Step(s) => s.clone(),
    };
    eprintln!("[{t:6.1}s] {line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TestArgs,
    }

    #[test]
    fn scenarios_are_name_checks_and_a_command_with_colons_of_its_own() {
        let s = parse_scenario(
            "ro-srv:persistence,state-mounts:mount -o remount,bind,ro /srv; echo a:b",
        )
        .unwrap();
        assert_eq!(s.name, "ro-srv");
        assert_eq!(s.checks, [CheckId::Persistence, CheckId::StateMounts]);
        assert_eq!(s.commands, ["mount -o remount,bind,ro /srv; echo a:b"]);
        assert!(parse_scenario("x:root")
            .unwrap_err()
            .contains("NAME:CHECKS:COMMAND"));
        assert!(parse_scenario("x:nope:true").unwrap_err().contains("nope"));
        assert!(parse_scenario("x:root: ").unwrap_err().contains("empty"));
        // The name's rules and an empty check list are the run's to refuse
        // (exit 2, before anything starts): one place says them.
        assert!(parse_scenario("a b::true").is_ok());
    }

    fn run_with(argv: &[&str]) -> u8 {
        let mut full = vec!["strata-test"];
        full.extend_from_slice(argv);
        run(Cli::try_parse_from(full).expect("arguments parse").args)
    }

    /// A manifest that loads; its contents do not matter before a boot.
    fn manifest_json() -> String {
        serde_json::json!({
            "manifest_version": 1, "label": "factory",
            "fs_uuid": "3f1c0000-0000-4000-8000-000000000001",
            "root_device": "UUID=3f1c0000-0000-4000-8000-000000000001",
            "state_dirs": {"created": ["var"], "skipped": []},
            "fstab_lines_added": [], "state_migration": "move", "moved_files": [],
            "kernel": "systems/factory/kernel", "initramfs": null,
            "kernel_source": "boot/vmlinuz", "initramfs_source": null,
            "kernel_args": "", "image_size": 0, "timings": []
        })
        .to_string()
    }

    #[test]
    fn bad_input_is_exit_2() {
        assert_eq!(run_with(&["/nonexistent/strata.img"]), 2);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"").unwrap();
        // No IMG.manifest.json next to it.
        assert_eq!(run_with(&[img.to_str().unwrap()]), 2);
        std::fs::write(dir.path().join("a.img.manifest.json"), manifest_json()).unwrap();
        assert_eq!(
            run_with(&[img.to_str().unwrap(), "--checks", "root,bogus"]),
            2
        );
    }

    #[test]
    fn upgrade_flags_need_upgrade_to_and_exclude_label() {
        let parse = |argv: &[&str]| {
            let mut full = vec!["strata-test", "a.img"];
            full.extend_from_slice(argv);
            Cli::try_parse_from(full).map(drop)
        };
        assert!(parse(&["--upgrade-to", "/r", "--upgrade-label", "v2"]).is_ok());
        assert!(parse(&[
            "--upgrade-to",
            "/r",
            "--state-migration",
            "copy",
            "--state-data",
            "merge"
        ])
        .is_ok());
        for alone in [
            &["--upgrade-label", "v2"][..],
            &["--state-migration", "copy"],
            &["--state-data", "merge"],
            &["--upgrade-to", "/r", "--label", "factory"],
            &["--upgrade-to", "/r", "--state-migration", "rsync"],
        ] {
            assert!(parse(alone).is_err(), "{alone:?}");
        }
    }

    /// `--upgrade-to` takes what `upgrade --rootfs` takes: a directory or
    /// a tar archive (it was refused as "not a directory"); anything else
    /// is exit 2 naming it.
    #[test]
    fn upgrade_to_takes_a_tar_archive_like_upgrade_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        let archive = dir.path().join("rootfs.tar.gz");
        let made = std::process::Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-czf")
            .arg(&archive)
            .arg(".")
            .status()
            .unwrap();
        assert!(made.success());
        let facts = ImageFacts {
            labels: vec!["factory".into()],
            kernel_args: String::new(),
        };
        let args = |r: &Path| {
            Cli::try_parse_from(["strata-test", "a.img", "--upgrade-to", r.to_str().unwrap()])
                .expect("arguments parse")
                .args
        };
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the lifecycle needs root (it loop-mounts a copy): run this test as root"
        );
        for r in [&rootfs, &archive] {
            let l = lifecycle_config(&args(r), r, &facts)
                .unwrap_or_else(|code| panic!("{}: exit {code}", r.display()));
            assert_eq!(l.label, "upgrade");
        }
        let garbage = dir.path().join("notes.txt");
        std::fs::write(&garbage, "not a rootfs").unwrap();
        assert_eq!(
            lifecycle_config(&args(&garbage), &garbage, &facts).err(),
            Some(2)
        );
    }

    #[test]
    fn a_bad_lifecycle_is_exit_2_before_anything_boots() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"").unwrap();
        std::fs::write(dir.path().join("a.img.manifest.json"), manifest_json()).unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let (img, rootfs) = (img.to_str().unwrap(), rootfs.to_str().unwrap());
        // Not a directory; a label the image has; a label strata would not build.
        assert_eq!(run_with(&[img, "--upgrade-to", "/nonexistent/rootfs"]), 2);
        assert_eq!(
            run_with(&[img, "--upgrade-to", rootfs, "--upgrade-label", "factory"]),
            2
        );
        assert_eq!(
            run_with(&[img, "--upgrade-to", rootfs, "--upgrade-label", "v2;reboot"]),
            2
        );
    }

    #[test]
    fn the_upgrade_keeps_only_the_extra_kernel_arguments() {
        let record = |label: &str, line: &str| -> VersionRecord {
            serde_json::from_value(serde_json::json!({
                "label": label, "deployed_by": "build",
                "root_device": "UUID=3f1c", "state_dirs": {"created": [], "skipped": []},
                "fstab_lines_added": [], "state_migration": "move", "moved_files": [],
                "kernel": "k", "initramfs": null, "kernel_source": "k",
                "initramfs_source": null, "kernel_args": line, "timings": []
            }))
            .unwrap()
        };
        let line = "root=UUID=3f1c rootfstype=btrfs rootflags=subvol=systems/factory/run init=/sbin/init rw console=tty0 console=ttyS0,115200";
        assert_eq!(extra_kernel_args(&record("factory", line)), "");
        let quiet = format!("{line} quiet loglevel=3");
        assert_eq!(
            extra_kernel_args(&record("factory", &quiet)),
            "quiet loglevel=3"
        );
        // Not a line strata wrote for this version: nothing carried over.
        assert_eq!(extra_kernel_args(&record("v2", &quiet)), "");
        assert_eq!(extra_kernel_args(&record("factory", "")), "");
    }

    #[test]
    fn accel_probe_is_a_flag_off_by_default() {
        let parse = |argv: &[&str]| {
            let mut full = vec!["strata-test", "a.img"];
            full.extend_from_slice(argv);
            Cli::try_parse_from(full).unwrap().args.accel_probe
        };
        assert!(!parse(&[]));
        assert!(parse(&["--accel", "auto", "--accel-probe"]));
    }

    #[test]
    fn the_upgrade_defaults_are_strata_upgrades() {
        let plan = |argv: &[&str]| {
            let mut full = vec!["strata-test", "a.img", "--upgrade-to", "/r"];
            full.extend_from_slice(argv);
            let args = Cli::try_parse_from(full).unwrap().args;
            upgrade_plan(&args, Path::new("/r"), &ImageFacts::default())
        };
        let p = plan(&[]);
        assert_eq!(
            (p.migration, p.state_data),
            (Migration::Move, StatePolicy::Merge)
        );
        let p = plan(&["--state-migration", "copy", "--state-data", "keep"]);
        assert_eq!(
            (p.migration, p.state_data),
            (Migration::Copy, StatePolicy::Keep)
        );
    }

    #[test]
    fn the_default_upgrade_label_is_one_the_image_does_not_have() {
        assert_eq!(free_label(&["factory".into()]), "upgrade");
        assert_eq!(
            free_label(&["upgrade".into(), "upgrade-2".into()]),
            "upgrade-3"
        );
    }

    #[test]
    fn list_checks_needs_no_image_and_names_every_check() {
        assert_eq!(run_with(&["--list-checks"]), 0);
        let list = check_list();
        let names: Vec<&str> = list
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "root",
                "state-mounts",
                "fstab",
                "moved-files",
                "overmount",
                "persistence"
            ]
        );
        for (line, id) in list.lines().zip(CheckId::ALL) {
            assert!(line.ends_with(id.description()), "{line}");
        }
        // Without --list-checks an IMAGE is still required.
        assert!(Cli::try_parse_from(["strata-test"]).is_err());
    }

    #[test]
    fn infrastructure_failure_is_exit_3_and_still_writes_the_reports() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.path().join("a.img.manifest.json"), manifest_json()).unwrap();
        let json = dir.path().join("report.json");
        let junit = dir.path().join("report.xml");
        let code = run_with(&[
            img.to_str().unwrap(),
            "--accel",
            "tcg",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--artifacts",
            dir.path().join("art").to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ]);
        assert_eq!(code, 3);
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["verdict"], "fail");
        assert!(
            report["error"].as_str().unwrap().contains("starting QEMU"),
            "{report}"
        );
        assert!(std::fs::read_to_string(&junit)
            .unwrap()
            .contains("<error message="));
    }
}
