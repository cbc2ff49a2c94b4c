//! Copying the rootfs into `orig` with GNU cp: it already preserves every
//! attribute the contract lists (owner, mode, timestamps, xattrs and ACLs,
//! hardlinks, symlinks, device nodes, fifos, holes) and is the floor the
//! benchmark measures against.

use crate::host::cmd::{self, CmdError};
use crate::host::interrupt::Interrupt;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSize {
    pub entries: u64,
    /// Allocated bytes (holes excluded), what the copy will need on disk.
    pub allocated: u64,
}

/// Counts a tree without following symlinks or crossing into other
/// filesystems, the same walk `cp --one-file-system` makes.
pub fn measure(root: &Path) -> std::io::Result<TreeSize> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::symlink_metadata(root)?.dev();
    let mut size = TreeSize::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            size.entries += 1;
            size.allocated += meta.blocks() * 512;
            if meta.is_dir() && meta.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    Ok(size)
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("no space left on the image")]
    NoSpace,
    #[error("interrupted")]
    Interrupted,
}

/// `cp -a src/. dest/`, reporting each copied entry to `progress`.
///
/// `reflink_only` makes cp clone extents instead of copying bytes (both
/// ends on one btrfs), so moving state costs metadata only. Runs through
/// the command runner's interruptible mode: a signal stops cp (its whole
/// process group) and cp dies with strata.
pub fn copy_tree(
    src: &Path,
    dest: &Path,
    reflink_only: bool,
    interrupt: &Interrupt,
    mut progress: impl FnMut(u64),
) -> Result<(), CopyError> {
    let mut c = Command::new("cp");
    // An explicit --preserve=xattr makes a lost xattr an error (plain -a
    // ignores it).
    c.args([
        "--archive",
        "--preserve=xattr",
        "--one-file-system",
        "--verbose",
    ]);
    if reflink_only {
        c.arg("--reflink=always");
    }
    c.arg(src.join(".")).arg(dest);
    let mut done = 0;
    let result = cmd::run_interruptible(&mut c, interrupt, &mut |line| {
        // `--verbose` prints `'a' -> 'b'` per entry.
        if line.windows(5).any(|w| w == b"' -> '") {
            done += 1;
            if done % 64 == 0 {
                progress(done);
            }
        }
    });
    match result {
        Ok(()) => {
            progress(done);
            Ok(())
        }
        Err(CmdError::Interrupted { .. }) => Err(CopyError::Interrupted),
        Err(e) if e.stderr().contains("No space left on device") => Err(CopyError::NoSpace),
        Err(e) => Err(e.into()),
    }
}
