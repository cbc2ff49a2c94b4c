//! `strata inspect`.

#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> u8 {
    super::fail(2, &anyhow::anyhow!("strata inspect: not implemented yet"))
}
