// NVRTC kernels of the CUDA backend. Compiled at run time (no CUDA headers needed: bf16 travels as
// its 16 bits in `unsigned short`), checked in CI by compiling them with NVRTC for sm_80 and sm_90
// (`model/src/cuda/gpu/source.rs`). Storage is bf16 (FP8 weights stay one byte per weight and are
// widened to bf16 scratch by fp8_e4m3_to_bf16 before a product), all arithmetic f32, as the CPU
// kernels do.
//
// Each kernel mirrors one CPU function; the GPU tests compare them (tests/tests/gpu.rs):
//   rms_norm        <- kernels::rms_norm
//   rope_qk_norm    <- Rope::apply, then kernels::rms_norm_in_place per head
//   kv_write        <- KvCache::write
//   paged_attention <- attention::attend over KvCache::gather with the key norm applied on read
//   router_topk     <- Router::route
//   swiglu          <- kernels::silu_mul
//   combine_rows    <- the weighted combine of LocalExperts::compute (assignment order)
//   fp8_e4m3_to_bf16 <- kernels::widen_fp8 (Fp8Data::row_to_f32), then rounded to bf16

typedef unsigned short bf16_t;
typedef unsigned int u32;

__device__ __forceinline__ float bf2f(bf16_t b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even, NaN kept a NaN.
__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Sum of `v` over the block. blockDim.x must be a multiple of 32 (every launch below uses 32,
// 64, 128 or 256 threads). Every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (blockDim.x >> 5) ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xFFFFFFFFu, t, o);
        if (lane == 0) total = t;
    }
    __syncthreads();
    const float r = total;
    __syncthreads();  // `partial` and `total` are reused by the next call
    return r;
}

// out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps); one block per row.
extern "C" __global__ void rms_norm(const bf16_t* x, const float* w, bf16_t* out, u32 cols, float eps) {
    const bf16_t* xr = x + (size_t)blockIdx.x * cols;
    bf16_t* orow = out + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = bf2f(xr[c]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)cols + eps);
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) orow[c] = f2bf(w[c] * (bf2f(xr[c]) * inv));
}

// In place on x [rows, heads, head_dim]: NeoX RoPE at positions pos[row], then (when norm_w is
// not null) RMS norm over each head. One block per (row, head); dynamic shared memory holds one
// head in f32 (head_dim * 4 bytes) so the norm sees the rotated values before any rounding.
extern "C" __global__ void rope_qk_norm(bf16_t* x, const u32* pos, const float* inv_freq, const float* norm_w,
                                        u32 heads, u32 head_dim, float eps) {
    extern __shared__ float head[];
    const u32 row = blockIdx.x / heads;
    bf16_t* h = x + (size_t)blockIdx.x * head_dim;
    const u32 half = head_dim / 2;
    const float p = (float)pos[row];
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
        const float angle = p * inv_freq[i];
        const float c = cosf(angle), s = sinf(angle);
        const float a = bf2f(h[i]), b = bf2f(h[i + half]);
        const float r1 = a * c - b * s, r2 = b * c + a * s;
        head[i] = r1;
        head[i + half] = r2;
        ss += r1 * r1 + r2 * r2;
    }
    float inv = 1.0f;
    if (norm_w != 0) inv = rsqrtf(block_sum(ss) / (float)head_dim + eps);
    __syncthreads();
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        const float v = head[d];
        h[d] = f2bf(norm_w != 0 ? norm_w[d] * (v * inv) : v);
    }
}

// Writes K and V rows [rows, kv_dim] to their cache positions: slot[row] is the physical
// position (block * block_size + offset). One block per row.
extern "C" __global__ void kv_write(const bf16_t* k, const bf16_t* v, const u32* slot, bf16_t* k_cache,
                                    bf16_t* v_cache, u32 kv_dim) {
    const size_t src = (size_t)blockIdx.x * kv_dim, dst = (size_t)slot[blockIdx.x] * kv_dim;
    for (u32 d = threadIdx.x; d < kv_dim; d += blockDim.x) {
        k_cache[dst + d] = k[src + d];
        v_cache[dst + d] = v[src + d];
    }
}

// Causal GQA attention over the paged cache, a simple correct kernel: one block per (row, head),
// thread d owns output dimension d (blockDim.x = head_dim rounded up to 32), one pass over the
// visible keys with an online softmax. Row r sees positions 0..=pos[r] of its sequence, whose
// blocks are table[table_start[r]..]. Keys are cached before their norm (CLA shares a slot
// between layers with different key norms), so k_norm (nullable) is applied here as they are
// read: score = (q . (k * w)) * rsqrt(mean(k^2) + eps) / sqrt(head_dim).
extern "C" __global__ void paged_attention(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                           const u32* table, const u32* table_start, const u32* pos,
                                           const float* k_norm, bf16_t* out, u32 heads, u32 kv_heads,
                                           u32 head_dim, u32 block_size, float eps) {
    const u32 row = blockIdx.x / heads, h = blockIdx.x % heads;
    const u32 g = h / (heads / kv_heads);
    const u32 d = threadIdx.x;
    const bool mine = d < head_dim;
    const u32 q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    const float qd = mine ? bf2f(q[(size_t)row * q_dim + h * head_dim + d]) : 0.0f;
    const float wd = (mine && k_norm != 0) ? k_norm[d] : 1.0f;
    const float scale = rsqrtf((float)head_dim);
    const u32* blocks = table + table_start[row];
    const u32 visible = pos[row] + 1;
    float m = -__int_as_float(0x7F800000), l = 0.0f, acc = 0.0f;
    for (u32 j = 0; j < visible; ++j) {
        const size_t at = ((size_t)blocks[j / block_size] * block_size + j % block_size) * kv_dim + g * head_dim + d;
        const float kd = mine ? bf2f(k_cache[at]) : 0.0f;
        const float vd = mine ? bf2f(v_cache[at]) : 0.0f;
        float s = block_sum(qd * kd * wd) * scale;
        if (k_norm != 0) s *= rsqrtf(block_sum(kd * kd) / (float)head_dim + eps);
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new), p = expf(s - m_new);
        l = l * correction + p;
        acc = acc * correction + p * vd;
        m = m_new;
    }
    if (mine) out[(size_t)row * q_dim + h * head_dim + d] = f2bf(acc / l);
}

// Softmax over all experts, top-k (descending; the lower index first on ties), weights
// renormalised over the k when `renormalize`. One thread per row; k and the expert count are small.
extern "C" __global__ void router_topk(const float* logits, u32* experts, float* weights, u32 rows, u32 num_experts,
                                       u32 k, u32 renormalize) {
    const u32 row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* lr = logits + (size_t)row * num_experts;
    float mx = -__int_as_float(0x7F800000);
    for (u32 e = 0; e < num_experts; ++e) mx = fmaxf(mx, lr[e]);
    float sum = 0.0f;
    for (u32 e = 0; e < num_experts; ++e) sum += expf(lr[e] - mx);
    u32* er = experts + (size_t)row * k;
    float* wr = weights + (size_t)row * k;
    float picked = 0.0f;
    for (u32 i = 0; i < k; ++i) {
        // The largest logit not taken yet: repeated selection, k passes over the experts.
        int best = -1;
        for (u32 e = 0; e < num_experts; ++e) {
            bool taken = false;
            for (u32 t = 0; t < i; ++t) taken |= er[t] == e;
            if (!taken && (best < 0 || lr[e] > lr[best])) best = (int)e;
        }
        er[i] = (u32)best;
        wr[i] = expf(lr[best] - mx) / sum;
        picked += wr[i];
    }
    if (renormalize)
        for (u32 i = 0; i < k; ++i) wr[i] /= picked;
}

// out[i] = silu(gate[i]) * up[i]
extern "C" __global__ void swiglu(const bf16_t* gate, const bf16_t* up, bf16_t* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = bf2f(gate[i]);
        out[i] = f2bf(g / (1.0f + expf(-g)) * bf2f(up[i]));
    }
}

// out[r] = sum over the assignments of row r, in assignment order, of weights[j] * y[slots[j]]:
// one block per row, `starts[r]..starts[r + 1]` its assignments (planned on the host by
// cuda::combine). The order is the CPU's (LocalExperts::compute), so the two differ only by
// the bf16 expert outputs, never by summation order.
extern "C" __global__ void combine_rows(const bf16_t* y, const u32* starts, const u32* slots, const float* weights,
                                        float* out, u32 num_rows, u32 hidden) {
    if (blockIdx.x >= num_rows) return;
    const u32 r = blockIdx.x;
    for (u32 c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = 0.0f;
        // Product and sum rounded separately (no fused multiply-add), as the CPU's axpy does.
        for (u32 j = starts[r]; j < starts[r + 1]; ++j)
            acc = __fadd_rn(acc, __fmul_rn(weights[j], bf2f(y[(size_t)slots[j] * hidden + c])));
        out[(size_t)r * hidden + c] = acc;
    }
}

// One float8 e4m3fn code (bias 7, 3 mantissa bits, exponent field 0 subnormal: m * 2^-9), as
// fp8::e4m3_to_f32 decodes it: a normal code's exponent and mantissa bits moved into place and
// the exponent rebiased (+120); a subnormal's integer times 2^-9 (exact). The NaN codes (0x7f,
// 0xff) are refused when the weight is loaded (quant::load_fp8), so none reaches this.
__device__ __forceinline__ float e4m3_to_f32(unsigned char code) {
    const u32 c = code, sign = (c & 0x80u) << 24, mag = c & 0x7Fu;
    if (mag < 8u) return __uint_as_float(sign | __float_as_uint((float)mag * (1.0f / 512.0f)));
    return __uint_as_float(sign | ((mag << 20) + (120u << 23)));
}

// Side of the square blocks of block-wise FP8 scales (fp8::BLOCK).
#define FP8_BLOCK 128u

// An FP8 weight [rows, cols] (row-major codes) widened to bf16: out[r, c] = bf16(float(q[r, c]) *
// scale), the product in f32 (as kernels::widen_fp8 computes it) rounded once to nearest even
// (as the host's bf16 rounding does). The scale is scales[0] when block_cols is 0 (per tensor),
// else scales[(r / 128) * block_cols + c / 128] (cuda::fp8_widen::scale_index). Blocks stride
// over the rows, a block's threads over a row's columns (coalesced, no 64-bit division).
extern "C" __global__ void fp8_e4m3_to_bf16(const unsigned char* codes, const float* scales, bf16_t* out, u32 rows,
                                            u32 cols, u32 block_cols) {
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const size_t row = (size_t)r * cols;
        const float* row_scales = scales + (size_t)(r / FP8_BLOCK) * block_cols;
        for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float s = block_cols == 0u ? scales[0] : row_scales[c / FP8_BLOCK];
            out[row + c] = f2bf(__fmul_rn(e4m3_to_f32(codes[row + c]), s));
        }
    }
}
