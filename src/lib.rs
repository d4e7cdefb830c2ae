//! ringfwd: a TCP port forwarder for Linux edge hosts.
//!
//! The crate is a library with a thin binary (`src/main.rs`) on top:
//! - [`config`]: the TOML file and flags, validated into a [`config::Config`];
//! - [`engine`]: the engines that move bytes — io_uring thread-per-core ([`engine::uring`]),
//!   and the `tokio` and `std` baselines that are also the fallback;
//! - [`session`]: the session pipeline every engine shares (admission, upstream choice and
//!   failover, close reasons, the session record), free of I/O;
//! - [`upstream`]: upstream pools, balancing, health checks and DNS discovery;
//! - [`net`]: listeners and socket options shared by the engines;
//! - [`metrics`]: per-core counters and latency histograms, merged when read;
//! - [`privdrop`]: switching from root to the configured `user` / `group` once set up;
//! - [`shutdown`]: the stop signal the engines obey;
//! - [`control`]: config generations — reload, socket takeover for binary upgrades, socket
//!   activation;
//! - [`tools`]: the network tools that ship in the same binary (echo and sink backends,
//!   TCP ping, the load generator).
//!
//! `unsafe` is denied everywhere except the few modules of the io_uring engine that submit
//! SQEs and register memory with the kernel, [`privdrop`], which calls the libc user and
//! credential functions, and `control::fds`, which claims descriptors passed by systemd or
//! received over a unix socket, and `net`'s one `setsockopt` that neither socket2 nor nix
//! offers (`SO_MAX_PACING_RATE`); every block there says why it is sound.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod engine;
pub mod generate;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod privdrop;
pub mod session;
pub mod shutdown;
pub mod thp;
pub mod tools;
pub mod upstream;
pub mod version;
pub mod vocab;
