// Weight-only int4/int8 GEMM for the decode regime (M <= 16 activation rows): y = x @ dequant(W)^T + b, the
// weights streamed from DRAM exactly once, dequantised in registers and fed to tensor cores (mma.sync m16n8k16,
// fp32 accumulation). Contract in kernels.h; reference: qwen2vl_fast/ops/quant_linear.py. Torch-free.
//
// Layout read: the runtime layout of qwen2vl_fast/quant/weight.py as it is (no second repacked copy):
//   qweight int32 (K / PACK, N), PACK = 32 / BITS values of one column per word, lowest bits = lowest k;
//   scales, zeros (G, N) in the activation dtype, zeros integer-valued (every format stores integer zero points).
//
// Why no repack (Marlin repacks offline so a thread's 16-byte load is its mma fragment): the k order inside an
// mma is free. An mma sums over 16 "slots" of k; any bijection slot -> physical k works as long as the weight
// (A) and activation (B) fragments use the same one. Lane (g = lane / 4, t = lane % 4) holds slots {2t, 2t+1}
// and {2t+8, 2t+9}. We map them onto the packed word row R = 4 * it + t of iteration `it`:
//   int4: a word holds k = 8R .. 8R+7. Step p (0, 1) of the iteration gives slots {2t, 2t+1} <- k {8R+2p,
//         8R+2p+4} and {2t+8, 2t+9} <- k {8R+2p+1, 8R+2p+5}: exactly the nibble pairs (j, j+4) that one
//         `(word >> 4j) & 0x000F000F` extracts into the two halves of a 32-bit register, so one AND/OR turns two
//         nibbles into a half2. The activations follow with two byte permutes of an 8-element load.
//   int8: a word holds k = 4R .. 4R+3; one step: slots {2t, 2t+1} <- {4R, 4R+1}, {2t+8, 2t+9} <- {4R+2, 4R+3}.
// Output features are the mma's M (rows) and tokens its N (8 per tile): at batch 1 a single n8 tile wastes 7/8
// of a tiny amount of tensor-core work, against 15/16 for tokens-as-M.
//
// Work split. A warp owns kTileN = 64 output columns: 4 mma row tiles ("subtiles") of 16. Logical row r of
// subtile j is physical column 8 * (r % 8) + 4 * (r / 8) + j, so lane g holds the 8 consecutive columns
// 8g .. 8g+7 (rows g and g+8 of the 4 subtiles): its weights are two 16-byte loads of one word row, a warp load
// instruction reads 4 rows x 256 contiguous bytes, and its outputs are 8 consecutive columns per token (one
// 16-byte store). An iteration consumes 4 word rows (32 k for int4, 16 k for int8); each packed word is read
// by exactly one lane, once, with an evict-first hint, straight into registers (no shared-memory staging: no
// word is reused). A warp issues the loads of kUnroll iterations before dequantising the first.
// A block is kWarps warps on the same 64 columns, interleaving iterations (split-K inside the block, summed
// through shared memory); the grid is (column tiles, K splits). With more than one split each block writes fp32
// partial sums; the last block of a column tile to finish (an atomic counter per tile) sums all partials in
// split order, adds the bias, rounds once and stores, then resets its counter for the next launch. The result
// does not depend on which block finishes last: deterministic, one launch.
//
// Numerics. Dequantisation is bit-identical to quant.dequantize (fp32 (q - z) * s rounded once): q - z is an
// exact small integer (the magic-number halves 1024 + q / 128 + q minus 1024 + z / 128 + z), and a half/bf16
// product of it with the scale is the correctly rounded exact product, as the fp32 product rounded to the dtype
// is. bf16 int8 cannot use the bf16 magic (128 + q is exact only below 256, i.e. q < 128) and dequantises in
// fp32 instead.
//
// Host replay: everything a lane does except the mma and the synchronisation is __host__ __device__ (the tests
// run it lane by lane on the CPU with an emulated warp mma, see tests/test_cuda_quant_decode.py).
#include <cstring>

#include "kernels.h"

namespace qwen2vl_fast {
namespace qdecode {

using detail::from_float;
using detail::mul_rn;
using detail::sub_rn;
using detail::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;        // output columns of a block (and of each of its warps)
constexpr int kUnroll = 4;        // iterations whose loads a warp has in flight together
constexpr int kMaxSplits = 64;
constexpr int kMaxRows = 16;      // M <= 16: two n8 token tiles at most

struct Plan {
  int m_tiles;              // n8 token tiles: 1 (M <= 8) or 2
  int splits;               // K splits = gridDim.y
  int64_t col_tiles;        // gridDim.x
  int64_t iters;            // iterations over K (4 word rows each)
  int64_t iters_per_split;  // of one split (the last may have fewer)
};

QF_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
QF_HD int m_tiles_for(int64_t M) { return M <= 8 ? 1 : 2; }

// Shared by the launcher, the scratch query and the host replay, so all three agree. `slots`: the blocks the GPU
// holds at once (SMs x resident blocks per SM for this instance). Splits: as many as fit in one wave of slots
// (a second, partly filled wave would cost a whole block's time for a few blocks), but at least 2 iterations
// per warp, and partial-sum traffic (written and read back: 8 * splits * M * N bytes, L2-resident) at most half
// the weight bytes (K * N * BITS / 8).
QF_HD Plan make_plan(int64_t M, int64_t N, int64_t K, int bits, int64_t slots) {
  Plan p;
  p.m_tiles = m_tiles_for(M);
  p.col_tiles = cdiv(N, kTileN);
  p.iters = K / (4 * (32 / bits));
  int64_t s = (slots > 0 ? slots : 1) / p.col_tiles;
  const int64_t by_work = p.iters / (2 * kWarps);
  const int64_t by_traffic = K * bits / (128 * (M > 0 ? M : 1));
  if (s > by_work) s = by_work;
  if (s > by_traffic) s = by_traffic;
  if (s > kMaxSplits) s = kMaxSplits;
  if (s < 1) s = 1;
  p.iters_per_split = cdiv(p.iters, s);
  p.splits = static_cast<int>(cdiv(p.iters, p.iters_per_split));  // no empty split
  return p;
}

struct Args {
  const void* x;  // (M, K) rows x_stride elements apart
  const int32_t* qweight;
  const void* scales;
  const void* zeros;
  const void* bias;  // (N,) or null
  void* y;           // (M, N) contiguous
  float* scratch;    // (splits, M, N) fp32 partials when splits > 1
  int32_t* counters;  // one per column tile, zero between launches
  int64_t M, N, K, x_stride;
  int64_t group;  // group size in k (K for one group per column)
  Plan plan;
};

// ---- bit helpers (host versions for the replay) -----------------------------------------------------------

QF_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t both = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

QF_HD uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// The i-th 16-bit element of an 8-element 16-byte vector, as float (T: __half or __nv_bfloat16).
template <typename T>
QF_HD float elem_of(const uint4& v, int i) {
  const uint32_t w = word_of(v, i / 2);
  const uint16_t bits = static_cast<uint16_t>(i % 2 ? w >> 16 : w & 0xffff);
  T h;
  memcpy(&h, &bits, 2);
  return to_float(h);
}

template <typename T>
QF_HD uint32_t pair_bits(float lo, float hi) {  // two values rounded to T, packed lo | hi << 16
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return static_cast<uint32_t>(ua) | (static_cast<uint32_t>(ub) << 16);
}

// Global accesses with a cache hint on the device, plain on the host (the replay). Weights are read once
// (kStream: evict-first); activations, scales and bias are reread by other blocks (kReadOnly); split-K partials
// written by other blocks are read through L2 (kL2: L1 may hold stale lines) and written there (store_l2, which
// also keeps a 16-byte store whole, where a plain struct store may be split).
enum class Cache { kStream, kReadOnly, kL2 };

template <Cache C, typename V>
QF_HD V load(const void* p) {
  const V* q = reinterpret_cast<const V*>(p);
#if defined(__CUDA_ARCH__)
  if constexpr (C == Cache::kStream) return __ldcs(q);
  else if constexpr (C == Cache::kReadOnly) return __ldg(q);
  else return __ldcg(q);
#else
  return *q;
#endif
}

template <typename V>
QF_HD void store_l2(void* p, const V& v) {
#if defined(__CUDA_ARCH__)
  __stcg(reinterpret_cast<V*>(p), v);
#else
  *reinterpret_cast<V*>(p) = v;
#endif
}

// ---- one lane, one iteration ------------------------------------------------------------------------------

template <int MT>
struct Raw {     // what a lane loads for one iteration
  uint4 w[2];    // its 8 columns' words of word row R (columns 8g .. 8g+3, 8g+4 .. 8g+7)
  uint4 x[MT];   // token m*8+g: int4: 8 activations at k = 8R; int8: 4 at k = 4R (.x, .y)
  uint4 s, z;    // the 8 columns' scales and zeros, group of row R
};

template <int BITS, int MT>
struct Frags {   // mma operands of one iteration
  static constexpr int kSteps = BITS == 4 ? 2 : 1;
  uint32_t a[kSteps][4][4];   // [step][subtile][register]
  uint32_t b[kSteps][MT][2];  // [step][token tile][register]
};

template <int MT>
struct Acc {
  float c[4][MT][4];  // [subtile][token tile][register]
};

QF_HD int lane_group(int lane) { return lane >> 2; }
QF_HD int lane_thread(int lane) { return lane & 3; }

template <int BITS, int MT>
QF_HD void load_iteration(const Args& a, int64_t tile, int64_t it, int lane, Raw<MT>& r) {
  constexpr int kPack = 32 / BITS;
  const int g = lane_group(lane);
  const int64_t row = 4 * it + lane_thread(lane);
  const int64_t col = tile * kTileN + 8 * g;
  const uint4 zero4 = {0, 0, 0, 0};
  if (col < a.N) {  // N % 8 == 0: a lane's 8 columns are all in range or all out
    const int32_t* wp = a.qweight + row * a.N + col;
    r.w[0] = load<Cache::kStream, uint4>(wp);
    r.w[1] = load<Cache::kStream, uint4>(wp + 4);
    const int64_t at = (row * kPack / a.group) * a.N + col;
    r.s = load<Cache::kReadOnly, uint4>(static_cast<const uint16_t*>(a.scales) + at);
    r.z = load<Cache::kReadOnly, uint4>(static_cast<const uint16_t*>(a.zeros) + at);
  } else {
    r.w[0] = r.w[1] = r.s = r.z = zero4;
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int64_t tok = m * 8 + g;
    r.x[m] = zero4;
    if (tok < a.M) {
      const uint16_t* xp = static_cast<const uint16_t*>(a.x) + tok * a.x_stride + row * kPack;
      if constexpr (BITS == 4) {
        r.x[m] = load<Cache::kReadOnly, uint4>(xp);
      } else {
        const uint2 v = load<Cache::kReadOnly, uint2>(xp);
        r.x[m].x = v.x;
        r.x[m].y = v.y;
      }
    }
  }
}

// Per activation type: the bits of a pair (M, M) and M, with 1024 + q (fp16) and 128 + q (bf16) exact, and the
// packed-pair type.
template <typename T>
struct Magic;
template <>
struct Magic<__half> {
  static constexpr uint32_t kPair = 0x64006400u;
  static constexpr float kValue = 1024.0f;
  using Pair = __half2;
};
template <>
struct Magic<__nv_bfloat16> {
  static constexpr uint32_t kPair = 0x43004300u;
  static constexpr float kValue = 128.0f;
  using Pair = __nv_bfloat162;
};

// (v - zz) * ss on a pair: v holds (M + q0, M + q1), zz = (M + z, M + z), ss = (s, s). The difference is exact,
// the product rounded once (see the numerics note at the top).
template <typename T>
QF_HD uint32_t dequant_pair(uint32_t v, uint32_t zz, uint32_t ss) {
  using P = typename Magic<T>::Pair;
  P hv, hz, hs;
  memcpy(&hv, &v, 4);
  memcpy(&hz, &zz, 4);
  memcpy(&hs, &ss, 4);
  const P r = __hmul2(__hsub2(hv, hz), hs);
  uint32_t out;
  memcpy(&out, &r, 4);
  return out;
}

// The 8 weights of byte-packed column word `w` (int8) as two pairs in fp32: exact q - z, one rounding of the
// product (the bf16 path; fp16 int8 uses the magic halves like int4).
template <typename T>
QF_HD void dequant_bytes_fp32(uint32_t w, float z, float s, uint32_t& lo, uint32_t& hi) {
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = mul_rn(sub_rn(static_cast<float>((w >> (8 * i)) & 0xff), z), s);
  lo = pair_bits<T>(v[0], v[1]);
  hi = pair_bits<T>(v[2], v[3]);
}

template <typename T, int BITS, int MT>
QF_HD void make_fragments(const Raw<MT>& r, Frags<BITS, MT>& f) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {  // the lane's column 8g + c: subtile c % 4, mma row g (c < 4) or g + 8
    const int j = c & 3, lo_reg = c < 4 ? 0 : 1, hi_reg = c < 4 ? 2 : 3;
    const uint32_t w = word_of(r.w[c / 4], c & 3);
    const float z = elem_of<T>(r.z, c), s = elem_of<T>(r.s, c);
    if constexpr (BITS == 8 && Magic<T>::kValue < 256.0f) {  // bf16 int8: the fp32 path
      dequant_bytes_fp32<T>(w, z, s, f.a[0][j][lo_reg], f.a[0][j][hi_reg]);
    } else {
      const uint32_t zz = pair_bits<T>(Magic<T>::kValue + z, Magic<T>::kValue + z);  // exact: small integers
      const uint32_t ss = pair_bits<T>(s, s);
      if constexpr (BITS == 4) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const uint32_t v0 = ((w >> (8 * p)) & 0x000F000Fu) | Magic<T>::kPair;      // nibbles 2p, 2p+4
          const uint32_t v1 = ((w >> (8 * p + 4)) & 0x000F000Fu) | Magic<T>::kPair;  // nibbles 2p+1, 2p+5
          f.a[p][j][lo_reg] = dequant_pair<T>(v0, zz, ss);
          f.a[p][j][hi_reg] = dequant_pair<T>(v1, zz, ss);
        }
      } else {  // fp16 int8: bytes (0, 1) and (2, 3) under the 0x64 exponent byte
        f.a[0][j][lo_reg] = dequant_pair<T>(byte_perm(w, 0x64646464u, 0x4140), zz, ss);
        f.a[0][j][hi_reg] = dequant_pair<T>(byte_perm(w, 0x64646464u, 0x4342), zz, ss);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const uint4& x = r.x[m];
    if constexpr (BITS == 4) {  // step p: slots {2t, 2t+1} <- x[2p], x[2p+4]; {2t+8, 2t+9} <- x[2p+1], x[2p+5]
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint32_t lo = word_of(x, p), hi = word_of(x, p + 2);
        f.b[p][m][0] = byte_perm(lo, hi, 0x5410);
        f.b[p][m][1] = byte_perm(lo, hi, 0x7632);
      }
    } else {
      f.b[0][m][0] = x.x;  // k = 4R, 4R+1
      f.b[0][m][1] = x.y;  // k = 4R+2, 4R+3
    }
  }
}

// Every mma of one iteration, in a fixed order; the device runs each on its own fragments, the host replay on
// all 32 lanes' at once.
template <int BITS, int MT, class F>
QF_HD void for_each_mma(F&& f) {
#pragma unroll
  for (int s = 0; s < Frags<BITS, MT>::kSteps; ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int m = 0; m < MT; ++m) f(s, j, m);
}

// ---- epilogue ---------------------------------------------------------------------------------------------

// Accumulator register (subtile j, token tile m, register i) of lane (g, t): mma row g (i < 2) or g + 8, token
// column 2t + (i & 1). Physical: column 8g + 4 * (i >= 2) + j, token m * 8 + 2t + (i & 1). For one token a lane
// thus holds 8 consecutive columns 8g .. 8g+7: vals[c] below.
template <int MT>
QF_HD void token_values(const Acc<MT>& acc, int m, int e, float (&vals)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    vals[j] = acc.c[j][m][e];
    vals[4 + j] = acc.c[j][m][2 + e];
  }
}

// Warps 1.. stash their sums in shared memory ([warp - 1][register][lane]: conflict-free); warp 0 adds them in
// warp order.
template <int MT>
QF_HD void stash(float* red, int warp, int lane, const Acc<MT>& acc) {
  const float* c = &acc.c[0][0][0];
  for (int i = 0; i < 16 * MT; ++i) red[((warp - 1) * 16 * MT + i) * 32 + lane] = c[i];
}
template <int MT>
QF_HD void add_stashed(const float* red, int lane, Acc<MT>& acc) {
  float* c = &acc.c[0][0][0];
  for (int w = 1; w < kWarps; ++w)
    for (int i = 0; i < 16 * MT; ++i) c[i] = detail::add_rn(c[i], red[((w - 1) * 16 * MT + i) * 32 + lane]);
}

// vals + bias, rounded once, 8 columns in one 16-byte store.
template <typename T>
QF_HD void store_row(const Args& a, int64_t tok, int64_t col, const float (&vals)[8]) {
  float v[8];
  for (int i = 0; i < 8; ++i) v[i] = vals[i];
  if (a.bias != nullptr) {
    const uint4 b = load<Cache::kReadOnly, uint4>(static_cast<const uint16_t*>(a.bias) + col);
    for (int i = 0; i < 8; ++i) v[i] = detail::add_rn(v[i], elem_of<T>(b, i));
  }
  store_l2(static_cast<uint16_t*>(a.y) + tok * a.N + col,
           make_uint4(pair_bits<T>(v[0], v[1]), pair_bits<T>(v[2], v[3]), pair_bits<T>(v[4], v[5]),
                      pair_bits<T>(v[6], v[7])));
}

// Calls f(tok, col) for each token row the lane holds results of (tokens m * 8 + 2t + e, e = 0, 1, below M) at
// its 8 columns col .. col+7 (in range), with token_values' (m, e).
template <int MT, class F>
QF_HD void for_each_lane_row(const Args& a, int64_t tile, int lane, F&& f) {
  const int64_t col = tile * kTileN + 8 * lane_group(lane);
  if (col >= a.N) return;
  for (int m = 0; m < MT; ++m)
    for (int e = 0; e < 2; ++e) {
      const int64_t tok = m * 8 + 2 * lane_thread(lane) + e;
      if (tok < a.M) f(m, e, tok, col);
    }
}

// One split: its lane's tokens straight to y (one split) or to the split's fp32 partial plane.
template <typename T, int MT>
QF_HD void write_lane(const Args& a, int64_t tile, int split, int lane, const Acc<MT>& acc) {
  for_each_lane_row<MT>(a, tile, lane, [&](int m, int e, int64_t tok, int64_t col) {
    float vals[8];
    token_values(acc, m, e, vals);
    if (a.plan.splits == 1) {
      store_row<T>(a, tok, col, vals);
      return;
    }
    float* p = a.scratch + (split * a.M + tok) * a.N + col;
    store_l2(p, make_float4(vals[0], vals[1], vals[2], vals[3]));
    store_l2(p + 4, make_float4(vals[4], vals[5], vals[6], vals[7]));
  });
}

// The last block of a column tile: the partial planes summed in split order (deterministic), + bias, rounded.
template <typename T, int MT>
QF_HD void reduce_lane(const Args& a, int64_t tile, int lane) {
  for_each_lane_row<MT>(a, tile, lane, [&](int, int, int64_t tok, int64_t col) {
    float vals[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int s = 0; s < a.plan.splits; ++s) {
      const float* p = a.scratch + (s * a.M + tok) * a.N + col;
      const float4 u = load<Cache::kL2, float4>(p), v = load<Cache::kL2, float4>(p + 4);
      const float in[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
      for (int i = 0; i < 8; ++i) vals[i] = detail::add_rn(vals[i], in[i]);
    }
    store_row<T>(a, tok, col, vals);
  });
}

// ---- the kernel -------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads) quant_decode_kernel(const Args a) {
  __shared__ float red[(kWarps - 1) * 16 * MT * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t begin = split * a.plan.iters_per_split;
  const int64_t end = begin + a.plan.iters_per_split < a.plan.iters ? begin + a.plan.iters_per_split : a.plan.iters;

  Acc<MT> acc = {};
  for (int64_t it0 = begin + warp; it0 < end; it0 += kWarps * kUnroll) {
    Raw<MT> r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (it0 + u * kWarps < end) load_iteration<BITS, MT>(a, tile, it0 + u * kWarps, lane, r[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (it0 + u * kWarps >= end) break;
      Frags<BITS, MT> f;
      make_fragments<T, BITS, MT>(r[u], f);
      for_each_mma<BITS, MT>([&](int s, int j, int m) { mma_16816<T>(acc.c[j][m], f.a[s][j], f.b[s][m]); });
    }
  }

  if (warp > 0) stash(red, warp, lane, acc);
  __syncthreads();
  if (warp > 0) return;
  add_stashed(red, lane, acc);
  write_lane<T, MT>(a, tile, split, lane, acc);
  if (a.plan.splits == 1) return;
  __threadfence();  // this block's partials visible device-wide before the counter says so
  __syncwarp();
  int arrived = 0;
  if (lane == 0) arrived = atomicAdd(a.counters + tile, 1);
  arrived = __shfl_sync(0xffffffffu, arrived, 0);
  if (arrived != a.plan.splits - 1) return;
  __threadfence();  // the other blocks' partials, seen through L2 (Cache::kL2 loads)
  reduce_lane<T, MT>(a, tile, lane);
  if (lane == 0) a.counters[tile] = 0;  // the next launch on the stream starts from zero
}

// Calls f.template run<T, BITS, MT>() for the instance; kBadShape when none.
template <class F>
int dispatch(int dtype_code, int bits, int m_tiles, F&& f) {
  auto by_bits = [&](auto tag) -> int {
    using T = decltype(tag);
    if (bits == 4) return m_tiles == 1 ? f.template run<T, 4, 1>() : f.template run<T, 4, 2>();
    if (bits == 8) return m_tiles == 1 ? f.template run<T, 8, 1>() : f.template run<T, 8, 2>();
    return kBadShape;
  };
  switch (dtype_code) {
    case kFloat16: return by_bits(__half{});
    case kBFloat16: return by_bits(__nv_bfloat16{});
    default: return kBadShape;
  }
}

// Shape checks shared by the launcher and the scratch query (alignment is the launcher's).
inline int check_shape(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code) {
  if (bits != 4 && bits != 8) return kBadShape;
  if (dtype_code != kFloat16 && dtype_code != kBFloat16) return kBadShape;
  const int64_t step = 4 * (32 / bits);  // k of one iteration
  const int64_t group = group_size == -1 ? K : group_size;
  if (M < 0 || M > kMaxRows || N < 8 || N % 8 || K < step || K % step) return kBadShape;
  if (group <= 0 || K % group || group % step) return kBadShape;
  return kOk;
}

// Every check of the launcher that needs no GPU: pointers, shapes, alignment.
inline int validate(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales, const void* zeros,
                    const void* bias, const void* y, int64_t M, int64_t N, int64_t K, int bits, int64_t group_size,
                    int dtype_code) {
  const int status = check_shape(M, N, K, bits, group_size, dtype_code);
  if (status != kOk || M == 0) return status;
  if (x == nullptr || qweight == nullptr || scales == nullptr || zeros == nullptr || y == nullptr) return kBadShape;
  if (M > 1 && x_stride < K) return kBadShape;
  const int64_t x_align = bits == 4 ? 16 : 8;  // bytes of one lane's activation load
  if (!detail::aligned16(qweight) || !detail::aligned16(scales) || !detail::aligned16(zeros) ||
      !detail::aligned16(y) || (bias != nullptr && !detail::aligned16(bias)) ||
      reinterpret_cast<uintptr_t>(x) % x_align || (x_stride * 2) % x_align)
    return kBadAlignment;
  return kOk;
}

// The kernel arguments for a GPU holding `slots` blocks at once, and the workspace check.
inline int make_args(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales, const void* zeros,
                     const void* bias, void* y, float* scratch, int64_t scratch_floats, int32_t* counters,
                     int64_t counters_len, int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int64_t slots,
                     Args* a) {
  a->x = x;
  a->qweight = qweight;
  a->scales = scales;
  a->zeros = zeros;
  a->bias = bias;
  a->y = y;
  a->scratch = scratch;
  a->counters = counters;
  a->M = M;
  a->N = N;
  a->K = K;
  a->x_stride = x_stride;
  a->group = group_size == -1 ? K : group_size;
  a->plan = make_plan(M, N, K, bits, slots);
  if (a->plan.splits == 1) return kOk;
  if (scratch == nullptr || counters == nullptr || scratch_floats < static_cast<int64_t>(a->plan.splits) * M * N ||
      counters_len < a->plan.col_tiles)
    return kBadShape;  // a smaller workspace than qwen2vl_quant_decode_workspace asked for
  return detail::aligned16(scratch) ? kOk : kBadAlignment;
}

struct Occupancy {  // resident blocks per SM of one kernel instance (registers bound it: ~3 at 128 threads)
  template <typename T, int BITS, int MT>
  int run() const {
    int blocks = 0;
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, quant_decode_kernel<T, BITS, MT>,
                                                                        kThreads, 0);
    return e == cudaSuccess ? blocks : -1;
  }
};

// SMs x resident blocks per SM on the current device for the instance (dtype, bits, m_tiles); -1 on a CUDA
// error. Cached per device and instance: the occupancy query is not free and the answer never changes.
inline int64_t device_slots(int dtype_code, int bits, int m_tiles) {
  constexpr int kMaxDevices = 64;
  static int64_t cache[kMaxDevices][2][2][2] = {};  // 0: not known yet
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  const int d = dtype_code == kBFloat16, b = bits == 8, m = m_tiles == 2;
  if (device < kMaxDevices && cache[device][d][b][m] > 0) return cache[device][d][b][m];
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return -1;
  const int per_sm = dispatch(dtype_code, bits, m_tiles, Occupancy{});
  if (per_sm <= 0) return -1;
  const int64_t slots = static_cast<int64_t>(sms) * per_sm;
  if (device < kMaxDevices) cache[device][d][b][m] = slots;
  return slots;
}

struct Launch {
  const Args& a;
  cudaStream_t stream;
  template <typename T, int BITS, int MT>
  int run() const {
    const dim3 grid(static_cast<unsigned>(a.plan.col_tiles), static_cast<unsigned>(a.plan.splits));
    quant_decode_kernel<T, BITS, MT><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
  }
};

}  // namespace qdecode

int qwen2vl_quant_decode_workspace(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code,
                                   int64_t* scratch_floats, int64_t* counters) {
  using namespace qdecode;
  const int status = check_shape(M, N, K, bits, group_size, dtype_code);
  if (status != kOk) return status;
  const int64_t slots = device_slots(dtype_code, bits, m_tiles_for(M));
  if (slots <= 0) return kLaunchFailed;
  const Plan p = make_plan(M, N, K, bits, slots);
  *scratch_floats = p.splits > 1 ? static_cast<int64_t>(p.splits) * M * N : 0;
  *counters = p.splits > 1 ? p.col_tiles : 0;
  return kOk;
}

int qwen2vl_quant_gemm_decode(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                              const void* zeros, const void* bias, void* y, float* scratch, int64_t scratch_floats,
                              int32_t* counters, int64_t counters_len, int64_t M, int64_t N, int64_t K, int bits,
                              int64_t group_size, int dtype_code, cudaStream_t stream) {
  using namespace qdecode;
  int status = validate(x, x_stride, qweight, scales, zeros, bias, y, M, N, K, bits, group_size, dtype_code);
  if (status != kOk || M == 0) return status;
  const int64_t slots = device_slots(dtype_code, bits, m_tiles_for(M));
  if (slots <= 0) return kLaunchFailed;
  Args a;
  status = make_args(x, x_stride, qweight, scales, zeros, bias, y, scratch, scratch_floats, counters, counters_len,
                     M, N, K, bits, group_size, slots, &a);
  if (status != kOk) return status;
  return dispatch(dtype_code, bits, a.plan.m_tiles, Launch{a, stream});
}

}  // namespace qwen2vl_fast
