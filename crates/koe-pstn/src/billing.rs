//! Carries out a billing meter's ledger requests on a [`LedgerStore`]: the one place where a
//! [`LedgerRequest`] becomes a store write and its result a [`LedgerReply`]. The gateway's call
//! driver and the billing tests both go through it.

use crate::ledger::{CallEnd, HoldOutcome, LedgerError, LedgerStore, NewCall, Settlement};
use crate::meter::{LedgerReply, LedgerRequest, SettleReason};

/// Performs `request` for `call`. `end` is how the call ended, used when the meter settles a
/// call that ended (rather than cut it off). Records (answer, progress) get no reply: a failed
/// one is logged and covered by the next. Returns the reply to feed back to the meter.
pub async fn carry_out(
    ledger: &dyn LedgerStore,
    call: &NewCall,
    trunk: Option<&str>,
    request: LedgerRequest,
    end: CallEnd,
    now_ms: i64,
) -> Option<LedgerReply> {
    match request {
        LedgerRequest::Hold { chunk, want, at_least } => {
            let outcome = if chunk == 0 {
                ledger.open_call(call, want, at_least, now_ms).await
            } else {
                ledger.hold(call.id, chunk, want, at_least, now_ms).await
            };
            Some(match outcome {
                Ok(HoldOutcome::Held { granted }) => LedgerReply::Held { chunk, granted },
                Ok(HoldOutcome::Insufficient { available }) => LedgerReply::Insufficient { chunk, available },
                Ok(HoldOutcome::TooManyCalls { open }) => LedgerReply::TooManyCalls { chunk, open },
                Err(error) => LedgerReply::HoldFailed { chunk, reason: error.to_string() },
            })
        }
        LedgerRequest::Answered => {
            if let Err(error) = ledger.record_answer(call.id, trunk, now_ms).await {
                tracing::warn!(call = %call.id, %error, "could not record the answer");
            }
            None
        }
        LedgerRequest::Progress { alive_secs } => {
            if let Err(error) = ledger.record_progress(call.id, alive_secs, now_ms).await {
                tracing::warn!(call = %call.id, %error, "could not record the call's progress");
            }
            None
        }
        LedgerRequest::Settle { billed_secs, amount, reason } => {
            let end = if reason == SettleReason::CutOff { CallEnd::CutOff } else { end };
            Some(match ledger.settle(call.id, Settlement { billed_secs, amount, end }, now_ms).await {
                // A call the ledger never recorded held nothing: there is nothing to settle.
                Ok(_) | Err(LedgerError::UnknownCall(_)) => LedgerReply::Settled,
                Err(error) => LedgerReply::SettleFailed { reason: error.to_string() },
            })
        }
    }
}
