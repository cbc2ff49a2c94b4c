//! Build errors: bad input (the user can fix it; exit 2) or a failed step
//! (named, with the underlying cause).

use crate::progress::Step;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Something about the inputs; nothing was created.
    #[error("{0}")]
    Input(String),
    #[error("{context}: {source}")]
    Step {
        step: Step,
        context: String,
        #[source]
        source: BoxError,
    },
    #[error("interrupted by signal; cleaned up")]
    Interrupted,
}

impl BuildError {
    pub fn is_input(&self) -> bool {
        matches!(self, BuildError::Input(_))
    }
}

/// Adds "what we were doing" to any error, bootc style:
/// `creating subvolume state/var: btrfs subvolume create … failed: …`.
pub trait Context<T> {
    fn context(self, step: Step, what: impl FnOnce() -> String) -> Result<T, BuildError>;
}

impl<T, E: Into<BoxError>> Context<T> for Result<T, E> {
    fn context(self, step: Step, what: impl FnOnce() -> String) -> Result<T, BuildError> {
        self.map_err(|e| BuildError::Step {
            step,
            context: what(),
            source: e.into(),
        })
    }
}
