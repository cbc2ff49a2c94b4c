//! Boots strata images in QEMU and checks the layout from inside the guest.

pub mod agent;
pub mod journal;
pub mod qemu;
pub mod qmp;

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
pub mod accel;
pub mod artifacts;
pub mod bootfiles;
pub mod checks;
pub mod machine;
pub mod report;
pub mod run;
pub mod serial;
