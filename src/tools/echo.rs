//! `ringfwd echo` (not implemented yet).

use clap::Args;

use super::ToolError;

#[derive(Debug, Args)]
pub struct EchoArgs {}

/// Runs the tool.
///
/// # Errors
/// Always, until implemented.
pub fn run(_args: EchoArgs) -> Result<(), ToolError> {
    Err("not implemented yet".into())
}
