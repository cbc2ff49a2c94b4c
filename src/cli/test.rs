//! `strata test`: arguments, progress lines on stderr, the report on stdout.
//! `--upgrade-to` runs vmtest's upgrade lifecycle; the image changes it
//! needs are the builder's (`changes`, `lifecycle`). `--spec FILE` reads a
//! test file (`strata_vmtest::spec`); the flags are shorthand for the same
//! settings, and a flag given on the command line overrides the file.

mod changes;
mod lifecycle;

use super::exit;
use changes::{CliChanges, UpgradePlan};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use strata_builder::bootloader::{self, cmdline};
use strata_builder::error::{Failure, FailureKind};
use strata_builder::expect::Expectations;
use strata_builder::host::interrupt::Interrupt;
use strata_builder::image;
use strata_builder::layout;
use strata_builder::manifest::{Manifest, VersionRecord};
use strata_builder::migrate::Migration;
use strata_builder::rootfs_tar::{self, RootfsInput};
use strata_builder::sync::StatePolicy;
use strata_vmtest::accel::AccelChoice;
use strata_vmtest::checks::user::UserCheck;
use strata_vmtest::checks::CheckId;
use strata_vmtest::lifecycle::{InGuest, Lifecycle};
use strata_vmtest::qemu::BootMode;
use strata_vmtest::qemu::DiskBus;
use strata_vmtest::report::{Report, Status};
use strata_vmtest::run::{self, Progress, RunError, Scenario, TestConfig};
use strata_vmtest::spec::{self, BuildSpec, Spec};

// The upgrade's options need an upgrade: `--upgrade-to`, or a test file
// (whose `[upgrade]` is checked for once it is read).
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("upgrade_source").args(["upgrade_to", "spec"]).multiple(true)))]
pub struct TestArgs {
    /// The raw image to boot (never modified: QEMU writes to a qcow2 overlay).
    /// With --spec it replaces the file's `image`, and the file's [build]
    /// is not run.
    #[arg(required_unless_present_any = ["list_checks", "spec"])]
    image: Option<PathBuf>,
    /// A test file (TOML): image or how to build it, machine, setup
    /// commands, checks of your own, paths to preserve, scenarios, upgrade
    /// (README, "Test files"). Options given here override it.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Print what the run would do, boot by boot, and exit 0 without
    /// building, reading or booting the image.
    #[arg(long)]
    dry_run: bool,
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
    /// [default: auto]
    #[arg(long, value_enum)]
    accel: Option<AccelChoice>,
    /// With `--accel auto`: try KVM again even if this host's verdict is
    /// cached (strata's cache dir, kvm-verdict.json), and store the outcome.
    #[arg(long)]
    accel_probe: bool,
    /// [default: virtio-blk]
    #[arg(long, value_enum)]
    disk_bus: Option<DiskBus>,
    /// `extlinux` boots through the image's bootloader; `direct` hands the
    /// image's kernel and initramfs to QEMU (-kernel/-initrd)
    /// [default: extlinux].
    #[arg(long, value_enum)]
    boot: Option<BootMode>,
    /// How the boots after the first are made (the clean reboot, the
    /// fresh start after the power cut). Boot 1 proves the image's
    /// bootloader; `direct` hands the later boots the same kernel,
    /// initramfs and command line (-kernel/-initrd/-append; the guest
    /// still runs its whole `systemctl reboot`), `extlinux` takes each
    /// through firmware and bootloader again. Only with `--boot extlinux`;
    /// `--upgrade-to` boots every time through extlinux [default: direct].
    #[arg(long, value_enum, value_name = "HOW")]
    later_boots: Option<BootMode>,
    /// Limit for the whole run, in seconds [default: 600; with --power-cut
    /// 600 more per cut point].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Run only these checks (comma-separated); the others are reported as
    /// skipped. Replaces a test file's `checks` (its user checks' names are
    /// accepted and change nothing: user checks always run).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    checks: Option<Vec<String>>,
    /// A change to judge in the running guest, as NAME:CHECKS:COMMAND
    /// (repeatable; CHECKS comma-separated, COMMAND a shell command run as
    /// root). After the first boot's checks the booted guest is saved;
    /// each scenario starts from that moment in a QEMU of its own, runs
    /// COMMAND, and its checks report as NAME/CHECK. Seconds each, not a
    /// boot (persistence in a scenario reboots its own guest). Added to a
    /// test file's scenarios.
    #[arg(long, value_name = "NAME:CHECKS:COMMAND", value_parser = parse_scenario)]
    scenario: Vec<Scenario>,
    /// Guest memory in MiB [default: 1024].
    #[arg(long)]
    memory: Option<u32>,
    /// Guest vCPUs (TCG runs one host thread per vCPU) [default: 2].
    #[arg(long)]
    cpus: Option<u32>,
    /// Boot the power cut's disk after the clean reboot instead of beside
    /// it (the default on a host with one CPU): one guest at a time.
    #[arg(long)]
    one_guest_at_a_time: bool,
    /// The QEMU binary [default: qemu-system-x86_64].
    #[arg(long, env = "STRATA_QEMU")]
    qemu: Option<PathBuf>,
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
    #[arg(long, value_name = "LABEL", requires = "upgrade_source")]
    upgrade_label: Option<String>,
    /// The upgrade's `--state-migration`: `copy` leaves the new rootfs's
    /// state data under the new version's mountpoints, reproducing the
    /// "not empty" warnings (overmount then fails in the upgrade boot)
    /// [default: move].
    #[arg(long, value_enum, value_name = "HOW", requires = "upgrade_source")]
    state_migration: Option<Migration>,
    /// The upgrade's `--state-data`: what becomes of the new rootfs's data
    /// under state dirs (the state subvolumes stay authoritative); the same
    /// default as `strata upgrade` [default: merge].
    #[arg(long, value_enum, value_name = "POLICY", requires = "upgrade_source")]
    state_data: Option<StatePolicy>,
    /// The upgrade and the rollback are made by strata inside the running
    /// guest (`upgrade --running`, `set-default --running`), handed the
    /// strata binary and ROOTFS on a second, read-only disk; the guest needs
    /// no network [spec: `[upgrade] in_guest = true`].
    #[arg(long, requires = "upgrade_source")]
    in_guest: bool,
    /// Instead of the three stages: the power-cut matrix of the in-guest
    /// upgrade (implies --in-guest). `steps`: a cut after every step of
    /// the upgrade (`steps:STEP,…`: after these only); `random:N[:SEED]`:
    /// N moments within it; `all[:SEED]`: both (2 random); parts join
    /// with `+` (`steps:flush,set-default+random:1:7`). Each point
    /// starts from the guest saved after boot 1, cuts the power there,
    /// boots what was left and judges it
    /// [spec: `[upgrade] power_cut = "steps"`].
    #[arg(long, value_name = "PLAN", requires = "upgrade_source")]
    power_cut: Option<strata_vmtest::power_cut::Plan>,
}

pub fn run(args: TestArgs) -> u8 {
    // The file first, and everything about it, before any image is read:
    // a typo should not wait for an image (or a build).
    let spec = match &args.spec {
        None => None,
        Some(f) => match Spec::load(f) {
            Ok(s) => Some(s),
            Err(e) => return exit::input(e),
        },
    };
    if args.list_checks {
        let user = spec
            .as_ref()
            .map(|s| s.user_checks.as_slice())
            .unwrap_or_default();
        print!("{}", check_list(user));
        return exit::SUCCESS;
    }
    let plan = match resolve(&args, spec.as_ref()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if args.dry_run {
        let cfg = config(&args, spec.as_ref(), &plan, dry_run_expectations(), None);
        let mut cfg = cfg;
        cfg.lifecycle = plan.upgrade.as_ref().map(|u| Lifecycle {
            changes: Arc::new(CliChanges {
                plan: upgrade_plan(u, &ImageFacts::default()),
                ops: lifecycle::OPS,
            }),
            // The image is not read: the label the run would pick when
            // none is given is `upgrade` unless the image has it.
            label: u.label.clone().unwrap_or_else(|| "upgrade".into()),
            interrupt: Interrupt::default(),
            in_guest: None,
            power_cut: None,
        });
        print!("{}", spec::plan::render(&cfg, plan.build.as_ref()));
        return exit::SUCCESS;
    }
    if let Some(b) = &plan.build {
        eprintln!(
            "building {} from {} first (as strata build)",
            b.output.display(),
            b.rootfs.value.display()
        );
        let code = super::build::run_with_args(b.build_args());
        if code != exit::SUCCESS {
            return code;
        }
    }
    let (expect, facts) = match expectations(&args, &plan.image) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let lifecycle = match &plan.upgrade {
        None => None,
        Some(u) => match lifecycle_config(u, &facts) {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
    };
    let cfg = config(&args, spec.as_ref(), &plan, expect, lifecycle);

    let started = std::time::Instant::now();
    let result = run::run_blocking(cfg, |p| show(&p, started));
    match result {
        Ok(report) => {
            print!("{}", report.to_table());
            if let Err(code) = write_outputs(&plan, &report) {
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
                if let Err(c) = write_outputs(&plan, report) {
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

/// What the command line and the test file settle before anything is read
/// or booted (exit 2 for what cannot run).
#[derive(Debug)]
struct Plan {
    image: PathBuf,
    /// The file's `[build]`, when the image is built first (not when
    /// IMAGE was given on the command line).
    build: Option<BuildSpec>,
    /// The built-in checks to run: `--checks`, else the file's, else all.
    checks: Option<Vec<CheckId>>,
    upgrade: Option<UpgradeRequest>,
    json: Option<PathBuf>,
    junit: Option<PathBuf>,
}

/// The lifecycle asked for, by `--upgrade-*` flags or `[upgrade]`, each
/// value with where it came from (for messages).
#[derive(Debug, Clone)]
struct UpgradeRequest {
    rootfs: PathBuf,
    /// `--upgrade-to`, or `FILE:LINE: upgrade.rootfs`.
    rootfs_from: String,
    label: Option<String>,
    label_from: String,
    migration: Option<Migration>,
    state_data: Option<StatePolicy>,
    /// `--in-guest` or `[upgrade] in_guest = true`.
    in_guest: bool,
    /// `--power-cut` or `[upgrade] power_cut`.
    power_cut: Option<strata_vmtest::power_cut::Plan>,
}

fn resolve(args: &TestArgs, spec: Option<&Spec>) -> Result<Plan, u8> {
    let file_upgrade = spec.and_then(|s| s.upgrade.as_ref());
    let upgrade = match (&args.upgrade_to, file_upgrade) {
        (None, None) => {
            if args.upgrade_label.is_some()
                || args.state_migration.is_some()
                || args.state_data.is_some()
                || args.in_guest
                || args.power_cut.is_some()
            {
                return Err(exit::input(
                    "--upgrade-label, --state-migration, --state-data, --in-guest and --power-cut need an upgrade: --upgrade-to ROOTFS or [upgrade] in the test file",
                ));
            }
            None
        }
        (flag, file) => {
            let (rootfs, rootfs_from) = match (flag, file) {
                (Some(r), _) => (r.clone(), "--upgrade-to".to_owned()),
                (None, Some(u)) => (u.rootfs.value.clone(), place(spec, &u.rootfs.site)),
                (None, None) => unreachable!("matched above"),
            };
            let file_label = file.and_then(|u| u.label.as_ref());
            let (label, label_from) = match (&args.upgrade_label, file_label) {
                (Some(l), _) => (Some(l.clone()), "--upgrade-label".to_owned()),
                (None, Some(l)) => (Some(l.value.clone()), place(spec, &l.site)),
                (None, None) => (None, "--upgrade-label".to_owned()),
            };
            Some(UpgradeRequest {
                rootfs,
                rootfs_from,
                label,
                label_from,
                migration: args
                    .state_migration
                    .or(file.and_then(|u| u.state_migration)),
                state_data: args.state_data.or(file.and_then(|u| u.state_data)),
                // The matrix cuts the upgrade the guest runs.
                in_guest: args.in_guest
                    || args.power_cut.is_some()
                    || file.is_some_and(|u| u.in_guest || u.power_cut.is_some()),
                power_cut: args
                    .power_cut
                    .clone()
                    .or_else(|| file.and_then(|u| u.power_cut.clone())),
            })
        }
    };
    if upgrade.is_some() && args.label.is_some() {
        return Err(exit::input(
            "--label checks a version that boots; an upgrade lifecycle boots the image's default and the new version",
        ));
    }
    if let Some(s) = spec {
        s.check_run_shape(upgrade.is_some()).map_err(exit::input)?;
    }
    // A cut point the upgrade does not have is refused before anything boots.
    if let Some(u) = &upgrade {
        if let Some(p) = &u.power_cut {
            p.check(&power_cut_steps(&u.rootfs)).map_err(exit::input)?;
        }
    }
    let user: Vec<&str> = spec.map(Spec::user_check_names).unwrap_or_default();
    let checks = match &args.checks {
        Some(names) => Some(spec::builtin_checks(names, &user).map_err(exit::input)?),
        None => spec.and_then(|s| s.checks.clone()),
    };
    let (image, build) = match (&args.image, spec) {
        (Some(i), _) => (i.clone(), None),
        (None, Some(s)) => match (&s.build, &s.image) {
            (Some(b), _) => (b.output.clone(), Some(b.clone())),
            (None, Some(i)) => (i.value.clone(), None),
            (None, None) => {
                return Err(exit::input(format!(
                    "{}: no image to test: give `image = \"…\"` or a [build] section, or IMAGE on the command line",
                    s.file.display()
                )))
            }
        },
        (None, None) => return Err(exit::input("an IMAGE to test is required")),
    };
    if let Some(s) = spec {
        if !args.dry_run {
            s.check_inputs(args.image.is_some(), args.upgrade_to.is_some())
                .map_err(exit::input)?;
        }
    }
    let out = spec.map(|s| s.output.clone()).unwrap_or_default();
    Ok(Plan {
        image,
        build,
        checks,
        upgrade,
        json: args.json.clone().or(out.json),
        junit: args.junit.clone().or(out.junit),
    })
}

/// What `--timeout` adds for each cut point of a power-cut matrix when it
/// is not given: a restore, an upgrade, two boots (about 4 minutes under
/// TCG on the fixture), with room.
const POWER_CUT_POINT_TIMEOUT: Duration = Duration::from_secs(600);

/// The steps of the upgrade a matrix cuts (`strata upgrade --list-steps`).
fn power_cut_steps(rootfs: &std::path::Path) -> Vec<String> {
    strata_builder::upgrade::step_names(!rootfs.is_dir(), true)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// `FILE:LINE: KEY` of a value the test file gave.
fn place(spec: Option<&Spec>, site: &spec::Site) -> String {
    spec.map(|s| s.place(site)).unwrap_or_default()
}

/// The run's config: the defaults, then the test file, then every flag
/// given on the command line (scenarios are added, not replaced).
fn config(
    args: &TestArgs,
    spec: Option<&Spec>,
    plan: &Plan,
    expect: Expectations,
    lifecycle: Option<Lifecycle>,
) -> TestConfig {
    let mut cfg = TestConfig::new(plan.image.clone(), expect);
    if let Some(s) = spec {
        s.apply(&mut cfg);
    }
    if let Some(a) = &args.artifacts {
        cfg.artifacts = Some(a.clone());
    }
    if let Some(v) = args.accel {
        cfg.accel = v;
    }
    if let Some(c) = cfg.kvm_cache.as_mut() {
        c.reprobe = args.accel_probe;
    }
    if let Some(v) = args.disk_bus {
        cfg.disk_bus = v;
    }
    if let Some(v) = args.boot {
        cfg.boot = v;
    }
    if let Some(v) = args.later_boots {
        cfg.later_boots = v;
    }
    // A matrix runs an upgrade and two boots per point: unless a limit was
    // given, each point gets its own on top of the run's.
    if let Some((p, g)) = lifecycle
        .as_ref()
        .and_then(|l| l.power_cut.as_ref().zip(l.in_guest.as_ref()))
    {
        if spec.is_none_or(|s| s.machine.timeout.is_none()) {
            let points = p.points(&power_cut_steps(&g.rootfs), 1).len() as u32;
            cfg.timeout += POWER_CUT_POINT_TIMEOUT * points;
        }
    }
    if let Some(v) = args.timeout {
        cfg.timeout = Duration::from_secs(v);
    }
    if let Some(c) = &plan.checks {
        cfg.checks = c.clone();
    }
    if let Some(v) = args.memory {
        cfg.memory_mib = v;
    }
    if let Some(v) = args.cpus {
        cfg.cpus = v;
    }
    if args.one_guest_at_a_time {
        cfg.power_cut_beside = false;
    }
    if let Some(v) = &args.qemu {
        cfg.qemu_binary = v.clone();
    }
    cfg.lifecycle = lifecycle;
    cfg.scenarios.extend(args.scenario.iter().cloned());
    cfg
}

/// A dry run reads nothing of the image; the plan does not depend on what
/// the boot must show. This stands in for it, and is never judged.
fn dry_run_expectations() -> Expectations {
    Expectations {
        version: layout::Version::new(layout::DEFAULT_LABEL).expect("the default label is valid"),
        fs_uuid: String::new(),
        root_device: String::new(),
        state_dirs: Vec::new(),
        moved_files: Vec::new(),
        source: strata_builder::expect::Source::Image,
    }
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
/// version booted the old run. Read by the builder's one rule
/// (`cmdline::extra_args`), the one `strata upgrade` keeps them by when
/// not given, so both upgrades give the new version the same arguments.
fn extra_kernel_args(record: &VersionRecord) -> String {
    layout::Version::new(&record.label)
        .map(|v| cmdline::extra_args(&record.kernel_args, &v))
        .unwrap_or_default()
}

/// The extra kernel arguments of `version` as its menu entry boots it, for
/// an image without a manifest: the ones `strata upgrade` keeps from it
/// (`bootloader::menu_entries`), by the same rule.
fn menu_kernel_args(
    read: &strata_builder::model::ImageLayout,
    version: &layout::Version,
) -> String {
    bootloader::menu_entry(read, version.label())
        .and_then(|e| e.append.as_deref())
        .map(|line| cmdline::extra_args(line, version))
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
        kernel_args: menu_kernel_args(&layout, &expect.version),
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

/// `--upgrade-to` (or `[upgrade]`): checked before anything boots (exit
/// 2), so a mistake does not cost a boot first.
fn lifecycle_config(req: &UpgradeRequest, facts: &ImageFacts) -> Result<Lifecycle, u8> {
    let bad = exit::input;
    let rootfs = &req.rootfs;
    let from = &req.rootfs_from;
    // What `strata upgrade --rootfs` takes, told apart the same way: a
    // directory, or a tar archive (by its bytes) that the upgrade extracts.
    match rootfs_tar::classify(rootfs) {
        Ok(RootfsInput::Tar(_)) => {}
        Ok(RootfsInput::Dir) if rootfs.is_dir() => {}
        Ok(RootfsInput::Dir) => {
            return Err(bad(format!(
                "{from} {}: no such directory or tar archive (a root filesystem to upgrade to)",
                rootfs.display()
            )))
        }
        Err(e) => return Err(bad(format!("{from}: {e}"))),
    }
    let label = match &req.label {
        None => free_label(&facts.labels),
        Some(l) => {
            let from = &req.label_from;
            layout::validate_label(l).map_err(|e| bad(format!("{from}: {e}")))?;
            if facts.labels.contains(l) {
                return Err(bad(format!(
                    "{from} {l}: the image already has that version (it has {})",
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
    let plan = upgrade_plan(req, facts);
    let in_guest = match req.in_guest {
        false => None,
        true => Some(InGuest {
            strata: std::env::current_exe().map_err(|e| {
                bad(format!(
                    "--in-guest: the strata binary to hand the guest: {e}"
                ))
            })?,
            rootfs: plan.rootfs.clone(),
            upgrade_args: vec![
                "--state-migration".into(),
                plan.migration.name().into(),
                "--state-data".into(),
                plan.state_data.name().into(),
            ],
        }),
    };
    Ok(Lifecycle {
        changes: Arc::new(CliChanges {
            plan,
            ops: lifecycle::OPS,
        }),
        label,
        in_guest,
        power_cut: req.power_cut.clone(),
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
fn upgrade_plan(req: &UpgradeRequest, facts: &ImageFacts) -> UpgradePlan {
    UpgradePlan {
        rootfs: req.rootfs.clone(),
        kernel_args: facts.kernel_args.clone(),
        migration: req.migration.unwrap_or(Migration::Move),
        state_data: req.state_data.unwrap_or(StatePolicy::Merge),
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
/// The one registry as a list: the built-in checks, then the test
/// file's own (`--spec`), each with what it does.
fn check_list(user: &[UserCheck]) -> String {
    let mut rows: Vec<(String, String)> = CheckId::ALL
        .iter()
        .map(|c| (c.name().to_owned(), c.description().to_owned()))
        .collect();
    for c in user {
        let mut what = Vec::new();
        if let Some(u) = &c.wait_for_unit {
            what.push(format!("waits for {u}"));
        }
        if let Some(r) = &c.run {
            what.push(format!("runs `{r}`"));
        }
        let phases = match &c.phases {
            None => "every phase".to_owned(),
            Some(p) => p.iter().map(|w| w.name()).collect::<Vec<_>>().join(", "),
        };
        rows.push((
            c.name.clone(),
            format!("(user) {}; in {phases}", what.join(", then ")),
        ));
    }
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(n, d)| format!("{n:<width$}  {d}\n"))
        .collect()
}

fn write_outputs(plan: &Plan, report: &Report) -> Result<(), u8> {
    let write = |path: &PathBuf, text: String, what: &str| {
        std::fs::write(path, text).map_err(|e| {
            exit::fail_with(
                FailureKind::Infrastructure,
                &anyhow::anyhow!("writing {what} report {}: {e}", path.display()),
            )
        })
    };
    if let Some(p) = &plan.json {
        write(p, report.to_json(), "JSON")?;
    }
    if let Some(p) = &plan.junit {
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
        let req = |r: &Path| {
            let args =
                Cli::try_parse_from(["strata-test", "a.img", "--upgrade-to", r.to_str().unwrap()])
                    .expect("arguments parse")
                    .args;
            resolve(&args, None).unwrap().upgrade.unwrap()
        };
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the lifecycle needs root (it loop-mounts a copy): run this test as root"
        );
        for r in [&rootfs, &archive] {
            let l = lifecycle_config(&req(r), &facts)
                .unwrap_or_else(|code| panic!("{}: exit {code}", r.display()));
            assert_eq!(l.label, "upgrade");
        }
        let garbage = dir.path().join("notes.txt");
        std::fs::write(&garbage, "not a rootfs").unwrap();
        assert_eq!(lifecycle_config(&req(&garbage), &facts).err(), Some(2));
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
        // Not a line strata wrote for this version: strata's own words
        // (another version's root among them) are not carried over.
        assert_eq!(extra_kernel_args(&record("v2", &quiet)), "quiet loglevel=3");
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
            let req = resolve(&args, None).unwrap().upgrade.unwrap();
            upgrade_plan(&req, &ImageFacts::default())
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
        let list = check_list(&[]);
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
                "persistence",
                "boot-health",
                "shutdown",
                "state-contract"
            ]
        );
        for (line, id) in list.lines().zip(CheckId::ALL) {
            assert!(line.ends_with(id.description()), "{line}");
        }
        // Without --list-checks an IMAGE is still required.
        assert!(Cli::try_parse_from(["strata-test"]).is_err());
    }

    fn spec_file(dir: &Path, text: &str) -> PathBuf {
        let f = dir.join("t.toml");
        std::fs::write(&f, text).unwrap();
        f
    }

    /// The file fills the config; a flag given on the command line wins,
    /// `--checks` replaces the file's list, `--scenario` adds to its
    /// scenarios, IMAGE replaces `image`, and what neither says keeps the
    /// flags' defaults.
    #[test]
    fn flags_given_override_the_test_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = spec_file(
            dir.path(),
            "image = \"sys.img\"\nchecks = [\"root\", \"app\"]\n\n[machine]\nmemory = 2048\ncpus = 4\naccel = \"tcg\"\n\n[[check]]\nname = \"app\"\nrun = \"true\"\n\n[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = [\"root\"]\n\n[output]\njson = \"r.json\"\n",
        );
        let f = f.to_str().unwrap();
        let cfg_of = |argv: &[&str]| {
            let mut full = vec!["strata-test", "--spec", f];
            full.extend_from_slice(argv);
            let args = Cli::try_parse_from(full).unwrap().args;
            let spec = Spec::load(args.spec.as_ref().unwrap()).unwrap();
            let plan = resolve(&args, Some(&spec)).map_err(|c| format!("exit {c}"));
            plan.map(|p| {
                let json = p.json.clone();
                (
                    config(&args, Some(&spec), &p, dry_run_expectations(), None),
                    json,
                )
            })
        };
        let (from_file, json) = cfg_of(&["--dry-run"]).unwrap();
        assert_eq!(from_file.image, dir.path().join("sys.img"));
        assert_eq!((from_file.memory_mib, from_file.cpus), (2048, 4));
        assert_eq!(from_file.accel, AccelChoice::Tcg);
        assert_eq!(from_file.checks, [CheckId::Root]);
        assert_eq!(from_file.timeout, Duration::from_secs(600));
        assert_eq!(from_file.scenarios.len(), 1);
        assert_eq!(json, Some(dir.path().join("r.json")));

        let (c, json) = cfg_of(&[
            "--dry-run",
            "other.img",
            "--memory",
            "512",
            "--accel",
            "auto",
            "--checks",
            "persistence,app",
            "--scenario",
            "x:root:true",
            "--json",
            "mine.json",
        ])
        .unwrap();
        assert_eq!(c.image, Path::new("other.img"));
        assert_eq!((c.memory_mib, c.cpus), (512, 4));
        assert_eq!(c.accel, AccelChoice::Auto);
        assert_eq!(c.checks, [CheckId::Persistence]);
        assert_eq!(
            c.scenarios
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["s", "x"]
        );
        assert_eq!(json, Some(PathBuf::from("mine.json")));
        // --checks knows the file's user checks, and nothing else.
        assert_eq!(
            cfg_of(&["--dry-run", "--checks", "root,nope"]).err(),
            Some("exit 2".into())
        );
    }

    #[test]
    fn a_test_file_that_cannot_run_is_exit_2_before_any_image() {
        let dir = tempfile::tempdir().unwrap();
        let f = spec_file(
            dir.path(),
            "image = \"x.img\"\n[[check]]\nname = \"a\"\nrun = \"\"\n",
        );
        assert_eq!(run_with(&["--spec", f.to_str().unwrap()]), 2);
        // Valid, but its image does not exist (and a dry run does not read it).
        let f = spec_file(dir.path(), "image = \"x.img\"\n");
        assert_eq!(run_with(&["--spec", f.to_str().unwrap()]), 2);
        assert_eq!(run_with(&["--spec", f.to_str().unwrap(), "--dry-run"]), 0);
        // The upgrade's options need an upgrade, from a flag or the file.
        assert_eq!(
            run_with(&["--spec", f.to_str().unwrap(), "--upgrade-label", "v2"]),
            2
        );
        // A phase the lifecycle lacks, when --upgrade-to makes the run one.
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let f = spec_file(
            dir.path(),
            "image = \"x.img\"\n[[check]]\nname = \"a\"\nrun = \"true\"\nphases = [\"reboot\"]\n",
        );
        assert_eq!(
            run_with(&[
                "--spec",
                f.to_str().unwrap(),
                "--dry-run",
                "--upgrade-to",
                rootfs.to_str().unwrap()
            ]),
            2
        );
        assert_eq!(
            run_with(&["--spec", dir.path().join("none.toml").to_str().unwrap()]),
            2
        );
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
