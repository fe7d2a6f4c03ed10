// The vision tower's 2D rotary, in place on the q and k parts of the fused qkv projection output (REFERENCE.md
// §1c-d; reference: qwen2vl_fast/ops/rotary.py::vision_rotary). Contract in kernels.h. Torch-free.
//
// Work split. A head's D elements rotate as D/2 independent pairs (d, d + D/2). A thread owns one "pair-vector"
// p of a row: elements [p*VEC, (p+1)*VEC) of the first half and the same of the second half of a head, VEC =
// 16 bytes / sizeof(T) (8 for bf16/fp16, 4 for fp32), so each half moves as one 16-byte access. The row's
// P = D/2/VEC pair-vectors x its 2H q/k heads are covered by P*G threads: thread (p, g) rotates pair-vector p
// of heads g, g+G, g+2G, ... It reads the 4*VEC cos/sin values of p once into registers and reuses them for
// all its heads (about 4 by default), and issues the loads of up to kHeadsPerThread heads before the first use.
// Consecutive threads touch consecutive 16-byte pieces of adjacent heads, so each warp access is contiguous.
// For the ViT (H = 16, D = 80, bf16): P = 5, G = 8, 40 threads per row, 6 rows per 240-thread block.
//
// Rows whose pointers or stride break 16-byte alignment run the same code with VEC = 1 (scalar accesses).
#include "kernels.h"

namespace qwen2vl_fast {
namespace rotary_detail {

using detail::add_rn;
using detail::from_float;
using detail::mul_rn;
using detail::Pack;
using detail::sub_rn;
using detail::to_float;

constexpr int kHeadsPerThread = 4;  // 8 independent 16-byte loads in flight per thread
constexpr int kTargetThreads = 256;  // per block; geometry() never exceeds it (P <= 64)

template <int N>
QF_HD void load_floats(const float* __restrict__ src, float (&dst)[N]) {
  if constexpr (N % 4 == 0) {  // 16-byte loads; the caller checked the alignment
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const Pack<float, 4> v = *reinterpret_cast<const Pack<float, 4>*>(src + i);
#pragma unroll
      for (int j = 0; j < 4; ++j) dst[i + j] = v.v[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// Threads per row and rows per block for P pair-vectors per head and 2H q/k heads. Shared by the launcher and
// host-side tests that replay the per-thread body.
struct Geometry {
  int groups;          // G: head groups per row; thread (p, g) rotates heads g, g+G, ...
  int threads_per_row;  // P * G (blockDim.x)
  int rows_per_block;  // blockDim.y
};

inline Geometry geometry(int pairs_per_head, int num_qk_heads) {
  Geometry geo;
  int g = (num_qk_heads + kHeadsPerThread - 1) / kHeadsPerThread;
  const int cap = kTargetThreads / pairs_per_head > 0 ? kTargetThreads / pairs_per_head : 1;
  geo.groups = g < cap ? g : cap;
  geo.threads_per_row = pairs_per_head * geo.groups;
  geo.rows_per_block = kTargetThreads / geo.threads_per_row > 0 ? kTargetThreads / geo.threads_per_row : 1;
  return geo;
}

// One thread's work on one row. `row` points at the row's first element (q head 0); q heads are 0..H-1 and k
// heads H..2H-1 of the same head-major run, so "heads" below index both.
template <typename T, int D, int VEC>
QF_HD void rotate_row(T* __restrict__ row, const float* __restrict__ cos_row, const float* __restrict__ sin_row, int p,
                      int g, int G, int num_qk_heads) {
  constexpr int kHalf = D / 2;
  const int d0 = p * VEC;
  float c_lo[VEC], c_hi[VEC], s_lo[VEC], s_hi[VEC];
  load_floats<VEC>(cos_row + d0, c_lo);
  load_floats<VEC>(cos_row + kHalf + d0, c_hi);
  load_floats<VEC>(sin_row + d0, s_lo);
  load_floats<VEC>(sin_row + kHalf + d0, s_hi);
  using V = Pack<T, VEC>;
  for (int h0 = g; h0 < num_qk_heads; h0 += G * kHeadsPerThread) {
    V lo[kHeadsPerThread], hi[kHeadsPerThread];
#pragma unroll
    for (int i = 0; i < kHeadsPerThread; ++i) {
      const int h = h0 + i * G;
      if (h < num_qk_heads) {
        lo[i] = *reinterpret_cast<const V*>(row + h * D + d0);
        hi[i] = *reinterpret_cast<const V*>(row + h * D + kHalf + d0);
      }
    }
#pragma unroll
    for (int i = 0; i < kHeadsPerThread; ++i) {
      const int h = h0 + i * G;
      if (h < num_qk_heads) {
        V out_lo, out_hi;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // The reference computes x*cos + rotate_half(x)*sin with rotate_half = [-x2, x1]; (-x2)*s = -(x2*s)
          // and a + (-b) = a - b exactly, so this is the same arithmetic, each step rounded once.
          const float x1 = to_float(lo[i].v[j]), x2 = to_float(hi[i].v[j]);
          out_lo.v[j] = from_float<T>(sub_rn(mul_rn(x1, c_lo[j]), mul_rn(x2, s_lo[j])));
          out_hi.v[j] = from_float<T>(add_rn(mul_rn(x2, c_hi[j]), mul_rn(x1, s_hi[j])));
        }
        *reinterpret_cast<V*>(row + h * D + d0) = out_lo;
        *reinterpret_cast<V*>(row + h * D + kHalf + d0) = out_hi;
      }
    }
  }
}

template <typename T, int D, int VEC>
__global__ void __launch_bounds__(kTargetThreads) rotary_2d_kernel(T* __restrict__ qkv, const float* __restrict__ cos,
                                                         const float* __restrict__ sin, int64_t S, int num_qk_heads,
                                                         int64_t row_stride, int G) {
  constexpr int kPairs = D / 2 / VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= S) return;
  const int p = threadIdx.x % kPairs;
  const int g = threadIdx.x / kPairs;
  rotate_row<T, D, VEC>(qkv + row * row_stride, cos + row * D, sin + row * D, p, g, G, num_qk_heads);
}

// Calls f.template run<T, D, VEC>() for the instance matching (dtype_code, D, vectorised); kBadShape when none.
// The instantiation list is explicit: 3 dtypes x head_dim {64, 80, 128} x {16-byte, scalar}.
template <class F>
int dispatch(int dtype_code, int D, bool vectorised, F&& f) {
  auto by_dim = [&](auto tag) -> int {
    using T = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    switch (D) {
      case 64: return vectorised ? f.template run<T, 64, kVec>() : f.template run<T, 64, 1>();
      case 80: return vectorised ? f.template run<T, 80, kVec>() : f.template run<T, 80, 1>();
      case 128: return vectorised ? f.template run<T, 128, kVec>() : f.template run<T, 128, 1>();
      default: return kBadShape;
    }
  };
  switch (dtype_code) {
    case kFloat32: return by_dim(float{});
    case kFloat16: return by_dim(__half{});
    case kBFloat16: return by_dim(__nv_bfloat16{});
    default: return kBadShape;
  }
}

// 16-byte accesses need 16-byte aligned rows (qkv base and row stride) and cos/sin bases; head offsets and
// half-head offsets are multiples of 16 bytes for every supported (dtype, D).
inline bool can_vectorise(const void* qkv, const float* cos, const float* sin, int64_t row_stride, int elem_bytes) {
  return detail::aligned16(qkv) && detail::aligned16(cos) && detail::aligned16(sin) &&
         (row_stride * elem_bytes) % 16 == 0;
}

inline int elem_bytes(int dtype_code) { return dtype_code == kFloat32 ? 4 : 2; }

struct Launch {
  void* qkv;
  const float* cos;
  const float* sin;
  int64_t S;
  int H;
  int64_t row_stride;
  cudaStream_t stream;

  template <typename T, int D, int VEC>
  int run() const {
    static_assert((D / 2) % VEC == 0, "a half head must hold whole vectors");
    const Geometry geo = geometry(D / 2 / VEC, 2 * H);
    const int64_t blocks = (S + geo.rows_per_block - 1) / geo.rows_per_block;
    if (blocks > 0x7fffffff) return kBadShape;
    const dim3 block(geo.threads_per_row, geo.rows_per_block);
    rotary_2d_kernel<T, D, VEC><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        static_cast<T*>(qkv), cos, sin, S, 2 * H, row_stride, geo.groups);
    return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
  }
};

}  // namespace rotary_detail

int qwen2vl_rotary_2d(void* qkv, const float* cos, const float* sin, int64_t S, int H, int D, int64_t row_stride,
                      int dtype_code, cudaStream_t stream) {
  using namespace rotary_detail;
  if (S < 0 || H <= 0 || (D != 64 && D != 80 && D != 128)) return kBadShape;
  if (dtype_code != kFloat32 && dtype_code != kFloat16 && dtype_code != kBFloat16) return kBadShape;
  if (S == 0) return kOk;
  if (qkv == nullptr || cos == nullptr || sin == nullptr) return kBadShape;
  if (S > 1 && row_stride < 3 * static_cast<int64_t>(H) * D) return kBadShape;  // rows would overlap
  const bool vec = can_vectorise(qkv, cos, sin, row_stride, elem_bytes(dtype_code));
  if ((reinterpret_cast<uintptr_t>(qkv) % elem_bytes(dtype_code)) != 0 || (reinterpret_cast<uintptr_t>(cos) & 3) ||
      (reinterpret_cast<uintptr_t>(sin) & 3))
    return kBadAlignment;  // not even element-aligned
  return dispatch(dtype_code, D, vec, Launch{qkv, cos, sin, S, H, row_stride, stream});
}

}  // namespace qwen2vl_fast
