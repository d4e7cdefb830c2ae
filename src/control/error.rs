//! Why the control plane could not do what it was asked: a reload, a generation's start.
//!
//! A reload's result goes to everyone who waited for it (the admin endpoint, the log), so
//! these errors are `Clone`: sources that are not are shared behind an `Arc`.

use std::io;
use std::sync::Arc;

use crate::config::ConfigError;
use crate::engine::EngineError;
use crate::metrics::TapError;
use crate::net::ListenError;

/// Why a reload did not happen; the previous configuration serves on.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReloadError {
    /// The first generation is not serving yet.
    #[error("still starting; try again once it serves")]
    Starting,
    /// A stop or a takeover is under way.
    #[error("the process is stopping")]
    Stopping,
    /// The run was configured by flags alone.
    #[error("this run has no --config file to reload")]
    NoConfigFile,
    /// No generation serves (it failed or was handed over).
    #[error("not serving")]
    NotServing,
    /// The file does not give a configuration that can run.
    #[error(transparent)]
    Config(Arc<ConfigError>),
    /// The thread that reads the file could not start.
    #[error("cannot start the config loader thread: {0}")]
    LoaderThread(#[source] Arc<io::Error>),
    /// The new configuration needs more descriptors than the process may open.
    #[error(transparent)]
    Fds(Arc<EngineError>),
    /// A new listen address cannot be bound.
    #[error("rule {rule:?}: {source}")]
    Bind {
        rule: String,
        #[source]
        source: Arc<ListenError>,
    },
    /// A new tap file cannot be opened.
    #[error(transparent)]
    Tap(Arc<TapError>),
    /// The new generation's engine did not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Why a generation's engine did not start.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StartError {
    /// No descriptors left to duplicate the listeners for the engine.
    #[error("cannot duplicate the listeners: {0}")]
    Duplicate(#[source] Arc<io::Error>),
    /// The engine's thread could not be created.
    #[error("cannot start an engine thread: {0}")]
    Spawn(#[source] Arc<io::Error>),
    /// The engine failed while starting, in its own words (reported across its thread).
    #[error("{0}")]
    Engine(String),
    /// The engine's thread ended without saying whether it started.
    #[error("the engine stopped while starting")]
    Stopped,
}
