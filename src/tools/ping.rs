//! `ringfwd ping` (not implemented yet).

use clap::Args;

use super::ToolError;

#[derive(Debug, Args)]
pub struct PingArgs {}

/// Runs the tool.
///
/// # Errors
/// Always, until implemented.
pub fn run(_args: PingArgs) -> Result<(), ToolError> {
    Err("not implemented yet".into())
}
