//! The overlay client's TCP transport when an HTTP proxy is configured (`koe --proxy`,
//! `HTTPS_PROXY`): each dial goes through the proxy with `CONNECT host:port` (or directly, for
//! hosts `NO_PROXY` names), then Noise and Yamux run over the tunnel as over plain TCP. It
//! never listens — a client behind a proxy cannot be reached from outside — and it never falls
//! back to direct TCP when the proxy refuses: the dial fails with the proxy's reason.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::Transport;

use libp2p::Multiaddr;

/// Dials TCP through the process's HTTP proxy (see `koe_proxy`).
#[derive(Debug, Default)]
pub struct ProxiedTcp;

/// `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT[/p2p/…]` → (host, port); anything else is refused.
fn host_and_port(address: &Multiaddr) -> Option<(String, u16)> {
    let mut parts = address.iter();
    let host = match parts.next()? {
        Protocol::Ip4(ip) => ip.to_string(),
        Protocol::Ip6(ip) => ip.to_string(),
        Protocol::Dns(name) | Protocol::Dns4(name) | Protocol::Dns6(name) => name.to_string(),
        _ => return None,
    };
    let Protocol::Tcp(port) = parts.next()? else { return None };
    match parts.next() {
        None | Some(Protocol::P2p(_)) if parts.next().is_none() => Some((host, port)),
        _ => None,
    }
}

impl Transport for ProxiedTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = std::io::Error;
    type ListenerUpgrade = futures::future::Pending<Result<Self::Output, Self::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn listen_on(&mut self, _id: ListenerId, address: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        Err(TransportError::MultiaddrNotSupported(address))
    }

    fn remove_listener(&mut self, _id: ListenerId) -> bool {
        false
    }

    fn dial(&mut self, address: Multiaddr, _opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some((host, port)) = host_and_port(&address) else {
            return Err(TransportError::MultiaddrNotSupported(address));
        };
        Ok(Box::pin(async move {
            let stream = koe_proxy::connect(&host, port).await.map_err(std::io::Error::other)?;
            let _ = stream.set_nodelay(true);
            Ok(libp2p::tcp::tokio::TcpStream(stream))
        }))
    }

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_addresses_are_dialled() {
        let parse = |text: &str| text.parse::<Multiaddr>().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(host_and_port(&parse("/ip4/10.0.0.1/tcp/4100")), Some(("10.0.0.1".into(), 4100)));
        assert_eq!(host_and_port(&parse("/dns4/sn.example.org/tcp/4100")), Some(("sn.example.org".into(), 4100)));
        assert_eq!(
            host_and_port(&parse("/ip6/::1/tcp/7/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN")),
            Some(("::1".into(), 7))
        );
        assert_eq!(host_and_port(&parse("/ip4/10.0.0.1/udp/4100/quic-v1")), None);
        assert_eq!(host_and_port(&parse("/ip4/10.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit")), None);
    }
}
