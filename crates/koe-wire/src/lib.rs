//! Koe's binary wire primitives.
//!
//! This crate owns the [`Codec`] trait every compact binary Koe type implements, the
//! bounds-checked [`Reader`] decoders use, and the matching `put_*` writers. It knows no domain
//! types: certificates, presence records and envelopes implement `Codec` in their own crates.
//! Every length on the wire is bounded before anything is allocated, so a peer's garbage is a
//! [`DecodeError`], never a panic or a large allocation.

use thiserror::Error;

/// A type with one canonical, versioned binary encoding.
///
/// `decode(encode(x)) == x` for every value, and `encode(decode(bytes)) == bytes` for every
/// input that decodes: the encoding is canonical, so signatures over it are unambiguous.
pub trait Codec: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one value from `reader`, leaving any following bytes unread.
    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// The encoding of `self` as a fresh buffer.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a value that must fill `bytes` exactly.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let value = Self::decode(&mut reader)?;
        reader.expect_end()?;
        Ok(value)
    }
}

/// Why bytes could not be decoded. Always the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message truncated: needed {needed} more bytes, {remaining} left")]
    Truncated { needed: usize, remaining: usize },
    #[error("{0} unexpected bytes after the end of the message")]
    TrailingBytes(usize),
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion { what: &'static str, version: u8 },
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("invalid {what}: {reason}")]
    Invalid {
        what: &'static str,
        reason: &'static str,
    },
}

/// A cursor over received bytes that never reads past the end.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    /// The bytes consumed so far, e.g. the signed part of a message before its signature.
    pub fn consumed(&self) -> &'a [u8] {
        &self.bytes[..self.position]
    }

    pub fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated {
                needed: len,
                remaining: self.remaining(),
            });
        }
        let slice = &self.bytes[self.position..self.position + len];
        self.position += len;
        Ok(slice)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A byte string with a one-byte length prefix (at most 255 bytes).
    pub fn short_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u8()? as usize;
        self.take(len)
    }

    /// A UTF-8 string with a one-byte length prefix.
    pub fn short_str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.short_bytes()?).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    /// Fails unless every byte has been read.
    pub fn expect_end(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }
}

pub fn put_u8(out: &mut Vec<u8>, value: u8) {
    out.push(value);
}

pub fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// Writes a byte string with a one-byte length prefix.
///
/// Callers validate lengths when they build their values (usernames, network names), so a
/// longer input is a bug in the caller: it panics rather than writing a corrupt message.
pub fn put_short_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u8::try_from(bytes.len()).unwrap_or_else(|_| {
        panic!("short byte string of {} bytes exceeds 255", bytes.len())
    });
    out.push(len);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut reader = Reader::new(&[0, 1, 2]);
        assert_eq!(
            reader.u32(),
            Err(DecodeError::Truncated {
                needed: 4,
                remaining: 3
            })
        );
        let mut reader = Reader::new(&[200, 1, 2]);
        assert!(matches!(reader.short_bytes(), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn invalid_utf8_is_reported_by_name() {
        let mut reader = Reader::new(&[2, 0xff, 0xfe]);
        assert_eq!(
            reader.short_str("username"),
            Err(DecodeError::InvalidUtf8 { what: "username" })
        );
    }

    proptest! {
        #[test]
        fn integers_and_short_strings_round_trip(a: u8, b: u16, c: u32, d: u64, s in ".{0,60}") {
            prop_assume!(s.len() <= 255);
            let mut out = Vec::new();
            put_u8(&mut out, a);
            put_u16(&mut out, b);
            put_u32(&mut out, c);
            put_u64(&mut out, d);
            put_short_bytes(&mut out, s.as_bytes());
            let mut reader = Reader::new(&out);
            prop_assert_eq!(reader.u8()?, a);
            prop_assert_eq!(reader.u16()?, b);
            prop_assert_eq!(reader.u32()?, c);
            prop_assert_eq!(reader.u64()?, d);
            prop_assert_eq!(reader.short_str("s")?, s.as_str());
            prop_assert!(reader.expect_end().is_ok());
        }
    }
}
