//! `ringfwd bench` (not implemented yet).

use clap::Args;

use super::ToolError;

#[derive(Debug, Args)]
pub struct BenchArgs {}

/// Runs the tool.
///
/// # Errors
/// Always, until implemented.
pub fn run(_args: BenchArgs) -> Result<(), ToolError> {
    Err("not implemented yet".into())
}
