//! One module per subcommand: argument parsing and the terminal UI. The
//! engines in the library crates never print; they report events.

pub mod build;
pub mod completions;
pub mod exit;
pub mod fixture;
pub mod inspect;
pub mod progress;
pub mod test;
pub mod upgrade;
pub mod versions;
