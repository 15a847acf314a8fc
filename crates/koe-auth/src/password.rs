//! Password rules and hashing: argon2id with OWASP's recommended parameters.
//!
//! Hashing is deliberately slow (tens of milliseconds of one core), so the server runs it on
//! the blocking pool behind a semaphore sized to the machine's cores: a burst of logins queues
//! instead of starving everything else.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use koe_types::Pii;
use thiserror::Error;

/// OWASP Password Storage Cheat Sheet (2023+): argon2id, 19 MiB, 2 iterations, 1 lane.
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
pub const ARGON2_ITERATIONS: u32 = 2;
pub const ARGON2_LANES: u32 = 1;

pub const PASSWORD_MIN_CHARS: usize = 8;
/// Long enough for any passphrase, short enough that hashing it is not an attack.
pub const PASSWORD_MAX_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PasswordError {
    #[error("password must be at least {PASSWORD_MIN_CHARS} characters long")]
    TooShort,
    #[error("password must be at most {PASSWORD_MAX_BYTES} bytes long")]
    TooLong,
}

/// The rules [`check_new_password`] applies, in a sentence for someone choosing a password.
pub fn password_rules() -> String {
    format!("A password needs at least {PASSWORD_MIN_CHARS} characters (and at most {PASSWORD_MAX_BYTES} bytes).")
}

/// Checks a new password against the length rules.
pub fn check_new_password(password: &Pii<String>) -> Result<(), PasswordError> {
    let password = password.expose();
    if password.len() > PASSWORD_MAX_BYTES {
        return Err(PasswordError::TooLong);
    }
    if password.chars().count() < PASSWORD_MIN_CHARS {
        return Err(PasswordError::TooShort);
    }
    Ok(())
}

fn argon2id() -> Argon2<'static> {
    let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES, None)
        .unwrap_or_else(|e| unreachable!("OWASP argon2 parameters are valid: {e}"));
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) for storage.
pub fn hash_password(password: &Pii<String>) -> String {
    let salt = SaltString::generate(&mut rand_core::OsRng);
    argon2id()
        .hash_password(password.expose().as_bytes(), &salt)
        .unwrap_or_else(|e| unreachable!("hashing with a fresh salt cannot fail: {e}"))
        .to_string()
}

/// Whether `password` matches the stored PHC string. A stored hash that does not parse never
/// matches (and is logged by the caller as corruption).
pub fn verify_password(password: &Pii<String>, stored_hash: &str) -> Result<bool, String> {
    let parsed = PasswordHash::new(stored_hash).map_err(|e| e.to_string())?;
    Ok(Argon2::default()
        .verify_password(password.expose().as_bytes(), &parsed)
        .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_the_right_password() {
        let hash = hash_password(&Pii::new("correct horse".into()));
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert_eq!(verify_password(&Pii::new("correct horse".into()), &hash), Ok(true));
        assert_eq!(verify_password(&Pii::new("correct horsE".into()), &hash), Ok(false));
        assert!(verify_password(&Pii::new("x".into()), "not a hash").is_err());
    }

    #[test]
    fn password_length_rules() {
        assert_eq!(check_new_password(&Pii::new(String::new())), Err(PasswordError::TooShort));
        assert_eq!(check_new_password(&Pii::new("1234567".into())), Err(PasswordError::TooShort));
        assert_eq!(check_new_password(&Pii::new("12345678".into())), Ok(()));
        assert_eq!(
            check_new_password(&Pii::new("x".repeat(PASSWORD_MAX_BYTES + 1))),
            Err(PasswordError::TooLong)
        );
    }
}
