//! Upstream pools: the members a rule forwards to, their health, and how one is chosen.
//!
//! - [`member`]: one address with its health (passive ejection, active-check verdict) and
//!   counters, all atomics shared by every worker;
//! - [`pool`]: a rule's pool settings and its current [`pool::MemberSet`], swapped whole when
//!   DNS changes the members;
//! - [`balance`]: the per-worker [`balance::Picker`] (round-robin, least-conn, source hash,
//!   power of two choices) over health tiers;
//! - [`control`]: the thread that runs active health checks and DNS re-resolution;
//! - [`admin`]: the member API's commands (drain, down, up, weight) on a config's pools.
//!
//! Nothing here touches a relayed socket: the session core ([`crate::session`]) asks for a
//! member and reports what became of the connect, and every engine moves bytes the same way
//! whichever member it was.

pub mod admin;
pub mod balance;
pub mod control;
pub mod member;
pub mod pool;

pub use balance::{Picker, Tried};
pub use member::{Member, MemberSnapshot};
pub use pool::{MemberSet, Pool};
