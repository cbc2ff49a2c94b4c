//! Expectations and a mount table the checks' unit tests share.

use super::guest::{parse_findmnt, Mount};
use strata_builder::expect::{Expectations, Source};
use strata_builder::layout::Version;
use strata_builder::manifest::{FileType, MovedFile};

pub const UUID: &str = "3f1c0000-0000-4000-8000-000000000001";

/// Version `factory`, state dirs root and var, two moved files.
pub fn expectations() -> Expectations {
    Expectations {
        version: Version::new("factory").unwrap(),
        fs_uuid: UUID.into(),
        root_device: format!("UUID={UUID}"),
        state_dirs: vec!["root".into(), "var".into()],
        moved_files: vec![
            MovedFile {
                path: "/root/.ssh/authorized_keys".into(),
                file_type: FileType::File,
                sha256: Some("ab".repeat(32)),
                mode: 0o600,
                uid: 0,
                gid: 0,
                size: 99,
                target: None,
                xattrs: Default::default(),
                hardlink: None,
            },
            MovedFile {
                path: "/var/lib/systemd/random-seed".into(),
                file_type: FileType::File,
                sha256: Some("cd".repeat(32)),
                mode: 0o600,
                uid: 0,
                gid: 0,
                size: 512,
                target: None,
                xattrs: Default::default(),
                hardlink: None,
            },
        ],
        source: Source::Manifest("x.img.manifest.json".into()),
    }
}

/// The mount table of a correct boot, with /var's fsroot as given.
pub fn table(var_fsroot: &str) -> Vec<Mount> {
    let json = format!(
        r#"{{"filesystems": [
  {{"target":"/","source":"/dev/vda[/systems/factory/run]","fstype":"btrfs","fsroot":"/systems/factory/run","uuid":"{UUID}","options":"rw,noatime"}},
  {{"target":"/root","source":"/dev/vda[/state/root]","fstype":"btrfs","fsroot":"/state/root","uuid":"{UUID}","options":"rw"}},
  {{"target":"/var","source":"/dev/vda","fstype":"btrfs","fsroot":"{var_fsroot}","uuid":"{UUID}","options":"rw"}},
  {{"target":"/proc","source":"proc","fstype":"proc","fsroot":"/","uuid":null,"options":"rw"}}
]}}"#
    );
    parse_findmnt(&json).unwrap()
}
