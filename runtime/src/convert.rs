//! Between wire messages and the model crate's types, and from errors to gRPC statuses.

use moe_model::sampling::{GenerationRequest, SamplingParams, TokenLogprobs, TopLogprob};
use moe_proto::PROTOCOL_VERSION;
use moe_proto::v1::{self, GenerateRequest};
use tonic::Status;

/// Refuses any protocol version but ours.
pub fn check_version(version: u32) -> Result<(), Status> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "protocol_version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
        )))
    }
}

/// The request as the engine sees it (not yet validated against the model).
pub fn generation_request(req: &GenerateRequest) -> Result<GenerationRequest, Status> {
    check_version(req.protocol_version)?;
    let s = req
        .sampling
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("sampling is missing (max_tokens at least must be set)"))?;
    Ok(GenerationRequest {
        prompt: req.prompt_ids.clone(),
        sampling: sampling_from_wire(s),
        return_prompt_logits: req.return_prompt_logits,
        return_token_logits: req.return_token_logits,
        resumed: req.resumed_tokens,
    })
}

fn sampling_from_wire(s: &v1::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        stop_ids: s.stop_ids.clone(),
        max_tokens: s.max_tokens,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        logprobs: s.logprobs,
        top_logprobs: s.top_logprobs,
    }
}

fn sampling_to_wire(s: &SamplingParams) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        stop_ids: s.stop_ids.clone(),
        max_tokens: s.max_tokens,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        logprobs: s.logprobs,
        top_logprobs: s.top_logprobs,
    }
}

/// A token's `logprob` and `top_logprobs` wire fields: zero and empty when not asked for.
pub fn token_logprobs_to_wire(l: Option<&TokenLogprobs>) -> (f32, Vec<v1::TopLogprob>) {
    match l {
        None => (0.0, Vec::new()),
        Some(l) => (
            l.logprob,
            l.top
                .iter()
                .map(|t| v1::TopLogprob {
                    id: t.id,
                    logprob: t.logprob,
                })
                .collect(),
        ),
    }
}

/// A token's log-probabilities from its wire form (meaningful when the request asked for them:
/// the wire cannot tell a log-probability of 0 from none).
pub fn token_logprobs_from_wire(t: &v1::Token) -> TokenLogprobs {
    TokenLogprobs {
        logprob: t.logprob,
        top: t
            .top_logprobs
            .iter()
            .map(|a| TopLogprob {
                id: a.id,
                logprob: a.logprob,
            })
            .collect(),
    }
}

/// The wire form of a generation request.
pub fn generate_request(req: &GenerationRequest) -> GenerateRequest {
    GenerateRequest {
        protocol_version: PROTOCOL_VERSION,
        prompt_ids: req.prompt.clone(),
        sampling: Some(sampling_to_wire(&req.sampling)),
        return_prompt_logits: req.return_prompt_logits,
        return_token_logits: req.return_token_logits,
        resumed_tokens: req.resumed,
    }
}

/// A model-crate error as a gRPC status: bad input is INVALID_ARGUMENT, a missing expert
/// FAILED_PRECONDITION, a full cache RESOURCE_EXHAUSTED, a failed routed-expert unit UNAVAILABLE
/// (another attempt may succeed), the rest INTERNAL.
pub fn status(e: &moe_model::Error) -> Status {
    use moe_model::Error as E;
    match e {
        E::InvalidInput(_) => Status::invalid_argument(e.to_string()),
        E::ExpertNotHeld { .. } => Status::failed_precondition(e.to_string()),
        E::KvCacheFull { .. } => Status::resource_exhausted(e.to_string()),
        E::Experts(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_token_logprobs_survive_the_wire() {
        let req = GenerationRequest {
            prompt: vec![5, 6, 7],
            sampling: SamplingParams {
                temperature: 0.7,
                top_k: 9,
                top_p: 0.8,
                seed: 3,
                stop_ids: vec![2],
                max_tokens: 11,
                repetition_penalty: 1.3,
                presence_penalty: -0.5,
                frequency_penalty: 0.25,
                logprobs: true,
                top_logprobs: 4,
            },
            return_prompt_logits: true,
            return_token_logits: false,
            resumed: 1,
        };
        assert_eq!(generation_request(&generate_request(&req)).unwrap(), req);

        let l = TokenLogprobs {
            logprob: -0.75,
            top: vec![
                TopLogprob { id: 4, logprob: -0.5 },
                TopLogprob { id: 9, logprob: -0.75 },
            ],
        };
        let (logprob, top_logprobs) = token_logprobs_to_wire(Some(&l));
        let token = v1::Token {
            index: 0,
            id: 9,
            logits: None,
            logprob,
            top_logprobs,
        };
        assert_eq!(token_logprobs_from_wire(&token), l);
        assert_eq!(token_logprobs_to_wire(None), (0.0, Vec::new()));
    }
}
