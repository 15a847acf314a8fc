//! Usernames and network names, with the rules that make them safe to show, compare and key on.
//!
//! Both are case-folded ASCII: `Alice` and `alice` are the same user. Non-ASCII is refused
//! rather than folded, so look-alike characters cannot impersonate a name.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Names nobody may sign up with: service identities and names users would trust blindly.
pub const RESERVED_USERNAMES: &[&str] = &[
    "echo123",
    "admin",
    "administrator",
    "root",
    "system",
    "support",
    "help",
    "info",
    "koe",
    "operator",
    "security",
    "abuse",
    "postmaster",
    "noreply",
    "gateway",
    "pstn",
];

pub const USERNAME_MIN_CHARS: usize = 3;
pub const USERNAME_MAX_CHARS: usize = 32;
pub const NETWORK_NAME_MAX_CHARS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("{what} must be at least {min} characters long")]
    TooShort { what: &'static str, min: usize },
    #[error("{what} must be at most {max} characters long")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} must start with a letter a-z")]
    MustStartWithLetter { what: &'static str },
    #[error("{what} may only contain {allowed}; found {found:?}")]
    InvalidCharacter {
        what: &'static str,
        allowed: &'static str,
        found: char,
    },
    #[error("the username {0:?} is reserved")]
    Reserved(String),
}

/// A valid, case-folded username: 3–32 characters of `[a-z0-9._-]`, starting with a letter,
/// not reserved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(String);

impl Username {
    /// Parses a name someone wants to sign up with: the character rules, then the reserved list.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let username = Self::parse_existing(input)?;
        if RESERVED_USERNAMES.contains(&username.as_str()) {
            return Err(NameError::Reserved(username.0));
        }
        Ok(username)
    }

    /// Parses a name that already exists, e.g. in a certificate: the character rules only.
    /// Reserved names pass here because the operator may issue them to service identities
    /// (the echo test service) by other means than sign-up.
    pub fn parse_existing(input: &str) -> Result<Self, NameError> {
        check_name(
            input,
            "username",
            USERNAME_MIN_CHARS,
            USERNAME_MAX_CHARS,
            "a-z, 0-9, '.', '_' and '-'",
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'),
        )
        .map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A network's name: 1–64 characters of `[a-z0-9.-]`, starting with a letter. Certificates
/// carry it so a certificate from one network is worthless in another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkName(String);

impl NetworkName {
    pub fn parse(input: &str) -> Result<Self, NameError> {
        check_name(
            input,
            "network name",
            1,
            NETWORK_NAME_MAX_CHARS,
            "a-z, 0-9, '.' and '-'",
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'),
        )
        .map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_name(
    input: &str,
    what: &'static str,
    min: usize,
    max: usize,
    allowed: &'static str,
    is_allowed: impl Fn(char) -> bool,
) -> Result<String, NameError> {
    let folded = input.to_ascii_lowercase();
    let chars = folded.chars().count();
    if chars < min {
        return Err(NameError::TooShort { what, min });
    }
    if chars > max {
        return Err(NameError::TooLong { what, max });
    }
    if let Some(found) = folded.chars().find(|&c| !is_allowed(c)) {
        return Err(NameError::InvalidCharacter {
            what,
            allowed,
            found,
        });
    }
    if !folded.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(NameError::MustStartWithLetter { what });
    }
    Ok(folded)
}

macro_rules! string_name_impls {
    ($ty:ty) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_name_impls!(Username);
string_name_impls!(NetworkName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_case_folded() {
        assert_eq!(Username::parse("Alice").map(|u| u.0), Ok("alice".into()));
        assert_eq!(Username::parse("b.o_b-9").map(|u| u.0), Ok("b.o_b-9".into()));
    }

    #[test]
    fn username_rules_are_enforced_with_clear_reasons() {
        assert!(matches!(Username::parse("al"), Err(NameError::TooShort { min: 3, .. })));
        assert!(matches!(
            Username::parse(&"a".repeat(33)),
            Err(NameError::TooLong { max: 32, .. })
        ));
        assert!(Username::parse(&"a".repeat(32)).is_ok());
        assert!(matches!(
            Username::parse("9lives"),
            Err(NameError::MustStartWithLetter { .. })
        ));
        assert!(matches!(
            Username::parse("_alice"),
            Err(NameError::MustStartWithLetter { .. })
        ));
        assert!(matches!(
            Username::parse("al ice"),
            Err(NameError::InvalidCharacter { found: ' ', .. })
        ));
        assert!(matches!(
            Username::parse("alicé"),
            Err(NameError::InvalidCharacter { found: 'é', .. })
        ));
        assert!(matches!(
            Username::parse("al\u{0}ce"),
            Err(NameError::InvalidCharacter { .. })
        ));
    }

    #[test]
    fn reserved_names_are_refused_in_any_case() {
        for name in ["echo123", "ADMIN", "Root", "koe"] {
            assert!(
                matches!(Username::parse(name), Err(NameError::Reserved(_))),
                "{name} should be reserved"
            );
        }
    }

    #[test]
    fn network_names_refuse_underscores() {
        assert!(NetworkName::parse("koe-test.example").is_ok());
        assert!(NetworkName::parse("koe_test").is_err());
        assert!(NetworkName::parse("").is_err());
    }
}
