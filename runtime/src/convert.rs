//! Between wire messages and the model crate's types, and from errors to gRPC statuses.

use moe_model::sampling::{GenerationRequest, SamplingParams};
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
        ..Default::default()
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
