//! `strata inspect IMG [--json]` prints an image's layout; `strata inspect
//! --lint IMG [--json] [--all]` lists the files hidden under mountpoints of
//! every version's orig and run.
//!
//! As root the image is loop-mounted read-only; as anyone else the
//! libguestfs appliance serves it (slower: it boots a VM), read by the same
//! code.
//!
//! Exit codes: 0 (lint: clean), 1 (lint: hidden files found), 2 bad input
//! (missing image, not Btrfs, not a strata layout for --lint), 3 the tools
//! failed (losetup, mount, btrfs, guestfish), 130 interrupted.

mod render;

use super::exit;
use std::path::PathBuf;
use strata_builder::error::FailureKind;
use strata_builder::host::interrupt::Interrupt;
use strata_builder::image::{self, ImageError};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The image (a raw whole-disk Btrfs file, or a block device).
    image: PathBuf,
    /// Report every non-empty mountpoint of every version's orig and run,
    /// with the files hidden under it; exit 1 when any is found.
    #[arg(long)]
    lint: bool,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// With --lint: list every hidden file, not the first 20 per mountpoint.
    #[arg(long, requires = "lint")]
    all: bool,
}

pub fn run(args: InspectArgs) -> u8 {
    let finish = |r: Result<(u8, String), ImageError>| match r {
        Ok((code, out)) => {
            print!("{out}");
            code
        }
        Err(e) => exit::fail(e),
    };
    // Ctrl-C while the appliance starts stops it (no QEMU, no FUSE mount
    // left). Root's loop mount never polls the flag (it is read too quickly
    // to matter): there the handler is not installed, so Ctrl-C still ends
    // strata as it always did.
    // SAFETY: geteuid has no preconditions.
    let interrupt = if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "strata: not running as root: reading {} through the libguestfs appliance",
            args.image.display()
        );
        Interrupt::on_signals().unwrap_or_default()
    } else {
        Interrupt::default()
    };
    if args.lint {
        finish(image::lint_with(&args.image, &interrupt).map(|lint| {
            let out = if args.json {
                serde_json::to_string_pretty(&lint).expect("serialisable") + "\n"
            } else {
                render::lint(&lint, args.all)
            };
            (exit::of((!lint.clean).then_some(FailureKind::Failed)), out)
        }))
    } else {
        finish(image::read_with(&args.image, &interrupt).map(|layout| {
            let out = if args.json {
                serde_json::to_string_pretty(&layout).expect("serialisable") + "\n"
            } else {
                render::layout(&layout)
            };
            (exit::SUCCESS, out)
        }))
    }
}
