//! Configuration: the TOML file and the `run` flags, turned into one validated [`Config`].
//!
//! Three stages, as in ripgrep's low/high args: [`raw`] mirrors the file as written (serde,
//! with the position of every value), `validate` resolves addresses, applies defaults and
//! cross-checks, and [`model`] holds the result, whose fields carry their units (`Duration`,
//! `SocketAddr`, `NonZeroUsize`, [`ByteSize`]). Every error names the file, the line and the
//! key, in one line an operator can act on.
//!
//! - `raw.rs`: the serde structures of the file; every table denies unknown keys.
//! - `validate/`: raw → model; `pool.rs` is the part shared by a rule's pool and its routes'.
//! - `model.rs`: the validated types every engine runs from.
//! - `resolve.rs`: addresses written `host:port`, looked up.
//! - `print.rs`: the effective configuration as TOML (`ringfwd check`).
//! - `error.rs`, `hint.rs`, `units.rs`: errors with their position, "did you mean", units.

mod error;
mod hint;
pub mod model;
mod print;
pub mod raw;
mod resolve;
pub mod units;
mod validate;

pub use error::ConfigError;
pub use model::*;
pub use resolve::{UNRESOLVED_RETRY, resolve_addrs, resolve_member, resolve_one, resolve_upstream};
pub use units::{ByteSize, format_duration, parse_duration, parse_size};

#[cfg(test)]
mod tests;
