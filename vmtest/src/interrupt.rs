//! SIGINT and SIGTERM as a future a run can stop on: the run then ends
//! like any other (QEMU killed, artifacts and report written), marked
//! interrupted, instead of being dropped mid-way.

use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Installs both handlers now, before the run starts, so that from here
    /// on a signal is ours to act on (inside a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// The name of the first signal to arrive.
    pub async fn first(mut self) -> String {
        tokio::select! {
            _ = self.int.recv() => "SIGINT".into(),
            _ = self.term.recv() => "SIGTERM".into(),
        }
    }
}
