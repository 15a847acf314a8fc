//! The set-up of a call's media in virtual time (`koe_media::virtual_call`): on a clean path
//! each DTLS flight goes out once and media connects within a few round trips, however long
//! after the sessions were made the call is answered. A flight sent twice at once made the
//! other side answer the copy and then ignore the real retransmission as a duplicate: media
//! started a second late on a clean TCP relay path.

use std::time::Duration;

use koe_media::virtual_call::set_up;
use koe_voice::impairment::Impairment;

#[test]
fn each_dtls_flight_goes_out_once_on_a_clean_path_answered_late() {
    // 80 ms round trips: under the first resend (150 ms, less 25 % jitter).
    let path = Impairment { delay: Duration::from_millis(40), ..Impairment::CLEAN };
    for answered_after in [Duration::ZERO, Duration::from_millis(800), Duration::from_secs(5)] {
        let (caller, callee) = set_up(path, 1, answered_after, Duration::from_secs(2)).unwrap_or_else(|e| panic!("{e}"));
        // ICE (a round trip), then DTLS (two): all well within half a second.
        for side in [&caller, &callee] {
            let connected = side.connected_after.unwrap_or_else(|| panic!("answered after {answered_after:?}: media did not connect: {:?}", side.failure));
            assert!(connected < Duration::from_millis(500), "answered after {answered_after:?}: connected after {connected:?}");
        }
        // The client's hello and its key flight; the server's hello flight and its last one.
        assert_eq!((caller.dtls_sent, callee.dtls_sent), (2, 2), "answered after {answered_after:?}: DTLS datagrams sent");
    }
}
