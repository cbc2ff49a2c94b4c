//! Tokens of the lifecycle: a file with a random value in every state dir,
//! and one under `/root/.ssh` (a nested directory of a state dir, the kind
//! of data an upgrade must never lose), written in one boot and read back
//! in the later ones, each from its state subvolume.

use crate::machine::{Machine, MachineError};
use crate::qemu::shell_quote;
use crate::report::{CheckResult, Status};
use crate::stage::Stage;
use strata_builder::expect::Expectations;
use strata_builder::layout;

/// Name of the token row (`upgrade/tokens`).
pub const TOKENS: &str = "tokens";

/// Dot-file a token is written to in a state dir, suffixed with its stage.
pub const TOKEN_FILE: &str = ".strata-lifecycle-token";

/// The state dir whose `.ssh` gets a token too.
const SSH_STATE_DIR: &str = "root";

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// Absolute path in the booted system.
    pub path: String,
    /// The state dir it lives in: its subvolume must hold it.
    pub dir: String,
    /// The stage that wrote it.
    pub written: Stage,
    pub value: String,
}

impl Token {
    /// The directory the token is in, as the evidence names it.
    fn parent(&self) -> &str {
        self.path.rsplit_once('/').map_or("/", |(p, _)| p)
    }
}

/// One token per state dir, plus `/root/.ssh` when `root` is a state dir.
pub fn new_tokens(dirs: &[String], written: Stage) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut add = |dir: &str, parent: String| {
        tokens.push(Token {
            path: format!("{parent}/{TOKEN_FILE}.{}", written.name()),
            dir: dir.to_owned(),
            written,
            value: format!("{}-{:016x}", written.name(), crate::random_u64()),
        })
    };
    for d in dirs {
        add(d, layout::state_mountpoint(d));
    }
    if dirs.iter().any(|d| d == SSH_STATE_DIR) {
        add(
            SSH_STATE_DIR,
            format!("{}/.ssh", layout::state_mountpoint(SSH_STATE_DIR)),
        );
    }
    tokens
}

/// Writes the tokens (a missing `.ssh` is created 0700, as sshd wants it)
/// and syncs.
pub fn write_script(tokens: &[Token]) -> String {
    let mut s = String::from("set -e\numask 077\n");
    for t in tokens {
        s.push_str(&format!(
            "mkdir -p {}\nprintf '%s\\n' {} > {}\n",
            shell_quote(t.parent()),
            shell_quote(&t.value),
            shell_quote(&t.path)
        ));
    }
    s.push_str("sync\n");
    s
}

/// Per token one line: its first line (or the complaint), a tab, and the
/// FSROOT of the mount holding its directory.
pub fn read_script(tokens: &[Token]) -> String {
    let mut s = String::new();
    for t in tokens {
        s.push_str(&format!(
            "printf '%s\\t%s\\n' \"$(head -n 1 {p} 2>&1)\" \"$(findmnt -n -o FSROOT -T {d} 2>&1 | head -n 1)\"\n",
            p = shell_quote(&t.path),
            d = shell_quote(t.parent())
        ));
    }
    s
}

/// What the guest showed of one token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSeen {
    pub token: Token,
    pub found: String,
    pub fsroot: String,
}

pub fn parse_read(tokens: &[Token], out: &str) -> Vec<TokenSeen> {
    let mut lines = out.lines();
    tokens
        .iter()
        .map(|t| {
            let (found, fsroot) = lines
                .next()
                .and_then(|l| l.split_once('\t'))
                .unwrap_or(("(no output)", ""));
            TokenSeen {
                token: t.clone(),
                found: found.trim().to_owned(),
                fsroot: fsroot.trim().to_owned(),
            }
        })
        .collect()
}

pub async fn write(m: &mut Machine, tokens: &[Token]) -> Result<(), MachineError> {
    m.succeed(&write_script(tokens)).await.map(drop)
}

pub async fn read(m: &mut Machine, tokens: &[Token]) -> Result<Vec<TokenSeen>, MachineError> {
    let out = m.succeed(&read_script(tokens)).await?;
    Ok(parse_read(tokens, &out))
}

/// What is wrong with one token, if anything.
fn problem(s: &TokenSeen) -> Option<String> {
    let subvolume = layout::fsroot(&layout::state(&s.token.dir));
    if s.found != s.token.value {
        Some(format!("lost (found {:?})", s.found))
    } else if s.fsroot != subvolume {
        Some(format!("on {:?}, not the {subvolume} subvolume", s.fsroot))
    } else {
        None
    }
}

/// The `tokens` row: every token written earlier is intact, on its state
/// subvolume. One evidence line per directory holding tokens. A token in a
/// dir that is no state dir of the booted version is not judged (a new
/// version may mount that dir otherwise) and said so.
pub fn judge(seen: &[TokenSeen], booted: &Expectations) -> CheckResult {
    let mut dirs: Vec<&str> = Vec::new();
    for s in seen {
        if !dirs.contains(&s.token.parent()) {
            dirs.push(s.token.parent());
        }
    }
    let label = booted.version.label();
    let mut evidence = Vec::new();
    let (mut judged, mut bad_dirs) = (0usize, Vec::new());
    for dir in dirs {
        let here: Vec<&TokenSeen> = seen.iter().filter(|s| s.token.parent() == dir).collect();
        let state_dir = &here[0].token.dir;
        if !booted.state_dirs.contains(state_dir) {
            evidence.push(format!(
                "{dir}: not checked, {} is no state dir of {label}",
                layout::state_mountpoint(state_dir)
            ));
            continue;
        }
        judged += here.len();
        let subvolume = layout::fsroot(&layout::state(state_dir));
        let problems: Vec<String> = here
            .iter()
            .filter_map(|s| problem(s).map(|p| format!("{} {p}", s.token.written)))
            .collect();
        let stages = here
            .iter()
            .map(|s| s.token.written.name())
            .collect::<Vec<_>>()
            .join(", ");
        if problems.is_empty() {
            evidence.push(format!(
                "{dir}: token{} from {stages} intact on {subvolume}",
                if here.len() == 1 { "" } else { "s" }
            ));
        } else {
            bad_dirs.push(dir.to_owned());
            evidence.push(format!("{dir}: {}", problems.join("; ")));
        }
    }
    let stages: Vec<&str> = {
        let mut s: Vec<Stage> = seen.iter().map(|s| s.token.written).collect();
        s.sort();
        s.dedup();
        s.into_iter().map(Stage::name).collect()
    };
    if bad_dirs.is_empty() {
        CheckResult::new(
            TOKENS,
            Status::Pass,
            format!(
                "{judged} token(s) written in {} intact on the state subvolumes",
                stages.join(", ")
            ),
            evidence,
        )
    } else {
        CheckResult::new(
            TOKENS,
            Status::Fail,
            format!("tokens lost or misplaced in {}", bad_dirs.join(" ")),
            evidence,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testdata::expectations;

    /// The tokens of `written` in root and var, read back intact.
    fn intact(written: Stage) -> Vec<TokenSeen> {
        new_tokens(&["root".into(), "var".into()], written)
            .into_iter()
            .map(|token| TokenSeen {
                found: token.value.clone(),
                fsroot: format!("/state/{}", token.dir),
                token,
            })
            .collect()
    }

    #[test]
    fn a_token_per_state_dir_and_one_under_root_ssh() {
        let t = new_tokens(&["home".into(), "root".into()], Stage::Before);
        let paths: Vec<&str> = t.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/home/.strata-lifecycle-token.before",
                "/root/.strata-lifecycle-token.before",
                "/root/.ssh/.strata-lifecycle-token.before"
            ]
        );
        assert_eq!(t[2].dir, "root");
        assert!(t[0].value.starts_with("before-") && t[0].value != t[1].value);
        assert_eq!(new_tokens(&["var".into()], Stage::Upgrade).len(), 1);
    }

    #[test]
    fn scripts_write_and_read_every_token() {
        let t = new_tokens(&["root".into()], Stage::Upgrade);
        let w = write_script(&t);
        assert!(w.contains("mkdir -p /root/.ssh\n"), "{w}");
        assert!(w.contains(&format!(
            "printf '%s\\n' {} > /root/.ssh/.strata-lifecycle-token.upgrade\n",
            t[1].value
        )));
        let r = read_script(&t);
        assert_eq!(r.lines().count(), 2);
        assert!(r.contains("findmnt -n -o FSROOT -T /root/.ssh"), "{r}");
        let seen = parse_read(
            &t,
            &format!(
                "{}\t/state/root\nhead: cannot open 'x' for reading: No such file or directory\t/state/root\n",
                t[0].value
            ),
        );
        assert_eq!(seen[0].found, t[0].value);
        assert_eq!(seen[0].fsroot, "/state/root");
        assert!(seen[1].found.starts_with("head: cannot open"));
        assert_eq!(parse_read(&t, "")[0].found, "(no output)");
    }

    #[test]
    fn the_scripts_work_in_a_real_shell() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<Token> = new_tokens(&["root".into()], Stage::Before)
            .into_iter()
            .map(|mut t| {
                t.path = format!("{}{}", dir.path().display(), t.path);
                t
            })
            .collect();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let run = |script: String| {
            let out = std::process::Command::new("sh")
                .args(["-c", &script])
                .output()
                .unwrap();
            assert!(out.status.success(), "{script}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        run(write_script(&tokens));
        let ssh = dir.path().join("root/.ssh");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ssh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let seen = parse_read(&tokens, &run(read_script(&tokens)));
        for s in &seen {
            assert_eq!(s.found, s.token.value);
            assert!(s.fsroot.starts_with('/'), "{s:?}");
        }
        std::fs::remove_file(&tokens[1].path).unwrap();
        let seen = parse_read(&tokens, &run(read_script(&tokens)));
        assert!(seen[1].found.contains("No such file"), "{:?}", seen[1]);
    }

    #[test]
    fn intact_tokens_pass_with_a_line_per_directory() {
        let mut seen = intact(Stage::Before);
        seen.extend(intact(Stage::Upgrade));
        let r = judge(&seen, &expectations());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert_eq!(r.name, "tokens");
        assert_eq!(
            r.detail,
            "6 token(s) written in before, upgrade intact on the state subvolumes"
        );
        assert_eq!(
            r.evidence,
            [
                "/root: tokens from before, upgrade intact on /state/root",
                "/var: tokens from before, upgrade intact on /state/var",
                "/root/.ssh: tokens from before, upgrade intact on /state/root",
            ]
        );
    }

    #[test]
    fn lost_and_misplaced_tokens_are_named_by_directory() {
        let mut seen = intact(Stage::Before);
        seen[1].found = "head: cannot open '/var/.strata-lifecycle-token.before'".into();
        seen[2].fsroot = "/systems/v2/run/root".into();
        let r = judge(&seen, &expectations());
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "tokens lost or misplaced in /var /root/.ssh");
        assert_eq!(
            r.evidence[1],
            "/var: before lost (found \"head: cannot open '/var/.strata-lifecycle-token.before'\")"
        );
        assert_eq!(
            r.evidence[2],
            "/root/.ssh: before on \"/systems/v2/run/root\", not the /state/root subvolume"
        );
    }

    #[test]
    fn tokens_outside_the_booted_versions_state_dirs_are_not_judged() {
        let seen = intact(Stage::Before);
        let mut booted = expectations();
        booted.state_dirs = vec!["var".into()];
        let r = judge(&seen, &booted);
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert_eq!(
            r.evidence[0],
            "/root: not checked, /root is no state dir of factory"
        );
        assert!(r.detail.starts_with("1 token(s)"), "{}", r.detail);
    }
}
