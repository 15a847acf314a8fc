//! A path with a byte stream on one leg (a TCP or TLS relay connection): nothing is lost, but
//! every retransmission holds up what follows it and then delivers it at once. Told that the
//! path is a stream, the buffer sets its delay to cover those stalls after the first one, so
//! the speech plays on without gaps; late frames are never counted as lost, and the sender is
//! never asked for copies that cannot help.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use koe_voice::impairment::{Impairment, Stalls};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::simulate::{CallSimulation, SimulationResult};
use koe_voice::{Transport, SAMPLE_RATE};

const STALLS: Impairment = Impairment {
    delay: Duration::from_millis(15),
    stalls: Some(Stalls { every: Duration::from_secs(2), hold: Duration::from_millis(140) }),
    ..Impairment::CLEAN
};

fn run(transport: Transport) -> SimulationResult {
    let speech = speechlike(20);
    let result = CallSimulation { impairment: STALLS, transport, seed: 5, ..CallSimulation::default() }.run(&speech).unwrap();
    eprintln!("{transport:?}: {:?}", result.receiver);
    result
}

#[test]
fn a_stream_path_plays_on_through_its_stalls_once_it_has_seen_one() {
    let stream = run(Transport::Stream);
    let datagram = run(Transport::Datagram);
    let (s, d) = (stream.receiver.jitter, datagram.receiver.jitter);
    // Nothing was lost on the way, whatever the buffer thought of the path.
    for stats in [s, d] {
        assert_eq!((stats.concealed, stats.from_copies, stats.from_fec), (0, 0, 0), "{stats:?}");
        assert_eq!(stats.loss_before_recovery, 0.0, "late is not lost: {stats:?}");
    }
    assert_eq!((stream.sender.redundancy, datagram.sender.redundancy), (0, 0), "no copies were asked for");
    // Told it is a stream, the buffer waits out only the first stall (7 frames) and covers
    // the later ones; treating the stalls as datagram jitter waits out most of them.
    assert!(s.underruns <= 8, "{s:?}");
    assert!(d.underruns >= 3 * 7, "{d:?}");
    assert!(s.target_delay >= Duration::from_millis(130) && s.target_delay <= Duration::from_millis(200), "{:?}", s.target_delay);
    assert_eq!(s.late_concealed, 0);
}

#[test]
fn late_frames_are_counted_as_late_and_the_speech_is_all_there() {
    let stream = run(Transport::Stream);
    let speech = speechlike(20);
    // Over the last ten seconds, what was played is the speech, delayed by about one stall.
    let from = 10 * SAMPLE_RATE as usize;
    let (lag, similarity) = best_lag(&speech[from..from + 2 * SAMPLE_RATE as usize], &stream.played[from..], SAMPLE_RATE as usize / 2);
    assert!(similarity > 0.9, "{similarity:.3}");
    let lag = Duration::from_micros(lag as u64 * 1_000_000 / u64::from(SAMPLE_RATE));
    assert!(lag <= Duration::from_millis(230), "mouth-to-ear in the engine: {lag:?}");
}
