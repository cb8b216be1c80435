//! Paged KV cache: fixed-size blocks from a preallocated pool, a block table per sequence.
//!
//! Keys are stored after RoPE; values raw. A slot that only one layer reads holds keys after
//! that layer's key norm (applied once, at write); a slot shared by a CLA group holds keys
//! **before** QK-norm, because each layer of the group applies its own key norm as it reads
//! (see `attention`). That is what makes CLA's saving real: one cache slot serves every layer of
//! a CLA group. Without CLA each layer has its own slot.
//!
//! Storage is bf16 (half the bytes, rounded to nearest even on write) or f32 (exact), chosen by
//! [`KvDtypeChoice`]; readers widen a block at a time ([`KvCache::blocks`]).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::config::{DType, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::f32_to_bf16;

pub type SeqId = u64;

/// Element type of the cached K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 2 bytes a value; each value is rounded to nearest even (relative error at most 2^-9).
    Bf16,
    /// 4 bytes a value; exact.
    F32,
}

impl KvDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::Bf16 => 2,
            KvDtype::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `--kv-cache-dtype` option: a dtype, or `auto`, which follows the checkpoint's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtypeChoice {
    /// By the config's `torch_dtype`: f32 KV for a float32 checkpoint (so f32 runs stay within
    /// the golden fixtures' f32 tolerances, which bf16 KV does not meet: docs/kv-cache.md), bf16
    /// KV for a bfloat16 or float16 one (FP8 and GPTQ checkpoints name the dtype of their
    /// unquantised tensors), f32 when the config names none.
    #[default]
    Auto,
    Is(KvDtype),
}

impl KvDtypeChoice {
    /// The dtype for a checkpoint whose config names `torch_dtype` (`None`: not named).
    pub fn resolve(self, torch_dtype: Option<DType>) -> KvDtype {
        match (self, torch_dtype) {
            (KvDtypeChoice::Is(dtype), _) => dtype,
            (KvDtypeChoice::Auto, Some(DType::BF16 | DType::F16)) => KvDtype::Bf16,
            (KvDtypeChoice::Auto, _) => KvDtype::F32,
        }
    }
}

impl FromStr for KvDtypeChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KvDtypeChoice::Auto),
            "bf16" => Ok(KvDtypeChoice::Is(KvDtype::Bf16)),
            "f32" => Ok(KvDtypeChoice::Is(KvDtype::F32)),
            other => Err(Error::InvalidInput(format!(
                "kv cache dtype: expected auto, bf16 or f32, got {other:?}"
            ))),
        }
    }
}

impl fmt::Display for KvDtypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvDtypeChoice::Auto => f.write_str("auto"),
            KvDtypeChoice::Is(dtype) => dtype.fmt(f),
        }
    }
}

/// Capacity of a cache: `num_blocks` blocks of `block_size` token positions each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub dtype: KvDtypeChoice,
}

impl KvCacheConfig {
    /// Enough blocks for `tokens` positions, dtype `auto`.
    pub fn for_tokens(tokens: usize, block_size: usize) -> Self {
        KvCacheConfig {
            block_size,
            num_blocks: tokens.div_ceil(block_size),
            dtype: KvDtypeChoice::Auto,
        }
    }

    /// The same capacity with dtype `dtype`.
    pub fn with_dtype(self, dtype: KvDtypeChoice) -> Self {
        KvCacheConfig { dtype, ..self }
    }
}

/// Contiguous cached rows in the storage dtype, `[rows, kv_dim]`.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl KvRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens every value into `out` (of the same length).
    pub fn widen_into(&self, out: &mut [f32]) {
        match self {
            KvRows::F32(v) => out.copy_from_slice(v),
            KvRows::Bf16(v) => crate::kernels::widen_bf16(v, out),
        }
    }
}

/// The cached positions `start..start + len` of one sequence, all in one block.
#[derive(Debug, Clone, Copy)]
pub struct KvBlock<'a> {
    pub start: usize,
    pub len: usize,
    pub keys: KvRows<'a>,
    pub values: KvRows<'a>,
}

/// One slot's K or V pool, `[num_blocks, block_size, kv_dim]`.
enum Pool {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Pool {
    fn new(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => Pool::F32(vec![0.0; len]),
            KvDtype::Bf16 => Pool::Bf16(vec![0; len]),
        }
    }

    fn write(&mut self, off: usize, src: &[f32]) {
        match self {
            Pool::F32(v) => v[off..off + src.len()].copy_from_slice(src),
            Pool::Bf16(v) => {
                for (d, &s) in v[off..off + src.len()].iter_mut().zip(src) {
                    *d = f32_to_bf16(s);
                }
            }
        }
    }

    fn rows(&self, off: usize, len: usize) -> KvRows<'_> {
        match self {
            Pool::F32(v) => KvRows::F32(&v[off..off + len]),
            Pool::Bf16(v) => KvRows::Bf16(&v[off..off + len]),
        }
    }
}

#[derive(Debug, Default)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    kv_dim: usize,
    dtype: KvDtype,
    /// Per cache slot, K and V.
    keys: Vec<Pool>,
    values: Vec<Pool>,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
}

impl KvCache {
    pub fn new(model: &ModelConfig, config: KvCacheConfig) -> Result<Self> {
        if config.block_size == 0 || config.num_blocks == 0 {
            return Err(Error::InvalidInput(format!(
                "KV cache needs a positive block size and block count, got {config:?}"
            )));
        }
        let dtype = config.dtype.resolve(model.dtype);
        let kv_dim = model.kv_dim();
        let slot_len = config.num_blocks * config.block_size * kv_dim;
        let slots = model.num_kv_cache_slots();
        Ok(KvCache {
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            kv_dim,
            dtype,
            keys: (0..slots).map(|_| Pool::new(dtype, slot_len)).collect(),
            values: (0..slots).map(|_| Pool::new(dtype, slot_len)).collect(),
            free: (0..config.num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn num_slots(&self) -> usize {
        self.keys.len()
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes held by the pool (K and V, all slots).
    pub fn size_in_bytes(&self) -> usize {
        2 * self.keys.len() * self.num_blocks * self.block_size * self.kv_dim * self.dtype.size_in_bytes()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Cached positions of `seq` (0 for an unknown sequence).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    pub fn blocks_needed(&self, seq: SeqId, new_len: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        new_len.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Grows `seq` to `new_len` positions, taking blocks from the pool. All or nothing: on a
    /// full pool nothing is taken.
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, new_len);
        if needed > self.free.len() {
            return Err(Error::KvCacheFull {
                seq,
                needed,
                free: self.free.len(),
            });
        }
        let state = self.seqs.entry(seq).or_default();
        for _ in 0..needed {
            state.blocks.push(self.free.pop().expect("checked above"));
        }
        state.len = state.len.max(new_len);
        Ok(())
    }

    /// Shrinks `seq` back to `len` positions (undoing a reservation), freeing whole blocks.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        let block_size = self.block_size;
        if let Some(state) = self.seqs.get_mut(&seq) {
            let keep = len.div_ceil(block_size);
            while state.blocks.len() > keep {
                self.free.push(state.blocks.pop().expect("len checked"));
            }
            state.len = state.len.min(len);
        }
    }

    /// The block ids of `seq`, in position order (empty for an unknown sequence): what a
    /// device-side cache with the same layout is addressed by.
    pub fn block_table(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| s.blocks.as_slice())
    }

    /// Returns the blocks of `seq` to the pool.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(state) = self.seqs.remove(&seq) {
            self.free.extend(state.blocks);
        }
    }

    fn offset(&self, seq: &SeqState, pos: usize) -> usize {
        let block = seq.blocks[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.kv_dim
    }

    /// Writes K (post-RoPE) and V rows for consecutive positions starting at `start`, rounding
    /// to the cache's dtype. The positions must have been reserved.
    pub fn write(&mut self, slot: usize, seq: SeqId, start: usize, keys: &[f32], values: &[f32]) {
        let d = self.kv_dim;
        let state = &self.seqs[&seq];
        let n = keys.len() / d;
        assert_eq!(keys.len(), values.len(), "KV write of unequal K and V");
        assert!(start + n <= state.len, "KV write past the reserved length");
        // Runs of positions within one block are contiguous in the pool.
        let mut i = 0;
        while i < n {
            let pos = start + i;
            let run = (self.block_size - pos % self.block_size).min(n - i);
            let off = self.offset(state, pos);
            self.keys[slot].write(off, &keys[i * d..(i + run) * d]);
            self.values[slot].write(off, &values[i * d..(i + run) * d]);
            i += run;
        }
    }

    /// Positions `0..len` of `seq` in `slot`, block by block, read in place.
    pub fn blocks(&self, slot: usize, seq: SeqId, len: usize) -> impl Iterator<Item = KvBlock<'_>> + '_ {
        let d = self.kv_dim;
        let state = &self.seqs[&seq];
        assert!(len <= state.len, "KV read past the reserved length");
        let (keys, values) = (&self.keys[slot], &self.values[slot]);
        state
            .blocks
            .iter()
            .enumerate()
            .map(move |(b, &block)| (b * self.block_size, block as usize))
            .take_while(move |&(start, _)| start < len)
            .map(move |(start, block)| {
                let take = self.block_size.min(len - start);
                let off = block * self.block_size * d;
                KvBlock {
                    start,
                    len: take,
                    keys: keys.rows(off, take * d),
                    values: values.rows(off, take * d),
                }
            })
    }

    /// Copies positions `0..len` of `seq` into contiguous `[len, kv_dim]` f32 buffers: for
    /// checks and references, not the attention path (which reads [`KvCache::blocks`]).
    pub fn gather(&self, slot: usize, seq: SeqId, len: usize, keys: &mut Vec<f32>, values: &mut Vec<f32>) {
        keys.clear();
        values.clear();
        keys.resize(len * self.kv_dim, 0.0);
        values.resize(len * self.kv_dim, 0.0);
        for block in self.blocks(slot, seq, len) {
            let range = block.start * self.kv_dim..(block.start + block.len) * self.kv_dim;
            block.keys.widen_into(&mut keys[range.clone()]);
            block.values.widen_into(&mut values[range]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture's config from the workspace (`tests/fixtures`).
    pub(crate) fn fixture_config(name: &str) -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
            .join("config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    fn cache(model: &ModelConfig, block_size: usize, num_blocks: usize, dtype: KvDtype) -> KvCache {
        let config = KvCacheConfig {
            block_size,
            num_blocks,
            dtype: KvDtypeChoice::Is(dtype),
        };
        KvCache::new(model, config).unwrap()
    }

    /// Values exact in bf16 (an 8-bit code times a power of two), the code distinct per
    /// (seq, position), so a row read from the wrong place is caught in either dtype.
    fn row(seq: SeqId, pos: usize, d: usize, sign: f32) -> Vec<f32> {
        let code = (seq as usize * 32 + pos + 1) as f32;
        assert!(code < 256.0);
        (0..d).map(|e| sign * code * 2f32.powi(-((e % 16) as i32))).collect()
    }

    fn rows(seq: SeqId, positions: std::ops::Range<usize>, d: usize, sign: f32) -> Vec<f32> {
        positions.flat_map(|p| row(seq, p, d, sign)).collect()
    }

    #[test]
    fn bf16_writes_round_to_nearest_even() {
        let model = fixture_config("hunyuan-tiny");
        let d = model.kv_dim();
        let mut c = cache(&model, 4, 2, KvDtype::Bf16);
        c.reserve(1, 1).unwrap();
        // bf16 keeps 7 mantissa bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 (even: 1),
        // 1 + 3 * 2^-8 a tie between 1 + 2^-7 and 1 + 2^-6 (even: 1 + 2^-6), and anything
        // above a tie rounds up.
        let cases = [
            (1.0 + 2f32.powi(-8), 1.0),
            (1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)),
            (1.0 + 2f32.powi(-8) + 2f32.powi(-20), 1.0 + 2f32.powi(-7)),
            (-(1.0 + 3.0 * 2f32.powi(-8)), -(1.0 + 2f32.powi(-6))),
            (0.1, 205.0 / 2048.0),
        ];
        let mut keys = vec![0.0; d];
        let mut want = vec![0.0; d];
        for (i, &(x, rounded)) in cases.iter().enumerate() {
            keys[i] = x;
            want[i] = rounded;
        }
        let values: Vec<f32> = keys.iter().map(|v| -v).collect();
        c.write(0, 1, 0, &keys, &values);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        c.gather(0, 1, 1, &mut k, &mut v);
        assert_eq!(k, want);
        assert_eq!(v, want.iter().map(|x| -x).collect::<Vec<_>>());
        // And f32 stores exactly.
        let mut exact = cache(&model, 4, 2, KvDtype::F32);
        exact.reserve(1, 1).unwrap();
        exact.write(0, 1, 0, &keys, &values);
        exact.gather(0, 1, 1, &mut k, &mut v);
        assert_eq!((k, v), (keys, values));
    }

    #[test]
    fn writes_and_reads_cross_block_boundaries() {
        let model = fixture_config("hunyuan-tiny");
        let d = model.kv_dim();
        for dtype in [KvDtype::F32, KvDtype::Bf16] {
            let mut c = cache(&model, 4, 8, dtype);
            // 10 positions written as 3 + 5 + 2: the second write spans three blocks.
            let mut start = 0;
            for n in [3, 5, 2] {
                c.reserve(7, start + n).unwrap();
                c.write(
                    1,
                    7,
                    start,
                    &rows(7, start..start + n, d, 1.0),
                    &rows(7, start..start + n, d, -1.0),
                );
                start += n;
            }
            let spans: Vec<(usize, usize)> = c.blocks(1, 7, 10).map(|b| (b.start, b.len)).collect();
            assert_eq!(spans, [(0, 4), (4, 4), (8, 2)], "{dtype}");
            let spans: Vec<(usize, usize)> = c.blocks(1, 7, 5).map(|b| (b.start, b.len)).collect();
            assert_eq!(spans, [(0, 4), (4, 1)], "{dtype}: a read of a prefix");
            let (mut k, mut v) = (Vec::new(), Vec::new());
            c.gather(1, 7, 10, &mut k, &mut v);
            assert_eq!((k, v), (rows(7, 0..10, d, 1.0), rows(7, 0..10, d, -1.0)), "{dtype}");
        }
    }

    #[test]
    fn interleaved_sequences_keep_their_own_rows() {
        let model = fixture_config("hunyuan-tiny");
        let d = model.kv_dim();
        let mut c = cache(&model, 2, 16, KvDtype::Bf16);
        // Three sequences grow one position at a time, in turn, so their blocks interleave in
        // the pool; the second is released halfway and its blocks go to a fourth.
        for pos in 0..6 {
            for seq in [1, 2, 3] {
                if seq == 2 && pos >= 3 {
                    continue;
                }
                c.reserve(seq, pos + 1).unwrap();
                c.write(0, seq, pos, &row(seq, pos, d, 1.0), &row(seq, pos, d, -1.0));
            }
            if pos == 2 {
                c.release(2);
                c.reserve(4, 4).unwrap();
                c.write(0, 4, 0, &rows(4, 0..4, d, 1.0), &rows(4, 0..4, d, -1.0));
            }
        }
        // Blocks are handed out lowest first; 4 got the two blocks 2 gave back.
        assert_eq!(c.block_table(1), [0, 3, 6]);
        assert_eq!(c.block_table(3), [2, 5, 7]);
        assert_eq!(c.block_table(4), [4, 1]);
        for (seq, len) in [(1, 6), (3, 6), (4, 4)] {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            c.gather(0, seq, len, &mut k, &mut v);
            assert_eq!(
                (k, v),
                (rows(seq, 0..len, d, 1.0), rows(seq, 0..len, d, -1.0)),
                "seq {seq}"
            );
        }
        assert_eq!(c.free_blocks(), 16 - 3 - 3 - 2);
    }

    #[test]
    fn a_cla_group_shares_one_slot() {
        let model = fixture_config("hunyuan-large-tiny");
        assert_eq!((model.num_layers, model.cla_share_factor), (4, 2));
        let d = model.kv_dim();
        let mut c = cache(&model, 4, 4, KvDtype::Bf16);
        assert_eq!(c.num_slots(), 2);
        c.reserve(1, 3).unwrap();
        // Layer 0 writes its group's slot; layer 1 reads that slot; layers 2-3 have their own.
        let (group0, group1) = (model.kv_cache_slot(0), model.kv_cache_slot(2));
        assert_eq!((model.kv_cache_slot(1), model.kv_cache_slot(3)), (group0, group1));
        assert_ne!(group0, group1);
        c.write(group0, 1, 0, &rows(1, 0..3, d, 1.0), &rows(1, 0..3, d, -1.0));
        c.write(group1, 1, 0, &rows(1, 0..3, d, 2.0), &rows(1, 0..3, d, -2.0));
        let (mut k, mut v) = (Vec::new(), Vec::new());
        c.gather(model.kv_cache_slot(1), 1, 3, &mut k, &mut v);
        assert_eq!((k, v), (rows(1, 0..3, d, 1.0), rows(1, 0..3, d, -1.0)));
        let (mut k, mut v) = (Vec::new(), Vec::new());
        c.gather(model.kv_cache_slot(3), 1, 3, &mut k, &mut v);
        assert_eq!((k, v), (rows(1, 0..3, d, 2.0), rows(1, 0..3, d, -2.0)));
    }

    #[test]
    fn bf16_holds_half_the_bytes_of_f32() {
        let model = fixture_config("hunyuan-large-tiny");
        let (f32s, bf16s) = (cache(&model, 16, 8, KvDtype::F32), cache(&model, 16, 8, KvDtype::Bf16));
        let tokens = 16 * 8;
        assert_eq!(f32s.size_in_bytes(), tokens * model.kv_bytes_per_token(4));
        assert_eq!(bf16s.size_in_bytes(), tokens * model.kv_bytes_per_token(2));
        assert_eq!(f32s.size_in_bytes(), 2 * bf16s.size_in_bytes());
    }

    #[test]
    fn the_dtype_option_parses_and_resolves() {
        let parse = |s: &str| s.parse::<KvDtypeChoice>();
        assert_eq!(parse("auto").unwrap(), KvDtypeChoice::Auto);
        assert_eq!(parse("bf16").unwrap(), KvDtypeChoice::Is(KvDtype::Bf16));
        assert_eq!(parse("f32").unwrap(), KvDtypeChoice::Is(KvDtype::F32));
        let err = parse("fp16").unwrap_err().to_string();
        assert!(err.contains("kv cache dtype") && err.contains("fp16"), "{err}");
        for choice in ["auto", "bf16", "f32"] {
            assert_eq!(parse(choice).unwrap().to_string(), choice);
        }
        let auto = KvDtypeChoice::Auto;
        assert_eq!(auto.resolve(Some(DType::F32)), KvDtype::F32);
        assert_eq!(auto.resolve(None), KvDtype::F32);
        for torch_dtype in [DType::BF16, DType::F16] {
            assert_eq!(auto.resolve(Some(torch_dtype)), KvDtype::Bf16);
        }
        assert_eq!(
            KvDtypeChoice::Is(KvDtype::Bf16).resolve(Some(DType::F32)),
            KvDtype::Bf16
        );
        assert_eq!(KvDtypeChoice::Is(KvDtype::F32).resolve(Some(DType::BF16)), KvDtype::F32);
    }
}
