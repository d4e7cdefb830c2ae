//! Network tools shipped in the same binary: the backends the tests and benchmarks forward
//! to, TCP ping, the load generator, and the stats viewer.

pub mod bench;
pub mod echo;
pub mod ping;
pub mod sink;
pub mod stats;

/// A tool's failure, printed as one line by `main`.
pub type ToolError = Box<dyn std::error::Error + Send + Sync>;
