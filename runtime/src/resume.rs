//! Continuing an interrupted generation elsewhere: the prompt plus the tokens already streamed
//! become the new prompt, marked as resumed so sampling and token indices carry on where they
//! stopped. Used by the coordinator (an attention worker failed) and by clients (a coordinator
//! failed), so the stream a client sees has no gap and no repeat either way.

use moe_proto::v1::{FinishReason, Finished, GenerateRequest, GenerateResponse, generate_response};

/// What a relay has passed on so far.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    pub streamed: Vec<u32>,
    pub prompt_logits_sent: bool,
    pub finished: bool,
}

impl Progress {
    /// Notes `event` as passed on.
    pub fn observe(&mut self, event: &GenerateResponse) {
        match &event.event {
            Some(generate_response::Event::Token(t)) => self.streamed.push(t.id),
            Some(generate_response::Event::PromptLogits(_)) => self.prompt_logits_sent = true,
            Some(generate_response::Event::Finished(_)) => self.finished = true,
            None => {}
        }
    }

    /// The request that continues `original`, or the `Finished` event to send when nothing is
    /// left to generate (max_tokens reached, or the last token was a stop id: only the end of
    /// the stream was lost).
    pub fn resume(&self, original: &GenerateRequest) -> Result<GenerateRequest, GenerateResponse> {
        let sampling = original.sampling.clone().unwrap_or_default();
        let streamed = &self.streamed;
        let reason = if streamed.len() as u32 >= sampling.max_tokens {
            Some(FinishReason::Length)
        } else if streamed.last().is_some_and(|t| sampling.stop_ids.contains(t)) {
            Some(FinishReason::Stop)
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(GenerateResponse {
                event: Some(generate_response::Event::Finished(Finished {
                    reason: reason as i32,
                    prompt_tokens: (original.prompt_ids.len() - original.resumed_tokens as usize) as u32,
                    generated_tokens: original.resumed_tokens + streamed.len() as u32,
                })),
            });
        }
        let mut req = original.clone();
        req.prompt_ids.extend_from_slice(streamed);
        req.resumed_tokens += streamed.len() as u32;
        req.return_prompt_logits &= !self.prompt_logits_sent;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::{SamplingParams, Token};

    fn token(index: u32, id: u32) -> GenerateResponse {
        GenerateResponse {
            event: Some(generate_response::Event::Token(Token {
                index,
                id,
                ..Default::default()
            })),
        }
    }

    fn request(max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            prompt_ids: vec![1, 2, 3],
            sampling: Some(SamplingParams {
                max_tokens,
                stop_ids: vec![9],
                ..Default::default()
            }),
            return_prompt_logits: true,
            ..Default::default()
        }
    }

    #[test]
    fn resuming_appends_the_streamed_tokens_and_counts_them() {
        let mut p = Progress::default();
        p.observe(&token(0, 7));
        p.observe(&token(1, 8));
        p.prompt_logits_sent = true;
        let r = p.resume(&request(5)).unwrap();
        assert_eq!(r.prompt_ids, [1, 2, 3, 7, 8]);
        assert_eq!(r.resumed_tokens, 2);
        assert!(!r.return_prompt_logits, "prompt logits are not sent twice");
        // Resuming a resumed request keeps counting.
        let mut q = Progress::default();
        q.observe(&token(2, 5));
        let r2 = q.resume(&r).unwrap();
        assert_eq!(r2.prompt_ids, [1, 2, 3, 7, 8, 5]);
        assert_eq!(r2.resumed_tokens, 3);
    }

    #[test]
    fn nothing_left_to_generate_gives_the_finished_event() {
        let mut p = Progress::default();
        p.observe(&token(0, 4));
        p.observe(&token(1, 9));
        let Err(done) = p.resume(&request(5)) else {
            panic!("a stop id ends it")
        };
        let Some(generate_response::Event::Finished(f)) = done.event else {
            panic!()
        };
        assert_eq!(f.reason, FinishReason::Stop as i32);
        assert_eq!((f.prompt_tokens, f.generated_tokens), (3, 2));
        let mut full = Progress::default();
        full.observe(&token(0, 4));
        let Err(done) = full.resume(&request(1)) else {
            panic!("max_tokens reached")
        };
        let Some(generate_response::Event::Finished(f)) = done.event else {
            panic!()
        };
        assert_eq!(f.reason, FinishReason::Length as i32);
    }
}
