// illume-edge fused sampling kernel: one launch per decode step, one thread block per output row
// (illume_sample_*), or for launches whose rows are all greedy a block per 8,192-logit slice of a row
// (illume_greedy_*, at the end of this file).
//
// Reproduces illume_edge/runtime/sampler.py (its module docstring is the specification):
//   repetition penalty on the cond row (HF rule) -> CFG u + s*(c-u) (float32, no FMA contraction)
//   -> banned id ranges set to -inf (text decoding: grammar.text_banned_ranges)
//   -> greedy argmax (T == 0, lowest id on ties) or
//   -> top-k (radix select of the k-th largest key, ties at the k-th value kept in ascending id order)
//   -> p_i = exp((x_i - x_max) / T) in float64 over the kept set
//   -> top-p (threshold bisection on the descending-logit mass, ties at the threshold in ascending id order)
//   -> inverse-CDF draw over the kept set in ascending id order with the row's float64 uniform.
// Writes out_ids[row * out_stride + c] = range_start + index for c in [0, out_copies) (int64: the next step's
// input_ids buffer, one copy per LLM row that takes the token, e.g. a CFG pair's cond and uncond rows), or -1
// for a row with a NaN/+inf logit or no finite logit; with `positions`, advances those rows' positions and
// attention mask for the next step too (advance_step).
//
// Self-contained on purpose (no headers): compiles unchanged with nvcc and with NVRTC.
// Sizes: BLOCK threads per block; the kept set lives in shared memory when it has <= KMAX entries
// (static shared memory ~34 KiB, independent of V), else in the global workspace.

#ifndef ILLUME_BLOCK
#define ILLUME_BLOCK 512
#endif
#ifndef ILLUME_KMAX
#define ILLUME_KMAX 4096
#endif
#define BLOCK ILLUME_BLOCK
#define NWARPS (BLOCK / 32)
#define KMAX ILLUME_KMAX
#define FULL 0xffffffffu

typedef unsigned int u32;
typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------------------
// element access
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ float load_logit(const float* p, int i) { return p[i]; }
__device__ __forceinline__ float load_logit(const unsigned short* p, int i) {
    float f;
    unsigned short h = p[i];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Order-preserving map float -> u32 (larger float -> larger key); -0 is folded onto +0 so that they tie,
// as they compare equal in numpy.
__device__ __forceinline__ u32 fkey(float x) {
    u32 b = __float_as_uint(x);
    if ((b << 1) == 0u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float keyf(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Exactly numpy's float32 expressions (explicit _rn intrinsics: no FMA contraction).
__device__ __forceinline__ float penalize(float l, float p) { return l < 0.f ? __fmul_rn(l, p) : __fdiv_rn(l, p); }
__device__ __forceinline__ float combine(float c, float u, float s) { return __fadd_rn(u, __fmul_rn(s, __fsub_rn(c, u))); }

__device__ __forceinline__ double prob(float v, float xmax, double t) {
    return exp(((double)v - (double)xmax) / t);
}

// ---------------------------------------------------------------------------------------------------
// block-wide primitives (fixed summation order; mirrored by emulation.py)
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T warp_incl_scan(T v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T n = __shfl_up_sync(FULL, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// Inclusive scan over the block (Kogge-Stone inside warps, then over warp totals). sh: NWARPS+1 entries.
template <typename T>
__device__ __forceinline__ T block_incl_scan(T v, T* sh, T& total) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_incl_scan(v, lane);
    if (lane == 31) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        T s = lane < NWARPS ? sh[lane] : T(0);
        s = warp_incl_scan(s, lane);
        if (lane < NWARPS) sh[lane] = s;
    }
    __syncthreads();
    if (w > 0) v += sh[w - 1];
    total = sh[NWARPS - 1];
    __syncthreads();
    return v;
}

// Sum over the block (tree inside warps, then over warp sums); every thread gets the result.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, o);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        T s = lane < NWARPS ? sh[lane] : T(0);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(FULL, s, o);
        if (lane == 0) sh[NWARPS] = s;
    }
    __syncthreads();
    T r = sh[NWARPS];
    __syncthreads();
    return r;
}

struct Shared {
    int idx[KMAX];
    float val[KMAX];
    double dred[NWARPS + 1];
    int ired[NWARPS + 1];
    float fred[NWARPS];
    int ared[NWARPS];
    u32 hist[256];
    u32 prefix;
    int kk;
    int hit;
    int last;
};

// The block's largest value with the lowest index on ties (warps, then warp 0's lanes in order); every
// thread gets (bv, bi). fred, ared: NWARPS entries.
__device__ __forceinline__ void block_argmax(float& bv, int& bi, float* fred, int* ared) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(FULL, bv, o);
        int oi = __shfl_down_sync(FULL, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { fred[w] = bv; ared[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int q = 1; q < NWARPS; ++q)
            if (fred[q] > bv || (fred[q] == bv && ared[q] < bi)) { bv = fred[q]; bi = ared[q]; }
        fred[0] = bv; ared[0] = bi;
    }
    __syncthreads();
    bv = fred[0]; bi = ared[0];
    __syncthreads();
}

// Stage 2 for one value at index i: the NaN/+inf flag, the finite count, the max with the lowest index.
__device__ __forceinline__ void row_stat(float v, int i, float& bv, int& bi, int& nfin, int& bad) {
    if (v != v || v == __int_as_float(0x7f800000)) bad = 1;
    if (v > __int_as_float(0xff800000)) nfin++;
    if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
}

// The same over the block: every thread gets the block's (bv, bi), finite count and flag.
__device__ __forceinline__ void block_row_stats(float& bv, int& bi, int& nfin, int& bad, float* fred, int* ared,
                                                int* ired) {
    block_argmax(bv, bi, fred, ared);
    nfin = block_sum(nfin, ired);
    bad = block_sum(bad, ired);
}

// ---------------------------------------------------------------------------------------------------
// the kernel
// ---------------------------------------------------------------------------------------------------
// Output row r's inputs: its cond logits row, its uncond row (the cond row's address when it has none), the
// CFG scale and whether CFG applies, the repetition penalty.
template <typename L>
struct RowInputs {
    const L* cond;
    const L* uncond;
    float cfg, penalty;
    bool use_cfg;
};

template <typename L>
__device__ __forceinline__ RowInputs<L> row_inputs(const L* logits, long long row_stride, int col0,
                                                   const int* cond_row, const int* uncond_row,
                                                   const double* params, int r) {
    const int ur = uncond_row ? uncond_row[r] : -1;
    RowInputs<L> in;
    in.cfg = (float)params[4 * r + 2];
    in.penalty = (float)params[4 * r + 3];
    in.cond = logits + (long long)cond_row[r] * row_stride + col0;
    in.uncond = logits + (long long)(ur < 0 ? 0 : ur) * row_stride + col0;
    in.use_cfg = ur >= 0 && in.cfg != 1.0f;
    return in;
}

// The row's token into its out_copies slots (thread 0 only).
__device__ __forceinline__ void write_id(long long* out, int out_copies, long long id) {
    for (int c = 0; c < out_copies; ++c) out[c] = id;
}

// The next decode step's inputs, advanced on the device for each LLM row that takes the row's token (thread 0
// only, after write_id): positions[row] += 1, then mask[row * mask_stride + slot] = 1, where slot is
// mask_slot when >= 0 (rows that end together: one slot for all) and else the row's new position (right
// padding: a row's positions are its slots). The host then skips its two writes of them (llm_runner.py,
// StepBuffers.advanced). positions == nullptr, or a row flagged -1: nothing is advanced.
__device__ __forceinline__ void advance_step(const long long* out, int out_copies, long long first_row,
                                             long long* positions, long long* mask, long long mask_stride,
                                             long long mask_slot) {
    if (positions == nullptr || out[0] < 0) return;
    for (int c = 0; c < out_copies; ++c) {
        const long long row = first_row + c;
        const long long pos = ++positions[row];
        mask[row * mask_stride + (mask_slot >= 0 ? mask_slot : pos)] = 1;
    }
}

template <typename L>
__device__ __forceinline__ void sample_row(
    const L* __restrict__ logits, long long row_stride, int col0, int V,
    const int* __restrict__ cond_row, const int* __restrict__ uncond_row,
    const double* __restrict__ params, const int* __restrict__ top_ks, const double* __restrict__ uniforms,
    const int* __restrict__ pen_offsets, const int* __restrict__ pen_ids, const int* __restrict__ bans,
    int n_bans, long long range_start, long long* __restrict__ out_ids, long long out_stride, int out_copies,
    float* __restrict__ workspace, Shared& sm)
{
    const int r = blockIdx.x, tid = threadIdx.x;
    const double temperature = params[4 * r + 0];
    const double top_p = params[4 * r + 1];
    const RowInputs<L> in = row_inputs(logits, row_stride, col0, cond_row, uncond_row, params, r);
    const float cfg = in.cfg, penalty = in.penalty;
    const L *c_row = in.cond, *u_row = in.uncond;
    const bool use_cfg = in.use_cfg;
    float* x = workspace + (long long)r * 3 * V;        // combined logits [V]
    int* g_idx = (int*)(x + V);                         // kept set when it exceeds KMAX: ids [V]
    float* g_val = x + 2 * (long long)V;                // ... and logits [V]

    // 1) combined logits into the workspace, then the repetition penalty (recomputed from c, idempotent).
    for (int i = tid; i < V; i += BLOCK) {
        float c = load_logit(c_row, i);
        x[i] = use_cfg ? combine(c, load_logit(u_row, i), cfg) : c;
    }
    __syncthreads();
    if (pen_offsets && penalty != 1.0f) {
        for (int j = pen_offsets[r] + tid; j < pen_offsets[r + 1]; j += BLOCK) {
            long long local = (long long)pen_ids[j] - range_start;
            if (local >= 0 && local < V) {
                int i = (int)local;
                float c = penalize(load_logit(c_row, i), penalty);
                x[i] = use_cfg ? combine(c, load_logit(u_row, i), cfg) : c;
            }
        }
        __syncthreads();
    }
    // 1b) banned id ranges (global [start, stop) pairs, shared by every row: text decoding bans codes, level
    //     tags, dead head rows) -> -inf. After the penalty, which recomputes its ids from the input.
    if (n_bans > 0) {
        for (int q = 0; q < n_bans; ++q) {
            const long long lo = max((long long)bans[2 * q] - range_start, 0LL);
            const long long hi = min((long long)bans[2 * q + 1] - range_start, (long long)V);
            for (long long i = lo + tid; i < hi; i += BLOCK) x[i] = __int_as_float(0xff800000);
        }
        __syncthreads();
    }

    // 2) row statistics: max with lowest arg, finite count, bad flag.
    float bv = __int_as_float(0xff800000);  // -inf
    int bi = 0x7fffffff, nfin = 0, bad = 0;
    for (int i = tid; i < V; i += BLOCK) {
        float v = x[i];
        row_stat(v, i, bv, bi, nfin, bad);
    }
    block_row_stats(bv, bi, nfin, bad, sm.fred, sm.ared, sm.ired);
    long long* out = out_ids + (long long)r * out_stride;
    if (bad || nfin == 0) { if (tid == 0) write_id(out, out_copies, -1); return; }
    if (temperature == 0.0) { if (tid == 0) write_id(out, out_copies, range_start + bi); return; }  // greedy
    const float xmax = bv;

    // 3) top-k: radix select (8-bit digits, MSB first) of the k-th largest key; ties kept by ascending id.
    const int k = top_ks[r];
    const bool topk = k > 0 && k < V && nfin > k;
    u32 kth = 0u;
    int need = 0;
    if (topk) {
        if (tid == 0) { sm.prefix = 0u; sm.kk = k; }
        u32 mask = 0u;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += BLOCK) sm.hist[b] = 0u;
            __syncthreads();
            const u32 prefix = sm.prefix;
            for (int i = tid; i < V; i += BLOCK) {
                u32 key = fkey(x[i]);
                if ((key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                int kk = sm.kk, cum = 0, d = 255;
                for (; d > 0; --d) {
                    if (cum + (int)sm.hist[d] >= kk) break;
                    cum += (int)sm.hist[d];
                }
                sm.kk = kk - cum;
                sm.prefix = prefix | ((u32)d << shift);
            }
            mask |= 255u << shift;
            __syncthreads();
        }
        kth = sm.prefix;
        need = sm.kk;  // entries == kth to keep (those with the lowest ids)
        __syncthreads();
    }

    // 4) compact the kept set (ascending id) into shared memory, or the workspace when larger than KMAX.
    const int n = topk ? k : nfin;
    int* s_idx = n <= KMAX ? sm.idx : g_idx;
    float* s_val = n <= KMAX ? sm.val : g_val;
    {
        int eq_carry = 0, pos_carry = 0, tot;
        for (int base = 0; base < V; base += BLOCK) {
            const int i = base + tid;
            const float v = i < V ? x[i] : __int_as_float(0xff800000);
            const u32 key = fkey(v);
            int keep;
            if (topk) {
                const int eq = (i < V && key == kth) ? 1 : 0;
                const int eq_incl = block_incl_scan(eq, sm.ired, tot);
                keep = (i < V) && (key > kth || (eq && eq_carry + eq_incl - 1 < need));
                eq_carry += tot;
            } else {
                keep = v > __int_as_float(0xff800000);
            }
            const int pos = pos_carry + block_incl_scan(keep, sm.ired, tot) - keep;
            if (keep) { s_idx[pos] = i; s_val[pos] = v; }
            pos_carry += tot;
        }
        __syncthreads();
    }

    // 5) top-p over the kept set: largest key t with mass(key >= t) >= top_p * total (bisection), then the
    //    ties at t in ascending id order while the mass before them is < top_p * total.
    const double T = temperature;
    u32 thr = 0u;
    int need_p = 0x7fffffff;
    if (top_p < 1.0 && n > 1) {
        double carry = 0.0, tot;
        for (int base = 0; base < n; base += BLOCK) {
            const int i = base + tid;
            block_incl_scan(i < n ? prob(s_val[i], xmax, T) : 0.0, sm.dred, tot);
            carry += tot;
        }
        const double P = top_p * carry;
        u64 lo = 0ull, hi = 0x100000000ull;
        double mass_hi = 0.0;
        while (hi - lo > 1ull) {
            const u64 mid = (lo + hi) >> 1;
            double m = 0.0;
            for (int i = tid; i < n; i += BLOCK)
                if ((u64)fkey(s_val[i]) >= mid) m += prob(s_val[i], xmax, T);
            m = block_sum(m, sm.dred);
            if (m >= P) lo = mid; else { hi = mid; mass_hi = m; }
        }
        thr = (u32)lo;
        int ties = 0;
        for (int i = tid; i < n; i += BLOCK) ties += fkey(s_val[i]) == thr;
        ties = block_sum(ties, sm.ired);
        const double pv = prob(keyf(thr), xmax, T);
        int m = 1;
        if (pv > 0.0) {
            double q = ceil((P - mass_hi) / pv);
            m = q < 1.0 ? 1 : (q > (double)ties ? ties : (int)q);
            while (m > 1 && mass_hi + (double)(m - 1) * pv >= P) --m;
            while (m < ties && mass_hi + (double)m * pv < P) ++m;
        }
        need_p = m < 1 ? 1 : m;
    }

    // 6) the draw: two ordered passes over the kept set in ascending id order: the total, then the first
    //    position whose running sum (carry + in-chunk inclusive scan, float64) exceeds u * total.
    const double u = uniforms[r];
    double total = 0.0;
    if (tid == 0) { sm.hit = 0x7fffffff; sm.last = -1; }
    __syncthreads();
    for (int pass = 0; pass < 2; ++pass) {
        const double target = u * total;
        double carry = 0.0, dtot;
        int eq_carry = 0, itot;
        for (int base = 0; base < n; base += BLOCK) {
            const int i = base + tid;
            const float v = i < n ? s_val[i] : __int_as_float(0xff800000);
            const u32 key = fkey(v);
            const int eq = (i < n && key == thr) ? 1 : 0;
            const int eq_incl = block_incl_scan(eq, sm.ired, itot);
            const bool keep = i < n && (key > thr || (eq && eq_carry + eq_incl - 1 < need_p));
            eq_carry += itot;
            const double incl = block_incl_scan(keep ? prob(v, xmax, T) : 0.0, sm.dred, dtot);
            if (pass == 0) {
                if (keep) atomicMax(&sm.last, i);
            } else if (keep && carry + incl > target) {
                atomicMin(&sm.hit, i);
            }
            carry += dtot;
            if (pass == 1) {
                __syncthreads();
                if (sm.hit != 0x7fffffff) break;
            }
        }
        total = carry;
    }
    if (tid == 0) {
        const int j = sm.hit != 0x7fffffff ? sm.hit : sm.last;
        write_id(out, out_copies, range_start + s_idx[j]);
    }
}

#define ILLUME_ARGS(L)                                                                                     \
    const L* __restrict__ logits, long long row_stride, int col0, int V,                                 \
    const int* __restrict__ cond_row, const int* __restrict__ uncond_row,                                \
    const double* __restrict__ params, const int* __restrict__ top_ks,                                    \
    const double* __restrict__ uniforms, const int* __restrict__ pen_offsets,                             \
    const int* __restrict__ pen_ids, const int* __restrict__ bans, int n_bans, long long range_start,    \
    long long* __restrict__ out_ids, long long out_stride, int out_copies, float* __restrict__ workspace,  \
    long long* __restrict__ positions, long long* __restrict__ mask, long long mask_stride, long long mask_slot

#define ILLUME_CALL                                                                                        \
    sample_row(logits, row_stride, col0, V, cond_row, uncond_row, params, top_ks, uniforms, pen_offsets,   \
               pen_ids, bans, n_bans, range_start, out_ids, out_stride, out_copies, workspace, sm);        \
    if (threadIdx.x == 0)                                                                                  \
        advance_step(out_ids + (long long)blockIdx.x * out_stride, out_copies,                             \
                     (long long)blockIdx.x * out_stride, positions, mask, mask_stride, mask_slot)

// fp32 logits
extern "C" __global__ void __launch_bounds__(BLOCK) illume_sample_f32(ILLUME_ARGS(float)) {
    __shared__ Shared sm;
    ILLUME_CALL;
}

// fp16 logits (raw IEEE binary16 bits)
extern "C" __global__ void __launch_bounds__(BLOCK) illume_sample_f16(ILLUME_ARGS(unsigned short)) {
    __shared__ Shared sm;
    ILLUME_CALL;
}

// ---------------------------------------------------------------------------------------------------
// greedy over many blocks
// ---------------------------------------------------------------------------------------------------
// When every row of a launch is greedy (T == 0; the host picks these entry points), each row's V logits are
// cut into slices of GREEDY_SLICE, one block each (grid: rows x slices), instead of one block per row: a
// 151,704-logit text row through one SM took 43 us a step on an H100 (docs/gpu.md). Each block takes its
// slice through stages 1, 1b and 2 of the module comment element by element (the penalty from a bitmap of
// the row's penalized ids in the slice, the bans, then the max with the lowest id, the NaN/+inf flag and the
// finite count), and writes them to the greedy workspace. The last block of the row to finish (a counter per
// row in that workspace, which it resets to 0 for the next launch) reduces the slices in id order and writes
// the token, -1 for a bad row, as sample_row does, then advances the step.
// Greedy workspace (`workspace` here; zeroed once when allocated): int counters[GREEDY_MAX_ROWS], then per
// row and slice four 4-byte words: max value (float), its index, bad, finite count. The counters' region is
// fixed, so that a launch with more rows or slices than the last finds zeros there, never old slice results.
#ifndef ILLUME_GREEDY_SLICE
#define ILLUME_GREEDY_SLICE (BLOCK * 16)
#endif
#define GREEDY_SLICE ILLUME_GREEDY_SLICE
#ifndef ILLUME_GREEDY_MAX_ROWS
#define ILLUME_GREEDY_MAX_ROWS 1024
#endif
#define GREEDY_MAX_ROWS ILLUME_GREEDY_MAX_ROWS

struct GreedyShared {
    u32 pen[GREEDY_SLICE / 32];  // the row's penalized ids in the slice, one bit each
    float fred[NWARPS];
    int ared[NWARPS];
    int ired[NWARPS + 1];
    int last;
};

template <typename L>
__device__ __forceinline__ void greedy_slice(ILLUME_ARGS(L), GreedyShared& sm) {
    const int r = blockIdx.x, g = blockIdx.y, G = gridDim.y, tid = threadIdx.x;
    const int lo = g * GREEDY_SLICE, hi = min(V, lo + GREEDY_SLICE);
    const RowInputs<L> in = row_inputs(logits, row_stride, col0, cond_row, uncond_row, params, r);
    const float cfg = in.cfg, penalty = in.penalty;
    const L *c_row = in.cond, *u_row = in.uncond;
    const bool use_cfg = in.use_cfg;
    int* counters = (int*)workspace;
    int* part = (int*)workspace + GREEDY_MAX_ROWS + 4 * ((long long)r * G + g);

    for (int q = tid; q < GREEDY_SLICE / 32; q += BLOCK) sm.pen[q] = 0u;
    __syncthreads();
    const bool pen = pen_offsets && penalty != 1.0f;
    if (pen) {
        for (int j = pen_offsets[r] + tid; j < pen_offsets[r + 1]; j += BLOCK) {
            const long long local = (long long)pen_ids[j] - range_start;
            if (local >= lo && local < hi) atomicOr(&sm.pen[(local - lo) >> 5], 1u << ((local - lo) & 31));
        }
        __syncthreads();
    }
    float bv = __int_as_float(0xff800000);  // -inf
    int bi = 0x7fffffff, nfin = 0, bad = 0;
    for (int i = lo + tid; i < hi; i += BLOCK) {
        float c = load_logit(c_row, i);
        if (pen && ((sm.pen[(i - lo) >> 5] >> ((i - lo) & 31)) & 1u)) c = penalize(c, penalty);
        float v = use_cfg ? combine(c, load_logit(u_row, i), cfg) : c;
        for (int q = 0; q < n_bans; ++q) {
            const long long gid = range_start + i;
            if (gid >= (long long)bans[2 * q] && gid < (long long)bans[2 * q + 1]) v = __int_as_float(0xff800000);
        }
        row_stat(v, i, bv, bi, nfin, bad);
    }
    block_row_stats(bv, bi, nfin, bad, sm.fred, sm.ared, sm.ired);
    if (tid == 0) {
        part[0] = __float_as_int(bv); part[1] = bi; part[2] = bad; part[3] = nfin;
        __threadfence();  // the slice's result is visible to the row's last block before the count is
        sm.last = atomicAdd(&counters[r], 1) == G - 1;
    }
    __syncthreads();
    if (!sm.last || tid != 0) return;
    __threadfence();
    const int* row_part = (const int*)workspace + GREEDY_MAX_ROWS + 4 * (long long)r * G;
    float best = __int_as_float(0xff800000);
    int best_i = 0x7fffffff, any_bad = 0, fin = 0;
    for (int q = 0; q < G; ++q) {  // slices in id order: a later slice wins only with a larger value
        const float v = __int_as_float(((volatile const int*)row_part)[4 * q]);
        const int vi = ((volatile const int*)row_part)[4 * q + 1];
        any_bad |= ((volatile const int*)row_part)[4 * q + 2];
        fin += ((volatile const int*)row_part)[4 * q + 3];
        if (v > best || (v == best && vi < best_i)) { best = v; best_i = vi; }
    }
    counters[r] = 0;  // for the next launch
    long long* out = out_ids + (long long)r * out_stride;
    write_id(out, out_copies, any_bad || fin == 0 ? -1 : range_start + best_i);
    advance_step(out, out_copies, (long long)r * out_stride, positions, mask, mask_stride, mask_slot);
}

extern "C" __global__ void __launch_bounds__(BLOCK) illume_greedy_f32(ILLUME_ARGS(float)) {
    __shared__ GreedyShared sm;
    greedy_slice(logits, row_stride, col0, V, cond_row, uncond_row, params, top_ks, uniforms, pen_offsets,
                 pen_ids, bans, n_bans, range_start, out_ids, out_stride, out_copies, workspace, positions, mask,
                 mask_stride, mask_slot, sm);
}

extern "C" __global__ void __launch_bounds__(BLOCK) illume_greedy_f16(ILLUME_ARGS(unsigned short)) {
    __shared__ GreedyShared sm;
    greedy_slice(logits, row_stride, col0, V, cond_row, uncond_row, params, top_ks, uniforms, pen_offsets,
                 pen_ids, bans, n_bans, range_start, out_ids, out_stride, out_copies, workspace, positions, mask,
                 mask_stride, mask_slot, sm);
}
