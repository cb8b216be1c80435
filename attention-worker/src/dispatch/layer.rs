//! One layer's dispatch in flight: the rows stay here until every answer is in, so a failed
//! attempt is split again on the next placement and resent from here; the model never sees a
//! failure it could not do anything about.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use moe_model::experts::ExpertAssignment;
use moe_runtime::dispatch::{Answer, Dispatch};
use moe_runtime::nccl::STEP_TIMEOUT;
use prost::Message;
use tokio::task::JoinHandle;

use super::error::{DispatchError, Next, next_step};
use super::link::{LinkError, Reply};
use super::plane::DataPlane;
use super::split::{gather_rows, scatter_add, split_by_worker};
use super::{Awaited, Shared};

/// Attempts after the first before a layer gives up (each waits for a new placement at most
/// the recovery timeout).
const MAX_RETRIES: usize = 8;

pub(crate) struct LayerDispatch {
    shared: Arc<Shared>,
    layer: usize,
    /// `[num_rows, hidden]`.
    rows: Vec<f32>,
    num_rows: usize,
    assignments: Vec<ExpertAssignment>,
    /// The split was counted in the statistics (once per layer, not per attempt: the tokens
    /// routed to each expert are a property of the layer).
    recorded: bool,
}

/// One attempt's messages in flight.
pub(crate) struct Attempt {
    version: u64,
    plane: DataPlane,
    parts: Vec<Part>,
    /// Over NCCL: the exchange of rows and answers.
    exchange: Option<JoinHandle<Exchanged>>,
    /// Holds the NCCL plane while this attempt's exchange is on it.
    _turn: Option<NcclTurn>,
    sent: Instant,
}

/// What an NCCL exchange ended with: one answer per part in order, and when it ended.
type Exchanged = (moe_model::Result<Vec<Vec<f32>>>, Instant);

/// The NCCL plane taken by one attempt; released when the attempt ends, however it ends.
struct NcclTurn(Arc<AtomicBool>);

impl NcclTurn {
    fn take(busy: &Arc<AtomicBool>) -> Option<NcclTurn> {
        busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then(|| NcclTurn(busy.clone()))
    }
}

impl Drop for NcclTurn {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One expert worker's share of an attempt.
struct Part {
    worker: String,
    /// The layer's row of each row sent.
    rows: Vec<u32>,
    reply: Reply,
}

/// A failed attempt: why, on which placement version (0: none), and whether over NCCL.
pub(crate) struct Failed {
    error: DispatchError,
    version: u64,
    over_nccl: bool,
}

impl LayerDispatch {
    pub fn new(
        shared: Arc<Shared>,
        layer: usize,
        rows: Vec<f32>,
        num_rows: usize,
        assignments: Vec<ExpertAssignment>,
    ) -> Self {
        LayerDispatch {
            shared,
            layer,
            rows,
            num_rows,
            assignments,
            recorded: false,
        }
    }

    /// Splits the rows on the current placement and sends each expert worker its share.
    pub fn send(&mut self) -> Result<Attempt, Failed> {
        let shared = self.shared.clone();
        let h = shared.hidden;
        let sent = Instant::now();
        let placement = shared.placement().ok_or(Failed {
            error: DispatchError::NoPlacement,
            version: 0,
            over_nccl: false,
        })?;
        let batches =
            split_by_worker(&placement, self.layer, &self.assignments, shared.slot_capacity).map_err(|e| Failed {
                error: e.into(),
                version: placement.version,
                over_nccl: false,
            })?;
        if !self.recorded {
            let workers = placement.workers.len();
            (shared.stats).record_split(self.layer, placement.num_experts, &self.assignments, &batches, workers);
            self.recorded = true;
        }
        // The NCCL plane when it is free (one exchange at a time on a communicator).
        let turn = shared.nccl.as_ref().and_then(|_| NcclTurn::take(&shared.nccl_busy));
        let ids = batches.iter().map(|b| placement.workers[b.worker].id.as_str());
        let plane = DataPlane::choose(turn.as_ref().and(shared.nccl.as_ref()), shared.wire, ids);
        let turn = turn.filter(|_| plane.communicator().is_some());
        let fail = |error: DispatchError, plane: &DataPlane| Failed {
            error,
            version: placement.version,
            over_nccl: plane.communicator().is_some(),
        };
        let mut parts = Vec::with_capacity(batches.len());
        let mut nccl_sends = Vec::new();
        for b in batches {
            let worker = &placement.workers[b.worker];
            let (rows, nccl) = plane.route(&worker.id, gather_rows(&self.rows, h, &b));
            if let Some((rank, values)) = nccl {
                // bf16 over NCCL, both ways.
                shared.stats.add_bytes(2 * values.len() * 2);
                nccl_sends.push((rank, values));
            }
            let request = Dispatch {
                request_id: shared.next_request_id(),
                layer: self.layer,
                placement_version: placement.version,
                num_rows: b.rows.len(),
                rows,
                assignments: b.assignments,
            }
            .encode(h);
            shared.stats.add_bytes(request.encoded_len());
            let reply = shared.link(&worker.address).send(request).map_err(|error| {
                plane.abandon("a dispatch link stopped before its rows were sent");
                let worker = worker.id.clone();
                fail(DispatchError::Worker { worker, error }, &plane)
            })?;
            parts.push(Part {
                worker: worker.id.clone(),
                rows: b.rows,
                reply,
            });
        }
        // Over NCCL the rows move once every header is on its way: the expert workers post
        // their receives when a header arrives, and this group waits for their answers.
        let exchange = plane.communicator().map(|comm| {
            let comm = comm.clone();
            let recvs: Vec<(usize, usize)> = nccl_sends.iter().map(|(rank, rows)| (*rank, rows.len())).collect();
            shared.handle.spawn_blocking(move || {
                let sends: Vec<(usize, &[f32])> = nccl_sends.iter().map(|(r, rows)| (*r, rows.as_slice())).collect();
                (comm.exchange(&sends, &recvs, STEP_TIMEOUT), Instant::now())
            })
        });
        Ok(Attempt {
            version: placement.version,
            plane,
            parts,
            exchange,
            _turn: turn,
            sent,
        })
    }

    /// Waits for an attempt's answers and adds them up, with when the last answer arrived; on
    /// a failure, retries as [`next_step`] says until it succeeds or gives up.
    pub fn finish(mut self, first: Result<Attempt, Failed>) -> Result<(Vec<f32>, Instant), DispatchError> {
        let mut attempt = first;
        let mut retries = 0;
        loop {
            let failed = match attempt {
                Ok(a) => match self.collect(a) {
                    Ok(out) => return Ok(out),
                    Err(f) => f,
                },
                Err(f) => f,
            };
            if retries == MAX_RETRIES {
                return Err(DispatchError::Exhausted {
                    attempts: retries + 1,
                    last: Box::new(failed.error),
                });
            }
            self.recover(failed)?;
            retries += 1;
            self.shared.stats.record_retry();
            attempt = self.send();
        }
    }

    /// Makes a retry possible, or says why there is none.
    fn recover(&self, failed: Failed) -> Result<(), DispatchError> {
        let shared = &self.shared;
        let moved = shared.placement_version() != failed.version;
        match next_step(&failed.error, failed.over_nccl, moved) {
            Next::GiveUp => Err(failed.error),
            Next::AtOnce => {
                tracing::warn!(layer = self.layer, error = %failed.error, over_nccl = failed.over_nccl, "layer dispatch failed; sending again");
                Ok(())
            }
            Next::NewPlacement { suspect } => {
                tracing::warn!(layer = self.layer, error = %failed.error, version = failed.version, "layer dispatch failed; waiting for a new placement");
                if let Some(suspect) = suspect {
                    shared.report_suspect(suspect);
                }
                if shared.wait_for_placement_after(failed.version) {
                    tracing::info!(
                        version = shared.placement_version(),
                        "sending again on the new placement"
                    );
                    Ok(())
                } else {
                    Err(DispatchError::NoNewPlacement {
                        waited: shared.recover_timeout,
                        last: Box::new(failed.error),
                    })
                }
            }
        }
    }

    /// Every answer of an attempt, checked against what was sent, summed per row in worker
    /// order, and when the last of them arrived.
    fn collect(&self, attempt: Attempt) -> Result<(Vec<f32>, Instant), Failed> {
        let shared = &self.shared;
        let h = shared.hidden;
        let over_nccl = attempt.plane.communicator().is_some();
        let fail = |error: DispatchError| {
            // Any failure over NCCL gives the communicator up (the peers' operations end with
            // it); the retry goes over gRPC.
            attempt.plane.abandon(&error.to_string());
            Failed {
                error,
                version: attempt.version,
                over_nccl,
            }
        };
        let mut inline = Vec::with_capacity(attempt.parts.len());
        let mut arrived = attempt.sent;
        for part in attempt.parts {
            let worker = part.worker;
            let values = match shared.await_reply(part.reply, attempt.version) {
                Awaited::PlacementMoved => Err(DispatchError::PlacementChanged { worker }),
                Awaited::Answer(answer) => answer
                    .and_then(|(resp, at)| {
                        arrived = arrived.max(at);
                        shared.stats.add_bytes(resp.encoded_len());
                        let answer = Answer::decode(&resp, h).map_err(|e| LinkError::Malformed(e.to_string()))?;
                        check_answer(answer, part.rows.len(), h, over_nccl)
                    })
                    .map_err(|error| DispatchError::Worker { worker, error }),
            }
            .map_err(fail)?;
            inline.push((part.rows, values));
        }
        let mut over_nccl_answers = match attempt.exchange {
            Some(exchange) => {
                let (answers, at) = shared
                    .handle
                    .block_on(exchange)
                    .map_err(|e| fail(DispatchError::Nccl(format!("exchange task: {e}"))))?;
                arrived = arrived.max(at);
                answers
                    .map_err(|e| fail(DispatchError::Nccl(e.to_string())))?
                    .into_iter()
            }
            None => Vec::new().into_iter(),
        };
        let mut out = vec![0.0f32; self.num_rows * h];
        for (rows, values) in inline {
            let values = match values {
                Some(v) => v,
                None => over_nccl_answers.next().expect("one NCCL receive per answer"),
            };
            scatter_add(&mut out, h, &rows, &values);
        }
        // The round trip of the attempt that succeeded, to its last answer's arrival: with two
        // micro-batches the caller collects a layer's answers only after other work.
        shared.stats.record_answered(arrived - attempt.sent, over_nccl);
        Ok((out, arrived))
    }
}

/// An answer's values (`None` when they come over NCCL), if it is the answer to `sent` rows
/// on this plane.
fn check_answer(answer: Answer, sent: usize, hidden: usize, over_nccl: bool) -> Result<Option<Vec<f32>>, LinkError> {
    let malformed = |m: String| Err(LinkError::Malformed(m));
    match answer {
        Answer::Inline { .. } if over_nccl => malformed("answered in the message; the rows went over NCCL".into()),
        Answer::Nccl { .. } if !over_nccl => malformed("answered over NCCL; the rows went in the message".into()),
        Answer::Inline { values, .. } if values.len() != sent * hidden => malformed(format!(
            "answered {} rows for {sent} sent",
            values.len() / hidden.max(1)
        )),
        Answer::Inline { values, .. } => Ok(Some(values)),
        Answer::Nccl { rows } if rows != sent => malformed(format!("answered {rows} rows over NCCL for {sent} sent")),
        Answer::Nccl { .. } => Ok(None),
        Answer::Refused { code, message } => Err(LinkError::Refused { code, message }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::tensor::WireDtype;

    #[test]
    fn an_answer_must_match_what_was_sent_and_how() {
        let inline = |rows: usize| Answer::Inline {
            values: vec![1.0; rows * 4],
            dtype: WireDtype::F32,
        };
        assert_eq!(check_answer(inline(2), 2, 4, false), Ok(Some(vec![1.0; 8])));
        assert_eq!(check_answer(Answer::Nccl { rows: 2 }, 2, 4, true), Ok(None));
        let says = |r: Result<Option<Vec<f32>>, LinkError>| r.unwrap_err().to_string();
        assert!(says(check_answer(inline(3), 2, 4, false)).contains("answered 3 rows for 2 sent"));
        assert!(says(check_answer(Answer::Nccl { rows: 1 }, 2, 4, true)).contains("1 rows over NCCL for 2"));
        assert!(says(check_answer(inline(2), 2, 4, true)).contains("rows went over NCCL"));
        assert!(says(check_answer(Answer::Nccl { rows: 2 }, 2, 4, false)).contains("rows went in the message"));
    }
}
