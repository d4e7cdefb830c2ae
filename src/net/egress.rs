//! How a pool's upstream connections leave the host, and how a rule's listeners take MPTCP.
//!
//! [`Egress`] is the upstream side of a rule or route: the address its connections come
//! from (`source`, or the client's own with `transparent`), the firewall mark they carry
//! (`mark`), the device they are bound to (`interface`) and whether they speak MPTCP
//! (`upstream_mptcp`). [`open`] makes one upstream socket with all of it applied, the same
//! way for every engine. [`probe`] applies the same options to a throwaway socket at start-up
//! and on reload, so a missing capability, an unknown device, an address the host does not
//! own or a kernel with MPTCP disabled is one clear line naming the key, not a stream of
//! failed connections.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, ConfigError, Egress, Rule};

/// Why an upstream socket could not get its options, naming the key that asked for them.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("interface = {name:?}: no such network device on this host")]
    NoDevice { name: String },
    #[error("interface = {name:?}: SO_BINDTODEVICE refused: {source}")]
    Device { name: String, source: io::Error },
    #[error("mark = {mark}: SO_MARK refused ({source}); setting a mark needs CAP_NET_ADMIN")]
    Mark { mark: u32, source: io::Error },
    #[error(
        "transparent = true: IP_TRANSPARENT refused ({source}); connecting from the client's address needs CAP_NET_ADMIN"
    )]
    Transparent { source: io::Error },
    #[error("source = \"{ip}\": cannot bind to it ({source}); is it an address of this host?")]
    Source { ip: IpAddr, source: io::Error },
    #[error(
        "{key} = true: this kernel refuses MPTCP sockets ({source}); enable it with `sysctl net.mptcp.enabled=1` (a kernel built with CONFIG_MPTCP), or remove {key}"
    )]
    Mptcp {
        key: &'static str,
        source: io::Error,
    },
    #[error("{0}")]
    Socket(#[source] io::Error),
}

impl EgressError {
    /// The errno behind the failure, for the session's connect-failure accounting.
    pub fn errno(&self) -> i32 {
        let e = match self {
            Self::NoDevice { .. } => return libc::ENODEV,
            Self::Device { source, .. }
            | Self::Mark { source, .. }
            | Self::Transparent { source }
            | Self::Source { source, .. }
            | Self::Mptcp { source, .. }
            | Self::Socket(source) => source,
        };
        e.raw_os_error().unwrap_or(libc::EIO)
    }
}

impl From<EgressError> for io::Error {
    fn from(e: EgressError) -> Self {
        match e {
            EgressError::Socket(e) => e,
            other => io::Error::from_raw_os_error(other.errno()),
        }
    }
}

/// True for the errors `socket(2)` gives for `IPPROTO_MPTCP` on a kernel without it
/// (not built in, or `net.mptcp.enabled = 0`).
fn is_no_mptcp(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOPROTOOPT | libc::EPROTONOSUPPORT | libc::EINVAL)
    )
}

/// A fresh stream socket for `domain`, MPTCP when `mptcp` (`key` names the config key, for
/// the error).
///
/// # Errors
/// [`EgressError::Mptcp`] when the kernel refuses MPTCP; [`EgressError::Socket`] otherwise.
pub fn stream_socket(
    domain: Domain,
    mptcp: bool,
    key: &'static str,
) -> Result<Socket, EgressError> {
    let protocol = if mptcp {
        Protocol::MPTCP
    } else {
        Protocol::TCP
    };
    Socket::new(domain, Type::STREAM.cloexec(), Some(protocol)).map_err(|source| {
        if mptcp && is_no_mptcp(&source) {
            EgressError::Mptcp { key, source }
        } else {
            EgressError::Socket(source)
        }
    })
}

/// Opens a socket to connect to `to`, with `egress` applied: bound to the client's address
/// (`transparent`, where `client` is known and of `to`'s family) or to `source`, with
/// `IP_BIND_ADDRESS_NO_PORT` so that the port is chosen at connect time, per destination,
/// rather than reserved host-wide at bind time.
///
/// A kernel that stopped taking MPTCP since start-up gets a plain TCP socket (logged at
/// debug): the connection still works, as it does against a server without MPTCP.
///
/// # Errors
/// `socket(2)` failed (typically EMFILE), or an option was refused.
pub fn open(
    to: SocketAddr,
    egress: &Egress,
    client: Option<SocketAddr>,
) -> Result<Socket, EgressError> {
    let domain = Domain::for_address(to);
    let socket = match stream_socket(domain, egress.mptcp, "upstream_mptcp") {
        Err(EgressError::Mptcp { source, .. }) => {
            tracing::debug!(error = %source, "MPTCP refused; connecting with plain TCP");
            stream_socket(domain, false, "upstream_mptcp")?
        }
        other => other?,
    };
    let from = if egress.transparent {
        // Only a client of the upstream's family can be impersonated; any other connects
        // from the host's own address, as a rule without `transparent` would.
        client
            .map(|c| c.ip())
            .filter(|ip| ip.is_ipv4() == to.is_ipv4())
    } else {
        egress.source
    };
    apply(&socket, egress, to.is_ipv6(), from)?;
    Ok(socket)
}

/// Sets `egress`'s options on `socket` and binds it to `from` (port 0), if given.
fn apply(
    socket: &Socket,
    egress: &Egress,
    v6: bool,
    from: Option<IpAddr>,
) -> Result<(), EgressError> {
    if let Some(mark) = egress.mark {
        socket
            .set_mark(mark)
            .map_err(|source| EgressError::Mark { mark, source })?;
    }
    if let Some(name) = &egress.interface {
        socket
            .bind_device(Some(name.as_bytes()))
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::ENODEV) {
                    EgressError::NoDevice { name: name.clone() }
                } else {
                    EgressError::Device {
                        name: name.clone(),
                        source,
                    }
                }
            })?;
    }
    if egress.transparent {
        let set = if v6 {
            socket.set_ip_transparent_v6(true)
        } else {
            socket.set_ip_transparent_v4(true)
        };
        set.map_err(|source| EgressError::Transparent { source })?;
    }
    if let Some(ip) = from {
        let bind_err = |source| {
            if egress.transparent {
                EgressError::Transparent { source }
            } else {
                EgressError::Source { ip, source }
            }
        };
        // Without it, every bound socket would hold a port of its own for its lifetime, and
        // a busy pool would run out of ports long before the 4-tuples run out.
        nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(|e| bind_err(io::Error::from(e)))?;
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .map_err(bind_err)?;
    }
    Ok(())
}

/// Applies `egress` to throwaway sockets of each family the pool connects to, as [`open`]
/// would, so what the kernel or the process's privileges refuse is found at start-up (and
/// on reload) with its key named. `transparent` is probed with a documentation address
/// (`192.0.2.1` / `2001:db8::1`): the bind succeeds only where `IP_TRANSPARENT` took.
///
/// # Errors
/// The first option refused.
pub fn probe(egress: &Egress, families: impl IntoIterator<Item = bool>) -> Result<(), EgressError> {
    for v6 in families {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let socket = stream_socket(domain, egress.mptcp, "upstream_mptcp")?;
        let from = if egress.transparent {
            Some(if v6 {
                IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])
            } else {
                IpAddr::from([192, 0, 2, 1])
            })
        } else {
            egress.source.filter(|ip| ip.is_ipv6() == v6)
        };
        apply(&socket, egress, v6, from)?;
    }
    Ok(())
}

/// Whether this kernel takes MPTCP sockets now (`listen` side: `mptcp = true`).
///
/// # Errors
/// [`EgressError::Mptcp`] naming `mptcp`.
pub fn probe_listen_mptcp() -> Result<(), EgressError> {
    stream_socket(Domain::IPV4, true, "mptcp").map(drop)
}

/// The checks that need the host, written here rather than in `config` so that the config
/// model stays free of the layers above it.
impl Config {
    /// Checks what a runnable configuration needs beyond a well-formed file.
    ///
    /// # Errors
    /// No rule at all, or the host refuses a socket option a rule asks for
    /// ([`Config::probe_host`]).
    pub fn ensure_runnable(&self) -> Result<(), ConfigError> {
        if self.rules.is_empty() {
            return Err(ConfigError::NoRule);
        }
        self.probe_host()
    }

    /// Tries the sockets the rules ask for on this host, as it is now: MPTCP listeners, and
    /// each pool's upstream-side options on a throwaway socket of each address family its
    /// members use (see [`probe`]). What the kernel or the process's
    /// privileges refuse — an unknown device, a mark or `transparent` without
    /// `CAP_NET_ADMIN`, a `source` the host does not own, MPTCP disabled — is one line naming
    /// the rule and the key, at start-up, in `check`, and for a reload (which is then refused
    /// while the running config keeps serving).
    ///
    /// # Errors
    /// The first refusal.
    pub fn probe_host(&self) -> Result<(), ConfigError> {
        let fail = |rule: &Rule, route: Option<&str>, e: EgressError| {
            let at = match route {
                Some(r) if !rule.routes.is_empty() => format!("rule {:?}, route {r:?}", rule.name),
                _ => format!("rule {:?}", rule.name),
            };
            ConfigError::Host {
                at,
                source: Box::new(e),
            }
        };
        for rule in &self.rules {
            if rule.mptcp {
                probe_listen_mptcp().map_err(|e| fail(rule, None, e))?;
            }
            for (route, up) in rule.pools() {
                if up.egress == Egress::PLAIN {
                    continue;
                }
                let mut families: Vec<bool> = up.addrs().map(|a| a.is_ipv6()).collect();
                families.sort_unstable();
                families.dedup();
                if families.is_empty() {
                    // Members that do not resolve yet: probe the family `source` names, or v4.
                    families.push(up.egress.source.is_some_and(|ip| ip.is_ipv6()));
                }
                probe(&up.egress, families).map_err(|e| fail(rule, Some(route), e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_device_is_named_with_its_key() {
        let egress = Egress {
            interface: Some("rfnope0".into()),
            ..Egress::default()
        };
        let e = probe(&egress, [false]).unwrap_err();
        assert_eq!(e.errno(), libc::ENODEV);
        assert_eq!(
            e.to_string(),
            "interface = \"rfnope0\": no such network device on this host"
        );
    }

    #[test]
    fn a_source_the_host_does_not_own_is_refused_with_its_key() {
        let egress = Egress {
            source: Some("192.0.2.77".parse().unwrap()),
            ..Egress::default()
        };
        let e = probe(&egress, [false]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("source = \"192.0.2.77\": cannot bind"),
            "{e}"
        );
        // A source of the other family is left to the other family's sockets.
        assert!(probe(&egress, [true]).is_ok());
    }

    #[test]
    fn a_source_socket_connects_from_that_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let egress = Egress {
            source: Some("127.0.0.2".parse().unwrap()),
            ..Egress::default()
        };
        let to = listener.local_addr().unwrap();
        let s = open(to, &egress, None).unwrap();
        // Bound with IP_BIND_ADDRESS_NO_PORT: no port is taken until the connect.
        assert_eq!(
            s.local_addr().unwrap().as_socket().unwrap().port(),
            0,
            "a port was reserved at bind time"
        );
        s.connect(&to.into()).unwrap();
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), egress.source.unwrap());
    }
}
