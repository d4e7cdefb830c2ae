//! Network tools shipped in the same binary: the backends the tests and benchmarks forward
//! to, TCP ping, the load generator, the stats viewer and the member API's client.
//!
//! `echo` and `sink` share their listener and runtime set-up ([`serve`]); `echo` and `bench`
//! share the TLV frame ([`frame`]). Usage of each tool is in `docs/TOOLS.md`.

pub mod bench;
pub mod echo;
pub mod frame;
pub mod ping;
pub mod serve;
pub mod sink;
pub mod stats;
pub mod upstream;

/// A tool's failure, printed as one line by `main`.
pub type ToolError = Box<dyn std::error::Error + Send + Sync>;
