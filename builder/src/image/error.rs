//! What can go wrong opening or reading an image: the user's input (exit 2)
//! or the tools under it (exit 3).

use crate::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Something the user can fix: a missing file, not Btrfs, not root,
    /// not a strata layout.
    #[error("{0}")]
    Input(String),
    /// losetup, mount or btrfs failed. The message names what was being
    /// done and carries the tool's own words.
    #[error("{context}: {error}")]
    Tool { context: String, error: BoxError },
    /// SIGINT/SIGTERM while the appliance was starting; it was stopped.
    #[error("interrupted")]
    Interrupted,
}

impl crate::error::Failure for ImageError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            ImageError::Input(_) => FailureKind::Input,
            ImageError::Tool { .. } => FailureKind::Infrastructure,
            ImageError::Interrupted => FailureKind::Interrupted,
        }
    }
}

impl ImageError {
    pub fn is_input(&self) -> bool {
        matches!(self, ImageError::Input(_))
    }

    pub(crate) fn tool(context: impl Into<String>, error: impl Into<BoxError>) -> ImageError {
        ImageError::Tool {
            context: context.into(),
            error: error.into(),
        }
    }
}

impl From<crate::lock::LockError> for ImageError {
    fn from(e: crate::lock::LockError) -> Self {
        if e.is_input() {
            ImageError::Input(e.to_string())
        } else {
            ImageError::tool("locking the image", e)
        }
    }
}
