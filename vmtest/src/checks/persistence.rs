//! `persistence`: a token written into each state dir survives a clean
//! reboot and a power cut, on the state subvolume. The check tells its own
//! story (write, reboot, read, write, crash, read) through `Vm`; the
//! session only knows how to reboot and crash the machine.

use super::{CheckId, Vm};
use crate::machine::{Machine, MachineError};
use crate::report::{CheckResult, Status};
use strata_builder::expect::Expectations;
use strata_builder::layout;

const ID: CheckId = CheckId::Persistence;

/// Dot-file a token is written to, suffixed with the token's phase.
pub const TOKEN_FILE: &str = ".strata-persistence-token";

/// One token as written: the state dir, when it was written, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub dir: String,
    /// `reboot` or `powercut`: names the file and the evidence.
    pub phase: &'static str,
    pub value: String,
}

/// What the guest shows of one token after a boot.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSeen {
    pub token: Token,
    /// The file's first line (or cat's complaint).
    pub found: String,
    /// FSROOT of the mount at the state dir's mountpoint.
    pub fsroot: String,
}

/// Everything the verdict rests on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Tokens that could not be written at all (a read-only or full state
    /// dir: the image's defect), with the shell's complaint.
    pub unwritable: Vec<(Token, String)>,
    /// The reboot tokens after the clean reboot.
    pub after_reboot: Vec<TokenSeen>,
    /// The reboot tokens again, after the power cut.
    pub reboot_tokens_after_cut: Vec<TokenSeen>,
    /// The tokens written just before the power cut.
    pub after_cut: Vec<TokenSeen>,
}

pub async fn run(vm: &mut impl Vm, expect: &Expectations) -> Result<CheckResult, MachineError> {
    let dirs = &expect.state_dirs;
    let (before_reboot, mut unwritable) = write_tokens(vm.machine(), dirs, "reboot").await?;
    // Each set of tokens is written, then synced by its disruption and
    // nothing else: the power cut's right before its disk is taken. When
    // it branches off (its cold boot beside the clean reboot), that is now.
    let beside = vm.power_cut_beside();
    let mut before_cut = Vec::new();
    if beside {
        let (written, refused) = write_tokens(vm.machine(), dirs, "powercut").await?;
        (before_cut, unwritable) = (written, [unwritable, refused].concat());
        vm.fork_power_cut().await?;
    }
    vm.reboot().await?;
    let after_reboot = read_tokens(vm.machine(), &before_reboot).await?;
    keep_journal(vm).await;

    if !beside {
        let (written, refused) = write_tokens(vm.machine(), dirs, "powercut").await?;
        (before_cut, unwritable) = (written, [unwritable, refused].concat());
    }
    vm.crash().await?;
    let reboot_tokens_after_cut = read_tokens(vm.machine(), &before_reboot).await?;
    let after_cut = read_tokens(vm.machine(), &before_cut).await?;
    keep_journal(vm).await;

    Ok(judge(
        &Observation {
            unwritable,
            after_reboot,
            reboot_tokens_after_cut,
            after_cut,
        },
        dirs,
    ))
}

/// Exporting the journal keeps it as an artifact; the verdict does not
/// depend on it, so a failed export is no reason to stop.
async fn keep_journal(vm: &mut impl Vm) {
    let _ = vm.journal().await;
}

/// Writes a distinct token into each state dir. Returns the tokens written
/// and, apart, those the guest refused (with its complaint): a state dir
/// that cannot be written is the image's defect, for the verdict to name.
pub async fn write_tokens(
    m: &mut Machine,
    dirs: &[String],
    phase: &'static str,
) -> Result<(Vec<Token>, Vec<(Token, String)>), MachineError> {
    let mut tokens = Vec::new();
    let mut script = String::new();
    for d in dirs {
        let token = Token {
            dir: d.clone(),
            phase,
            value: format!("{phase}-{:016x}", crate::random_u64()),
        };
        // One line per token: "ok", or "fail <the shell's complaint>".
        script.push_str(&format!(
            "if err=$(printf '%s\\n' '{}' 2>&1 > '{}'); then echo ok; else printf 'fail %s\\n' \"$(printf '%s' \"$err\" | tr '\\n' ' ')\"; fi\n",
            token.value,
            token_path(&token)
        ));
        tokens.push(token);
    }
    let out = m.succeed(&script).await?;
    Ok(split_written(tokens, &out))
}

/// Pairs the write script's result lines with the tokens, in order; a
/// token without a line was not written either.
pub fn split_written(tokens: Vec<Token>, out: &str) -> (Vec<Token>, Vec<(Token, String)>) {
    let mut lines = out.lines();
    let mut written = Vec::new();
    let mut refused = Vec::new();
    for t in tokens {
        match lines.next().map(str::trim) {
            Some("ok") => written.push(t),
            Some(l) => {
                let why = l.strip_prefix("fail").unwrap_or(l).trim().to_owned();
                refused.push((t, why));
            }
            None => refused.push((t, "no result from the guest".into())),
        }
    }
    (written, refused)
}

/// `/<dir>/.strata-persistence-token.<phase>` in the booted system. State
/// dir names follow the builder's rules, so single quotes are enough.
fn token_path(t: &Token) -> String {
    format!(
        "{}/{TOKEN_FILE}.{}",
        layout::state_mountpoint(&t.dir),
        t.phase
    )
}

/// Reads the tokens back, with the subvolume each one sits on.
pub async fn read_tokens(
    m: &mut Machine,
    tokens: &[Token],
) -> Result<Vec<TokenSeen>, MachineError> {
    let mut seen = Vec::new();
    for t in tokens {
        let script = format!(
            "cat '{}' 2>&1; echo; findmnt -n -o FSROOT --mountpoint '{}' || echo '(not a mountpoint)'",
            token_path(t),
            layout::state_mountpoint(&t.dir)
        );
        let out = m.exec(&script).await?.stdout_str();
        let mut lines = out.lines();
        let found = lines.next().unwrap_or("").trim().to_owned();
        let _blank = lines.next();
        let fsroot = lines.next().unwrap_or("").trim().to_owned();
        seen.push(TokenSeen {
            token: t.clone(),
            found,
            fsroot,
        });
    }
    Ok(seen)
}

/// One line per token that is lost or not on its state subvolume.
pub fn problems(seen: &[TokenSeen]) -> Vec<String> {
    seen.iter()
        .filter_map(|s| {
            let Token { dir, phase, value } = &s.token;
            let mountpoint = layout::state_mountpoint(dir);
            let subvolume = layout::fsroot(&layout::state(dir));
            if s.found != *value {
                Some(format!(
                    "{mountpoint}: token {phase} lost (found {:?})",
                    s.found
                ))
            } else if s.fsroot != subvolume {
                Some(format!(
                    "{mountpoint}: token {phase} survived, but on {:?}, not the {subvolume} subvolume",
                    s.fsroot
                ))
            } else {
                None
            }
        })
        .collect()
}

/// `dirs` are the state dirs a token was written to.
pub fn judge(obs: &Observation, dirs: &[String]) -> CheckResult {
    let n = dirs.len();
    let mut evidence = Vec::new();
    let mut lost: Vec<String> = obs
        .unwritable
        .iter()
        .map(|(t, why)| {
            format!(
                "{}: token {} could not be written: {why}",
                layout::state_mountpoint(&t.dir),
                t.phase
            )
        })
        .collect();
    let p = problems(&obs.after_reboot);
    evidence.push(format!(
        "clean reboot: {} of {n} tokens intact ({})",
        n - p.len(),
        dirs.iter()
            .map(|d| layout::state_mountpoint(d))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    lost.extend(p.iter().map(|p| format!("after clean reboot: {p}")));
    let p1 = problems(&obs.reboot_tokens_after_cut);
    let p2 = problems(&obs.after_cut);
    evidence.push(format!(
        "power cut: {} of {n} tokens written before the cut intact, {} of {n} from before the reboot",
        n - p2.len(),
        n - p1.len(),
    ));
    lost.extend(
        p1.iter()
            .chain(&p2)
            .map(|p| format!("after power cut: {p}")),
    );
    if lost.is_empty() {
        CheckResult::new(
            ID.name(),
            Status::Pass,
            format!("tokens in {n} state dirs survived a clean reboot and a power cut"),
            evidence,
        )
    } else {
        evidence.extend(lost.iter().cloned());
        CheckResult::new(
            ID.name(),
            Status::Fail,
            format!("{} token(s) lost or misplaced", lost.len()),
            evidence,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> Vec<String> {
        vec!["root".into(), "var".into()]
    }

    /// Every token of `phase` read back intact from its state subvolume.
    fn intact(phase: &'static str) -> Vec<TokenSeen> {
        dirs()
            .into_iter()
            .map(|dir| TokenSeen {
                fsroot: format!("/state/{dir}"),
                found: format!("{phase}-{dir}"),
                token: Token {
                    value: format!("{phase}-{dir}"),
                    dir,
                    phase,
                },
            })
            .collect()
    }

    fn obs() -> Observation {
        Observation {
            unwritable: vec![],
            after_reboot: intact("reboot"),
            reboot_tokens_after_cut: intact("reboot"),
            after_cut: intact("powercut"),
        }
    }

    #[test]
    fn passes_when_every_token_survives_on_its_subvolume() {
        let r = judge(&obs(), &dirs());
        assert_eq!(r.status, Status::Pass, "{r:?}");
        assert_eq!(
            r.detail,
            "tokens in 2 state dirs survived a clean reboot and a power cut"
        );
        assert_eq!(
            r.evidence,
            [
                "clean reboot: 2 of 2 tokens intact (/root /var)",
                "power cut: 2 of 2 tokens written before the cut intact, 2 of 2 from before the reboot"
            ]
        );
    }

    #[test]
    fn a_state_dir_that_cannot_be_written_fails_the_check_naming_it() {
        let tokens: Vec<Token> = intact("reboot").into_iter().map(|s| s.token).collect();
        // What the write script prints when /var is read-only.
        let out = "ok\nfail sh: 2: cannot create /var/.strata-persistence-token.reboot: Read-only file system\n";
        let (written, refused) = split_written(tokens, out);
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].dir, "root");
        let mut o = obs();
        o.after_reboot.truncate(1);
        o.reboot_tokens_after_cut.truncate(1);
        o.unwritable = refused;
        let r = judge(&o, &dirs());
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.name, "persistence");
        assert!(
            r.evidence.contains(&"/var: token reboot could not be written: sh: 2: cannot create /var/.strata-persistence-token.reboot: Read-only file system".to_owned()),
            "{:?}",
            r.evidence
        );
        // Nothing to read back is not a second loss.
        assert_eq!(r.detail, "1 token(s) lost or misplaced");
    }

    #[test]
    fn lost_and_misplaced_tokens_are_named() {
        let mut o = obs();
        // /var is a tmpfs: the reboot token is gone after the reboot...
        o.after_reboot[1].found =
            "cat: /var/.strata-persistence-token.reboot: No such file or directory".into();
        o.reboot_tokens_after_cut[1].found = o.after_reboot[1].found.clone();
        // ...and the power cut token was written to the wrong subvolume.
        o.after_cut[0].fsroot = "/systems/factory/run/root".into();
        let r = judge(&o, &dirs());
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.detail, "3 token(s) lost or misplaced");
        assert_eq!(
            r.evidence[1],
            "power cut: 1 of 2 tokens written before the cut intact, 1 of 2 from before the reboot"
        );
        assert_eq!(
            r.evidence[2],
            "after clean reboot: /var: token reboot lost (found \"cat: /var/.strata-persistence-token.reboot: No such file or directory\")"
        );
        assert_eq!(
            r.evidence[4],
            "after power cut: /root: token powercut survived, but on \"/systems/factory/run/root\", not the /state/root subvolume"
        );
    }
}
