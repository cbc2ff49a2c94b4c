//! `strata build`.

#[derive(clap::Args)]
pub struct BuildArgs {}

pub fn run(_args: BuildArgs) -> u8 {
    super::fail(2, &anyhow::anyhow!("strata build: not implemented yet"))
}
