//! `strata versions IMG [--json]`, `strata set-default IMG LABEL` and
//! `strata remove IMG LABEL`: the versions of an image (layout.md §6).
//! With `--running` instead of IMG, of the strata system strata runs in
//! (its device, `strata_builder::running`); `remove --running` refuses the
//! booted version. A manifest is used there only when --manifest names it.
//!
//! Exit codes: 0 done, 2 refused or bad input (nothing changed: unknown
//! label, the default version for remove, a partial version for
//! set-default, not a strata image, a manifest of another image, the image
//! in use: another command holds its lock, or a loop device strata did not
//! attach is bound to it), 3 the tools failed (mount, btrfs).

use super::exit;
use std::fmt::Write;
use std::path::PathBuf;
use strata_builder::image::ImageError;
use strata_builder::running::{self, Running};
use strata_builder::size::human;
use strata_builder::versions::{self, Status, Versions};

#[derive(clap::Args)]
pub struct VersionsArgs {
    /// The image (a raw whole-disk Btrfs file, or a block device).
    #[arg(required_unless_present = "running", conflicts_with = "running")]
    image: Option<PathBuf>,
    /// The strata system this runs in, instead of an image.
    #[arg(long)]
    running: bool,
    /// Print JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct SetDefaultArgs {
    /// The image (or --running: LABEL alone).
    #[arg(required_unless_present = "running")]
    image: Option<PathBuf>,
    /// The version to boot from now on (rollback or roll-forward).
    /// Required; with --running the only word (clap fills IMAGE first,
    /// `image_and_label` sorts them out).
    label: Option<String>,
    /// The strata system this runs in, instead of an image.
    #[arg(long)]
    running: bool,
    /// The manifest to update (default: IMAGE.manifest.json, when it exists).
    #[arg(long)]
    manifest: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RemoveArgs {
    /// The image (or --running: LABEL alone).
    #[arg(required_unless_present = "running")]
    image: Option<PathBuf>,
    /// The version to delete (not the default one, nor the booted one).
    /// Required; with --running the only word.
    label: Option<String>,
    /// The strata system this runs in, instead of an image.
    #[arg(long)]
    running: bool,
    /// The manifest to update (default: IMAGE.manifest.json, when it exists).
    #[arg(long)]
    manifest: Option<PathBuf>,
}

fn finish(r: Result<String, ImageError>) -> u8 {
    match r {
        Ok(out) => {
            print!("{out}");
            exit::SUCCESS
        }
        Err(e) => exit::fail(e),
    }
}

/// What a command works on: the image, or the running system's device
/// (its mounts then in a private namespace, `running::enter`).
enum On {
    Image(PathBuf),
    Running(Running),
}

impl On {
    fn path(&self) -> &std::path::Path {
        match self {
            On::Image(p) => p,
            On::Running(r) => &r.device,
        }
    }
}

fn on(image: Option<PathBuf>, running: bool) -> Result<On, ImageError> {
    match (running, image) {
        (true, _) => running::enter().map(On::Running),
        (false, Some(i)) => Ok(On::Image(i)),
        (false, None) => Err(ImageError::Input("give an IMAGE or --running".into())),
    }
}

/// `strata set-default --running v1` puts the label where IMAGE goes:
/// clap fills positionals in order, so the one word is the IMAGE field.
fn image_and_label(
    image: Option<PathBuf>,
    label: Option<String>,
    running: bool,
) -> Result<(Option<PathBuf>, String), ImageError> {
    match (running, image, label) {
        (true, Some(l), None) => Ok((None, l.to_string_lossy().into_owned())),
        (true, Some(i), Some(_)) => Err(ImageError::Input(format!(
            "--running works on the system this runs in: give LABEL alone, not the image {}",
            i.display()
        ))),
        (_, i, Some(l)) => Ok((i, l)),
        (_, _, None) => Err(ImageError::Input("give the version's LABEL".into())),
    }
}

pub fn list(args: VersionsArgs) -> u8 {
    let target = match on(args.image, args.running) {
        Ok(t) => t,
        Err(e) => return exit::fail(e),
    };
    finish(versions::list_all(target.path()).map(|v| {
        if args.json {
            serde_json::to_string_pretty(&v).expect("serialisable") + "\n"
        } else {
            table(&v)
        }
    }))
}

pub fn set_default(args: SetDefaultArgs) -> u8 {
    let (target, label) = match image_and_label(args.image, args.label, args.running)
        .and_then(|(i, l)| Ok((on(i, args.running)?, l)))
    {
        Ok(t) => t,
        Err(e) => return exit::fail(e),
    };
    finish(
        versions::set_default(target.path(), &label, args.manifest.as_deref())
            .map(|()| format!("default version: {label}\n")),
    )
}

pub fn remove(args: RemoveArgs) -> u8 {
    let (target, label) = match image_and_label(args.image, args.label, args.running)
        .and_then(|(i, l)| Ok((on(i, args.running)?, l)))
    {
        Ok(t) => t,
        Err(e) => return exit::fail(e),
    };
    let removed = match &target {
        On::Image(image) => versions::remove(image, &label, args.manifest.as_deref()),
        On::Running(r) => versions::remove_running(r, &label, args.manifest.as_deref()),
    };
    finish(removed.map(|()| format!("removed version {label}\n")))
}

/// The table `strata versions` prints.
pub fn table(v: &Versions) -> String {
    let mut rows = vec![[
        "LABEL".to_owned(),
        "DEFAULT".to_owned(),
        "KERNEL".to_owned(),
        "UNSHARED".to_owned(),
        "DEPLOYED".to_owned(),
        "STATUS".to_owned(),
    ]];
    for i in &v.versions {
        let kernel = match (&i.kernel.version, i.kernel.bytes) {
            (Some(name), Some(b)) => format!("{name} ({})", human(b)),
            (None, Some(b)) => format!("? ({})", human(b)),
            (_, None) => "missing".to_owned(),
        };
        rows.push([
            i.label.clone(),
            if i.default { "*" } else { "" }.to_owned(),
            kernel,
            i.unshared_bytes.map(human).unwrap_or_else(|| "-".into()),
            i.deployed_at.clone().unwrap_or_else(|| "-".into()),
            match i.status {
                Status::Whole => "whole",
                Status::Partial => "PARTIAL",
            }
            .to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut o = String::new();
    if v.versions.is_empty() {
        let _ = writeln!(o, "no versions");
    } else {
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(o, "{}", line.join("  ").trim_end());
        }
    }
    for i in v.versions.iter().filter(|i| !i.problems.is_empty()) {
        let _ = writeln!(o, "\n{} is partial (strata remove deletes it):", i.label);
        for p in &i.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    if v.default.is_none() && !v.versions.is_empty() {
        let _ = writeln!(o, "\nno default version: systems/default names none");
    }
    if !v.debris.is_empty() {
        let _ = writeln!(o, "\nleft by an interrupted strata (not versions):");
        for d in &v.debris {
            let _ = writeln!(o, "  {d}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_builder::versions::{KernelInfo, VersionInfo};

    fn version(label: &str, default: bool) -> VersionInfo {
        VersionInfo {
            label: label.into(),
            default,
            kernel: KernelInfo {
                version: Some("6.1.0-28-amd64".into()),
                bytes: Some(8_250_000),
            },
            unshared_bytes: Some(1_200_000),
            deployed_at: Some("2026-11-27T01:30:15Z".into()),
            status: Status::Whole,
            problems: vec![],
            initramfs_bytes: Some(30_000_000),
        }
    }

    fn two_versions() -> Versions {
        let mut v2 = version("v2", true);
        v2.unshared_bytes = Some(3_400_000);
        v2.deployed_at = Some("2026-11-28T09:02:44Z".into());
        Versions {
            default: Some("v2".into()),
            versions: vec![version("factory", false), v2],
            debris: vec![],
        }
    }

    #[test]
    fn table_of_two_versions() {
        insta::assert_snapshot!(table(&two_versions()));
    }

    #[test]
    fn table_with_a_partial_version_and_debris() {
        let mut v = two_versions();
        v.versions.push(VersionInfo {
            label: "v3".into(),
            default: false,
            kernel: KernelInfo {
                version: None,
                bytes: None,
            },
            unshared_bytes: Some(0),
            deployed_at: Some("2026-11-29T10:00:00Z".into()),
            status: Status::Partial,
            problems: vec![
                "systems/v3/run is missing".into(),
                "systems/v3/kernel is missing".into(),
            ],
            initramfs_bytes: None,
        });
        v.debris = vec!["systems/.strata-partial-v4".into()];
        insta::assert_snapshot!(table(&v));
    }

    #[test]
    fn json_shape() {
        insta::assert_json_snapshot!(two_versions());
    }
}
