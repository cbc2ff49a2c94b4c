//! What several checks read from the guest: the mount table (`findmnt`) and
//! the boot journal. The session takes each once per boot (see `Vm`).

use crate::agent::Running;
use crate::machine::{Machine, MachineError};
use serde::Deserialize;

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
