//! Attention worker: attention, KV cache, router and shared expert; dispatches routed rows to
//! expert workers.
