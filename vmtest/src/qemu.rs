//! The QEMU command line as a typed value: built, printed and tested before
//! anything is spawned.

use serde::Serialize;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The CPU model, picked deliberately: under TCG `max` (every feature
    /// TCG emulates, rather than the 2004-era `qemu64` default); under KVM
    /// `host` (the real CPU: what the image will meet on hardware, and no
    /// slow emulated features).
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// `strata test --disk-bus` (`virtio-blk`, `virtio-scsi`: clap's kebab
/// case, as serde's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    VirtioBlk,
    VirtioScsi,
}

impl fmt::Display for DiskBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskBus::VirtioBlk => "virtio-blk",
            DiskBus::VirtioScsi => "virtio-scsi",
        })
    }
}

/// What the disk file is. The plain run boots a qcow2 overlay backed by the
/// image; the upgrade lifecycle boots its private raw copy of the image,
/// which it changes offline between boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// QEMU's block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// How the guest kernel gets loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelBoot {
    /// SeaBIOS reads the image's own boot sector (extlinux).
    Firmware,
    /// QEMU loads kernel and initramfs extracted from the image.
    Direct {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

/// The qdev id of the guest agent's virtio-serial port. QEMU names a port
/// in `VSERPORT_CHANGE` only when it has an id; the event tells the moment
/// the guest's qemu-guest-agent opens the port (and when it closes it).
pub const AGENT_PORT_ID: &str = "qga-port";

/// The block node of the disk (`-blockdev node-name=`): what QMP names
/// when it snapshots the disk.
pub const DISK_NODE: &str = "disk0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    pub binary: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The qcow2 overlay (the image under test is only ever its backing
    /// file), or a private raw copy of the image (`disk_format`).
    pub disk: PathBuf,
    pub disk_format: DiskFormat,
    pub disk_bus: DiskBus,
    pub boot: KernelBoot,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub qga_socket: PathBuf,
    /// Start with the CPUs stopped so QMP is connected before the guest runs
    /// and no early event can be missed.
    pub start_paused: bool,
    /// The firmware's debug console (isa-debugcon, port 0x402) to this
    /// file: how `accel` sees SeaBIOS reach its boot phase under KVM.
    pub debugcon: Option<PathBuf>,
    /// Wait for a saved state (`-incoming defer`, then QMP
    /// `migrate-incoming`) instead of booting: a scenario's restore.
    pub incoming: bool,
    /// Where QEMU's stdout and stderr go (appended): its own words on why
    /// it stopped or aborted ("KVM internal error", an assertion) are
    /// evidence, kept as an artifact per QEMU process.
    pub output_log: PathBuf,
    /// A second disk, raw and read-only, with what the guest is to be
    /// handed (an in-guest upgrade's strata binary and new rootfs): the
    /// guest sees it as `/dev/disk/by-id/virtio-strata-payload`. Faster
    /// than the agent's file transfer and needs no network.
    pub payload: Option<PathBuf>,
}

/// The payload disk's serial: its name under `/dev/disk/by-id/virtio-…`.
pub const PAYLOAD_SERIAL: &str = "strata-payload";

impl QemuCommand {
    pub fn new(binary: PathBuf, accel: Accel, disk: PathBuf, socket_dir: &std::path::Path) -> Self {
        QemuCommand {
            binary,
            accel,
            memory_mib: 1024,
            cpus: 1,
            disk,
            disk_format: DiskFormat::Qcow2,
            disk_bus: DiskBus::VirtioBlk,
            boot: KernelBoot::Firmware,
            serial_log: socket_dir.join("serial.log"),
            qmp_socket: socket_dir.join("qmp.sock"),
            qga_socket: socket_dir.join("qga.sock"),
            start_paused: true,
            debugcon: None,
            incoming: false,
            output_log: socket_dir.join("qemu-output.log"),
            payload: None,
        }
    }

    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        // -nodefaults: no floppy (its I/O errors), no NIC (no iPXE ROM delay),
        // no default VGA; we add exactly the devices we need.
        push("-nodefaults");
        push("-no-user-config");
        push("-machine");
        push(&format!("pc,accel={}", self.accel));
        push("-cpu");
        push(self.accel.cpu_model());
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.cpus.to_string());
        push("-display");
        push("none");
        // The guest clock starts from the host's (UTC) and follows it: file
        // times the guest writes are comparable with the build's, which
        // moved-files relies on. (QEMU's default; spelled out because the
        // checks depend on it.)
        push("-rtc");
        push("base=utc,clock=host");
        // A VGA device gives QMP screendump something to capture on failure.
        push("-device");
        push("VGA");
        // pvpanic turns a guest kernel panic into a GUEST_PANICKED event.
        push("-device");
        push("pvpanic");
        push("-chardev");
        push(&format!(
            "file,id=serial0,path={},append=on",
            path_arg(&self.serial_log)
        ));
        push("-serial");
        push("chardev:serial0");
        push("-chardev");
        push(&format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            path_arg(&self.qmp_socket)
        ));
        push("-mon");
        push("chardev=qmp0,mode=control");
        push("-chardev");
        push(&format!(
            "socket,id=qga0,path={},server=on,wait=off",
            path_arg(&self.qga_socket)
        ));
        push("-device");
        push("virtio-serial-pci,id=vser0");
        push("-device");
        push(&format!(
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0,id={AGENT_PORT_ID}"
        ));
        push("-blockdev");
        push(&format!(
            "driver={},node-name={DISK_NODE},file.driver=file,file.filename={}",
            self.disk_format.driver(),
            path_arg(&self.disk)
        ));
        // -kernel claims boot index 0 for its loader ROM; only firmware boot
        // needs the disk first in line.
        let bootindex = match self.boot {
            KernelBoot::Firmware => ",bootindex=0",
            KernelBoot::Direct { .. } => "",
        };
        match self.disk_bus {
            DiskBus::VirtioBlk => {
                push("-device");
                push(&format!("virtio-blk-pci,drive={DISK_NODE}{bootindex}"));
            }
            DiskBus::VirtioScsi => {
                push("-device");
                push("virtio-scsi-pci,id=scsi0");
                push("-device");
                push(&format!("scsi-hd,bus=scsi0.0,drive={DISK_NODE}{bootindex}"));
            }
        }
        if let Some(p) = &self.payload {
            push("-blockdev");
            push(&format!(
                "driver=raw,node-name=payload0,read-only=on,file.driver=file,file.filename={}",
                path_arg(p)
            ));
            push("-device");
            push(&format!(
                "virtio-blk-pci,drive=payload0,serial={PAYLOAD_SERIAL}"
            ));
        }
        if let KernelBoot::Direct {
            kernel,
            initrd,
            append,
        } = &self.boot
        {
            a.push("-kernel".into());
            a.push(kernel.into());
            if let Some(initrd) = initrd {
                a.push("-initrd".into());
                a.push(initrd.into());
            }
            a.push("-append".into());
            a.push(append.into());
        }
        if let Some(log) = &self.debugcon {
            a.extend(debugcon_args(log));
        }
        if self.incoming {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        if self.start_paused {
            a.push("-S".into());
        }
        a
    }

    pub fn to_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        // stdout and stderr go to `output_log`: `Machine` opens it and
        // replaces these.
        cmd.args(self.args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        tie_to_us(&mut cmd);
        cmd
    }
}

/// SeaBIOS's debug output (port 0x402) to `log`.
pub fn debugcon_args(log: &std::path::Path) -> Vec<OsString> {
    [
        "-chardev".to_owned(),
        format!("file,id=dbg,path={}", path_arg(log)),
        "-device".to_owned(),
        "isa-debugcon,iobase=0x402,chardev=dbg".to_owned(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// Makes a QEMU (or any helper) process die with strata, however strata
/// ends: killed on drop (an orderly stop), in its own process group (a
/// terminal's Ctrl-C reaches only strata, which then writes its report and
/// kills QEMU itself) and with `PR_SET_PDEATHSIG(SIGKILL)`, so that even a
/// SIGKILLed strata leaves no QEMU behind.
///
/// The death signal follows the thread that spawns: QEMU is spawned from
/// the thread driving the run (the CLI's main thread, or a runtime worker
/// that lives as long as the runtime), never from a short-lived blocking
/// thread.
pub fn tie_to_us(cmd: &mut tokio::process::Command) {
    let parent = rustix::process::getpid();
    cmd.kill_on_drop(true).process_group(0);
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (prctl, getppid, kill).
    unsafe {
        cmd.pre_exec(move || {
            use rustix::process::{getppid, set_parent_process_death_signal, Signal};
            set_parent_process_death_signal(Some(Signal::KILL)).map_err(std::io::Error::from)?;
            // strata may have died between fork and prctl: then no signal
            // will ever come, so do not start at all.
            if getppid() != Some(parent) {
                return Err(std::io::Error::other("strata exited while starting QEMU"));
            }
            Ok(())
        });
    }
}

/// QEMU's option parser splits on commas; a doubled comma is a literal one.
fn path_arg(p: &std::path::Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl fmt::Display for QemuCommand {
    /// A shell-pasteable command line, for the report and for reproducing by hand.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", shell_quote(&self.binary.display().to_string()))?;
        for arg in self.args() {
            write!(f, " {}", shell_quote(&arg.to_string_lossy()))?;
        }
        Ok(())
    }
}

pub(crate) fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:+@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How QEMU gets to the guest kernel: through the firmware and the
/// image's own extlinux, or directly (`-kernel/-initrd/-append`);
/// `strata test --boot`/`--later-boots` (`extlinux`, `direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    Extlinux,
    Direct,
}

impl BootMode {
    pub fn name(self) -> &'static str {
        match self {
            BootMode::Extlinux => "extlinux",
            BootMode::Direct => "direct",
        }
    }

    /// How a QEMU command line boots.
    pub fn of(boot: &KernelBoot) -> BootMode {
        match boot {
            KernelBoot::Firmware => BootMode::Extlinux,
            KernelBoot::Direct { .. } => BootMode::Direct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn base(accel: Accel) -> QemuCommand {
        QemuCommand::new(
            "qemu-system-x86_64".into(),
            accel,
            "/tmp/strata-x/overlay.qcow2".into(),
            Path::new("/tmp/strata-x"),
        )
    }

    #[test]
    fn extlinux_virtio_blk_tcg() {
        insta::assert_snapshot!(base(Accel::Tcg).to_string());
    }

    #[test]
    fn a_payload_is_a_second_read_only_disk_the_guest_finds_by_serial() {
        let mut q = base(Accel::Tcg);
        q.payload = Some("/tmp/strata-x/payload.img".into());
        let line = q.to_string();
        assert!(line.contains(
            "-blockdev driver=raw,node-name=payload0,read-only=on,file.driver=file,file.filename=/tmp/strata-x/payload.img -device virtio-blk-pci,drive=payload0,serial=strata-payload"
        ), "{line}");
        // After the system disk: the guest's vda stays the system.
        assert!(line.find("drive=disk0") < line.find("drive=payload0"));
    }

    #[test]
    fn direct_virtio_scsi_kvm() {
        let mut q = base(Accel::Kvm);
        q.disk_bus = DiskBus::VirtioScsi;
        q.boot = KernelBoot::Direct {
            kernel: "/tmp/strata-x/kernel".into(),
            initrd: Some("/tmp/strata-x/initramfs".into()),
            append: "root=UUID=0b1c rootflags=subvol=systems/factory/run rw console=ttyS0,115200"
                .into(),
        };
        q.start_paused = false;
        insta::assert_snapshot!(q.to_string());
    }

    fn pair(args: &[OsString], flag: &str) -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        Some(args.get(i + 1)?.to_string_lossy().into_owned())
    }

    #[test]
    fn the_cpu_model_is_max_under_tcg_and_host_under_kvm() {
        assert_eq!(
            pair(&base(Accel::Tcg).args(), "-cpu").as_deref(),
            Some("max")
        );
        assert_eq!(
            pair(&base(Accel::Kvm).args(), "-cpu").as_deref(),
            Some("host")
        );
    }

    #[test]
    fn the_guest_clock_follows_the_host_and_the_agent_port_has_an_id() {
        let args = base(Accel::Tcg).args();
        assert_eq!(pair(&args, "-rtc").as_deref(), Some("base=utc,clock=host"));
        assert!(args.iter().any(|a| a
            .to_string_lossy()
            .ends_with(&format!(",id={AGENT_PORT_ID}"))));
    }

    #[test]
    fn commas_in_paths_are_escaped_for_qemu() {
        let mut q = base(Accel::Tcg);
        q.disk = "/tmp/a,b/overlay.qcow2".into();
        let args: Vec<String> = q
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(
            &"driver=qcow2,node-name=disk0,file.driver=file,file.filename=/tmp/a,,b/overlay.qcow2"
                .to_string()
        ));
    }

    #[test]
    fn a_private_raw_copy_is_booted_as_raw() {
        let mut q = base(Accel::Tcg);
        q.disk = "/var/tmp/.strata-lifecycle.x/debian.img".into();
        q.disk_format = DiskFormat::Raw;
        assert!(q.to_string().contains(
            " -blockdev driver=raw,node-name=disk0,file.driver=file,file.filename=/var/tmp/.strata-lifecycle.x/debian.img "
        ));
    }

    #[test]
    fn quoting_round_trips_awkward_arguments() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("plain-arg=1,2"), "plain-arg=1,2");
        assert_eq!(shell_quote(""), "''");
    }
}
