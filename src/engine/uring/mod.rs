//! The io_uring thread-per-core engine (work in progress).

use super::{EngineError, Listeners, RunContext};
use crate::config::Config;

/// Why io_uring cannot be used here, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Checks that a ring can be set up on this host.
///
/// # Errors
/// [`Unavailable`] saying why and how to enable io_uring.
pub fn probe() -> Result<(), Unavailable> {
    Err(Unavailable("the io_uring engine is not built yet".into()))
}

/// Runs the engine until shutdown.
///
/// # Errors
/// Ring setup failure.
pub fn run(_config: &Config, _listeners: Listeners, _ctx: RunContext) -> Result<(), EngineError> {
    Err(EngineError::UringUnavailable(Unavailable(
        "the io_uring engine is not built yet".into(),
    )))
}
