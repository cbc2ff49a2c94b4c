//! `strata fixture`.

#[derive(clap::Args)]
pub struct FixtureArgs {}

pub fn run(_args: FixtureArgs) -> u8 {
    super::fail(2, &anyhow::anyhow!("strata fixture: not implemented yet"))
}
