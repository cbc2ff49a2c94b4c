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

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

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
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.cpus.to_string());
        push("-display");
        push("none");
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
        push("virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0");
        push("-blockdev");
        push(&format!(
            "driver={},node-name=disk0,file.driver=file,file.filename={}",
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
                push(&format!("virtio-blk-pci,drive=disk0{bootindex}"));
            }
            DiskBus::VirtioScsi => {
                push("-device");
                push("virtio-scsi-pci,id=scsi0");
                push("-device");
                push(&format!("scsi-hd,bus=scsi0.0,drive=disk0{bootindex}"));
            }
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
        if self.start_paused {
            a.push("-S".into());
        }
        a
    }

    pub fn to_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
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
