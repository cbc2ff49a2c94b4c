//! `strata completions SHELL` and `strata man`: both generated from the clap
//! definitions at run time, so they cannot drift from the real CLI.

use super::exit;
use clap::CommandFactory;
use std::io::Write;
use strata_builder::error::FailureKind;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Writes the completion script for `args.shell` to stdout.
pub fn completions(args: CompletionsArgs) -> u8 {
    emit(&completion_script(args.shell))
}

/// Writes the man page (roff) to stdout.
pub fn man() -> u8 {
    match man_page() {
        Ok(page) => emit(&page),
        Err(e) => exit::fail_with(
            FailureKind::Infrastructure,
            &anyhow::Error::new(e).context("rendering the man page"),
        ),
    }
}

fn completion_script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut crate::Cli::command(), "strata", &mut out);
    out
}

fn man_page() -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(crate::Cli::command()).render(&mut out)?;
    Ok(out)
}

fn emit(bytes: &[u8]) -> u8 {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => exit::SUCCESS,
        // `strata man | head`: the reader had enough; not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::SUCCESS,
        Err(e) => exit::fail_with(
            FailureKind::Infrastructure,
            &anyhow::Error::new(e).context("writing to stdout"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    #[test]
    fn completions_know_every_subcommand() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            assert!(!script.is_empty(), "{shell}");
            for sub in ["build", "test", "fixture", "inspect", "completions", "man"] {
                assert!(script.contains(sub), "{shell} completion lacks {sub}");
            }
            // An option of a subcommand, not only the names.
            assert!(script.contains("state-migration"), "{shell}");
        }
    }

    #[test]
    fn man_page_is_roff() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        let th = page
            .lines()
            .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"))
            .unwrap();
        assert!(th.starts_with(".TH strata 1"), "{th}");
        assert!(page.contains(".SH NAME"));
        assert!(page.contains(".SH SUBCOMMANDS"));
    }
}
