//! The dispatch message between an attention worker and an expert worker, typed: one layer's
//! token rows (inline, or announced while they travel over NCCL) with their expert assignments,
//! and the answer. Both workers and the tests encode and decode through this module only, so a
//! field is checked in one place and every refusal names the field it is about.

use moe_model::ModelConfig;
use moe_model::experts::ExpertAssignment;
use moe_proto::PROTOCOL_VERSION;
use moe_proto::tensor::{TensorError, WireDtype, decode_matrix};
use moe_proto::v1::dispatch_response::Result as WireResult;
use moe_proto::v1::{DispatchError, DispatchRequest, DispatchResponse, NcclRows};
use tonic::Code;

use crate::net::MAX_MESSAGE_BYTES;

/// Where a dispatch's rows travel.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// In the message, `[num_rows, hidden]`, packed as `dtype`; the answer comes back the same way.
    Inline { values: Vec<f32>, dtype: WireDtype },
    /// Over NCCL from `sender_rank` of the communicator of `epoch`; the answer goes back there.
    Nccl { epoch: u64, sender_rank: usize },
}

/// One layer's rows for one expert worker: what an attention worker sends per (expert worker,
/// layer, micro-batch). Assignment rows index the `num_rows` rows of this message.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub request_id: u64,
    pub layer: usize,
    pub placement_version: u64,
    pub num_rows: usize,
    pub rows: Rows,
    pub assignments: Vec<ExpertAssignment>,
}

/// The model's shape, which a decoded dispatch must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchLimits {
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden: usize,
    /// Rows one message may announce: an NCCL header names a count without carrying the rows,
    /// so it is bounded by what one message could carry inline, before anything is allocated.
    pub max_rows: usize,
}

impl DispatchLimits {
    pub fn for_model(config: &ModelConfig) -> Self {
        DispatchLimits {
            num_layers: config.num_layers,
            num_experts: config.num_experts,
            hidden: config.hidden_size,
            max_rows: MAX_MESSAGE_BYTES / (4 * config.hidden_size.max(1)),
        }
    }
}

/// Why a dispatch message was refused before any compute. Each names its field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("protocol_version {got} is not supported; this server speaks {PROTOCOL_VERSION}")]
    ProtocolVersion { got: u32 },
    #[error("layer {layer} out of range (model has {num_layers})")]
    Layer { layer: u32, num_layers: usize },
    #[error("rows both in the message and over NCCL")]
    RowsTwice,
    #[error("rows tensor missing")]
    RowsMissing,
    #[error("rows: {0}")]
    RowsTensor(#[from] TensorError),
    #[error("{rows} rows in one message (at most {max})")]
    TooManyRows { rows: usize, max: usize, over_nccl: bool },
    #[error("assignment arrays differ in length: rows {rows}, experts {experts}, weights {weights}")]
    AssignmentLengths {
        rows: usize,
        experts: usize,
        weights: usize,
    },
    #[error("expert {expert} out of range (model has {num_experts})")]
    Expert { expert: u32, num_experts: usize },
    #[error("assignment row {row} out of range ({num_rows} rows in the message)")]
    AssignmentRow { row: u32, num_rows: usize },
}

impl DecodeError {
    /// The gRPC code the refusal is answered with: another protocol is a precondition, the
    /// rest is a malformed argument.
    pub fn code(&self) -> Code {
        match self {
            DecodeError::ProtocolVersion { .. } => Code::FailedPrecondition,
            _ => Code::InvalidArgument,
        }
    }

    /// The message field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            DecodeError::ProtocolVersion { .. } => "protocol_version",
            DecodeError::Layer { .. } => "layer",
            DecodeError::RowsTwice | DecodeError::RowsMissing | DecodeError::RowsTensor(_) => "rows",
            DecodeError::TooManyRows { over_nccl: true, .. } => "nccl.rows",
            DecodeError::TooManyRows { over_nccl: false, .. } => "rows",
            DecodeError::AssignmentLengths { .. } => "assignment_*",
            DecodeError::Expert { .. } => "assignment_experts",
            DecodeError::AssignmentRow { .. } => "assignment_rows",
        }
    }
}

impl Dispatch {
    /// The wire form; `hidden` is the width of inline rows.
    pub fn encode(&self, hidden: usize) -> DispatchRequest {
        let (rows, nccl) = match &self.rows {
            Rows::Inline { values, dtype } => (Some(dtype.encode(values, &[self.num_rows, hidden])), None),
            Rows::Nccl { epoch, sender_rank } => (
                None,
                Some(NcclRows {
                    epoch: *epoch,
                    sender_rank: *sender_rank as u32,
                    rows: self.num_rows as u32,
                }),
            ),
        };
        DispatchRequest {
            protocol_version: PROTOCOL_VERSION,
            placement_version: self.placement_version,
            request_id: self.request_id,
            layer: self.layer as u32,
            rows,
            nccl,
            assignment_rows: self.assignments.iter().map(|a| a.row).collect(),
            assignment_experts: self.assignments.iter().map(|a| a.expert).collect(),
            assignment_weights: self.assignments.iter().map(|a| a.weight).collect(),
        }
    }

    /// The protocol version check alone: a receiver makes it, then checks the placement
    /// version against what it serves, before it pays for decoding the rows.
    pub fn check_protocol(req: &DispatchRequest) -> Result<(), DecodeError> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(DecodeError::ProtocolVersion {
                got: req.protocol_version,
            });
        }
        Ok(())
    }

    /// Checks every field against the protocol and the model, in the order a reader would.
    pub fn decode(req: &DispatchRequest, limits: &DispatchLimits) -> Result<Self, DecodeError> {
        Self::check_protocol(req)?;
        if req.layer as usize >= limits.num_layers {
            return Err(DecodeError::Layer {
                layer: req.layer,
                num_layers: limits.num_layers,
            });
        }
        let (num_rows, rows) = match (&req.rows, &req.nccl) {
            (Some(_), Some(_)) => return Err(DecodeError::RowsTwice),
            (None, None) => return Err(DecodeError::RowsMissing),
            (Some(t), None) => {
                let (values, n) = decode_matrix(t, limits.hidden)?;
                // Decoding succeeded, so the dtype is a known one.
                let dtype = WireDtype::of(t)?;
                (n, Rows::Inline { values, dtype })
            }
            (None, Some(h)) => (
                h.rows as usize,
                Rows::Nccl {
                    epoch: h.epoch,
                    sender_rank: h.sender_rank as usize,
                },
            ),
        };
        if num_rows > limits.max_rows {
            return Err(DecodeError::TooManyRows {
                rows: num_rows,
                max: limits.max_rows,
                over_nccl: matches!(rows, Rows::Nccl { .. }),
            });
        }
        let k = req.assignment_rows.len();
        if req.assignment_experts.len() != k || req.assignment_weights.len() != k {
            return Err(DecodeError::AssignmentLengths {
                rows: k,
                experts: req.assignment_experts.len(),
                weights: req.assignment_weights.len(),
            });
        }
        let mut assignments = Vec::with_capacity(k);
        for ((&row, &expert), &weight) in req
            .assignment_rows
            .iter()
            .zip(&req.assignment_experts)
            .zip(&req.assignment_weights)
        {
            if expert as usize >= limits.num_experts {
                return Err(DecodeError::Expert {
                    expert,
                    num_experts: limits.num_experts,
                });
            }
            if row as usize >= num_rows {
                return Err(DecodeError::AssignmentRow { row, num_rows });
            }
            assignments.push(ExpertAssignment { row, expert, weight });
        }
        Ok(Dispatch {
            request_id: req.request_id,
            layer: req.layer as usize,
            placement_version: req.placement_version,
            num_rows,
            rows,
            assignments,
        })
    }
}

/// An expert worker's answer to one dispatch.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Per row, the weighted sum over this worker's experts, `[rows, hidden]`, in the message.
    Inline { values: Vec<f32>, dtype: WireDtype },
    /// The sums of this many rows went back over NCCL.
    Nccl { rows: usize },
    /// Not computed, with the reason.
    Refused { code: Code, message: String },
}

/// An answer that does not parse as one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnswerError {
    #[error("empty answer")]
    Empty,
    #[error("answer: {0}")]
    Tensor(#[from] TensorError),
}

impl Answer {
    /// The wire form; `hidden` is the width of an inline answer's rows.
    pub fn encode(&self, request_id: u64, hidden: usize) -> DispatchResponse {
        let result = match self {
            Answer::Inline { values, dtype } => {
                let rows = values.len().checked_div(hidden).unwrap_or(0);
                WireResult::Output(dtype.encode(values, &[rows, hidden]))
            }
            Answer::Nccl { rows } => WireResult::NcclRows(*rows as u32),
            Answer::Refused { code, message } => WireResult::Error(DispatchError {
                code: *code as i32,
                message: message.clone(),
            }),
        };
        DispatchResponse {
            request_id,
            result: Some(result),
        }
    }

    /// Parses an answer whose inline rows are `hidden` wide.
    pub fn decode(resp: &DispatchResponse, hidden: usize) -> Result<Self, AnswerError> {
        match &resp.result {
            None => Err(AnswerError::Empty),
            Some(WireResult::Output(t)) => {
                let (values, _) = decode_matrix(t, hidden)?;
                Ok(Answer::Inline {
                    values,
                    dtype: WireDtype::of(t)?,
                })
            }
            Some(WireResult::NcclRows(n)) => Ok(Answer::Nccl { rows: *n as usize }),
            Some(WireResult::Error(e)) => Ok(Answer::Refused {
                code: Code::from(e.code),
                message: e.message.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DispatchLimits = DispatchLimits {
        num_layers: 2,
        num_experts: 8,
        hidden: 4,
        max_rows: 100,
    };

    fn assignment(row: u32, expert: u32, weight: f32) -> ExpertAssignment {
        ExpertAssignment { row, expert, weight }
    }

    fn good() -> Dispatch {
        Dispatch {
            request_id: 7,
            layer: 1,
            placement_version: 3,
            num_rows: 2,
            rows: Rows::Inline {
                values: (0..8).map(|i| i as f32 * 0.5).collect(),
                dtype: WireDtype::F32,
            },
            assignments: vec![assignment(0, 2, 0.25), assignment(1, 7, 0.75), assignment(0, 5, 0.5)],
        }
    }

    fn refused(f: impl Fn(&mut DispatchRequest)) -> DecodeError {
        let mut req = good().encode(4);
        f(&mut req);
        Dispatch::decode(&req, &LIMITS).expect_err("should be refused")
    }

    #[test]
    fn a_dispatch_survives_encode_and_decode_in_every_form() {
        let d = good();
        assert_eq!(Dispatch::decode(&d.encode(4), &LIMITS), Ok(d.clone()));
        let nccl = Dispatch {
            rows: Rows::Nccl {
                epoch: 9,
                sender_rank: 1,
            },
            ..d.clone()
        };
        assert_eq!(Dispatch::decode(&nccl.encode(4), &LIMITS), Ok(nccl));
        // No rows at all is still a well-formed message of the model's width.
        let empty = Dispatch {
            num_rows: 0,
            rows: Rows::Inline {
                values: Vec::new(),
                dtype: WireDtype::F32,
            },
            assignments: Vec::new(),
            ..good()
        };
        assert_eq!(Dispatch::decode(&empty.encode(4), &LIMITS), Ok(empty));
        // bf16 rows come back rounded, with the dtype kept for the answer.
        let bf16 = Dispatch {
            rows: Rows::Inline {
                values: vec![1.0, 2.0, 3.0, 4.0, 0.5, 0.25, 8.0, -1.0],
                dtype: WireDtype::Bf16,
            },
            ..d
        };
        let req = bf16.encode(4);
        assert_eq!(req.rows.as_ref().unwrap().data.len(), 8 * 2);
        assert_eq!(Dispatch::decode(&req, &LIMITS), Ok(bf16));
    }

    #[test]
    fn each_malformed_field_is_refused_by_name_with_its_code() {
        let cases: Vec<(DecodeError, Code, &str, &str)> = vec![
            (refused(|r| r.layer = 2), Code::InvalidArgument, "layer", "layer 2"),
            (
                refused(|r| r.protocol_version = 99),
                Code::FailedPrecondition,
                "protocol_version",
                "protocol_version 99",
            ),
            (
                refused(|r| r.rows = Some(WireDtype::F32.encode(&[0.0; 6], &[2, 3]))),
                Code::InvalidArgument,
                "rows",
                "[rows, 4]",
            ),
            (
                refused(|r| r.rows.as_mut().unwrap().dtype = 7),
                Code::InvalidArgument,
                "rows",
                "dtype",
            ),
            (
                refused(|r| r.rows.as_mut().unwrap().shape = vec![3, 4]),
                Code::InvalidArgument,
                "rows",
                "bytes",
            ),
            (
                refused(|r| r.rows = None),
                Code::InvalidArgument,
                "rows",
                "rows tensor missing",
            ),
            (
                refused(|r| {
                    r.nccl = Some(NcclRows {
                        epoch: 1,
                        sender_rank: 0,
                        rows: 2,
                    })
                }),
                Code::InvalidArgument,
                "rows",
                "both",
            ),
            (
                refused(|r| {
                    r.rows = None;
                    r.nccl = Some(NcclRows {
                        epoch: 1,
                        sender_rank: 0,
                        rows: 101,
                    });
                }),
                Code::InvalidArgument,
                "nccl.rows",
                "101 rows",
            ),
            (
                refused(|r| r.rows = Some(WireDtype::F32.encode(&[0.0; 404], &[101, 4]))),
                Code::InvalidArgument,
                "rows",
                "101 rows",
            ),
            (
                refused(|r| {
                    r.assignment_weights.pop();
                }),
                Code::InvalidArgument,
                "assignment_*",
                "differ in length",
            ),
            (
                refused(|r| r.assignment_experts[1] = 8),
                Code::InvalidArgument,
                "assignment_experts",
                "expert 8",
            ),
            (
                refused(|r| r.assignment_rows[2] = 5),
                Code::InvalidArgument,
                "assignment_rows",
                "row 5",
            ),
        ];
        for (err, code, field, says) in cases {
            assert_eq!(err.code(), code, "{err}");
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().contains(says), "`{err}` should mention `{says}`");
        }
    }

    #[test]
    fn answers_survive_encode_and_decode() {
        let answers = [
            Answer::Inline {
                values: vec![0.5; 8],
                dtype: WireDtype::F32,
            },
            Answer::Inline {
                values: vec![0.25; 8],
                dtype: WireDtype::Bf16,
            },
            Answer::Nccl { rows: 3 },
            Answer::Refused {
                code: Code::FailedPrecondition,
                message: "placement version 9 is not served here".into(),
            },
        ];
        for a in answers {
            let wire = a.encode(11, 4);
            assert_eq!(wire.request_id, 11);
            assert_eq!(Answer::decode(&wire, 4), Ok(a.clone()));
        }
        let empty = DispatchResponse {
            request_id: 1,
            result: None,
        };
        assert_eq!(Answer::decode(&empty, 4), Err(AnswerError::Empty));
        // An answer of the wrong width is malformed.
        let wide = Answer::Inline {
            values: vec![0.0; 6],
            dtype: WireDtype::F32,
        }
        .encode(1, 3);
        assert!(matches!(Answer::decode(&wide, 4), Err(AnswerError::Tensor(_))));
    }
}
