//! The subvolumes of a mounted image, from `btrfs subvolume list`, and
//! which of them an fstab entry mounts.

use super::ImageError;
use crate::host::cmd;
use crate::model::{FstabMount, Subvolume};
use std::collections::HashMap;
use std::path::Path;

/// Every subvolume under the mounted top level `top`, read-only flags set.
pub fn list(top: &Path) -> Result<Vec<Subvolume>, ImageError> {
    let list = cmd::run_args(
        "btrfs",
        [
            "subvolume".as_ref(),
            "list".as_ref(),
            "-puq".as_ref(),
            top.as_os_str(),
        ],
    )
    .map_err(|e| ImageError::tool("listing subvolumes", e))?;
    // The read-only flag is a detail of the listing: without it, every
    // subvolume shows as writable rather than the image failing to open.
    let readonly = cmd::run_args(
        "btrfs",
        [
            "subvolume".as_ref(),
            "list".as_ref(),
            "-r".as_ref(),
            top.as_os_str(),
        ],
    )
    .ok();
    Ok(combine(&list, readonly.as_deref()))
}

/// The subvolumes of a `-puq` listing, read-only flags set from a `-r`
/// listing (none when it is missing). Whoever ran `btrfs subvolume list`
/// (on the host, or in the appliance) hands its output here.
pub fn combine(puq: &str, readonly: Option<&str>) -> Vec<Subvolume> {
    let readonly: Vec<u64> = readonly
        .map(|t| parse(t).into_iter().map(|s| s.id).collect())
        .unwrap_or_default();
    let mut subvolumes = parse(puq);
    for s in &mut subvolumes {
        s.readonly = readonly.contains(&s.id);
    }
    subvolumes
}

/// Parses `btrfs subvolume list -puq` output:
/// `ID 256 gen 10 parent 5 top level 5 parent_uuid - uuid f0aa… path systems/factory/orig`
/// (`received_uuid` tolerated). The path runs to the end of the line.
pub fn parse(text: &str) -> Vec<Subvolume> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find(" path ") else {
            continue;
        };
        let path = line[at + " path ".len()..].to_owned();
        let path = path
            .strip_prefix("<FS_TREE>/")
            .map(str::to_owned)
            .unwrap_or(path);
        let words: Vec<&str> = line[..at].split_whitespace().collect();
        let mut fields: HashMap<&str, &str> = HashMap::new();
        let mut i = 0;
        while i + 1 < words.len() {
            if words[i] == "top" && words.get(i + 1) == Some(&"level") && i + 2 < words.len() {
                fields.insert("top_level", words[i + 2]);
                i += 3;
            } else {
                fields.insert(words[i], words[i + 1]);
                i += 2;
            }
        }
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        let uuid = |k: &str| {
            fields
                .get(k)
                .filter(|v| **v != "-")
                .map(|v| (*v).to_owned())
        };
        let Some(id) = num("ID") else { continue };
        out.push(Subvolume {
            id,
            generation: num("gen").unwrap_or(0),
            parent_id: num("parent").unwrap_or(0),
            top_level: num("top_level").unwrap_or(0),
            path,
            uuid: uuid("uuid").unwrap_or_default(),
            parent_uuid: uuid("parent_uuid"),
            readonly: false,
        });
    }
    out
}

/// The subvolume path an fstab entry mounts from this filesystem
/// (`subvol=/state/srv` → `state/srv`; `subvolid=260` → its path), if any.
pub fn mounted_by(m: &FstabMount, subvols: &[Subvolume]) -> Option<String> {
    if m.fstype != "btrfs" {
        return None;
    }
    for opt in m.options.split(',') {
        if let Some(v) = opt.strip_prefix("subvol=") {
            let v = v.trim_start_matches('/').trim_end_matches('/');
            return Some(v.to_owned());
        }
    }
    for opt in m.options.split(',') {
        if let Some(id) = opt
            .strip_prefix("subvolid=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            return subvols.iter().find(|s| s.id == id).map(|s| s.path.clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subvolume_list() {
        let text = "ID 256 gen 10 parent 5 top level 5 parent_uuid -                                    uuid f0aaf0cf-5cde-8c48-b38b-4ce6f7529407 path systems/factory/orig\n\
ID 262 gen 9 parent 5 top level 5 parent_uuid f0aaf0cf-5cde-8c48-b38b-4ce6f7529407 received_uuid - uuid 317d54a2-fd1f-bd41-a4ce-2b06e4fb8176 path systems/my dir/run\n";
        let s = parse(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].id, 256);
        assert_eq!(s[0].parent_uuid, None);
        assert_eq!(s[1].path, "systems/my dir/run");
        assert_eq!(
            s[1].parent_uuid.as_deref(),
            Some("f0aaf0cf-5cde-8c48-b38b-4ce6f7529407")
        );
        assert_eq!(s[1].top_level, 5);
    }

    #[test]
    fn what_an_fstab_entry_mounts() {
        let m = |fstype: &str, options: &str| FstabMount {
            source: "/dev/vda".into(),
            target: "/srv".into(),
            fstype: fstype.into(),
            options: options.into(),
        };
        let subvols =
            parse("ID 260 gen 1 parent 5 top level 5 parent_uuid - uuid u path state/srv\n");
        assert_eq!(
            mounted_by(&m("btrfs", "rw,subvol=/state/srv/"), &[]).as_deref(),
            Some("state/srv")
        );
        assert_eq!(
            mounted_by(&m("btrfs", "subvolid=260"), &subvols).as_deref(),
            Some("state/srv")
        );
        assert_eq!(mounted_by(&m("btrfs", "subvolid=261"), &subvols), None);
        assert_eq!(mounted_by(&m("ext4", "subvol=state/srv"), &[]), None);
    }
}
