//! What a build reports while it runs. The engine never prints: the CLI turns
//! these events into progress lines and bars.

use std::time::Duration;

/// Declares `Step` from one table: each step's variant, its stable name
/// and what the progress line says, spelled once. `Step::ALL`, `name`,
/// `describe` and `from_name` come from the same list, so none of them can
/// miss a step.
macro_rules! steps {
    ($($(#[$doc:meta])* $v:ident = $name:literal, $describe:literal;)*) => {
        /// The steps of a build, in the order they run. Deploying one
        /// version is `CreateOrig` through `InstallKernel` (`deploy`); the
        /// boot menu and the default flip come after it (`boot`), the flip
        /// last of the two. An upgrade (`upgrade::STEPS`) shares most of
        /// them and adds its own.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Step {
            $($(#[$doc])* $v,)*
        }

        impl Step {
            /// Every step, in declaration order.
            pub const ALL: &'static [Step] = &[$(Step::$v),*];

            /// Stable name used in the manifest's timings, the stop-point
            /// hook and the power-cut plan.
            pub fn name(self) -> &'static str {
                match self {
                    $(Step::$v => $name,)*
                }
            }

            pub fn describe(self) -> &'static str {
                match self {
                    $(Step::$v => $describe,)*
                }
            }
        }
    };
}

steps! {
    // Upgrade only.
    CleanDebris = "clean-debris", "cleaning up after killed runs";
    CheckImage = "check-image", "checking the image and the new rootfs";
    SnapshotOrig = "snapshot-orig", "snapshotting the default version's orig";
    SyncRootfs = "sync-rootfs", "synchronising orig with the new rootfs";
    MergeState = "merge-state", "applying the state-data policy";
    CommitVersion = "commit-version", "renaming the new version into place";
    // Build and upgrade, when the rootfs is a tar archive (first).
    ExtractRootfs = "extract-rootfs", "extracting the rootfs archive";
    // Build (and, from `Mount` on, upgrade too).
    CreateImage = "create-image", "creating sparse image";
    Mkfs = "mkfs", "making btrfs filesystem";
    Mount = "mount", "attaching and mounting image";
    CreateOrig = "create-orig", "creating subvolume for the system";
    CopyRootfs = "copy-rootfs", "copying rootfs into orig";
    CompleteFstab = "complete-fstab", "completing etc/fstab";
    MigrateState = "migrate-state", "moving state into state subvolumes";
    HashMoved = "hash-moved", "hashing moved files for the manifest";
    CheckMountpoints = "check-mountpoints", "checking mountpoints are empty";
    Snapshot = "snapshot", "snapshotting orig as run";
    InstallKernel = "install-kernel", "installing kernel and initramfs";
    WriteBootConfig = "write-boot-config", "writing extlinux.conf";
    // Upgrade only: the new version and the menu made durable (a full
    // btrfs commit) before the flip.
    Flush = "flush", "making the new version durable before the flip";
    SetDefault = "set-default", "setting the default version";
    InstallBootloader = "install-bootloader", "installing extlinux";
    // Rootless build only: the appliance VM's part (after `Mkfs`, which a
    // rootless build runs last, on the staged tree).
    Appliance = "appliance", "snapshotting run and installing extlinux (appliance VM)";
    Finish = "finish", "syncing, unmounting, detaching";
}

impl Step {
    /// The step whose `name` this is.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| s.name() == name)
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    StepStarted(Step),
    StepFinished(Step, Duration),
    /// Entries copied so far out of the total counted beforehand.
    CopyProgress {
        done: u64,
        total: u64,
    },
    /// Something the user should know that does not stop the build.
    Note(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Step` and `Step::ALL` come from one table (`progress::steps!`), so
    /// ALL has every variant by construction; what is left to break is a
    /// name: two steps sharing one, or a name that does not read back.
    #[test]
    fn every_step_name_reads_back() {
        for &s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s), "{s:?}");
        }
        let mut names: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Step::ALL.len(), "two steps share a name");
        assert_eq!(Step::from_name("no-such-step"), None);
    }
}
