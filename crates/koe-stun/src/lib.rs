//! STUN Binding (RFC 8489, formerly 5389), the part Koe needs for server-reflexive ICE
//! candidates: a client asks a supernode "from which address do you see me?" over UDP, the
//! supernode answers with the XOR-MAPPED-ADDRESS it saw. Behind a NAT that is the NAT's
//! public mapping, which the client offers as a `srflx` candidate.
//!
//! The codec is sans-IO ([`binding_request`], [`answer`], [`parse_binding_response`]); two
//! thin drivers run it on tokio sockets: [`serve`] (supernodes) and [`reflexive_address`]
//! (clients, on the socket their media will use, before the media starts).
//!
//! Supernodes answer on the UDP port with the same number as their TCP listener. Only
//! well-formed Binding requests get an answer, and an answer is at most 24 bytes longer than
//! the request, so the responder is no use for amplifying traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER_LEN: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const MAPPED_ADDRESS: u16 = 0x0001;
/// Datagrams larger than this are not Binding requests Koe answers (RFC 8489 keeps
/// messages within 576-byte IPv4 datagrams when the path MTU is unknown).
pub const MAX_MESSAGE_LEN: usize = 548;
/// How long a client waits for a supernode's answer before going on without a
/// server-reflexive candidate; the request is sent again after a third of it.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(300);

/// A STUN transaction id (96 random bits).
pub type TransactionId = [u8; 12];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message: {0}")]
    NotStun(&'static str),
    #[error("a STUN message of another kind (type {0:#06x})")]
    UnexpectedType(u16),
    #[error("the answer is for another request")]
    WrongTransaction,
    #[error("malformed STUN attribute: {0}")]
    BadAttribute(&'static str),
    #[error("the answer carries no mapped address")]
    NoMappedAddress,
    #[error("no answer from the STUN server within {0:?}")]
    Timeout(Duration),
    #[error("network error: {0}")]
    Io(String),
}

/// A fresh random transaction id.
pub fn new_transaction_id() -> TransactionId {
    let mut id = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    id
}

/// A Binding request without attributes.
pub fn binding_request(id: &TransactionId) -> Vec<u8> {
    header(BINDING_REQUEST, 0, id)
}

fn header(kind: u16, length: u16, id: &TransactionId) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER_LEN + usize::from(length));
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&length.to_be_bytes());
    message.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    message.extend_from_slice(id);
    message
}

/// A checked STUN message: its type, transaction id and attribute bytes.
struct Message<'a> {
    kind: u16,
    id: TransactionId,
    attributes: &'a [u8],
}

fn parse(datagram: &[u8]) -> Result<Message<'_>, StunError> {
    if datagram.len() < HEADER_LEN {
        return Err(StunError::NotStun("shorter than a STUN header"));
    }
    if datagram.len() > MAX_MESSAGE_LEN {
        return Err(StunError::NotStun("too long"));
    }
    let kind = u16::from_be_bytes([datagram[0], datagram[1]]);
    if kind & 0xC000 != 0 {
        return Err(StunError::NotStun("the first two bits are not zero"));
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if length != datagram.len() - HEADER_LEN || length % 4 != 0 {
        return Err(StunError::NotStun("the length field does not match"));
    }
    if datagram[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return Err(StunError::NotStun("no magic cookie"));
    }
    let mut id = [0u8; 12];
    id.copy_from_slice(&datagram[8..20]);
    let message = Message { kind, id, attributes: &datagram[HEADER_LEN..] };
    // Every attribute must fit: type, length, value padded to 4 bytes.
    attributes(message.attributes).try_for_each(|attribute| attribute.map(|_| ()))?;
    Ok(message)
}

/// The attributes of a message as (type, value).
fn attributes(mut rest: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), StunError>> {
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < 4 {
            rest = &[];
            return Some(Err(StunError::BadAttribute("truncated attribute header")));
        }
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let length = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = length.div_ceil(4) * 4;
        if rest.len() < 4 + padded {
            rest = &[];
            return Some(Err(StunError::BadAttribute("attribute longer than the message")));
        }
        let value = &rest[4..4 + length];
        rest = &rest[4 + padded..];
        Some(Ok((kind, value)))
    })
}

/// The supernode's side: the answer to a Binding request that came from `source`, or `None`
/// for anything else (which is dropped without a word).
pub fn answer(datagram: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    let request = parse(datagram).ok()?;
    if request.kind != BINDING_REQUEST {
        return None;
    }
    let value = xor_address(source, &request.id);
    let mut response = header(BINDING_SUCCESS, 4 + value.len() as u16, &request.id);
    response.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    response.extend_from_slice(&(value.len() as u16).to_be_bytes());
    response.extend_from_slice(&value);
    Some(response)
}

/// XOR-MAPPED-ADDRESS's value for `address` (RFC 8489 §14.2).
fn xor_address(address: SocketAddr, id: &TransactionId) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = address.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = vec![0u8];
    match address.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(cookie).map(|(a, b)| a ^ b));
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mask = cookie.iter().chain(id.iter());
            value.extend(ip.octets().iter().zip(mask).map(|(a, b)| a ^ b));
        }
    }
    value
}

/// Reads an (XOR-)MAPPED-ADDRESS value.
fn read_address(value: &[u8], xor: bool, id: &TransactionId) -> Result<SocketAddr, StunError> {
    let bad = || StunError::BadAttribute("mapped address of the wrong length or family");
    let (family, port, address) = match value {
        [_, family, p0, p1, address @ ..] => (*family, u16::from_be_bytes([*p0, *p1]), address),
        _ => return Err(bad()),
    };
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mask: Vec<u8> = if xor { cookie.iter().chain(id.iter()).copied().collect() } else { vec![0; 16] };
    let port = if xor { port ^ (MAGIC_COOKIE >> 16) as u16 } else { port };
    let ip = match (family, address.len()) {
        (0x01, 4) => {
            let octets: Vec<u8> = address.iter().zip(&mask).map(|(a, b)| a ^ b).collect();
            IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
        }
        (0x02, 16) => {
            let mut octets = [0u8; 16];
            for (octet, (a, b)) in octets.iter_mut().zip(address.iter().zip(&mask)) {
                *octet = a ^ b;
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The client's side: the address the server saw in its answer to request `id`.
pub fn parse_binding_response(datagram: &[u8], id: &TransactionId) -> Result<SocketAddr, StunError> {
    let response = parse(datagram)?;
    if response.kind != BINDING_SUCCESS {
        return Err(StunError::UnexpectedType(response.kind));
    }
    if &response.id != id {
        return Err(StunError::WrongTransaction);
    }
    let mut mapped = None;
    for attribute in attributes(response.attributes) {
        match attribute? {
            (XOR_MAPPED_ADDRESS, value) => return read_address(value, true, id),
            (MAPPED_ADDRESS, value) => mapped = Some(read_address(value, false, id)?),
            _ => {}
        }
    }
    mapped.ok_or(StunError::NoMappedAddress)
}

/// Answers Binding requests on `socket` until the task is dropped.
pub async fn serve(socket: UdpSocket) {
    let mut buffer = vec![0u8; MAX_MESSAGE_LEN + 1];
    loop {
        let Ok((length, source)) = socket.recv_from(&mut buffer).await else {
            // ICMP errors for earlier answers surface here on some systems: keep serving.
            continue;
        };
        if let Some(response) = answer(&buffer[..length], source) {
            let _ = socket.send_to(&response, source).await;
        }
    }
}

/// Asks the STUN server at `server` which address it sees `socket` at: one request, again
/// after a third of [`QUERY_TIMEOUT`], then gives up. Datagrams that are not the answer are
/// dropped (nothing else should arrive before the media starts).
pub async fn reflexive_address(socket: &UdpSocket, server: SocketAddr) -> Result<SocketAddr, StunError> {
    let id = new_transaction_id();
    let request = binding_request(&id);
    let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
    let mut buffer = vec![0u8; MAX_MESSAGE_LEN + 1];
    for attempt in 0..2u32 {
        socket.send_to(&request, server).await.map_err(|e| StunError::Io(e.to_string()))?;
        let give_up = if attempt == 0 { tokio::time::Instant::now() + QUERY_TIMEOUT / 3 } else { deadline };
        while let Ok(received) = tokio::time::timeout_at(give_up, socket.recv_from(&mut buffer)).await {
            let Ok((length, from)) = received else { continue };
            if from == server {
                if let Ok(address) = parse_binding_response(&buffer[..length], &id) {
                    return Ok(address);
                }
            }
        }
    }
    Err(StunError::Timeout(QUERY_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_names_the_address_the_request_came_from() {
        for source in ["203.0.113.7:51234", "[2001:db8::1]:3478", "127.0.0.1:1"] {
            let source: SocketAddr = source.parse().unwrap_or_else(|_| unreachable!());
            let id = new_transaction_id();
            let response = answer(&binding_request(&id), source).unwrap_or_default();
            assert!(response.len() <= HEADER_LEN + 24, "no amplification: {} bytes", response.len());
            assert_eq!(parse_binding_response(&response, &id), Ok(source));
        }
    }

    #[test]
    fn anything_but_a_well_formed_binding_request_gets_no_answer() {
        let source: SocketAddr = "192.0.2.1:4000".parse().unwrap_or_else(|_| unreachable!());
        let id = new_transaction_id();
        let good = binding_request(&id);
        let mut no_cookie = good.clone();
        no_cookie[4] ^= 1;
        let mut wrong_length = good.clone();
        wrong_length[3] = 4;
        let mut truncated_attribute = header(BINDING_REQUEST, 4, &id);
        truncated_attribute.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        let response = answer(&good, source).unwrap_or_default();
        let cases: [(&str, &[u8]); 7] = [
            ("empty", &[]),
            ("garbage", b"GET / HTTP/1.1\r\n\r\n and more bytes"),
            ("truncated header", &good[..12]),
            ("no magic cookie", &no_cookie),
            ("length field wrong", &wrong_length),
            ("attribute longer than the message", &truncated_attribute),
            ("a response, not a request", &response),
        ];
        for (what, datagram) in cases {
            assert_eq!(answer(datagram, source), None, "{what}");
        }
        assert_eq!(answer(&vec![0u8; MAX_MESSAGE_LEN + 4], source), None, "oversized");
    }

    #[test]
    fn a_client_accepts_only_the_answer_to_its_own_request() {
        let source: SocketAddr = "198.51.100.2:6000".parse().unwrap_or_else(|_| unreachable!());
        let (mine, other) = (new_transaction_id(), new_transaction_id());
        let response = answer(&binding_request(&other), source).unwrap_or_default();
        assert_eq!(parse_binding_response(&response, &mine), Err(StunError::WrongTransaction));
        assert_eq!(parse_binding_response(&binding_request(&mine), &mine), Err(StunError::UnexpectedType(BINDING_REQUEST)));
        let empty_success = header(BINDING_SUCCESS, 0, &mine);
        assert_eq!(parse_binding_response(&empty_success, &mine), Err(StunError::NoMappedAddress));
        let mut bad_family = header(BINDING_SUCCESS, 12, &mine);
        bad_family.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0, 0x07, 0, 0, 1, 2, 3, 4]);
        assert!(matches!(parse_binding_response(&bad_family, &mine), Err(StunError::BadAttribute(_))));
    }
}
