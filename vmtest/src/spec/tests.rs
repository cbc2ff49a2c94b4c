//! Parsing, every error class (their messages snapshotted: what a person
//! reads), relative paths, the plan. No VM, no image.

use super::*;
use crate::checks::testdata;
use crate::lifecycle::{ChangeError, Changed, ImageChanges, Lifecycle};
use std::sync::Arc;
use strata_builder::host::interrupt::Interrupt;

const FULL: &str = r#"
image = "sys.img"

checks = ["root", "state-mounts", "fstab", "moved-files", "overmount", "persistence", "boot-health", "shutdown", "state-contract", "app-up"]

[machine]
memory = 2048
cpus = 1
accel = "tcg"
timeout = 900
boot = "extlinux"
later_boots = "extlinux"
disk_bus = "virtio-scsi"
qemu = "bin/qemu"

[[setup]]
run = "mkdir -p /var/lib/app && echo hi > /var/lib/app/data"

[[setup]]
run = "systemctl enable --now app.service"

[[check]]
name = "app-up"
wait_for_unit = "app.service"
run = "curl -fsS localhost:8080/health"
stdout_matches = "^ok"
stdout_contains = "ok"
stderr_matches = "^$"
phases = ["reboot", "boot"]

[[check]]
name = "os-release"
run = "cat /etc/os-release"
expect_exit = 0
stdout_contains = "ID=debian"

[state]
preserve = ["/var/lib/app", "/root/.ssh", "/home/*/.config"]

[[scenario]]
name = "readonly-var"
run = "mount -o remount,ro /var"
checks = ["persistence", "app-up"]

[[scenario]]
name = "two-steps"
run = ["umount /srv", "mount -t tmpfs tmpfs /srv"]
checks = ["state-mounts"]

[boot_health]
ignore = ["ACPI: .* not found", "^audit:"]

[output]
json = "out/report.json"
junit = "out/junit.xml"
artifacts = "out/art"
"#;

fn parse(text: &str) -> Result<Spec, SpecError> {
    Spec::parse(Path::new("tests/app.toml"), text)
}

fn cfg() -> TestConfig {
    TestConfig::new("sys.img".into(), testdata::expectations())
}

#[test]
fn a_full_file_fills_every_field() {
    let s = parse(FULL).unwrap();
    assert_eq!(s.image.as_ref().unwrap().value, Path::new("tests/sys.img"));
    assert_eq!(s.image.as_ref().unwrap().site.line, 2);
    assert_eq!(
        s.machine,
        MachineSpec {
            memory_mib: Some(2048),
            cpus: Some(1),
            accel: Some(AccelChoice::Tcg),
            timeout: Some(Duration::from_secs(900)),
            boot: Some(BootMode::Extlinux),
            later_boots: Some(BootMode::Extlinux),
            disk_bus: Some(DiskBus::VirtioScsi),
            qemu: Some("tests/bin/qemu".into()),
        }
    );
    // The user check's name selects nothing among the built-ins.
    assert_eq!(
        s.checks.as_deref(),
        Some(
            &[
                CheckId::Root,
                CheckId::StateMounts,
                CheckId::Fstab,
                CheckId::MovedFiles,
                CheckId::Overmount,
                CheckId::Persistence,
                CheckId::BootHealth,
                CheckId::Shutdown,
                CheckId::StateContract
            ][..]
        )
    );
    assert_eq!(s.setup.len(), 2);
    let app = &s.user_checks[0];
    assert_eq!(app.name, "app-up");
    assert_eq!(app.wait_for_unit.as_deref(), Some("app.service"));
    assert_eq!(app.phases, Some(vec![When::Boot, When::Reboot]));
    assert!(app.stdout_matches.as_ref().unwrap().is_match("ok\n"));
    let os = &s.user_checks[1];
    assert_eq!((os.expect_exit, os.phases.as_ref()), (0, None));
    assert_eq!(
        s.preserve,
        ["/var/lib/app", "/root/.ssh", "/home/*/.config"]
    );
    assert_eq!(
        s.scenarios[0],
        Scenario {
            name: "readonly-var".into(),
            commands: vec!["mount -o remount,ro /var".into()],
            checks: vec![CheckId::Persistence],
            user_checks: vec!["app-up".into()],
        }
    );
    assert_eq!(s.scenarios[1].commands.len(), 2);
    assert_eq!(s.boot_health_ignore.len(), 2);
    assert_eq!(
        s.output,
        OutputSpec {
            json: Some("tests/out/report.json".into()),
            junit: Some("tests/out/junit.xml".into()),
            artifacts: Some("tests/out/art".into()),
        }
    );

    let mut c = cfg();
    s.apply(&mut c);
    assert_eq!((c.memory_mib, c.cpus), (2048, 1));
    assert_eq!(c.accel, AccelChoice::Tcg);
    assert_eq!(c.disk_bus, DiskBus::VirtioScsi);
    assert_eq!(c.later_boots, BootMode::Extlinux);
    assert_eq!(c.qemu_binary, Path::new("tests/bin/qemu"));
    assert_eq!(c.timeout, Duration::from_secs(900));
    assert_eq!(c.setup.len(), 2);
    assert_eq!(c.user_checks.len(), 2);
    assert_eq!(c.preserve.len(), 3);
    assert_eq!(c.scenarios.len(), 2);
    assert_eq!(c.boot_health_ignore.len(), 2);
    assert_eq!(c.artifacts.as_deref(), Some(Path::new("tests/out/art")));
}

#[test]
fn what_the_file_leaves_out_keeps_the_defaults() {
    let s = parse("image = \"/abs/sys.img\"\n").unwrap();
    assert_eq!(s.image.unwrap().value, Path::new("/abs/sys.img"));
    let s = parse("").unwrap();
    let mut c = cfg();
    s.apply(&mut c);
    let d = cfg();
    assert_eq!(c.checks, d.checks);
    assert_eq!(
        (c.memory_mib, c.cpus, c.timeout),
        (d.memory_mib, d.cpus, d.timeout)
    );
    assert_eq!(c.qemu_binary, d.qemu_binary);
    // A bare QEMU name is looked up in PATH, not beside the file.
    let s = parse("[machine]\nqemu = \"qemu-system-x86_64\"\n").unwrap();
    assert_eq!(s.machine.qemu.unwrap(), Path::new("qemu-system-x86_64"));
}

#[test]
fn build_writes_image_or_a_file_named_after_the_spec() {
    let s =
        parse("image = \"sys.img\"\n[build]\nrootfs = \"rootfs.tar\"\nsize = \"4G\"\n").unwrap();
    let b = s.build.unwrap();
    assert_eq!(b.output, Path::new("tests/sys.img"));
    assert_eq!(b.rootfs.value, Path::new("tests/rootfs.tar"));
    let s = parse("[build]\nrootfs = \"r\"\nsize = \"1G\"\nstate_migration = \"copy\"\nkernel_args = \"\"\nforce = true\n").unwrap();
    let b = s.build.unwrap();
    assert_eq!(b.output, Path::new("tests/app.img"));
    let args: Vec<String> = b
        .build_args()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args,
        [
            "--rootfs",
            "tests/r",
            "--output",
            "tests/app.img",
            "--size",
            "1G",
            "--state-migration",
            "copy",
            "--kernel-args=",
            "--force"
        ]
    );
    // A file in the current directory: paths stay relative to it.
    let s = Spec::parse(Path::new("app.toml"), "image = \"sys.img\"\n").unwrap();
    assert_eq!(s.image.unwrap().value, Path::new("./sys.img"));
}

/// Every class of error, one malformed file each: the messages are what a
/// person reads, so they are reviewed as a whole.
#[test]
fn malformed_files_name_the_file_the_line_and_the_key() {
    let cases: &[(&str, &str)] = &[
        ("syntax", "image = \n"),
        ("unknown top-level key", "imgae = \"x\"\n"),
        ("unknown key in a table", "[machine]\nmemory = 1\nmemroy = 2\n"),
        ("top-level key below a table", "[machine]\nmemory = 1\n\nchecks = [\"root\"]\n"),
        ("unknown key in a check", "[[check]]\nname = \"a\"\nrun = \"true\"\n\n[[check]]\nname = \"b\"\nrun = \"true\"\nphase = [\"boot\"]\n"),
        ("wrong type", "[machine]\nmemory = \"lots\"\n"),
        ("wrong type in a list", "[[check]]\nname = \"a\"\nrun = \"true\"\nphases = [\"boot\", 3]\n"),
        ("unknown accel", "[machine]\naccel = \"hvf\"\n"),
        ("zero cpus", "[machine]\ncpus = 0\n"),
        ("unknown built-in check", "checks = [\"root\", \"fstabb\"]\n"),
        ("unknown check with user checks", "checks = [\"app\"]\n[[check]]\nname = \"app-up\"\nrun = \"true\"\n"),
        ("unknown phase", "[[check]]\nname = \"a\"\nrun = \"true\"\n\n[[check]]\nname = \"b\"\nrun = \"true\"\nphases = [\"reboooot\"]\n"),
        ("phase the plain run lacks", "[[check]]\nname = \"a\"\nrun = \"true\"\nphases = [\"boot\", \"upgrade\"]\n"),
        ("phase the lifecycle lacks", "[upgrade]\nrootfs = \"v2.tar\"\n\n[[check]]\nname = \"a\"\nrun = \"true\"\nphases = [\"power-cut\"]\n"),
        ("no phases at all", "[[check]]\nname = \"a\"\nrun = \"true\"\nphases = []\n"),
        ("duplicate user check", "[[check]]\nname = \"a\"\nrun = \"true\"\n[[check]]\nname = \"a\"\nrun = \"false\"\n"),
        ("user check named like a built-in", "[[check]]\nname = \"persistence\"\nrun = \"true\"\n"),
        ("bad check name", "[[check]]\nname = \"app up\"\nrun = \"true\"\n"),
        ("duplicate scenario", "[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = [\"root\"]\n[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = [\"root\"]\n"),
        ("empty setup command", "[[setup]]\nrun = \"  \"\n"),
        ("empty check command", "[[check]]\nname = \"a\"\nrun = \"\"\n"),
        ("empty scenario command in a list", "[[scenario]]\nname = \"s\"\nrun = [\"true\", \"\"]\nchecks = [\"root\"]\n"),
        ("scenario run of the wrong type", "[[scenario]]\nname = \"s\"\nrun = 1\nchecks = [\"root\"]\n"),
        ("scenario without checks", "[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = []\n"),
        ("scenario with an unknown check", "[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = [\"persistance\"]\n"),
        ("invalid stdout regex", "[[check]]\nname = \"a\"\nrun = \"true\"\nstdout_matches = \"(ok\"\n"),
        ("invalid ignore regex", "[boot_health]\nignore = [\"fine\", \"[a-\"]\n"),
        ("relative preserve path", "[state]\npreserve = [\"/var/lib/app\", \"root/.ssh\"]\n"),
        ("preserve path with ..", "[state]\npreserve = [\"/var/../etc\"]\n"),
        ("check with neither run nor unit", "[[check]]\nname = \"a\"\nstdout_contains = \"x\"\n"),
        ("output match without run", "[[check]]\nname = \"a\"\nwait_for_unit = \"app.service\"\nstdout_contains = \"x\"\n"),
        ("unit with spaces", "[[check]]\nname = \"a\"\nwait_for_unit = \"app service\"\n"),
        ("scenarios with an upgrade", "[upgrade]\nrootfs = \"v2.tar\"\n\n[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = [\"root\"]\n"),
        ("build without size", "[build]\nrootfs = \"r.tar\"\n"),
        ("build with a bad size", "[build]\nrootfs = \"r.tar\"\nsize = \"4 gigs\"\n"),
        ("build with a bad label", "[build]\nrootfs = \"r.tar\"\nsize = \"4G\"\nlabel = \"a/b\"\n"),
        ("upgrade without rootfs", "[upgrade]\nlabel = \"v2\"\n"),
        ("upgrade with a bad state_data", "[upgrade]\nrootfs = \"r\"\nstate_data = \"overwrite\"\n"),
    ];
    let mut all = String::new();
    for (what, text) in cases {
        let e = parse(text).expect_err(what);
        assert_eq!(e.file, Path::new("tests/app.toml"), "{what}");
        assert!(e.line > 0, "{what}: no line in {e}");
        all.push_str(&format!("{what}:\n  {e}\n"));
    }
    insta::assert_snapshot!("malformed", all);
}

#[test]
fn a_lifecycle_from_the_command_line_rechecks_the_phases() {
    let s = parse("[[check]]\nname = \"a\"\nrun = \"true\"\nphases = [\"reboot\"]\n").unwrap();
    let e = s.check_run_shape(true).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tests/app.toml:4: check[0].phases: phase \"reboot\" is not one this run has (the run has: boot, upgrade, rollback; reboot and power-cut are the plain run's)"
    );
    let s = parse("[[scenario]]\nname = \"s\"\nrun = \"true\"\nchecks = [\"root\"]\n").unwrap();
    assert!(s.check_run_shape(false).is_ok());
    assert!(s
        .check_run_shape(true)
        .unwrap_err()
        .to_string()
        .starts_with("tests/app.toml:2: scenario[0]: "));
}

#[test]
fn paths_are_checked_where_the_file_gave_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    let text = "image = \"missing.img\"\n\n[upgrade]\nrootfs = \"nowhere\"\n";
    let s = Spec::parse(&file, text).unwrap();
    let e = s.check_inputs(false, false).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (1, "image"));
    assert!(e.message.contains("missing.img"), "{e}");
    // The command line named the image and the upgrade's rootfs.
    assert!(s.check_inputs(true, true).is_ok());
    let e = s.check_inputs(true, false).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (4, "upgrade.rootfs"));
    std::fs::write(dir.path().join("missing.img"), b"").unwrap();
    std::fs::create_dir(dir.path().join("nowhere")).unwrap();
    assert!(s.check_inputs(false, false).is_ok());
    // An image that [build] makes need not exist yet; its rootfs must.
    let s = Spec::parse(
        &file,
        "image = \"new.img\"\n[build]\nrootfs = \"nowhere\"\nsize = \"1G\"\n",
    )
    .unwrap();
    assert!(s.check_inputs(false, false).is_ok());
    let s = Spec::parse(&file, "[build]\nrootfs = \"gone\"\nsize = \"1G\"\n").unwrap();
    assert_eq!(
        s.check_inputs(false, false).unwrap_err().key,
        "build.rootfs"
    );
    let e = Spec::load(&dir.path().join("absent.toml")).unwrap_err();
    assert!(
        e.to_string()
            .contains("absent.toml: cannot read the test file"),
        "{e}"
    );
}

#[test]
fn check_names_from_the_command_line_take_user_checks_too() {
    let ids = builtin_checks(
        &["persistence".into(), "app".into(), "root".into()],
        &["app"],
    )
    .unwrap();
    assert_eq!(ids, [CheckId::Root, CheckId::Persistence]);
    let e = builtin_checks(&["nope".into()], &["app"]).unwrap_err();
    assert!(
        e.starts_with("unknown check \"nope\" (built-in: root, "),
        "{e}"
    );
    assert!(e.ends_with("; user: app)"), "{e}");
}

/// Image changes the renderer never asks for.
struct NotCalled;

impl ImageChanges for NotCalled {
    fn upgrade(
        &self,
        _: &Path,
        _: &str,
        _: &Interrupt,
        _: &mut dyn FnMut(String),
    ) -> Result<Changed, ChangeError> {
        unreachable!("a plan changes no image")
    }

    fn set_default(
        &self,
        _: &Path,
        _: &str,
        _: &Interrupt,
        _: &mut dyn FnMut(String),
    ) -> Result<Changed, ChangeError> {
        unreachable!("a plan changes no image")
    }

    fn read(&self, _: &Path, _: &str) -> Result<Changed, ChangeError> {
        unreachable!("a plan reads no image")
    }
}

#[test]
fn the_plan_of_a_plain_run() {
    let s = parse(FULL).unwrap();
    let mut c = cfg();
    s.apply(&mut c);
    insta::assert_snapshot!("plan_plain", plan::render(&c, None));
}

#[test]
fn the_plan_of_a_first_boot_only_run_with_a_build() {
    let s = parse(
        "checks = [\"root\", \"overmount\"]\n\n[build]\nrootfs = \"rootfs.tar\"\nsize = \"4G\"\n\n[[check]]\nname = \"os\"\nrun = \"cat /etc/os-release\"\n",
    )
    .unwrap();
    let mut c = cfg();
    s.apply(&mut c);
    c.image = s.build.as_ref().unwrap().output.clone();
    // A user check with default phases does not add the later boots.
    assert!(!crate::run::plain_run_reboots(&c));
    insta::assert_snapshot!("plan_first_boot_only", plan::render(&c, s.build.as_ref()));
}

#[test]
fn the_plan_of_an_upgrade_lifecycle() {
    let s = parse(
        "image = \"sys.img\"\n[upgrade]\nrootfs = \"v2.tar\"\nlabel = \"v2\"\n\n[[setup]]\nrun = \"echo 1 > /var/lib/app/x\"\n\n[state]\npreserve = [\"/var/lib/app\"]\n\n[[check]]\nname = \"app\"\nrun = \"true\"\n\n[[check]]\nname = \"migrated\"\nrun = \"test -e /var/lib/app/v2\"\nphases = [\"upgrade\"]\n",
    )
    .unwrap();
    let mut c = cfg();
    s.apply(&mut c);
    c.lifecycle = Some(Lifecycle {
        changes: Arc::new(NotCalled),
        label: "v2".into(),
        interrupt: Interrupt::default(),
        in_guest: None,
        power_cut: None,
    });
    insta::assert_snapshot!("plan_lifecycle", plan::render(&c, None));
}
