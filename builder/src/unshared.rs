//! The data bytes a version's trees hold that nothing else on the
//! filesystem references: what removing the version gives back (data only;
//! metadata and inline files aside).
//!
//! Why not `btrfs filesystem du` (`du`): measured with btrfs-progs 6.14, `fi
//! du -s A B` summarises each argument on its own (one line per path, its
//! "set shared" counted within that path only), and its "exclusive" is the
//! extents no other file references at all. A version's `run` is a snapshot
//! of its `orig`, so nearly every byte of a version is "shared" — with its
//! own other tree — and exclusive is ~0 whether or not another version
//! holds the same bytes; and exclusive + set shared of `systems/<label>` is
//! everything the version references, shared with other versions or not.
//! Neither tells the bytes only this version holds.
//!
//! So: one walk of the whole filesystem reads every regular file's extents
//! (FIEMAP). An extent the filesystem does not flag shared belongs to the
//! one file that has it; the shared ones are compared by physical range:
//! a version's ranges minus every range referenced from outside its
//! directory. A file that references part of an extent counts that part
//! (btrfs frees an extent only when its last reference goes, so a partly
//! overwritten extent may keep more on disk than this says).

use crate::extents::data_extents;
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What one owner holds: `trees` (image-relative paths, e.g. a version's
/// `orig` and `run`) are counted; the rest of `dir` (its kernel, say) is
/// neither counted nor compared against.
#[derive(Debug, Clone)]
pub struct Owner {
    pub dir: String,
    pub trees: Vec<String>,
}

/// Where a path is, with respect to the owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In owner i's trees.
    Tree(usize),
    /// In owner i's dir, outside its trees.
    Dir(usize),
    Elsewhere,
}

fn is_at_or_under(path: &str, ancestor: &str) -> bool {
    path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|r| r.starts_with('/'))
}

fn place(rel: &str, owners: &[Owner]) -> Place {
    for (i, o) in owners.iter().enumerate() {
        if o.trees.iter().any(|t| is_at_or_under(rel, t)) {
            return Place::Tree(i);
        }
        if is_at_or_under(rel, &o.dir) {
            return Place::Dir(i);
        }
    }
    Place::Elsewhere
}

/// Shared ranges `[start, end)` and who references them.
struct Found {
    /// Per owner: bytes of extents no other file references.
    alone: Vec<u64>,
    /// (start, end, place) of every shared extent.
    shared: Vec<(u64, u64, Place)>,
    /// Inodes already read (hard links are one file).
    seen: HashSet<(u64, u64)>,
}

/// For each owner, the data bytes its trees reference and nothing outside
/// its dir does. Walks everything under `top` (a mounted top level),
/// never following symlinks.
pub fn unshared_bytes(top: &Path, owners: &[Owner]) -> std::io::Result<Vec<u64>> {
    let mut found = Found {
        alone: vec![0; owners.len()],
        shared: Vec::new(),
        seen: HashSet::new(),
    };
    walk(top, "", owners, &mut found)?;
    let mut out = Vec::with_capacity(owners.len());
    for i in 0..owners.len() {
        let mine = merge(
            found
                .shared
                .iter()
                .filter(|s| s.2 == Place::Tree(i))
                .map(|s| (s.0, s.1)),
        );
        let others = merge(
            found
                .shared
                .iter()
                .filter(|s| !matches!(s.2, Place::Tree(j) | Place::Dir(j) if j == i))
                .map(|s| (s.0, s.1)),
        );
        out.push(found.alone[i] + minus(&mine, &others));
    }
    Ok(out)
}

fn walk(top: &Path, rel: &str, owners: &[Owner], found: &mut Found) -> std::io::Result<()> {
    for entry in std::fs::read_dir(top.join(rel))? {
        let entry = entry?;
        let name = entry.file_name();
        let child = match rel {
            "" => name.to_string_lossy().into_owned(),
            r => format!("{r}/{}", name.to_string_lossy()),
        };
        let md = entry.path().symlink_metadata()?;
        let t = md.file_type();
        if t.is_dir() {
            walk(top, &child, owners, found)?;
        } else if t.is_file() {
            if md.nlink() > 1 && !found.seen.insert((md.dev(), md.ino())) {
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
                .open(entry.path())?;
            let at = place(&child, owners);
            for e in data_extents(&file)? {
                if e.shared {
                    found.shared.push((e.physical, e.physical + e.length, at));
                } else if let Place::Tree(i) = at {
                    found.alone[i] += e.length;
                }
            }
        }
    }
    Ok(())
}

/// Sorted, non-overlapping ranges covering the same bytes.
fn merge(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.filter(|r| r.0 < r.1).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Bytes of `a` not in `b` (both merged).
fn minus(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut j = 0;
    for &(start, end) in a {
        let mut at = start;
        while j < b.len() && b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while at < end {
            match b.get(k) {
                Some(&(bs, be)) if bs < end => {
                    if bs > at {
                        total += bs - at;
                    }
                    at = at.max(be);
                    k += 1;
                }
                _ => {
                    total += end - at;
                    at = end;
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_subtract() {
        let a = merge([(10, 20), (0, 5), (15, 30), (40, 50)].into_iter());
        assert_eq!(a, [(0, 5), (10, 30), (40, 50)]);
        let b = merge([(3, 12), (25, 45), (60, 70)].into_iter());
        // 0..3, 12..25, 45..50
        assert_eq!(minus(&a, &b), 3 + 13 + 5);
        assert_eq!(minus(&a, &[]), 5 + 20 + 10);
        assert_eq!(minus(&[], &b), 0);
        assert_eq!(minus(&a, &[(0, 100)]), 0);
    }

    #[test]
    fn paths_belong_to_their_owner() {
        let owners = [
            Owner {
                dir: "systems/a".into(),
                trees: vec!["systems/a/orig".into(), "systems/a/run".into()],
            },
            Owner {
                dir: "systems/ab".into(),
                trees: vec!["systems/ab/orig".into()],
            },
        ];
        assert_eq!(place("systems/a/run/etc/x", &owners), Place::Tree(0));
        assert_eq!(place("systems/a/kernel", &owners), Place::Dir(0));
        assert_eq!(place("systems/ab/orig/x", &owners), Place::Tree(1));
        assert_eq!(place("systems/a/origx", &owners), Place::Dir(0));
        assert_eq!(place("state/var/x", &owners), Place::Elsewhere);
    }
}
