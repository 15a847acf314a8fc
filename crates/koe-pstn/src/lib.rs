//! Koe's PSTN gateway: calls between Koe and the telephone network (SkypeOut), billed per
//! minute from prepaid credit.
//!
//! Sans-IO cores, each with its own tests in virtual time:
//! - [`number`]: what a user dials, made an E.164 number or refused (emergency and short
//!   numbers never reach a trunk);
//! - [`money`] and [`rates`]: exact amounts, the rate table and what a call costs;
//! - [`meter`]: the billing of one call: holds in chunks, the warning, the cut-off, the
//!   settlement;
//! - [`bridge`]: one call's back-to-back user agent: a Koe call, a SIP dialog and the meter;
//! - [`g711`], [`resample`], [`dtmf`], [`sdp`] and [`rtp`]: the telephone network's codec,
//!   8 ↔ 48 kHz, RFC 4733 key presses, offer/answer and the RTP header.
//!
//! [`ledger`] keeps the money: a double-entry prepaid ledger with a SQLite and a PostgreSQL
//! store behind one trait; [`billing`] carries a meter's requests out on it. The drivers:
//! [`trunk`] (SIP on rsipstack), [`media`] (RTP to the carrier) and [`skypeout`] (one call).
//!
//! [`phone`] is the far end for tests and `koe demo`: a SIP phone that answers, echoes and
//! hears key presses, so a whole SkypeOut call runs with nothing beyond cargo.

pub mod billing;
pub mod bridge;
pub mod dtmf;
pub mod g711;
pub mod ledger;
pub mod media;
pub mod meter;
pub mod money;
pub mod number;
pub mod phone;
pub mod rates;
pub mod resample;
pub mod rtp;
pub mod sdp;
pub mod service;
pub mod skypeout;
pub mod trunk;
