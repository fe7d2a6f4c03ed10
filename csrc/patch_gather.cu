// Normalise + gather resized uint8 frames (T, C, H, W) into the vision tower's patch rows (N, C*tp*p*p), the
// input of the patch-embedding GEMM (REFERENCE.md §5 "Patchify"; reference:
// qwen2vl_fast/processing/patchify.py::normalize_patchify). Contract in kernels.h. Torch-free.
//
// Work split: one merge group (m*m consecutive output rows, the m*p x m*p pixel square they come from) at a
// time per block, blocks striding over groups. The group's rows are one contiguous run of m*m*K outputs
// (K = C*tp*p*p = 1176 for every Qwen2-VL / Qwen2.5-VL checkpoint; numbers below are for that layout), so
//  1. the block copies the square's bytes (tp frames x C channels x 28 rows of 28 bytes, 4-byte aligned because
//     W and the square's x offset are multiples of 28) into shared memory with coalesced 4-byte loads, instead of
//     each output reading one byte of a 14-byte run from global memory (8 scattered byte loads per 16-byte store);
//  2. each thread then writes 16 bytes of output (8 bf16/fp16 or 4 fp32 values; one STG.128), consecutive
//     threads writing consecutive 16-byte pieces: a warp stores 512 contiguous bytes. One thread per output
//     element would issue 8x the store instructions and 8x the index arithmetic for the same bytes.
// The index arithmetic is paid once per block: colmap[k] holds, for output column k = (c, t, py, px), the
// byte's offset inside the staged square (less the row's (mh, mw) offset) and the channel's LUT base.
// Shared memory per block: lut 1.5 KB (bf16) + colmap 4.6 KB + square 4.6 KB; 40 registers per thread.
//
// Numerics: a uint8 input has 256 values per channel, so the block precomputes lut[c][x] =
// dtype((x - fl32(mean_c*255)) / fl32(std_c*255)) with correctly rounded fp32 sub and div (PTX div.rn, not the
// fast-math approximation), exactly normalize_patchify's arithmetic; outputs are table lookups, bit-identical to
// the reference in fp32 and to its .to(dtype) in bf16/fp16.
//
// The layout (C, p, tp, m) = (3, 14, 2, 2) of every checkpoint is a compile-time instance, so all index divisions
// are by constants; any other layout runs the same code with run-time sizes.
#include "kernels.h"

namespace qwen2vl_fast {
namespace gather_detail {

using detail::div_rn;
using detail::from_float;
using detail::Pack;
using detail::sub_rn;

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;  // grid = min(groups, SMs * 8): resident blocks overlap staging with stores
constexpr int kMaxSmemBytes = 48 * 1024;

struct Args {
  const uint8_t* frames;
  void* out;
  int64_t T, H, W;  // frames' sizes
  int64_t groups;   // merge groups: ceil(T/tp) * gmh * gmw
  int gmh, gmw;     // merge groups along H and W: H / (p*m), W / (p*m)
  int C, P, TP, M;  // the layout at run time (compile-time instances ignore these)
  bool word_loads;  // the staging copy may use 4-byte loads
  float mean255[kPatchGatherMaxChannels];  // fl32(mean * 255), as patchify.py's float32 tensor product
  float std255[kPatchGatherMaxChannels];
};

// Layout sizes: template arguments when positive (compile-time constants), else read from Args.
template <int kC, int kP, int kTP, int kM>
struct Layout {
  int c_, p_, tp_, m_;
  QF_HD explicit Layout(const Args& a) : c_(a.C), p_(a.P), tp_(a.TP), m_(a.M) {}
  QF_HD int C() const { return kC > 0 ? kC : c_; }
  QF_HD int P() const { return kP > 0 ? kP : p_; }
  QF_HD int TP() const { return kTP > 0 ? kTP : tp_; }
  QF_HD int M() const { return kM > 0 ? kM : m_; }
  QF_HD int MP() const { return M() * P(); }               // side of a merge group's pixel square
  QF_HD int K() const { return C() * TP() * P() * P(); }   // columns of a patch row
  QF_HD int planes() const { return C() * TP(); }          // staged planes, ordered (c, t) like the columns
  QF_HD int tile_bytes() const { return planes() * MP() * MP(); }
};
using FixedLayout = Layout<3, 14, 2, 2>;  // every Qwen2-VL / Qwen2.5-VL checkpoint
using AnyLayout = Layout<0, 0, 0, 0>;

QF_HD int align16(int bytes) { return (bytes + 15) & ~15; }

// Shared memory: lut (C*256 values of T) | colmap (K uint32) | tile (planes * MP * MP bytes), 16-byte aligned parts.
template <typename T, class L>
struct Smem {
  T* lut;
  uint32_t* colmap;
  uint8_t* tile;
  QF_HD static int colmap_offset(const L& l) { return align16(l.C() * 256 * static_cast<int>(sizeof(T))); }
  QF_HD static int tile_offset(const L& l) { return colmap_offset(l) + align16(l.K() * 4); }
  QF_HD static int bytes(const L& l) { return tile_offset(l) + align16(l.tile_bytes()); }
  QF_HD Smem(void* base, const L& l)
      : lut(static_cast<T*>(base)),
        colmap(reinterpret_cast<uint32_t*>(static_cast<char*>(base) + colmap_offset(l))),
        tile(static_cast<uint8_t*>(base) + tile_offset(l)) {}
};

// Phase 0a: the normalisation table, lut[c*256 + x].
template <typename T, class L>
QF_HD void build_lut(T* lut, const Args& a, const L& l, int tid, int nthreads) {
  for (int c = 0; c < l.C(); ++c)
#pragma unroll 1  // once per block; unrolling the division's slow path only costs registers
    for (int x = tid; x < 256; x += nthreads)
      lut[c * 256 + x] = from_float<T>(div_rn(sub_rn(static_cast<float>(x), a.mean255[c]), a.std255[c]));
}

// Phase 0b: column k = ((c*tp + t)*p + py)*p + px -> (c*256) << 16 | offset of (plane c*tp+t, py, px) in the tile.
template <class L>
QF_HD void build_colmap(uint32_t* colmap, const L& l, int tid, int nthreads) {
  const int pp = l.P() * l.P(), mp = l.MP();
#pragma unroll 1
  for (int k = tid; k < l.K(); k += nthreads) {
    const int plane = k / pp, py = (k - plane * pp) / l.P(), px = k - plane * pp - py * l.P();
    const int c = plane / l.TP();
    colmap[k] = (static_cast<uint32_t>(c * 256) << 16) | static_cast<uint32_t>((plane * mp + py) * mp + px);
  }
}

// Merge group g -> (temporal patch, group row, group column).
struct Group {
  int64_t tg;
  int bh, bw;
};
QF_HD Group split_group(const Args& a, int64_t g) {
  Group r;
  r.bw = static_cast<int>(g % a.gmw);
  const int64_t rest = g / a.gmw;
  r.bh = static_cast<int>(rest % a.gmh);
  r.tg = rest / a.gmh;
  return r;
}

// Phase 1: copy group g's pixel square, tile[(c*tp + t)][y][x] = frames[f(t), c, y0 + y, x0 + x], with
// f(t) = min(tg*tp + t, T - 1): the last frame repeats when T % tp != 0 (an image becomes tp equal frames).
// UNIT bytes per access: 4 when the square's rows are 4-byte aligned (Args::word_loads), else 1.
template <int UNIT, class L>
QF_HD void stage_tile(uint8_t* tile, const Args& a, const L& l, int64_t g, int tid, int nthreads) {
  using Word = Pack<uint8_t, UNIT>;
  const Group grp = split_group(a, g);
  const int mp = l.MP(), tp = l.TP();
  const int64_t y0 = static_cast<int64_t>(grp.bh) * mp, x0 = static_cast<int64_t>(grp.bw) * mp;
  const int per_row = mp / UNIT, per_plane = mp * per_row;
  const int items = l.planes() * per_plane;
#pragma unroll 2  // two global loads in flight per thread (4 costs 90 registers: 64-bit address math)
  for (int i = tid; i < items; i += nthreads) {
    const int plane = i / per_plane, rem = i - plane * per_plane;
    const int y = rem / per_row, x = (rem - y * per_row) * UNIT;
    const int c = plane / tp, t = plane - c * tp;
    int64_t f = grp.tg * tp + t;
    if (f > a.T - 1) f = a.T - 1;
    const uint8_t* src = a.frames + ((f * l.C() + c) * a.H + y0 + y) * a.W + x0 + x;
    *reinterpret_cast<Word*>(tile + (plane * mp + y) * mp + x) = *reinterpret_cast<const Word*>(src);
  }
}

// Phase 2: write group g's m*m rows (one contiguous run of m*m*K values), VEC values per 16-byte store.
template <typename T, int VEC, class L>
QF_HD void emit_group(T* out, const uint8_t* tile, const T* lut, const uint32_t* colmap, const L& l, int64_t g,
                      int tid, int nthreads) {
  const int k_total = l.K(), chunks_per_row = k_total / VEC, rows = l.M() * l.M();
  T* group_out = out + g * rows * k_total;
#pragma unroll 1  // shared-memory reads and fire-and-forget stores: unrolling only costs registers
  for (int j = tid; j < rows * chunks_per_row; j += nthreads) {
    const int r = j / chunks_per_row, k0 = (j - r * chunks_per_row) * VEC;
    const int mh = r / l.M(), mw = r - mh * l.M();
    const int row_off = mh * l.P() * l.MP() + mw * l.P();
    uint32_t cm[VEC];
    if constexpr (VEC % 4 == 0) {  // k0 is a multiple of 4: 16-byte shared-memory loads
#pragma unroll
      for (int i = 0; i < VEC; i += 4) {
        const Pack<uint32_t, 4> v = *reinterpret_cast<const Pack<uint32_t, 4>*>(colmap + k0 + i);
#pragma unroll
        for (int q = 0; q < 4; ++q) cm[i + q] = v.v[q];
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) cm[i] = colmap[k0 + i];
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const uint32_t x = tile[(cm[i] & 0xffffu) + row_off];
      o.v[i] = lut[(cm[i] >> 16) + x];
    }
    *reinterpret_cast<Pack<T, VEC>*>(group_out + static_cast<int64_t>(j) * VEC) = o;
  }
}

template <typename T, int VEC, class L>
__global__ void __launch_bounds__(kThreads) patch_gather_kernel(Args a) {
  extern __shared__ uint4 smem_raw[];  // uint4: 16-byte aligned
  const L l(a);
  const Smem<T, L> sm(smem_raw, l);
  build_lut<T>(sm.lut, a, l, threadIdx.x, blockDim.x);
  build_colmap(sm.colmap, l, threadIdx.x, blockDim.x);
  for (int64_t g = blockIdx.x; g < a.groups; g += gridDim.x) {
    __syncthreads();  // the previous group's reads of the tile are done (and, first time, lut/colmap written)
    if (a.word_loads)
      stage_tile<4>(sm.tile, a, l, g, threadIdx.x, blockDim.x);
    else
      stage_tile<1>(sm.tile, a, l, g, threadIdx.x, blockDim.x);
    __syncthreads();
    emit_group<T, VEC>(static_cast<T*>(a.out), sm.tile, sm.lut, sm.colmap, l, g, threadIdx.x, blockDim.x);
  }
}

// Calls f.template run<T, VEC, L>() for the instance matching the dtype, whether 16-byte stores are possible
// and whether the layout is the fixed one. 3 dtypes x {16-byte, scalar} x {fixed, any} layouts.
template <class F>
int dispatch(int dtype_code, bool vectorised, bool fixed, F&& f) {
  auto by_dtype = [&](auto tag) -> int {
    using T = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (fixed) return vectorised ? f.template run<T, kVec, FixedLayout>() : f.template run<T, 1, FixedLayout>();
    return vectorised ? f.template run<T, kVec, AnyLayout>() : f.template run<T, 1, AnyLayout>();
  };
  switch (dtype_code) {
    case kFloat32: return by_dtype(float{});
    case kFloat16: return by_dtype(__half{});
    case kBFloat16: return by_dtype(__nv_bfloat16{});
    default: return kBadShape;
  }
}

// Validates the sizes and fills Args; kOk or kBadShape. `vectorised`: 16-byte output stores are possible.
inline int prepare(const uint8_t* frames, void* out, int64_t T, int C, int64_t H, int64_t W, const float* mean,
                   const float* std, int patch, int temporal_patch, int merge, int dtype_code, Args* a,
                   bool* vectorised, bool* fixed) {
  if (T < 0 || H < 0 || W < 0 || C <= 0 || C > kPatchGatherMaxChannels || patch <= 0 || temporal_patch <= 0 ||
      merge <= 0 || mean == nullptr || std == nullptr)
    return kBadShape;
  if (dtype_code != kFloat32 && dtype_code != kFloat16 && dtype_code != kBFloat16) return kBadShape;
  if (patch > 64 || temporal_patch > 16 || merge > 16) return kBadShape;  // keeps every size below in int
  const int64_t side = static_cast<int64_t>(patch) * merge;
  if (H % side != 0 || W % side != 0) return kBadShape;
  a->frames = frames;
  a->out = out;
  a->T = T;
  a->H = H;
  a->W = W;
  a->gmh = static_cast<int>(H / side);
  a->gmw = static_cast<int>(W / side);
  a->groups = (T + temporal_patch - 1) / temporal_patch * a->gmh * a->gmw;
  a->C = C;
  a->P = patch;
  a->TP = temporal_patch;
  a->M = merge;
  for (int c = 0; c < kPatchGatherMaxChannels; ++c) {
    // float32 products, as patchify.py's torch.tensor(mean) * 255.0 (SSE float multiply: IEEE, round to nearest)
    a->mean255[c] = c < C ? mean[c] * 255.0f : 0.0f;
    a->std255[c] = c < C ? std[c] * 255.0f : 1.0f;
  }
  const AnyLayout l(*a);
  const int elem = dtype_code == kFloat32 ? 4 : 2;
  if (Smem<float, AnyLayout>::bytes(l) > kMaxSmemBytes) return kBadShape;  // also keeps tile offsets in 16 bits
  a->word_loads = side % 4 == 0 && W % 4 == 0 && (reinterpret_cast<uintptr_t>(frames) & 3) == 0;
  *vectorised = (static_cast<int64_t>(l.K()) * elem) % 16 == 0 && detail::aligned16(out);
  *fixed = C == 3 && patch == 14 && temporal_patch == 2 && merge == 2;
  return kOk;
}

struct Launch {
  const Args& a;
  cudaStream_t stream;

  template <typename T, int VEC, class L>
  int run() const {
    const L l(a);
    const int smem = Smem<T, L>::bytes(l);
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return kLaunchFailed;
    int64_t blocks = static_cast<int64_t>(sms) * kBlocksPerSM;
    if (blocks > a.groups) blocks = a.groups;
    patch_gather_kernel<T, VEC, L><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a);
    return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
  }
};

}  // namespace gather_detail

int qwen2vl_patch_gather(const uint8_t* frames, void* out, int64_t T, int C, int64_t H, int64_t W, const float* mean,
                         const float* std, int patch, int temporal_patch, int merge, int dtype_code,
                         cudaStream_t stream) {
  using namespace gather_detail;
  Args a;
  bool vectorised = false, fixed = false;
  const int status = prepare(frames, out, T, C, H, W, mean, std, patch, temporal_patch, merge, dtype_code, &a,
                             &vectorised, &fixed);
  if (status != kOk || a.groups == 0) return status;
  if (frames == nullptr || out == nullptr) return kBadShape;
  return dispatch(dtype_code, vectorised, fixed, Launch{a, stream});
}

}  // namespace qwen2vl_fast
