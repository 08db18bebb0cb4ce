// CUDA backend of the score-difference losses (score_distill, sid_loss, scm_tangent_loss,
// denoise_regression_loss). Semantics: docs/score_ops.md. The algorithm mirrors the Triton
// kernels in kernels/score.py (and the PyTorch reference in fastdistill/reference/score.py):
//
//   1. score_stats_kernel     grid (B, NB): per (sample, block) partial statistics s0..s4 of the
//      two affine combinations c1 = A[b,0,:]·[x, T] and c2 = A[b,1,:]·[x, T] -> part[B, NB, 5].
//   2. score_finalize_kernel  one block: reduces the partials of each sample, then per sample the
//      normaliser, loss, bad flag and gradient factor -> state[B, 4], loss_i[B], loss[1].
//   3. score_grad_kernel      grid (B, NB): recomputes the combinations, writes the gradients.
//
// Determinism: every reduction has a fixed order (per-thread sequential, warp shuffle tree,
// shared-memory combine in warp order, partials in a fixed lane-strided order); no atomics, so
// repeated runs are bitwise identical. Block partitioning is the Triton one: each sample is cut
// into NB blocks of n_iter·1024 elements (at most 1024 blocks per sample).
//
// Torch-free: raw device pointers and a cudaStream_t; the pybind11 glue is bindings.cpp. All
// math is fp32 whatever the input dtype (float, __half, __nv_bfloat16; x and every term share it;
// the mask is uint8). Math goes through explicit intrinsics so that results do not depend on
// --use_fast_math: IEEE __fdiv_rn / __fsqrt_rn in the per-sample finalize; in the per-element
// pseudo-Huber terms rsqrtf / __fdividef (a few ulp, no slow-path call that would cost
// registers in the streaming kernels).
#include "fd_common.cuh"  // DT<T>, word, warp_sum, aligned16, FD_LAUNCH

namespace fd_score {
using namespace fd;

constexpr int OP_SCORE = 0, OP_SID = 1, OP_SCM = 2, OP_DENOISE = 3;
constexpr int NSTAT = 5, NSTATE = 4, MAXK = 8;
constexpr int BLOCK = 1024;  // elements per block iteration (Triton's BLOCK)
constexpr int MAX_BLOCKS_PER_SAMPLE = 1024;
#ifndef FD_SCORE_FIN_THREADS  // the finalize is written in terms of blockDim; the CPU emulation uses fewer
#define FD_SCORE_FIN_THREADS 1024
#endif
constexpr int FIN_THREADS = FD_SCORE_FIN_THREADS;
static_assert(FIN_THREADS % 32 == 0 && FIN_THREADS <= 1024, "FD_SCORE_FIN_THREADS: whole warps, at most 1024");

// runtime switches (uniform over the grid, so the branches cost no divergence)
constexpr int F_MASK = 1, F_HUBER = 2, F_NORM_ON_LOSS = 4, F_TO_NUM = 8, F_WRITE_X = 16;
constexpr int F_SAMPLE_MEAN = 32, F_RMS = 64, F_WEIGHT = 128, F_LOGVAR = 256;

// The float parameters are read from a device vector, fp32 [7] (the Triton kernels' layout, kernels/score.py:
// one vector serves both backends; under torch.compile it is built in the graph, so a changing value is no
// kernel argument and no host read): huber_c, alpha, scale, clamp, eps, c and the gradient range (the largest
// finite value of the gradient dtype: a larger gradient element marks the sample bad).
constexpr int PRM_HUBER_C = 0, PRM_ALPHA = 1, PRM_SCALE = 2, PRM_CLAMP = 3, PRM_EPS = 4, PRM_C = 5, PRM_GMAX = 6;

struct TermPtrs {
  const void* p[MAXK];
};
struct GradPtrs {
  void* p[MAXK];
};

// Everything the stats and grad kernels need (passed by value; ~250 bytes of kernel parameters).
struct ElemArgs {
  const void* x;
  TermPtrs terms;
  const float* coef;  // [Bc, 2, K+1] fp32 contiguous
  int64_t coef_sb;    // sample stride of coef (0 when shared by all samples)
  const uint8_t* mask;
  int64_t M;
  int n_iter, NB, K;
  unsigned use1, use2, tgrad;
  int flags;
  const float* prm;                 // the parameter vector (PRM_*): huber_c and alpha read here
  float* part;                      // stats: [B, NB, 5]
  const float* state;               // grad: [B, 4]
  const float* go;                  // grad: upstream gradient, [1] or [B] ...
  int64_t go_sb;                    // ... with sample stride 0 or 1
  void* gx;                         // grad of x, or null
  GradPtrs gterms;                  // grads of the terms (SID), or null
};

struct FinArgs {  // part [B, NB, 5] in, sums [B, 5] scratch, the rest out (weight, logvar: [B] or null)
  const float *part;
  float* sums;
  const float *weight, *logvar;
  float *state, *loss_i, *loss;
  int64_t B, M;
  int NB, op, norm, red, flags;
  const float* prm;  // the parameter vector (PRM_*): scale, clamp, eps, c and the gradient range read here
};

// ----------------------------------------------------------------------------- launch bounds
// CTAs per SM of the element-wise kernels (DT<T> itself is in fd_common.cuh):
// float, 256 threads: <= 80 registers, >= 768 threads per SM; __half / __nv_bfloat16, 128 threads: likewise
template <typename T>
constexpr int MIN_BLOCKS = DT<T>::kVec == 4 ? 3 : 6;

// ----------------------------------------------------------------------------- per-thread tiles
// One block iteration covers the 1024 elements [chunk, chunk + 1024) of a sample; each of the
// NT = 1024/VEC threads owns VEC of them. Vectorised: the VEC consecutive elements at
// chunk + tid·VEC (one 16-byte load; needs M % VEC == 0 and 16-byte aligned pointers, so a vector
// is either wholly inside the sample or wholly past its end). Scalar: chunk + tid + j·NT
// (coalesced across the warp). Elements past M read as 0 with mask 0, which makes every
// statistic contribution exactly 0 (as Triton's masked loads with other=0).
template <typename T, bool VECTOR>
struct Tile {
  static constexpr int VEC = DT<T>::kVec;
  static constexpr int NT = BLOCK / VEC;

  __device__ static int64_t offset(int64_t chunk, int j) {
    return VECTOR ? chunk + (int64_t)threadIdx.x * VEC + j : chunk + threadIdx.x + (int64_t)j * NT;
  }
};

template <typename T, bool VECTOR>
struct Frag;  // VEC elements of one tensor, as loaded by this thread

template <typename T>
struct Frag<T, true> {
  uint4 raw;
  __device__ void load(const T* p, int64_t chunk, int64_t M) {
    const int64_t o = Tile<T, true>::offset(chunk, 0);
    raw = o < M ? __ldg(reinterpret_cast<const uint4*>(p + o)) : make_uint4(0u, 0u, 0u, 0u);
  }
  __device__ float get(int j) const { return DT<T>::elem(raw, j); }
};

template <typename T>
struct Frag<T, false> {
  float v[DT<T>::kVec];
  __device__ void load(const T* p, int64_t chunk, int64_t M) {
#pragma unroll
    for (int j = 0; j < DT<T>::kVec; ++j) {
      const int64_t o = Tile<T, false>::offset(chunk, j);
      v[j] = o < M ? DT<T>::load1(p + o) : 0.0f;
    }
  }
  __device__ float get(int j) const { return v[j]; }
};

template <typename T, bool VECTOR>
__device__ __forceinline__ void store_tile(T* p, int64_t chunk, int64_t M, const float (&v)[DT<T>::kVec]) {
  constexpr int VEC = DT<T>::kVec;
  if constexpr (VECTOR) {
    const int64_t o = Tile<T, true>::offset(chunk, 0);
    if (o < M) *reinterpret_cast<uint4*>(p + o) = DT<T>::pack(v);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t o = Tile<T, false>::offset(chunk, j);
      if (o < M) DT<T>::store1(p + o, v[j]);
    }
  }
}

// m[j] = mask value (0/1) of element j, or 1 without a mask; 0 past the end of the sample.
template <typename T, bool VECTOR>
__device__ __forceinline__ void load_mask(const uint8_t* p, bool has_mask, int64_t chunk, int64_t M,
                                          float (&m)[DT<T>::kVec]) {
  constexpr int VEC = DT<T>::kVec;
  if constexpr (VECTOR) {
    const int64_t o = Tile<T, true>::offset(chunk, 0);
    unsigned w0 = 0u, w1 = 0u;
    if (o < M) {
      if (has_mask) {
        if constexpr (VEC == 8) {
          const uint2 r = __ldg(reinterpret_cast<const uint2*>(p + o));
          w0 = r.x;
          w1 = r.y;
        } else {
          w0 = __ldg(reinterpret_cast<const unsigned*>(p + o));
        }
      } else {
        w0 = w1 = 0x01010101u;
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = (float)(((j < 4 ? w0 : w1) >> (8 * (j & 3))) & 0xffu);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t o = Tile<T, false>::offset(chunk, j);
      m[j] = o < M ? (has_mask ? (float)__ldg(p + o) : 1.0f) : 0.0f;
    }
  }
}

// ----------------------------------------------------------------------------- math helpers
__device__ __forceinline__ bool finite(float v) { return fabsf(v) < __int_as_float(0x7f800000); }
// |v| within the gradient dtype's range (false for NaN)
__device__ __forceinline__ bool fits(float v, float vmax) { return fabsf(v) <= vmax; }
// max that propagates NaN (torch.maximum / amax semantics): a NaN statistic marks the sample bad
__device__ __forceinline__ float maxp(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float to_num(float v, float vmax) {
  v = (v != v) ? 0.0f : v;
  return fminf(fmaxf(v, -vmax), vmax);
}
__device__ __forceinline__ float phi(float d, float cc, bool huber) {
  if (!huber) return d;
  const float dd = d * d;  // d / sqrt(d² + c²); where d² overflows (|d| > ~1.8e19): ±1/sqrt(1 + (c/d)²)
  if (dd < INFINITY) return d * rsqrtf(dd + cc);
  const float a = fabsf(d);
  return copysignf(rsqrtf(1.0f + (cc / a) / a), d);  // (NaN for d = ±inf, as before: a bad sample)
}

// The per-sample coefficient rows A[b,0,:] (a) and A[b,1,:] (bb), column 0 = x, k+1 = term k.
struct Coefs {
  float a[MAXK + 1], bb[MAXK + 1];
  __device__ void load(const float* cp, int K) {
    a[0] = __ldg(cp);
    bb[0] = __ldg(cp + K + 1);
#pragma unroll
    for (int k = 0; k < MAXK; ++k) {
      a[k + 1] = k < K ? __ldg(cp + 1 + k) : 0.0f;
      bb[k + 1] = k < K ? __ldg(cp + K + 2 + k) : 0.0f;
    }
  }
};

// c1 = x·A[0] + Σ_k A[k+1]·T_k and c2 likewise with row 2, element-wise, terms in index order
// (the Triton order); a term outside both use masks is not read. X1 false: c1 has no x column
// (SCORE's d), so a non-finite x cannot make it NaN through 0·inf. Vectorised path: x and every
// used term are loaded before any use (4 registers each), so a thread keeps up to K+1 independent
// 16-byte requests in flight. Scalar path: term by term (VEC independent loads each), which keeps
// the register count low; the per-element arithmetic is the same in both paths.
template <typename T, bool VECTOR, bool TWO, bool NEED_X, bool X1 = true>
__device__ __forceinline__ void combos(const ElemArgs& a, int64_t base, int64_t chunk, const Coefs& cf,
                                       unsigned use1, unsigned use2, float (&xv)[DT<T>::kVec],
                                       float (&c1)[DT<T>::kVec], float (&c2)[DT<T>::kVec]) {
  constexpr int VEC = DT<T>::kVec;
  const unsigned use = use1 | use2;
  Frag<T, VECTOR> fx;
  if (NEED_X) fx.load(static_cast<const T*>(a.x) + base, chunk, a.M);
  if constexpr (VECTOR) {
    Frag<T, true> ft[MAXK];
#pragma unroll
    for (int k = 0; k < MAXK; ++k)
      if (k < a.K && ((use >> k) & 1u)) ft[k].load(static_cast<const T*>(a.terms.p[k]) + base, chunk, a.M);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      xv[j] = NEED_X ? fx.get(j) : 0.0f;
      float s1 = X1 ? xv[j] * cf.a[0] : 0.0f, s2 = xv[j] * cf.bb[0];
#pragma unroll
      for (int k = 0; k < MAXK; ++k) {
        if (k < a.K) {
          if ((use1 >> k) & 1u) s1 += cf.a[k + 1] * ft[k].get(j);
          if (TWO && ((use2 >> k) & 1u)) s2 += cf.bb[k + 1] * ft[k].get(j);
        }
      }
      c1[j] = s1;
      c2[j] = s2;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      xv[j] = NEED_X ? fx.get(j) : 0.0f;
      c1[j] = X1 ? xv[j] * cf.a[0] : 0.0f;
      c2[j] = xv[j] * cf.bb[0];
    }
#pragma unroll
    for (int k = 0; k < MAXK; ++k) {
      if (k < a.K && ((use >> k) & 1u)) {
        Frag<T, false> ft;
        ft.load(static_cast<const T*>(a.terms.p[k]) + base, chunk, a.M);
        const bool u1 = (use1 >> k) & 1u, u2 = TWO && ((use2 >> k) & 1u);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (u1) c1[j] += cf.a[k + 1] * ft.get(j);
          if (u2) c2[j] += cf.bb[k + 1] * ft.get(j);
        }
      }
    }
  }
}

// Deterministic block reductions: shuffle tree inside each warp (warp_sum: fd_common.cuh), then
// warp 0 combines the warp results in warp order. `buf` holds one float per warp; the result is
// valid in every thread.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = maxp(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ float block_sum(float v, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? buf[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) buf[0] = v;
  }
  __syncthreads();
  return buf[0];
}

// ----------------------------------------------------------------------------- pass 1: statistics
// Per op (c1, c2 the combinations, m the mask, ψ the loss integrand; see kernels/score.py):
//   SCORE    c1 = d, c2 = ref           s0 Σ|x − ref|, s1 Σ m·ψ(d), s2 Σ m, s3 #non-finite, s4 max m|φ(d)|
//   SID      c1 = f_r, c2 = f_f         s0 Σ|f_r − y|, s1 Σ m(f_r−f_f)((f_r−y) − α(f_r−f_f)), s2, s3,
//                                       s4 max m·|∂/∂y|, m·|∂/∂T_k| (k in tgrad: the terms' gradients asked for)
//   SCM      c1 = g                     s0 Σ g², s3, s4 max |g|
//   DENOISE  c1 = d                     s0 Σ m d², s2 Σ m, s3, s4 max m|a0·d|
// s4 is the largest gradient element over the per-sample factor gco (x and the terms share a dtype).
template <typename T, int OP, bool VECTOR>
__global__ void __launch_bounds__(BLOCK / DT<T>::kVec, MIN_BLOCKS<T>) score_stats_kernel(const ElemArgs a) {
  constexpr int VEC = DT<T>::kVec, NT = BLOCK / VEC, NW = NT / 32;
  constexpr bool TWO = OP <= OP_SID;
  __shared__ float red[NW][NSTAT];
  const int64_t b = blockIdx.x;
  const int blk = blockIdx.y;
  const int64_t base = b * a.M;
  Coefs cf;
  cf.load(a.coef + b * a.coef_sb, a.K);
  const bool has_mask = a.flags & F_MASK, huber = a.flags & F_HUBER, on_loss = a.flags & F_NORM_ON_LOSS;
  const float hc = __ldg(a.prm + PRM_HUBER_C), cc = hc * hc, alpha = __ldg(a.prm + PRM_ALPHA);
  const unsigned use2 = TWO ? a.use2 : 0u;

  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s4 = 0.0f;
  int s3 = 0;
  const int64_t start = (int64_t)blk * a.n_iter * BLOCK;
  for (int it = 0; it < a.n_iter; ++it) {
    const int64_t chunk = start + (int64_t)it * BLOCK;
    if (chunk >= a.M) break;  // uniform: the rest of this block's range is past the sample
    float xv[VEC], c1[VEC], c2[VEC], m[VEC];
    combos<T, VECTOR, TWO, true, OP != OP_SCORE>(a, base, chunk, cf, a.use1, use2, xv, c1, c2);
    load_mask<T, VECTOR>(a.mask + (has_mask ? base : 0), has_mask, chunk, a.M, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s3 += (!finite(xv[j]) || !finite(c1[j]) || (TWO && !finite(c2[j]))) ? 1 : 0;
      if constexpr (OP == OP_SCORE) {
        const float d = c1[j], ph = phi(d, cc, huber);
        float psi;
        if (on_loss) {  // ψ = sqrt(d²+c²) − c, written without cancellation; or ½d²
          const float s = d * d + cc;  // sqrt(s) = s·rsqrt(s); |d| − c where d² overflows
          psi = huber ? (d * d < INFINITY ? __fdividef(d * d, s * rsqrtf(s) + hc) : fabsf(d) - hc) : 0.5f * d * d;
        } else {  // the ½(φ/w)² surrogate: ½φ² here, 1/w² in the finalize
          psi = 0.5f * ph * ph;
        }
        s0 += fabsf(xv[j] - c2[j]);  // c2 = the normaliser reference
        s1 += m[j] * psi;
        s2 += m[j];
        s4 = maxp(s4, m[j] * fabsf(ph));
      } else if constexpr (OP == OP_SID) {
        const float e = c1[j] - xv[j], diff = c1[j] - c2[j];
        s0 += fabsf(e);
        s1 += m[j] * diff * (e - alpha * diff);
        s2 += m[j];
        const float dfr = e + (1.0f - 2.0f * alpha) * diff, dff = 2.0f * alpha * diff - e;
        float big = fabsf(cf.a[0] * dfr + cf.bb[0] * dff - diff);
#pragma unroll
        for (int k = 0; k < MAXK; ++k)
          if (k < a.K && ((a.tgrad >> k) & 1u)) big = maxp(big, fabsf(cf.a[k + 1] * dfr + cf.bb[k + 1] * dff));
        s4 = maxp(s4, m[j] * big);
      } else if constexpr (OP == OP_SCM) {
        s0 += c1[j] * c1[j];
        s4 = maxp(s4, fabsf(c1[j]));
      } else {
        s0 += m[j] * c1[j] * c1[j];
        s2 += m[j];
        s4 = maxp(s4, m[j] * fabsf(cf.a[0] * c1[j]));
      }
    }
  }
  s0 = warp_sum(s0);
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  s3 = warp_sum(s3);
  s4 = warp_max(s4);
  if ((threadIdx.x & 31) == 0) {
    float* r = red[threadIdx.x >> 5];
    r[0] = s0, r[1] = s1, r[2] = s2, r[3] = (float)s3, r[4] = s4;  // s3 ≤ 2^24 per warp: exact
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // the warps in order
    float r[NSTAT] = {red[0][0], red[0][1], red[0][2], red[0][3], red[0][4]};
#pragma unroll
    for (int w = 1; w < NW; ++w) {
      for (int i = 0; i < 4; ++i) r[i] += red[w][i];
      r[4] = maxp(r[4], red[w][4]);
    }
    float* out = a.part + (b * a.NB + blk) * NSTAT;
    for (int i = 0; i < NSTAT; ++i) out[i] = r[i];
  }
}

// ----------------------------------------------------------------------------- pass 2: finalize
// κ = scale × {1/N_valid, 1, 1/B, 1} (SCORE/SID, by reduction), β = {1/B, 1, —, 1} (SCM/DENOISE).
// SCORE:   w = 1 | max(mean|x − ref|, clamp)+eps | global; gco = κh/w; L = gco·s1 (norm_on loss) or gco·s1/w
// SID:     w = max(mean|f_r−y|, clamp)+eps; gco = κ/w; L = gco·s1
// SID:     the gradient bound s4 covers y and the terms whose gradients are asked for (tgrad)
// SCM:     n = ‖g‖ (or /√M); inv = 1/(n+c); A = s0·inv² (/M); ℓ = β(h e^{−lv} A + lv);
//          gco = −2β h e^{−lv} inv (/M); dℓ/dlv = β(1 − h e^{−lv} A)
// DENOISE: inv = 1 or 1/Σm (0 if none valid); ℓ = βh·s0·inv; gco = 2βh·inv
// bad = any non-finite input or combination, a normaliser that is not finite and positive, or an
// overflowing largest gradient element (s4·gco); zero_sample zeroes its loss (SCM: keeps lv) and
// its gco, to_num instead maps the losses through nan_to_num (±FLT_MAX).
__global__ void __launch_bounds__(FIN_THREADS) score_finalize_kernel(const FinArgs a) {
  __shared__ float buf[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int64_t B = a.B;
  const int NB = a.NB;
  // per-sample sums of the partials: one warp per sample, lanes stride over the blocks
  for (int64_t b = warp; b < B; b += nw) {
    const float* p = a.part + b * NB * NSTAT;
    float v[NSTAT] = {};
#pragma unroll 4
    for (int blk = lane; blk < NB; blk += 32) {
      const float* q = p + (int64_t)blk * NSTAT;
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] += q[i];
      v[4] = maxp(v[4], q[4]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = warp_sum(v[i]);
    v[4] = warp_max(v[4]);
    if (lane == 0)
      for (int i = 0; i < NSTAT; ++i) a.sums[b * NSTAT + i] = v[i];
  }
  __syncthreads();  // makes the sums visible to the whole block
  float t0 = 0.0f, t2 = 0.0f;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    t0 += a.sums[b * NSTAT + 0];
    t2 += a.sums[b * NSTAT + 2];
  }
  const float tot0 = block_sum(t0, buf);
  const float tot2 = block_sum(t2, buf);

  const int op = a.op;
  const float scale = __ldg(a.prm + PRM_SCALE), clamp = __ldg(a.prm + PRM_CLAMP), eps = __ldg(a.prm + PRM_EPS);
  const float cn = __ldg(a.prm + PRM_C), gmax = __ldg(a.prm + PRM_GMAX);
  const bool to_num_ = a.flags & F_TO_NUM, sample_mean = a.flags & F_SAMPLE_MEAN;
  const float Mf = (float)a.M, Bf = (float)B;
  float kappa = scale, beta = 1.0f;
  if (op <= OP_SID) {
    if (a.red == 0) kappa = tot2 > 0.0f ? __fdiv_rn(scale, tot2) : 0.0f;
    else if (a.red == 2) kappa = __fdiv_rn(scale, Bf);
  } else if (a.red == 0) {
    beta = __fdiv_rn(1.0f, Bf);
  }
  const float w_glob = maxp(__fdiv_rn(tot0, (float)((double)B * (double)a.M)), clamp) + eps;

  float total = 0.0f;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const float* q = a.sums + b * NSTAT;
    const float v0 = q[0], v1 = q[1], v2 = q[2], v3 = q[3], v4 = q[4];
    float h = (a.flags & F_WEIGHT) ? a.weight[b] : 1.0f;
    if (op >= OP_SCM) h *= scale;  // a float weight arrives as scale
    float w = 1.0f, gco, loss, dlv = 0.0f;
    bool bad;
    if (op == OP_SCORE) {
      if (a.norm == 1) w = maxp(__fdiv_rn(v0, Mf), clamp) + eps;
      else if (a.norm == 2) w = w_glob;
      gco = __fdiv_rn(kappa * h, w);
      loss = (a.flags & F_NORM_ON_LOSS) ? gco * v1 : __fdiv_rn(gco * v1, w);
      bad = v3 > 0.0f || !(finite(w) && w > 0.0f) || !fits(v4 * gco, gmax) || !finite(h);
    } else if (op == OP_SID) {
      w = maxp(__fdiv_rn(v0, Mf), clamp) + eps;
      gco = __fdiv_rn(kappa, w);
      loss = gco * v1;
      bad = v3 > 0.0f || !(finite(w) && w > 0.0f) || !fits(v4 * gco, gmax);
    } else if (op == OP_SCM) {
      const float nrm = (a.flags & F_RMS) ? __fsqrt_rn(__fdiv_rn(v0, Mf)) : __fsqrt_rn(v0);
      w = nrm + cn;
      const float inv = w > 0.0f ? __fdiv_rn(1.0f, w) : 0.0f;
      float A = v0 * inv * inv;
      if (sample_mean) A = __fdiv_rn(A, Mf);
      float lv = 0.0f, wexp = h;
      if (a.flags & F_LOGVAR) {
        lv = a.logvar[b];
        wexp = h * (float)exp(-(double)lv);  // exact-ish e^{−lv} whatever the fast-math flags
      }
      gco = -2.0f * beta * wexp * inv;
      if (sample_mean) gco = __fdiv_rn(gco, Mf);
      bad = v3 > 0.0f || !finite(v0) || !finite(h) || !finite(lv) || !finite(wexp) || !fits(v4 * gco, gmax);
      float wa = wexp * A;
      const bool lv_ok = finite(lv);
      if (!to_num_) {  // a bad sample keeps only its logvar term (none if logvar is not finite)
        if (bad) wa = 0.0f;
        if (!lv_ok) lv = 0.0f;
      }
      loss = beta * (wa + lv);
      if (a.flags & F_LOGVAR) dlv = (to_num_ || lv_ok) ? beta * (1.0f - wa) : 0.0f;
    } else {
      const float inv = sample_mean ? (v2 > 0.0f ? __fdiv_rn(1.0f, v2) : 0.0f) : 1.0f;
      loss = beta * h * v0 * inv;
      gco = 2.0f * beta * h * inv;
      bad = v3 > 0.0f || !fits(v4 * gco, gmax) || !finite(h);
    }
    if (to_num_) {
      loss = to_num(loss, 0x1.fffffep+127f);
      dlv = to_num(dlv, 0x1.fffffep+127f);  // NaN -> 0, ±inf -> ±max (torch.nan_to_num)
    } else if (bad) {
      if (op != OP_SCM) loss = 0.0f;
      gco = 0.0f;
    }
    float* st = a.state + b * NSTATE;
    st[0] = gco, st[1] = w, st[2] = bad ? 1.0f : 0.0f, st[3] = dlv;
    a.loss_i[b] = loss;
    total += loss;
  }
  total = block_sum(total, buf);
  if (threadIdx.x == 0) a.loss[0] = total;
}

// ----------------------------------------------------------------------------- pass 3: gradients
// f = gco_b · upstream_b; with m = mask·f:
//   SCORE ∂/∂x = m φ(d);  SCM ∂/∂F = m g;  DENOISE ∂/∂pred = m a0 d
//   SID   e = f_r − y, Δ = f_r − f_f;  ∂/∂f_r = e + (1−2α)Δ,  ∂/∂f_f = 2αΔ − e
//         ∂/∂y = m(a0 ∂f_r + b0 ∂f_f − Δ)  (y enters both combinations through column 0 too)
//         ∂/∂T_k = m(a_k ∂f_r + b_k ∂f_f)
// Bad samples get zeros (zero_sample) or everything goes through nan_to_num in T (to_num).
template <typename T, int OP, bool VECTOR>
__global__ void __launch_bounds__(BLOCK / DT<T>::kVec, MIN_BLOCKS<T>) score_grad_kernel(const ElemArgs a) {
  constexpr int VEC = DT<T>::kVec;
  constexpr bool TWO = OP == OP_SID;
  constexpr bool NEED_X = OP != OP_SCORE;  // SCORE's d has no x column
  const int64_t b = blockIdx.x;
  const int blk = blockIdx.y;
  const int64_t base = b * a.M;
  Coefs cf;
  cf.load(a.coef + b * a.coef_sb, a.K);
  const bool has_mask = a.flags & F_MASK, huber = a.flags & F_HUBER, to_num_ = a.flags & F_TO_NUM;
  // to_num maps the op's own gradient, then the upstream gradient multiplies it (a GradScaler's overflow stays inf)
  const float go = __ldg(a.go + b * a.go_sb);
  const float f = to_num_ ? __ldg(a.state + b * NSTATE) : __ldg(a.state + b * NSTATE) * go;
  const bool bad = __ldg(a.state + b * NSTATE + 2) > 0.0f;
  const bool write_x = a.flags & F_WRITE_X;
  const float hc = __ldg(a.prm + PRM_HUBER_C), cc = hc * hc, alpha = __ldg(a.prm + PRM_ALPHA);
  const float vmax = DT<T>::max_finite();
  const unsigned use2 = TWO ? a.use2 : 0u, tgrad = TWO ? a.tgrad : 0u;

  const int64_t start = (int64_t)blk * a.n_iter * BLOCK;
  for (int it = 0; it < a.n_iter; ++it) {
    const int64_t chunk = start + (int64_t)it * BLOCK;
    if (chunk >= a.M) break;
    float xv[VEC], c1[VEC], c2[VEC], m[VEC], g[VEC];
    combos<T, VECTOR, TWO, NEED_X>(a, base, chunk, cf, a.use1, use2, xv, c1, c2);
    load_mask<T, VECTOR>(a.mask + (has_mask ? base : 0), has_mask, chunk, a.M, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      m[j] *= f;
      if constexpr (OP == OP_SCORE) {
        g[j] = m[j] * phi(c1[j], cc, huber);
      } else if constexpr (OP == OP_SID) {
        const float e = c1[j] - xv[j], diff = c1[j] - c2[j];
        const float dfr = e + (1.0f - 2.0f * alpha) * diff, dff = 2.0f * alpha * diff - e;
        g[j] = m[j] * (cf.a[0] * dfr + cf.bb[0] * dff - diff);
        c1[j] = dfr;  // keep ∂/∂f_r, ∂/∂f_f for the term gradients
        c2[j] = dff;
      } else if constexpr (OP == OP_SCM) {
        g[j] = m[j] * c1[j];
      } else {
        g[j] = m[j] * cf.a[0] * c1[j];
      }
      g[j] = to_num_ ? to_num(g[j], vmax) * go : (bad ? 0.0f : g[j]);
    }
    if (write_x) store_tile<T, VECTOR>(static_cast<T*>(a.gx) + base, chunk, a.M, g);
    if constexpr (OP == OP_SID) {
#pragma unroll
      for (int k = 0; k < MAXK; ++k) {
        if (k < a.K && ((tgrad >> k) & 1u)) {
          float gt[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float v = m[j] * (cf.a[k + 1] * c1[j] + cf.bb[k + 1] * c2[j]);
            gt[j] = to_num_ ? to_num(v, vmax) * go : (bad ? 0.0f : v);
          }
          store_tile<T, VECTOR>(static_cast<T*>(a.gterms.p[k]) + base, chunk, a.M, gt);
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- host launchers
// grid (B, NB) of 1024/VEC threads: the stats pass (GRAD false) or the gradient pass
template <typename T, int OP, bool VECTOR, bool GRAD>
cudaError_t launch(const ElemArgs& a, int64_t B, cudaStream_t s) {
  auto kernel = GRAD ? score_grad_kernel<T, OP, VECTOR> : score_stats_kernel<T, OP, VECTOR>;
  FD_LAUNCH(kernel, dim3((unsigned)B, (unsigned)a.NB), dim3(BLOCK / DT<T>::kVec), s, a);
  return cudaGetLastError();
}

template <typename T, bool GRAD>
cudaError_t launch_elem(int op, bool vector, const ElemArgs& a, int64_t B, cudaStream_t s) {
#define FD_SCORE_CASE(OPV) \
  case OPV: return vector ? launch<T, OPV, true, GRAD>(a, B, s) : launch<T, OPV, false, GRAD>(a, B, s);
  switch (op) {
    FD_SCORE_CASE(OP_SCORE)
    FD_SCORE_CASE(OP_SID)
    FD_SCORE_CASE(OP_SCM)
    FD_SCORE_CASE(OP_DENOISE)
    default: return cudaErrorInvalidValue;
  }
#undef FD_SCORE_CASE
}

template <bool GRAD>
cudaError_t dispatch_elem(int dtype, int op, const ElemArgs& a, int64_t B, cudaStream_t s) {
  const int vec = dtype == 0 ? 4 : 8;
  bool vector = a.M % vec == 0 && aligned16(a.x) && (a.mask == nullptr || aligned16(a.mask));
  for (int k = 0; k < a.K; ++k) vector = vector && aligned16(a.terms.p[k]);
  if (GRAD) {
    if (a.flags & F_WRITE_X) vector = vector && aligned16(a.gx);
    for (int k = 0; k < a.K; ++k)
      if ((a.tgrad >> k) & 1u) vector = vector && aligned16(a.gterms.p[k]);
  }
  switch (dtype) {
    case 0: return launch_elem<float, GRAD>(op, vector, a, B, s);
    case 1: return launch_elem<__half, GRAD>(op, vector, a, B, s);
    case 2: return launch_elem<__nv_bfloat16, GRAD>(op, vector, a, B, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fd_score

// Public host API (declared again in bindings.cpp; C++ linkage, so a signature mismatch fails to link).

// The Triton block partitioning: each of NB blocks reduces n_iter·1024 elements of a sample.
void fd_score_blocking(int64_t M, int* n_iter, int* nb) {
  using namespace fd_score;
  const int64_t nblk = M > 0 ? (M + BLOCK - 1) / BLOCK : 1;
  const int64_t it = (nblk + MAX_BLOCKS_PER_SAMPLE - 1) / MAX_BLOCKS_PER_SAMPLE;
  *n_iter = (int)it;
  *nb = (int)((nblk + it - 1) / it);
}

namespace fd_score {
// The fields that both element-wise passes take.
ElemArgs elem_args(const void* x, const void* const* terms, int K, const float* coef, int64_t coef_sb,
                   const uint8_t* mask, int64_t M, unsigned use1, int flags, const float* prm) {
  ElemArgs a = {};
  a.x = x;
  for (int k = 0; k < K; ++k) a.terms.p[k] = terms[k];
  a.coef = coef, a.coef_sb = coef_sb, a.mask = (flags & F_MASK) ? mask : nullptr, a.M = M, a.K = K;
  fd_score_blocking(M, &a.n_iter, &a.NB);
  a.use1 = use1, a.flags = flags, a.prm = prm;
  return a;
}
}  // namespace fd_score

// dtype: 0 float32, 1 float16, 2 bfloat16. flags: the F_* bits above. prm: the fp32 parameter vector [7]
// (PRM_*; its gradient range is the largest finite value of the dtype). part [B, NB, 5] and sums [B, 5] are fp32
// scratch; state [B, 4], loss_i [B], loss [1] fp32 outputs.
cudaError_t fd_score_fwd(int op, int dtype, const void* x, const void* const* terms, int K, const float* coef,
                         int64_t coef_sb, const uint8_t* mask, const float* weight, const float* logvar,
                         float* part, float* sums, float* state, float* loss_i, float* loss, int64_t B, int64_t M,
                         unsigned use1, unsigned use2, unsigned tneed, int flags, int norm, int red, const float* prm,
                         cudaStream_t stream) {
  using namespace fd_score;
  if (B <= 0 || M <= 0) return cudaSuccess;
  if (K < 0 || K > MAXK) return cudaErrorInvalidValue;
  ElemArgs a = elem_args(x, terms, K, coef, coef_sb, mask, M, use1, flags, prm);
  a.use2 = op <= OP_SID ? use2 : 0u;
  a.tgrad = op == OP_SID ? tneed : 0u;  // stats: the term gradients whose overflow marks a sample bad
  a.part = part;
  const cudaError_t err = dispatch_elem<false>(dtype, op, a, B, stream);
  if (err != cudaSuccess) return err;
  const FinArgs f = {part, sums, weight, logvar, state, loss_i, loss, B, M, a.NB, op, norm, red,
                     flags | (weight ? F_WEIGHT : 0) | (logvar ? F_LOGVAR : 0), prm};
  auto fin = score_finalize_kernel;
  FD_LAUNCH(fin, dim3(1), dim3(FIN_THREADS), stream, f);
  return cudaGetLastError();
}

// grad_out: fp32 [1] (go_sb 0) or [B] (go_sb 1); prm: as fd_score_fwd's (huber_c and alpha read). gx is written when flags has F_WRITE_X; term k's
// gradient when bit k of tgrad is set (SID only).
cudaError_t fd_score_bwd(int op, int dtype, const void* x, const void* const* terms, int K, const float* coef,
                         int64_t coef_sb, const uint8_t* mask, const float* state, const float* grad_out,
                         int64_t go_sb, void* gx, void* const* gterms, unsigned tgrad, int64_t B, int64_t M,
                         unsigned use1, unsigned use2, int flags, const float* prm, cudaStream_t stream) {
  using namespace fd_score;
  if (B <= 0 || M <= 0) return cudaSuccess;
  if (K < 0 || K > MAXK) return cudaErrorInvalidValue;
  ElemArgs a = elem_args(x, terms, K, coef, coef_sb, mask, M, use1, flags, prm);
  for (int k = 0; k < K; ++k) a.gterms.p[k] = gterms[k];
  a.use2 = op == OP_SID ? use2 : 0u;
  a.tgrad = op == OP_SID ? tgrad : 0u;
  a.state = state, a.go = grad_out, a.go_sb = go_sb, a.gx = gx;
  return dispatch_elem<true>(dtype, op, a, B, stream);
}
