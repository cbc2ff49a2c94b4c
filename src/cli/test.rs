//! `strata test`: arguments, progress lines on stderr, the report on stdout.

use std::path::PathBuf;
use std::time::Duration;
use strata_vmtest::accel::AccelChoice;
use strata_vmtest::qemu::DiskBus;
use strata_vmtest::report::{Report, Status};
use strata_vmtest::run::{self, BootMode, Progress, RunError, TestConfig};

#[derive(clap::Args)]
pub struct TestArgs {
    /// The raw image to boot (never modified: QEMU writes to a qcow2 overlay).
    image: PathBuf,
    /// The build manifest (default: IMAGE.manifest.json).
    #[arg(long)]
    manifest: Option<PathBuf>,
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
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    #[arg(long, value_enum, default_value_t = BusArg::VirtioBlk)]
    disk_bus: BusArg,
    /// `extlinux` boots through the image's bootloader; `direct` hands the
    /// image's kernel and initramfs to QEMU (-kernel/-initrd).
    #[arg(long, value_enum, default_value_t = BootArg::Extlinux)]
    boot: BootArg,
    /// Limit for the whole run, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout: u64,
    /// Run only these checks (comma-separated); the others are reported as skipped.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    checks: Option<Vec<String>>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest vCPUs (TCG runs one host thread per vCPU).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// The QEMU binary.
    #[arg(long, env = "STRATA_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BusArg {
    VirtioBlk,
    VirtioScsi,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BootArg {
    Extlinux,
    Direct,
}

pub fn run(args: TestArgs) -> u8 {
    let mut cfg = TestConfig::new(args.image.clone());
    cfg.manifest = args.manifest.clone();
    cfg.artifacts = args.artifacts.clone();
    cfg.accel = match args.accel {
        AccelArg::Auto => AccelChoice::Auto,
        AccelArg::Kvm => AccelChoice::Kvm,
        AccelArg::Tcg => AccelChoice::Tcg,
    };
    cfg.disk_bus = match args.disk_bus {
        BusArg::VirtioBlk => DiskBus::VirtioBlk,
        BusArg::VirtioScsi => DiskBus::VirtioScsi,
    };
    cfg.boot = match args.boot {
        BootArg::Extlinux => BootMode::Extlinux,
        BootArg::Direct => BootMode::Direct,
    };
    cfg.timeout = Duration::from_secs(args.timeout);
    if let Some(c) = &args.checks {
        cfg.checks = c.clone();
    }
    cfg.memory_mib = args.memory;
    cfg.cpus = args.cpus;
    cfg.qemu_binary = args.qemu.clone();

    let started = std::time::Instant::now();
    let result = run::run_blocking(cfg, |p| show(&p, started));
    match result {
        Ok(report) => {
            print!("{}", report.to_table());
            if let Err(code) = write_outputs(&args, &report) {
                return code;
            }
            run::exit_code(&report)
        }
        Err(RunError::Input(msg)) => super::fail(2, &anyhow::anyhow!(msg)),
        Err(e @ RunError::Infra { .. }) => {
            let code = e.exit_code();
            if let RunError::Infra {
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
                RunError::Infra { message, .. } => message.lines().next().unwrap_or("").to_owned(),
                other => other.to_string(),
            };
            super::fail(code, &anyhow::anyhow!("infrastructure failure: {msg}"))
        }
    }
}

fn write_outputs(args: &TestArgs, report: &Report) -> Result<(), u8> {
    let write = |path: &PathBuf, text: String, what: &str| {
        std::fs::write(path, text).map_err(|e| {
            super::fail(
                3,
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
        Progress::Booting { boot, why } => format!("boot {boot}: {why}"),
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
