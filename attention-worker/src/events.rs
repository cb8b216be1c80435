//! Scheduler events as wire messages.

use moe_proto::tensor::encode_f32;
use moe_proto::v1::{self, GenerateResponse, generate_response};
use moe_runtime::convert::token_logprobs_to_wire;
use tonic::Status;

use crate::scheduler::{Event, FinishReason};

/// The wire form of an event; `Failed` becomes the stream's terminating status.
pub fn to_response(event: Event, vocab: usize) -> Result<GenerateResponse, Status> {
    let event = match event {
        Event::PromptLogits { logits, rows } => generate_response::Event::PromptLogits(v1::PromptLogits {
            logits: Some(encode_f32(&logits, &[rows, vocab])),
        }),
        Event::Token {
            index,
            id,
            logits,
            logprobs,
        } => {
            let (logprob, top_logprobs) = token_logprobs_to_wire(logprobs.as_ref());
            generate_response::Event::Token(v1::Token {
                index,
                id,
                logits: logits.map(|l| encode_f32(&l, &[vocab])),
                logprob,
                top_logprobs,
            })
        }
        Event::Finished {
            reason,
            prompt_tokens,
            generated_tokens,
        } => generate_response::Event::Finished(v1::Finished {
            reason: match reason {
                FinishReason::Length => v1::FinishReason::Length,
                FinishReason::Stop => v1::FinishReason::Stop,
            } as i32,
            prompt_tokens,
            generated_tokens,
        }),
        Event::Failed { code, message } => return Err(Status::new(code, message)),
    };
    Ok(GenerateResponse { event: Some(event) })
}
