// Torch-free launchers of the CUDA C++ kernels, shared by the kernel files (.cu, compiled by nvcc) and the Torch
// binding (vision_ops.cpp, compiled by the host compiler).
//
// Each launcher takes raw pointers, sizes and a stream, checks what the kernel assumes, launches, and returns a
// Status (common.h). It never synchronises. The section under __CUDACC__ holds small helpers of the kernel files;
// they are __host__ __device__ so a host program can run a kernel's per-thread body to test its index math.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
// The binding needs only the stream type. Declared as driver_types.h declares it (repeating an identical typedef
// is legal if cuda_runtime.h comes in later), so the .cpp needs no CUDA header and compiles against a CPU-only
// torch as well (CI's syntax check).
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
#endif

#include "common.h"

namespace qwen2vl_fast {

// Storage dtypes of kernel inputs/outputs; the binding maps at::ScalarType to these.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Most image channels patch_gather takes (mean/std travel by value in the kernel's parameters).
constexpr int kPatchGatherMaxChannels = 4;

// 2D rotary of the vision tower, in place on the q and k parts of a fused qkv projection output.
//   qkv: S rows of 3*H*D elements (q | k | v, each head-major), rows `row_stride` elements apart, last dim
//        contiguous, dtype `dtype_code`;
//   cos, sin: (S, D) fp32, contiguous.
// q[d] <- q[d]*cos[d] - q[d+D/2]*sin[d], q[d+D/2] <- q[d+D/2]*cos[d+D/2] + q[d]*sin[d+D/2] (same for k), in fp32
// with every product and sum rounded once (no FMA contraction, no flush to zero), rounded once to the dtype;
// v is not touched. Supported head_dim: 64, 80, 128 (else kBadShape). 16-byte accesses when qkv, its row stride,
// cos and sin allow them, else a scalar path.
int qwen2vl_rotary_2d(void* qkv, const float* cos, const float* sin, int64_t S, int H, int D, int64_t row_stride,
                      int dtype_code, cudaStream_t stream);

// Normalise + gather resized uint8 frames into the vision tower's patch rows (the patch-embedding GEMM input).
//   frames: (T, C, H, W) uint8, contiguous; mean, std: C floats in HOST memory (e.g. OPENAI CLIP's);
//   out: (N, C*tp*p*p) rows of dtype `dtype_code`, contiguous, N = ceil(T/tp) * (H/p) * (W/p).
// Row order: temporal patch, H/(p*m), W/(p*m), then the m*m patches of the merge group in raster order; columns
// (c, t, py, px). Value: (x - fl32(mean*255)) / fl32(std*255) in fp32 (correctly rounded, as
// processing/patchify.py::normalize_patchify computes it), rounded once to the dtype. When T % tp != 0 the last
// frame repeats. H and W must be multiples of p*m (else kBadShape); C <= kPatchGatherMaxChannels.
int qwen2vl_patch_gather(const uint8_t* frames, void* out, int64_t T, int C, int64_t H, int64_t W, const float* mean,
                         const float* std, int patch, int temporal_patch, int merge, int dtype_code,
                         cudaStream_t stream);

// Weight-only int4/int8 GEMM for decode (M <= 16 rows): y = x @ dequant(W)^T (+ bias), csrc/quant_decode_gemm.cu.
//   x: (M, K) fp16/bf16 (`dtype_code`), rows `x_stride` elements apart, 16-byte (int4) / 8-byte (int8) aligned;
//   qweight: int32 (K * bits / 32, N), scales / zeros: (K / group, N) in x's dtype, zeros integer-valued (the
//   runtime layout of qwen2vl_fast/quant/weight.py; group_size -1 = one group), bias: (N,) or null;
//   y: (M, N) contiguous. All but x contiguous and 16-byte aligned.
//   Shapes: 1 <= M <= 16 (0 is a no-op), N % 8 == 0, K and the group size multiples of 32 (int4) / 16 (int8).
//   Workspace (split-K): `scratch` of at least *scratch_floats fp32 and `counters` of at least *counters int32
//   holding zeros, as qwen2vl_quant_decode_workspace reports for the current device (both 0 when not split).
//   The kernel leaves the counters at zero again, so one zeroed buffer serves every launch on one stream.
int qwen2vl_quant_decode_workspace(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code,
                                   int64_t* scratch_floats, int64_t* counters);
int qwen2vl_quant_gemm_decode(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                              const void* zeros, const void* bias, void* y, float* scratch, int64_t scratch_floats,
                              int32_t* counters, int64_t counters_len, int64_t M, int64_t N, int64_t K, int bits,
                              int64_t group_size, int dtype_code, cudaStream_t stream);

// The same GEMM with a Marlin-class inner loop (csrc/quant_decode_marlin.cu): a second candidate of the measured
// dispatch, same contract, arguments and workspace rule as the two above (its own plan: query its own workspace),
// except that x and its row stride must be 16-byte aligned for int8 too.
int qwen2vl_quant_marlin_workspace(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code,
                                   int64_t* scratch_floats, int64_t* counters);
int qwen2vl_quant_gemm_marlin(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                              const void* zeros, const void* bias, void* y, float* scratch, int64_t scratch_floats,
                              int32_t* counters, int64_t counters_len, int64_t M, int64_t N, int64_t K, int bits,
                              int64_t group_size, int dtype_code, cudaStream_t stream);

}  // namespace qwen2vl_fast

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define QF_HD __host__ __device__ __forceinline__

namespace qwen2vl_fast {
namespace detail {

// N elements moved as one access: 16 bytes (LDG.128 / STG.128 / LDS.128) when sizeof(T) * N == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

QF_HD float to_float(float x) { return x; }
QF_HD float to_float(__half x) { return __half2float(x); }
QF_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
QF_HD T from_float(float x);  // round to nearest even, as torch's .to(dtype)
template <>
QF_HD float from_float<float>(float x) { return x; }
template <>
QF_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
QF_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// IEEE fp32 arithmetic, each result rounded once, whatever the build flags: setup.py compiles with
// --use_fast_math, which turns __fmul_rn & co. into their .ftz forms (checked in the PTX) and `/` into an
// approximation; hand-written PTX keeps denormals and exact rounding, so results equal PyTorch's op by op.
// On the host (tests run the per-thread bodies there) plain SSE float arithmetic is already IEEE.
QF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a * b;
#endif
}
QF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}
QF_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}
QF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

QF_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace detail
}  // namespace qwen2vl_fast
#endif  // __CUDACC__
