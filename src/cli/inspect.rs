//! `strata inspect IMG [--json]` prints an image's layout; `strata inspect
//! --lint IMG [--json] [--all]` lists the files hidden under mountpoints of
//! every version's orig and run.
//!
//! Exit codes: 0 (lint: clean), 1 (lint: hidden files found), 2 bad input
//! (missing image, not Btrfs, not a strata layout for --lint), 3 the tools
//! failed (losetup, mount, btrfs).

use crate::inspect::{image, render, scan};
use std::path::PathBuf;

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
    let opened = match image::open(&args.image) {
        Ok(o) => o,
        Err(image::OpenError::BadInput(m)) => return super::fail(2, &anyhow::anyhow!(m)),
        Err(image::OpenError::Infra(e)) => return super::fail(3, &e),
    };
    let shown = args.image.display().to_string();
    let top = opened.top().to_path_buf();
    let (code, out) = if args.lint {
        if !top.join("systems").is_dir() {
            drop(opened);
            return super::fail(
                2,
                &anyhow::anyhow!(
                    "{shown}: no systems/ directory at the top level: not a strata system layout"
                ),
            );
        }
        let lint = scan::lint(&top, &shown, &opened.subvolumes);
        let out = if args.json {
            serde_json::to_string_pretty(&lint).expect("serialisable") + "\n"
        } else {
            render::lint(&lint, args.all)
        };
        (u8::from(!lint.clean), out)
    } else {
        let layout = scan::read_layout(
            &top,
            &shown,
            opened.filesystem.clone(),
            opened.subvolumes.clone(),
        );
        let out = if args.json {
            serde_json::to_string_pretty(&layout).expect("serialisable") + "\n"
        } else {
            render::layout(&layout)
        };
        (0, out)
    };
    if let Err(e) = opened.close() {
        return super::fail(3, &e.context("cleaning up the read-only mount"));
    }
    print!("{out}");
    code
}
