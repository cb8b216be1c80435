//! Continuous batching on one thread that owns the engine (model, KV cache, expert unit).
//!
//! Each step: drop requests whose client went away; admit waiting requests while their KV
//! blocks fit (counting what running requests will still need); batch one decode row per
//! running request with prefill chunks up to the token budget; preempt the newest request when
//! decode growth runs out of blocks (it is recomputed later from its prompt plus the tokens
//! already streamed, so its client sees no gap or repeat); sample, stream, finish.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use moe_model::engine::{Engine, LogitsWanted, SeqChunk};

use crate::step_plan::{self, DEFAULT_PREFILL_WHILE_DECODING};
use moe_model::kv_cache::SeqId;
use moe_model::sampling::{GenerationRequest, Sampled, Sampler, TokenLogprobs};
use tokio::sync::mpsc;

/// What a request's client receives, in order: optionally the prompt logits, then tokens, then
/// `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    PromptLogits {
        logits: Vec<f32>,
        rows: usize,
    },
    Token {
        index: u32,
        id: u32,
        logits: Option<Vec<f32>>,
        /// When the request asked (`sampling.logprobs`).
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: u32,
        generated_tokens: u32,
    },
    Failed {
        code: tonic::Code,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
}

pub struct Submission {
    pub request: GenerationRequest,
    pub events: mpsc::UnboundedSender<Event>,
}

/// Default token rows per step (`--max-batch-tokens`). A prefill chunk shares its step with
/// every running sequence's decode row, so this budget also bounds how long one arriving prompt
/// stalls them (`moectl bench --arrival-interval-ms` measures it; `docs/perf.md`).
pub const DEFAULT_MAX_BATCH_TOKENS: NonZeroUsize = NonZeroUsize::new(512).unwrap();

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Token rows per step (decode rows plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Prefill rows a step may add, beyond one per decoding sequence, for prompts that arrived
    /// while others were decoding (see [`crate::step_plan`]).
    pub prefill_while_decoding: usize,
    /// Requests running at once.
    pub max_running: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS.get(),
            prefill_while_decoding: DEFAULT_PREFILL_WHILE_DECODING.get(),
            max_running: 64,
        }
    }
}

/// Live counters, read by heartbeats and status.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub tokens_processed: AtomicU64,
    pub preemptions: AtomicU64,
}

/// Cheap, cloneable handle to the scheduler thread.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submission>,
    pub stats: Arc<SchedulerStats>,
}

/// A request run to its end in process: its tokens and when each arrived.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completed {
    pub tokens: Vec<u32>,
    pub token_times: Vec<std::time::Duration>,
    /// Per token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprobs>,
}

impl SchedulerHandle {
    /// Runs `request` to its end (for in-process callers: `moectl generate`, `moectl bench`);
    /// a failure is the status a gRPC client would get.
    pub async fn run(&self, request: GenerationRequest) -> Result<Completed, tonic::Status> {
        let since = std::time::Instant::now();
        let mut events = self.submit(request);
        let mut done = Completed::default();
        while let Some(e) = events.recv().await {
            match e {
                Event::Token { id, logprobs, .. } => {
                    done.tokens.push(id);
                    done.token_times.push(since.elapsed());
                    done.logprobs.extend(logprobs);
                }
                Event::Finished { .. } => return Ok(done),
                Event::Failed { code, message } => return Err(tonic::Status::new(code, message)),
                Event::PromptLogits { .. } => {}
            }
        }
        Err(tonic::Status::unavailable("the scheduler stopped"))
    }

    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(&self, request: GenerationRequest) -> mpsc::UnboundedReceiver<Event> {
        let (events, rx) = mpsc::unbounded_channel();
        if let Err(mpsc::error::SendError(s)) = self.tx.send(Submission { request, events }) {
            let _ = s.events.send(Event::Failed {
                code: tonic::Code::Unavailable,
                message: "the scheduler has stopped".into(),
            });
        }
        rx
    }
}

/// Starts the scheduler thread. It stops when every handle is dropped and the work is done.
pub fn spawn(engine: Engine, config: SchedulerConfig) -> SchedulerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(SchedulerStats::default());
    let mut scheduler = Scheduler {
        engine,
        config,
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        steps: 0,
        stats: stats.clone(),
    };
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler.run())
        .expect("spawning the scheduler thread");
    SchedulerHandle { tx, stats }
}

struct Sequence {
    id: SeqId,
    request: GenerationRequest,
    sampler: Sampler,
    events: mpsc::UnboundedSender<Event>,
    generated: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    prompt_logits: Vec<f32>,
    prompt_logits_sent: bool,
    /// Steps the scheduler had run when the request arrived.
    arrived_at: u64,
    /// Steps the scheduler had run when this run of the request produced its first token.
    first_token_at: Option<u64>,
}

impl Sequence {
    fn total_len(&self) -> usize {
        self.request.prompt.len() + self.generated.len()
    }

    /// Tokens generated for the client so far, counting those of an interrupted earlier run.
    fn generated_total(&self) -> usize {
        self.request.resumed as usize + self.generated.len()
    }

    fn token(&self, i: usize) -> u32 {
        let p = &self.request.prompt;
        if i < p.len() { p[i] } else { self.generated[i - p.len()] }
    }

    fn fail(&self, code: tonic::Code, message: String) {
        let _ = self.events.send(Event::Failed { code, message });
    }
}

struct Scheduler {
    engine: Engine,
    config: SchedulerConfig,
    rx: mpsc::UnboundedReceiver<Submission>,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<Sequence>,
    stats: Arc<SchedulerStats>,
    /// Steps run so far: the clock of `arrived_at` and `first_token_at`.
    steps: u64,
}

impl Scheduler {
    fn run(&mut self) {
        self.publish_stats();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.blocking_recv() {
                    Some(s) => self.enqueue(s),
                    None => break,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.enqueue(s);
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.publish_stats();
        }
        tracing::info!("scheduler stopped");
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.engine.cache().block_size())
    }

    fn enqueue(&mut self, s: Submission) {
        let config = self.engine.config();
        if let Err(e) = s.request.validate(config) {
            let _ = s.events.send(Event::Failed {
                code: tonic::Code::InvalidArgument,
                message: e.to_string(),
            });
            return;
        }
        let worst = self.blocks_for(s.request.original_prompt_len() + s.request.sampling.max_tokens as usize);
        let total = self.engine.cache().num_blocks();
        if worst > total {
            let _ = s.events.send(Event::Failed {
                code: tonic::Code::InvalidArgument,
                message: format!(
                    "prompt + max_tokens needs {worst} KV blocks of {} tokens; this worker has {total}",
                    self.engine.cache().block_size()
                ),
            });
            return;
        }
        let id = self.engine.new_sequence();
        // Counts the prompt for penalties and continues a resumed request's generator.
        let sampler = Sampler::for_request(&s.request);
        self.waiting.push_back(Sequence {
            id,
            request: s.request,
            sampler,
            events: s.events,
            generated: Vec::new(),
            computed: 0,
            prompt_logits: Vec::new(),
            prompt_logits_sent: false,
            arrived_at: self.steps,
            first_token_at: None,
        });
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|s| !s.events.is_closed());
        let engine = &mut self.engine;
        self.running.retain(|s| {
            let keep = !s.events.is_closed();
            if !keep {
                tracing::debug!(seq = s.id, "client went away; freeing its KV blocks");
                engine.release(s.id);
            }
            keep
        });
    }

    /// Blocks the running requests still need to reach their next target length.
    fn outstanding_blocks(&self) -> usize {
        let cache = self.engine.cache();
        self.running
            .iter()
            .map(|s| cache.blocks_needed(s.id, s.total_len().max(s.computed + 1)))
            .sum()
    }

    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            if self.running.len() >= self.config.max_running {
                break;
            }
            let available = self
                .engine
                .cache()
                .free_blocks()
                .saturating_sub(self.outstanding_blocks());
            if self.blocks_for(next.total_len() + 1) > available {
                break;
            }
            let seq = self.waiting.pop_front().expect("front exists");
            self.running.push(seq);
        }
    }

    /// Frees blocks for decode growth by preempting the newest requests.
    fn make_room(&mut self) {
        while self.outstanding_blocks() > self.engine.cache().free_blocks() {
            let Some(victim) = self.running.pop() else { break };
            tracing::debug!(seq = victim.id, "out of KV blocks: preempting (will recompute)");
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
            self.engine.release(victim.id);
            let mut victim = victim;
            victim.computed = 0;
            victim.first_token_at = None;
            victim.prompt_logits.clear();
            self.waiting.push_front(victim);
        }
    }

    fn step(&mut self) {
        self.make_room();
        if self.running.is_empty() {
            return;
        }
        let plan = step_plan::plan_step(&self.needs(), &self.budget());
        let mut chunks = Vec::with_capacity(plan.len());
        let mut members = Vec::with_capacity(plan.len());
        for (i, take) in plan {
            let s = &self.running[i];
            let remaining = s.total_len() - s.computed;
            let completes = take == remaining;
            let wants_prompt = s.request.return_prompt_logits && !s.prompt_logits_sent;
            let logits = match (wants_prompt, completes) {
                (true, _) => LogitsWanted::All,
                (false, true) => LogitsWanted::Last,
                (false, false) => LogitsWanted::None,
            };
            chunks.push(SeqChunk {
                seq: s.id,
                tokens: (s.computed..s.computed + take).map(|t| s.token(t)).collect(),
                logits,
            });
            members.push(i);
        }
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let _span = tracing::debug_span!("batch", seqs = chunks.len(), rows).entered();
        // A failure on the expert side (a worker died, the placement moved) is retried inside
        // the layer's dispatch; what arrives here is final.
        let result = self.engine.step(&chunks, false);
        self.steps += 1;
        match result {
            Ok(out) => {
                self.stats.tokens_processed.fetch_add(rows as u64, Ordering::Relaxed);
                for ((&i, chunk), logits) in members.iter().zip(&chunks).zip(out.logits) {
                    self.after_step(i, chunk, logits);
                }
                self.retire_finished();
            }
            Err(e) => {
                tracing::warn!(error = %e, "step failed; failing its requests");
                let code = moe_runtime::convert::status(&e).code();
                let mut failed: Vec<usize> = members;
                failed.sort_unstable();
                for &i in failed.iter().rev() {
                    let s = self.running.remove(i);
                    s.fail(code, e.to_string());
                    self.engine.release(s.id);
                }
            }
        }
    }

    /// What each running sequence needs from the next step. A prompt is throttled when it
    /// arrived after a sequence decoding now had its first token: it would stall that one.
    /// Arrivals are taken between steps, so one received right after the step that gave the
    /// first token arrived during it: together with that sequence, not after.
    fn needs(&self) -> Vec<step_plan::Need> {
        let remaining = |s: &Sequence| s.total_len() - s.computed;
        let decoding_since = self
            .running
            .iter()
            .filter(|s| remaining(s) == 1)
            .filter_map(|s| s.first_token_at)
            .min();
        self.running
            .iter()
            .map(|s| step_plan::Need {
                rows: remaining(s),
                throttled: decoding_since.is_some_and(|t| t < s.arrived_at),
            })
            .collect()
    }

    fn budget(&self) -> step_plan::StepBudget {
        step_plan::StepBudget {
            max_rows: self.config.max_batch_tokens,
            prefill_while_decoding: self.config.prefill_while_decoding,
        }
    }

    fn after_step(&mut self, i: usize, chunk: &SeqChunk, logits: Vec<f32>) {
        let vocab = self.engine.config().vocab_size;
        let s = &mut self.running[i];
        let start = s.computed;
        s.computed += chunk.tokens.len();
        let prompt_len = s.request.original_prompt_len();
        let mut last = logits;
        if chunk.logits == LogitsWanted::All {
            // Keep the rows that fall on prompt positions; the last row decides the next token.
            let rows = chunk.tokens.len();
            let prompt_rows = prompt_len.saturating_sub(start).min(rows);
            s.prompt_logits.extend_from_slice(&last[..prompt_rows * vocab]);
            last = last[(rows - 1) * vocab..].to_vec();
            if s.computed >= prompt_len && !s.prompt_logits_sent {
                s.prompt_logits_sent = true;
                let logits = std::mem::take(&mut s.prompt_logits);
                let _ = s.events.send(Event::PromptLogits {
                    logits,
                    rows: prompt_len,
                });
            }
        }
        if s.computed < s.total_len() {
            return; // more prefill to come
        }
        let Sampled { id, logprobs } = s.sampler.sample(&last);
        s.generated.push(id);
        s.first_token_at.get_or_insert(self.steps);
        let index = (s.generated_total() - 1) as u32;
        let logits = s.request.return_token_logits.then_some(last);
        let _ = s.events.send(Event::Token {
            index,
            id,
            logits,
            logprobs,
        });
    }

    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let reason = match s.generated.last() {
                Some(t) if s.computed == s.total_len() - 1 && s.request.sampling.stop_ids.contains(t) => {
                    Some(FinishReason::Stop)
                }
                Some(_) if s.generated_total() >= s.request.sampling.max_tokens as usize => Some(FinishReason::Length),
                _ => None,
            };
            if let Some(reason) = reason {
                let s = self.running.remove(i);
                let _ = s.events.send(Event::Finished {
                    reason,
                    prompt_tokens: s.request.original_prompt_len() as u32,
                    generated_tokens: s.generated_total() as u32,
                });
                self.engine.release(s.id);
            } else {
                i += 1;
            }
        }
    }

    fn publish_stats(&self) {
        let cache = self.engine.cache();
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats.waiting.store(self.waiting.len(), Ordering::Relaxed);
        self.stats.kv_blocks_total.store(cache.num_blocks(), Ordering::Relaxed);
        self.stats
            .kv_blocks_used
            .store(cache.num_blocks() - cache.free_blocks(), Ordering::Relaxed);
    }
}
