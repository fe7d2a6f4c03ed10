// Weight-only int4/int8 GEMM for the decode regime (M <= 16), second candidate next to quant_decode_gemm.cu: the
// same contract (kernels.h, qwen2vl_quant_gemm_decode_marlin), the same runtime layout (no repacked copy) and the
// same mma fragment mapping (see the top of quant_decode_gemm.cu: lane g holds output columns 8g .. 8g+7, word
// row 4 * it + t feeds lane t's k slots), with a Marlin-class inner loop:
//
//  - cp.async pipeline, kStages (4) deep, per warp. Each warp owns a contiguous run of iterations (4 packed word
//    rows each) of its block's K split and streams them through its own ring of shared-memory slots: no block
//    barrier in the main loop, only cp.async.wait_group + __syncwarp. Weights carry an L2 evict-first hint.
//  - Whole sectors: a slot's 4 word rows x 64 columns (4 x 256 contiguous bytes) are copied as 64 chunks of
//    16 bytes, lane i taking chunks i and i + 32: one cp.async instruction covers 2 rows, 512 bytes, lanes' 16 B
//    at consecutive addresses (4 full 128-byte sectors), where the register-direct kernel's lanes load 16 B at a
//    32 B stride. Activations, scales and zeros travel in the same slot (16-byte chunks, zero-filled past M / N).
//  - Shared-memory reads are conflict-free: chunk c of row r sits at chunk c ^ s(r % 4) (s = 0, 1, 4, 5: swizzle()),
//    so the 8 lanes of a 16-byte-load phase (rows t = 0..3, chunks 2g, 2g + 1) hit 8 distinct bank quads.
//  - Scales and zeros hoisted per group: a slot carries them only when its iteration starts a group (or the
//    warp's run); the lane then builds its 8 columns' (M + z, M + z) and (s, s) pairs once and keeps them in
//    registers for every iteration of the group, where the other kernel rebuilds them every iteration.
//  - Dequantisation: lop3 of the packed word with the magic exponent (fp16 1024, bf16 128) gives M + q exactly,
//    one hsub2 of the hoisted M + z gives q - z exactly (small integers), one hmul2 by the hoisted scale rounds
//    once: bit-identical to quant.dequantize ((q - z) * s in fp32, rounded once; the exact product of two
//    dtype values rounded to the dtype is the same number). bf16 int8 (128 + q is not exact for q >= 128):
//    the fp32 path with the hoisted fp32 z and s. Folding the zero into an fma ((M + q) * s - (M + z) * s)
//    would save nothing (still two ops per pair) and lose exactness, so it is not done.
//
// Work split and epilogue as in quant_decode_gemm.cu: a block of kWarps warps on 64 columns (the warps' sums
// added through shared memory in warp order), the grid (column tiles, K splits) from make_plan with this
// kernel's occupancy, split-K partials in fp32 reduced in split order by the last block of a column tile
// (atomic counter per tile, left at zero): deterministic, one launch.
//
// Host replay: everything a lane does but the mma, cp.async and synchronisation is __host__ __device__ (the
// copies land at once on the host); tests/test_cuda_quant_marlin.py runs it lane by lane on the CPU.
#include <cstring>

#include "kernels.h"

namespace qwen2vl_fast {
namespace qmarlin {

using detail::from_float;
using detail::mul_rn;
using detail::sub_rn;
using detail::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;    // output columns of a block (and of each of its warps)
constexpr int kStages = 4;    // cp.async slots per warp
constexpr int kMaxSplits = 64;
constexpr int kMaxRows = 16;

struct Plan {
  int m_tiles;              // n8 token tiles: 1 (M <= 8) or 2
  int splits;               // K splits = gridDim.y
  int64_t col_tiles;        // gridDim.x
  int64_t iters;            // iterations over K (4 word rows each)
  int64_t iters_per_split;  // of one split (the last may have fewer)
};

QF_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
QF_HD int m_tiles_for(int64_t M) { return M <= 8 ? 1 : 2; }

// One wave of `slots` resident blocks, >= 2 iterations per warp, partial sums <= half the weight bytes, at most
// kMaxSplits (the rule of quant_decode_gemm.cu; slots come from this kernel's own occupancy).
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
  p.splits = static_cast<int>(cdiv(p.iters, p.iters_per_split));
  return p;
}

// The iterations [begin, end) of warp `warp` in split `split`: a contiguous quarter of the split's range.
struct Range {
  int64_t begin, end;
};
QF_HD Range warp_range(const Plan& p, int split, int warp) {
  const int64_t b = split * p.iters_per_split;
  const int64_t e = b + p.iters_per_split < p.iters ? b + p.iters_per_split : p.iters;
  const int64_t q = cdiv(e - b, kWarps);
  Range r;
  r.begin = b + warp * q < e ? b + warp * q : e;
  r.end = r.begin + q < e ? r.begin + q : e;
  return r;
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
  int64_t group;  // group size in k
  Plan plan;
};

// ---- one slot of a warp's ring --------------------------------------------------------------------------------

// Byte layout of a slot (16-byte chunks): weights (4 rows x 16 chunks, swizzled), activations (8 * MT tokens x
// XCHUNKS chunks: int4 4 = 32 k, int8 2 = 16 k), scales (8 chunks), zeros (8 chunks).
template <int BITS, int MT>
struct Slot {
  static constexpr int kWChunks = 64;
  static constexpr int kXChunksPerToken = BITS == 4 ? 4 : 2;
  static constexpr int kXChunks = 8 * MT * kXChunksPerToken;
  static constexpr int kW = 0;
  static constexpr int kX = kW + kWChunks;
  static constexpr int kS = kX + kXChunks;
  static constexpr int kZ = kS + 8;
  static constexpr int kChunks = kZ + 8;
  static constexpr int kBytes = 16 * kChunks;
};

QF_HD int swizzle(int row, int chunk) {  // row 0..3 of the slot, chunk 0..15 of its 256 bytes
  const int s = (row & 1) | ((row & 2) << 1);  // 0, 1, 4, 5
  return chunk ^ s;
}

// Whether each iteration of a warp's run, taken in order, starts a group (its slot carries scales and zeros, the
// lane hoists them again): the run's first iteration, then each one at a group boundary. A running phase in 32 bits,
// no 64-bit modulo per iteration. The kernel keeps two, one for the copies (kStages - 1 ahead), one for compute.
struct GroupClock {
  int per_group, phase;
  bool first;
  QF_HD GroupClock(const Args& a, int bits, int64_t begin)
      : per_group(static_cast<int>(a.group / (4 * (32 / bits)))),
        phase(static_cast<int>(begin % (a.group / (4 * (32 / bits))))),
        first(true) {}
  QF_HD bool next() {
    const bool starts = first || phase == 0;
    first = false;
    phase = phase + 1 == per_group ? 0 : phase + 1;
    return starts;
  }
};

// cp.async of 16 bytes (src_bytes 0: zero fill) with an optional L2 evict-first policy; the host copies at once.
template <bool kEvictFirst>
QF_HD void copy16(void* smem, const void* gmem, bool valid, uint64_t policy) {
#if defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  if constexpr (kEvictFirst)
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(gmem), "r"(n),
                 "l"(policy));
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(n));
#else
  (void)policy;
  if (valid) memcpy(smem, gmem, 16);
  else memset(smem, 0, 16);
#endif
}

// Lane `lane`'s copies of iteration `it` into `slot`: weight chunks lane and lane + 32 (row c / 16, chunk c % 16:
// 2 rows per instruction, contiguous), then activation chunks, then (group start) lanes 0..7 scales, 8..15 zeros.
template <int BITS, int MT>
QF_HD void copy_iteration(const Args& a, int64_t tile, int64_t it, bool group_start, int lane, unsigned char* slot,
                          uint64_t policy) {
  using S = Slot<BITS, MT>;
  constexpr int kPack = 32 / BITS;
  const int64_t col0 = tile * kTileN;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = lane + 32 * i, row = c >> 4, chunk = c & 15;
    const int64_t col = col0 + 4 * chunk;
    const bool ok = col < a.N;  // N % 8 == 0: a 4-column chunk is all in or all out
    const int32_t* src = ok ? a.qweight + (4 * it + row) * a.N + col : a.qweight;
    copy16<true>(slot + 16 * (S::kW + 16 * row + swizzle(row, chunk)), src, ok, policy);
  }
#pragma unroll
  for (int c = lane; c < S::kXChunks; c += 32) {
    const int tok = c / S::kXChunksPerToken, part = c % S::kXChunksPerToken;
    const bool ok = tok < a.M;
    const uint16_t* src = static_cast<const uint16_t*>(a.x);
    if (ok) src += tok * a.x_stride + it * 4 * kPack + 8 * part;
    copy16<false>(slot + 16 * (S::kX + c), src, ok, policy);
  }
  if (group_start && lane < 16) {
    const int g = lane & 7;
    const int64_t col = col0 + 8 * g;
    const bool ok = col < a.N;
    const void* base = lane < 8 ? a.scales : a.zeros;
    const uint16_t* src = static_cast<const uint16_t*>(base);
    if (ok) src += (it * 4 * kPack / a.group) * a.N + col;
    copy16<false>(slot + 16 * ((lane < 8 ? S::kS : S::kZ) + g), src, ok, policy);
  }
}

// ---- bit helpers ------------------------------------------------------------------------------------------------

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

// (a & b) | c in one instruction on the device.
QF_HD uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));  // 0xEA = (a & b) | c
  return r;
#else
  return (a & b) | c;
#endif
}

QF_HD uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <typename T>
QF_HD float elem_of(const uint4& v, int i) {
  const uint32_t w = word_of(v, i / 2);
  const uint16_t bits = static_cast<uint16_t>(i % 2 ? w >> 16 : w & 0xffff);
  T h;
  memcpy(&h, &bits, 2);
  return to_float(h);
}

template <typename T>
QF_HD uint32_t pair_bits(float lo, float hi) {
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return static_cast<uint32_t>(ua) | (static_cast<uint32_t>(ub) << 16);
}

template <typename V>
QF_HD V lds(const unsigned char* p) {  // a shared-memory vector load (plain on both sides)
  return *reinterpret_cast<const V*>(p);
}

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

template <typename T, int BITS>
struct FpPath {  // bf16 int8 dequantises in fp32 (128 + q is not exact in bf16 for q >= 128)
  static constexpr bool value = BITS == 8 && Magic<T>::kValue < 256.0f;
};

// A lane's hoisted per-group values for its 8 columns: pairs (M + z, M + z), (s, s), or fp32 z, s (FpPath).
template <typename T, int BITS>
struct Hoisted {
  static constexpr int kN = 8;
  uint32_t zz[kN], ss[kN];
  float zf[kN], sf[kN];
};

template <typename T, int BITS, int MT>
QF_HD void hoist(const unsigned char* slot, int lane, Hoisted<T, BITS>& h) {
  using S = Slot<BITS, MT>;
  const int g = lane >> 2;
  const uint4 s = lds<uint4>(slot + 16 * (S::kS + g)), z = lds<uint4>(slot + 16 * (S::kZ + g));
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float zc = elem_of<T>(z, c), sc = elem_of<T>(s, c);
    if constexpr (FpPath<T, BITS>::value) {
      h.zf[c] = zc;
      h.sf[c] = sc;
    } else {
      h.zz[c] = pair_bits<T>(Magic<T>::kValue + zc, Magic<T>::kValue + zc);  // exact: small integers
      h.ss[c] = pair_bits<T>(sc, sc);
    }
  }
}

template <typename T>
QF_HD uint32_t dequant_pair(uint32_t v, uint32_t zz, uint32_t ss) {  // (v - zz) * ss: exact difference, one rounding
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

template <typename T>
QF_HD void dequant_bytes_fp32(uint32_t w, float z, float s, uint32_t& lo, uint32_t& hi) {
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = mul_rn(sub_rn(static_cast<float>((w >> (8 * i)) & 0xff), z), s);
  lo = pair_bits<T>(v[0], v[1]);
  hi = pair_bits<T>(v[2], v[3]);
}

template <int BITS, int MT>
struct Frags {
  static constexpr int kSteps = BITS == 4 ? 2 : 1;
  uint32_t a[kSteps][4][4];   // [step][subtile][register]
  uint32_t b[kSteps][MT][2];  // [step][token tile][register]
};

template <int MT>
struct Acc {
  float c[4][MT][4];  // [subtile][token tile][register]
};

// The mma operands of one iteration from its slot: lane (g, t) reads word row t, chunks 2g and 2g + 1 (its 8
// columns), and token m * 8 + g's activations of that row. Fragment mapping: quant_decode_gemm.cu.
template <typename T, int BITS, int MT>
QF_HD void make_fragments(const unsigned char* slot, int lane, const Hoisted<T, BITS>& h, Frags<BITS, MT>& f) {
  using S = Slot<BITS, MT>;
  const int g = lane >> 2, t = lane & 3;
  uint4 w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) w[i] = lds<uint4>(slot + 16 * (S::kW + 16 * t + swizzle(t, 2 * g + i)));
#pragma unroll
  for (int c = 0; c < 8; ++c) {  // column 8g + c: subtile c % 4, mma row g (c < 4) or g + 8
    const int j = c & 3, lo_reg = c < 4 ? 0 : 1, hi_reg = c < 4 ? 2 : 3;
    const uint32_t word = word_of(w[c / 4], c & 3);
    if constexpr (FpPath<T, BITS>::value) {
      dequant_bytes_fp32<T>(word, h.zf[c], h.sf[c], f.a[0][j][lo_reg], f.a[0][j][hi_reg]);
    } else if constexpr (BITS == 4) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint32_t v0 = and_or(word >> (8 * p), 0x000F000Fu, Magic<T>::kPair);      // nibbles 2p, 2p+4
        const uint32_t v1 = and_or(word >> (8 * p + 4), 0x000F000Fu, Magic<T>::kPair);  // nibbles 2p+1, 2p+5
        f.a[p][j][lo_reg] = dequant_pair<T>(v0, h.zz[c], h.ss[c]);
        f.a[p][j][hi_reg] = dequant_pair<T>(v1, h.zz[c], h.ss[c]);
      }
    } else {  // fp16 int8: bytes (0, 1) and (2, 3) under the 0x64 exponent byte
      f.a[0][j][lo_reg] = dequant_pair<T>(byte_perm(word, 0x64646464u, 0x4140), h.zz[c], h.ss[c]);
      f.a[0][j][hi_reg] = dequant_pair<T>(byte_perm(word, 0x64646464u, 0x4342), h.zz[c], h.ss[c]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const unsigned char* xp = slot + 16 * (S::kX + (m * 8 + g) * S::kXChunksPerToken);
    if constexpr (BITS == 4) {  // 8 activations at k = 8 * row: step p, slots {2t, 2t+1} <- x[2p], x[2p+4] ...
      const uint4 x = lds<uint4>(xp + 16 * t);
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint32_t lo = word_of(x, p), hi = word_of(x, p + 2);
        f.b[p][m][0] = byte_perm(lo, hi, 0x5410);
        f.b[p][m][1] = byte_perm(lo, hi, 0x7632);
      }
    } else {  // 4 activations at k = 4 * row
      const uint2 x = lds<uint2>(xp + 8 * t);
      f.b[0][m][0] = x.x;
      f.b[0][m][1] = x.y;
    }
  }
}

template <int BITS, int MT, class F>
QF_HD void for_each_mma(F&& f) {
#pragma unroll
  for (int s = 0; s < Frags<BITS, MT>::kSteps; ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int m = 0; m < MT; ++m) f(s, j, m);
}

// ---- epilogue (as quant_decode_gemm.cu) -------------------------------------------------------------------------

template <typename V>
QF_HD V ldg_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(reinterpret_cast<const V*>(p));
#else
  return *reinterpret_cast<const V*>(p);
#endif
}
template <typename V>
QF_HD V ldg_ro(const void* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const V*>(p));
#else
  return *reinterpret_cast<const V*>(p);
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

template <int MT>
QF_HD void token_values(const Acc<MT>& acc, int m, int e, float (&vals)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    vals[j] = acc.c[j][m][e];
    vals[4 + j] = acc.c[j][m][2 + e];
  }
}

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

template <typename T>
QF_HD void store_row(const Args& a, int64_t tok, int64_t col, const float (&vals)[8]) {
  float v[8];
  for (int i = 0; i < 8; ++i) v[i] = vals[i];
  if (a.bias != nullptr) {
    const uint4 b = ldg_ro<uint4>(static_cast<const uint16_t*>(a.bias) + col);
    for (int i = 0; i < 8; ++i) v[i] = detail::add_rn(v[i], elem_of<T>(b, i));
  }
  store_l2(static_cast<uint16_t*>(a.y) + tok * a.N + col,
           make_uint4(pair_bits<T>(v[0], v[1]), pair_bits<T>(v[2], v[3]), pair_bits<T>(v[4], v[5]),
                      pair_bits<T>(v[6], v[7])));
}

template <int MT, class F>
QF_HD void for_each_lane_row(const Args& a, int64_t tile, int lane, F&& f) {
  const int64_t col = tile * kTileN + 8 * (lane >> 2);
  if (col >= a.N) return;
  for (int m = 0; m < MT; ++m)
    for (int e = 0; e < 2; ++e) {
      const int64_t tok = m * 8 + 2 * (lane & 3) + e;
      if (tok < a.M) f(m, e, tok, col);
    }
}

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

template <typename T, int MT>
QF_HD void reduce_lane(const Args& a, int64_t tile, int lane) {
  for_each_lane_row<MT>(a, tile, lane, [&](int, int, int64_t tok, int64_t col) {
    float vals[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int s = 0; s < a.plan.splits; ++s) {
      const float* p = a.scratch + (s * a.M + tok) * a.N + col;
      const float4 u = ldg_l2<float4>(p), v = ldg_l2<float4>(p + 4);
      const float in[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
      for (int i = 0; i < 8; ++i) vals[i] = detail::add_rn(vals[i], in[i]);
    }
    store_row<T>(a, tok, col, vals);
  });
}

// ---- the kernel ---------------------------------------------------------------------------------------------------

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

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads) quant_marlin_kernel(const Args a) {
  using S = Slot<BITS, MT>;
  __shared__ __align__(16) unsigned char ring[kWarps][kStages][S::kBytes];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x;
  const int split = blockIdx.y;
  const Range r = warp_range(a.plan, split, warp);
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));

  // Prologue: the first kStages - 1 iterations in flight, one commit group each (empty past the run).
  GroupClock copy_clock(a, BITS, r.begin), compute_clock(a, BITS, r.begin);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    const int64_t it = r.begin + s;
    if (it < r.end) copy_iteration<BITS, MT>(a, tile, it, copy_clock.next(), lane, ring[warp][s], policy);
    cp_async_commit();
  }
  Acc<MT> acc = {};
  Hoisted<T, BITS> h;
  int read = 0, write = kStages - 1;  // slots: the iteration computed now, the one copied now
  for (int64_t it = r.begin; it < r.end; ++it) {
    cp_async_wait<kStages - 2>();  // this lane's copies of iteration it have landed
    __syncwarp();                  // ... and every lane's; slot `write` (read last iteration) is free again
    if (it + kStages - 1 < r.end)
      copy_iteration<BITS, MT>(a, tile, it + kStages - 1, copy_clock.next(), lane, ring[warp][write], policy);
    cp_async_commit();
    const unsigned char* slot = ring[warp][read];
    read = read + 1 == kStages ? 0 : read + 1;
    write = write + 1 == kStages ? 0 : write + 1;
    if (compute_clock.next()) hoist<T, BITS, MT>(slot, lane, h);
    Frags<BITS, MT> f;
    make_fragments<T, BITS, MT>(slot, lane, h, f);
    for_each_mma<BITS, MT>([&](int s, int j, int m) { mma_16816<T>(acc.c[j][m], f.a[s][j], f.b[s][m]); });
  }
  cp_async_wait<0>();

  __syncthreads();  // every warp done with its ring: the ring's first bytes become the reduction buffer
  float* red = reinterpret_cast<float*>(&ring[0][0][0]);
  static_assert((kWarps - 1) * 16 * MT * 32 * 4 <= kWarps * kStages * S::kBytes, "reduction buffer");
  if (warp > 0) stash(red, warp, lane, acc);
  __syncthreads();
  if (warp > 0) return;
  add_stashed(red, lane, acc);
  write_lane<T, MT>(a, tile, split, lane, acc);
  if (a.plan.splits == 1) return;
  __threadfence();
  __syncwarp();
  int arrived = 0;
  if (lane == 0) arrived = atomicAdd(a.counters + tile, 1);
  arrived = __shfl_sync(0xffffffffu, arrived, 0);
  if (arrived != a.plan.splits - 1) return;
  __threadfence();
  reduce_lane<T, MT>(a, tile, lane);
  if (lane == 0) a.counters[tile] = 0;
}

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

inline int check_shape(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code) {
  if (bits != 4 && bits != 8) return kBadShape;
  if (dtype_code != kFloat16 && dtype_code != kBFloat16) return kBadShape;
  const int64_t step = 4 * (32 / bits);
  const int64_t group = group_size == -1 ? K : group_size;
  if (M < 0 || M > kMaxRows || N < 8 || N % 8 || K < step || K % step) return kBadShape;
  if (group <= 0 || K % group || group % step) return kBadShape;
  return kOk;
}

// Every check that needs no GPU. Activations are copied in 16-byte chunks: x and its row stride 16-byte aligned
// for int8 too (the register-direct kernel takes 8).
inline int validate(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales, const void* zeros,
                    const void* bias, const void* y, int64_t M, int64_t N, int64_t K, int bits, int64_t group_size,
                    int dtype_code) {
  const int status = check_shape(M, N, K, bits, group_size, dtype_code);
  if (status != kOk || M == 0) return status;
  if (x == nullptr || qweight == nullptr || scales == nullptr || zeros == nullptr || y == nullptr) return kBadShape;
  if (M > 1 && x_stride < K) return kBadShape;
  if (!detail::aligned16(qweight) || !detail::aligned16(scales) || !detail::aligned16(zeros) ||
      !detail::aligned16(y) || (bias != nullptr && !detail::aligned16(bias)) || !detail::aligned16(x) ||
      (M > 1 && (x_stride * 2) % 16))
    return kBadAlignment;
  return kOk;
}

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
  a->x_stride = M > 1 ? x_stride : K;
  a->group = group_size == -1 ? K : group_size;
  a->plan = make_plan(M, N, K, bits, slots);
  if (a->plan.splits == 1) return kOk;
  if (scratch == nullptr || counters == nullptr || scratch_floats < static_cast<int64_t>(a->plan.splits) * M * N ||
      counters_len < a->plan.col_tiles)
    return kBadShape;
  return detail::aligned16(scratch) ? kOk : kBadAlignment;
}

struct Occupancy {
  template <typename T, int BITS, int MT>
  int run() const {
    int blocks = 0;
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, quant_marlin_kernel<T, BITS, MT>,
                                                                        kThreads, 0);
    return e == cudaSuccess ? blocks : -1;
  }
};

inline int64_t device_slots(int dtype_code, int bits, int m_tiles) {
  constexpr int kMaxDevices = 64;
  static int64_t cache[kMaxDevices][2][2][2] = {};
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
    quant_marlin_kernel<T, BITS, MT><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
  }
};

}  // namespace qmarlin

int qwen2vl_quant_marlin_workspace(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code,
                                   int64_t* scratch_floats, int64_t* counters) {
  using namespace qmarlin;
  const int status = check_shape(M, N, K, bits, group_size, dtype_code);
  if (status != kOk) return status;
  const int64_t slots = device_slots(dtype_code, bits, m_tiles_for(M));
  if (slots <= 0) return kLaunchFailed;
  const Plan p = make_plan(M, N, K, bits, slots);
  *scratch_floats = p.splits > 1 ? static_cast<int64_t>(p.splits) * M * N : 0;
  *counters = p.splits > 1 ? p.col_tiles : 0;
  return kOk;
}

int qwen2vl_quant_gemm_marlin(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                              const void* zeros, const void* bias, void* y, float* scratch, int64_t scratch_floats,
                              int32_t* counters, int64_t counters_len, int64_t M, int64_t N, int64_t K, int bits,
                              int64_t group_size, int dtype_code, cudaStream_t stream) {
  using namespace qmarlin;
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
