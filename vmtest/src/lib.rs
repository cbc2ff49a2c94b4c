//! Boots strata images in QEMU and checks the layout from inside the guest.
//!
//! `run` tells the story (boot, check, reboot, power cut); `machine` is the
//! small API it is told with, over `qemu` (the typed command line), `qmp`,
//! `agent` (qemu-guest-agent) and `serial`. `accel` picks KVM or TCG,
//! `bootfiles` extracts what `--boot direct` needs, `checks` holds the
//! layout.md §5 checks (one module each, `CheckId` the registry), `journal`
//! reads mount warnings out of the guest journal, `report` renders the
//! verdict and `artifacts` keeps the evidence. `workdir` is a run's private
//! scratch dir (and sweeps up after runs that were killed), `interrupt`
//! turns SIGINT/SIGTERM into an orderly stop. `lifecycle` is the upgrade
//! lifecycle's (`--upgrade-to`) part that needs no VM: the trait through
//! which the binary changes the image between boots, phases, tokens. `spec`
//! reads test files (`strata test --spec`) and renders a run's plan.

pub mod accel;
pub mod agent;
pub mod artifacts;
pub mod bootfiles;
pub mod checks;
pub mod interrupt;
pub mod journal;
pub mod lifecycle;
pub mod machine;
pub mod payload;
pub mod power_cut;
pub mod qemu;
pub mod qemu_output;
pub mod qmp;
pub mod report;
pub mod run;
pub mod serial;
pub mod spec;
pub mod stage;
pub mod tokens;
pub mod workdir;

/// Non-cryptographic randomness for guest-sync ids and persistence tokens:
/// they must differ between runs and calls, not resist an attacker.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}
