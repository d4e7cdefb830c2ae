//! `ringfwd sink` (not implemented yet).

use clap::Args;

use super::ToolError;

#[derive(Debug, Args)]
pub struct SinkArgs {}

/// Runs the tool.
///
/// # Errors
/// Always, until implemented.
pub fn run(_args: SinkArgs) -> Result<(), ToolError> {
    Err("not implemented yet".into())
}
