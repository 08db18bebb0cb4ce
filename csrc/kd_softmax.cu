// CUDA backend of kd_loss (fused KD softmax). Semantics: docs/kd_ops.md. The algorithm mirrors the
// Triton kernels in kernels/kd_softmax.py (and the PyTorch reference in
// fastdistill/reference/kd_softmax.py): one CTA per row, the vocabulary streamed in tiles, online
// max / sum-exp of student and teacher together, all statistics fp32.
//
//   1. kd_stats_kernel   grid (N): lse of both models (and the untempered student lse for CE when
//      T != 1), the label logit, validity, and for fkl / rkl the divergence itself through the
//      rescaled running sums A = Σ e^{u_t − m_t}((u_t − m_t) − (u_s − m_s)) (fkl; rkl with the roles
//      swapped), each log-ratio in its model's own max frame and re-based when a max moves (frame_shift):
//      D = A/l_t + ln(l_s / l_t) (fkl), A/l_s + ln(l_t / l_s) (rkl), free of the models' logit offset.
//   2. kd_div_kernel     grid (N), jsd / skl / srkl / tvd only: with both lse known, D and the row
//      sum S = Σ q·g that the softmax Jacobian of their gradient needs.
//   3. kd_reduce_kernel  one CTA: the valid-row count and the reduced loss, fixed order.
//   4. kd_grad_kernel    grid (N): the gradient w.r.t. the raw student logits, written in the
//      student dtype (into the logits themselves for inplace_grad).
// Per-row state (fp32, [N, 11]): lse_s, lse_t, lse_s1, D, S, contrib, ce, valid, lse_s_lo, lse_t_lo, lse_s1_lo
// (the logsumexps as hi + lo, log-probs formed as (u − hi) − lo: Triton's _lse2). The float
// parameters come from a device fp32 tensor [10]: inv_T, inv_Tt, alpha, t2, logit_scale, softcap
// (1 when off), beta, skew, 1 − beta, 1 − skew (KDPlan.kernel_params()).
//
// Online softmax: each thread keeps its own running (max, sum-exp) over the elements it owns and
// rescales once per loop iteration (UNR·VEC elements), like Triton's once per BLOCK_V; the
// thread states are merged at the end by a fixed shuffle tree and then in warp order. The max
// of an all −inf prefix stays −inf and every exponent is taken against safe(m) (0 for −inf), so
// rows that are all −inf give lse = −inf (an invalid row), never NaN; a NaN logit makes its
// model's lse NaN and the row stays valid, so its loss is NaN (as in Triton).
//
// Where this departs from the Triton code without changing a result: logit_scale is always
// applied (×1 is exact); the label logit is read once by thread 0 instead of a masked row sum;
// labels are compared as int64 (Triton truncates to int32 first); the gradient pass writes zeros
// to invalid rows without reading their logits (what tl.where(ok, gz, 0) stores).
//
// Determinism: no atomics; every reduction has a fixed order, so repeated runs are bitwise
// identical. Torch-free: raw device pointers and a cudaStream_t; the pybind11 glue is
// bindings.cpp. Student and teacher share one dtype (float, __half, __nv_bfloat16). Math goes
// through explicit intrinsics so that results do not depend on --use_fast_math: __expf /
// __fdividef in the streaming loops (ex2.approx, as Triton's tl.exp), IEEE __fdiv_rn and a
// double-precision log for the once-per-row quantities.
#include "fd_common.cuh"  // DT<T>, word, warp_sum, aligned16, FD_LAUNCH

namespace fd_kd {
using namespace fd;

constexpr int DIV_FKL = 0, DIV_RKL = 1, DIV_JSD = 2, DIV_SKL = 3, DIV_SRKL = 4, DIV_TVD = 5;
constexpr int SDIV_NONE = 2;  // the stats pass of the 3-pass divergences: no running divergence sum
constexpr int NSTATE = 11;
constexpr int MAX_THREADS = 256;  // per row CTA; fewer (a power of two >= 32) for short rows
// CTAs of 256 threads per SM: 4 (<= 64 registers) on the 16-byte path, 3 (<= 80) on the scalar path
template <bool VECTOR>
constexpr int MIN_BLOCKS = VECTOR ? 4 : 3;
// tiles per loop iteration: the 16-byte path keeps 2 x (student + teacher) vector loads in flight;
// the scalar path one tile (VEC independent loads per tensor; more would spill)
template <bool VECTOR>
constexpr int UNR = VECTOR ? 2 : 1;
constexpr int MAX_WARPS = MAX_THREADS / 32;
#ifndef FD_KD_RED_THREADS  // the reduce is written in terms of blockDim; the CPU emulation uses fewer
#define FD_KD_RED_THREADS 1024
#endif
constexpr int RED_THREADS = FD_KD_RED_THREADS;
static_assert(RED_THREADS % 32 == 0 && RED_THREADS <= 1024, "FD_KD_RED_THREADS: whole warps, at most 1024");

// runtime switches (uniform over the grid, so the branches cost no divergence)
constexpr int F_LABELS = 1, F_LAB64 = 2, F_MASK = 4, F_W = 8, F_CE = 16, F_CE_SEP = 32, F_SOFTCAP = 64;

struct KdArgs {
  const void* s;        // student logits [N, V] (row stride s_stride, unit column stride; see RowMap)
  const void* t;        // teacher logits [N, Vt]
  const void* labels;   // int32 / int64 [N] (F_LABELS, F_LAB64) or null
  const uint8_t* mask;  // [N] or null
  const float* w;       // [N] or null
  const float* prm;     // [10]
  float* st;            // [N, 11]
  const float* factor;  // grad: [1]
  const float* go;      // grad: upstream gradient [1] or [N] ...
  int64_t go_stride;    // ... with stride 0 or 1
  void* out;            // grad: [N, V] in the student dtype (may alias s)
  int64_t s_stride, t_stride, o_stride, ignore_index;
  // rows R a group, group-major: row r starts at (r / R)·gstride + (r % R)·stride (the shifted logits[:, :-1]
  // of [B, T, V] logits, read in place); a plain [N, V] matrix is one group (R = N)
  int64_t rows_per_group, s_gstride, t_gstride, o_gstride;
  int V, Vt, flags;
};

__device__ __forceinline__ int64_t row_offset(const KdArgs& a, int64_t row, int64_t stride, int64_t gstride) {
  return (row / a.rows_per_group) * gstride + (row % a.rows_per_group) * stride;
}

// ----------------------------------------------------------------------------- per-thread tiles
// A tile is the blockDim.x·VEC columns [chunk, chunk + blockDim.x·VEC) of a row; each thread owns
// VEC of them. Vectorised: the VEC consecutive columns at chunk + tid·VEC (one 16-byte load; needs
// the column limit, the row stride and the pointer 16-byte aligned, so a vector is either wholly
// inside the row or wholly past its limit). Scalar: chunk + tid + j·blockDim.x (coalesced across
// the warp). Columns at or past the limit read as 0; the callers mask them to −inf.
template <typename T, bool VECTOR>
__device__ __forceinline__ int col_of(int chunk, int j) {
  return VECTOR ? chunk + (int)threadIdx.x * DT<T>::kVec + j : chunk + (int)threadIdx.x + j * (int)blockDim.x;
}

template <typename T, bool VECTOR, bool NC>
struct Frag;  // VEC elements of one row, as loaded by this thread

template <typename T, bool NC>
struct Frag<T, true, NC> {
  uint4 raw;
  __device__ void load(const T* row, int chunk, int lim) {
    const int o = col_of<T, true>(chunk, 0);
    const uint4* p = reinterpret_cast<const uint4*>(row + o);
    if (o < lim) {
      if constexpr (NC) raw = __ldg(p);
      else raw = *p;
    } else {
      raw = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  __device__ float get(int j) const { return DT<T>::elem(raw, j); }
};

template <typename T, bool NC>
struct Frag<T, false, NC> {  // the same packing as a vector (16-bit elements two to a register)
  uint4 raw;
  __device__ void load(const T* row, int chunk, int lim) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = 0u;
#pragma unroll
    for (int j = 0; j < DT<T>::kVec; ++j) {
      const int o = col_of<T, false>(chunk, j);
      if (o < lim) {
        if constexpr (sizeof(T) == 4) {
          w[j] = __float_as_uint(DT<T>::template load1<NC>(row + o));
        } else {
          const unsigned short* q = reinterpret_cast<const unsigned short*>(row + o);
          unsigned b;
          if constexpr (NC) b = __ldg(q);
          else b = *q;
          w[j >> 1] |= b << (16 * (j & 1));
        }
      }
    }
    raw = make_uint4(w[0], w[1], w[2], w[3]);
  }
  __device__ float get(int j) const { return DT<T>::elem(raw, j); }
};

template <typename T, bool VECTOR>
__device__ __forceinline__ void store_tile(T* row, int chunk, int lim, const float (&v)[DT<T>::kVec]) {
  if constexpr (VECTOR) {
    const int o = col_of<T, true>(chunk, 0);
    if (o < lim) *reinterpret_cast<uint4*>(row + o) = DT<T>::pack(v);
  } else {
#pragma unroll
    for (int j = 0; j < DT<T>::kVec; ++j) {
      const int o = col_of<T, false>(chunk, j);
      if (o < lim) DT<T>::store1(row + o, v[j]);
    }
  }
}

// ----------------------------------------------------------------------------- math helpers
constexpr float NEG_INF = -__builtin_huge_valf();
constexpr float POS_INF = __builtin_huge_valf();

// max(D, 0) for a divergence that may round below 0; NaN stays NaN (fmaxf would drop it)
__device__ __forceinline__ float clamp0(float d) { return d < 0.0f ? 0.0f : d; }
__device__ __forceinline__ float safe(float m) { return m == NEG_INF ? 0.0f : m; }  // Triton's _safe
// A running divergence sum moved to a new max (Triton's _rescale): 0 where the factor underflowed to 0. The
// sum can be +inf in its old frame (mass × an infinite log-ratio) while that mass is 0 in the row's frame.
__device__ __forceinline__ float rescale(float acc, float r) { return r > 0.0f ? acc * r : 0.0f; }

// omb, oms: 1 − beta, 1 − skew formed on the host in float64 (beta within fp32 rounding of 1 would give 0 here)
struct Prm {
  float inv_T, inv_Tt, alpha, t2, scale, softcap, beta, skew, omb, oms;
  __device__ void load(const float* p) {
    inv_T = __ldg(p + 0), inv_Tt = __ldg(p + 1), alpha = __ldg(p + 2), t2 = __ldg(p + 3);
    scale = __ldg(p + 4), softcap = __ldg(p + 5), beta = __ldg(p + 6), skew = __ldg(p + 7);
    omb = __ldg(p + 8), oms = __ldg(p + 9);
  }
};

// loss × the row's weight; weight 0 adds exactly nothing, like a masked row (not 0·inf = NaN)
__device__ __forceinline__ float weighted(float loss, const float* w, int64_t row, bool has_w) {
  if (!has_w) return loss;
  const float wr = __ldg(w + row);
  return wr == 0.0f ? 0.0f : loss * wr;
}

// Triton's _tanh (fp32): the odd series through x^11 for |x| < 0.3 (< 1 ulp; no cancellation), else
// (1 − e^{−2|x|}) / (1 + e^{−2|x|}) with the sign of x: there 1 − e amplifies __expf's ~2 ulp at most 1.2x
// (with the old cutoff 0.1 it was 4.5x: ~10 ulp in tanh).
__device__ __forceinline__ float tanh_fd(float x) {
  const float ax = fabsf(x), x2 = x * x;
  if (ax < 0.3f)
    return x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f + x2 * (
                    62.0f / 2835.0f + x2 * (-1382.0f / 155925.0f))))));
  const float e = __expf(-2.0f * ax);
  const float big = __fdividef(1.0f - e, 1.0f + e);
  return x < 0.0f ? -big : big;
}

// 1 − tanh²(x) = 4e/(1 + e)², e = e^{−2|x|} (Triton's _sech2): no cancellation where tanh saturates, as
// 1 − th² from the rounded capped logit would have (eps/(1 − th²) relative).
__device__ __forceinline__ float sech2(float x) {
  const float e = __expf(-2.0f * fabsf(x));
  return __fdividef(4.0f * e, (1.0f + e) * (1.0f + e));
}

// logit_scale (always applied: 1 when off, which is exact), then softcap (Triton's _logits). −inf stays −inf
// (probability 0: a masked column, handled as without softcap), where softcap·tanh would give −softcap.
__device__ __forceinline__ float transform(float z, const Prm& p, bool softcap) {
  z = z * p.scale;
  if (softcap && z != NEG_INF) z = p.softcap * tanh_fd(__fdividef(z, p.softcap));
  return z;
}

// (la − lm, lb − lm) with lm = log(a·e^la + b·e^lb) (a, b > 0), formed without lm itself (Triton's _mixdiffs):
// lm rounded at |lm| would add ~ulp of a log-prob to every term of a divergence that is a small difference.
__device__ __forceinline__ void mixdiffs(float a, float la, float b, float lb, float& dla, float& dlb) {
  const float mx = safe(fmaxf(la, lb));
  const float da = la - mx, db = lb - mx;
  const float r = __logf(a * __expf(da) + b * __expf(db));
  dla = da - r, dlb = db - r;
}

// w·a with 0 where w == 0 (0·log 0 = 0); NaN where w is NaN, so that a NaN input shows in the loss (Triton's _xlogy)
__device__ __forceinline__ float xlogy(float w, float a) { return w > 0.0f ? w * a : (w != w ? w : 0.0f); }

// Per-element divergence contribution d and g = ∂D/∂q of jsd / skl / srkl (Triton's _div_terms); TVD has
// tvd_terms (no cancellation for a close teacher).
template <int DIV>
__device__ __forceinline__ void div_terms(float lq, float lp, const Prm& pr, float& d, float& g, float& q) {
  static_assert(DIV == DIV_JSD || DIV == DIV_SKL || DIV == DIV_SRKL, "div_terms: jsd / skl / srkl (TVD: tvd_terms)");
  const float beta = pr.beta, skew = pr.skew, omb = pr.omb, oms = pr.oms;
  q = __expf(lq);
  const float p = __expf(lp);
  if constexpr (DIV == DIV_JSD) {  // M = βP + (1−β)Q
    float dp, dq;
    mixdiffs(beta, lp, omb, lq, dp, dq);
    d = beta * xlogy(p, dp) + omb * xlogy(q, dq);
    g = omb * (q > 0.0f ? dq : 0.0f);
  } else if constexpr (DIV == DIV_SKL) {  // KL(P ‖ λP + (1−λ)Q)
    float dp, dq;
    mixdiffs(skew, lp, oms, lq, dp, dq);
    d = xlogy(p, dp);
    g = -oms * (p > 0.0f ? __expf(dp) : 0.0f);
  } else {  // srkl: KL(Q ‖ (1−λ)P + λQ)
    float dp, dq;
    mixdiffs(oms, lp, skew, lq, dp, dq);
    d = xlogy(q, dq);
    g = q > 0.0f ? dq + 1.0f - skew * __expf(dq) : 0.0f;
  }
}

// a − b as s + e exactly (TwoSum of a and −b; the _rn intrinsics are never contracted into an fma)
__device__ __forceinline__ void two_diff(float a, float b, float& s, float& e) {
  s = __fsub_rn(a, b);
  const float bb = __fsub_rn(s, a);
  e = __fsub_rn(__fsub_rn(a, __fsub_rn(s, bb)), __fadd_rn(b, bb));
}

// log p − log q for log p = (a − ha) − la, log q = (b − hb) − lb (Triton's _log_ratio), to about an ulp of itself:
// a − b and ha − hb kept exactly, so their difference is exact where a close teacher makes them cancel; where it is
// ≥ 1 in size, or not finite, the plain difference of the log-probs.
__device__ __forceinline__ float log_ratio(float a, float ha, float la, float b, float hb, float lb) {
  float s, e, c, f;
  two_diff(a, b, s, e);
  two_diff(ha, hb, c, f);
  const float naive = ((a - ha) - la) - ((b - hb) - lb);
  const float fine = (s - c) + ((e - f) - (la - lb));
  return fabsf(naive) < 1.0f && fabsf(fine) < POS_INF ? fine : naive;  // a − b overflowing: inf − inf
}

// q − p (Triton's _q_minus_p): −q·(e^dl − 1) with q = e^{b − hb}·e^{−lb} where |dl| < 1/2 (a close teacher:
// e^{log q} − e^{log p} would cancel, magnifying each log-prob's rounding; expm1f is not among the fast-math
// substitutions), else e^{log q} − e^{log p}.
__device__ __forceinline__ float q_minus_p(float a, float ha, float la, float b, float hb, float lb) {
  const float dl = log_ratio(a, ha, la, b, hb, lb);
  if (fabsf(dl) < 0.5f) return -(__expf(b - hb) * __expf(-lb)) * expm1f(dl);
  return __expf((b - hb) - lb) - __expf((a - ha) - la);
}

// TVD's d, g and q (Triton's _tvd_terms): |p − q| = q·|e^dl − 1| where |dl| < 1/2, q = e^{b − hb}·e^{−lb}.
__device__ __forceinline__ void tvd_terms(float a, float ha, float la, float b, float hb, float lb, float& d, float& g,
                                          float& q) {
  const float dl = log_ratio(a, ha, la, b, hb, lb);
  q = __expf(b - hb) * __expf(-lb);
  const float p = __expf((a - ha) - la);
  d = 0.5f * (fabsf(dl) < 0.5f ? q * fabsf(expm1f(dl)) : fabsf(p - q));
  g = dl < 0.0f ? 0.5f : (dl > 0.0f ? -0.5f : 0.0f);  // q − p has the sign of −dl
}

// Sums of NV per-thread values over the block: shuffle tree, then thread 0 adds the warps in
// order. The result is valid in thread 0 only.
template <int NV>
__device__ __forceinline__ void block_sum0(float (&v)[NV], float (*buf)[NV]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0)
    for (int i = 0; i < NV; ++i) buf[warp][i] = v[i];
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < nw; ++w)
      for (int i = 0; i < NV; ++i) v[i] += buf[w][i];
}

// The running statistics of one thread (and, merged, of the row): max / sum-exp of the tempered
// student (s), the tempered teacher (t) and the untempered student (1, CE with T != 1), and the
// divergence sum A of fkl (rescaled with the teacher's max) or rkl (with the student's).
struct Online {
  float ms, ls, mt, lt, acc, m1, l1;
};

// fkl / rkl running sums Σ w·(d_w − d_o), d = u − m in each model's frame: moving the weighting model's frame
// from mw to mw2 and the other's from mo to mo2 changes every term by −δ, δ = (mw2 − mw) − (mo2 − mo)
__device__ __forceinline__ float frame_shift(float mw, float mw2, float mo, float mo2) {
  return (safe(mw2) - safe(mw)) - (safe(mo2) - safe(mo));
}

template <int SDIV>
__device__ __forceinline__ Online merge(const Online& a, const Online& b, bool ce_sep) {
  Online r;
  r.ms = fmaxf(a.ms, b.ms);
  r.mt = fmaxf(a.mt, b.mt);
  const float as = __expf(a.ms - safe(r.ms)), bs = __expf(b.ms - safe(r.ms));
  const float at = __expf(a.mt - safe(r.mt)), bt = __expf(b.mt - safe(r.mt));
  r.ls = a.ls * as + b.ls * bs;
  r.lt = a.lt * at + b.lt * bt;
  if constexpr (SDIV == DIV_FKL)
    r.acc = rescale(a.acc - frame_shift(a.mt, r.mt, a.ms, r.ms) * a.lt, at) +
            rescale(b.acc - frame_shift(b.mt, r.mt, b.ms, r.ms) * b.lt, bt);
  else if constexpr (SDIV == DIV_RKL)
    r.acc = rescale(a.acc - frame_shift(a.ms, r.ms, a.mt, r.mt) * a.ls, as) +
            rescale(b.acc - frame_shift(b.ms, r.ms, b.mt, r.mt) * b.ls, bs);
  else r.acc = 0.0f;
  r.m1 = a.m1, r.l1 = a.l1;
  if (ce_sep) {
    r.m1 = fmaxf(a.m1, b.m1);
    r.l1 = a.l1 * __expf(a.m1 - safe(r.m1)) + b.l1 * __expf(b.m1 - safe(r.m1));
  }
  return r;
}

__device__ __forceinline__ Online shfl_xor(const Online& a, int o) {
  Online r;
  r.ms = __shfl_xor_sync(0xffffffffu, a.ms, o);
  r.ls = __shfl_xor_sync(0xffffffffu, a.ls, o);
  r.mt = __shfl_xor_sync(0xffffffffu, a.mt, o);
  r.lt = __shfl_xor_sync(0xffffffffu, a.lt, o);
  r.acc = __shfl_xor_sync(0xffffffffu, a.acc, o);
  r.m1 = __shfl_xor_sync(0xffffffffu, a.m1, o);
  r.l1 = __shfl_xor_sync(0xffffffffu, a.l1, o);
  return r;
}

// log with full precision whatever the fast-math flags (once per row)
__device__ __forceinline__ float log_row(float l) { return (float)log((double)l); }
// m + log l as hi + lo, formed in double (once per row; full precision whatever the fast-math flags): log l
// rounded to float would be off by ulp(log l) ~ eps·log V, a shift of every log-prob that the divergence of a
// close teacher magnifies (Triton's _lse2). lo = 0 where hi is not finite. Log-probs are (u − hi) − lo.
__device__ __forceinline__ void lse2(float m, float l, float& hi, float& lo) {
  const double ms = (double)safe(m), ll = log((double)l);
  hi = (float)(ms + ll);
  lo = (float)((ms - (double)hi) + ll);  // ms − hi exact (hd − hi would carry hd's rounding at |ms|·2⁻⁵³)
  if (!(fabsf(lo) < POS_INF)) lo = 0.0f;
}

__device__ __forceinline__ int64_t load_label(const KdArgs& a, int64_t row) {
  if (a.flags & F_LAB64) return __ldg(static_cast<const long long*>(a.labels) + row);
  return __ldg(static_cast<const int*>(a.labels) + row);
}

// ----------------------------------------------------------------------------- pass 1: statistics
template <typename T, bool VECTOR, int SDIV>
__global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS<VECTOR>) kd_stats_kernel(const KdArgs a) {
  constexpr int VEC = DT<T>::kVec, U = UNR<VECTOR>, E = U * VEC;
  __shared__ Online red[MAX_WARPS];
  const int64_t row = blockIdx.x;
  Prm p;
  p.load(a.prm);
  const T* s_row = static_cast<const T*>(a.s) + row_offset(a, row, a.s_stride, a.s_gstride);
  const T* t_row = static_cast<const T*>(a.t) + row_offset(a, row, a.t_stride, a.t_gstride);
  const int V = a.V, Vs = a.V < a.Vt ? a.V : a.Vt, tile = (int)blockDim.x * VEC;
  const bool softcap = a.flags & F_SOFTCAP, ce_sep = a.flags & F_CE_SEP;
  const float inv_T = p.inv_T, inv_Tt = p.inv_Tt;
  Online o = {NEG_INF, 0.0f, NEG_INF, 0.0f, 0.0f, NEG_INF, 0.0f};
  for (int c0 = 0; c0 < V; c0 += U * tile) {
    Frag<T, VECTOR, true> fs[U], ft[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      fs[u].load(s_row, c0 + u * tile, V);
      ft[u].load(t_row, c0 + u * tile, Vs);
    }
    // z: transformed student logits (untempered), ut: tempered teacher; −inf past the limits
    float z[E], ut[E], bz = NEG_INF, bt = NEG_INF;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int col = col_of<T, VECTOR>(c0 + u * tile, j), k = u * VEC + j;
        z[k] = col < V ? transform(fs[u].get(j), p, softcap) : NEG_INF;
        ut[k] = col < Vs ? transform(ft[u].get(j), p, softcap) * inv_Tt : NEG_INF;
        bz = fmaxf(bz, z[k]);
        bt = fmaxf(bt, ut[k]);
      }
    // u_s = z·inv_T is monotone in z (inv_T > 0), so max u_s = (max z)·inv_T exactly
    const float ms_new = fmaxf(o.ms, bz * inv_T), mt_new = fmaxf(o.mt, bt);
    const float rs = __expf(o.ms - safe(ms_new)), rt = __expf(o.mt - safe(mt_new));
    float sum_s = 0.0f, sum_t = 0.0f, sum_a = 0.0f;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const float us = z[k] * inv_T;
      const float es = __expf(us - safe(ms_new)), et = __expf(ut[k] - safe(mt_new));
      sum_s += es;
      sum_t += et;
      // each model's log-ratio in its own max frame: u_t − u_s would carry the models' logit offset (ulp of it)
      const float d = (ut[k] - safe(mt_new)) - (us - safe(ms_new));
      if constexpr (SDIV == DIV_FKL) sum_a += et > 0.0f ? et * d : 0.0f;
      else if constexpr (SDIV == DIV_RKL) sum_a += es > 0.0f ? es * -d : 0.0f;
    }
    // the old sum re-based on the new frames (weighted by the old l), then rescaled
    if constexpr (SDIV == DIV_FKL)
      o.acc = rescale(o.acc - frame_shift(o.mt, mt_new, o.ms, ms_new) * o.lt, rt) + sum_a;
    else if constexpr (SDIV == DIV_RKL)
      o.acc = rescale(o.acc - frame_shift(o.ms, ms_new, o.mt, mt_new) * o.ls, rs) + sum_a;
    o.ls = o.ls * rs + sum_s;
    o.lt = o.lt * rt + sum_t;
    if (ce_sep) {
      const float m1_new = fmaxf(o.m1, bz);
      float sum_1 = 0.0f;
#pragma unroll
      for (int k = 0; k < E; ++k) sum_1 += __expf(z[k] - safe(m1_new));
      o.l1 = o.l1 * __expf(o.m1 - safe(m1_new)) + sum_1;
      o.m1 = m1_new;
    }
    o.ms = ms_new;
    o.mt = mt_new;
  }
  // merge: shuffle tree inside each warp, then thread 0 merges the warps in order
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) o = merge<SDIV>(o, shfl_xor(o, off), ce_sep);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = o;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) o = merge<SDIV>(o, red[w], ce_sep);

  float lse_s, lse_t, lo_s, lo_t;
  lse2(o.ms, o.ls, lse_s, lo_s);
  lse2(o.mt, o.lt, lse_t, lo_t);
  float lse_1 = lse_s, lo_1 = lo_s;  // CE's untempered logsumexp (T = 1 without ce_sep: the student's u is z)
  if (ce_sep) lse2(o.m1, o.l1, lse_1, lo_1);
  bool ok = true;
  int64_t label = 0;
  if (a.flags & F_LABELS) {
    label = load_label(a, row);
    ok = ok && label != a.ignore_index;
  }
  if (a.flags & F_MASK) ok = ok && __ldg(a.mask + row) != 0;
  // an all −inf row is invalid; a NaN / +inf logit keeps the row valid so that the NaN shows
  ok = ok && lse_s != -INFINITY && lse_t != -INFINITY;
  float ce = 0.0f;
  if (a.flags & F_CE) {
    // (m − z_label) + log l, as cross_entropy's log_softmax: lse_1 − z_label carries lse_1's rounding at |m|
    // (T = 1 without ce_sep: the student's u is z). The label's logit is read only for a label in range (an
    // ignore_index or out-of-range label must not read outside the row)
    if (label >= 0 && label < V) {
      const float zl = transform(DT<T>::template load1<true>(s_row + label), p, softcap);
      ce = ((ce_sep ? o.m1 : o.ms) - zl) + log_row(ce_sep ? o.l1 : o.ls);
    } else {
      ce = __int_as_float(0x7fc00000);  // NaN: an out-of-range label
    }
  }
  float D = 0.0f;
  // Σ p (log p − log q) = A/l_t + (m_t − m_s) − lse_t + lse_s = A/l_t + ln(l_s / l_t): free of the offset too
  if constexpr (SDIV == DIV_FKL) D = clamp0(__fdiv_rn(o.acc, o.lt) + log_row(__fdiv_rn(o.ls, o.lt)));
  else if constexpr (SDIV == DIV_RKL) D = clamp0(__fdiv_rn(o.acc, o.ls) + log_row(__fdiv_rn(o.lt, o.ls)));
  float loss = (p.alpha < 1.0f ? (1.0f - p.alpha) * p.t2 * D : 0.0f) + p.alpha * ce;  // α = 1: no KD term
  loss = weighted(loss, a.w, row, a.flags & F_W);
  float* st = a.st + row * NSTATE;
  st[0] = lse_s, st[1] = lse_t, st[2] = lse_1, st[3] = D;
  st[4] = 0.0f, st[5] = ok ? loss : 0.0f, st[6] = ce, st[7] = ok ? 1.0f : 0.0f;
  st[8] = lo_s, st[9] = lo_t, st[10] = lo_1;
}

// ----------------------------------------------------------------------------- pass 2: divergence
template <typename T, bool VECTOR, int DIV>
__global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS<VECTOR>) kd_div_kernel(const KdArgs a) {
  constexpr int VEC = DT<T>::kVec, U = UNR<VECTOR>;
  __shared__ float red[MAX_WARPS][2];
  const int64_t row = blockIdx.x;
  Prm p;
  p.load(a.prm);
  const T* s_row = static_cast<const T*>(a.s) + row_offset(a, row, a.s_stride, a.s_gstride);
  const T* t_row = static_cast<const T*>(a.t) + row_offset(a, row, a.t_stride, a.t_gstride);
  float* st = a.st + row * NSTATE;
  const float lse_s = st[0], lse_t = st[1], lo_s = st[8], lo_t = st[9];
  const int V = a.V, Vs = a.V < a.Vt ? a.V : a.Vt, tile = (int)blockDim.x * VEC;
  const bool softcap = a.flags & F_SOFTCAP;
  float sums[2] = {0.0f, 0.0f};  // Σ d, Σ q·g
  for (int c0 = 0; c0 < V; c0 += U * tile) {
    Frag<T, VECTOR, true> fs[U], ft[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      fs[u].load(s_row, c0 + u * tile, V);
      ft[u].load(t_row, c0 + u * tile, Vs);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int col = col_of<T, VECTOR>(c0 + u * tile, j);
        if (col < V) {
          const float z = transform(fs[u].get(j), p, softcap);
          const float zt = col < Vs ? transform(ft[u].get(j), p, softcap) : NEG_INF;
          float d, g, q;
          if constexpr (DIV == DIV_TVD)
            tvd_terms(zt * p.inv_Tt, lse_t, lo_t, z * p.inv_T, lse_s, lo_s, d, g, q);
          else
            div_terms<DIV>((z * p.inv_T - lse_s) - lo_s, (zt * p.inv_Tt - lse_t) - lo_t, p, d, g, q);
          sums[0] += d;
          sums[1] += q * g;
        }
      }
  }
  block_sum0<2>(sums, red);
  if (threadIdx.x != 0) return;
  const float D = clamp0(sums[0]);
  const bool ok = st[7] > 0.0f;
  float loss = (p.alpha < 1.0f ? (1.0f - p.alpha) * p.t2 * D : 0.0f) + p.alpha * st[6];
  loss = weighted(loss, a.w, row, a.flags & F_W);
  st[3] = D;
  st[4] = sums[1];
  st[5] = ok ? loss : 0.0f;
}

// ----------------------------------------------------------------------------- pass 3: reduction
// n = num_items if > 0 else the valid-row count; factor = 1/n (batchmean), 1/(n·V) (mean), 1
// (sum, none), 0 when n = 0; loss = Σ contrib · factor.
__global__ void __launch_bounds__(RED_THREADS) kd_reduce_kernel(const float* st, float* loss, float* factor, int64_t N,
                                                               int V, float num_items, int red) {
  __shared__ float buf_c[32];
  __shared__ unsigned long long buf_n[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float cs = 0.0f;
  unsigned long long cnt = 0;
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) {
    cs += st[r * NSTATE + 5];
    cnt += st[r * NSTATE + 7] > 0.0f ? 1u : 0u;
  }
  cs = warp_sum(cs);
  cnt = warp_sum(cnt);
  if (lane == 0) buf_c[warp] = cs, buf_n[warp] = cnt;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < nw; ++w) cs += buf_c[w], cnt += buf_n[w];
  const float n = num_items > 0.0f ? num_items : (float)cnt;
  float f = 1.0f;
  if (red == 0) f = n > 0.0f ? __fdiv_rn(1.0f, n) : 0.0f;
  else if (red == 2) f = n > 0.0f ? __fdiv_rn(1.0f, n * (float)V) : 0.0f;
  loss[0] = cs * f;
  factor[0] = f;
}

// ----------------------------------------------------------------------------- pass 4: gradient
// ∂ℓ/∂z_j = c · [(1−α)·t2/T · du_j + α·(softmax(z)_j − [j = label])] · (1 − tanh²) · logit_scale,
// c = factor · upstream · weight; du = q − p (fkl), q(log q − log p − D) (rkl), q(g − S) (others).
// Invalid rows get zeros. Each thread reads its elements (student and teacher) before it writes
// the same columns, so out may alias the student logits (and the teacher may be the student).
template <typename T, bool VECTOR, int DIV>
__global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS<VECTOR>) kd_grad_kernel(const KdArgs a) {
  constexpr int VEC = DT<T>::kVec, U = UNR<VECTOR>;
  const int64_t row = blockIdx.x;
  const int V = a.V, Vs = a.V < a.Vt ? a.V : a.Vt, tile = (int)blockDim.x * VEC;
  T* o_row = static_cast<T*>(a.out) + row_offset(a, row, a.o_stride, a.o_gstride);
  const float* st = a.st + row * NSTATE;
  // invalid row, or weight 0 (a zero gradient like a masked row, whatever the row holds): zeros, nothing read
  if (!(__ldg(st + 7) > 0.0f) || ((a.flags & F_W) && __ldg(a.w + row) == 0.0f)) {
    const float zero[VEC] = {};
    for (int c0 = 0; c0 < V; c0 += tile) store_tile<T, VECTOR>(o_row, c0, V, zero);
    return;
  }
  Prm p;
  p.load(a.prm);
  const T* s_row = static_cast<const T*>(a.s) + row_offset(a, row, a.s_stride, a.s_gstride);
  const T* t_row = static_cast<const T*>(a.t) + row_offset(a, row, a.t_stride, a.t_gstride);
  const float lse_s = __ldg(st + 0), lse_t = __ldg(st + 1), lse_1 = __ldg(st + 2), D = __ldg(st + 3);
  const float lo_s = __ldg(st + 8), lo_t = __ldg(st + 9), lo_1 = __ldg(st + 10);
  const float S = __ldg(st + 4);
  float coeff = __ldg(a.factor) * __ldg(a.go + row * a.go_stride);
  if (a.flags & F_W) coeff = coeff * __ldg(a.w + row);
  const bool softcap = a.flags & F_SOFTCAP, ce = a.flags & F_CE;
  const int64_t label = (a.flags & F_LABELS) ? load_label(a, row) : 0;
  const float kd_scale = (1.0f - p.alpha) * p.t2 * p.inv_T;
  for (int c0 = 0; c0 < V; c0 += U * tile) {
    Frag<T, VECTOR, false> fs[U], ft[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      fs[u].load(s_row, c0 + u * tile, V);
      ft[u].load(t_row, c0 + u * tile, Vs);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float gz[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int col = col_of<T, VECTOR>(c0 + u * tile, j);
        const float zr = fs[u].get(j) * p.scale;  // the uncapped (scaled) logit, for the softcap chain rule
        const float z = transform(fs[u].get(j), p, softcap);
        const float zt = col < Vs ? transform(ft[u].get(j), p, softcap) : NEG_INF;
        const float lq = (z * p.inv_T - lse_s) - lo_s, lp = (zt * p.inv_Tt - lse_t) - lo_t;
        float du;
        if constexpr (DIV == DIV_FKL) {
          du = q_minus_p(zt * p.inv_Tt, lse_t, lo_t, z * p.inv_T, lse_s, lo_s);
        } else if constexpr (DIV == DIV_RKL) {
          const float q = __expf(lq);
          du = (q > 0.0f && D != POS_INF) ? q * (lq - lp - D) : 0.0f;  // D = +inf: no finite gradient, 0
        } else {
          float d, g, q;
          if constexpr (DIV == DIV_TVD)
            tvd_terms(zt * p.inv_Tt, lse_t, lo_t, z * p.inv_T, lse_s, lo_s, d, g, q);
          else
            div_terms<DIV>(lq, lp, p, d, g, q);
          du = q * (g - S);
        }
        float v = kd_scale != 0.0f ? kd_scale * du : 0.0f;  // alpha = 1: no KD term at all (not 0·NaN)
        // CE: e^{(z − hi) − lo} (e^{z − lse} with lse rounded to one float carries its rounding at |max z|)
        if (ce) v += p.alpha * (__expf((z - lse_1) - lo_1) - ((int64_t)col == label ? 1.0f : 0.0f));
        v = v * coeff;
        if (softcap) v = v * sech2(__fdividef(zr, p.softcap));
        gz[j] = v * p.scale;
      }
      store_tile<T, VECTOR>(o_row, c0 + u * tile, V, gz);
    }
  }
}

// ----------------------------------------------------------------------------- host launchers
// Threads per row CTA: enough for one loop iteration to cover the row, a power of two in [32, 256].
inline int row_threads(int V, int per_thread) {
  const int64_t need = ((int64_t)V + per_thread - 1) / per_thread;
  int nt = 32;
  while (nt < MAX_THREADS && nt < need) nt *= 2;
  return nt;
}

// The 16-byte path: every row's student, teacher (and output) columns start 16-byte aligned and
// the column limits V and min(V, Vt) are whole vectors.
inline bool use_vector(const KdArgs& a, int64_t N, int vec, bool grad) {
  const int Vs = a.V < a.Vt ? a.V : a.Vt;
  auto stride_ok = [&](int64_t st) { return N == 1 || st % vec == 0; };
  auto gstride_ok = [&](int64_t st) { return N <= a.rows_per_group || st % vec == 0; };
  bool v = a.V % vec == 0 && Vs % vec == 0 && aligned16(a.s) && aligned16(a.t) && stride_ok(a.s_stride) &&
           stride_ok(a.t_stride) && gstride_ok(a.s_gstride) && gstride_ok(a.t_gstride);
  if (grad) v = v && aligned16(a.out) && stride_ok(a.o_stride) && gstride_ok(a.o_gstride);
  return v;
}

enum class Pass { STATS, DIV, GRAD };

template <Pass P, typename T, bool VECTOR, int DIV>
cudaError_t launch(const KdArgs& a, int64_t N, cudaStream_t s) {
  const dim3 grid((unsigned)N), block((unsigned)row_threads(a.V, UNR<VECTOR> * DT<T>::kVec));
  if constexpr (P == Pass::STATS) {
    auto kernel = kd_stats_kernel<T, VECTOR, DIV>;
    FD_LAUNCH(kernel, grid, block, s, a);
  } else if constexpr (P == Pass::DIV) {
    auto kernel = kd_div_kernel<T, VECTOR, DIV>;
    FD_LAUNCH(kernel, grid, block, s, a);
  } else {
    auto kernel = kd_grad_kernel<T, VECTOR, DIV>;
    FD_LAUNCH(kernel, grid, block, s, a);
  }
  return cudaGetLastError();
}

template <Pass P, typename T, bool VECTOR>
cudaError_t launch_div(int div, const KdArgs& a, int64_t N, cudaStream_t s) {
  if constexpr (P == Pass::STATS) {  // fkl, rkl, or the statistics of the 3-pass divergences
    if (div == DIV_FKL) return launch<P, T, VECTOR, DIV_FKL>(a, N, s);
    if (div == DIV_RKL) return launch<P, T, VECTOR, DIV_RKL>(a, N, s);
    return launch<P, T, VECTOR, SDIV_NONE>(a, N, s);
  } else {
    switch (div) {
      case DIV_FKL:
        if constexpr (P == Pass::GRAD) return launch<P, T, VECTOR, DIV_FKL>(a, N, s);
        return cudaErrorInvalidValue;
      case DIV_RKL:
        if constexpr (P == Pass::GRAD) return launch<P, T, VECTOR, DIV_RKL>(a, N, s);
        return cudaErrorInvalidValue;
      case DIV_JSD: return launch<P, T, VECTOR, DIV_JSD>(a, N, s);
      case DIV_SKL: return launch<P, T, VECTOR, DIV_SKL>(a, N, s);
      case DIV_SRKL: return launch<P, T, VECTOR, DIV_SRKL>(a, N, s);
      case DIV_TVD: return launch<P, T, VECTOR, DIV_TVD>(a, N, s);
      default: return cudaErrorInvalidValue;
    }
  }
}

template <Pass P>
cudaError_t dispatch(int dtype, int div, const KdArgs& a, int64_t N, cudaStream_t s) {
  const int vec = dtype == 0 ? 4 : 8;
  const bool vector = use_vector(a, N, vec, P == Pass::GRAD);
  switch (dtype) {
    case 0:
      return vector ? launch_div<P, float, true>(div, a, N, s) : launch_div<P, float, false>(div, a, N, s);
    case 1:
      return vector ? launch_div<P, __half, true>(div, a, N, s) : launch_div<P, __half, false>(div, a, N, s);
    case 2:
      return vector ? launch_div<P, __nv_bfloat16, true>(div, a, N, s)
                    : launch_div<P, __nv_bfloat16, false>(div, a, N, s);
    default: return cudaErrorInvalidValue;
  }
}

KdArgs kd_args(const void* s, const void* t, const void* labels, bool labels_i64, const uint8_t* mask,
               const float* weights, const float* prm, int64_t V, int64_t Vt, int64_t s_stride, int64_t t_stride,
               int64_t rows_per_group, int64_t s_gstride, int64_t t_gstride, int64_t ignore_index, bool ce,
               bool softcap) {
  KdArgs a = {};
  a.s = s, a.t = t, a.labels = labels, a.mask = mask, a.w = weights, a.prm = prm;
  a.s_stride = s_stride, a.t_stride = t_stride, a.ignore_index = ignore_index;
  a.rows_per_group = rows_per_group, a.s_gstride = s_gstride, a.t_gstride = t_gstride;
  a.V = (int)V, a.Vt = (int)Vt;
  a.flags = (labels ? F_LABELS : 0) | (labels && labels_i64 ? F_LAB64 : 0) | (mask ? F_MASK : 0) |
            (weights ? F_W : 0) | (ce ? F_CE : 0) | (softcap ? F_SOFTCAP : 0);
  return a;
}

}  // namespace fd_kd

// Public host API (declared again in bindings.cpp; C++ linkage, so a signature mismatch fails to link).
// Argument validation is the caller's (bindings.cpp); this only refuses what it cannot launch.

// dtype: 0 float32, 1 float16, 2 bfloat16 (student and teacher alike). div: 0 fkl, 1 rkl, 2 jsd,
// 3 skl, 4 srkl, 5 tvd. red: 0 batchmean, 1 sum, 2 mean, 3 none. labels int32 / int64 [N] or null,
// mask uint8 [N] or null, weights fp32 [N] or null, prm fp32 [10]. Writes st [N, 11], loss [1],
// factor [1] (fp32). ce: the α·CE term (needs labels); ce_sep: its untempered lse separately (T != 1).
cudaError_t fd_kd_fwd(int dtype, const void* s, const void* t, const void* labels, bool labels_i64,
                      const uint8_t* mask, const float* weights, const float* prm, float* st, float* loss,
                      float* factor, int64_t N, int64_t V, int64_t Vt, int64_t s_stride, int64_t t_stride,
                      int64_t rows_per_group, int64_t s_gstride, int64_t t_gstride, int64_t ignore_index, int div,
                      int red, bool ce, bool ce_sep, bool softcap, float num_items, cudaStream_t stream) {
  using namespace fd_kd;
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (div < DIV_FKL || div > DIV_TVD || red < 0 || red > 3 || (ce_sep && !ce) || (ce && !labels) ||
      rows_per_group <= 0)
    return cudaErrorInvalidValue;
  KdArgs a = kd_args(s, t, labels, labels_i64, mask, weights, prm, V, Vt, s_stride, t_stride, rows_per_group,
                     s_gstride, t_gstride, ignore_index, ce, softcap);
  a.flags |= ce_sep ? F_CE_SEP : 0;
  a.st = st;
  cudaError_t err = dispatch<Pass::STATS>(dtype, div, a, N, stream);
  if (err == cudaSuccess && div > DIV_RKL) err = dispatch<Pass::DIV>(dtype, div, a, N, stream);
  if (err != cudaSuccess) return err;
  auto kernel = kd_reduce_kernel;
  FD_LAUNCH(kernel, dim3(1), dim3(RED_THREADS), stream, st, loss, factor, N, (int)V, num_items, red);
  return cudaGetLastError();
}

// grad_out fp32 [1] (go_stride 0) or [N] (go_stride 1); out [N, V] in the student dtype, row stride
// o_stride, may alias s.
cudaError_t fd_kd_bwd(int dtype, const void* s, const void* t, const void* labels, bool labels_i64,
                      const float* weights, const float* prm, const float* st, const float* factor,
                      const float* grad_out, int64_t go_stride, void* out, int64_t N, int64_t V, int64_t Vt,
                      int64_t s_stride, int64_t t_stride, int64_t o_stride, int64_t rows_per_group,
                      int64_t s_gstride, int64_t t_gstride, int64_t o_gstride, int div, bool ce, bool softcap,
                      cudaStream_t stream) {
  using namespace fd_kd;
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (div < DIV_FKL || div > DIV_TVD || (ce && !labels) || rows_per_group <= 0) return cudaErrorInvalidValue;
  KdArgs a = kd_args(s, t, labels, labels_i64, nullptr, weights, prm, V, Vt, s_stride, t_stride, rows_per_group,
                     s_gstride, t_gstride, 0, ce, softcap);
  a.o_gstride = o_gstride;
  a.st = const_cast<float*>(st);
  a.factor = factor, a.go = grad_out, a.go_stride = go_stride, a.out = out, a.o_stride = o_stride;
  return dispatch<Pass::GRAD>(dtype, div, a, N, stream);
}
