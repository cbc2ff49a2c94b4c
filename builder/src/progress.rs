//! What a build reports while it runs. The engine never prints: the CLI turns
//! these events into progress lines and bars.

use std::time::Duration;

/// The steps of a build, in the order they run. Deploying one version is
/// `CreateOrig` through `InstallKernel` (`deploy`); the boot menu and the
/// default flip come after it (`boot`), the flip last of the two. An
/// upgrade (`upgrade::STEPS`) shares most of them and adds its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    // Upgrade only.
    CleanDebris,
    CheckImage,
    SnapshotOrig,
    SyncRootfs,
    MergeState,
    CommitVersion,
    // Build and upgrade, when the rootfs is a tar archive (first).
    ExtractRootfs,
    // Build (and, from `Mount` on, upgrade too).
    CreateImage,
    Mkfs,
    Mount,
    CreateOrig,
    CopyRootfs,
    CompleteFstab,
    MigrateState,
    HashMoved,
    CheckMountpoints,
    Snapshot,
    InstallKernel,
    WriteBootConfig,
    // Upgrade only: the new version and the menu made durable (a full
    // btrfs commit) before the flip.
    Flush,
    SetDefault,
    InstallBootloader,
    // Rootless build only: the appliance VM's part (after `Mkfs`, which a
    // rootless build runs last, on the staged tree).
    Appliance,
    Finish,
}

impl Step {
    /// Every step, for reading a name back (`from_name`).
    pub const ALL: [Step; 24] = [
        Step::CleanDebris,
        Step::CheckImage,
        Step::SnapshotOrig,
        Step::SyncRootfs,
        Step::MergeState,
        Step::CommitVersion,
        Step::CreateImage,
        Step::Mkfs,
        Step::Mount,
        Step::CreateOrig,
        Step::CopyRootfs,
        Step::CompleteFstab,
        Step::MigrateState,
        Step::HashMoved,
        Step::CheckMountpoints,
        Step::Snapshot,
        Step::InstallKernel,
        Step::WriteBootConfig,
        Step::Flush,
        Step::SetDefault,
        Step::InstallBootloader,
        Step::ExtractRootfs,
        Step::Appliance,
        Step::Finish,
    ];

    /// The step whose `name` this is.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl Step {
    pub fn describe(self) -> &'static str {
        match self {
            Step::CleanDebris => "cleaning up after killed runs",
            Step::CheckImage => "checking the image and the new rootfs",
            Step::SnapshotOrig => "snapshotting the default version's orig",
            Step::SyncRootfs => "synchronising orig with the new rootfs",
            Step::MergeState => "applying the state-data policy",
            Step::CommitVersion => "renaming the new version into place",
            Step::ExtractRootfs => "extracting the rootfs archive",
            Step::CreateImage => "creating sparse image",
            Step::Mkfs => "making btrfs filesystem",
            Step::Mount => "attaching and mounting image",
            Step::CreateOrig => "creating subvolume for the system",
            Step::CopyRootfs => "copying rootfs into orig",
            Step::CompleteFstab => "completing etc/fstab",
            Step::MigrateState => "moving state into state subvolumes",
            Step::HashMoved => "hashing moved files for the manifest",
            Step::CheckMountpoints => "checking mountpoints are empty",
            Step::Snapshot => "snapshotting orig as run",
            Step::InstallKernel => "installing kernel and initramfs",
            Step::WriteBootConfig => "writing extlinux.conf",
            Step::Flush => "making the new version durable before the flip",
            Step::SetDefault => "setting the default version",
            Step::InstallBootloader => "installing extlinux",
            Step::Appliance => "snapshotting run and installing extlinux (appliance VM)",
            Step::Finish => "syncing, unmounting, detaching",
        }
    }

    /// Stable name used in the manifest's timings.
    pub fn name(self) -> &'static str {
        match self {
            Step::CleanDebris => "clean-debris",
            Step::CheckImage => "check-image",
            Step::SnapshotOrig => "snapshot-orig",
            Step::SyncRootfs => "sync-rootfs",
            Step::MergeState => "merge-state",
            Step::CommitVersion => "commit-version",
            Step::ExtractRootfs => "extract-rootfs",
            Step::CreateImage => "create-image",
            Step::Mkfs => "mkfs",
            Step::Mount => "mount",
            Step::CreateOrig => "create-orig",
            Step::CopyRootfs => "copy-rootfs",
            Step::CompleteFstab => "complete-fstab",
            Step::MigrateState => "migrate-state",
            Step::HashMoved => "hash-moved",
            Step::CheckMountpoints => "check-mountpoints",
            Step::Snapshot => "snapshot",
            Step::InstallKernel => "install-kernel",
            Step::WriteBootConfig => "write-boot-config",
            Step::Flush => "flush",
            Step::SetDefault => "set-default",
            Step::InstallBootloader => "install-bootloader",
            Step::Appliance => "appliance",
            Step::Finish => "finish",
        }
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
