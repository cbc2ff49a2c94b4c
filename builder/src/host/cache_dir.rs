//! Where strata keeps what it may reuse between runs (fixture rootfs
//! builds, the host's KVM verdict): one rule for every cache.

use std::path::PathBuf;

/// `$XDG_CACHE_HOME/strata`, `/var/cache/strata` as root, else
/// `~/.cache/strata`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("strata");
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/cache/strata");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/strata"),
        None => PathBuf::from("/var/cache/strata"),
    }
}
