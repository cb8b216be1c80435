//! The `Attention` gRPC service: the coordinator hands a request over and relays the stream.

use std::pin::Pin;

use moe_model::ModelConfig;
use moe_proto::v1::attention_server::Attention;
use moe_proto::v1::{GenerateRequest, GenerateResponse};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::events::to_response;
use crate::scheduler::SchedulerHandle;

pub struct AttentionService {
    pub scheduler: SchedulerHandle,
    pub config: ModelConfig,
}

#[tonic::async_trait]
impl Attention for AttentionService {
    type ServeStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

    async fn serve(&self, request: Request<GenerateRequest>) -> Result<Response<Self::ServeStream>, Status> {
        let req = moe_runtime::convert::generation_request(request.get_ref())?;
        req.validate(&self.config)
            .map_err(|e| moe_runtime::convert::status(&e))?;
        tracing::debug!(
            prompt = req.prompt.len(),
            max_tokens = req.sampling.max_tokens,
            "request handed over"
        );
        let vocab = self.config.vocab_size;
        // Dropping this stream (the client went away) closes the channel; the scheduler then
        // drops the request and frees its KV blocks.
        let events = UnboundedReceiverStream::new(self.scheduler.submit(req)).map(move |e| to_response(e, vocab));
        Ok(Response::new(Box::pin(events)))
    }
}
