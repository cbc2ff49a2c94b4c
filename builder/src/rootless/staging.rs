//! The rootless build's top level: a plain directory that becomes the image
//! through `mkfs.btrfs --rootdir … --subvol rw:…`. Subvolumes are
//! directories remembered for mkfs; what needs a mounted btrfs (the `run`
//! snapshot, extlinux) is recorded for the appliance.

use super::wire::Work;
use crate::error::BoxError;
use crate::host::cmd::{self, CmdError};
use crate::host::interrupt::Interrupt;
use crate::toplevel::TopLevel;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug)]
pub struct Staging {
    top: PathBuf,
    /// Image-relative paths that mkfs makes subvolumes, in creation order.
    subvolumes: Vec<String>,
    work: Work,
}

impl Staging {
    /// `top` exists and is empty.
    pub fn new(top: PathBuf) -> Self {
        Staging {
            top,
            subvolumes: Vec::new(),
            work: Work::default(),
        }
    }

    pub fn subvolumes(&self) -> &[String] {
        &self.subvolumes
    }

    /// What is left for the appliance.
    pub fn into_work(self) -> Work {
        self.work
    }

    pub fn work_mut(&mut self) -> &mut Work {
        &mut self.work
    }
}

impl TopLevel for Staging {
    fn path(&self) -> &Path {
        &self.top
    }

    fn create_subvolume(&mut self, rel: &str) -> Result<(), BoxError> {
        std::fs::create_dir(self.top.join(rel))?;
        self.subvolumes.push(rel.to_owned());
        Ok(())
    }

    fn snapshot(&mut self, from: &str, to: &str) -> Result<(), BoxError> {
        if !self.subvolumes.iter().any(|s| s == from) {
            return Err(format!("{from} is not a subvolume").into());
        }
        self.work.snapshots.push((from.to_owned(), to.to_owned()));
        Ok(())
    }

    fn install_bootloader(&mut self) -> Result<(), BoxError> {
        self.work.bootloader = true;
        Ok(())
    }

    fn clones_extents(&self) -> bool {
        // The staging directory sits next to the output, on whatever
        // filesystem that is; cp falls back to copying bytes without
        // --reflink=always (the move is verified either way).
        false
    }
}

/// `mkfs.btrfs` arguments that turn `rootdir` into the image's top level
/// with `subvolumes` as writable subvolumes (btrfs-progs ≥ 6.? for
/// `--subvol`; 6.14 here).
pub fn mkfs_args(
    image: &Path,
    rootdir: &Path,
    subvolumes: &[String],
    label: &str,
    uuid: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--quiet", "--label", label, "--uuid", uuid]
        .iter()
        .map(OsString::from)
        .collect();
    args.push("--rootdir".into());
    args.push(rootdir.into());
    for s in subvolumes {
        args.push("--subvol".into());
        // `rw:` always: a path containing a colon would otherwise be read
        // as TYPE:SUBDIR.
        args.push(format!("rw:{s}").into());
    }
    args.push(image.into());
    args
}

/// Interruptible, and in its own process group with a parent-death
/// signal: it stops with the worker (and so with strata) instead of
/// writing on into an image nobody waits for.
pub fn mkfs(
    image: &Path,
    rootdir: &Path,
    subvolumes: &[String],
    label: &str,
    uuid: &str,
    interrupt: &Interrupt,
) -> Result<(), CmdError> {
    cmd::run_interruptible(
        Command::new("mkfs.btrfs").args(mkfs_args(image, rootdir, subvolumes, label, uuid)),
        interrupt,
        &mut |_| {},
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{self, Version};

    #[test]
    fn subvolumes_become_mkfs_arguments_and_snapshots_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::new(dir.path().to_owned());
        let v = Version::new("factory").unwrap();
        std::fs::create_dir_all(dir.path().join(v.dir())).unwrap();
        std::fs::create_dir_all(dir.path().join(layout::STATE_DIR)).unwrap();
        s.create_subvolume(&v.orig()).unwrap();
        s.create_subvolume(&layout::state("home")).unwrap();
        assert!(dir.path().join(v.orig()).is_dir());
        s.snapshot(&v.orig(), &v.run()).unwrap();
        assert!(
            !dir.path().join(v.run()).exists(),
            "the snapshot is the appliance's"
        );
        assert!(s.snapshot("systems/nope", &v.run()).is_err());
        s.install_bootloader().unwrap();
        let args = mkfs_args(
            Path::new("/o/.x.img"),
            dir.path(),
            s.subvolumes(),
            layout::FS_LABEL,
            "6f1d",
        );
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.to_string_lossy()
                    .replace(&*dir.path().to_string_lossy(), "STAGE")
            })
            .collect();
        insta::assert_snapshot!(args.join(" "));
        let work = s.into_work();
        assert_eq!(work.snapshots, [(v.orig(), v.run())]);
        assert!(work.bootloader);
    }
}
