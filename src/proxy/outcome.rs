//! What a finished completion means for its slot, decided from what the
//! relay saw: pure, so every case is a unit test.

use hyper::StatusCode;

use crate::http::sse::StreamEnd;
use crate::slots::table::Outcome;
use crate::tenant::Kind;

/// The slot's outcome after a completion of `kind` that llama-server
/// answered with `status` and whose stream ended as `end`; `pinned` when
/// the client chose the slot itself.
pub(crate) fn decide(pinned: bool, status: StatusCode, end: &StreamEnd, kind: Kind) -> Outcome {
    by_status(pinned, status).unwrap_or(match end {
        StreamEnd::Complete(s) if s.error.is_none() => Outcome::Generated(kind),
        StreamEnd::Complete(_) => Outcome::Failed,
        // A stopped generation (SillyTavern's Stop button) leaves a valid
        // prefix in the slot, and the partial message is kept by the client.
        StreamEnd::ClientGone(_) => Outcome::Generated(kind),
        StreamEnd::UpstreamError(..) => Outcome::Failed,
    })
}

/// The error when llama-server broke off the stream of a generation kvgate
/// judges by its stream (not pinned, not refused, not failed by status):
/// then the monitor should look, and the metrics count it.
pub(crate) fn broke_off(pinned: bool, status: StatusCode, end: &StreamEnd) -> Option<&str> {
    match (by_status(pinned, status), end) {
        (None, StreamEnd::UpstreamError(e, _)) => Some(e),
        _ => None,
    }
}

/// What the status alone decides, whatever the stream did.
fn by_status(pinned: bool, status: StatusCode) -> Option<Outcome> {
    if pinned {
        // A client-managed slot: kvgate no longer knows what it holds.
        Some(Outcome::Cleared)
    } else if status.is_client_error() {
        // Refused before any work (bad parameters, context too small).
        Some(Outcome::Untouched)
    } else if status.is_server_error() {
        Some(Outcome::Failed)
    } else {
        None
    }
}

/// How the `generation_finished` event names the end.
pub(crate) fn label(end: &StreamEnd, outcome: Outcome) -> &'static str {
    match (end, outcome) {
        (StreamEnd::ClientGone(_), Outcome::Generated(_)) => "stopped",
        (_, Outcome::Generated(_)) => "completed",
        _ => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::sse::Summary;

    const OK: StatusCode = StatusCode::OK;

    fn complete() -> StreamEnd {
        StreamEnd::Complete(Summary::default())
    }

    fn with_error() -> StreamEnd {
        StreamEnd::Complete(Summary {
            error: Some(serde_json::json!({"message": "context full"})),
            ..Summary::default()
        })
    }

    #[test]
    fn a_finished_or_stopped_generation_holds_the_owners_prefix() {
        let normal = Kind::Normal;
        assert_eq!(
            decide(false, OK, &complete(), normal),
            Outcome::Generated(normal)
        );
        let gone = StreamEnd::ClientGone(Summary::default());
        assert_eq!(
            decide(false, OK, &gone, Kind::Swipe),
            Outcome::Generated(Kind::Swipe)
        );
        assert_eq!(label(&gone, Outcome::Generated(Kind::Swipe)), "stopped");
        assert_eq!(label(&complete(), Outcome::Generated(normal)), "completed");
    }

    #[test]
    fn errors_leave_the_slot_unknown_and_refusals_leave_it_untouched() {
        let k = Kind::Normal;
        assert_eq!(decide(false, OK, &with_error(), k), Outcome::Failed);
        let broke = StreamEnd::UpstreamError("reset".into(), Summary::default());
        assert_eq!(decide(false, OK, &broke, k), Outcome::Failed);
        assert_eq!(label(&broke, Outcome::Failed), "failed");
        let bad = StatusCode::BAD_REQUEST;
        assert_eq!(decide(false, bad, &complete(), k), Outcome::Untouched);
        let err = StatusCode::INTERNAL_SERVER_ERROR;
        assert_eq!(decide(false, err, &complete(), k), Outcome::Failed);
    }

    #[test]
    fn only_a_stream_judged_by_its_end_can_break_off() {
        let broke = StreamEnd::UpstreamError("reset".into(), Summary::default());
        assert_eq!(broke_off(false, OK, &broke), Some("reset"));
        assert_eq!(broke_off(true, OK, &broke), None);
        assert_eq!(broke_off(false, StatusCode::BAD_REQUEST, &broke), None);
        assert_eq!(broke_off(false, StatusCode::BAD_GATEWAY, &broke), None);
        assert_eq!(broke_off(false, OK, &complete()), None);
    }

    #[test]
    fn a_client_pinned_slot_belongs_to_nobody_afterwards() {
        for end in [complete(), with_error()] {
            assert_eq!(decide(true, OK, &end, Kind::Normal), Outcome::Cleared);
        }
        assert_eq!(label(&complete(), Outcome::Cleared), "failed");
    }
}
