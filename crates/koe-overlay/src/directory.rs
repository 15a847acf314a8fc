//! The gateway directory: the well-known key of the global index under which PSTN gateways
//! are listed, so that a client finds every online gateway with an ordinary lookup of
//! [`GATEWAY_DIRECTORY`]. The key is a name, not an address, so nothing new goes into the
//! network file: a profile made before any gateway existed finds them too.
//!
//! A gateway's presence record is kept under its own username, like everyone's, and also
//! under the directory (its parent supernode stores and spreads it under both). Only a record
//! whose certificate says [`Role::Gateway`] is ever kept there: the login server signs the
//! role, so no user can list themselves, and every supernode checks the role itself instead
//! of trusting whoever sent the record. The name is reserved, so no user can sign up with it
//! either.
//!
//! The directory is one key, so the index's bound of
//! [`MAX_DEVICES_PER_USER`](crate::index::MAX_DEVICES_PER_USER) devices per key bounds it to
//! that many gateway devices online at once: plenty for an operator's few gateways, and it
//! keeps a supernode's memory bounded whatever is published.

use koe_types::{Role, Username};

use crate::presence::{PresenceError, PresenceRecord};

/// The username whose index key lists the gateways. Reserved: nobody can sign up with it.
pub const GATEWAY_DIRECTORY: &str = "pstn";

/// [`GATEWAY_DIRECTORY`] as a username, to look it up.
pub fn gateway_directory() -> Username {
    Username::parse_existing(GATEWAY_DIRECTORY)
        .unwrap_or_else(|_| unreachable!("the gateway directory's name is a valid username"))
}

/// Whether `record` may be kept under `key`: under its own username, or under the directory
/// if it is a gateway's. Under the directory, nothing else: not even a user certificate that
/// happens to be named after it.
pub fn check_listing(key: &Username, record: &PresenceRecord) -> Result<(), PresenceError> {
    let role = record.body().certificate.role();
    if key.as_str() == GATEWAY_DIRECTORY {
        return match role {
            Role::Gateway => Ok(()),
            other => Err(PresenceError::NotAGateway(other)),
        };
    }
    if key != record.username() {
        return Err(PresenceError::ForeignKey { user: record.username().clone(), key: key.clone() });
    }
    Ok(())
}

/// Whether a lookup of `key` may return `record` (see [`check_listing`]).
pub fn is_listed_under(key: &Username, record: &PresenceRecord) -> bool {
    check_listing(key, record).is_ok()
}

/// The key `record` is kept under besides its username: the directory for a gateway's,
/// unless the gateway is itself named after the directory.
pub fn also_listed_under(record: &PresenceRecord) -> Option<Username> {
    let gateway = record.body().certificate.role() == Role::Gateway;
    (gateway && record.username().as_str() != GATEWAY_DIRECTORY).then(gateway_directory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::tests::TestNetwork;
    use koe_types::DeviceKey;

    fn name(name: &str) -> Username {
        Username::parse_existing(name).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_directory_is_a_reserved_name() {
        assert_eq!(gateway_directory().as_str(), GATEWAY_DIRECTORY);
        assert!(Username::parse(GATEWAY_DIRECTORY).is_err(), "nobody may sign up as the directory");
    }

    #[test]
    fn a_gateway_is_listed_under_its_name_and_the_directory_and_nowhere_else() {
        let network = TestNetwork::new();
        let gateway = network.record_with_role("gw-eu", &DeviceKey::generate(), 1, Role::Gateway);
        assert!(is_listed_under(&name("gw-eu"), &gateway));
        assert!(is_listed_under(&gateway_directory(), &gateway));
        assert_eq!(also_listed_under(&gateway), Some(gateway_directory()));
        assert!(matches!(check_listing(&name("alice"), &gateway), Err(PresenceError::ForeignKey { .. })));
    }

    #[test]
    fn a_gateway_named_after_the_directory_is_listed_once() {
        let network = TestNetwork::new();
        let gateway = network.record_with_role(GATEWAY_DIRECTORY, &DeviceKey::generate(), 1, Role::Gateway);
        assert!(is_listed_under(&gateway_directory(), &gateway));
        assert_eq!(also_listed_under(&gateway), None);
    }

    #[test]
    fn a_user_is_never_listed_under_the_directory() {
        let network = TestNetwork::new();
        let alice = network.record("alice", &DeviceKey::generate(), 1);
        assert!(is_listed_under(&name("alice"), &alice));
        assert_eq!(also_listed_under(&alice), None);
        let refused = check_listing(&gateway_directory(), &alice);
        assert_eq!(refused, Err(PresenceError::NotAGateway(Role::User)));
        assert_eq!(refused.map_err(|e| e.reason()), Err("not_a_gateway"));
        // A user certificate named after the directory (an operator's mistake) is not a
        // gateway either, not even under its own name.
        let impostor = network.record_with_role(GATEWAY_DIRECTORY, &DeviceKey::generate(), 1, Role::User);
        assert_eq!(check_listing(&gateway_directory(), &impostor), Err(PresenceError::NotAGateway(Role::User)));
    }
}
