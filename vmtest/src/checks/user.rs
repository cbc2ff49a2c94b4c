//! The user's own checks (`[[check]]` in a test file): a guest command, an
//! optional unit to wait for, and what its exit code and output must be.
//! They run through the guest agent as root in the phases they name, and
//! report as `PHASE/NAME`. This module holds what a user check is; the
//! spec (`crate::spec`) fills it, the run executes it.

use serde::Serialize;

/// The moments of a run a check can run in. A plain run has `Boot` (boot 1)
/// and, when anything needs them, `Reboot` (after the clean reboot) and
/// `PowerCut` (after the fresh start following the power cut); an upgrade
/// lifecycle has `Boot` (the version the image came with), `Upgrade` and
/// `Rollback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum When {
    Boot,
    Reboot,
    PowerCut,
    Upgrade,
    Rollback,
}

impl When {
    pub const ALL: [When; 5] = [
        When::Boot,
        When::Reboot,
        When::PowerCut,
        When::Upgrade,
        When::Rollback,
    ];

    /// The name in a test file's `phases` and the prefix of report rows.
    pub fn name(self) -> &'static str {
        match self {
            When::Boot => "boot",
            When::Reboot => "reboot",
            When::PowerCut => "power-cut",
            When::Upgrade => "upgrade",
            When::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<When> {
        When::ALL.into_iter().find(|w| w.name() == s)
    }
}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Compiles a user's output pattern. Multi-line: `^` and `$` match at
/// each line, which is what a pattern over a command's output means
/// (`^ok$` matches `ok\n`).
pub fn pattern(p: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(p).multi_line(true).build()
}

/// One user check, validated (names, regexes, a command or a unit).
#[derive(Debug, Clone)]
pub struct UserCheck {
    /// Unique among built-in and user checks; the row is `PHASE/NAME`.
    pub name: String,
    /// `sh -c` in the guest, as root. None: only `wait_for_unit`.
    pub run: Option<String>,
    /// Waited for (bounded) before `run`; the check fails naming the
    /// unit's state and its last journal lines when it does not come up.
    pub wait_for_unit: Option<String>,
    pub expect_exit: i64,
    pub stdout_matches: Option<regex::Regex>,
    pub stdout_contains: Option<String>,
    pub stderr_matches: Option<regex::Regex>,
    /// None: every phase the run has.
    pub phases: Option<Vec<When>>,
}

impl UserCheck {
    /// Whether the check runs in `when` (of a run that has that phase).
    pub fn runs_in(&self, when: When) -> bool {
        self.phases.as_ref().is_none_or(|p| p.contains(&when))
    }
}

/// How long `wait_for_unit` waits for the unit to become active.
pub const UNIT_WITHIN: std::time::Duration = std::time::Duration::from_secs(90);

/// How long a user command may run in the guest (`timeout` there, so that
/// a command that hangs is the check's failure, not the agent's).
pub const COMMAND_WITHIN: std::time::Duration = std::time::Duration::from_secs(45);

/// How much of a command's stdout and stderr is kept and matched: the
/// rest is dropped, and the verdict says so.
pub const OUTPUT_CAP: usize = 64 * 1024;

/// Lines of output (and of the unit's journal) a failure shows.
const TAIL_LINES: usize = 10;

/// What the guest showed for one user check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Some when the check waits for a unit: whether it came up, and when
    /// not, its state (`ActiveState/SubState (Result)`) and last journal
    /// lines.
    pub unit: Option<UnitSeen>,
    /// Some when the command ran (not when the unit never came up).
    pub command: Option<CommandSeen>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSeen {
    pub active: bool,
    pub state: String,
    pub journal: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSeen {
    /// None: killed by a signal (its number in `signal`).
    pub exit: Option<i64>,
    pub signal: Option<i64>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// Bytes dropped over `OUTPUT_CAP` (stdout, stderr).
    pub cut: (usize, usize),
}

/// The row name: `PHASE/NAME`.
pub fn row_name(when: When, check: &UserCheck) -> String {
    format!("{}/{}", when.name(), check.name)
}

/// Observes one user check in the running guest. Errors are the
/// machine's (QEMU, the agent): a check that cannot run is never a pass.
pub async fn observe(
    m: &mut crate::machine::Machine,
    check: &UserCheck,
) -> Result<Observed, crate::machine::MachineError> {
    let mut seen = Observed::default();
    if let Some(unit) = &check.wait_for_unit {
        let u = wait_for_unit(m, unit).await?;
        let up = u.active;
        seen.unit = Some(u);
        if !up {
            return Ok(seen);
        }
    }
    if let Some(run) = &check.run {
        // `timeout` in the guest: a hanging command fails its check with
        // exit 124 while the agent stays usable for the next one.
        let script = format!(
            "exec timeout -k 5 {} /bin/sh -c {}",
            COMMAND_WITHIN.as_secs(),
            sh_quote(run)
        );
        let out = m.exec(&script).await?;
        let (stdout, cut_out) = capped(&out.stdout);
        let (stderr, cut_err) = capped(&out.stderr);
        seen.command = Some(CommandSeen {
            exit: out.exit_code,
            signal: out.signal,
            timed_out: out.exit_code == Some(124),
            stdout,
            stderr,
            cut: (cut_out, cut_err),
        });
    }
    Ok(seen)
}

/// Polls `systemctl is-active` until the unit is active, has failed, does
/// not exist, or `UNIT_WITHIN` passed; then its state and journal when it
/// is not up.
async fn wait_for_unit(
    m: &mut crate::machine::Machine,
    unit: &str,
) -> Result<UnitSeen, crate::machine::MachineError> {
    let q = sh_quote(unit);
    let script = format!(
        "end=$(( $(date +%s) + {} ))\n\
         while :; do\n\
           s=$(systemctl is-active {q})\n\
           case \"$s\" in active) echo active; exit 0;; failed) break;; esac\n\
           [ \"$(systemctl show -P LoadState {q})\" = not-found ] && break\n\
           [ \"$(date +%s)\" -ge \"$end\" ] && break\n\
           sleep 0.25\n\
         done\n\
         echo down\n\
         systemctl show -p ActiveState -p SubState -p Result -p LoadState {q}\n\
         echo --journal--\n\
         journalctl -b -u {q} -n {TAIL_LINES} --no-pager -o short-monotonic 2>&1\n",
        UNIT_WITHIN.as_secs()
    );
    let t = m.command_timeout;
    m.command_timeout = UNIT_WITHIN + std::time::Duration::from_secs(30);
    let out = m.exec(&script).await;
    m.command_timeout = t;
    let out = out?.stdout_str();
    Ok(parse_unit(&out))
}

fn parse_unit(out: &str) -> UnitSeen {
    let mut lines = out.lines();
    if lines.next() == Some("active") {
        return UnitSeen {
            active: true,
            state: "active".into(),
            journal: String::new(),
        };
    }
    let (show, journal) = out.split_once("--journal--\n").unwrap_or((out, ""));
    let get = |k: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("?")
            .to_owned()
    };
    let state = format!(
        "{}/{} (result {}, load {})",
        get("ActiveState"),
        get("SubState"),
        get("Result"),
        get("LoadState")
    );
    UnitSeen {
        active: false,
        state,
        journal: journal.trim_end().to_owned(),
    }
}

/// The verdict of one user check in one phase.
pub fn judge(when: When, check: &UserCheck, seen: &Observed) -> CheckResult {
    let name = row_name(when, check);
    let mut evidence = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    if let (Some(unit), Some(u)) = (&check.wait_for_unit, &seen.unit) {
        if u.active {
            evidence.push(format!("unit {unit} is active"));
        } else {
            problems.push(format!(
                "unit {unit} did not become active within {} s: {}",
                UNIT_WITHIN.as_secs(),
                u.state
            ));
            evidence.push(format!("unit {unit}: {}", u.state));
            for l in tail(&u.journal, TAIL_LINES) {
                evidence.push(format!("journal: {l}"));
            }
        }
    }
    if let (Some(run), Some(c)) = (&check.run, &seen.command) {
        evidence.push(format!("command: {run}"));
        let exit = match (c.exit, c.signal) {
            (Some(e), _) => format!("exit {e}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "no exit status".into(),
        };
        evidence.push(exit.clone());
        if c.timed_out {
            problems.push(format!(
                "the command did not finish within {} s",
                COMMAND_WITHIN.as_secs()
            ));
        } else if c.exit != Some(check.expect_exit) {
            problems.push(format!("{exit}, expected exit {}", check.expect_exit));
        }
        if let Some(re) = &check.stdout_matches {
            if !re.is_match(&c.stdout) {
                problems.push(format!("stdout does not match /{}/", re.as_str()));
            }
        }
        if let Some(s) = &check.stdout_contains {
            if !c.stdout.contains(s.as_str()) {
                problems.push(format!("stdout does not contain {s:?}"));
            }
        }
        if let Some(re) = &check.stderr_matches {
            if !re.is_match(&c.stderr) {
                problems.push(format!("stderr does not match /{}/", re.as_str()));
            }
        }
        for (what, text, cut) in [
            ("stdout", &c.stdout, c.cut.0),
            ("stderr", &c.stderr, c.cut.1),
        ] {
            if cut > 0 {
                evidence.push(format!(
                    "{what}: only its first {OUTPUT_CAP} bytes were kept and matched ({cut} more dropped)"
                ));
            }
            if !problems.is_empty() {
                for l in tail(text, TAIL_LINES) {
                    evidence.push(format!("{what}: {l}"));
                }
            }
        }
    }
    if problems.is_empty() {
        let what = match (&check.wait_for_unit, &check.run) {
            (Some(u), Some(_)) => format!("{u} active; command as expected"),
            (Some(u), None) => format!("{u} active"),
            _ => "command as expected".into(),
        };
        CheckResult::new(&name, Status::Pass, what, evidence)
    } else {
        CheckResult::new(&name, Status::Fail, problems.join("; "), evidence)
    }
}

fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

fn capped(bytes: &[u8]) -> (String, usize) {
    let keep = bytes.len().min(OUTPUT_CAP);
    (
        String::from_utf8_lossy(&bytes[..keep]).into_owned(),
        bytes.len() - keep,
    )
}

/// Single-quotes `s` for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

use crate::report::{CheckResult, Status};

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> UserCheck {
        UserCheck {
            name: "app-up".into(),
            run: Some("curl -fsS localhost:8080/health".into()),
            wait_for_unit: None,
            expect_exit: 0,
            stdout_matches: Some(pattern("^ok$").unwrap()),
            stdout_contains: None,
            stderr_matches: None,
            phases: None,
        }
    }

    fn ran(exit: i64, stdout: &str) -> Observed {
        Observed {
            unit: None,
            command: Some(CommandSeen {
                exit: Some(exit),
                signal: None,
                timed_out: exit == 124,
                stdout: stdout.into(),
                stderr: "curl: (7) Failed to connect\n".into(),
                cut: (0, 0),
            }),
        }
    }

    #[test]
    fn passes_on_the_expected_exit_and_output() {
        let r = judge(When::Boot, &check(), &ran(0, "starting\nok\n"));
        assert_eq!(r.name, "boot/app-up");
        assert_eq!(r.status, Status::Pass, "{r:?}");
    }

    #[test]
    fn fails_on_the_exit_code_showing_command_and_output() {
        let r = judge(When::Reboot, &check(), &ran(7, ""));
        assert_eq!(r.name, "reboot/app-up");
        assert_eq!(r.status, Status::Fail);
        assert!(
            r.detail.starts_with("exit 7, expected exit 0"),
            "{}",
            r.detail
        );
        assert!(r
            .evidence
            .contains(&"command: curl -fsS localhost:8080/health".into()));
        assert!(r.evidence.iter().any(|e| e.contains("Failed to connect")));
    }

    #[test]
    fn fails_on_the_output_alone() {
        let r = judge(When::PowerCut, &check(), &ran(0, "degraded\n"));
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "stdout does not match /^ok$/");
        assert!(r.evidence.contains(&"stdout: degraded".into()));
        let mut c = check();
        c.stdout_matches = None;
        c.stdout_contains = Some("healthy".into());
        assert_eq!(
            judge(When::Boot, &c, &ran(0, "ok")).detail,
            "stdout does not contain \"healthy\""
        );
        c.stdout_contains = None;
        c.stderr_matches = Some(pattern("refused").unwrap());
        assert!(judge(When::Boot, &c, &ran(0, "ok"))
            .detail
            .contains("stderr"));
    }

    #[test]
    fn a_timeout_is_said_as_such() {
        let r = judge(When::Boot, &check(), &ran(124, ""));
        assert_eq!(r.status, Status::Fail);
        assert!(r.detail.contains("did not finish within"), "{}", r.detail);
    }

    #[test]
    fn a_unit_that_never_came_up_names_its_state_and_journal() {
        let mut c = check();
        c.wait_for_unit = Some("app.service".into());
        let out = "down\nActiveState=failed\nSubState=failed\nResult=exit-code\nLoadState=loaded\n--journal--\n[ 3.1] app[200]: boom\n[ 3.2] systemd[1]: app.service: Failed with result 'exit-code'.\n";
        let seen = Observed {
            unit: Some(parse_unit(out)),
            command: None,
        };
        let r = judge(When::Boot, &c, &seen);
        assert_eq!(r.status, Status::Fail);
        assert!(
            r.detail
                .contains("unit app.service did not become active within 90 s: failed/failed (result exit-code, load loaded)"),
            "{}",
            r.detail
        );
        assert!(r.evidence.iter().any(|e| e.contains("app[200]: boom")));
        assert!(parse_unit("active\n").active);
    }

    #[test]
    fn phases_default_to_every_phase() {
        let mut c = check();
        assert!(When::ALL.iter().all(|w| c.runs_in(*w)));
        c.phases = Some(vec![When::Reboot]);
        assert!(c.runs_in(When::Reboot) && !c.runs_in(When::Boot));
        assert_eq!(When::parse("power-cut"), Some(When::PowerCut));
        assert_eq!(When::parse("powercut"), None);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("echo 'a'"), r"'echo '\''a'\'''");
    }
}
