//! The relay's vocabulary: the words every layer uses to talk about a connection — which way
//! bytes flow ([`Direction`]), how they moved ([`PathKind`]), why a connection was turned
//! away ([`RejectReason`]), why a connect failed ([`ConnectError`]), why a session ended
//! ([`CloseReason`]), an address prefix ([`Cidr`]), a connection rate ([`Rate`]) and a
//! server-name pattern ([`SniPattern`]).
//!
//! This module is the leaf of the module graph: it uses nothing of the crate, so config,
//! session, upstream, metrics and the engines can all speak it without depending on each
//! other (docs/ARCHITECTURE.md, "Module graph"; `tests/module_graph.rs` keeps it so).

mod cidr;
mod outcome;
mod rate;
mod sni;

pub use cidr::{Cidr, CidrError};
pub use outcome::{
    CloseReason, ConnectError, Direction, PathKind, RejectReason, errno_of, first_byte_overdue,
    is_fd_exhaustion,
};
pub use rate::{Rate, RateError};
pub use sni::{MAX_NAME_LEN, SniPattern, SniPatternError, is_valid_host_name};
