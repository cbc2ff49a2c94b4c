//! One module per subcommand: argument parsing and the terminal UI. The
//! engines in the library crates never print; they report events.

pub mod build;
pub mod fixture;
pub mod inspect;
pub mod progress;
pub mod test;
pub mod upgrade;

/// Prints an error chain on one line and returns the exit code.
pub fn fail(code: u8, err: &anyhow::Error) -> u8 {
    eprintln!("strata: error: {err:#}");
    code
}
