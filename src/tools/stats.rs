//! `ringfwd stats` (not implemented yet).

use clap::Args;

use super::ToolError;

#[derive(Debug, Args)]
pub struct StatsArgs {}

/// Runs the tool.
///
/// # Errors
/// Always, until implemented.
pub fn run(_args: StatsArgs) -> Result<(), ToolError> {
    Err("not implemented yet".into())
}
