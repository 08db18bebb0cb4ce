// pybind11 module fastdistill._C: the torch-free CUDA extension. Device pointers arrive as
// integers (tensor.data_ptr()), the stream as an integer (torch's cuda_stream); the Python glue
// (fastdistill/ops/_score_cuda.py, fastdistill/ops/_kd_cuda.py) allocates every output. Argument
// errors raise ValueError before anything is launched; CUDA errors raise RuntimeError with the
// CUDA error string.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifndef FD_EXT_ABI
#error "FD_EXT_ABI must be defined by the build (setup.py)"
#endif
#ifndef FD_CUDA_ARCHS
#define FD_CUDA_ARCHS "unknown"
#endif
#ifndef FD_BUILD_TORCH
#define FD_BUILD_TORCH "unknown"
#endif

namespace py = pybind11;

// csrc/score.cu (C++ linkage: a signature that drifts from the definition fails to link)
void fd_score_blocking(int64_t M, int* n_iter, int* nb);
cudaError_t fd_score_fwd(int op, int dtype, const void* x, const void* const* terms, int K, const float* coef,
                         int64_t coef_sb, const uint8_t* mask, const float* weight, const float* logvar,
                         float* part, float* sums, float* state, float* loss_i, float* loss, int64_t B, int64_t M,
                         unsigned use1, unsigned use2, unsigned tneed, int flags, int norm, int red, const float* prm,
                         cudaStream_t stream);
cudaError_t fd_score_bwd(int op, int dtype, const void* x, const void* const* terms, int K, const float* coef,
                         int64_t coef_sb, const uint8_t* mask, const float* state, const float* grad_out,
                         int64_t go_sb, void* gx, void* const* gterms, unsigned tgrad, int64_t B, int64_t M,
                         unsigned use1, unsigned use2, int flags, const float* prm, cudaStream_t stream);

// csrc/kd_softmax.cu
cudaError_t fd_kd_fwd(int dtype, const void* s, const void* t, const void* labels, bool labels_i64,
                      const uint8_t* mask, const float* weights, const float* prm, float* st, float* loss,
                      float* factor, int64_t N, int64_t V, int64_t Vt, int64_t s_stride, int64_t t_stride,
                      int64_t rows_per_group, int64_t s_gstride, int64_t t_gstride, int64_t ignore_index, int div,
                      int red, bool ce, bool ce_sep, bool softcap, float num_items, cudaStream_t stream);
cudaError_t fd_kd_bwd(int dtype, const void* s, const void* t, const void* labels, bool labels_i64,
                      const float* weights, const float* prm, const float* st, const float* factor,
                      const float* grad_out, int64_t go_stride, void* out, int64_t N, int64_t V, int64_t Vt,
                      int64_t s_stride, int64_t t_stride, int64_t o_stride, int64_t rows_per_group,
                      int64_t s_gstride, int64_t t_gstride, int64_t o_gstride, int div, bool ce, bool softcap,
                      cudaStream_t stream);

namespace {

constexpr int kMaxTerms = 8;
constexpr int64_t kKdMaxCols = int64_t(1) << 30;  // column indices are 32-bit in the kd kernels
// must match the F_* bits in score.cu
constexpr int F_MASK = 1, F_HUBER = 2, F_NORM_ON_LOSS = 4, F_TO_NUM = 8, F_WRITE_X = 16;
constexpr int F_SAMPLE_MEAN = 32, F_RMS = 64;

[[noreturn]] void bad_arg(const std::string& msg) { throw py::value_error("fastdistill._C.score: " + msg); }

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastdistill._C.") + what + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

void require_ptr(std::uintptr_t p, const char* name) {
  if (p == 0) bad_arg(std::string(name) + ": expected a device pointer, got 0 (null)");
}

// Checks shared by score_fwd and score_bwd; returns K.
int check_common(int op, int dtype, std::uintptr_t x, const std::vector<std::uintptr_t>& terms, std::uintptr_t coef,
                 int64_t coef_sb, int64_t B, int64_t M, unsigned use1, unsigned use2, bool has_mask,
                 std::uintptr_t mask, std::uintptr_t prm) {
  if (op < 0 || op > 3) bad_arg("op: expected 0 (score), 1 (sid), 2 (scm) or 3 (denoise), got " + std::to_string(op));
  if (dtype < 0 || dtype > 2)
    bad_arg("dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  const int K = (int)terms.size();
  if (K > kMaxTerms)
    bad_arg("terms: at most " + std::to_string(kMaxTerms) + " term tensors are supported, got " + std::to_string(K));
  if (B < 0 || M < 0) bad_arg("B, M: expected non-negative sizes, got B=" + std::to_string(B) + ", M=" + std::to_string(M));
  if (B > 0x7fffffffLL) bad_arg("B: at most 2^31 - 1 samples, got " + std::to_string(B));
  if (coef_sb < 0) bad_arg("coef_sb: expected >= 0, got " + std::to_string(coef_sb));
  const unsigned valid = (1u << K) - 1u;  // K <= 8
  if ((use1 & ~valid) || (use2 & ~valid))
    bad_arg("use1/use2: bitmasks name a term index >= K=" + std::to_string(K));
  if (B > 0 && M > 0) {
    require_ptr(x, "x");
    require_ptr(coef, "coef");
    require_ptr(prm, "prm");
    for (int k = 0; k < K; ++k)
      if (terms[k] == 0) bad_arg("terms[" + std::to_string(k) + "]: expected a device pointer, got 0 (null)");
    if (has_mask) require_ptr(mask, "mask");
  }
  return K;
}

std::string runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return "unknown";
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::pair<int, int> score_blocking(int64_t M) {
  if (M < 0) bad_arg("M: expected >= 0, got " + std::to_string(M));
  int n_iter = 0, nb = 0;
  fd_score_blocking(M, &n_iter, &nb);
  return {n_iter, nb};
}

void score_fwd(int op, int dtype, std::uintptr_t x, const std::vector<std::uintptr_t>& terms, std::uintptr_t coef,
               int64_t coef_sb, std::uintptr_t mask, std::uintptr_t weight, std::uintptr_t logvar, std::uintptr_t part,
               std::uintptr_t sums, std::uintptr_t state, std::uintptr_t loss_i, std::uintptr_t loss, int64_t B,
               int64_t M, unsigned use1, unsigned use2, unsigned tneed, bool phi_huber, bool norm_on_loss, int norm,
               int red, bool sample_mean, bool rms, bool to_num, std::uintptr_t prm, std::uintptr_t stream) {
  const int K = check_common(op, dtype, x, terms, coef, coef_sb, B, M, use1, use2, mask != 0, mask, prm);
  if (norm < 0 || norm > 2) bad_arg("norm: expected 0 (none), 1 (per sample) or 2 (global), got " + std::to_string(norm));
  if (red < 0 || red > 3) bad_arg("red: expected 0 (mean), 1 (sum), 2 (batchmean) or 3 (none), got " + std::to_string(red));
  if (B > 0 && M > 0) {
    require_ptr(part, "part");
    require_ptr(sums, "sums");
    require_ptr(state, "state");
    require_ptr(loss_i, "loss_i");
    require_ptr(loss, "loss");
  }
  const int flags = (mask ? F_MASK : 0) | (phi_huber ? F_HUBER : 0) | (norm_on_loss ? F_NORM_ON_LOSS : 0) |
                    (to_num ? F_TO_NUM : 0) | (sample_mean ? F_SAMPLE_MEAN : 0) | (rms ? F_RMS : 0);
  std::vector<const void*> tp(terms.size());
  for (size_t k = 0; k < terms.size(); ++k) tp[k] = reinterpret_cast<const void*>(terms[k]);
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = fd_score_fwd(op, dtype, reinterpret_cast<const void*>(x), tp.data(), K, reinterpret_cast<const float*>(coef),
                       coef_sb, reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<const float*>(weight),
                       reinterpret_cast<const float*>(logvar), reinterpret_cast<float*>(part),
                       reinterpret_cast<float*>(sums), reinterpret_cast<float*>(state), reinterpret_cast<float*>(loss_i),
                       reinterpret_cast<float*>(loss), B, M, use1, use2, tneed, flags, norm, red,
                       reinterpret_cast<const float*>(prm), reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "score_fwd");
}

void score_bwd(int op, int dtype, std::uintptr_t x, const std::vector<std::uintptr_t>& terms, std::uintptr_t coef,
               int64_t coef_sb, std::uintptr_t mask, std::uintptr_t state, std::uintptr_t grad_out, int64_t go_sb,
               std::uintptr_t gx, const std::vector<std::uintptr_t>& gterms, int64_t B, int64_t M, unsigned use1,
               unsigned use2, bool phi_huber, bool to_num, std::uintptr_t prm, std::uintptr_t stream) {
  const int K = check_common(op, dtype, x, terms, coef, coef_sb, B, M, use1, use2, mask != 0, mask, prm);
  if ((int)gterms.size() != K)
    bad_arg("gterms: expected one entry per term (" + std::to_string(K) + "), got " + std::to_string(gterms.size()));
  if (go_sb != 0 && go_sb != 1) bad_arg("go_sb: expected 0 (scalar upstream gradient) or 1 ([B]), got " + std::to_string(go_sb));
  unsigned tgrad = 0;
  for (int k = 0; k < K; ++k)
    if (gterms[k]) tgrad |= 1u << k;
  if (tgrad && op != 1) bad_arg("gterms: term gradients exist only for op 1 (sid); the other ops' terms are constants");
  if (B > 0 && M > 0) {
    require_ptr(state, "state");
    require_ptr(grad_out, "grad_out");
  }
  const int flags = (mask ? F_MASK : 0) | (phi_huber ? F_HUBER : 0) | (to_num ? F_TO_NUM : 0) | (gx ? F_WRITE_X : 0);
  std::vector<const void*> tp(K);
  std::vector<void*> gp(K);
  for (int k = 0; k < K; ++k) {
    tp[k] = reinterpret_cast<const void*>(terms[k]);
    gp[k] = reinterpret_cast<void*>(gterms[k]);
  }
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = fd_score_bwd(op, dtype, reinterpret_cast<const void*>(x), tp.data(), K, reinterpret_cast<const float*>(coef),
                       coef_sb, reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<const float*>(state),
                       reinterpret_cast<const float*>(grad_out), go_sb, reinterpret_cast<void*>(gx), gp.data(), tgrad, B,
                       M, use1, use2, flags, reinterpret_cast<const float*>(prm),
                       reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "score_bwd");
}

// ----------------------------------------------------------------------------- kd_loss
[[noreturn]] void bad_kd(const std::string& msg) { throw py::value_error("fastdistill._C.kd: " + msg); }

void kd_require_ptr(std::uintptr_t p, const char* name) {
  if (p == 0) bad_kd(std::string(name) + ": expected a device pointer, got 0 (null)");
}

// Checks shared by kd_fwd and kd_bwd.
void kd_check_common(int dtype, std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, std::uintptr_t prm,
                     std::uintptr_t st, int64_t N, int64_t V, int64_t Vt, int64_t s_stride, int64_t t_stride,
                     int64_t rows_per_group, int64_t s_gstride, int64_t t_gstride, int div, bool ce) {
  if (dtype < 0 || dtype > 2)
    bad_kd("dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  if (div < 0 || div > 5)
    bad_kd("div: expected 0 (fkl), 1 (rkl), 2 (jsd), 3 (skl), 4 (srkl) or 5 (tvd), got " + std::to_string(div));
  if (N < 0 || V < 0 || Vt < 0)
    bad_kd("N, V, Vt: expected non-negative sizes, got N=" + std::to_string(N) + ", V=" + std::to_string(V) +
           ", Vt=" + std::to_string(Vt));
  if (N > 0x7fffffffLL) bad_kd("N: at most 2^31 - 1 rows, got " + std::to_string(N));
  if (V > kKdMaxCols || Vt > kKdMaxCols)
    bad_kd("V, Vt: at most 2^30 columns, got V=" + std::to_string(V) + ", Vt=" + std::to_string(Vt));
  if (s_stride < 0 || t_stride < 0)
    bad_kd("s_stride, t_stride: expected >= 0 (row strides in elements), got " + std::to_string(s_stride) + ", " +
           std::to_string(t_stride));
  if (rows_per_group < 1 || (N > rows_per_group && N % rows_per_group != 0))
    bad_kd("rows_per_group: expected >= 1 and a divisor of N=" + std::to_string(N) + " (or >= N), got " +
           std::to_string(rows_per_group));
  if (s_gstride < 0 || t_gstride < 0)
    bad_kd("s_gstride, t_gstride: expected >= 0 (group strides in elements), got " + std::to_string(s_gstride) +
           ", " + std::to_string(t_gstride));
  if (div == 1 && Vt < V)
    bad_kd("div=1 (rkl) with Vt=" + std::to_string(Vt) + " < V=" + std::to_string(V) +
           ": reverse KL is infinite where the student has mass and the teacher none");
  if (ce && labels == 0) bad_kd("ce: the cross-entropy term needs labels");
  if (N > 0 && V > 0) {
    kd_require_ptr(s, "s");
    if (Vt > 0) kd_require_ptr(t, "t");
    kd_require_ptr(prm, "prm");
    kd_require_ptr(st, "st");
  }
}

void kd_fwd(int dtype, std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, bool labels_i64, std::uintptr_t mask,
            std::uintptr_t weights, std::uintptr_t prm, std::uintptr_t st, std::uintptr_t loss, std::uintptr_t factor,
            int64_t N, int64_t V, int64_t Vt, int64_t s_stride, int64_t t_stride, int64_t rows_per_group,
            int64_t s_gstride, int64_t t_gstride, int64_t ignore_index, int div, int red, bool ce, bool ce_sep,
            bool softcap, double num_items, std::uintptr_t stream) {
  kd_check_common(dtype, s, t, labels, prm, st, N, V, Vt, s_stride, t_stride, rows_per_group, s_gstride, t_gstride,
                  div, ce);
  if (red < 0 || red > 3)
    bad_kd("red: expected 0 (batchmean), 1 (sum), 2 (mean) or 3 (none), got " + std::to_string(red));
  if (ce_sep && !ce) bad_kd("ce_sep: a separate untempered lse exists only with ce");
  if (!(num_items >= 0.0)) bad_kd("num_items: expected >= 0 (0: the valid-row count), got " + std::to_string(num_items));
  if (N > 0 && V > 0) {
    kd_require_ptr(loss, "loss");
    kd_require_ptr(factor, "factor");
  }
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = fd_kd_fwd(dtype, reinterpret_cast<const void*>(s), reinterpret_cast<const void*>(t),
                    reinterpret_cast<const void*>(labels), labels_i64, reinterpret_cast<const uint8_t*>(mask),
                    reinterpret_cast<const float*>(weights), reinterpret_cast<const float*>(prm),
                    reinterpret_cast<float*>(st), reinterpret_cast<float*>(loss), reinterpret_cast<float*>(factor), N,
                    V, Vt, s_stride, t_stride, rows_per_group, s_gstride, t_gstride, ignore_index, div, red, ce, ce_sep,
                    softcap, (float)num_items,
                    reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "kd_fwd");
}

void kd_bwd(int dtype, std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, bool labels_i64,
            std::uintptr_t weights, std::uintptr_t prm, std::uintptr_t st, std::uintptr_t factor,
            std::uintptr_t grad_out, int64_t go_stride, std::uintptr_t out, int64_t N, int64_t V, int64_t Vt,
            int64_t s_stride, int64_t t_stride, int64_t o_stride, int64_t rows_per_group, int64_t s_gstride,
            int64_t t_gstride, int64_t o_gstride, int div, bool ce, bool softcap, std::uintptr_t stream) {
  kd_check_common(dtype, s, t, labels, prm, st, N, V, Vt, s_stride, t_stride, rows_per_group, s_gstride, t_gstride,
                  div, ce);
  if (go_stride != 0 && go_stride != 1)
    bad_kd("go_stride: expected 0 (scalar upstream gradient) or 1 ([N]), got " + std::to_string(go_stride));
  if (o_stride < 0 || o_gstride < 0)
    bad_kd("o_stride, o_gstride: expected >= 0, got " + std::to_string(o_stride) + ", " + std::to_string(o_gstride));
  if (N > 0 && V > 0) {
    kd_require_ptr(factor, "factor");
    kd_require_ptr(grad_out, "grad_out");
    kd_require_ptr(out, "out");
    // rows disjoint: the (count, stride) pairs of the row and group dims sorted by stride (either order: e.g.
    // seq-first logits transposed), the smaller stride at least V, the larger spanning the smaller's rows
    const int64_t R = rows_per_group < N ? rows_per_group : N, G = N > R ? N / R : 1;
    int64_t na = R, sa = o_stride, nb = G, sb = o_gstride;
    if (na > 1 && nb > 1 && sb < sa) std::swap(na, nb), std::swap(sa, sb);
    if (na > 1 && sa < V)
      bad_kd("o_stride: rows of out overlap (stride " + std::to_string(sa) + " < V=" + std::to_string(V) + ")");
    if (nb > 1 && sb < (na > 1 ? (na - 1) * sa : 0) + V)
      bad_kd("o_gstride: groups of rows of out overlap (o_gstride=" + std::to_string(o_gstride) + ")");
  }
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = fd_kd_bwd(dtype, reinterpret_cast<const void*>(s), reinterpret_cast<const void*>(t),
                    reinterpret_cast<const void*>(labels), labels_i64, reinterpret_cast<const float*>(weights),
                    reinterpret_cast<const float*>(prm), reinterpret_cast<const float*>(st),
                    reinterpret_cast<const float*>(factor), reinterpret_cast<const float*>(grad_out), go_stride,
                    reinterpret_cast<void*>(out), N, V, Vt, s_stride, t_stride, o_stride, rows_per_group, s_gstride,
                    t_gstride, o_gstride, div, ce, softcap,
                    reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "kd_bwd");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdistill CUDA kernels (torch-free; called through fastdistill.ops._score_cuda)";
  m.attr("EXT_ABI") = FD_EXT_ABI;
  m.attr("CUDA_ARCHS") = FD_CUDA_ARCHS;
  m.attr("BUILD_TORCH") = FD_BUILD_TORCH;
  m.attr("CUDA_RUNTIME") = runtime_version();
  m.attr("SCORE_MAX_TERMS") = kMaxTerms;

  m.def("score_blocking", &score_blocking, py::arg("M"),
        "(n_iter, NB): the score kernels cut each sample of M elements into NB blocks of n_iter*1024 elements; "
        "the partials buffer of score_fwd is [B, NB, 5] float32.");
  m.def("score_fwd", &score_fwd, py::arg("op"), py::arg("dtype"), py::arg("x"), py::arg("terms"), py::arg("coef"),
        py::arg("coef_sb"), py::arg("mask"), py::arg("weight"), py::arg("logvar"), py::arg("part"), py::arg("sums"),
        py::arg("state"), py::arg("loss_i"), py::arg("loss"), py::arg("B"), py::arg("M"), py::arg("use1"),
        py::arg("use2"), py::arg("tneed"), py::arg("phi_huber"), py::arg("norm_on_loss"), py::arg("norm"), py::arg("red"),
        py::arg("sample_mean"), py::arg("rms"), py::arg("to_num"), py::arg("prm"), py::arg("stream"),
        "Passes 1-2 of a score op on [B, M] inputs (x and the K <= 8 terms of one dtype: 0 float32, 1 float16, "
        "2 bfloat16; coef float32 [Bc, 2, K+1]; mask uint8 [B, M] or 0; weight/logvar float32 [B] or 0; tneed: sid's "
        "terms whose gradients will be asked for, a bitmask; prm float32 [7] on the device: huber_c, alpha, scale, "
        "clamp, eps, c and the gradient range, the largest finite value of the inputs' dtype). Writes "
        "part [B, NB, 5], sums [B, 5] (scratch) and state [B, 4], loss_i [B], loss [1] (float32).");
  m.def("score_bwd", &score_bwd, py::arg("op"), py::arg("dtype"), py::arg("x"), py::arg("terms"), py::arg("coef"),
        py::arg("coef_sb"), py::arg("mask"), py::arg("state"), py::arg("grad_out"), py::arg("go_sb"), py::arg("gx"),
        py::arg("gterms"), py::arg("B"), py::arg("M"), py::arg("use1"), py::arg("use2"), py::arg("phi_huber"),
        py::arg("to_num"), py::arg("prm"), py::arg("stream"),
        "Pass 3: writes the gradient of x (gx, or 0 to skip) and, for sid, of term k (gterms[k], or 0), in the "
        "inputs' dtype. grad_out float32 [1] (go_sb 0) or [B] (go_sb 1); prm as score_fwd's (huber_c and alpha read).");

  m.def("kd_fwd", &kd_fwd, py::arg("dtype"), py::arg("s"), py::arg("t"), py::arg("labels"), py::arg("labels_i64"),
        py::arg("mask"), py::arg("weights"), py::arg("prm"), py::arg("st"), py::arg("loss"), py::arg("factor"),
        py::arg("N"), py::arg("V"), py::arg("Vt"), py::arg("s_stride"), py::arg("t_stride"),
        py::arg("rows_per_group"), py::arg("s_gstride"), py::arg("t_gstride"), py::arg("ignore_index"), py::arg("div"), py::arg("red"), py::arg("ce"), py::arg("ce_sep"), py::arg("softcap"), py::arg("num_items"),
        py::arg("stream"),
        "Forward passes of kd_loss on student s [N, V] and teacher t [N, Vt] logits of one dtype (0 float32, "
        "1 float16, 2 bfloat16; unit column stride, row strides s_stride / t_stride in elements; rows come "
        "rows_per_group a group, group-major, groups s_gstride / t_gstride apart: row r starts at "
        "(r / rows_per_group) * gstride + (r % rows_per_group) * stride; one group: rows_per_group = N). labels int32 / "
        "int64 [N] (labels_i64) or 0, mask uint8 [N] or 0, weights float32 [N] or 0, prm float32 [10] "
        "(inv_T, inv_Tt, alpha, t2, logit_scale, softcap or 1, beta, skew). div: 0 fkl .. 5 tvd; red: 0 batchmean, "
        "1 sum, 2 mean, 3 none; ce: the alpha*CE term; ce_sep: T != 1 (a separate untempered lse); softcap: "
        "apply prm[5]; num_items > 0 replaces the valid-row count. Writes st [N, 11], loss [1], factor [1] (float32).");
  m.def("kd_bwd", &kd_bwd, py::arg("dtype"), py::arg("s"), py::arg("t"), py::arg("labels"), py::arg("labels_i64"),
        py::arg("weights"), py::arg("prm"), py::arg("st"), py::arg("factor"), py::arg("grad_out"),
        py::arg("go_stride"), py::arg("out"), py::arg("N"), py::arg("V"), py::arg("Vt"), py::arg("s_stride"),
        py::arg("t_stride"), py::arg("o_stride"), py::arg("rows_per_group"), py::arg("s_gstride"),
        py::arg("t_gstride"), py::arg("o_gstride"), py::arg("div"), py::arg("ce"), py::arg("softcap"), py::arg("stream"),
        "Backward pass of kd_loss: the gradient w.r.t. the raw student logits into out [N, V] (the student dtype, "
        "row stride o_stride, group stride o_gstride; may be s itself). grad_out float32 [1] (go_stride 0) or [N] (go_stride 1); st and "
        "factor from kd_fwd.");
}
