//! Turning `--host` and `--port` into socket addresses.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::Error;

/// Resolves `host` (an IPv4 or IPv6 address, bracketed or not, or a name) with `port`.
///
/// Never returns an empty list: no address is an [`Error::Resolve`].
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    // Accept `[::1]` as well as `::1`, since that is how IPv6 hosts are written next to a port.
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let addrs: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .map_err(|source| Error::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Resolve {
            host: host.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses found"),
        });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_resolve_without_lookup() {
        assert_eq!(
            resolve("127.0.0.1", 80).expect("v4"),
            ["127.0.0.1:80".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(
            resolve("[::1]", 80).expect("bracketed v6"),
            ["[::1]:80".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(resolve("::1", 80).expect("v6").len(), 1);
    }

    #[test]
    fn nonsense_is_a_resolve_error() {
        let err = resolve("not a host name", 80).expect_err("must fail");
        assert!(matches!(err, Error::Resolve { .. }), "{err:?}");
        assert_eq!(err.to_string(), "cannot resolve not a host name");
    }
}
