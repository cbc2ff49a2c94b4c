//! What a rootless build needs from the host, checked before anything is
//! created; each refusal names what is missing and how to get it.

use super::wire::RootfsKind;
use super::RootlessOptions;
use crate::build::{self, BuildOptions};
use crate::error::BuildError;
use crate::host::guestfish::{missing as appliance_missing, on_path};
use crate::rootfs_tar::{self, RootfsInput};
use std::path::Path;
use std::process::Command;

fn input(msg: impl Into<String>) -> BuildError {
    BuildError::Input(msg.into())
}

/// Every check; returns what kind of rootfs was given. What the inputs
/// alone refuse (the privileged build's own checks, less its root check)
/// comes before the host's tools, and all of it before the long copy.
pub fn check(opts: &BuildOptions, r: &RootlessOptions) -> Result<RootfsKind, BuildError> {
    utf8_paths(opts)?;
    let kind = rootfs_kind(&opts.rootfs)?;
    if kind == RootfsKind::Dir {
        // Else the copy into staging (next to the output) would take in
        // the staging directory itself, without end.
        build::check_rootfs_and_output(&opts.rootfs, &opts.output)?;
    }
    build::check_options(opts)?;
    user_namespace()?;
    mkfs_rootdir()?;
    if let Some(missing) = appliance_missing(r.accel) {
        return Err(input(format!("rootless build: {missing}")));
    }
    extlinux()?;
    Ok(kind)
}

/// The request reaches the worker as JSON, which holds only UTF-8 paths.
fn utf8_paths(opts: &BuildOptions) -> Result<(), BuildError> {
    let paths = [
        ("--rootfs", Some(&opts.rootfs)),
        ("--output", Some(&opts.output)),
        ("--manifest", Some(&opts.manifest)),
        ("--kernel", opts.kernel.as_ref()),
        ("--initramfs", opts.initramfs.as_ref()),
    ];
    for (arg, path) in paths {
        if let Some(p) = path.filter(|p| p.to_str().is_none()) {
            return Err(input(format!(
                "{arg} {}: the path is not valid UTF-8, which the rootless build cannot hand to its worker: rename it (or build as root with --backend privileged)",
                p.display()
            )));
        }
    }
    Ok(())
}

/// A directory or a tar archive (`rootfs_tar::classify` reads its first
/// bytes); a missing rootfs is refused here, before anything is made.
fn rootfs_kind(path: &Path) -> Result<RootfsKind, BuildError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(input(format!("rootfs {}: {e}", path.display())));
    }
    match rootfs_tar::classify(path).map_err(|e| input(e.to_string()))? {
        RootfsInput::Dir => Ok(RootfsKind::Dir),
        RootfsInput::Tar(_) => Ok(RootfsKind::Tar),
    }
}

/// The name newuidmap looks up in /etc/subuid: the passwd entry of our uid
/// (not $USER, which `su`/`setpriv` may leave as someone else's).
fn user_name() -> String {
    let uid = rustix::process::getuid().as_raw().to_string();
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.get(2) == Some(&uid.as_str())).then(|| f[0].to_owned())
        })
        .unwrap_or(uid)
}

/// `unshare --map-auto --map-root-user` works: util-linux ≥ 2.38,
/// newuidmap/newgidmap (package uidmap), a subordinate id range.
fn user_namespace() -> Result<(), BuildError> {
    if on_path("unshare").is_none() {
        return Err(input(
            "rootless build: unshare not found: install util-linux (2.38 or later)",
        ));
    }
    for tool in ["newuidmap", "newgidmap"] {
        if on_path(tool).is_none() {
            return Err(input(format!(
                "rootless build: {tool} not found: install the package uidmap (it maps the rootfs's owners into a user namespace)"
            )));
        }
    }
    let user = user_name();
    let uid = rustix::process::getuid().as_raw().to_string();
    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let has = text
            .lines()
            .any(|l| l.split(':').next().is_some_and(|n| n == user || n == uid));
        if !has {
            return Err(input(format!(
                "rootless build: no subordinate id range for user {user} in {file}: ask an administrator to run `usermod {flag} 100000-165535 {user}` (a range of 65536 ids that no other user has)"
            )));
        }
    }
    let out = Command::new("unshare")
        .args(["--map-auto", "--map-root-user", "--", "true"])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(input(format!(
            "rootless build: `unshare --map-auto --map-root-user` fails: {} (needs util-linux 2.38 or later, the uidmap package, a subuid/subgid range for {user}, and unprivileged user namespaces enabled: sysctl kernel.unprivileged_userns_clone=1)",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(input(format!("rootless build: running unshare: {e}"))),
    }
}

/// mkfs.btrfs with `--rootdir` and `--subvol` (btrfs-progs 6.? or later).
fn mkfs_rootdir() -> Result<(), BuildError> {
    let help = Command::new("mkfs.btrfs").arg("--help").output();
    let text = match help {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => {
            return Err(input(
                "rootless build: mkfs.btrfs not found: install btrfs-progs (6.14 from bookworm-backports on Debian 12)",
            ))
        }
    };
    if !(text.contains("--rootdir") && text.contains("--subvol")) {
        return Err(input(
            "rootless build: this mkfs.btrfs has no --subvol (or --rootdir): install a newer btrfs-progs (6.14 from bookworm-backports on Debian 12: apt-get install -t bookworm-backports btrfs-progs)",
        ));
    }
    Ok(())
}

/// The appliance installs the bootloader with its `extlinux`, and supermin
/// builds the appliance from the host's packages: the host needs it too.
fn extlinux() -> Result<(), BuildError> {
    let found = on_path("extlinux").is_some()
        || ["/usr/bin/extlinux", "/usr/sbin/extlinux", "/sbin/extlinux"]
            .iter()
            .any(|p| Path::new(p).is_file());
    if !found {
        return Err(input(
            "rootless build: extlinux not found: install the package extlinux (the libguestfs appliance, built from the host's packages, installs the bootloader with it)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(rootfs: &Path, output: &Path) -> BuildOptions {
        BuildOptions {
            rootfs: rootfs.to_owned(),
            output: output.to_owned(),
            size: 1 << 30,
            label: crate::layout::DEFAULT_LABEL.into(),
            state_dirs: vec![],
            root_device: None,
            kernel: None,
            initramfs: None,
            initramfs_in_rootfs: None,
            kernel_args: String::new(),
            migration: crate::migrate::Migration::Move,
            manifest: output.with_extension("json"),
            force: false,
            fs_uuid: None,
        }
    }

    /// Each refusal comes from the inputs alone, before the host's tools
    /// are looked at (so it holds on any host).
    #[test]
    fn inputs_are_refused_before_the_host_is_looked_at() {
        let t = tempfile::tempdir().unwrap();
        let rootfs = t.path().join("r");
        std::fs::create_dir(&rootfs).unwrap();
        let r = RootlessOptions::default();
        let refused = |o: &BuildOptions| match check(o, &r) {
            Err(BuildError::Input(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = refused(&opts(&rootfs, &rootfs.join("out.img")));
        assert!(m.contains("is inside rootfs"), "{m}");
        std::fs::create_dir(rootfs.join("sub")).unwrap();
        let m = refused(&opts(&rootfs, &rootfs.join("sub/out.img")));
        assert!(m.contains("is inside rootfs"), "{m}");
        let out = t.path().join("out.img");
        let m = refused(&BuildOptions {
            label: "a/b".into(),
            ..opts(&rootfs, &out)
        });
        assert!(m.contains("a/b"), "{m}");
        let m = refused(&BuildOptions {
            size: 1 << 20,
            ..opts(&rootfs, &out)
        });
        assert!(m.contains("too small"), "{m}");
        let m = refused(&BuildOptions {
            fs_uuid: Some("nope".into()),
            ..opts(&rootfs, &out)
        });
        assert!(m.contains("--fs-uuid"), "{m}");
        let m = refused(&BuildOptions {
            kernel: Some(t.path().join("no-vmlinuz")),
            ..opts(&rootfs, &out)
        });
        assert!(m.contains("no-vmlinuz"), "{m}");
        let m = refused(&BuildOptions {
            state_dirs: vec!["../x".into()],
            ..opts(&rootfs, &out)
        });
        assert!(m.contains("../x"), "{m}");
        use std::os::unix::ffi::OsStrExt;
        let bad = t.path().join(std::ffi::OsStr::from_bytes(b"k\xff"));
        let m = refused(&BuildOptions {
            initramfs: Some(bad.clone()),
            ..opts(&rootfs, &out)
        });
        assert!(m.starts_with("--initramfs ") && m.contains("UTF-8"), "{m}");
        let m = refused(&opts(&rootfs, &bad));
        assert!(m.starts_with("--output ") && m.contains("UTF-8"), "{m}");
    }
}
