//! The strata system this process runs in: the btrfs device behind `/` and
//! the version booted (`/` is `systems/<label>/run`, layout.md §1), read
//! from `/proc/self/mountinfo`. `strata upgrade --running` and the
//! `--running` forms of `versions`, `set-default` and `remove` work on that
//! device through the same code as on an image (`upgrade::Target`).
//!
//! Their mounts of the top level happen in a mount namespace of their own
//! with every mount private (`enter_private_mount_namespace`): nothing
//! strata mounts propagates into the running system (systemd makes `/`
//! shared, and services with private namespaces are its slaves), and the
//! kernel takes the mounts down with the namespace when strata dies, even
//! of SIGKILL. The mount dirs keep `mount`'s pid-named private 0700 form,
//! so `debris` judges what is left of them as it does on a host.

use crate::image::ImageError;
use crate::layout::{self, Version};
use std::path::PathBuf;

/// Where `/` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The block device mounted at `/` (mountinfo's source, e.g. `/dev/vda`).
    pub device: PathBuf,
    /// The version whose `run` is `/`.
    pub booted: Version,
}

/// Reads this process's mount table.
pub fn find() -> Result<Running, ImageError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
        ImageError::Input(format!(
            "reading /proc/self/mountinfo: {e} (--running needs /proc mounted)"
        ))
    })?;
    parse(&text).map_err(ImageError::Input)
}

/// The device and booted version from a mountinfo text: the last mount at
/// `/` (a later mount over `/` hides the earlier ones) must be btrfs from a
/// device under `/dev`, with `systems/<label>/run` as its root inside the
/// filesystem (mountinfo's 4th field, the path the kernel resolved; a
/// boot through `rootflags=subvol=systems/default/run` shows the label the
/// link named at boot).
pub fn parse(mountinfo: &str) -> Result<Running, String> {
    let not = |why: String| {
        format!("--running: this is not a booted strata system: {why} (run it inside one, or give the IMAGE instead)")
    };
    let root = mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (crate::fstab::unescape(f.get(4)?) == "/").then(|| {
            (
                crate::fstab::unescape(f.get(3).copied().unwrap_or("")),
                f.get(sep + 1).copied().unwrap_or("").to_owned(),
                crate::fstab::unescape(f.get(sep + 2).copied().unwrap_or("")),
            )
        })
    });
    let Some((fsroot, fstype, source)) = root else {
        return Err(not("no mount at / in /proc/self/mountinfo".into()));
    };
    if fstype != "btrfs" {
        return Err(not(format!("/ is {fstype} from {source}, not btrfs")));
    }
    let label = fsroot
        .strip_prefix('/')
        .and_then(|r| r.strip_prefix(layout::SYSTEMS_DIR))
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_suffix("/run"))
        .filter(|l| !l.contains('/'));
    let Some(label) = label else {
        return Err(not(format!(
            "/ is {fsroot} of {source}, not {}",
            layout::fsroot(&Version::found("<label>").run())
        )));
    };
    let booted =
        Version::new(label).map_err(|e| not(format!("/ is {fsroot} of {source}, and {e}")))?;
    if !source.starts_with("/dev/") {
        return Err(not(format!(
            "/ is btrfs from {source}, not from a device under /dev"
        )));
    }
    Ok(Running {
        device: PathBuf::from(source),
        booted,
    })
}

/// Moves this process into a new mount namespace whose mounts are all
/// private (as `unshare --mount` does): what strata mounts from now on is
/// seen by no other process and goes away when strata exits, however it
/// exits. Only a single-threaded process can do it for all of itself (the
/// namespace is per thread; threads made later inherit it), so call it
/// before anything starts a thread.
pub fn enter_private_mount_namespace() -> Result<(), ImageError> {
    let tool = |what: &str, e: std::io::Error| ImageError::Tool {
        context: format!("--running: {what}"),
        error: e.into(),
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(ImageError::Input(format!(
            "--running must run as root (uid {euid}): it mounts the running system's filesystem"
        )));
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| tool("counting this process's threads", e))?
        .count();
    if threads != 1 {
        return Err(tool(
            "entering a private mount namespace",
            std::io::Error::other(format!(
                "{threads} threads already run; the namespace would hold only this one"
            )),
        ));
    }
    // SAFETY: plain system calls on constant arguments.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(tool(
            "entering a private mount namespace (unshare)",
            std::io::Error::last_os_error(),
        ));
    }
    let root = c"/";
    // SAFETY: as above; the null pointers are allowed for a propagation change.
    let made_private = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if made_private != 0 {
        return Err(tool(
            "making the mounts of the new namespace private",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `find`, then `enter_private_mount_namespace`: what every `--running`
/// command does first.
pub fn enter() -> Result<Running, ImageError> {
    let running = find()?;
    enter_private_mount_namespace()?;
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debian bookworm guest booted from a strata image through
    /// `rootflags=subvol=systems/default/run` (taken from a VM test).
    const GUEST: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
23 28 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
24 28 0:5 / /dev rw,nosuid,relatime shared:9 - devtmpfs udev rw,size=987764k,nr_inodes=246941,mode=755
28 1 0:26 /systems/v2/run / rw,noatime shared:1 - btrfs /dev/vda rw,space_cache=v2,subvolid=262,subvol=/systems/v2/run
30 28 0:26 /state/home /home rw,noatime shared:15 - btrfs /dev/vda rw,space_cache=v2,subvolid=257,subvol=/state/home
31 28 0:26 /state/var /var rw,noatime shared:16 - btrfs /dev/vda rw,space_cache=v2,subvolid=261,subvol=/state/var
32 28 0:34 / /tmp rw,nosuid,nodev shared:17 - tmpfs tmpfs rw,size=1000k
";

    #[test]
    fn the_booted_version_and_device_of_a_guest() {
        let r = parse(GUEST).unwrap();
        assert_eq!(r.device, PathBuf::from("/dev/vda"));
        assert_eq!(r.booted.label(), "v2");
    }

    /// In the chroot of the integration test `/` is a mount of the run
    /// subvolume from a loop device; the process's root hides the rest.
    #[test]
    fn a_chroot_into_a_run_subvolume_counts() {
        let text = "\
812 811 7:3 /systems/factory/run / rw,relatime - btrfs /dev/loop3 rw,space_cache=v2,subvolid=258,subvol=/systems/factory/run
813 812 0:23 / /proc rw,relatime - proc proc rw
";
        let r = parse(text).unwrap();
        assert_eq!(r.device, PathBuf::from("/dev/loop3"));
        assert_eq!(r.booted.label(), "factory");
    }

    #[test]
    fn the_last_mount_over_root_wins() {
        let text = format!(
            "{GUEST}40 28 0:40 / / rw - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c\n"
        );
        let e = parse(&text).unwrap_err();
        assert!(e.contains("/ is overlay from overlay, not btrfs"), "{e}");
    }

    #[test]
    fn anything_but_a_run_subvolume_is_refused_naming_it() {
        // A host on ext4.
        let e =
            parse("25 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n").unwrap_err();
        assert!(
            e.contains("/ is ext4 from /dev/nvme0n1p2, not btrfs"),
            "{e}"
        );
        // A btrfs root that is no strata layout (a distribution's @ subvolume).
        let e =
            parse("25 1 0:26 /@ / rw - btrfs /dev/sda2 rw,subvolid=256,subvol=/@\n").unwrap_err();
        assert!(
            e.contains("/ is /@ of /dev/sda2, not /systems/<label>/run"),
            "{e}"
        );
        // A version's orig booted by hand, and a deeper path.
        for root in ["/systems/v1/orig", "/systems/v1/run/x", "/systems/run"] {
            let line = format!("25 1 0:26 {root} / rw - btrfs /dev/vda rw\n");
            assert!(parse(&line).is_err(), "{root}");
        }
        // A reserved name is no version.
        let e = parse("25 1 0:26 /systems/.strata-partial-v3/run / rw - btrfs /dev/vda rw\n")
            .unwrap_err();
        assert!(e.contains(".strata-partial-v3"), "{e}");
        // Not from a device (a btrfs seen through some other source).
        let e = parse("25 1 0:26 /systems/v1/run / rw - btrfs none rw\n").unwrap_err();
        assert!(e.contains("not from a device under /dev"), "{e}");
        assert!(parse("").unwrap_err().contains("no mount at /"));
    }

    #[test]
    fn escaped_fields_are_read_unescaped() {
        let text = "25 1 0:26 /systems/v1/run / rw - btrfs /dev/disk/by-id/my\\040disk rw\n";
        assert_eq!(
            parse(text).unwrap().device,
            PathBuf::from("/dev/disk/by-id/my disk")
        );
    }
}
