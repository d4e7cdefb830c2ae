//! The admin HTTP listener (not implemented yet).

use std::net::SocketAddr;
use std::sync::Arc;

use super::Metrics;

/// Starts the admin listener on its own thread.
///
/// # Errors
/// The address cannot be bound.
pub fn spawn(addr: SocketAddr, _metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::other(format!(
        "admin listener on {addr}: not implemented yet"
    )))
}
