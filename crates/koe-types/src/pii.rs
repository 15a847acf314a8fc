//! A wrapper for values that must never reach a log line: passwords, IP addresses, phone
//! numbers. `Debug` and `Display` print `<redacted>`; code that needs the value calls
//! [`Pii::expose`], which is easy to find in review.

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Pii<T>(T);

impl<T> Pii<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The wrapped value, for the code that really needs it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Pii<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> fmt::Display for Pii<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> From<T> for Pii<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

/// Secrets travel in JSON requests; (de)serialising is transparent so the wrapper costs nothing
/// on the wire and still redacts in logs.
impl<T: serde::Serialize> serde::Serialize for Pii<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Pii<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let password = Pii::new("hunter2-hunter2".to_string());
        assert_eq!(format!("{password}"), "<redacted>");
        assert_eq!(format!("{password:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&password)), "Some(<redacted>)");
        assert_eq!(password.expose(), "hunter2-hunter2");
    }
}
