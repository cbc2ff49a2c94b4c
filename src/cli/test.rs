//! `strata test`.

#[derive(clap::Args)]
pub struct TestArgs {}

pub fn run(_args: TestArgs) -> u8 {
    super::fail(2, &anyhow::anyhow!("strata test: not implemented yet"))
}
