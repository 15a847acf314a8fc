//! The daemon's side of phone calls (SkypeOut), both ends of it:
//! - on a user's device: asking the network's gateways for a price, the credit or a voucher,
//!   and placing a call to a number through the gateway that answered first;
//! - on a gateway (`koe gateway serve`): answering those questions, and answering a call to a
//!   number by running its bridge (`koe_pstn::skypeout`) with the Koe call's media on one side.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_call::{Call, CallSignal};
use koe_media::driver::{self, CallAudio, MediaControls, Microphone};
use koe_pstn::bridge::{CallFailure, KoeAction, KoeEvent};
use koe_pstn::ledger::{BillingId, NewCall};
use koe_pstn::media::KoeAudio;
use koe_pstn::service::{minutes_text, PstnRequest, PstnResponse};
use koe_pstn::skypeout::{self, KoeInput, KoeSide};
use koe_types::{Role, UnixTime, Username};
use koe_voice::codec::DEFAULT_BITRATE;
use koe_voice::Backend;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::api::ApiError;
use super::calls::{self, CallLog, CallNetwork, CallSlot, Progress, TalkLimit};
use super::{DaemonState, Payload};
use crate::gateway::GatewayService;

/// How long a question to the gateways waits for the first answer.
const GATEWAY_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long without audio from the caller before the media driver gives up (its own rule).
const CALLER_SILENT: Duration = Duration::from_secs(4);
/// The Opus complexity of what the phone says, towards the Koe caller: the audio is
/// narrowband (G.711) anyway, and at 9 the encoder alone would hold the gateway to ~60
/// transcoded calls per core (docs/BENCHMARKS.md).
const GATEWAY_OPUS_COMPLEXITY: u8 = 0;

impl DaemonState {
    /// A gateway answered question `id`: to whoever waits for it (the first answer wins).
    pub(super) fn pstn_answered(&self, id: String, from: Username, response: PstnResponse) {
        let waiting = self.pstn_waiting.lock().ok().and_then(|mut waiting| waiting.remove(&id));
        if let Some(waiting) = waiting {
            let _ = waiting.send((from, response));
        }
    }
}

/// Asks every online gateway of the network; the first answer wins.
pub(super) async fn ask_gateways(state: &DaemonState, request: PstnRequest) -> Result<(Username, PstnResponse), ApiError> {
    let directory = Username::parse_existing(koe_overlay::GATEWAY_DIRECTORY).map_err(ApiError::failed)?;
    let records = state.client.lookup(directory).await.map_err(ApiError::failed)?;
    let gateways: BTreeSet<Username> = records
        .iter()
        .filter(|record| record.is_online() && record.body().certificate.role() == Role::Gateway)
        .map(|record| record.username().clone())
        .collect();
    if gateways.is_empty() {
        return Err(ApiError::NoGateway);
    }
    let id = format!("{:032x}", BillingId::random().0);
    let (answered, answer) = oneshot::channel();
    if let Ok(mut waiting) = state.pstn_waiting.lock() {
        waiting.insert(id.clone(), answered);
    }
    let payload = Payload::PstnRequest { id: id.clone(), request };
    for gateway in &gateways {
        if let super::api::Delivery::Undelivered { why } = state.send(gateway, &payload).await {
            info!(%gateway, %why, "a gateway did not get the question");
        }
    }
    let outcome = tokio::time::timeout(GATEWAY_ANSWER_TIMEOUT, answer).await;
    if let Ok(mut waiting) = state.pstn_waiting.lock() {
        waiting.remove(&id);
    }
    match outcome {
        Ok(Ok(answer)) => Ok(answer),
        _ => Err(ApiError::failed("no gateway answered in time; try again later")),
    }
}

/// The answer, or the gateway's refusal as an error.
fn accepted(response: PstnResponse) -> Result<PstnResponse, ApiError> {
    match response {
        PstnResponse::Refused { reason } => Err(ApiError::GatewayRefused { reason }),
        other => Ok(other),
    }
}

/// `koe rate`, `koe credit`, `koe credit redeem`.
pub(super) async fn ask(state: &DaemonState, request: PstnRequest) -> Result<PstnResponse, ApiError> {
    accepted(ask_gateways(state, request).await?.1)
}

/// `koe call NUMBER`: the price first (from whichever gateway answers first), then the call
/// through that gateway.
pub(super) async fn call_number(
    state: Arc<DaemonState>,
    number: String,
    play: Option<std::path::PathBuf>,
    record: Option<std::path::PathBuf>,
    limit: TalkLimit,
    progress: Progress,
) -> Result<String, ApiError> {
    let (gateway, answer) = ask_gateways(&state, PstnRequest::Rate { number: number.clone() }).await?;
    let PstnResponse::Rate(quote) = accepted(answer)? else {
        return Err(ApiError::failed("the gateway answered something else than a price"));
    };
    let say = |line: String| {
        if let Some(progress) = &progress {
            let _ = progress.send(line);
        }
    };
    say(format!("{}: {}; {}", quote.number, quote.price_text(), quote.credit_text()));
    if quote.affordable_secs.is_none() {
        return Err(ApiError::GatewayRefused { reason: "not enough credit for this call: koe credit redeem CODE adds a voucher".into() });
    }
    calls::place(state, gateway, Some(number), play, record, limit, progress).await
}

/// A gateway answers a user's question.
pub(super) fn answer_request(state: &Arc<DaemonState>, from: Username, id: String, request: PstnRequest) {
    let Some(gateway) = state.gateway.clone() else { return };
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let response = gateway.answer(from.as_str(), request).await;
        if let super::api::Delivery::Undelivered { why } = state.send(&from, &Payload::PstnResponse { id, response }).await {
            info!(%from, %why, "a price or balance did not reach the user who asked");
        }
    });
}

/// An offer this device cannot take as such (a number to a non-gateway, a person's call to a
/// gateway): declined with the reason.
pub(super) async fn refuse(state: Arc<DaemonState>, from: Username, offer: CallSignal, slot: Option<CallSlot>, reason: &str) {
    let CallSignal::Offer { call: id, .. } = &offer else { return };
    if slot.is_some() {
        state.calls.forget(*id);
    }
    let Some(mut call) = Call::incoming(&offer, state.device.clone(), false, Instant::now(), UnixTime::now().as_secs()) else { return };
    let _ = call.decline_because(Some(reason.to_string()));
    let mut log = CallLog::new(None);
    calls::drain(&state, &from, &mut call, &mut log).await;
}

/// The Koe side of one SkypeOut call at the gateway: the bridge runs the trunk and the money,
/// this runs the Koe call and its media, and each tells the other what happens.
pub(super) async fn answer_skypeout(
    state: Arc<DaemonState>,
    gateway: Arc<GatewayService>,
    from: Username,
    offer: CallSignal,
    number: String,
    slot: Option<CallSlot>,
) {
    let CallSignal::Offer { call: id, media: remote_media, .. } = &offer else { return };
    let Some((mut signals, hangup)) = slot else { return };
    let Some(mut call) = Call::incoming(&offer, state.device.clone(), false, Instant::now(), UnixTime::now().as_secs()) else {
        warn!(%from, "a stale or replayed call offer was ignored");
        state.calls.forget(*id);
        return;
    };
    let started_at = UnixTime::now();
    let mut log = CallLog::new(None);
    log.line(format!("call from {from} to {number}"));
    calls::drain(&state, &from, &mut call, &mut log).await;
    let (number, rate) = match gateway.admit(&number) {
        Ok(admitted) => admitted,
        Err(reason) => {
            info!(%from, %reason, "call to a number refused");
            let _ = call.decline_because(Some(reason));
            calls::drain(&state, &from, &mut call, &mut log).await;
            state.calls.forget(*id);
            return;
        }
    };
    let new_call = NewCall {
        id: BillingId::random(),
        username: from.to_string(),
        number: number.to_string(),
        rate: rate.clone(),
        currency: gateway.currency.clone(),
        gateway: gateway.name.clone(),
        max_open_calls: gateway.max_calls_per_user,
    };
    let (inputs, inputs_rx) = mpsc::unbounded_channel();
    let (actions_tx, mut actions) = mpsc::unbounded_channel();
    let audio = KoeAudio::default();
    let side = KoeSide { inputs: inputs_rx, actions: actions_tx, audio: audio.clone() };
    let bridge = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move { skypeout::run(&gateway.calls, new_call, side).await })
    };
    let mut media: Option<MediaTask> = None;
    let mut hangup = hangup;
    let mut bridge_running = true;
    while bridge_running || !call.is_over() {
        let media_done = async {
            match media.as_mut() {
                Some((task, _)) => task.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            action = actions.recv(), if bridge_running => match action {
                Some(action) => {
                    if let Some(next) = act(&state, &gateway, &from, &mut call, action, remote_media, &audio, &mut log, &rate).await {
                        media = Some(next);
                    }
                    if call.is_over() {
                        if let Some((_, stop)) = media.take() {
                            let _ = stop.send(());
                        }
                    }
                }
                None => bridge_running = false,
            },
            Some(signal) = signals.recv() => {
                // Key presses go to the phone; the call itself only confirms they are for it.
                if let CallSignal::Dtmf { digits, .. } = &signal {
                    match koe_pstn::dtmf::parse_digits(digits) {
                        Ok(digits) if !call.is_over() => {
                            let _ = inputs.send(KoeInput::Dtmf(digits));
                        }
                        Ok(_) => {}
                        Err(error) => warn!(%from, %error, "key presses not played"),
                    }
                }
                call.handle_signal(signal);
                calls::drain(&state, &from, &mut call, &mut log).await;
                if call.is_over() {
                    let _ = inputs.send(KoeInput::Event(KoeEvent::HungUp));
                }
            }
            summary = media_done => {
                media = None;
                let failure = summary.and_then(Result::ok).and_then(|summary| summary.failure);
                let since = Instant::now().checked_sub(CALLER_SILENT).unwrap_or_else(Instant::now);
                if let Some(reason) = failure {
                    call.media_failed(&reason);
                    calls::drain(&state, &from, &mut call, &mut log).await;
                }
                let _ = inputs.send(KoeInput::Event(KoeEvent::Vanished { since }));
            }
            _ = &mut hangup => {
                call.hang_up();
                calls::drain(&state, &from, &mut call, &mut log).await;
                let _ = inputs.send(KoeInput::Event(KoeEvent::HungUp));
            }
            () = tokio::time::sleep(Duration::from_secs(1)), if !bridge_running => {
                // The bridge is done; the Koe call ends with it.
                call.hang_up();
                calls::drain(&state, &from, &mut call, &mut log).await;
            }
        }
    }
    if let Some((task, stop)) = media.take() {
        let _ = stop.send(());
        let _ = task.await;
    }
    let report = bridge.await.ok();
    state.calls.forget(*id);
    calls::remember(&state, *id, from.as_str(), true, started_at, &log, None);
    info!(%from, end = ?report.map(|r| r.end), "{}", log.text.trim_end().replace('\n', "; "));
}

type MediaTask = (tokio::task::JoinHandle<Result<driver::CallSummary, koe_media::MediaError>>, oneshot::Sender<()>);

/// Carries out what the bridge tells the Koe side; the media task when it starts one.
#[allow(clippy::too_many_arguments)]
async fn act(
    state: &DaemonState,
    gateway: &GatewayService,
    from: &Username,
    call: &mut Call,
    action: KoeAction,
    remote_media: &koe_media::MediaDescription,
    audio: &KoeAudio,
    log: &mut CallLog,
    rate: &koe_pstn::rates::Rate,
) -> Option<MediaTask> {
    let currency = &gateway.currency;
    let mut started = None;
    match action {
        KoeAction::Admitted { .. } | KoeAction::Ringing { .. } => {}
        KoeAction::Answer => match start_media(state, call, remote_media, audio, log).await {
            Ok(task) => started = Some(task),
            Err(error) => {
                warn!(%from, %error, "the caller's media could not start");
                call.hang_up();
            }
        },
        KoeAction::Reject(CallFailure::Busy) => {
            let _ = call.busy();
        }
        KoeAction::Reject(failure) => {
            let _ = call.decline_because(Some(failure.to_string()));
        }
        KoeAction::Hangup(CallFailure::Ended) => call.hang_up(),
        KoeAction::Hangup(failure) => call.media_failed(&failure.to_string()),
        KoeAction::CreditWarning { secs_left } => {
            call.notify(format!("your credit runs out in {}: the call ends then", minutes_text(secs_left)));
        }
        KoeAction::Billed { billed_secs, amount } => {
            let balance = gateway.ledger().balance(from.as_str()).await.ok().map(|b| b.balance.display(currency).to_string());
            let mut line = format!(
                "billed {} at {}/min: {}",
                minutes_text(rate.increment.billed_secs(billed_secs)),
                rate.price_per_minute.display(currency),
                amount.display(currency)
            );
            if let Some(balance) = balance {
                line.push_str(&format!("; your credit is now {balance}"));
            }
            call.notify(line);
        }
    }
    calls::drain(state, from, call, log).await;
    started
}

/// Answers the Koe call and starts its media: what the phone says is its microphone, what
/// it plays goes to the phone.
async fn start_media(
    state: &DaemonState,
    call: &mut Call,
    remote_media: &koe_media::MediaDescription,
    audio: &KoeAudio,
    log: &mut CallLog,
) -> Result<MediaTask, String> {
    let CallNetwork { socket, mut session, streams } = calls::media_socket(state, log).await?;
    if let Err(error) = call.answer(session.local_description()) {
        driver::release_relays(&mut session, &socket);
        return Err(error.to_string());
    }
    if let Err(error) = session.start(remote_media, false) {
        driver::release_relays(&mut session, &socket);
        return Err(format!("the caller's media offer is unusable: {error}"));
    }
    let call_audio = CallAudio {
        backend: Backend::OpusPure,
        bitrate: DEFAULT_BITRATE,
        microphone: Microphone::Device(audio.from_phone.clone()),
        speaker: Some(audio.to_phone.clone()),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let controls = MediaControls { encoder_complexity: Some(GATEWAY_OPUS_COMPLEXITY), ..MediaControls::default() };
    let task = tokio::spawn(driver::run(session, socket, streams, call_audio, controls, async move {
        let _ = stopped.await;
    }));
    Ok((task, stop))
}
