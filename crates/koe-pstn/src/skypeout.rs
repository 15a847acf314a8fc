//! Drives one SkypeOut call: the [`Bridge`] core fed by the SIP leg, the trunk's media, the Koe
//! side and the clock, its ledger requests carried out on the ledger. This is the thin async
//! shell; every decision is the bridge's (and its meter's).
//!
//! The Koe side is a pair of channels and the 48 kHz audio queues, so the same driver serves
//! the gateway (where a Koe media session fills them) and the tests (where a WAV file does).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::billing;
use crate::bridge::{Bridge, BridgeOutput, KoeAction, KoeEvent, MediaAction, SipAction, SipEvent};
use crate::dtmf::DtmfDigit;
use crate::ledger::{now_ms, CallEnd, LedgerStore, NewCall};
use crate::media::{KoeAudio, MediaReport, RtpPort, TrunkMedia, TrunkMediaStats};
use crate::meter::{CallMeter, MeterConfig};
use crate::sdp::{self, LocalAudio, RemoteAudio, DEFAULT_CODECS};
use crate::trunk::{LegEvent, SipLeg, SipStack, Trunk};

/// What every SkypeOut call of one gateway shares.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub ledger: Arc<dyn LedgerStore>,
    pub sip: Arc<dyn SipStack>,
    pub trunks: Arc<Vec<Trunk>>,
    pub meter: MeterConfig,
    /// A call whose carrier sends no RTP this long is over.
    pub rtp_timeout: Duration,
    /// The number presented as caller ID (a user's own number, later; the operator's default).
    pub caller_id: String,
}

/// What the Koe side tells the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KoeInput {
    Event(KoeEvent),
    /// `koe dtmf`: key presses for the phone (an IVR menu).
    Dtmf(Vec<DtmfDigit>),
}

/// The Koe side of one call.
#[derive(Debug)]
pub struct KoeSide {
    pub inputs: mpsc::UnboundedReceiver<KoeInput>,
    pub actions: mpsc::UnboundedSender<KoeAction>,
    pub audio: KoeAudio,
}

/// How a call went, for the gateway's log and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    pub end: CallEnd,
    pub trunk: Option<String>,
    pub media: TrunkMediaStats,
    /// Keys the phone's user pressed.
    pub digits_from_phone: Vec<DtmfDigit>,
}

/// The trunk leg in progress: its SIP dialog, its RTP port until media starts, and the media.
struct Leg {
    trunk: usize,
    sip: SipLeg,
    port: Option<RtpPort>,
    remote: Option<RemoteAudio>,
    media: Option<TrunkMedia>,
    answered: bool,
}

/// Runs `call` from admission to settlement.
pub async fn run(gateway: &Gateway, call: NewCall, mut koe: KoeSide) -> CallReport {
    let meter = CallMeter::new(call.rate.clone(), call.currency.clone(), gateway.meter.clone());
    let mut bridge = Bridge::new(meter, gateway.trunks.len());
    let mut leg: Option<Leg> = None;
    let mut report = CallReport { end: CallEnd::NotAnswered, trunk: None, media: TrunkMediaStats::default(), digits_from_phone: Vec::new() };
    let mut koe_open = true;
    loop {
        while let Some(output) = bridge.poll_output() {
            match output {
                BridgeOutput::Ledger(request) => {
                    let trunk = report.trunk.clone();
                    let reply = billing::carry_out(gateway.ledger.as_ref(), &call, trunk.as_deref(), request, bridge.end(), now_ms()).await;
                    if let Some(reply) = reply {
                        bridge.handle_ledger_reply(Instant::now(), reply);
                    }
                }
                BridgeOutput::Sip(SipAction::Invite { trunk }) => {
                    if let Some(old) = leg.take() {
                        stop_media(old, &mut report).await;
                    }
                    match invite(gateway, &call, trunk).await {
                        Ok(new) => {
                            report.trunk = Some(gateway.trunks[trunk].name());
                            leg = Some(new);
                        }
                        Err(error) => {
                            warn!(%error, "the INVITE could not be placed");
                            bridge.handle_sip(Instant::now(), SipEvent::NoResponse);
                        }
                    }
                }
                BridgeOutput::Sip(SipAction::Cancel) => {
                    if let Some(leg) = &leg {
                        leg.sip.cancel();
                    }
                }
                BridgeOutput::Sip(SipAction::Bye) => {
                    if let Some(leg) = &leg {
                        leg.sip.bye();
                    }
                }
                BridgeOutput::Koe(action) => {
                    let _ = koe.actions.send(action);
                }
                BridgeOutput::Media(MediaAction::Connect) => {
                    if let Some(leg) = leg.as_mut() {
                        connect_media(leg, &koe.audio, gateway.rtp_timeout);
                    }
                }
                BridgeOutput::Media(MediaAction::Disconnect) => {
                    if let Some(media) = leg.as_mut().and_then(|leg| leg.media.take()) {
                        report.media = media.stop().await;
                    }
                }
                BridgeOutput::Media(MediaAction::WarningTone) => {
                    if let Some(media) = leg.as_ref().and_then(|leg| leg.media.as_ref()) {
                        media.warning_tone();
                    }
                }
                BridgeOutput::Finished { end } => {
                    report.end = end;
                    if let Some(leg) = leg.take() {
                        stop_media(leg, &mut report).await;
                    }
                    info!(call = %call.id, end = end.as_str(), "SkypeOut call finished");
                    return report;
                }
            }
        }
        let deadline = bridge.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let wake = {
            let (sip_events, media_reports) = match leg.as_mut() {
                Some(leg) => (Some(&mut leg.sip.events), leg.media.as_mut().map(|media| &mut media.reports)),
                None => (None, None),
            };
            let leg_event = async {
                match sip_events {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            };
            let media_report = async {
                match media_reports {
                    Some(reports) => reports.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = leg_event => Wake::Leg(event),
                report = media_report => Wake::Media(report),
                input = koe.inputs.recv(), if koe_open => Wake::Koe(input),
                () = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
            }
        };
        match wake {
            Wake::Leg(Some(event)) => {
                if let Some(sip_event) = leg.as_mut().and_then(|leg| on_leg_event(leg, event)) {
                    bridge.handle_sip(Instant::now(), sip_event);
                }
            }
            // The leg's task is gone; it said `Ended` first if it ended normally.
            Wake::Leg(None) => {
                if let Some(leg) = leg.take() {
                    stop_media(leg, &mut report).await;
                }
            }
            Wake::Media(Some(MediaReport::Inactive { since })) => bridge.handle_sip(Instant::now(), SipEvent::MediaInactive { since }),
            Wake::Media(Some(MediaReport::Digit(digit))) => report.digits_from_phone.push(digit),
            Wake::Media(Some(MediaReport::NoDtmf)) => warn!(call = %call.id, "the carrier takes no RFC 4733 key presses"),
            Wake::Media(None) => {}
            Wake::Koe(Some(KoeInput::Event(event))) => bridge.handle_koe(Instant::now(), event),
            Wake::Koe(Some(KoeInput::Dtmf(digits))) => {
                if let Some(media) = leg.as_ref().and_then(|leg| leg.media.as_ref()) {
                    media.send_dtmf(digits);
                }
            }
            // The Koe side is gone without a word: as good as vanished.
            Wake::Koe(None) => {
                koe_open = false;
                bridge.handle_koe(Instant::now(), KoeEvent::Vanished { since: Instant::now() });
            }
            Wake::Timer => bridge.handle_timeout(Instant::now()),
        }
    }
}

/// What woke the call's loop.
enum Wake {
    Leg(Option<LegEvent>),
    Media(Option<MediaReport>),
    Koe(Option<KoeInput>),
    Timer,
}

/// Places the INVITE on trunk `index`, with an offer for a freshly bound RTP port.
async fn invite(gateway: &Gateway, call: &NewCall, index: usize) -> Result<Leg, String> {
    let trunk = &gateway.trunks[index];
    let port = RtpPort::bind(gateway.sip.local_ip()).await.map_err(|e| format!("no RTP port: {e}"))?;
    let local_addr = port.local_addr().map_err(|e| e.to_string())?;
    let session_id = u64::try_from(call.id.0 >> 64).unwrap_or(1) >> 1;
    let local = LocalAudio::new(local_addr.ip(), local_addr.port(), session_id);
    let offer = sdp::offer(&local);
    let answering = local;
    let answer_reoffer = Box::new(move |reoffer: &str| -> Option<String> {
        if reoffer.trim().is_empty() {
            return Some(sdp::offer(&answering));
        }
        let parsed = sdp::parse(reoffer).ok()?;
        let chosen = parsed.negotiate(&DEFAULT_CODECS).ok()?;
        Some(sdp::answer(&parsed, &chosen, &answering))
    });
    let sip = gateway.sip.invite(trunk, &call.number, &gateway.caller_id, offer, answer_reoffer).map_err(|e| e.to_string())?;
    Ok(Leg { trunk: index, sip, port: Some(port), remote: None, media: None, answered: false })
}

/// Reads the carrier's SDP (an answer to our offer); `None` if it is unusable.
fn remote_from(sdp: &str) -> Option<RemoteAudio> {
    match sdp::parse(sdp).and_then(|parsed| parsed.negotiate_answer(&DEFAULT_CODECS)) {
        Ok(remote) => Some(remote),
        Err(error) => {
            warn!(%error, "the carrier's SDP is unusable");
            None
        }
    }
}

/// Turns what the leg reports into the bridge's events, keeping the media pointed at the
/// carrier's latest SDP.
fn on_leg_event(leg: &mut Leg, event: LegEvent) -> Option<SipEvent> {
    match event {
        LegEvent::Provisional { code, sdp } => {
            let remote = sdp.as_deref().and_then(remote_from);
            let early_media = remote.is_some();
            if let Some(remote) = remote {
                leg.remote = Some(remote);
            }
            Some(SipEvent::Provisional { code, early_media })
        }
        LegEvent::Answered { sdp } => {
            leg.answered = true;
            match sdp.as_deref().map(remote_from) {
                Some(Some(remote)) => {
                    if let Some(media) = &leg.media {
                        media.repoint(remote);
                    }
                    leg.remote = Some(remote);
                }
                // An answer we cannot send media to: the call is answered and lost at once.
                Some(None) => {
                    leg.sip.bye();
                    return Some(SipEvent::DialogFailed);
                }
                None if leg.remote.is_none() => {
                    warn!(trunk = leg.trunk, "the carrier answered without SDP");
                    leg.sip.bye();
                    return Some(SipEvent::DialogFailed);
                }
                None => {}
            }
            if let Some(media) = &leg.media {
                media.watch_inactivity();
            }
            Some(SipEvent::Answered)
        }
        LegEvent::Rejected { code } => Some(SipEvent::Rejected { code }),
        LegEvent::NoResponse => Some(SipEvent::NoResponse),
        LegEvent::RemoteMedia { sdp } => {
            if let (Some(remote), Some(media)) = (sdp::parse(&sdp).ok().and_then(|p| p.negotiate(&DEFAULT_CODECS).ok()), &leg.media) {
                media.repoint(remote);
                leg.remote = Some(remote);
            }
            None
        }
        LegEvent::RemoteBye => Some(SipEvent::RemoteBye),
        LegEvent::Failed => Some(SipEvent::DialogFailed),
        LegEvent::Ended => {
            debug!(trunk = leg.trunk, "SIP leg ended");
            None
        }
    }
}

/// Starts the trunk media (early media or the answer), if the carrier's SDP is known.
fn connect_media(leg: &mut Leg, audio: &KoeAudio, rtp_timeout: Duration) {
    if leg.media.is_some() {
        return;
    }
    let (Some(port), Some(remote)) = (leg.port.take(), leg.remote) else {
        warn!(trunk = leg.trunk, "no media to connect: the carrier sent no usable SDP");
        return;
    };
    let media = TrunkMedia::start(port, remote, audio.clone(), rtp_timeout);
    if leg.answered {
        media.watch_inactivity();
    }
    leg.media = Some(media);
}

async fn stop_media(mut leg: Leg, report: &mut CallReport) {
    if let Some(media) = leg.media.take() {
        report.media = media.stop().await;
    }
}
