use super::*;
use crate::qemu_output::{last_lines, qemu_words};

/// What QEMU 10.0 printed on a host whose KVM runs SeaBIOS and then fails
/// SYSLINUX in protected mode (measured on a CI host whose /dev/kvm exists
/// but cannot run the guest), register dump shortened.
const INTERNAL_ERROR: &str = "KVM internal error. Suberror: 1
extra data[0]: 0x0000000000000001
extra data[1]: 0x0000000000000000
emulation failure
EAX=00000011 EBX=00000000 ECX=00000000 EDX=00000000
ESI=00000000 EDI=00000000 EBP=00000000 ESP=00007c00
EIP=00008200 EFL=00010002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0010 00000000 ffffffff 00c09300 DPL=0 DS   [-WA]
CS =0008 00000000 ffffffff 00c09b00 DPL=0 CS32 [-RA]
GDT=     00008000 00000027
IDT=     00000000 000003ff
CR0=00000011 CR2=00000000 CR3=00000000 CR4=00000000
DR6=00000000ffff0ff0 DR7=0000000000000400
EFER=0000000000000000
Code=00 00 00 00 <ff> ff 00 00 00 00 00 00
";

/// What this machine type's other shape printed: QEMU aborts at once.
const MSR_ABORT: &str = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069
qemu-system-x86_64: ../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.
";

#[test]
fn qemus_words_leave_the_register_dump_out() {
    assert_eq!(
        qemu_words(INTERNAL_ERROR),
        "KVM internal error. Suberror: 1; emulation failure"
    );
    assert_eq!(
        qemu_words(MSR_ABORT),
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069; \
         qemu-system-x86_64: ../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: \
         Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."
    );
    assert_eq!(qemu_words(""), "");
    // Ordinary messages with '=' in them are words, not registers.
    assert_eq!(
        qemu_words("qemu-system-x86_64: -blockdev driver=raw: Could not open 'x'\n"),
        "qemu-system-x86_64: -blockdev driver=raw: Could not open 'x'"
    );
    assert_eq!(
        last_lines(INTERNAL_ERROR, 15),
        "KVM internal error. Suberror: 1\nemulation failure"
    );
    assert_eq!(last_lines("a\nb\n\nc\n", 2), "b\nc");
}

#[test]
fn the_stage_is_the_first_one_a_kvm_boot_did_not_finish() {
    const SEABIOS: &str = "SeaBIOS (version 1.16.3)\nRunning on KVM\n";
    let booting = format!("{SEABIOS}Booting from Hard Disk...\n");
    // QEMU aborted before the guest ran.
    assert_eq!(stage_reached(false, "", false, false), Stage::Start);
    // The firmware stalled before its boot phase.
    assert_eq!(stage_reached(true, SEABIOS, false, false), Stage::Firmware);
    assert_eq!(stage_reached(true, "", false, false), Stage::Firmware);
    // SYSLINUX (or QEMU's loader) had the CPU; no kernel line followed.
    assert_eq!(
        stage_reached(true, &booting, false, false),
        Stage::Bootloader
    );
    assert_eq!(
        stage_reached(true, "Booting from ROM...\n", false, false),
        Stage::Bootloader
    );
    assert_eq!(stage_reached(true, &booting, true, false), Stage::Kernel);
    assert_eq!(stage_reached(true, &booting, true, true), Stage::Userspace);
}

fn failure(stage: Stage) -> KvmFailure {
    KvmFailure {
        stage,
        qemu_said: qemu_words(INTERNAL_ERROR),
        error: "the VM stopped (QMP STOP): QEMU paused the guest, which cannot go on by itself"
            .into(),
    }
}

fn cache_in(dir: &Path, reprobe: bool) -> KvmCache {
    KvmCache {
        path: dir.join("kvm-verdict.json"),
        reprobe,
    }
}

const QEMU: &str = "sh";

fn auto(c: &KvmCache) -> Plan<'_> {
    Plan::with_device(AccelChoice::Auto, Some(c), Path::new(QEMU), Ok(()))
}

#[test]
fn kvm_that_fails_where_tcg_boots_is_stored_unusable_and_the_next_run_goes_straight_to_tcg() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    let mut plan = auto(&c);
    assert_eq!(plan.first().unwrap(), Accel::Kvm);
    plan.kvm_failed(failure(Stage::Bootloader), 2.4).unwrap();
    let d = plan.tcg_booted();
    assert_eq!(d.used, Accel::Tcg);
    assert_eq!(
        d.reason,
        "KVM failed at bootloader (KVM internal error. Suberror: 1; emulation failure); \
         TCG used for this run"
    );
    assert_eq!(d.kvm_failure, Some(failure(Stage::Bootloader)));
    assert_eq!(d.probe_seconds, 2.4);
    let used = d.cache.unwrap();
    assert!(!used.used);
    assert_eq!(
        used.note,
        "no cached verdict yet; stored \"KVM unusable\" for the next runs"
    );
    // The stored verdict keeps what the attempt cost: what it saves the next runs.
    match cache::lookup(&c.path, &HostKey::of_this_host(Path::new(QEMU))) {
        Lookup::Hit(v) => assert_eq!(v.probe_seconds, 2.4),
        miss => panic!("{miss:?}"),
    }

    // The next run: no KVM attempt, and it says the verdict is the cache's.
    let plan = auto(&c);
    assert_eq!(plan.first().unwrap(), Accel::Tcg);
    let d = plan.tcg_booted();
    assert!(
        d.reason
            .starts_with("KVM failed at bootloader (KVM internal error")
            && d.reason.contains("(cached verdict of ")
            && d.reason.ends_with("; TCG used for this run"),
        "{}",
        d.reason
    );
    assert_eq!(d.kvm_failure.map(|f| f.stage), Some(Stage::Bootloader));
    assert_eq!(d.probe_seconds, 0.0);
    assert!(d.cache.unwrap().used);
}

#[test]
fn a_cached_usable_verdict_that_proves_wrong_is_replaced_in_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    let plan = auto(&c);
    assert_eq!(plan.first().unwrap(), Accel::Kvm);
    let d = plan.kvm_booted("boot 1 came up under KVM (kernel console after 0.9 s)");
    assert_eq!(d.used, Accel::Kvm);
    assert_eq!(
        d.cache.unwrap().note,
        "no cached verdict yet; stored \"KVM usable\" for the next runs"
    );

    // A cached "usable" is no reason to stop watching: boot 1 still runs
    // under KVM, and here it fails.
    let mut plan = auto(&c);
    assert_eq!(plan.first().unwrap(), Accel::Kvm);
    plan.kvm_failed(failure(Stage::Firmware), 5.0).unwrap();
    let d = plan.tcg_booted();
    assert_eq!(d.used, Accel::Tcg);
    let used = d.cache.unwrap();
    assert!(used.used, "the cached verdict was acted on");
    assert_eq!(
        used.note,
        "the cached verdict proved wrong; stored \"KVM unusable\" for the next runs"
    );
    assert_eq!(auto(&c).first().unwrap(), Accel::Tcg);
}

#[test]
fn a_boot_that_fails_under_tcg_too_says_nothing_about_kvm() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    let mut plan = auto(&c);
    plan.kvm_failed(failure(Stage::Kernel), 30.0).unwrap();
    let d = plan.tcg_failed();
    assert!(d.reason.contains("failed under TCG too"), "{}", d.reason);
    assert_eq!(d.cache.unwrap().note, "no cached verdict yet");
    assert!(!c.path.exists());
    assert_eq!(auto(&c).first().unwrap(), Accel::Kvm);
}

#[test]
fn accel_kvm_fails_saying_where_and_what_qemu_said() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    let mut plan = Plan::with_device(AccelChoice::Kvm, Some(&c), Path::new(QEMU), Ok(()));
    let err = plan
        .kvm_failed(failure(Stage::Bootloader), 2.0)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "--accel kvm: KVM is not usable here: boot 1 failed at the bootloader stage"
        ) && msg.contains("QMP STOP")
            && msg.contains("QEMU said: KVM internal error. Suberror: 1; emulation failure"),
        "{msg}"
    );
    // `--accel kvm` never consults or writes the cache.
    assert!(!c.path.exists());
}

#[test]
fn without_a_usable_device_auto_uses_tcg_and_leaves_the_cache_alone() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    let plan = Plan::with_device(
        AccelChoice::Auto,
        Some(&c),
        Path::new(QEMU),
        Err("/dev/kvm: No such file or directory".into()),
    );
    assert_eq!(plan.first().unwrap(), Accel::Tcg);
    let d = plan.tcg_booted();
    assert_eq!(
        d.reason,
        "KVM unusable (/dev/kvm: No such file or directory); TCG used for this run"
    );
    assert_eq!(d.cache, None);
    let plan = Plan::with_device(AccelChoice::Tcg, Some(&c), Path::new(QEMU), Ok(()));
    assert_eq!(plan.first().unwrap(), Accel::Tcg);
    assert_eq!(plan.tcg_booted().reason, "requested with --accel tcg");
    assert!(!c.path.exists());
}

#[test]
fn accel_probe_tries_kvm_again_and_rewrites_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    let mut plan = auto(&c);
    plan.kvm_failed(failure(Stage::Start), 0.1).unwrap();
    plan.tcg_booted();
    let forced = cache_in(dir.path(), true);
    let plan = auto(&forced);
    assert_eq!(plan.first().unwrap(), Accel::Kvm);
    let d = plan.kvm_booted("boot 1 came up under KVM");
    assert!(d
        .cache
        .unwrap()
        .note
        .starts_with("--accel-probe: tried KVM again; stored \"KVM usable\""),);
    let d = auto(&c).kvm_booted("boot 1 came up under KVM");
    assert!(
        d.reason.starts_with("KVM usable (cached verdict of "),
        "{}",
        d.reason
    );
    assert_eq!(
        d.cache.unwrap().note,
        "verdict reused; `strata test --accel-probe` tries KVM again"
    );
}

#[test]
fn a_cache_that_cannot_be_written_is_said_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the cache directory should be.
    std::fs::write(dir.path().join("strata"), "").unwrap();
    let c = cache_in(&dir.path().join("strata"), false);
    let mut plan = auto(&c);
    plan.kvm_failed(failure(Stage::Start), 0.1).unwrap();
    let note = plan.tcg_booted().cache.unwrap().note;
    assert!(note.contains("could not store the verdict"), "{note}");
}

#[test]
fn only_evidence_against_kvm_itself_is_stored_for_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache_in(dir.path(), false);
    // The kernel printed, then the boot stalled with QEMU silent: maybe a
    // loaded moment. The run falls back; the next one tries KVM again.
    let stall = KvmFailure {
        stage: Stage::Kernel,
        qemu_said: String::new(),
        error: "the guest coming up did not happen within 90 s".into(),
    };
    assert!(!stall.is_kvms_own());
    let mut plan = auto(&c);
    plan.kvm_failed(stall, 90.0).unwrap();
    let d = plan.tcg_booted();
    assert_eq!(d.used, Accel::Tcg);
    assert!(
        d.cache.unwrap().note.contains("nothing stored"),
        "the note says why"
    );
    assert!(!c.path.exists());
    // What is KVM's own: QEMU exited, QEMU named KVM, or the guest never
    // got past the firmware or bootloader.
    assert!(failure(Stage::Bootloader).is_kvms_own());
    assert!(KvmFailure {
        stage: Stage::Start,
        qemu_said: "qemu-system-x86_64: error: failed to set MSR 0x10a".into(),
        error: "QEMU exited (signal: 6 (SIGABRT) (core dumped)): ...".into(),
    }
    .is_kvms_own());
    assert!(!KvmFailure {
        stage: Stage::Start,
        qemu_said: String::new(),
        error: "QMP connect timed out".into(),
    }
    .is_kvms_own());
}

#[test]
fn accel_kvm_that_failed_is_reported_as_kvm_with_where_it_failed() {
    let mut plan = Plan::with_device(AccelChoice::Kvm, None, Path::new(QEMU), Ok(()));
    assert!(plan.kvm_failed(failure(Stage::Bootloader), 1.5).is_err());
    let d = plan.kvm_refused();
    assert_eq!(d.used, Accel::Kvm);
    assert_eq!(d.kvm_failure.map(|f| f.stage), Some(Stage::Bootloader));
    assert!(
        d.reason.starts_with("KVM failed at bootloader ("),
        "{}",
        d.reason
    );
}
