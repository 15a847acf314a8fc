//! What waits to be written to one TURN byte stream (TCP or TLS), on the relay node towards a
//! client and on the client towards a relay node: a bounded queue that, when the path falls
//! behind, drops the oldest media first and keeps control messages.
//!
//! Voice is worth nothing late: a frame that reaches the far end after its playout time is
//! thrown away there, and every frame queued ahead of a fresh one delays it. So the backlog of
//! a slow stream is kept here, in user space, where the oldest media can be dropped, and not in
//! the kernel, which can only send it late ([`limit_kernel_send_buffering`]).
//!
//! Media is ChannelData and Data/Send indications; anything else (Allocate, Refresh,
//! CreatePermission, ChannelBind and their responses, Binding) is control, whose loss would
//! cost a retransmission timeout or the allocation, so the media around it goes first.
//!
//! [`SendQueue`] is the sans-IO queue; [`channel`] shares one between the task that produces
//! frames and the task that writes them.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Media frames queued at most: 240 ms of voice at 50 frames/s. The receiver's jitter buffer
/// waits at most 400 ms (koe-voice `JitterConfig::max_delay`) and a TCP path's own
/// retransmissions take a good part of that; voice queued longer than this would mostly arrive
/// too late to be played, and would make the fresh voice behind it late too.
pub const MAX_QUEUED_MEDIA_FRAMES: usize = 12;
/// Frames queued at most, control included (a client that sends requests and never reads the
/// answers cannot make the relay hold more).
pub const MAX_QUEUED_FRAMES: usize = 64;
/// Bytes queued at most, whatever the frames' sizes: twelve frames of a full-MTU datagram
/// (a DTLS handshake flight) fit, a 64 KiB TURN frame does not.
pub const MAX_QUEUED_BYTES: usize = 16 * 1024;

/// SO_SNDBUF asked for on a TURN stream's socket. Linux doubles it (for its own bookkeeping),
/// so the kernel holds at most 16 KiB, in flight and unsent together: room for 80 KB/s in flight
/// at a 200 ms round trip (a voice call with redundancy is ~12 KB/s), yet on a stalled path
/// never more than ~2 s of voice, even where TCP_NOTSENT_LOWAT is not set. The default
/// autotunes up to 4 MiB (net.ipv4.tcp_wmem): minutes of voice.
pub const STREAM_SEND_BUFFER_BYTES: usize = 8 * 1024;
/// TCP_NOTSENT_LOWAT on Linux: the kernel takes more only while less than this is still unsent
/// (~5 voice frames, 100 ms, plus the segment being filled), so on a slow path the backlog
/// waits here, where the oldest can be dropped, and what the kernel holds is mostly in flight.
pub const STREAM_NOTSENT_LOWAT_BYTES: u32 = 1024;
/// The least retransmission timeout of a TURN stream (TCP_RTO_MIN_US, Linux 6.15 and later;
/// the kernel's default is 200 ms). A voice stream sends a small segment every 20 ms, so a
/// lost one is often the only one in flight, and Linux then waits for its tail-loss probe
/// (two round trips plus this minimum) or the timeout: lab calls over a TCP relay leg losing
/// 1 % of packets stalled 200–250 ms now and then, and their jitter buffers grew to cover it.
/// On a long path the timeout is the round trip and its variation anyway.
pub const STREAM_RTO_MIN_MICROS: u32 = 20_000;
/// The longest delayed acknowledgement on a TURN stream (TCP_DELACK_MAX_US, Linux 6.16 and
/// later; the kernel waits 40–200 ms). An HTTP proxy that sets no TCP_NODELAY (tinyproxy)
/// holds each small frame until the one before is acknowledged; the relay node acknowledging
/// within 8 ms (two jiffies at 250 Hz, the least the kernel takes) lets it go sooner.
pub const STREAM_DELACK_MAX_MICROS: u32 = 8_000;

/// Whether `frame` carries media (ChannelData, a Data or Send indication), which may be dropped
/// when the stream falls behind. Anything else, garbage included, counts as control.
pub fn is_media(frame: &[u8]) -> bool {
    match frame {
        [0x40..=0x7F, ..] => true,
        // STUN message types (RFC 8656 §17): Send indication 0x0016, Data indication 0x0017.
        [0x00, 0x16 | 0x17, ..] => true,
        _ => false,
    }
}

/// Limits of one [`SendQueue`]; [`Default`] is the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendQueueLimits {
    pub media_frames: usize,
    pub frames: usize,
    pub bytes: usize,
}

impl Default for SendQueueLimits {
    fn default() -> Self {
        Self { media_frames: MAX_QUEUED_MEDIA_FRAMES, frames: MAX_QUEUED_FRAMES, bytes: MAX_QUEUED_BYTES }
    }
}

#[derive(Debug)]
struct QueuedFrame {
    bytes: Vec<u8>,
    media: bool,
}

/// Frames waiting for one stream, in order, within [`SendQueueLimits`]: a frame that does not
/// fit makes room by dropping the oldest media, and only when no media is left the oldest
/// control message. Frames come out whole, in the order they went in.
#[derive(Debug)]
pub struct SendQueue {
    frames: VecDeque<QueuedFrame>,
    bytes: usize,
    media: usize,
    limits: SendQueueLimits,
    dropped: u64,
}

impl SendQueue {
    pub fn new(limits: SendQueueLimits) -> Self {
        Self { frames: VecDeque::new(), bytes: 0, media: 0, limits, dropped: 0 }
    }

    /// Queues `frame`; returns how many frames were dropped to keep within the limits (perhaps
    /// `frame` itself: one larger than the byte limit, or media when no media may be queued).
    pub fn push(&mut self, frame: Vec<u8>) -> usize {
        let media = is_media(&frame);
        let fits_alone = frame.len() <= self.limits.bytes && self.limits.frames > 0 && (!media || self.limits.media_frames > 0);
        if !fits_alone {
            self.dropped += 1;
            return 1;
        }
        self.bytes += frame.len();
        self.media += usize::from(media);
        self.frames.push_back(QueuedFrame { bytes: frame, media });
        let mut dropped = 0;
        while self.media > self.limits.media_frames || self.frames.len() > self.limits.frames || self.bytes > self.limits.bytes {
            // Terminates before taking the frame just queued, unless it is media and older
            // media is gone: it fits alone, and everything before it fitted.
            let oldest = if self.media > 0 { self.frames.iter().position(|queued| queued.media).unwrap_or(0) } else { 0 };
            self.remove(oldest);
            dropped += 1;
        }
        self.dropped += dropped as u64;
        dropped
    }

    /// The oldest frame still queued.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let frame = self.frames.pop_front()?;
        self.bytes -= frame.bytes.len();
        self.media -= usize::from(frame.media);
        Some(frame.bytes)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames dropped since the queue was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn remove(&mut self, index: usize) {
        if let Some(frame) = self.frames.remove(index) {
            self.bytes -= frame.bytes.len();
            self.media -= usize::from(frame.media);
        }
    }
}

/// A [`SendQueue`] shared by the task that produces frames ([`SendQueueSender`], which never
/// waits) and the task that writes them to the stream ([`SendQueueReceiver`]). Frames dropped
/// are added to `dropped` (a counter several streams may share).
pub fn channel(limits: SendQueueLimits, dropped: Arc<AtomicU64>) -> (SendQueueSender, SendQueueReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(SendQueue::new(limits)),
        closed: AtomicBool::new(false),
        wake: Notify::new(),
        wake_on_close: Notify::new(),
        dropped,
    });
    (SendQueueSender { shared: Arc::clone(&shared) }, SendQueueReceiver { shared })
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<SendQueue>,
    /// The sender is gone.
    closed: AtomicBool,
    /// A frame was queued, or the sender is gone ([`SendQueueReceiver::ready`] waits for it) …
    wake: Notify,
    /// … and the sender is gone ([`SendQueueReceiver::closed`]: each has its own, as a
    /// notification wakes one waiter).
    wake_on_close: Notify,
    dropped: Arc<AtomicU64>,
}

impl Shared {
    fn with_queue<T>(&self, f: impl FnOnce(&mut SendQueue) -> T) -> T {
        // A panic elsewhere cannot leave the queue half-changed: its methods do not panic.
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut queue)
    }
}

/// The producing end of a [`channel`]; dropping it ends the receiver once the queue is empty.
#[derive(Debug)]
pub struct SendQueueSender {
    shared: Arc<Shared>,
}

impl SendQueueSender {
    /// Queues `frame` for the writing task, dropping the oldest media if the stream is behind.
    pub fn send(&self, frame: Vec<u8>) {
        let dropped = self.shared.with_queue(|queue| queue.push(frame));
        if dropped > 0 {
            self.shared.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
    }
}

impl Drop for SendQueueSender {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        self.shared.wake_on_close.notify_one();
    }
}

/// The writing end of a [`channel`] (one task reads it; its methods take `&self` so that
/// waiting for frames and for [`Self::closed`] can be raced).
#[derive(Debug)]
pub struct SendQueueReceiver {
    shared: Arc<Shared>,
}

impl SendQueueReceiver {
    /// Waits until a frame is queued (`true`), or the sender is gone and nothing is (`false`).
    pub async fn ready(&self) -> bool {
        loop {
            // Closed is read before the queue: a frame sent just before closing is not missed.
            let closed = self.shared.closed.load(Ordering::Acquire);
            if !self.shared.with_queue(|queue| queue.is_empty()) {
                return true;
            }
            if closed {
                return false;
            }
            // A notification sent since the check above is kept for this wait.
            self.shared.wake.notified().await;
        }
    }

    /// The oldest queued frame, if any, without waiting.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.shared.with_queue(SendQueue::pop)
    }

    /// The oldest queued frame, waiting for one; `None` once the sender is gone and the queue
    /// is empty.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        loop {
            if !self.ready().await {
                return None;
            }
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
        }
    }

    /// Waits until the sender is gone (frames may still be queued).
    pub async fn closed(&self) {
        while !self.shared.closed.load(Ordering::Acquire) {
            self.shared.wake_on_close.notified().await;
        }
    }
}

/// Keeps a TURN stream's backlog out of the kernel: TCP_NODELAY (Nagle would hold small voice
/// frames back), a small send buffer ([`STREAM_SEND_BUFFER_BYTES`]) and, on Linux, little
/// unsent data ([`STREAM_NOTSENT_LOWAT_BYTES`]); where the kernel has them, quick
/// retransmissions ([`STREAM_RTO_MIN_MICROS`]) and acknowledgements
/// ([`STREAM_DELACK_MAX_MICROS`]). A socket that refuses an option still works; the last two
/// are left out silently on kernels without them.
pub fn limit_kernel_send_buffering(socket: &TcpStream) -> io::Result<()> {
    socket.set_nodelay(true)?;
    #[cfg(target_os = "linux")]
    {
        let _ = tcp_timers::set(socket, tcp_timers::RTO_MIN_US, STREAM_RTO_MIN_MICROS);
        let _ = tcp_timers::set(socket, tcp_timers::DELACK_MAX_US, STREAM_DELACK_MAX_MICROS);
    }
    let socket = socket2::SockRef::from(socket);
    socket.set_send_buffer_size(STREAM_SEND_BUFFER_BYTES)?;
    #[cfg(any(target_os = "android", target_os = "linux"))]
    socket.set_tcp_notsent_lowat(STREAM_NOTSENT_LOWAT_BYTES)?;
    Ok(())
}

/// Linux's per-socket TCP timers in microseconds, which neither socket2 nor libc name yet
/// (include/uapi/linux/tcp.h).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod tcp_timers {
    use std::io;
    use std::os::fd::AsRawFd;

    pub const RTO_MIN_US: libc::c_int = 45;
    pub const DELACK_MAX_US: libc::c_int = 46;

    /// Sets `option` to `micros` (the kernel rounds it up to whole jiffies).
    pub fn set(socket: &impl AsRawFd, option: libc::c_int, micros: u32) -> io::Result<()> {
        let value = libc::c_int::try_from(micros).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the descriptor is an open socket borrowed for the call; the kernel reads one
        // c_int from a pointer to a live c_int, with its size.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// What `option` is now, in microseconds.
    pub fn get(socket: &impl AsRawFd, option: libc::c_int) -> io::Result<u32> {
        let mut value: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as in `set`; the kernel writes at most `length` bytes to a live c_int and
        // updates `length`, both exclusively borrowed for the call.
        let result = unsafe {
            libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, option, std::ptr::from_mut(&mut value).cast(), &raw mut length)
        };
        if result == 0 { u32::try_from(value).map_err(|_| io::Error::from(io::ErrorKind::InvalidData)) } else { Err(io::Error::last_os_error()) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A Data indication (media) numbered `n`, `size` bytes long in all.
    fn data_indication(n: u8, size: usize) -> Vec<u8> {
        let mut frame = vec![0x00, 0x17, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        frame.resize(size.max(9), 0);
        frame[8] = n;
        frame
    }

    /// ChannelData (media) numbered `n`.
    fn channel_data(n: u8) -> Vec<u8> {
        vec![0x40, 0x00, 0x00, 0x04, n, 0, 0, 0]
    }

    /// A Refresh success response (control) numbered `n`.
    fn refresh_response(n: u8) -> Vec<u8> {
        let mut frame = vec![0x01, 0x04, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        frame.extend_from_slice(&[n; 12]);
        frame
    }

    fn drain(queue: &mut SendQueue) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn what_counts_as_media() {
        assert!(is_media(&channel_data(1)));
        assert!(is_media(&data_indication(1, 40)));
        assert!(is_media(&[0x00, 0x16, 0x00, 0x00]), "Send indication");
        assert!(!is_media(&refresh_response(1)));
        for control in [0x0003u16, 0x0103, 0x0113, 0x0004, 0x0008, 0x0108, 0x0009, 0x0109, 0x0001, 0x0101] {
            let mut message = control.to_be_bytes().to_vec();
            message.extend_from_slice(&[0; 18]);
            assert!(!is_media(&message), "{control:#06x}");
        }
        assert!(!is_media(&[]));
        assert!(!is_media(&[0x00]));
        assert!(!is_media(&[0x80, 0x16]));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_media_and_keeps_the_newest() {
        let mut queue = SendQueue::new(SendQueueLimits::default());
        for n in 0..100 {
            queue.push(channel_data(n));
        }
        assert_eq!(queue.len(), MAX_QUEUED_MEDIA_FRAMES);
        assert_eq!(queue.dropped(), 100 - MAX_QUEUED_MEDIA_FRAMES as u64);
        let kept: Vec<u8> = drain(&mut queue).iter().map(|frame| frame[4]).collect();
        let newest: Vec<u8> = (100 - MAX_QUEUED_MEDIA_FRAMES as u8..100).collect();
        assert_eq!(kept, newest);
        assert_eq!(queue.bytes(), 0);
    }

    #[test]
    fn control_messages_are_kept_and_media_around_them_dropped() {
        let mut queue = SendQueue::new(SendQueueLimits::default());
        queue.push(data_indication(0, 40));
        queue.push(refresh_response(1));
        for n in 2..50 {
            queue.push(data_indication(n, 40));
        }
        queue.push(refresh_response(50));
        for n in 51..60 {
            queue.push(data_indication(n, 40));
        }
        let frames = drain(&mut queue);
        assert_eq!(frames.iter().filter(|frame| !is_media(frame)).count(), 2, "both responses");
        assert_eq!(frames[0], refresh_response(1), "the first response, no older media before it");
        let media: Vec<u8> = frames.iter().filter(|frame| is_media(frame)).map(|frame| frame[8]).collect();
        let mut newest: Vec<u8> = (0..60).rev().filter(|n| ![1, 50].contains(n)).take(MAX_QUEUED_MEDIA_FRAMES).collect();
        newest.reverse();
        assert_eq!(media, newest);
    }

    #[test]
    fn the_byte_limit_drops_media_before_control() {
        let limits = SendQueueLimits { media_frames: 100, frames: 100, bytes: 1000 };
        let mut queue = SendQueue::new(limits);
        queue.push(refresh_response(0));
        for n in 1..20 {
            queue.push(data_indication(n, 200));
        }
        assert!(queue.bytes() <= 1000);
        let frames = drain(&mut queue);
        assert_eq!(frames[0], refresh_response(0));
        let media: Vec<u8> = frames[1..].iter().map(|frame| frame[8]).collect();
        assert_eq!(media, vec![16, 17, 18, 19], "the newest media that fits beside the response");
    }

    #[test]
    fn only_control_left_drops_the_oldest_control() {
        let limits = SendQueueLimits { media_frames: 4, frames: 3, bytes: 1000 };
        let mut queue = SendQueue::new(limits);
        for n in 0..5 {
            queue.push(refresh_response(n));
        }
        assert_eq!(drain(&mut queue), vec![refresh_response(2), refresh_response(3), refresh_response(4)]);
        assert_eq!(queue.dropped(), 2);
    }

    #[test]
    fn a_frame_too_large_for_the_queue_is_dropped_alone() {
        let mut queue = SendQueue::new(SendQueueLimits::default());
        queue.push(refresh_response(1));
        assert_eq!(queue.push(data_indication(2, MAX_QUEUED_BYTES + 1)), 1);
        let mut huge_control = refresh_response(3);
        huge_control.resize(70_000, 0);
        assert_eq!(queue.push(huge_control), 1);
        assert_eq!(drain(&mut queue), vec![refresh_response(1)]);

        let mut no_media = SendQueue::new(SendQueueLimits { media_frames: 0, ..SendQueueLimits::default() });
        assert_eq!(no_media.push(channel_data(1)), 1);
        assert_eq!(no_media.push(refresh_response(1)), 0);
        let mut nothing = SendQueue::new(SendQueueLimits { media_frames: 0, frames: 0, bytes: 0 });
        assert_eq!(nothing.push(Vec::new()), 1);
        assert!(nothing.is_empty());
    }

    /// Garbage of every size, media and control mixed, under random limits: the bounds always
    /// hold, frames come out whole and in order, and media goes before control.
    #[test]
    fn bounds_hold_for_garbage_of_any_size() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = move |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        for _ in 0..200 {
            let limits = SendQueueLimits { media_frames: random(20), frames: random(40), bytes: random(5000) };
            let mut queue = SendQueue::new(limits);
            let mut pushed = Vec::new();
            let mut popped = Vec::new();
            for serial in 0..500u32 {
                let largest = if random(10) == 0 { 70_000 } else { 600 };
                let mut frame = vec![0u8; 4 + random(largest)];
                frame[0] = [0x00, 0x40, 0x7F, 0x80, 0xFF][random(5)];
                frame[1] = [0x16, 0x17, 0x03, 0x01][random(4)];
                frame[2..4].copy_from_slice(&(serial as u16).to_be_bytes());
                // Make each frame unique, whatever its kind: its serial is in bytes 2..4.
                let media_before = queue.media;
                queue.push(frame.clone());
                assert!(queue.len() <= limits.frames && queue.media <= limits.media_frames && queue.bytes() <= limits.bytes, "{limits:?}");
                if !is_media(&frame) && media_before > 0 && frame.len() <= limits.bytes && limits.frames > 0 {
                    assert!(queue.frames.back().is_some_and(|last| last.bytes == frame), "control kept while media was queued");
                }
                pushed.push(frame);
                if random(4) == 0 {
                    popped.extend(queue.pop());
                }
            }
            popped.extend(drain(&mut queue));
            // What came out is what went in, in order, minus what was dropped.
            let mut rest = pushed.iter();
            for frame in &popped {
                assert!(rest.any(|pushed| pushed == frame), "a frame out of order or changed");
            }
            assert_eq!((pushed.len() - popped.len()) as u64, queue.dropped());
        }
    }

    #[tokio::test]
    async fn a_channel_hands_over_frames_in_order_and_ends_with_its_sender() {
        let dropped = Arc::new(AtomicU64::new(0));
        let (sender, receiver) = channel(SendQueueLimits::default(), Arc::clone(&dropped));
        let writer = tokio::spawn(async move {
            let mut received = Vec::new();
            while let Some(frame) = receiver.recv().await {
                received.push(frame);
            }
            received
        });
        sender.send(refresh_response(1));
        for n in 0..30 {
            sender.send(channel_data(n));
        }
        drop(sender);
        let received = writer.await.unwrap();
        assert!(received.contains(&refresh_response(1)));
        assert_eq!(received.last(), Some(&channel_data(29)), "the newest frame is never the one dropped");
        assert_eq!(received.len() as u64 + dropped.load(Ordering::Relaxed), 31);
    }

    /// A stream to a relay retransmits and acknowledges quickly wherever the kernel lets it:
    /// the options read back as set, or the kernel has no such option at all.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_turn_stream_retransmits_and_acknowledges_quickly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        for socket in [&client, &accepted] {
            limit_kernel_send_buffering(socket).unwrap();
            assert!(socket.nodelay().unwrap());
            for (option, wanted) in [(tcp_timers::RTO_MIN_US, STREAM_RTO_MIN_MICROS), (tcp_timers::DELACK_MAX_US, STREAM_DELACK_MAX_MICROS)] {
                match tcp_timers::get(socket, option) {
                    Ok(micros) => assert_eq!(micros, wanted, "option {option}"),
                    Err(error) => assert_eq!(error.raw_os_error(), Some(libc::ENOPROTOOPT), "option {option}: {error}"),
                }
            }
        }
    }

    /// A writer waits for frames and for the sender to go at once (as the relay's TCP writer
    /// does): a frame sent wakes the first wait, not only the second.
    #[tokio::test]
    async fn a_receiver_waiting_for_frames_and_for_the_close_hears_of_both() {
        let (sender, receiver) = channel(SendQueueLimits::default(), Arc::new(AtomicU64::new(0)));
        let (received_tx, mut received_rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            let writing = async {
                while let Some(frame) = receiver.recv().await {
                    received_tx.send(frame).unwrap();
                }
            };
            tokio::select! {
                () = writing => "drained",
                () = receiver.closed() => "closed",
            }
        });
        for n in 0..3 {
            // Let the writer wait first, so the frame's notification finds both waits.
            tokio::task::yield_now().await;
            sender.send(channel_data(n));
            let received = tokio::time::timeout(std::time::Duration::from_secs(5), received_rx.recv()).await;
            assert_eq!(received, Ok(Some(channel_data(n))), "frame {n} handed over");
        }
        drop(sender);
        assert!(["drained", "closed"].contains(&writer.await.unwrap()));
    }
}
