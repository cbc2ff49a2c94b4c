//! SIGINT/SIGTERM become a flag the build polls, so it stops between (or
//! inside long) steps and unwinds through its cleanup guards instead of
//! dying with mounts and loop devices left behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Registers for SIGINT and SIGTERM.
    pub fn on_signals() -> std::io::Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
        }
        Ok(Interrupt(flag))
    }

    pub fn raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn raise(&self) {
        self.0.store(true, Ordering::Relaxed)
    }
}
