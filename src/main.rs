//! `strata`: build Btrfs system-layout images and prove them in QEMU.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    /// More log output on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deploy a rootfs into a bootable Btrfs system-layout image.
    Build(cli::build::BuildArgs),
    /// Boot an image in QEMU and check the layout from inside the guest.
    Test(cli::test::TestArgs),
    /// Build a guest root filesystem fixture.
    Fixture(cli::fixture::FixtureArgs),
    /// Show an image's layout without booting it; --lint finds hidden files.
    Inspect(cli::inspect::InspectArgs),
    /// Print a shell completion script (bash, zsh, fish, …) to stdout.
    Completions(cli::completions::CompletionsArgs),
    /// Print the man page (roff) to stdout.
    Man,
    /// List an image's versions: default, kernel, bytes held alone, deployed at.
    Versions(cli::versions::VersionsArgs),
    /// Make a version the default (rollback, roll-forward).
    SetDefault(cli::versions::SetDefaultArgs),
    /// Delete a version that is not the default.
    Remove(cli::versions::RemoveArgs),
    /// Deploy a new rootfs as a new version beside the existing ones.
    Upgrade(cli::upgrade::UpgradeArgs),
    /// Internal: the rootless build's worker inside a user namespace
    /// (started by `strata build`; JSON request on stdin, JSON lines out).
    #[command(name = "rootless-worker", hide = true)]
    RootlessWorker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match cli.command {
        Command::Build(a) => cli::build::run(a),
        Command::Test(a) => cli::test::run(a),
        Command::Fixture(a) => cli::fixture::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Completions(a) => cli::completions::completions(a),
        Command::Man => cli::completions::man(),
        Command::Versions(a) => cli::versions::list(a),
        Command::SetDefault(a) => cli::versions::set_default(a),
        Command::Remove(a) => cli::versions::remove(a),
        Command::Upgrade(a) => cli::upgrade::run(a),
        Command::RootlessWorker => strata_builder::rootless::worker::serve(
            std::io::stdin().lock(),
            std::io::stdout().lock(),
        ),
    };
    ExitCode::from(code)
}
