//! Real-VM scenarios for `strata test`. They boot the image named by
//! STRATA_TEST_IMAGE (its manifest next to it, IMG.manifest.json); `ci/test`
//! builds the Debian fixture image and sets it. Without it these tests FAIL:
//! a silently skipped VM test proves nothing.
//!
//! Broken variants are made per test from a sparse/reflinked copy edited
//! through a loop mount (root needed, as in CI). At most two VMs run at once
//! (this machine has two cores), and scenarios that do not need the reboot
//! and power cut leave out `persistence` to keep the suite within budget.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use strata_builder::error::{Failure, FailureKind};
use strata_builder::expect::Expectations;
use strata_builder::manifest::Manifest;
use strata_vmtest::accel::AccelChoice;
use strata_vmtest::checks::user::{UserCheck, When};
use strata_vmtest::checks::CheckId;
use strata_vmtest::qemu::BootMode;
use strata_vmtest::qemu::{Accel, DiskBus};
use strata_vmtest::report::{Report, Status};
use strata_vmtest::run::{self, RunError, Scenario, TestConfig};

// ------------------------------------------------------------ fixtures

fn fixture() -> (PathBuf, PathBuf, Manifest) {
    let image = std::env::var_os("STRATA_TEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "STRATA_TEST_IMAGE is not set: these tests boot a real image. Run ci/test, \
             or build one (strata fixture debian --output R && strata build --rootfs R \
             --output IMG --size 4G) and export STRATA_TEST_IMAGE=IMG"
            )
        });
    assert!(
        image.is_file(),
        "STRATA_TEST_IMAGE={} does not exist",
        image.display()
    );
    let manifest_path = Manifest::default_path(&image);
    let manifest = Manifest::load(&manifest_path)
        .unwrap_or_else(|e| panic!("STRATA_TEST_IMAGE's manifest: {e}"));
    (image, manifest_path, manifest)
}

/// Two VMs at a time, whatever the test harness's thread count.
struct VmSlots {
    free: Mutex<usize>,
    cv: Condvar,
}

static SLOTS: VmSlots = VmSlots {
    free: Mutex::new(2),
    cv: Condvar::new(),
};

struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut free = SLOTS.free.lock().unwrap();
        while *free == 0 {
            free = SLOTS.cv.wait(free).unwrap();
        }
        *free -= 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.free.lock().unwrap() += 1;
        SLOTS.cv.notify_one();
    }
}

/// Copies of one image share its filesystem UUID; this kernel refuses to
/// mount two of them at once, so edits take turns.
static MOUNT_LOCK: Mutex<()> = Mutex::new(());

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A copy of the fixture image in a temp dir, for breaking.
struct Broken {
    dir: tempfile::TempDir,
    image: PathBuf,
}

impl Broken {
    fn new(name: &str) -> Broken {
        let (src, _, _) = fixture();
        let dir = tempfile::Builder::new()
            .prefix(&format!("strata-vmtest-{name}."))
            .tempdir()
            .unwrap();
        let image = dir.path().join(format!("{name}.img"));
        sh(
            "cp",
            &[
                "--reflink=auto",
                "--sparse=always",
                src.to_str().unwrap(),
                image.to_str().unwrap(),
            ],
        );
        Broken { dir, image }
    }

    /// Runs `edit` with the image's top-level subvolume mounted at the path
    /// it is given; unmounts and detaches the loop device on every path out.
    fn edit(&self, edit: impl FnOnce(&Path)) {
        let _turn = MOUNT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mnt = self.dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let loopdev = sh(
            "losetup",
            &["--find", "--show", self.image.to_str().unwrap()],
        );
        struct Guard<'a> {
            mnt: &'a Path,
            loopdev: String,
            mounted: bool,
        }
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if self.mounted {
                    let _ = Command::new("umount").arg(self.mnt).status();
                }
                let _ = Command::new("btrfs")
                    .args(["device", "scan", "--forget", &self.loopdev])
                    .status();
                let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
            }
        }
        let mut g = Guard {
            mnt: &mnt,
            loopdev: loopdev.clone(),
            mounted: false,
        };
        sh(
            "mount",
            &["-o", "subvolid=5", &loopdev, mnt.to_str().unwrap()],
        );
        g.mounted = true;
        edit(&mnt);
        sh("sync", &[]);
    }
}

fn config(image: &Path, manifest: &Path) -> TestConfig {
    let m = Manifest::load(manifest).unwrap_or_else(|e| panic!("{e}"));
    let expect = Expectations::from_manifest(&m, manifest.to_owned(), None).unwrap();
    let mut cfg = TestConfig::new(image.to_owned(), expect);
    cfg.accel = AccelChoice::Tcg;
    cfg.timeout = Duration::from_secs(420);
    // Two VMs run at once on this two-core machine: one vCPU each, and one
    // guest per test (the power cut after the reboot); the first test
    // below boots them side by side.
    cfg.cpus = 1;
    cfg.power_cut_beside = false;
    cfg
}

/// One boot: no persistence, and no shutdown (judging a shutdown takes
/// the clean reboot too). Each has its own tests.
fn without_persistence(cfg: &mut TestConfig) {
    cfg.checks
        .retain(|c| *c != CheckId::Persistence && *c != CheckId::Shutdown);
}

struct Outcome {
    result: Result<Report, RunError>,
    seconds: f64,
    _artifacts: tempfile::TempDir,
    artifacts: PathBuf,
}

fn boot(mut cfg: TestConfig) -> Outcome {
    let artifacts = tempfile::Builder::new()
        .prefix("strata-vmtest-artifacts.")
        .tempdir()
        .unwrap();
    cfg.artifacts = Some(artifacts.path().to_owned());
    let _slot = Slot::take();
    let t = Instant::now();
    let result = run::run_blocking(cfg, |p| eprintln!("  {p:?}"));
    Outcome {
        result,
        seconds: t.elapsed().as_secs_f64(),
        artifacts: artifacts.path().to_owned(),
        _artifacts: artifacts,
    }
}

fn report(o: &Outcome) -> &Report {
    match &o.result {
        Ok(r) => {
            eprintln!("{}", r.to_table());
            r
        }
        Err(e) => panic!(
            "expected a verdict, got an infrastructure failure: {e}\n(artifacts {})",
            o.artifacts.display()
        ),
    }
}

fn failing(r: &Report) -> Vec<&str> {
    r.checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name.as_str())
        .collect()
}

fn check<'a>(r: &'a Report, name: &str) -> &'a strata_vmtest::report::CheckResult {
    r.checks.iter().find(|c| c.name == name).unwrap()
}

fn evidence_has(r: &Report, name: &str, needle: &str) -> bool {
    let c = check(r, name);
    c.detail.contains(needle) || c.evidence.iter().any(|e| e.contains(needle))
}

// ------------------------------------------------------- the good image

#[test]
fn fixture_passes_every_check_via_extlinux_on_virtio_blk_with_auto_accel() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.accel = AccelChoice::Auto;
    cfg.power_cut_beside = true;
    // Every built-in check runs: the state contract needs paths.
    cfg.preserve = vec!["/root".into(), "/etc/fstab".into()];
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), Vec::<&str>::new());
    assert!(r.checks.iter().all(|c| c.status == Status::Pass));
    // The power cut's disk booted beside the clean reboot, on its own console.
    assert_eq!(r.boot_log[2].beside, Some(2), "{:?}", r.boot_log);
    assert!(o
        .artifacts
        .join("serial-power-cut.log")
        .metadata()
        .is_ok_and(|m| m.len() > 0));
    assert_eq!(run::failure(r), None);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(!r.accel_reason.is_empty());
    if r.accel == Accel::Tcg && std::path::Path::new("/dev/kvm").exists() {
        // On a host whose KVM hangs guests, auto gives up on it at the
        // bound (and a host that aborts or stops the guest, sooner).
        let bound = strata_vmtest::accel::KVM_KERNEL_WITHIN.as_secs_f64() + 15.0;
        assert!(
            r.timings.accel_probe < bound,
            "the abandoned KVM attempt took {}",
            r.timings.accel_probe
        );
    }
    let t = &r.timings;
    assert!(
        t.firmware.is_some() && t.kernel.is_some() && t.userspace.is_some(),
        "{t:?}"
    );
    for f in [
        "serial.log",
        "journal-boot1.json",
        "journal-boot2.json",
        "journal-boot3.json",
        "qmp-events.json",
        "qemu-command.txt",
        "qemu-command-later.txt",
        "report.json",
    ] {
        let p = o.artifacts.join(f);
        assert!(
            p.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "artifact {f}"
        );
    }
    let events = std::fs::read_to_string(o.artifacts.join("qmp-events.json")).unwrap();
    // The guest's own reset ended the reboot: QEMU exited at it (SHUTDOWN,
    // reason guest-reset) and boot 2 was a direct kernel boot.
    assert!(
        events.contains("\"guest-reset\""),
        "the clean reboot is in the event log"
    );
    let via: Vec<BootMode> = r.boot_log.iter().map(|b| b.via).collect();
    assert_eq!(
        via,
        [BootMode::Extlinux, BootMode::Direct, BootMode::Direct],
        "boot 1 proves extlinux, the later boots are direct"
    );
    assert_eq!(r.later_boots_fallback, None);
    let later = std::fs::read_to_string(o.artifacts.join("qemu-command-later.txt")).unwrap();
    assert!(later.contains(" -kernel "), "{later}");
    assert!(
        events.contains("host-qmp-quit"),
        "the power cut is in the event log"
    );
    // The image under test is never written.
    assert_image_untouched(&image);
}

#[test]
fn fixture_passes_every_check_via_direct_boot_on_virtio_scsi() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.boot = BootMode::Direct;
    cfg.disk_bus = DiskBus::VirtioScsi;
    // A harmless scenario: the run saves its booted guest before the
    // reboots, then goes on on a new overlay; the reboots and the power
    // cut must not notice, and a restore must work with QEMU's -kernel
    // loader and virtio-scsi in the saved state.
    cfg.scenarios = vec![Scenario {
        name: "noop".into(),
        commands: vec!["true".into()],
        checks: vec![CheckId::Root, CheckId::StateMounts],
        user_checks: vec![],
    }];
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), Vec::<&str>::new());
    assert!(r
        .checks
        .iter()
        .all(|c| c.status == Status::Pass || c.name == "state-contract"));
    assert_eq!(
        check(r, "state-contract").detail,
        "no [state] preserve paths to hold to"
    );
    assert_eq!(r.boots, 3, "the scenario's restore is no boot");
    assert_eq!(r.scenarios.len(), 1);
    assert!(r.timings.save > 0.0);
    // Under virtio-scsi the guest sees /dev/sda: the UUID root still boots.
    assert!(
        evidence_has(r, "root", "/dev/sda"),
        "{:?}",
        check(r, "root")
    );
    let cmd = std::fs::read_to_string(o.artifacts.join("qemu-command.txt")).unwrap();
    assert!(
        cmd.contains(" -kernel ") && cmd.contains("scsi-hd"),
        "{cmd}"
    );
}

/// The other two boot/bus combinations, without the two extra boots of
/// persistence (proven above on both buses): SeaBIOS must boot extlinux from
/// virtio-scsi, and the direct-boot command line must work on virtio-blk.
#[test]
fn fixture_passes_via_extlinux_on_virtio_scsi() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.disk_bus = DiskBus::VirtioScsi;
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), Vec::<&str>::new());
    assert_eq!(check(r, "persistence").status, Status::Skip);
    assert!(
        evidence_has(r, "root", "/dev/sda"),
        "{:?}",
        check(r, "root")
    );
}

#[test]
fn fixture_passes_via_direct_boot_on_virtio_blk() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.boot = BootMode::Direct;
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), Vec::<&str>::new());
    assert!(
        evidence_has(r, "root", "/dev/vda"),
        "{:?}",
        check(r, "root")
    );
}

fn assert_image_untouched(image: &Path) {
    // qemu-img refuses to open an image another process holds a write lock on;
    // beyond that, the overlay design means QEMU never opened it writable.
    // What we can check cheaply: it is still a raw file with its size.
    let (src, _, m) = fixture();
    assert_eq!(src, image);
    assert_eq!(std::fs::metadata(image).unwrap().len(), m.image_size);
}

// ---------------------------------------------------- broken variants

#[test]
fn state_line_removed_from_fstab_fails_state_mounts() {
    let (_, manifest_path, m) = fixture();
    let b = Broken::new("no-srv-line");
    b.edit(|top| {
        let fstab = top.join(format!("systems/{}/run/etc/fstab", m.default));
        let text = std::fs::read_to_string(&fstab).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("subvol=/state/srv") || l.trim_start().starts_with('#'))
            .collect();
        assert_eq!(
            kept.len() + 1,
            text.lines().count(),
            "exactly one /srv line"
        );
        std::fs::write(&fstab, kept.join("\n") + "\n").unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    // /srv's moved files are invisible without the mount: both checks say so.
    assert_eq!(failing(r), ["state-mounts", "moved-files"]);
    assert_eq!(
        check(r, "state-mounts").detail,
        "not mounted as expected: /srv"
    );
    assert!(
        evidence_has(r, "moved-files", "/srv/"),
        "{:?}",
        check(r, "moved-files")
    );
    assert_eq!(run::failure(r), Some(FailureKind::Failed));
}

/// Replaces `systems/<label>/run/etc/fstab` through `change(text)`.
fn edit_run_fstab(b: &Broken, label: &str, change: impl FnOnce(&str) -> String) {
    b.edit(|top| {
        let fstab = top.join(format!("systems/{label}/run/etc/fstab"));
        let text = std::fs::read_to_string(&fstab).unwrap();
        std::fs::write(&fstab, change(&text)).unwrap();
    });
}

#[test]
fn an_fstab_entry_that_cannot_mount_fails_fstab() {
    let (_, manifest_path, m) = fixture();
    let b = Broken::new("bad-entry");
    // nofail: the boot goes on (no emergency mode), the mount unit fails.
    let line = format!(
        "UUID={} /mnt/broken btrfs subvol=/state/does-not-exist,nofail 0 2\n",
        m.fs_uuid
    );
    edit_run_fstab(&b, &m.default, |t| format!("{t}{line}"));
    let mut cfg = config(&b.image, &manifest_path);
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    // The mount unit that failed is a failed unit of the boot as well.
    assert_eq!(failing(r), ["fstab", "boot-health"]);
    assert!(
        evidence_has(r, "fstab", "/mnt/broken"),
        "{:?}",
        check(r, "fstab")
    );
    assert!(
        evidence_has(r, "boot-health", "mnt-broken.mount"),
        "{:?}",
        check(r, "boot-health")
    );
    assert_eq!(run::failure(r), Some(FailureKind::Failed));
}

#[test]
fn moved_file_mode_changed_in_state_fails_moved_files() {
    use std::os::unix::fs::PermissionsExt;
    let (_, manifest_path, _) = fixture();
    let b = Broken::new("mode");
    b.edit(|top| {
        let keys = top.join("state/root/.ssh/authorized_keys");
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), ["moved-files"]);
    assert!(
        evidence_has(
            r,
            "moved-files",
            "/root/.ssh/authorized_keys: mode 0644, expected 0600"
        ),
        "{:?}",
        check(r, "moved-files")
    );
    assert_eq!(run::failure(r), Some(FailureKind::Failed));
}

/// Changes whose subject exists after boot, each made in its own restore of
/// the guest saved after the first boot's checks, and judged there: seconds
/// each instead of a boot and an image each, and a scenario may reboot its
/// own guest. Each scenario's check must fail for its own reason; the first
/// boot's rows pass. (A moved file's mode changed after boot is NOT such a
/// change: moved-files forgives what the running system rewrote since boot,
/// so that test above edits the image.)
#[test]
fn changes_in_the_running_guest_fail_the_checks_that_judge_them() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    without_persistence(&mut cfg);
    let scenario = |name: &str, commands: &[&str], checks: &[CheckId]| Scenario {
        name: name.into(),
        commands: commands.iter().map(|c| c.to_string()).collect(),
        checks: checks.to_vec(),
        user_checks: vec![],
    };
    cfg.scenarios = vec![
        // A command that takes the guest agent away: that scenario's
        // infrastructure failure, reported as its own; the scenarios after
        // it still run and report, and the run ends with exit 3.
        scenario(
            "agent-gone",
            &["systemctl stop qemu-guest-agent"],
            &[CheckId::Root],
        ),
        // Files written into run's /var and /srv under their mounts: the
        // journal has no notice of them, only looking finds them.
        scenario(
            "hidden",
            &[
                "mkdir -p /run/strata-below && mount --bind / /run/strata-below",
                "echo stale copy > /run/strata-below/var/left-behind.txt",
                "mkdir -p /run/strata-below/srv/www && echo '<p>hidden</p>' > /run/strata-below/srv/www/dropped.html",
                "umount /run/strata-below",
            ],
            &[CheckId::Overmount],
        ),
        // Two state dirs broken two ways in one guest (one reboot and
        // power cut for both). A tmpfs for /srv: no longer the state
        // subvolume, the files moved there are out of sight, and what is
        // written there is gone after a reboot: what persistence exists
        // to catch. (In its place, not stacked on it: systemd's shutdown
        // hangs on a stacked /srv, measured; an fstab tmpfs line makes
        // the same.) And /home read-only: an image defect found while
        // checking is a verdict naming the check, not an infrastructure
        // failure.
        scenario(
            "broken",
            &[
                "umount /srv && mount -t tmpfs tmpfs /srv",
                "mount -o remount,bind,ro /home",
            ],
            &[CheckId::StateMounts, CheckId::MovedFiles, CheckId::Persistence],
        ),
    ];
    let o = boot(cfg);
    let r = match &o.result {
        Err(RunError::Infra {
            message,
            report: Some(r),
        }) => {
            assert!(
                message.starts_with("scenario agent-gone: ")
                    && message.contains("the guest agent went away"),
                "{message}"
            );
            eprintln!("{}", r.to_table());
            r
        }
        other => panic!("expected exit 3 with the whole report, got {other:?}"),
    };
    assert_eq!(
        failing(r),
        [
            "hidden/overmount",
            "broken/state-mounts",
            "broken/moved-files",
            "broken/persistence",
        ]
    );
    // Each scenario started from the saved guest (hidden's files are not
    // in broken's), the run itself booted once, and broken's persistence
    // rebooted its own guest and cut its power.
    assert_eq!(r.boots, 3, "{:?}", r.boot_log);
    let whose: Vec<&str> = r.boot_log.iter().map(|b| b.why.as_str()).collect();
    assert!(
        whose[0] == "first boot"
            && whose[1..]
                .iter()
                .all(|w| w.starts_with("scenario broken: ")),
        "{whose:?}"
    );
    assert_eq!(r.scenarios.len(), 3);
    let gone = &r.scenarios[0];
    assert!(
        gone.error
            .as_deref()
            .is_some_and(|e| e.contains("the guest agent went away")),
        "{gone:?}"
    );
    let gone_root = check(r, "agent-gone/root");
    assert!(
        gone_root.status == Status::Skip
            && gone_root
                .detail
                .starts_with("not judged: the scenario's guest failed: "),
        "{gone_root:?}"
    );
    assert!(r.scenarios[1..].iter().all(|s| s.error.is_none()));
    let hidden = check(r, "hidden/overmount");
    assert_eq!(hidden.detail, "files hidden under /srv /var", "{hidden:?}");
    assert!(
        evidence_has(r, "hidden/overmount", "/srv/www/dropped.html")
            && evidence_has(r, "hidden/overmount", "/var/left-behind.txt"),
        "{hidden:?}"
    );
    assert_eq!(
        check(r, "broken/state-mounts").detail,
        "not mounted as expected: /srv"
    );
    assert!(
        evidence_has(r, "broken/moved-files", "/srv/"),
        "{:?}",
        check(r, "broken/moved-files")
    );
    let persistence = check(r, "broken/persistence");
    assert!(
        evidence_has(
            r,
            "broken/persistence",
            "after clean reboot: /srv: token reboot lost"
        ),
        "{persistence:?}"
    );
    assert!(
        evidence_has(
            r,
            "broken/persistence",
            "/home: token reboot could not be written"
        ) && evidence_has(r, "broken/persistence", "Read-only file system"),
        "{persistence:?}"
    );
    assert!(
        !evidence_has(r, "broken/persistence", "/var:"),
        "only /srv and /home lost tokens: {persistence:?}"
    );
    // The scenario guest's journals, by its own boots (1: the saved one).
    assert!(o
        .artifacts
        .join("scenario-broken-journal-boot3.json")
        .is_file());
    for sc in &r.scenarios {
        eprintln!(
            "scenario {}: restored in {:.1}s, {:.1}s in all",
            sc.name, sc.restore_seconds, sc.seconds
        );
    }
    eprintln!(
        "saved in {:.1}s; the boot: {:.1}s",
        r.timings.save, r.timings.boot
    );
    assert_eq!(run::failure(r), Some(FailureKind::Failed));
}

#[test]
fn files_left_under_run_var_and_srv_fail_overmount_and_are_listed() {
    let (_, manifest_path, m) = fixture();
    let b = Broken::new("leftover");
    b.edit(|top| {
        let run = top.join(format!("systems/{}/run", m.default));
        std::fs::write(run.join("var/left-behind.txt"), "stale copy\n").unwrap();
        std::fs::create_dir_all(run.join("srv/www")).unwrap();
        std::fs::write(run.join("srv/www/dropped.html"), "<p>hidden</p>\n").unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    // moved-files also proves run/D is empty in the top-level view.
    assert_eq!(failing(r), ["moved-files", "overmount"]);
    assert!(evidence_has(r, "moved-files", "run/var has 1 entries"));
    let mps: Vec<&str> = r
        .warnings
        .iter()
        .filter(|w| w.kind == strata_vmtest::journal::WarningKind::Overmount)
        .filter_map(|w| w.mountpoint.as_deref())
        .collect();
    assert_eq!(mps, ["/srv", "/var"], "{:?}", r.warnings);
    let var = r
        .warnings
        .iter()
        .find(|w| w.mountpoint.as_deref() == Some("/var"))
        .unwrap();
    assert_eq!(var.shadowed, ["/var/left-behind.txt"]);
    assert_eq!(var.shadowed_bytes, 11);
    let srv = r
        .warnings
        .iter()
        .find(|w| w.mountpoint.as_deref() == Some("/srv"))
        .unwrap();
    assert_eq!(srv.shadowed, ["/srv/www", "/srv/www/dropped.html"]);
    let table = r.to_table();
    assert!(
        table.contains("invisible while the subvolume is mounted"),
        "{table}"
    );
    assert!(table.contains("--state-migration move"), "{table}");
}

#[test]
fn booting_the_pristine_subvolume_fails_root() {
    let (_, manifest_path, m) = fixture();
    let b = Broken::new("wrong-root");
    b.edit(|top| {
        let conf = top.join("extlinux/extlinux.conf");
        let text = std::fs::read_to_string(&conf).unwrap();
        // The menu's default entry boots through systems/default, each
        // version's own entry names it: point both at the pristine orig.
        let wrong = format!("rootflags=subvol=systems/{}/orig", m.default);
        let mut edited = text.clone();
        for want in [
            "rootflags=subvol=systems/default/run".to_owned(),
            format!("rootflags=subvol=systems/{}/run", m.default),
        ] {
            assert!(text.contains(&want), "{want} not in {text}");
            edited = edited.replace(&want, &wrong);
        }
        std::fs::write(&conf, edited).unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), ["root"]);
    assert!(
        evidence_has(
            r,
            "root",
            &format!(
                "fsroot /systems/{0}/orig, expected /systems/{0}/run",
                m.default
            )
        ),
        "{:?}",
        check(r, "root")
    );
}

#[test]
fn copy_migration_overmounts_every_filled_state_dir() {
    // Built by ci/test with `strata build --state-migration copy`: the state
    // data is in the subvolumes and still under each mountpoint.
    let image = std::env::var_os("STRATA_TEST_COPY_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "STRATA_TEST_COPY_IMAGE is not set: run ci/test, or build the fixture with \
                 `strata build --state-migration copy` and export it"
            )
        });
    let manifest_path = Manifest::default_path(&image);
    let m = Manifest::load(&manifest_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.default_version().state_migration, "copy");
    let mut cfg = config(&image, &manifest_path);
    cfg.checks = vec![CheckId::Overmount];
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(failing(r), ["overmount"]);
    assert_eq!(run::failure(r), Some(FailureKind::Failed));
    let mut mps: Vec<String> = r
        .warnings
        .iter()
        .filter(|w| w.kind == strata_vmtest::journal::WarningKind::Overmount)
        .filter_map(|w| w.mountpoint.clone())
        .collect();
    mps.sort();
    // The fixture fills all five; nothing else is mounted over data.
    assert_eq!(
        mps,
        ["/home", "/opt", "/root", "/srv", "/var"],
        "exactly the filled state dirs"
    );
    let root = r
        .warnings
        .iter()
        .find(|w| w.mountpoint.as_deref() == Some("/root"))
        .unwrap();
    assert!(
        root.shadowed
            .iter()
            .any(|p| p == "/root/.ssh/authorized_keys"),
        "{:?}",
        root.shadowed
    );
    // Normalised: counts and sizes depend on the fixture's exact contents.
    let normalised: Vec<String> = r
        .warnings
        .iter()
        .map(|w| {
            format!(
                "{:?} {} | {} | hidden: {} | authorized_keys listed: {}",
                w.kind,
                w.mountpoint.as_deref().unwrap_or("?"),
                w.message,
                if w.shadowed_count > 0 { "some" } else { "none" },
                w.shadowed
                    .iter()
                    .any(|p| p.ends_with("/.ssh/authorized_keys"))
            )
        })
        .collect();
    insta::assert_snapshot!(normalised.join("\n"));
}

// ------------------------------------------------------ images that do not boot

#[test]
fn truncated_kernel_is_an_infrastructure_failure_with_serial_log() {
    let (_, manifest_path, m) = fixture();
    let b = Broken::new("truncated-kernel");
    b.edit(|top| {
        let k = std::fs::OpenOptions::new()
            .write(true)
            .open(top.join(format!("systems/{}/kernel", m.default)))
            .unwrap();
        k.set_len(64 * 1024).unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    cfg.timeout = Duration::from_secs(90);
    let o = boot(cfg);
    not_booting(&o, 90.0);
}

#[test]
fn missing_root_device_is_an_infrastructure_failure_with_serial_log() {
    let (_, manifest_path, _) = fixture();
    let b = Broken::new("wrong-root-device");
    b.edit(|top| {
        let conf = top.join("extlinux/extlinux.conf");
        let text = std::fs::read_to_string(&conf).unwrap();
        // Every entry has the one root device: read as the kernel does.
        let dev = strata_builder::bootloader::cmdline::root_device(&text).unwrap();
        let re = format!("root={dev}");
        // The 2014 layout's assumption, wrong under virtio.
        std::fs::write(&conf, text.replace(&re, "root=/dev/sda")).unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    cfg.timeout = Duration::from_secs(150);
    let o = boot(cfg);
    not_booting(&o, 150.0);
    let Err(RunError::Infra { message, .. }) = &o.result else {
        unreachable!()
    };
    assert!(message.contains("/dev/sda"), "{message}");
}

/// A guest without qemu-guest-agent comes up but can never be checked: it
/// is said within seconds of reaching multi-user, not after the 240 s boot
/// timeout.
#[test]
fn a_guest_without_an_agent_is_diagnosed_soon_after_multi_user() {
    let (_, manifest_path, m) = fixture();
    let b = Broken::new("no-agent");
    b.edit(|top| {
        let unit = top.join(format!(
            "systems/{}/run/etc/systemd/system/qemu-guest-agent.service",
            m.default
        ));
        // Masked: the unit is never started, the port never opened.
        std::os::unix::fs::symlink("/dev/null", unit).unwrap();
    });
    let mut cfg = config(&b.image, &manifest_path);
    without_persistence(&mut cfg);
    let o = boot(cfg);
    let err = match &o.result {
        Ok(r) => panic!("a guest without an agent gave a verdict:\n{}", r.to_table()),
        Err(e) => e,
    };
    assert_eq!(err.kind(), FailureKind::Infrastructure);
    let msg = err.to_string();
    assert!(msg.contains("without a guest agent"), "{msg}");
    assert!(msg.contains("qemu-guest-agent"), "{msg}");
    // A TCG boot to multi-user takes 20-60 s here; the agent grace is 10 s.
    assert!(
        o.seconds < 150.0,
        "diagnosed after {:.0} s, not soon after multi-user",
        o.seconds
    );
}

fn not_booting(o: &Outcome, timeout: f64) {
    let err = match &o.result {
        Ok(r) => panic!("a broken image gave a verdict:\n{}", r.to_table()),
        Err(e) => e,
    };
    eprintln!("{err}");
    assert_eq!(err.kind(), FailureKind::Infrastructure);
    assert!(
        o.seconds < timeout + 15.0,
        "no hang: took {:.0} s",
        o.seconds
    );
    let serial = std::fs::read(o.artifacts.join("serial.log")).unwrap();
    assert!(!serial.is_empty(), "serial log kept");
    let RunError::Infra {
        report: Some(r), ..
    } = err
    else {
        panic!("an infrastructure failure still carries a report")
    };
    assert!(r.checks.iter().all(|c| c.status == Status::Skip));
    assert!(o.artifacts.join("qmp-events.json").is_file());
    assert!(
        o.artifacts.join("screen.png").is_file(),
        "screendump on failure"
    );
}

// ------------------------------------------------------ the machine API

/// The story-level API on its own: start, wait for a unit, run commands,
/// and a clean guest poweroff (the path `strata test` itself never takes,
/// since it ends runs with a power cut or a kill).
#[test]
fn machine_api_starts_runs_commands_and_shuts_down_cleanly() {
    use strata_vmtest::machine::Machine;
    use strata_vmtest::qemu::QemuCommand;
    let (image, _, _) = fixture();
    let _slot = Slot::take();
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            image.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
    );
    let cmd = QemuCommand::new("qemu-system-x86_64".into(), Accel::Tcg, overlay, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let events = strata_vmtest::qmp::EventLog::default();
        let mut m = Machine::start(cmd, events.clone()).await.unwrap();
        let state = m.wait_booted(Duration::from_secs(240)).await.unwrap();
        assert!(state == "running" || state == "degraded", "{state}");
        m.wait_for_unit("qemu-guest-agent.service", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(m.succeed("printf '%s' hello").await.unwrap(), "hello");
        let out = m.exec("echo oops >&2; exit 7").await.unwrap();
        assert_eq!((out.exit_code, out.stderr_str().trim()), (Some(7), "oops"));
        let err = m.succeed("false").await.unwrap_err();
        assert!(err.to_string().contains("exit 1"), "{err}");
        let status = m.shutdown(Duration::from_secs(120)).await.unwrap();
        assert!(
            status.success(),
            "QEMU exit status after poweroff: {status}"
        );
        let log = events.lock().unwrap();
        assert!(log.iter().any(|e| e.is_guest_shutdown()), "{log:?}");
    });
}

// ------------------------------------- a KVM that works halfway (--accel auto)

/// How the fake QEMU breaks KVM. Under TCG it is the real QEMU, untouched.
#[derive(Clone, Copy)]
enum KvmShape {
    /// QEMU aborts at once, as it does on hosts whose KVM cannot set the
    /// vCPU's MSRs (the firmware never runs).
    Aborts,
    /// The firmware runs (a firmware-only probe passes), then QEMU stops
    /// the guest with QEMU's real "KVM internal error … emulation failure"
    /// text and a register dump on its stderr, as SYSLINUX meets it.
    StopsAfterTheFirmware,
    /// The vCPU runs, but the guest never shows anything: no kernel line,
    /// no agent (here: the firmware finds no bootable disk and retries).
    HangsSilently,
}

/// What QEMU 10.0 printed when KVM failed SYSLINUX (register dump shortened).
const KVM_INTERNAL_ERROR: &str = "KVM internal error. Suberror: 1
extra data[0]: 0x0000000000000001
extra data[1]: 0x0000000000000000
emulation failure
EAX=00000011 EBX=00000000 ECX=00000000 EDX=00000000
EIP=00008200 EFL=00010002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =0008 00000000 ffffffff 00c09b00 DPL=0 CS32 [-RA]
CR0=00000011 CR2=00000000 CR3=00000000 CR4=00000000
EFER=0000000000000000
Code=00 00 00 00 <ff> ff 00 00 00 00 00 00
";

/// A wrapper around the real qemu-system-x86_64 that, when asked for KVM,
/// runs the guest under TCG and breaks it the way `shape` says. It never
/// outlives the QEMU strata holds: it `exec`s QEMU, and its helper (the
/// STOP sender) ends with it.
fn fake_kvm_qemu(dir: &Path, shape: KvmShape) -> PathBuf {
    let real = sh("sh", &["-c", "command -v qemu-system-x86_64"]);
    let blank = dir.join("blank.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("kvm-internal-error.txt"), KVM_INTERNAL_ERROR).unwrap();
    let shape = match shape {
        KvmShape::Aborts => "aborts",
        KvmShape::StopsAfterTheFirmware => "stops",
        KvmShape::HangsSilently => "hangs",
    };
    let dir = dir.display();
    let blank = blank.display();
    let script = format!(
        r#"#!/bin/bash
# strata's test double for a KVM that works halfway ({shape}).
real={real}
kvm=0
for a in "$@"; do case "$a" in pc,accel=kvm) kvm=1 ;; esac; done
[ "$kvm" = 1 ] || exec "$real" "$@"
if [ {shape} = aborts ]; then
    echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069" >&2
    echo "qemu-system-x86_64: ../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion failed." >&2
    kill -ABRT $$
fi
args=() debugcon="" disk=0
for a in "$@"; do
    case "$a" in
    pc,accel=kvm) args+=(pc,accel=tcg) ;;
    host) args+=(max) ;;
    file,id=dbg,path=*) debugcon=${{a#file,id=dbg,path=}}; args+=("$a") ;;
    *node-name=disk0,*)
        disk=1
        if [ {shape} = hangs ]; then
            args+=("driver=raw,node-name=disk0,file.driver=file,file.filename={blank}")
        else
            args+=("$a")
        fi ;;
    *) args+=("$a") ;;
    esac
done
if [ {shape} = stops ] && [ "$disk" = 1 ]; then
    mon={dir}/monitor.$$
    rm -f "$mon.in" "$mon.out"
    mkfifo "$mon.in" "$mon.out"
    args+=(-chardev "pipe,id=fakemon,path=$mon" -mon chardev=fakemon,mode=readline)
    (
        # Opened now, read-write: a write never blocks on a QEMU gone.
        exec 3<>"$mon.in"
        # The firmware's boot phase on its debug console (SYSLINUX has
        # the CPU); without a debug console, two seconds in.
        for _ in $(seq 300); do
            kill -0 $$ 2>/dev/null || exit 0
            if [ -z "$debugcon" ] || grep -qs "Booting from" "$debugcon"; then break; fi
            sleep 0.05
        done
        [ -n "$debugcon" ] || sleep 2
        kill -0 $$ 2>/dev/null || exit 0
        # QEMU's words first, then the stop, as QEMU does it.
        cat {dir}/kvm-internal-error.txt >&2
        printf 'stop\n' >&3
    ) &
fi
exec "$real" "${{args[@]}}"
"#
    );
    let path = Path::new(&dir.to_string()).join("qemu-system-x86_64");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// One boot, one check, `--accel auto` through `qemu`, with a verdict
/// cache of the test's own.
fn auto_through(qemu: &Path, cache: &Path) -> Outcome {
    assert!(
        strata_vmtest::accel::kvm_device().is_ok(),
        "these tests fake a broken KVM behind a /dev/kvm that opens: {:?}",
        strata_vmtest::accel::kvm_device()
    );
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.accel = AccelChoice::Auto;
    cfg.qemu_binary = qemu.to_owned();
    cfg.kvm_cache = Some(strata_vmtest::accel::cache::KvmCache {
        path: cache.to_owned(),
        reprobe: false,
    });
    cfg.checks = vec![CheckId::Root];
    boot(cfg)
}

/// The run passed under TCG, said where KVM failed and what QEMU said,
/// kept the abandoned attempt's QEMU output, and stored "unusable".
fn fell_back(
    o: &Outcome,
    qemu: &Path,
    cache: &Path,
    stages: &[strata_vmtest::accel::Stage],
    said: &str,
) {
    use strata_vmtest::accel::cache::{lookup, HostKey, Lookup};
    let r = report(o);
    assert_eq!(run::failure(r), None, "a run TCG passes must pass");
    assert_eq!(r.accel, Accel::Tcg);
    let f = r
        .accel_kvm_failure
        .as_ref()
        .expect("the KVM failure is reported");
    assert!(stages.contains(&f.stage), "{f:?}");
    assert!(
        r.accel_reason
            .starts_with(&format!("KVM failed at {} (", f.stage))
            && r.accel_reason.contains(said)
            && r.accel_reason.ends_with("; TCG used for this run"),
        "{}",
        r.accel_reason
    );
    let junit = r.to_junit();
    assert!(junit.contains("accel_kvm_stage"), "{junit}");
    match lookup(cache, &HostKey::of_this_host(qemu)) {
        Lookup::Hit(v) => {
            assert!(!v.usable, "{v:?}");
            assert_eq!(v.failure.as_ref().map(|f| f.stage), Some(f.stage));
        }
        miss => panic!("no verdict stored: {miss:?}"),
    }
}

/// The abandoned KVM attempt's QEMU output, kept as an artifact.
fn kvm_attempt_output(o: &Outcome) -> String {
    std::fs::read_to_string(o.artifacts.join("qemu-stderr-boot1-kvm.log")).unwrap()
}

#[test]
fn auto_falls_back_to_tcg_when_kvm_stops_the_guest_after_the_firmware() {
    use strata_vmtest::accel::Stage;
    let dir = tempfile::tempdir().unwrap();
    let qemu = fake_kvm_qemu(dir.path(), KvmShape::StopsAfterTheFirmware);
    let cache = dir.path().join("kvm-verdict.json");
    let o = auto_through(&qemu, &cache);
    let said = "KVM internal error. Suberror: 1; emulation failure";
    fell_back(&o, &qemu, &cache, &[Stage::Bootloader], said);
    let f = report(&o).accel_kvm_failure.clone().unwrap();
    assert!(f.error.contains("QMP STOP"), "{f:?}");
    assert!(kvm_attempt_output(&o).contains("EFER=0000000000000000"));
    // How far the firmware got is kept too.
    let firmware =
        std::fs::read_to_string(o.artifacts.join("firmware-debugcon-boot1-kvm.log")).unwrap();
    assert!(firmware.contains("Booting from"), "{firmware}");
    // The serial log says where the KVM attempt ended.
    let serial = std::fs::read_to_string(o.artifacts.join("serial.log")).unwrap();
    assert!(serial.contains("KVM attempt abandoned"), "{serial}");

    // The next run on this host goes straight to TCG and says why.
    let o = auto_through(&qemu, &cache);
    let r = report(&o);
    assert_eq!(run::failure(r), None);
    assert_eq!(r.accel, Accel::Tcg);
    assert!(
        r.accel_reason.contains(said) && r.accel_reason.contains("(cached verdict of "),
        "{}",
        r.accel_reason
    );
    assert!(r.accel_cache.as_ref().unwrap().used);
    assert_eq!(r.timings.accel_probe, 0.0);
    assert!(!o.artifacts.join("qemu-stderr-boot1-kvm.log").exists());
}

#[test]
fn auto_falls_back_to_tcg_when_qemu_aborts_under_kvm() {
    use strata_vmtest::accel::Stage;
    let dir = tempfile::tempdir().unwrap();
    let qemu = fake_kvm_qemu(dir.path(), KvmShape::Aborts);
    let cache = dir.path().join("kvm-verdict.json");
    let o = auto_through(&qemu, &cache);
    fell_back(
        &o,
        &qemu,
        &cache,
        &[Stage::Start],
        "failed to set MSR 0x10a",
    );
    assert!(kvm_attempt_output(&o).contains("Assertion failed"));
    // An abort costs a QEMU start, not a bound.
    let t = report(&o).timings.accel_probe;
    assert!(t < 5.0, "{t}");
}

#[test]
fn auto_falls_back_to_tcg_when_the_guest_hangs_silently_under_kvm() {
    use strata_vmtest::accel::{Stage, KVM_KERNEL_WITHIN};
    let dir = tempfile::tempdir().unwrap();
    let qemu = fake_kvm_qemu(dir.path(), KvmShape::HangsSilently);
    let cache = dir.path().join("kvm-verdict.json");
    let o = auto_through(&qemu, &cache);
    let r = report(&o);
    let f = r
        .accel_kvm_failure
        .clone()
        .expect("the KVM failure is reported");
    // QEMU said nothing of it: strata's own words stand in for it.
    assert!(
        f.error.contains("did not happen within 20 s") && !f.qemu_said.contains("KVM"),
        "{f:?}"
    );
    fell_back(
        &o,
        &qemu,
        &cache,
        &[Stage::Firmware, Stage::Bootloader],
        "the kernel's first console line (or the guest agent) did not happen within 20 s",
    );
    // Given up at the bound, not at the boot timeout.
    let t = r.timings.accel_probe;
    let bound = KVM_KERNEL_WITHIN.as_secs_f64();
    assert!(t >= bound && t < bound + 15.0, "{t}");
}

// ---------------------------------------------------- the user's checks

fn user_check(name: &str, run: &str, stdout: Option<&str>, phases: Option<&[When]>) -> UserCheck {
    UserCheck {
        name: name.into(),
        run: Some(run.into()),
        wait_for_unit: None,
        expect_exit: 0,
        stdout_matches: stdout.map(|p| strata_vmtest::checks::user::pattern(p).unwrap()),
        stdout_contains: None,
        stderr_matches: None,
        phases: phases.map(<[When]>::to_vec),
    }
}

/// The user's checks in the three phases of a plain run: each judged by
/// its exit code and output, in the phases it names, after the setup
/// commands; the built-in checks are left out but for root, so that the
/// reboot and the power cut happen because a user check asked for them.
#[test]
fn user_checks_fail_on_exit_code_output_unit_and_phase() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.checks = vec![CheckId::Root];
    cfg.setup = vec![
        "mkdir -p /var/lib/app && echo hello > /var/lib/app/greeting".into(),
        // /run is a tmpfs: the marker is gone after any reboot.
        ": > /run/strata-setup-ran".into(),
        "systemd-run --unit strata-broken /bin/false".into(),
    ];
    let every = [When::Boot, When::Reboot, When::PowerCut];
    let mut unit = user_check("broken-unit", "true", None, Some(&[When::Boot]));
    unit.wait_for_unit = Some("strata-broken.service".into());
    let mut missing = user_check("missing-unit", "true", None, Some(&[When::Boot]));
    missing.wait_for_unit = Some("strata-no-such.service".into());
    cfg.user_checks = vec![
        missing,
        user_check(
            "greeting",
            "cat /var/lib/app/greeting",
            Some("^hello$"),
            None,
        ),
        user_check(
            "exit-code",
            "echo trying; exit 3",
            None,
            Some(&[When::Boot]),
        ),
        user_check("output", "echo degraded", Some("^ok$"), Some(&[When::Boot])),
        user_check(
            "first-boot-only",
            "test -e /run/strata-setup-ran",
            None,
            Some(&every),
        ),
        unit,
    ];
    let o = boot(cfg);
    let r = report(&o);
    assert_eq!(r.boots, 3, "the user's reboot and power-cut phases boot");
    let mut failed = failing(r);
    failed.sort();
    assert_eq!(
        failed,
        [
            "boot/broken-unit",
            "boot/exit-code",
            "boot/missing-unit",
            "boot/output",
            "power-cut/first-boot-only",
            "reboot/first-boot-only",
        ]
    );
    for phase in ["boot", "reboot", "power-cut"] {
        assert_eq!(check(r, &format!("{phase}/greeting")).status, Status::Pass);
    }
    assert_eq!(check(r, "boot/first-boot-only").status, Status::Pass);
    let exit = check(r, "boot/exit-code");
    assert!(
        exit.detail.starts_with("exit 3, expected exit 0"),
        "{exit:?}"
    );
    assert!(evidence_has(r, "boot/exit-code", "stdout: trying"));
    assert_eq!(
        check(r, "boot/output").detail,
        "stdout does not match /^ok$/"
    );
    let unit = check(r, "boot/broken-unit");
    assert!(
        unit.detail
            .contains("strata-broken.service did not become active"),
        "{unit:?}"
    );
    assert!(unit.detail.contains("failed/failed"), "{unit:?}");
    // A unit that does not exist is said as such (and at once).
    let missing = check(r, "boot/missing-unit");
    assert!(missing.detail.contains("load not-found"), "{missing:?}");
}

/// Every built-in check on the fixture with the user's data preserved:
/// boot-health, shutdown and the state contract pass on the run's own
/// boots; a scenario breaks each of them for its own reason (a failed
/// unit, a kernel panic, a state dir kept busy through shutdown, a
/// preserved file changed), without boots of their own but the one the
/// shutdown scenario needs.
#[test]
fn boot_health_shutdown_and_state_contract_pass_and_each_fails_in_its_scenario() {
    let (image, manifest, _) = fixture();
    let mut cfg = config(&image, &manifest);
    cfg.setup = vec![
        "mkdir -p /var/lib/app/cache && echo 'orders: 3' > /var/lib/app/db.txt \
         && ln -s db.txt /var/lib/app/current && setfattr -n user.app -v 1 /var/lib/app/db.txt"
            .into(),
    ];
    cfg.preserve = vec!["/var/lib/app".into(), "/root/.bashrc".into()];
    let scenario = |name: &str, command: &str, checks: &[CheckId]| Scenario {
        name: name.into(),
        commands: vec![command.into()],
        checks: checks.to_vec(),
        user_checks: vec![],
    };
    cfg.scenarios = vec![
        scenario(
            "failed-unit",
            "systemd-run --unit strata-broken /bin/false; sleep 1",
            &[CheckId::BootHealth],
        ),
        scenario(
            "panic",
            "echo c > /proc/sysrq-trigger",
            &[CheckId::BootHealth, CheckId::Root],
        ),
        scenario(
            "busy-srv",
            "systemd-run --unit busy -p DefaultDependencies=no -p KillMode=none \
             -p WorkingDirectory=/srv sleep infinity",
            &[CheckId::Shutdown],
        ),
        scenario(
            "changed",
            "echo 'orders: 4' > /var/lib/app/db.txt && chmod 600 /root/.bashrc",
            &[CheckId::StateContract],
        ),
    ];
    let o = boot(cfg);
    let r = report(&o);
    let mut failed = failing(r);
    failed.sort();
    assert_eq!(
        failed,
        [
            "busy-srv/shutdown",
            "changed/state-contract",
            "failed-unit/boot-health",
            "panic/boot-health"
        ],
        "(artifacts {})",
        o.artifacts.display()
    );
    for name in ["boot-health", "shutdown", "state-contract", "persistence"] {
        assert_eq!(check(r, name).status, Status::Pass, "{name}");
    }
    assert!(evidence_has(
        r,
        "failed-unit/boot-health",
        "strata-broken.service"
    ));
    assert!(evidence_has(
        r,
        "panic/boot-health",
        "Kernel panic - not syncing"
    ));
    assert_eq!(check(r, "panic/root").status, Status::Skip);
    assert!(evidence_has(r, "busy-srv/shutdown", "/srv"));
    assert!(evidence_has(
        r,
        "changed/state-contract",
        "/var/lib/app/db.txt: content changed"
    ));
    assert!(evidence_has(
        r,
        "changed/state-contract",
        "/root/.bashrc: mode 0644 → 0600"
    ));
}
