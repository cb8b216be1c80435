//! The HTTP routes: OpenAI's `/v1/models`, `/v1/completions`, `/v1/chat/completions`, vLLM's
//! `/tokenize` and `/detokenize`, and `/health` and `/metrics` for probes and Prometheus
//! (those two need no token).

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use moe_runtime::auth::constant_time_eq;
use serde::Deserialize;
use serde_json::json;

use crate::api_error::{ApiError, ApiResult};
use crate::chat;
use crate::fields::Fields;
use crate::generate::{self, Event, Job, random_u64};
use crate::model::ServedModel;
use crate::output::Parsing;
use crate::params::{self, Common, Endpoint};
use crate::respond::{self, Kind, Meta, Streamer};
use crate::state::AppState;

/// Room in a request body for everything besides the prompt (tools, schemas, fields).
const BODY_BASE_BYTES: usize = 1 << 20;
/// Body bytes one context position may take: a token is a few characters, and JSON may write
/// each as a 6-byte `\uXXXX` escape (Python's json.dumps does by default for non-ASCII).
const BODY_BYTES_PER_POSITION: usize = 32;

/// Largest request body accepted for a model of `context_len` positions: a prompt that fills
/// the context, generously written, fits; anything larger could only be refused after the
/// work of parsing and tokenising it.
pub fn body_limit(context_len: usize) -> usize {
    BODY_BASE_BYTES.saturating_add(context_len.saturating_mul(BODY_BYTES_PER_POSITION))
}

pub fn router(state: AppState) -> Router {
    let limit = body_limit(state.model.context_len);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(
            move |uri: Uri, r: Response| async move { openai_error(r, &uri, limit) },
        ))
        .with_state(state)
}

/// axum's own refusals (a body over the limit, a wrong method) are plain text or empty;
/// OpenAI clients expect the error object.
fn openai_error(response: Response, uri: &Uri, limit: usize) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match response.status() {
        _ if is_json => response,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(limit).into_response(),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::method_not_allowed(uri.path()).into_response(),
        StatusCode::NOT_FOUND => ApiError::not_found(uri.path()).into_response(),
        _ => response,
    }
}

/// Runs CPU work sized by the request (BPE encoding, template rendering) on the blocking
/// pool, so a long prompt does not stall the async threads serving every other stream.
async fn off_the_runtime<T: Send + 'static>(work: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("tokenising the request: {e}")))?
}

/// Counts the answer by endpoint and status.
fn counted(state: &AppState, endpoint: &'static str, result: ApiResult<Response>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state.metrics.request(endpoint, response.status().as_u16());
    response
}

fn authorize(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(token) = &state.token else { return Ok(()) };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

/// 200 while a coordinator says the cluster serves, 503 otherwise (a readiness probe).
async fn health(State(state): State<AppState>) -> Response {
    let mut client = state.client.clone().with_retry_window(Duration::ZERO);
    let result = match client.wait_ready(Duration::ZERO).await {
        Ok(detail) => Ok(axum::Json(json!({"status": "ok", "cluster": detail})).into_response()),
        Err(s) => Err(ApiError::from_status(&tonic::Status::unavailable(s.message()))),
    };
    counted(&state, "health", result)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let result = authorize(&state, &headers).map(|()| {
        let m = &state.model;
        axum::Json(json!({"object": "list", "data": [{
            "id": m.name, "object": "model", "created": m.created, "owned_by": "hunyuan-moe-cluster",
            "max_model_len": m.context_len,
        }]}))
        .into_response()
    });
    counted(&state, "models", result)
}

async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let result = async {
        authorize(&state, &headers)?;
        let f = Fields::parse(&body)?;
        let common = params::common(&f, &state.model, Endpoint::Chat)?;
        let chat = chat::parse(&f)?;
        let parsing = Parsing {
            reasoning: state.model.thinking,
            tool_calls: chat.parse_tools,
        };
        let model = state.model.clone();
        let prompt = off_the_runtime(move || chat::prompt_ids(&model, &chat)).await?;
        run(&state, Kind::Chat, common, prompt, parsing, "messages", received).await
    }
    .await;
    counted(&state, "chat_completions", result)
}

/// `/v1/completions`' prompt: one text or one list of ids (a batch of one is accepted too).
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

fn completion_prompt(model: &ServedModel, f: &Fields) -> ApiResult<Vec<u32>> {
    let batch = || {
        ApiError::field(
            "prompt",
            "a batch of prompts is not supported: send one prompt per request",
        )
    };
    let ids = match f
        .get::<Prompt>("prompt")?
        .ok_or_else(|| ApiError::field("prompt", "is required"))?
    {
        // The raw interface: the client's own rendering, specials recognised (see `chat`).
        Prompt::Text(t) => model
            .tokenizer
            .encode(&t)
            .map_err(|e| ApiError::field("prompt", e.to_string()))?,
        Prompt::Ids(ids) => ids,
        Prompt::Texts(mut t) if t.len() == 1 => {
            let t = t.remove(0);
            model
                .tokenizer
                .encode(&t)
                .map_err(|e| ApiError::field("prompt", e.to_string()))?
        }
        Prompt::IdLists(mut l) if l.len() == 1 => l.remove(0),
        Prompt::Texts(_) | Prompt::IdLists(_) => return Err(batch()),
    };
    if ids.is_empty() {
        return Err(ApiError::field("prompt", "is empty"));
    }
    let vocab = model.tokenizer.vocab_size();
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
        return Err(ApiError::field(
            format!("prompt[{i}]"),
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(ids)
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let result = async {
        authorize(&state, &headers)?;
        let f = Fields::parse(&body)?;
        let common = params::common(&f, &state.model, Endpoint::Completions)?;
        let model = state.model.clone();
        let prompt = off_the_runtime(move || completion_prompt(&model, &f)).await?;
        let parsing = Parsing {
            reasoning: false,
            tool_calls: false,
        };
        run(&state, Kind::Completions, common, prompt, parsing, "prompt", received).await
    }
    .await;
    counted(&state, "completions", result)
}

/// Generates for a validated request: whole, or as an SSE stream once the first event shows
/// the cluster took the request (so that a refusal is still an HTTP status).
async fn run(
    state: &AppState,
    kind: Kind,
    common: Common,
    prompt: Vec<u32>,
    parsing: Parsing,
    prompt_field: &str,
    received: Instant,
) -> ApiResult<Response> {
    let max_tokens = params::max_new_tokens(
        common.sampling.max_tokens,
        common.sampling.max_tokens_field,
        prompt.len(),
        state.model.context_len,
        prompt_field,
    )?;
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completions => "cmpl",
    };
    let meta = Meta {
        kind,
        id: format!("{prefix}-{:016x}", random_u64()),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: state.model.name.clone(),
        prompt_ids: prompt.clone(),
        n: common.sampling.n,
        return_token_ids: common.return_token_ids,
        tokenizer: state.model.tokenizer.clone(),
    };
    let job = Job {
        prompt,
        sampling: common.sampling,
        max_tokens,
        parsing,
    };
    let mut events = generate::start(state, job, received);
    if !common.stream {
        let (body, generated) = respond::collect(&meta, events).await?;
        state
            .metrics
            .finished(received.elapsed(), meta.prompt_ids.len(), generated);
        return Ok(axum::Json(body).into_response());
    }
    let first = events
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("the generation ended without an event"))?;
    if let Event::Error(e) = first {
        return Err(e);
    }
    let body = respond::spawn_stream(
        Streamer::new(meta, common.include_usage),
        first,
        events,
        state.metrics.clone(),
        received,
    );
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body)),
    )
        .into_response())
}

async fn tokenize(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let model = state.model.clone();
    let result = match authorize(&state, &headers) {
        Err(e) => Err(e),
        Ok(()) => off_the_runtime(move || tokenize_body(&model, &body)).await,
    };
    counted(&state, "tokenize", result)
}

fn tokenize_body(model: &ServedModel, body: &[u8]) -> ApiResult<Response> {
    let f = Fields::parse(body)?;
    if let Some(m) = f.get::<String>("model")?
        && m != model.name
    {
        return Err(ApiError::field("model", format!("unknown model {m:?}")));
    }
    let ids = if f.has("messages") {
        chat::prompt_ids(model, &chat::parse(&f)?)?
    } else {
        let text: String = f
            .get("prompt")?
            .ok_or_else(|| ApiError::field("prompt", "is required (or messages)"))?;
        model
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::field("prompt", e.to_string()))?
    };
    Ok(axum::Json(json!({"count": ids.len(), "max_model_len": model.context_len, "tokens": ids})).into_response())
}

async fn detokenize(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = (|| {
        authorize(&state, &headers)?;
        let f = Fields::parse(&body)?;
        let ids: Vec<u32> = f
            .get("tokens")?
            .ok_or_else(|| ApiError::field("tokens", "is required"))?;
        let vocab = state.model.tokenizer.vocab_size();
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
            return Err(ApiError::field(
                format!("tokens[{i}]"),
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        let text = state
            .model
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::field("tokens", e.to_string()))?;
        Ok(axum::Json(json!({"prompt": text})).into_response())
    })();
    counted(&state, "detokenize", result)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::http_client;
    use crate::model::Defaults;

    /// A front end on 127.0.0.1 whose cluster address has no listener (these requests never
    /// reach it).
    async fn serve() -> std::net::SocketAddr {
        let state = AppState {
            model: Arc::new(crate::testing::served_model("m", Defaults::default())),
            client: moe_runtime::client::ClusterClient::with_token("127.0.0.1:1", None).unwrap(),
            token: None,
            metrics: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        addr
    }

    fn assert_error_object(body: &serde_json::Value, code: u16, says: &str) {
        assert_eq!(body["error"]["code"], code, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}");
    }

    #[test]
    fn the_body_limit_follows_the_context() {
        assert_eq!(body_limit(64), (1 << 20) + 64 * 32);
        assert_eq!(body_limit(262_144), (1 << 20) + (8 << 20));
        assert_eq!(body_limit(usize::MAX), usize::MAX);
    }

    /// axum's own refusals come back as OpenAI error objects: a body over the limit (413), a
    /// wrong method (405), an unknown path (404).
    #[tokio::test]
    async fn refusals_are_openai_error_objects() {
        let addr = serve().await;
        let limit = body_limit(64);
        let big = json!({"model": "m", "prompt": "x".repeat(limit)});
        let a = http_client::post(addr, "/v1/completions", &big, None).await.unwrap();
        assert_eq!(a.status, 413);
        assert_error_object(&a.json().await.unwrap(), 413, &format!("over {limit} bytes"));
        let a = http_client::request(addr, "GET", "/v1/completions", None, None)
            .await
            .unwrap();
        assert_eq!(a.status, 405);
        assert_error_object(&a.json().await.unwrap(), 405, "/v1/completions");
        let a = http_client::request(addr, "GET", "/v2/nothing", None, None)
            .await
            .unwrap();
        assert_eq!(a.status, 404);
        assert_error_object(&a.json().await.unwrap(), 404, "/v2/nothing");
        // Tokenising runs on the blocking pool and still answers.
        let a = http_client::post(addr, "/tokenize", &json!({"prompt": "hello"}), None)
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        let body = a.json().await.unwrap();
        assert_eq!(body["count"], body["tokens"].as_array().unwrap().len(), "{body}");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
