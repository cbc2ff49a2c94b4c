//! Mount trouble in a boot journal (`journalctl -o json`), matched by
//! structured fields rather than English text wherever systemd provides them.
//!
//! Three kinds are reported:
//! - `overmount`: systemd's "Directory /X to mount over is not empty, mounting
//!   anyway." (MESSAGE_ID [`OVERMOUNT_MESSAGE_ID`], priority notice). The
//!   mountpoint comes from the entry's `WHERE=` field, else from the message.
//! - `failed-mount`: a `.mount` unit whose start job failed (MESSAGE_ID
//!   `be02cf68…`, `JOB_RESULT=failed|timeout|dependency`) or that ended with a
//!   failure result (MESSAGE_ID `d9b373ed…`, `UNIT_RESULT=`). Journals from
//!   systems without those IDs fall back to systemd's "Failed to mount" text.
//! - `btrfs-error`: kernel messages (`_TRANSPORT=kernel`) starting with
//!   "BTRFS error" or "BTRFS critical" (also the "BTRFS: error" form of
//!   `btrfs_handle_fs_error`).
//!
//! Journal field values may be strings, `null` (field too large), arrays of
//! bytes (non-UTF-8 data) or arrays of values (a field set more than once);
//! all are handled. Results are deduplicated and kept in journal order.

use serde_json::Value;
use std::collections::HashSet;

/// systemd's SD_MESSAGE_OVERMOUNTING.
pub const OVERMOUNT_MESSAGE_ID: &str = "1dee0369c7fc4736b7099b38ecb46ee7";
/// SD_MESSAGE_UNIT_FAILED: a start job finished with a failure
/// ("Failed to mount …", "Dependency failed for …"); has JOB_RESULT.
pub const UNIT_FAILED_MESSAGE_ID: &str = "be02cf6855d2428ba40df7e9d022f03d";
/// SD_MESSAGE_UNIT_FAILURE_RESULT: "x.mount: Failed with result 'exit-code'."
/// (has UNIT_RESULT).
pub const UNIT_FAILURE_RESULT_MESSAGE_ID: &str = "d9b373ed55a64feb8242e02dbe79a49c";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    Overmount,
    FailedMount,
    BtrfsError,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JournalWarning {
    pub kind: WarningKind,
    pub mountpoint: Option<String>,
    pub message: String,
    pub unit: Option<String>,
}

/// `text` is `journalctl -o json` output (one JSON object per line).
///
/// Lines that are not JSON objects are skipped (a `json-seq` record
/// separator is tolerated), so a truncated export still yields what it has.
pub fn mount_warnings(text: &str) -> Vec<JournalWarning> {
    let mut out: Vec<JournalWarning> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for entry in entries(text) {
        let entry = Entry(&entry);
        let Some(w) = classify(&entry) else {
            continue;
        };
        // systemd logs a failed mount several times ("Failed with result
        // 'exit-code'", then "Failed to mount …"): keep one warning per unit,
        // worded by the job-result entry, the one that names the path.
        let job_failed = entry.has_value("MESSAGE_ID", UNIT_FAILED_MESSAGE_ID);
        if w.kind == WarningKind::FailedMount && job_failed {
            if let Some(prev) = out
                .iter_mut()
                .find(|p| p.kind == WarningKind::FailedMount && p.unit == w.unit)
            {
                prev.message = w.message;
                continue;
            }
        }
        let key = match w.kind {
            WarningKind::Overmount => ("overmount", w.mountpoint.clone().unwrap_or_default()),
            WarningKind::FailedMount => (
                "failed-mount",
                w.unit
                    .clone()
                    .or_else(|| w.mountpoint.clone())
                    .unwrap_or_default(),
            ),
            WarningKind::BtrfsError => ("btrfs-error", w.message.clone()),
        };
        let key = (key.0.to_owned(), key.1);
        if key.1.is_empty() {
            // Nothing to identify it by: dedupe on the message.
            if !seen.insert((key.0.clone(), format!("message:{}", w.message))) {
                continue;
            }
        } else if !seen.insert(key) {
            continue;
        }
        out.push(w);
    }
    out
}

/// The entries of a `journalctl -o json` export, in order. Lines that are
/// not JSON objects are skipped (a `json-seq` record separator is
/// tolerated), so a truncated export still yields what it has.
pub(crate) fn entries(text: &str) -> impl Iterator<Item = serde_json::Map<String, Value>> + '_ {
    text.lines().filter_map(|line| {
        let line = line.trim_start_matches('\u{1e}').trim();
        if !line.starts_with('{') {
            return None;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(entry)) => Some(entry),
            _ => None,
        }
    })
}

/// One journal entry, read field by field (see the module doc for the
/// shapes a field value takes).
pub(crate) struct Entry<'a>(pub(crate) &'a serde_json::Map<String, Value>);

impl Entry<'_> {
    /// Every value of a field, decoded (lossy UTF-8 for byte arrays).
    pub(crate) fn values(&self, name: &str) -> Vec<String> {
        match self.0.get(name) {
            None | Some(Value::Null) => Vec::new(),
            Some(v @ Value::Array(items)) if is_byte_array(items) => {
                decode(v).into_iter().collect()
            }
            Some(Value::Array(items)) => items.iter().filter_map(decode).collect(),
            Some(v) => decode(v).into_iter().collect(),
        }
    }

    /// The first value of a field.
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        self.values(name).into_iter().next()
    }

    pub(crate) fn has_value(&self, name: &str, wanted: &str) -> bool {
        self.values(name).iter().any(|v| v == wanted)
    }
}

fn is_byte_array(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.as_u64().is_some_and(|n| n <= 255))
}

fn decode(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if is_byte_array(items) => {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(|i| i.as_u64())
                .map(|n| n as u8)
                .collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn classify(e: &Entry) -> Option<JournalWarning> {
    let message = e.get("MESSAGE").unwrap_or_default();
    let message = message.trim_end().to_owned();
    let unit = e.get("UNIT");

    if e.has_value("MESSAGE_ID", OVERMOUNT_MESSAGE_ID) {
        let mountpoint = e
            .get("WHERE")
            .filter(|w| !w.is_empty())
            .or_else(|| overmount_path_from_message(&message))
            .or_else(|| unit.as_deref().and_then(mount_unit_path));
        return Some(JournalWarning {
            kind: WarningKind::Overmount,
            mountpoint,
            message,
            unit,
        });
    }

    if e.get("_TRANSPORT").as_deref() == Some("kernel") && is_btrfs_error(&message) {
        return Some(JournalWarning {
            kind: WarningKind::BtrfsError,
            mountpoint: None,
            message,
            unit: None,
        });
    }

    // Only the system manager's own entries about .mount units count.
    let mount_unit = unit.as_deref().filter(|u| u.ends_with(".mount"));
    if let Some(u) = mount_unit {
        let failed_job = e.has_value("MESSAGE_ID", UNIT_FAILED_MESSAGE_ID)
            || e.get("JOB_RESULT")
                .is_some_and(|r| matches!(r.as_str(), "failed" | "timeout" | "dependency"));
        let failed_result = e.has_value("MESSAGE_ID", UNIT_FAILURE_RESULT_MESSAGE_ID)
            || e.get("UNIT_RESULT").is_some_and(|r| r != "success");
        let no_id = e.get("MESSAGE_ID").is_none();
        let by_text = no_id
            && (message.starts_with("Failed to mount ")
                || message.contains(": Failed with result ")
                || message.starts_with("Dependency failed for "));
        if failed_job || failed_result || by_text {
            return Some(JournalWarning {
                kind: WarningKind::FailedMount,
                mountpoint: e
                    .get("WHERE")
                    .filter(|w| !w.is_empty())
                    .or_else(|| mount_unit_path(u)),
                message,
                unit: Some(u.to_owned()),
            });
        }
    }
    None
}

fn is_btrfs_error(message: &str) -> bool {
    [
        "BTRFS error",
        "BTRFS critical",
        "BTRFS: error",
        "BTRFS: critical",
    ]
    .iter()
    .any(|p| message.starts_with(p))
}

/// "var.mount: Directory /var to mount over is not empty, mounting anyway."
/// → "/var". Paths with spaces survive (the text runs to " to mount over").
fn overmount_path_from_message(message: &str) -> Option<String> {
    let start = message.find("Directory /")? + "Directory ".len();
    let rest = &message[start..];
    let end = rest.find(" to mount over")?;
    Some(rest[..end].to_owned())
}

/// The path a mount unit name stands for (`systemd-escape --unescape
/// --path`): "srv-www.mount" → "/srv/www", "-.mount" → "/",
/// "my\x2ddir.mount" → "/my-dir".
pub fn mount_unit_path(unit: &str) -> Option<String> {
    let name = unit.strip_suffix(".mount")?;
    if name == "-" {
        return Some("/".to_owned());
    }
    let mut out = Vec::with_capacity(name.len() + 1);
    out.push(b'/');
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' => out.push(b'/'),
            b'\\' if i + 3 < bytes.len() && bytes[i + 1] == b'x' => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> String {
        let path = format!(
            "{}/../fixtures/journal/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn clean_boot_has_no_warnings() {
        let w = mount_warnings(&sample("clean-boot"));
        assert_eq!(w, vec![]);
    }

    #[test]
    fn overmount_boot_names_var_and_srv() {
        let w = mount_warnings(&sample("overmount-boot"));
        let points: Vec<_> = w
            .iter()
            .filter(|w| w.kind == WarningKind::Overmount)
            .map(|w| w.mountpoint.as_deref().unwrap())
            .collect();
        assert_eq!(points, ["/srv", "/var"]);
        insta::assert_json_snapshot!("overmount-boot", w);
    }

    #[test]
    fn failed_mount_boot() {
        let w = mount_warnings(&sample("failed-mount-boot"));
        assert!(w.iter().any(|w| w.kind == WarningKind::FailedMount));
        assert!(w.iter().all(|w| w.kind != WarningKind::Overmount));
        insta::assert_json_snapshot!("failed-mount-boot", w);
    }

    #[test]
    fn mountpoint_falls_back_to_the_message() {
        let line = r#"{"MESSAGE_ID":"1dee0369c7fc4736b7099b38ecb46ee7","MESSAGE":"my\\x20dir.mount: Directory /my dir to mount over is not empty, mounting anyway.","UNIT":"my\\x20dir.mount"}"#;
        let w = mount_warnings(line);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].mountpoint.as_deref(), Some("/my dir"));
    }

    #[test]
    fn english_text_alone_is_not_an_overmount() {
        // A look-alike without the MESSAGE_ID (e.g. `logger` output) is ignored.
        let line = r#"{"MESSAGE":"var.mount: Directory /var to mount over is not empty, mounting anyway.","_TRANSPORT":"syslog"}"#;
        assert_eq!(mount_warnings(line), vec![]);
    }

    #[test]
    fn byte_array_and_multi_valued_fields() {
        // MESSAGE as bytes (invalid UTF-8 inside), MESSAGE_ID set twice,
        // WHERE as bytes, a null field and junk lines around it.
        let mut msg: Vec<u8> =
            b"srv.mount: Directory /srv to mount over is not empty, mounting anyway. \xff".to_vec();
        msg.truncate(msg.len());
        let msg_json = serde_json::to_string(&msg).unwrap();
        let where_json = serde_json::to_string(&b"/srv".to_vec()).unwrap();
        let text = format!(
            "-- No entries --\n\u{1e}{{\"MESSAGE_ID\":[\"0000\",\"{OVERMOUNT_MESSAGE_ID}\"],\"MESSAGE\":{msg_json},\"WHERE\":{where_json},\"UNIT\":\"srv.mount\",\"BIG\":null}}\nnot json\n{{\"MESSAGE_ID\":\"{OVERMOUNT_MESSAGE_ID}\",\"WHERE\":\"/srv\",\"MESSAGE\":\"again\"}}\n"
        );
        let w = mount_warnings(&text);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].mountpoint.as_deref(), Some("/srv"));
        assert!(w[0].message.starts_with("srv.mount: Directory /srv"));
        assert!(w[0].message.ends_with('\u{fffd}'));
    }

    #[test]
    fn kernel_btrfs_errors_only_from_the_kernel() {
        let text = concat!(
            r#"{"_TRANSPORT":"kernel","MESSAGE":"BTRFS error (device vda): unrecognized mount option 'bogus'"}"#,
            "\n",
            r#"{"_TRANSPORT":"kernel","MESSAGE":"BTRFS error (device vda): unrecognized mount option 'bogus'"}"#,
            "\n",
            r#"{"_TRANSPORT":"kernel","MESSAGE":"BTRFS critical (device vda): corrupt leaf"}"#,
            "\n",
            r#"{"_TRANSPORT":"kernel","MESSAGE":"BTRFS info (device vda): using crc32c"}"#,
            "\n",
            r#"{"_TRANSPORT":"stdout","MESSAGE":"BTRFS error (device vda): user space echo"}"#,
            "\n",
        );
        let w = mount_warnings(text);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().all(|w| w.kind == WarningKind::BtrfsError));
    }

    #[test]
    fn failed_mount_without_message_ids_by_text() {
        let line = r#"{"UNIT":"mnt-a\\x2db.mount","MESSAGE":"Failed to mount /mnt/a-b."}"#;
        let w = mount_warnings(line);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].kind, WarningKind::FailedMount);
        assert_eq!(w[0].mountpoint.as_deref(), Some("/mnt/a-b"));
        // A successful mount job is not trouble.
        let ok = r#"{"UNIT":"srv.mount","MESSAGE_ID":"39f53479d3a045ac8e11786248231fbf","JOB_RESULT":"done","MESSAGE":"Mounted srv.mount - /srv."}"#;
        assert_eq!(mount_warnings(ok), vec![]);
    }

    #[test]
    fn unit_names_unescape() {
        assert_eq!(mount_unit_path("-.mount").as_deref(), Some("/"));
        assert_eq!(
            mount_unit_path("srv-www.mount").as_deref(),
            Some("/srv/www")
        );
        assert_eq!(
            mount_unit_path("my\\x2ddir.mount").as_deref(),
            Some("/my-dir")
        );
        assert_eq!(mount_unit_path("srv.service"), None);
    }
}
