//! The CI examples in `ci/examples/` parse, have the shape their CI system
//! expects, and use only strata commands and options that exist.
//!
//! Options are checked against the real binary's `strata SUB --help` (the
//! binary crate exposes no library to call `Cli::command()` on, and the help
//! text is what users see anyway).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(name: &str) -> Yaml {
    let path = repo().join("ci/examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{name}: one YAML document");
    docs.remove(0)
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} must be a string, got {y:?}"))
}

/// The shell scripts of a GitHub Actions workflow (every step's `run`).
fn github_scripts(doc: &Yaml) -> Vec<String> {
    assert!(!doc["on"].is_badvalue(), "a workflow needs `on:`");
    let jobs = doc["jobs"].as_hash().expect("`jobs:` is a mapping");
    assert!(!jobs.is_empty(), "no jobs");
    let mut scripts = Vec::new();
    for (name, job) in jobs {
        let name = str_of(name, "a job name");
        str_of(&job["runs-on"], &format!("jobs.{name}.runs-on"));
        let steps = job["steps"]
            .as_vec()
            .unwrap_or_else(|| panic!("jobs.{name}.steps must be a list"));
        for (i, step) in steps.iter().enumerate() {
            match (&step["run"], &step["uses"]) {
                (Yaml::String(run), Yaml::BadValue) => scripts.push(run.clone()),
                (Yaml::BadValue, Yaml::String(uses)) => {
                    assert!(
                        uses.contains('@'),
                        "jobs.{name}.steps[{i}]: pin `uses: {uses}` to a version"
                    );
                }
                _ => panic!("jobs.{name}.steps[{i}] needs exactly one of run/uses: {step:?}"),
            }
        }
    }
    scripts
}

/// The shell lines of a GitLab CI file (every job's script, before_script
/// and after_script).
fn gitlab_scripts(doc: &Yaml) -> Vec<String> {
    let top = doc.as_hash().expect("a mapping at the top");
    let mut scripts = Vec::new();
    let mut jobs = 0;
    for (name, job) in top {
        let name = str_of(name, "a top-level key");
        if job["script"].is_badvalue() {
            continue;
        }
        jobs += 1;
        for key in ["before_script", "script", "after_script"] {
            match &job[key] {
                Yaml::BadValue => {}
                Yaml::String(s) => scripts.push(s.clone()),
                Yaml::Array(lines) => {
                    for l in lines {
                        scripts.push(str_of(l, &format!("{name}.{key}[]")).to_owned());
                    }
                }
                other => panic!("{name}.{key}: a string or a list, got {other:?}"),
            }
        }
        if let Some(stage) = job["stage"].as_str() {
            let stages = doc["stages"]
                .as_vec()
                .expect("`stages:` lists the job's stage");
            assert!(
                stages.iter().any(|s| s.as_str() == Some(stage)),
                "{name}: stage {stage} is not in `stages:`"
            );
        }
    }
    assert!(jobs > 0, "no job with a `script:`");
    scripts
}

/// The simple commands of a shell script, each as its words (quotes removed,
/// `$VARS` kept as written) after `sudo`, assignments and shell keywords. A
/// small lexer: quotes, backslash-newline, comments and the operators
/// `; & | ( )` are enough for CI scripts.
fn simple_commands(script: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = script.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, commands: &mut Vec<Vec<String>>| {
        if *in_word {
            commands.last_mut().unwrap().push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\\') => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    word.push(n);
                    in_word = true;
                }
            },
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => {
                while chars.peek().is_some_and(|&n| n != '\n') {
                    chars.next();
                }
            }
            (None, ';' | '&' | '|' | '(' | ')' | '\n') => {
                end_word(&mut word, &mut in_word, &mut commands);
                commands.push(Vec::new());
            }
            (None, c) if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut commands),
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut commands);
    commands
        .into_iter()
        .map(|mut words| {
            let skip = words
                .iter()
                .take_while(|w| {
                    matches!(
                        w.as_str(),
                        "sudo" | "env" | "exec" | "time" | "then" | "else" | "do" | "!" | "if"
                    ) || (w.contains('=') && !w.starts_with('-'))
                })
                .count();
            words.drain(..skip);
            words
        })
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn the_lexer_reads_shell_as_shell() {
    let got = simple_commands(
        "if [ -e /dev/kvm ]; then echo \"present; strata will use it\"; fi\n\
         # strata man\n\
         FOO=1 sudo strata test \"$X/sys img\" \\\n  --junit 'a b.xml' && strata inspect i # trailing\n",
    );
    assert_eq!(
        got,
        vec![
            vec!["[", "-e", "/dev/kvm", "]"],
            vec!["echo", "present; strata will use it"],
            vec!["fi"],
            vec!["strata", "test", "$X/sys img", "--junit", "a b.xml"],
            vec!["strata", "inspect", "i"],
        ]
    );
}

fn is_strata(word: &str) -> bool {
    word == "strata" || word.ends_with("/strata")
}

/// `strata SUB --help` (cached): the subcommand must exist.
fn help_of<'a>(cache: &'a mut BTreeMap<String, String>, sub: &str) -> &'a str {
    cache.entry(sub.to_owned()).or_insert_with(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`strata {sub}` is not a strata command: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// `--name` appears in the help as a whole option name.
fn mentions_option(help: &str, opt: &str) -> bool {
    help.match_indices(opt).any(|(i, _)| {
        !help[i + opt.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Every strata invocation in `scripts`: (subcommand, options) after
/// checking both against the binary. Also checks the repo scripts they run.
fn check_scripts(file: &str, scripts: &[String]) -> Vec<(String, Vec<String>)> {
    let mut helps = BTreeMap::new();
    let mut found = Vec::new();
    for words in scripts.iter().flat_map(|s| simple_commands(s)) {
        if words[0].starts_with("ci/") {
            let script = repo().join(&words[0]);
            assert!(
                script.is_file(),
                "{file}: runs {} which is not in the repo",
                words[0]
            );
        }
        if !is_strata(&words[0]) {
            continue;
        }
        let sub = words
            .get(1)
            .unwrap_or_else(|| panic!("{file}: `{}` without a subcommand", words.join(" ")));
        let help = help_of(&mut helps, sub).to_owned();
        let opts: Vec<String> = words[2..]
            .iter()
            .filter(|w| w.starts_with("--"))
            .map(|w| w.split('=').next().unwrap().to_owned())
            .collect();
        for opt in &opts {
            assert!(
                mentions_option(&help, opt),
                "{file}: `strata {sub}` has no option {opt} (in `{}`)",
                words.join(" ")
            );
        }
        found.push((sub.clone(), opts));
    }
    found
}

/// Both examples do the job they are for: build strata, build an image, and
/// run `strata test` with a JUnit report, artifacts and automatic accel.
fn check_the_job(file: &str, scripts: &[String], used: &[(String, Vec<String>)]) {
    let all = scripts.join("\n");
    assert!(
        scripts
            .iter()
            .flat_map(|s| simple_commands(s))
            .any(|w| w[0] == "cargo" && w.iter().any(|a| a == "build")),
        "{file}: builds strata with cargo"
    );
    assert!(
        all.contains("ci/setup"),
        "{file}: installs the host packages with ci/setup"
    );
    assert!(
        used.iter().any(|(s, _)| s == "build"),
        "{file}: builds an image with `strata build`"
    );
    let test = used
        .iter()
        .find(|(s, _)| s == "test")
        .unwrap_or_else(|| panic!("{file}: runs `strata test`"));
    for opt in ["--junit", "--artifacts", "--accel"] {
        assert!(test.1.iter().any(|o| o == opt), "{file}: strata test {opt}");
    }
    assert!(
        all.contains("--accel auto"),
        "{file}: KVM when it works, TCG otherwise"
    );
}

#[test]
fn github_actions_example() {
    let file = "github-actions.yml";
    let doc = load(file);
    let scripts = github_scripts(&doc);
    let used = check_scripts(file, &scripts);
    check_the_job(file, &scripts, &used);
    let all = scripts.join("\n");
    assert!(
        all.contains(r#"KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm""#),
        "the udev rule GitHub runners need for /dev/kvm"
    );
    assert!(all.contains("udevadm trigger"), "the rule is applied");
    // The report on every run, the artifacts on failure.
    let steps: Vec<&Yaml> = doc["jobs"]
        .as_hash()
        .unwrap()
        .values()
        .flat_map(|j| j["steps"].as_vec().unwrap())
        .collect();
    let uses = |prefix: &str| {
        steps
            .iter()
            .find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(prefix)))
            .unwrap_or_else(|| panic!("a step using {prefix}"))
    };
    assert_eq!(
        uses("mikepenz/action-junit-report")["if"].as_str(),
        Some("always()")
    );
    assert_eq!(
        uses("actions/upload-artifact")["if"].as_str(),
        Some("failure()")
    );
}

#[test]
fn gitlab_ci_example() {
    let file = "gitlab-ci.yml";
    let doc = load(file);
    let scripts = gitlab_scripts(&doc);
    let used = check_scripts(file, &scripts);
    check_the_job(file, &scripts, &used);
    let job = doc
        .as_hash()
        .unwrap()
        .values()
        .find(|j| !j["script"].is_badvalue())
        .unwrap();
    assert_eq!(
        job["artifacts"]["reports"]["junit"].as_str(),
        Some("report/junit.xml")
    );
    assert_eq!(job["artifacts"]["when"].as_str(), Some("always"));
}

#[test]
fn the_checker_catches_a_wrong_option() {
    let scripts =
        vec!["sudo target/release/strata test img --junit j.xml --no-such-option".to_owned()];
    let caught = std::panic::catch_unwind(|| check_scripts("sample", &scripts));
    let msg = caught
        .err()
        .and_then(|e| e.downcast_ref::<String>().cloned())
        .expect("an unknown option must fail the check");
    assert!(msg.contains("--no-such-option"), "{msg}");
    let scripts = vec!["strata frobnicate --x".to_owned()];
    assert!(std::panic::catch_unwind(|| check_scripts("sample", &scripts)).is_err());
    // Not an invocation: strata as an argument of another program.
    let scripts =
        vec!["sudo install -m 0755 target/release/strata /usr/local/bin/strata".to_owned()];
    assert!(check_scripts("sample", &scripts).is_empty());
}

#[test]
fn readme_links_the_examples() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for f in [
        "ci/examples/github-actions.yml",
        "ci/examples/gitlab-ci.yml",
    ] {
        assert!(readme.contains(f), "README.md links {f}");
        assert!(Path::new(&repo().join(f)).is_file());
    }
}

/// What a user types: `strata completions SHELL` and `strata man`, from the
/// real binary.
#[test]
fn completions_and_man_page_from_the_cli() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "strata {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        assert!(!script.trim().is_empty(), "{shell}");
        assert!(
            script.contains("build"),
            "{shell} completion mentions build"
        );
    }
    let page = run(&["man"]);
    // clap_mangen starts with roff requests (.ie/.el, then .TH).
    assert!(page.starts_with('.'), "{}", &page[..page.len().min(200)]);
    assert!(
        page.contains("\n.TH strata 1"),
        "{}",
        &page[..page.len().min(200)]
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
