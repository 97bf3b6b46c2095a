//! Turning `--host` and `--port` into socket addresses.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::Error;

/// The addresses a host resolved to: never none.
#[derive(Clone, Debug)]
pub(crate) struct Addrs {
    first: SocketAddr,
    rest: Vec<SocketAddr>,
}

impl Addrs {
    /// Every address, in the order the resolver gave them.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.first).chain(self.rest.iter().copied())
    }

    /// Tries `attempt` on each address in turn: the first success, or the last failure.
    pub(crate) fn try_each<T>(
        &self,
        mut attempt: impl FnMut(SocketAddr) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut result = attempt(self.first);
        for &addr in &self.rest {
            if result.is_ok() {
                break;
            }
            result = attempt(addr);
        }
        result
    }

    /// Connects to the first address that answers, each attempt waiting at most `timeout`
    /// (`Duration::ZERO`: as long as the operating system does). Returns the stream and the
    /// address it is connected to.
    pub(crate) fn connect(&self, timeout: Duration) -> Result<(TcpStream, SocketAddr), Error> {
        self.try_each(|addr| {
            let attempt = if timeout.is_zero() {
                TcpStream::connect(addr)
            } else {
                TcpStream::connect_timeout(&addr, timeout)
            };
            let stream = attempt.map_err(|source| match source.kind() {
                // Ours, not the operating system's (with no timeout of ours, its reason says).
                io::ErrorKind::TimedOut if !timeout.is_zero() => {
                    Error::ConnectTimeout { addr, timeout }
                }
                _ => Error::Connect { addr, source },
            })?;
            crate::send::reset_unless_finished(&stream);
            Ok((stream, addr))
        })
    }
}

/// Resolves `host` (an IPv4 or IPv6 address, bracketed or not, or a name) with `port`.
///
/// No address is an [`Error::Resolve`].
pub(crate) fn resolve(host: &str, port: u16) -> Result<Addrs, Error> {
    // Accept `[::1]` as well as `::1`, since that is how IPv6 hosts are written next to a port.
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let failed = |source| Error::Resolve {
        host: host.to_string(),
        source,
    };
    let mut addrs = (bare, port).to_socket_addrs().map_err(failed)?;
    match addrs.next() {
        Some(first) => Ok(Addrs {
            first,
            rest: addrs.collect(),
        }),
        None => Err(failed(io::Error::new(
            io::ErrorKind::NotFound,
            "no addresses found",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_resolve_without_lookup() {
        let all = |host| -> Vec<SocketAddr> { resolve(host, 80).expect(host).iter().collect() };
        assert_eq!(
            all("127.0.0.1"),
            ["127.0.0.1:80".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(
            all("[::1]"),
            ["[::1]:80".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(all("::1").len(), 1);
    }

    #[test]
    fn nonsense_is_a_resolve_error() {
        let err = resolve("not a host name", 80).expect_err("must fail");
        assert!(matches!(err, Error::Resolve { .. }), "{err:?}");
        assert_eq!(err.to_string(), "cannot resolve not a host name");
    }
}
