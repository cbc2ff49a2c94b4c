//! `strata build`: argument parsing and the progress display.

use super::exit;
use std::path::PathBuf;
use strata_builder::build::BuildOptions;
use strata_builder::error::FailureKind;
use strata_builder::host::guestfish::Accel;
use strata_builder::host::interrupt::Interrupt;
use strata_builder::layout::{DEFAULT_LABEL, DEFAULT_STATE_DIRS};
use strata_builder::manifest::Manifest;
use strata_builder::migrate::Migration;
use strata_builder::rootless::{self, BackendChoice, RootlessOptions};
use strata_builder::size::parse_size;

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The root filesystem to deploy: a directory or a tar archive (plain or
    /// gzip/xz/zstd/bzip2, as mmdebstrap, docker export or tar make it).
    #[arg(long)]
    rootfs: PathBuf,
    /// The raw image to write.
    #[arg(long)]
    output: PathBuf,
    /// Image size: bytes, or with a K/M/G/T suffix (powers of 1024).
    #[arg(long, env = "DISK_SIZE")]
    size: Option<String>,
    /// Version label: the system lives in systems/<LABEL>/.
    #[arg(long, env = "VERSION_LABEL", default_value = DEFAULT_LABEL)]
    label: String,
    /// State directories that get shared subvolumes, in order.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_STATE_DIRS.map(String::from))]
    state_dirs: Vec<String>,
    /// Root device for fstab and the kernel (default: UUID=<filesystem uuid>).
    #[arg(long, env = "ROOT_DEVICE")]
    root_device: Option<String>,
    /// A kernel on the host instead of the one in the rootfs.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initramfs on the host instead of the one in the rootfs. Without
    /// it, `INITRAMFS_PATH` (a path inside the rootfs, as morph passed it)
    /// names the rootfs's initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Extra kernel command line arguments.
    #[arg(long, env = "KERNEL_ARGS", default_value = "")]
    kernel_args: String,
    /// `move` (default) empties the mountpoints; `copy` leaves the data under
    /// them too, reproducing the "mountpoint not empty" boot warnings.
    #[arg(long, value_enum, default_value_t = Migration::Move)]
    state_migration: Migration,
    /// Where to write the build manifest (default: OUTPUT.manifest.json).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Filesystem UUID, for reproducible output (default: random).
    #[arg(long)]
    fs_uuid: Option<String>,
    /// Replace an existing output image and manifest.
    #[arg(long)]
    force: bool,
    /// `privileged` (root: loop device and mounts), `rootless` (an ordinary
    /// user: user namespace, mkfs.btrfs --rootdir and a libguestfs
    /// appliance VM), or `auto`: privileged when running as root.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// How the rootless build's appliance VM runs: `tcg` (software, works
    /// everywhere) or `kvm`.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    appliance_accel: Accel,
}

pub fn run(args: BuildArgs) -> u8 {
    let size = match args.size.as_deref() {
        None => return exit::input("no disk size: give --size SIZE or set DISK_SIZE (e.g. 4G)"),
        Some(s) => match parse_size(s) {
            Ok(n) => n,
            Err(e) => return exit::input(format!("--size/DISK_SIZE: {e}")),
        },
    };
    let manifest = args
        .manifest
        .unwrap_or_else(|| Manifest::default_path(&args.output));
    let opts = BuildOptions {
        rootfs: args.rootfs,
        output: args.output,
        size,
        label: args.label,
        state_dirs: args.state_dirs,
        root_device: args.root_device.filter(|d| !d.is_empty()),
        kernel: args.kernel,
        // morph's variable: a path inside the rootfs, so it cannot be the
        // env fallback clap would give --initramfs (a host path).
        initramfs_in_rootfs: std::env::var("INITRAMFS_PATH")
            .ok()
            .filter(|p| !p.is_empty() && args.initramfs.is_none()),
        initramfs: args.initramfs,
        kernel_args: args.kernel_args,
        migration: args.state_migration,
        manifest,
        force: args.force,
        fs_uuid: args.fs_uuid,
    };
    let interrupt = match Interrupt::on_signals() {
        Ok(i) => i,
        Err(e) => {
            return exit::fail_with(
                FailureKind::Infrastructure,
                &anyhow::anyhow!("installing signal handlers: {e}"),
            )
        }
    };
    let mut ui = super::progress::Progress::new();
    let rootless = RootlessOptions {
        accel: args.appliance_accel,
    };
    let result = rootless::build_with(args.backend, &opts, &rootless, &interrupt, &mut |e| {
        ui.event(e)
    });
    ui.finish();
    match result {
        Ok(m) => {
            let v = m.default_version();
            println!(
                "built {} (label {}, root {}, {} state subvolumes, {} entries moved); manifest {}",
                opts.output.display(),
                v.label,
                v.root_device,
                v.state_dirs.created.len(),
                v.moved_files.len(),
                opts.manifest.display()
            );
            0
        }
        Err(e) => exit::fail(e),
    }
}

/// `strata build` with arguments made elsewhere (a test file's `[build]`,
/// `BuildSpec::build_args`): parsed by this command's own definition and
/// run by `run`, so a test file builds exactly as `strata build` does
/// (environment fallbacks included).
pub fn run_with_args(argv: Vec<std::ffi::OsString>) -> u8 {
    #[derive(clap::Parser)]
    #[command(name = "strata build", no_binary_name = true)]
    struct Build {
        #[command(flatten)]
        args: BuildArgs,
    }
    match <Build as clap::Parser>::try_parse_from(argv) {
        Ok(b) => run(b.args),
        Err(e) => exit::input(format!(
            "[build]: {}",
            e.to_string().lines().next().unwrap_or("")
        )),
    }
}
