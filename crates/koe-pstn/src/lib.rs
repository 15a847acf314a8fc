//! Koe's PSTN gateway: calls between Koe and the telephone network (SkypeOut), billed per
//! minute from prepaid credit.
//!
//! Sans-IO cores, each with its own tests in virtual time:
//! - [`number`]: what a user dials, made an E.164 number or refused (emergency and short
//!   numbers never reach a trunk);
//! - [`money`] and [`rates`]: exact amounts, the rate table and what a call costs;
//! - [`meter`]: the billing of one call: holds in chunks, the warning, the cut-off, the
//!   settlement;
//! - [`g711`] and [`dtmf`]: the telephone network's codec and its RFC 4733 key presses.
//!
//! [`ledger`] keeps the money: a double-entry prepaid ledger with a SQLite and a PostgreSQL
//! store behind one trait; [`billing`] carries a meter's requests out on it.

pub mod billing;
pub mod dtmf;
pub mod g711;
pub mod ledger;
pub mod meter;
pub mod money;
pub mod number;
pub mod rates;
