//! `strata upgrade`: argument parsing, progress and the summary line.

use super::exit;
use std::path::PathBuf;
use strata_builder::error::FailureKind;
use strata_builder::host::interrupt::Interrupt;
use strata_builder::layout::DEFAULT_LINK;
use strata_builder::migrate::Migration;
use strata_builder::size::human;
use strata_builder::steps::{UnsafeUpgrade, UNSAFE_UPGRADE_ENV};
use strata_builder::sync::StatePolicy;
use strata_builder::upgrade::{self, Target, UpgradeOptions, UpgradeSummary};
use strata_builder::{rootfs_tar, running};

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The image to upgrade in place (or --running).
    #[arg(
        required_unless_present_any = ["running", "list_steps"],
        conflicts_with = "running"
    )]
    image: Option<PathBuf>,
    /// Upgrade the strata system this runs in (as root, inside it): the
    /// new version goes beside the booted one, starting from its orig,
    /// and boots next time; the running system goes on. No manifest is
    /// kept unless --manifest is given.
    #[arg(long)]
    running: bool,
    /// Print the names of the upgrade's steps, one a line, in order (what
    /// STRATA_STOP_AFTER_STEP takes), and exit. With --rootfs and
    /// --no-default, those of that upgrade.
    #[arg(long)]
    list_steps: bool,
    /// The new root filesystem: a directory or a tar archive (plain or
    /// gzip/xz/zstd/bzip2, as mmdebstrap, docker export or tar make it).
    #[arg(long, required_unless_present = "list_steps")]
    rootfs: Option<PathBuf>,
    /// The new version's label: it lives in systems/<LABEL>/.
    #[arg(long, required_unless_present = "list_steps")]
    label: Option<String>,
    /// Extra kernel command line arguments for the new version, replacing
    /// those of the version it starts from (`--kernel-args ""`: none).
    /// Without it the new version keeps the current default's.
    #[arg(long)]
    kernel_args: Option<String>,
    /// `move` (default) leaves the new version's mountpoints empty; `copy`
    /// leaves the new rootfs's state data under them too, reproducing the
    /// 2014 upgrades' "mountpoint not empty" boot warnings.
    #[arg(long, value_enum, default_value_t = Migration::Move)]
    state_migration: Migration,
    /// What happens to the new rootfs's data under the state dirs: `merge`
    /// (default) adds what the live state lacks and overwrites nothing;
    /// `keep` leaves the state untouched. Either way the state stays
    /// authoritative and the summary and manifest list what was left out.
    #[arg(long, value_enum, default_value_t = StatePolicy::Merge)]
    state_data: StatePolicy,
    /// Add the version without making it the default.
    #[arg(long)]
    no_default: bool,
    /// The manifest to update (default: IMAGE.manifest.json, none with
    /// --running; started from the image's layout when it does not exist).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Upgrade even when the new fstab mounts something over data already
    /// in a live state subvolume (refused otherwise, naming the files):
    /// the data stays in the image, hidden, and `inspect --lint` names it.
    #[arg(long)]
    allow_hidden_state: bool,
}

pub fn run(args: UpgradeArgs) -> u8 {
    if args.list_steps {
        let tar = match &args.rootfs {
            None => false,
            Some(r) => match rootfs_tar::classify(r) {
                Ok(i) => matches!(i, rootfs_tar::RootfsInput::Tar(_)),
                Err(e) => return exit::fail_with(FailureKind::Input, &anyhow::anyhow!("{e}")),
            },
        };
        for name in upgrade::step_names(tar, !args.no_default) {
            println!("{name}");
        }
        return exit::SUCCESS;
    }
    // Loud, before anything: an upgrade that is not crash-safe on purpose.
    if let Ok(Some(m)) = UnsafeUpgrade::from_env() {
        eprintln!(
            "WARNING: {UNSAFE_UPGRADE_ENV}={}: TEST-ONLY UNSAFE MODE, this upgrade is NOT crash-safe \
             (a power cut can leave the system unbootable). Unset it unless you are testing strata.",
            m.name()
        );
    }
    // First, while strata has one thread: the mounts of a --running
    // upgrade happen in a private mount namespace (`running::enter`).
    let (target, shown, again) = match (args.running, args.image) {
        (true, _) => match running::enter() {
            Ok(r) => {
                let shown = format!(
                    "the running system ({}, booted {})",
                    r.device.display(),
                    r.booted
                );
                (Target::Running(r), shown, "--running".to_owned())
            }
            Err(e) => return exit::fail(e),
        },
        (false, Some(image)) => {
            let shown = image.display().to_string();
            (Target::Image(image), shown.clone(), shown)
        }
        (false, None) => unreachable!("clap requires IMAGE or --running"),
    };
    let opts = UpgradeOptions {
        rootfs: args.rootfs.expect("clap requires --rootfs"),
        label: args.label.expect("clap requires --label"),
        kernel_args: args.kernel_args,
        migration: args.state_migration,
        state_data: args.state_data,
        set_default: !args.no_default,
        manifest: args.manifest,
        allow_hidden_state: args.allow_hidden_state,
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
    let result = upgrade::upgrade_target(&target, &opts, &interrupt, &mut |e| ui.event(e));
    ui.finish();
    match result {
        Ok(s) => {
            println!("{}", summary(&shown, &again, &s));
            0
        }
        Err(e) => exit::fail(e),
    }
}

/// The first few paths of a list, for one line.
fn first_few(paths: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = paths
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > SHOWN {
        s.push_str(", …");
    }
    s
}

fn count(paths: &[String], what: &str) -> String {
    if paths.is_empty() {
        format!("0 {what}")
    } else {
        format!("{} {what} ({})", paths.len(), first_few(paths))
    }
}

/// `image`: what was upgraded, as shown; `again`: how a next command
/// names it (the image, or `--running`).
fn summary(image: &str, again: &str, s: &UpgradeSummary) -> String {
    let default = if s.is_default {
        "now the default".to_owned()
    } else {
        format!(
            "not the default ({} still names {}; `strata set-default {again} {}` boots it)",
            DEFAULT_LINK, s.default_before, s.label
        )
    };
    let manifest = match &s.manifest {
        Some(m) => format!(
            "manifest {}{}",
            m.display(),
            if s.manifest_created {
                " (new: read off the image)"
            } else {
                ""
            }
        ),
        None => "no manifest (--running keeps one only with --manifest PATH)".to_owned(),
    };
    let kernel_args = match (s.kernel_args.is_empty(), s.kernel_args_kept) {
        (true, _) => String::new(),
        (false, true) => format!(
            "; kernel args {:?} (kept from {})",
            s.kernel_args, s.based_on
        ),
        (false, false) => format!("; kernel args {:?}", s.kernel_args),
    };
    format!(
        "upgraded {image}: version {} (from {}) is {default}{kernel_args}; {} written ({} new, {} changed, {} removed files); state data ({}): {}, {}; {manifest}",
        s.label,
        s.based_on,
        human(s.bytes_written),
        s.sync.created.len(),
        s.sync.updated.len(),
        s.sync.deleted.len(),
        s.state_data.policy,
        count(&s.state_data.merged, "merged"),
        count(&s.state_data.left_out, "left out"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_builder::manifest::{Deployment, StateData, StateDirs, VersionRecord};
    use strata_builder::sync::SyncReport;

    fn summary_of(is_default: bool, merged: &[&str], left_out: &[&str]) -> UpgradeSummary {
        summary_with_args(is_default, merged, left_out, "", true)
    }

    fn summary_with_args(
        is_default: bool,
        merged: &[&str],
        left_out: &[&str],
        kernel_args: &str,
        kept: bool,
    ) -> UpgradeSummary {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let state_data = StateData {
            policy: "merge".into(),
            merged: strings(merged),
            left_out: strings(left_out),
        };
        UpgradeSummary {
            label: "v2".into(),
            based_on: "factory".into(),
            default_before: "factory".into(),
            is_default,
            kernel_args: kernel_args.into(),
            kernel_args_kept: kept,
            sync: SyncReport {
                created: strings(&["/usr/bin/new-tool"]),
                updated: strings(&["/etc/fstab", "/usr/bin/changed"]),
                deleted: strings(&["/usr/bin/removed"]),
                bytes_written: 1 << 20,
                ..SyncReport::default()
            },
            bytes_written: (1 << 20) + 18,
            state_data: state_data.clone(),
            manifest: Some("/var/tmp/sys.img.manifest.json".into()),
            manifest_created: !is_default,
            record: VersionRecord {
                label: "v2".into(),
                deployed_by: Deployment::Upgrade,
                based_on: Some("factory".into()),
                deployed_at: 0,
                root_device: "/dev/vda".into(),
                state_dirs: StateDirs {
                    created: vec![],
                    skipped: vec![],
                },
                fstab_lines_added: vec![],
                state_migration: "move".into(),
                state_data: Some(state_data),
                moved_files: vec![],
                kernel: "systems/v2/kernel".into(),
                initramfs: None,
                kernel_source: "/boot/vmlinuz".into(),
                initramfs_source: None,
                kernel_args: String::new(),
                timings: vec![],
                backend: None,
            },
        }
    }

    #[test]
    fn summary_lines() {
        insta::assert_snapshot!(
            "default",
            summary(
                "/var/tmp/sys.img",
                "/var/tmp/sys.img",
                &summary_of(true, &["/var/lib/newpkg", "/var/lib/newpkg/state"], &[])
            )
        );
        insta::assert_snapshot!(
            "not-default",
            summary(
                "/var/tmp/sys.img",
                "/var/tmp/sys.img",
                &summary_of(
                    false,
                    &[],
                    &[
                        "/home/alice",
                        "/home/alice/notes",
                        "/var/lib/db",
                        "/var/lib/db/data"
                    ]
                )
            )
        );
    }

    /// The running system: named as such, no manifest, and the next
    /// command said with --running.
    #[test]
    fn summary_of_a_running_upgrade() {
        let mut s = summary_of(false, &[], &[]);
        s.manifest = None;
        s.default_before = "v1".into();
        let line = summary(
            "the running system (/dev/vda, booted factory)",
            "--running",
            &s,
        );
        assert!(
            line.starts_with(
                "upgraded the running system (/dev/vda, booted factory): version v2 (from factory)"
            ),
            "{line}"
        );
        assert!(
            line.contains(
                "systems/default still names v1; `strata set-default --running v2` boots it"
            ),
            "{line}"
        );
        assert!(
            line.ends_with("no manifest (--running keeps one only with --manifest PATH)"),
            "{line}"
        );
    }

    #[test]
    fn summary_names_the_kernel_args_used() {
        let line = |args: &str, kept: bool| {
            summary(
                "/var/tmp/sys.img",
                "/var/tmp/sys.img",
                &summary_with_args(true, &[], &[], args, kept),
            )
        };
        insta::assert_snapshot!("kernel-args-kept", line("console=ttyS0 quiet", true));
        assert!(line("loglevel=3", false).contains("; kernel args \"loglevel=3\"; "));
        // None (kept or given empty): nothing said, as before.
        assert!(!line("", true).contains("kernel args"));
        assert!(!line("", false).contains("kernel args"));
    }
}
