//! What several checks read from the guest: the mount table (`findmnt`),
//! the boot journal (the session takes each once per boot, see `Vm`), and
//! files' xattrs (`getfattr`, for `moved-files` and `state-contract`).

use crate::agent::Running;
use crate::machine::{Machine, MachineError};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use strata_builder::octal;
use strata_builder::pathenc::encode_path;

/// One row of `findmnt -J -l`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Mount {
    pub target: String,
    pub source: Option<String>,
    pub fstype: Option<String>,
    pub fsroot: Option<String>,
    pub uuid: Option<String>,
    pub options: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FindmntJson {
    filesystems: Vec<Mount>,
}

pub fn parse_findmnt(json: &str) -> Result<Vec<Mount>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str::<FindmntJson>(json)
        .map(|f| f.filesystems)
        .map_err(|e| format!("findmnt -J output: {e}"))
}

/// `findmnt -J` output as mounts; `command` names it in the error.
pub(crate) fn findmnt(json: &str, command: &str) -> Result<Vec<Mount>, MachineError> {
    parse_findmnt(json).map_err(|e| MachineError::CommandFailed {
        command: command.into(),
        code: "0".into(),
        stderr: e,
    })
}

/// The live mount table. Later mounts over the same target win, as in the kernel.
pub async fn mount_table(m: &mut Machine) -> Result<Vec<Mount>, MachineError> {
    let out = m
        .succeed("findmnt -J -l -o TARGET,SOURCE,FSTYPE,FSROOT,UUID,OPTIONS")
        .await?;
    findmnt(&out, "findmnt -J")
}

/// What is mounted at `target` now: the last mount over it.
pub fn mounted_at<'a>(table: &'a [Mount], target: &str) -> Option<&'a Mount> {
    table.iter().rev().find(|m| m.target == target)
}

/// The boot journal as JSON lines.
pub async fn export_journal(m: &mut Machine) -> Result<String, MachineError> {
    let running = start_journal_export(m).await?;
    finish_journal_export(m, &running).await
}

/// Starts `journalctl -b -o json` so it can run while the checks do.
pub async fn start_journal_export(m: &mut Machine) -> Result<Running, MachineError> {
    m.start_script("journalctl -b -o json --no-pager", None)
        .await
}

pub async fn finish_journal_export(
    m: &mut Machine,
    running: &Running,
) -> Result<String, MachineError> {
    // Output over the agent's cap is an error of its own (AgentError::OutputTruncated).
    let out = m.finish(running).await?;
    if !out.success() {
        return Err(MachineError::CommandFailed {
            command: "journalctl -b -o json".into(),
            code: format!("{:?}", out.exit_code),
            stderr: out.stderr_str(),
        });
    }
    Ok(out.stdout_str())
}

/// Every xattr of the NUL-separated paths on its stdin, not following
/// symlinks (`-h`), values in hex (`-m -`: all namespaces, so
/// `system.posix_acl_*` and `security.capability` too). getfattr reads
/// names with `lgetxattr`: it never opens a file, so fifos and device nodes
/// are safe. Its output is [`parse_getfattr`]'s input.
pub const GETFATTR_XARGS: &str = "xargs -0 -r getfattr -h -d -m - -e hex --absolute-names --";

/// The exit code of a guest script that found no getfattr (package `attr`).
pub const NO_GETFATTR: i64 = 98;

/// `getfattr -d -e hex` output: `# file: NAME` then `name=0xHEX` lines,
/// names with odd bytes escaped as `\ooo`. Keyed by path and name in
/// `encode_path` form; values lower-case hex without `0x`.
pub fn parse_getfattr(raw: &[u8]) -> HashMap<String, BTreeMap<String, String>> {
    let mut out: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut file: Option<String> = None;
    for line in raw.split(|b| *b == b'\n') {
        if let Some(name) = line.strip_prefix(b"# file: ") {
            let key = encode_path(&getfattr_name(name));
            out.entry(key.clone()).or_default();
            file = Some(key);
            continue;
        }
        let Some(f) = &file else { continue };
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let (name, value) = match line.iter().position(|b| *b == b'=') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        let hex = value
            .strip_prefix("0x")
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        out.entry(f.clone())
            .or_default()
            .insert(encode_path(&getfattr_name(name)), hex);
    }
    out
}

/// A name as getfattr quotes it: `\ooo` (octal) and `\\`.
fn getfattr_name(s: &[u8]) -> Vec<u8> {
    octal::unescape(s, &octal::GETFATTR).expect("GETFATTR never fails")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getfattr_output_is_parsed_losslessly() {
        let raw = b"# file: /srv/caf\\351\nsystem.posix_acl_access=0x0200AB\nsecurity.capability=0x01\nuser.empty\n\n# file: /srv/plain\nuser.x=0x6869\n\n";
        let x = parse_getfattr(raw);
        let caf = &x["/srv/caf%E9"];
        assert_eq!(caf["system.posix_acl_access"], "0200ab");
        assert_eq!(caf["security.capability"], "01");
        assert_eq!(caf["user.empty"], "");
        assert_eq!(x["/srv/plain"]["user.x"], "6869");
    }
}
