// Helpers shared by the CUDA sources in csrc/ (score.cu, kd_softmax.cu): element-type traits,
// 16-byte word access, warp-shuffle sums, the FD_LAUNCH hook and the 16-byte alignment test.
// Header-only (inline functions and templates); each .cu includes it and pulls namespace fd into
// its own namespace. Per-file tuning (launch bounds, tile layouts) stays in the .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// The launch goes through FD_LAUNCH so that a host emulation of the CUDA execution model
// (tests/test_csrc_build.py) can run these exact kernels on the CPU.
#ifndef FD_LAUNCH
#define FD_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace fd {

// ----------------------------------------------------------------------------- element types
__device__ __forceinline__ unsigned word(const uint4& r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// DT<T>: 16-byte vector width, scalar/vector load and store through bit patterns (the build
// defines __CUDA_NO_HALF_OPERATORS__ / _CONVERSIONS__, so only explicit intrinsics are used),
// and the largest finite value of T (the nan_to_num clamp of a gradient written in T).
// load1<NC>: NC (the default) reads through __ldg (read-only); NC false is a plain load, for
// kernels whose output may alias their input.
template <typename T>
struct DT;

template <>
struct DT<float> {
  static constexpr int kVec = 4;
  __device__ static float max_finite() { return 0x1.fffffep+127f; }
  template <bool NC = true>
  __device__ static float load1(const float* p) {
    if constexpr (NC) return __ldg(p);
    return *p;
  }
  __device__ static void store1(float* p, float v) { *p = v; }
  __device__ static float elem(const uint4& r, int j) { return __uint_as_float(word(r, j)); }
  __device__ static uint4 pack(const float (&v)[4]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};

template <typename T>
struct Bits16;  // float <-> the bit pattern of a 16-bit type
template <>
struct Bits16<__half> {
  __device__ static float max_finite() { return 65504.0f; }
  __device__ static float to_float(unsigned b) { return __half2float(__ushort_as_half((unsigned short)b)); }
  __device__ static unsigned from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct Bits16<__nv_bfloat16> {
  __device__ static float max_finite() { return 0x1.fep+127f; }  // 3.3895e38, exactly representable
  __device__ static float to_float(unsigned b) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)b)); }
  __device__ static unsigned from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <typename T>  // __half, __nv_bfloat16: element j of a 16-byte vector is half j&1 of word j/2
struct DT : Bits16<T> {
  using B16 = Bits16<T>;
  static constexpr int kVec = 8;
  template <bool NC = true>
  __device__ static float load1(const T* p) {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    if constexpr (NC) return B16::to_float(__ldg(q));
    return B16::to_float(*q);
  }
  __device__ static void store1(T* p, float v) { *reinterpret_cast<unsigned short*>(p) = (unsigned short)B16::from_float(v); }
  __device__ static float elem(const uint4& r, int j) {
    const unsigned w = word(r, j >> 1);
    return B16::to_float((j & 1) ? (w >> 16) : (w & 0xffffu));
  }
  __device__ static uint4 pack(const float (&v)[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = B16::from_float(v[2 * i]) | (B16::from_float(v[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// ----------------------------------------------------------------------------- warp reductions
// Sum over the 32 lanes of a warp by a fixed shuffle tree (the result is valid in every lane).
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ----------------------------------------------------------------------------- host helpers
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace fd
