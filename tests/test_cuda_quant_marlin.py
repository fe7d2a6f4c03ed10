"""The Marlin-class int4/int8 decode GEMM (csrc/quant_decode_marlin.cu) and its "cuda-marlin" quant_linear variant.

Without a GPU (CI): the kernel file compiles for sm_90a with no spills (.ci/compile_cuda.sh, test_cuda_ext.py);
here its lane-level bodies (cp.async slot copies, the per-group hoist of scales and zeros, dequantisation into
mma fragments from shared memory, the epilogue, the split-K reduction) are replayed on the CPU for every block,
warp and lane, through each warp's ring of kStages slots in the kernel's order (a copy lands at once on the host:
a slot overwritten before it is read shows; every slot is poisoned after use: data read without a fresh copy
shows), with the warp mma emulated from the PTX fragment layout (tests/test_cuda_quant_decode.py's). Checks:
  - the result against x @ dequantize(W)^T + b at odd and real shapes, int4 / int8, fp16 / bf16, group sizes
    32 / 64 / 128 / -1, GPTQ and AWQ checkpoints (their zero conventions through quant.formats), M in {1, 3, 16};
  - dequantisation bit-identical to quant.dequantize (one-hot activations pick single weights);
  - determinism whichever block finishes last, counters left at zero;
  - the plan, the warps' K ranges (a partition), the copy map (each cp.async instruction: 2 whole rows of 256
    contiguous bytes, lanes 16 B apart) and conflict-free shared-memory fragment reads (the swizzle);
  - the launcher's argument checks (status codes), without a GPU.
The binding (schema, Meta kernel, Torch-side checks before any data access) on meta tensors and storage-less
"cuda:0" tensors; the variant's registration and routing. With a GPU (`gpu` mark): the op against the reference,
against the register-direct kernel, determinism, bad input, and the variant raced by `auto`.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from helpers_cuda import StoragelessCuda, binding_ops, build_host_replay, extension_ops
from test_cuda_quant_decode import _REPLAY_SOURCE as _DECODE_REPLAY_SOURCE
from test_cuda_quant_decode import _ptr, _weight, assert_matches, reference

from qwen2vl_fast.ops import get_op
from qwen2vl_fast.quant.formats import from_awq, from_gptq, to_awq, to_gptq
from qwen2vl_fast.quant.weight import QuantizedWeight, dequantize

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OK, BAD_SHAPE, BAD_ALIGNMENT, LAUNCH_FAILED = 0, 1, 2, 3
H100_MARLIN_SLOTS = 132 * 5  # SMs x resident blocks (80-127 registers, 24-36 KB smem at 128 threads: 4-6)

# the warp mma emulation of the register-direct kernel's replay, reused verbatim
_WARP_MMA = _DECODE_REPLAY_SOURCE[_DECODE_REPLAY_SOURCE.index("template <typename T>\nfloat half_of"):
                                  _DECODE_REPLAY_SOURCE.index("// The kernel, block by block")]

_REPLAY_SOURCE = r"""
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "quant_decode_marlin.cu"

using namespace qwen2vl_fast;
using namespace qwen2vl_fast::qmarlin;

namespace {
""" + _WARP_MMA + r"""
// The kernel block by block in `order`; in a block, warp by warp, the device loop step by step with all 32
// lanes: the prologue copies, then per iteration the copy of iteration it + kStages - 1 into the slot freed by
// iteration it - 1, the hoist (group starts), the fragments from slot it % kStages and the warp's mmas.
struct Replay {
  const Args& a;
  const std::vector<int64_t>& order;
  int64_t* hoists;  // out: hoists done (all warps, all blocks), to compare with the groups the runs touch
  template <typename T, int BITS, int MT>
  int run() const {
    using S = Slot<BITS, MT>;
    *hoists = 0;
    for (const int64_t block : order) {
      const int64_t tile = block % a.plan.col_tiles;
      const int split = static_cast<int>(block / a.plan.col_tiles);
      std::vector<Acc<MT>> acc(kWarps * 32, Acc<MT>{});
      std::vector<unsigned char> ring(kWarps * kStages * S::kBytes, 0xA5);  // garbage until copied
      std::vector<Frags<BITS, MT>> frags(32);
      for (int warp = 0; warp < kWarps; ++warp) {
        const Range r = warp_range(a.plan, split, warp);
        unsigned char* wr = ring.data() + warp * kStages * S::kBytes;
        std::vector<Hoisted<T, BITS>> h(32);
        std::memset(static_cast<void*>(h.data()), 0xA5, h.size() * sizeof(Hoisted<T, BITS>));
        GroupClock copy_clock(a, BITS, r.begin), compute_clock(a, BITS, r.begin);
        for (int s = 0; s < kStages - 1; ++s) {
          const int64_t it = r.begin + s;
          if (it < r.end) {
            const bool sg = copy_clock.next();
            for (int lane = 0; lane < 32; ++lane)
              copy_iteration<BITS, MT>(a, tile, it, sg, lane, wr + s * S::kBytes, 0);
          }
        }
        int read = 0, write = kStages - 1;
        for (int64_t it = r.begin; it < r.end; ++it) {
          if (it + kStages - 1 < r.end) {
            const bool sg = copy_clock.next();
            for (int lane = 0; lane < 32; ++lane)
              copy_iteration<BITS, MT>(a, tile, it + kStages - 1, sg, lane, wr + write * S::kBytes, 0);
          }
          unsigned char* slot = wr + read * S::kBytes;
          read = read + 1 == kStages ? 0 : read + 1;
          write = write + 1 == kStages ? 0 : write + 1;
          const bool sg = compute_clock.next();
          *hoists += sg;
          for (int lane = 0; lane < 32; ++lane) {
            if (sg) hoist<T, BITS, MT>(slot, lane, h[lane]);
            make_fragments<T, BITS, MT>(slot, lane, h[lane], frags[lane]);
          }
          std::memset(slot, 0xA5, S::kBytes);  // consumed: whatever is read next must be copied again
          for_each_mma<BITS, MT>([&](int s, int j, int m) {
            float* d[32];
            const uint32_t* fa[32];
            const uint32_t* fb[32];
            for (int lane = 0; lane < 32; ++lane) {
              d[lane] = acc[warp * 32 + lane].c[j][m];
              fa[lane] = frags[lane].a[s][j];
              fb[lane] = frags[lane].b[s][m];
            }
            warp_mma<T>(d, fa, fb);
          });
        }
      }
      std::vector<float> red((kWarps - 1) * 16 * MT * 32, 1e30f);
      for (int warp = 1; warp < kWarps; ++warp)
        for (int lane = 0; lane < 32; ++lane) stash(red.data(), warp, lane, acc[warp * 32 + lane]);
      for (int lane = 0; lane < 32; ++lane) {
        add_stashed(red.data(), lane, acc[lane]);
        write_lane<T, MT>(a, tile, split, lane, acc[lane]);
      }
      if (a.plan.splits == 1) continue;
      const int arrived = a.counters[tile]++;
      if (arrived != a.plan.splits - 1) continue;
      for (int lane = 0; lane < 32; ++lane) reduce_lane<T, MT>(a, tile, lane);
      a.counters[tile] = 0;
    }
    return kOk;
  }
};

void plan_out(const Plan& p, int64_t* out) {
  out[0] = p.m_tiles;
  out[1] = p.splits;
  out[2] = p.col_tiles;
  out[3] = p.iters;
  out[4] = p.iters_per_split;
}

}  // namespace

extern "C" int replay_marlin(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                             const void* zeros, const void* bias, void* y, float* scratch, int64_t scratch_floats,
                             int32_t* counters, int64_t counters_len, int64_t M, int64_t N, int64_t K, int bits,
                             int64_t group_size, int dtype_code, int64_t slots, int order_mode, int seed,
                             int64_t* plan, int64_t* hoists) {
  int status = validate(x, x_stride, qweight, scales, zeros, bias, y, M, N, K, bits, group_size, dtype_code);
  if (status != kOk || M == 0) return status;
  Args a;
  status = make_args(x, x_stride, qweight, scales, zeros, bias, y, scratch, scratch_floats, counters, counters_len,
                     M, N, K, bits, group_size, slots, &a);
  plan_out(a.plan, plan);
  if (status != kOk) return status;
  std::vector<int64_t> order(a.plan.col_tiles * a.plan.splits);
  std::iota(order.begin(), order.end(), 0);
  if (order_mode == 1) std::reverse(order.begin(), order.end());
  if (order_mode == 2) std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  return dispatch(dtype_code, bits, a.plan.m_tiles, Replay{a, order, hoists});
}

extern "C" void plan_marlin(int64_t M, int64_t N, int64_t K, int bits, int64_t slots, int64_t* out) {
  plan_out(make_plan(M, N, K, bits, slots), out);
}

extern "C" void warp_range_marlin(int64_t M, int64_t N, int64_t K, int bits, int64_t slots, int split, int warp,
                                  int64_t* out) {
  const Range r = warp_range(make_plan(M, N, K, bits, slots), split, warp);
  out[0] = r.begin;
  out[1] = r.end;
}

extern "C" int swizzle_marlin(int row, int chunk) { return swizzle(row, chunk); }

// Slot geometry for (bits, m_tiles): weight, activation, scale, zero chunk offsets and the slot's bytes.
extern "C" void slot_marlin(int bits, int m_tiles, int64_t* out) {
  auto fill = [&](auto s) {
    using S = decltype(s);
    out[0] = S::kW;
    out[1] = S::kX;
    out[2] = S::kS;
    out[3] = S::kZ;
    out[4] = S::kBytes;
  };
  if (bits == 4) m_tiles == 1 ? fill(Slot<4, 1>{}) : fill(Slot<4, 2>{});
  else m_tiles == 1 ? fill(Slot<8, 1>{}) : fill(Slot<8, 2>{});
}

// One lane's copies of iteration `it` (a group start) into `slot` (bits 4, one token tile), for the copy map.
extern "C" void copy_lane_marlin(const int32_t* qweight, const void* x, const void* scales, int64_t N, int64_t K,
                                 int64_t group, int64_t it, int lane, unsigned char* slot) {
  Args a{};
  a.x = x;
  a.qweight = qweight;
  a.scales = a.zeros = scales;
  a.M = 1;
  a.N = N;
  a.K = K;
  a.x_stride = K;
  a.group = group;
  copy_iteration<4, 1>(a, 0, it, true, lane, slot, 0);
}

extern "C" int launch_marlin(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                             const void* zeros, const void* bias, void* y, int64_t M, int64_t N, int64_t K, int bits,
                             int64_t group_size, int dtype_code) {
  return qwen2vl_quant_gemm_marlin(x, x_stride, qweight, scales, zeros, bias, y, nullptr, 0, nullptr, 0, M, N, K,
                                   bits, group_size, dtype_code, nullptr);
}
extern "C" int workspace_marlin(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code) {
  int64_t floats = 0, counters = 0;
  return qwen2vl_quant_marlin_workspace(M, N, K, bits, group_size, dtype_code, &floats, &counters);
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = build_host_replay(_REPLAY_SOURCE, tmp_path_factory.mktemp("quant_marlin_replay"), name="marlin")
    i64, i32, ptr, p64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    so.replay_marlin.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32, i64, i32,
                                 i64, i32, i32, p64, p64]
    so.plan_marlin.argtypes = [i64, i64, i64, i32, i64, p64]
    so.warp_range_marlin.argtypes = [i64, i64, i64, i32, i64, i32, i32, p64]
    so.swizzle_marlin.argtypes = [i32, i32]
    so.slot_marlin.argtypes = [i32, i32, p64]
    so.copy_lane_marlin.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, ptr]
    so.launch_marlin.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32, i64, i32]
    so.workspace_marlin.argtypes = [i64, i64, i64, i32, i64, i32]
    return so


def _plan(lib, m, n, k, bits, slots):
    out = (ctypes.c_int64 * 5)()
    lib.plan_marlin(m, n, k, bits, slots, out)
    return dict(zip(("m_tiles", "splits", "col_tiles", "iters", "iters_per_split"), list(out)))


def run_replay(lib, x, w, bias=None, slots=H100_MARLIN_SLOTS, order=0, seed=0, x_stride=None):
    """y (M, N) of the replayed kernel, its plan, the counters after the run and the number of hoists."""
    m, k = x.shape
    n = w.out_features
    plan = _plan(lib, m, n, k, w.bits, slots)
    y = torch.full((m, n), float("nan"), dtype=x.dtype)
    scratch = torch.full((plan["splits"] * m * n,), float("nan"))
    counters = torch.zeros(plan["col_tiles"] + 3, dtype=torch.int32)
    out, hoists = (ctypes.c_int64 * 5)(), ctypes.c_int64(-1)
    status = lib.replay_marlin(_ptr(x), x.stride(0) if x_stride is None else x_stride, _ptr(w.qweight),
                               _ptr(w.scales), _ptr(w.zeros), _ptr(bias), _ptr(y), _ptr(scratch), scratch.numel(),
                               _ptr(counters), counters.numel(), m, n, k, w.bits, w.group_size, DTYPE_CODE[x.dtype],
                               slots, order, seed, out, ctypes.byref(hoists))
    assert status == OK, f"replay returned status {status}"
    return y, plan, counters, hoists.value


def _x(m, k, dtype, seed):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- numerics ---------------------------------------------------------------------------------------------------

CASES = [  # (M, N, K, bits, group): odd N (not a multiple of the 64-column tile), K not a multiple of 256
    (1, 72, 96, 4, 32), (3, 200, 192, 4, 64), (16, 136, 256, 4, 128), (3, 8, 128, 4, -1), (16, 64, 160, 4, 32),
    (1, 520, 384, 4, 128), (9, 136, 256, 4, 64),
    (1, 72, 48, 8, 16), (3, 200, 96, 8, 32), (16, 24, 256, 8, 64), (1, 136, 256, 8, 128), (16, 136, 80, 8, -1),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,bits,group", CASES)
def test_marlin_replay_matches_reference(lib, m, n, k, bits, group, dtype):
    seed = hash((m, n, k, bits, group)) % 1000
    w = _weight(n, k, bits, group, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype) if m % 2 else None
    for slots in (1, H100_MARLIN_SLOTS):
        y, plan, counters, _ = run_replay(lib, x, w, bias, slots=slots)
        assert_matches(y, reference(x, w, bias))
        assert counters.eq(0).all()
        assert plan["m_tiles"] == (1 if m <= 8 else 2)


@pytest.mark.parametrize("fmt", ["gptq-v1", "gptq-v2", "awq"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_marlin_replay_gptq_and_awq_checkpoints(lib, fmt, group, m):
    """Weights as a GPTQ (v1: stored zero - 1, v2: the zero) or AWQ (interleaved nibble order, no offset)
    checkpoint stores them, loaded through quant.formats into the runtime layout the kernel reads."""
    n, k, dtype, bits = 200, 512, torch.float16, 4
    w0 = _weight(n, k, bits, group, dtype, group + m)
    if fmt == "awq":
        t = to_awq(w0, scale_dtype=dtype)
        w = from_awq(t["qweight"], t["qzeros"], t["scales"], group, bits, dtype=dtype)
    else:
        version = 1 if fmt == "gptq-v1" else 2
        t = to_gptq(w0, version=version, scale_dtype=dtype)
        w = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, group, version=version, dtype=dtype)
    assert torch.equal(dequantize(w, dtype), dequantize(w0, dtype))
    x = _x(m, k, dtype, 7 + m)
    y, *_ = run_replay(lib, x, w)
    assert_matches(y, reference(x, w))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_marlin_replay_int8_gptq_and_symmetric(lib, bits, m):
    """GPTQ int8 / int4 at group 128 and symmetric zero points (8 / 128), plus the largest zero a GPTQ v1
    checkpoint yields (2^bits)."""
    n, k, dtype = 136, 512, torch.bfloat16
    w0 = _weight(n, k, bits, 128, dtype, 40 + bits, sym=True)
    t = to_gptq(w0, version=2, scale_dtype=dtype)
    w = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 128, version=2, dtype=dtype)
    x = _x(m, k, dtype, 41)
    assert_matches(run_replay(lib, x, w)[0], reference(x, w))
    w16 = QuantizedWeight(w.qweight, w.scales, torch.full_like(w.zeros, float(2 ** bits)), bits, 128)
    assert_matches(run_replay(lib, x, w16)[0], reference(x, w16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_marlin_dequantisation_is_bit_exact(lib, bits, dtype):
    """One-hot activation rows pick single weights: y[r] = dequantize(W)[:, k_r] (+ b) exactly, for every k,
    through every slot of the ring and both split modes: the lop3 / magic-number dequantisation with the hoisted
    zero and scale is bit-identical to quant.dequantize (no bound needed)."""
    n, k, group = 136, 512, 64
    w = _weight(n, k, bits, group, dtype, 11)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(12)) * 0.1).to(dtype)
    dense = dequantize(w, dtype)
    for first in range(0, k, 16):
        ks = torch.arange(first, first + 16)
        x = torch.zeros(16, k, dtype=dtype)
        x[torch.arange(16), ks] = 1
        for slots in (1, H100_MARLIN_SLOTS):
            y = run_replay(lib, x, w, bias, slots=slots)[0]
            expected = (dense[:, ks].t().float() + bias.float()).to(dtype)
            assert torch.equal(y, expected), f"k {first}..{first + 15}, slots {slots}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 16])
def test_marlin_replay_real_decode_shape(lib, bits, m):
    """Qwen2-VL-7B's o_proj (3584 x 3584, group 128) with an H100's block slots: split-K, every warp's run
    several iterations and groups long (hoists counted: one per group a warp's run touches, never per
    iteration)."""
    n = k = 3584
    dtype = torch.bfloat16
    w = _weight(n, k, bits, 128, dtype, 5)
    x = _x(m, k, dtype, 6)
    y, plan, counters, hoists = run_replay(lib, x, w)
    assert plan["splits"] > 1 and plan["col_tiles"] == 56
    assert_matches(y, reference(x, w))
    assert counters.eq(0).all()
    step = 4 * 32 // bits
    expected = 0
    for split in range(plan["splits"]):
        for warp in range(4):
            b, e = _warp_range(lib, m, n, k, bits, H100_MARLIN_SLOTS, split, warp)
            expected += sum(1 for it in range(b, e) if it == b or (it * step) % 128 == 0)
    assert hoists == expected * plan["col_tiles"]
    assert hoists < plan["iters"] * plan["col_tiles"]  # fewer than one per iteration


def test_marlin_replay_is_deterministic_whichever_block_finishes_last(lib):
    w = _weight(200, 1024, 4, 128, torch.bfloat16, 9)
    x = _x(3, 1024, torch.bfloat16, 10)
    runs = [run_replay(lib, x, w, order=o, seed=s) for o, s in ((0, 0), (1, 0), (2, 1), (2, 2))]
    assert runs[0][1]["splits"] > 1
    for y, _, counters, _ in runs:
        assert torch.equal(y, runs[0][0])
        assert counters.eq(0).all()


def test_marlin_replay_strided_activation_rows(lib):
    k, dtype = 128, torch.float16
    w = _weight(64, k, 8, 32, dtype, 13)
    buf = _x(4, k + 24, dtype, 14)
    x = buf[:, :k]
    y = run_replay(lib, x, w, x_stride=k + 24)[0]
    assert_matches(y, reference(x.contiguous(), w))


# ---- plan, ranges, copy map, swizzle ------------------------------------------------------------------------------

def _warp_range(lib, m, n, k, bits, slots, split, warp):
    out = (ctypes.c_int64 * 2)()
    lib.warp_range_marlin(m, n, k, bits, slots, split, warp, out)
    return out[0], out[1]


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (8192, 29568), (72, 96)])
def test_marlin_plan_and_warp_ranges(lib, m, n, k):
    """One wave, >= 2 iterations per warp, bounded partial traffic (the register-direct kernel's rule), and the
    warps' contiguous runs partition [0, iters) exactly."""
    for bits in (4, 8):
        p = _plan(lib, m, n, k, bits, H100_MARLIN_SLOTS)
        assert p["col_tiles"] == -(-n // 64) and p["iters"] == k // (4 * 32 // bits)
        assert 1 <= p["splits"] <= 64
        assert (p["splits"] - 1) * p["iters_per_split"] < p["iters"] <= p["splits"] * p["iters_per_split"]
        if p["splits"] > 1:
            assert p["splits"] * p["col_tiles"] <= H100_MARLIN_SLOTS
            assert p["iters_per_split"] >= 8
            assert 8 * p["splits"] * m * n <= k * n * bits / 8 / 2
        covered = []
        for split in range(p["splits"]):
            for warp in range(4):
                b, e = _warp_range(lib, m, n, k, bits, H100_MARLIN_SLOTS, split, warp)
                assert b <= e
                covered.extend(range(b, e))
        assert covered == list(range(p["iters"]))


def test_marlin_copy_map_is_whole_sectors(lib):
    """Each lane's two weight cp.asyncs: instruction i of lane L copies chunk L + 32 i of the slot's 4 rows x 16
    chunks, so an instruction's 32 lanes read 2 whole rows of 256 contiguous bytes (4 full 128-byte sectors,
    lanes 16 bytes apart), and every chunk lands once, at its swizzled place."""
    n, k, it = 128, 256, 3
    words = torch.arange(k // 8 * n, dtype=torch.int32).view(k // 8, n)  # a word's value: its index
    x = torch.zeros(1, k, dtype=torch.float16)
    scales = torch.zeros(k // 32, n, dtype=torch.float16)
    geo = (ctypes.c_int64 * 5)()
    lib.slot_marlin(4, 1, geo)
    kw, slot_bytes = geo[0], geo[4]
    landed = {}
    for lane in range(32):
        slot = torch.full((slot_bytes,), 0xA5, dtype=torch.uint8)
        lib.copy_lane_marlin(_ptr(words), _ptr(x), _ptr(scales), n, k, 32, it, lane, _ptr(slot))
        wchunks = slot[16 * kw: 16 * (kw + 64)].view(64, 16)
        for pos in range(64):
            if not torch.equal(wchunks[pos], torch.full((16,), 0xA5, dtype=torch.uint8)):
                first = int(wchunks[pos].view(torch.int32)[0])
                landed.setdefault(lane, []).append((pos, first))
    for lane in range(32):
        assert len(landed[lane]) == 2
        for i, c in enumerate(sorted(landed[lane], key=lambda pc: pc[1])):  # instruction 0 reads the lower row
            pos, first = c
            chunk = lane + 32 * i
            row, col_chunk = divmod(chunk, 16)
            assert first == (4 * it + row) * n + 4 * col_chunk  # global word of this lane's chunk
            assert pos == 16 * row + lib.swizzle_marlin(row, col_chunk)
    for i in range(2):  # an instruction's global byte addresses: consecutive 16-byte steps within each row
        addrs = [(4 * it + (lane + 32 * i) // 16) * n * 4 + 16 * ((lane + 32 * i) % 16) for lane in range(32)]
        for half in (addrs[:16], addrs[16:]):
            assert [b - half[0] for b in half] == list(range(0, 256, 16))


def test_marlin_shared_memory_reads_are_conflict_free(lib):
    """make_fragments' 16-byte weight reads: lane (g, t) reads row t, chunks 2g and 2g + 1 (two instructions);
    a 16-byte load is served in phases of 8 lanes, each must hit 8 distinct bank quads (chunk % 8). The
    swizzle is a permutation of each row's chunks, and so are the 8-lane phases of the cp.async writes."""
    for row in range(4):
        assert sorted(lib.swizzle_marlin(row, c) for c in range(16)) == list(range(16))
    for i in range(2):
        for phase in range(4):
            quads = []
            for lane in range(8 * phase, 8 * phase + 8):
                g, t = lane // 4, lane % 4
                quads.append((16 * t + lib.swizzle_marlin(t, 2 * g + i)) % 8)
            assert len(set(quads)) == 8, (i, phase, quads)
    for i in range(2):  # cp.async writes: lane L writes chunk L + 32 i
        for phase in range(4):
            quads = []
            for lane in range(8 * phase, 8 * phase + 8):
                row, c = divmod(lane + 32 * i, 16)
                quads.append((16 * row + lib.swizzle_marlin(row, c)) % 8)
            assert len(set(quads)) == 8


# ---- the sm_90a build: no spills, the resources the occupancy assumes ----------------------------------------------

def test_marlin_compiles_for_hopper_without_spills(tmp_path):
    """nvcc -Xptxas -v on the kernel file (what .ci/compile_cuda.sh checks for every .cu file): all 8 instances
    (fp16/bf16 x int4/int8 x 1/2 token tiles), no local-memory spill, <= 128 registers (>= 4 resident blocks of
    128 threads per SM) and the static shared memory of the slot rings (4 warps x 4 slots) within 48 KB."""
    import re
    import shutil
    import subprocess

    from helpers_cuda import CSRC

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v", f"-I{CSRC}",
           "-c", str(CSRC / "quant_decode_marlin.cu"), "-o", str(tmp_path / "marlin.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    log = result.stderr
    entries = re.findall(r"Compiling entry function '(\w*quant_marlin_kernel\w*)'", log)
    assert len(entries) == 8, log
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), log
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    smem = [int(v) for v in re.findall(r"(\d+) bytes smem", log)]
    assert len(regs) == 8 and max(regs) <= 128, log
    assert len(smem) == 8 and max(smem) <= 48 * 1024, log
    print(f"quant_marlin_kernel sm_90a: {min(regs)}-{max(regs)} registers, no spills, "
          f"{min(smem)}-{max(smem)} bytes smem")


# ---- the launcher's argument checks (no GPU) -----------------------------------------------------------------------

def test_marlin_launcher_rejects_bad_arguments(lib):
    dtype = torch.bfloat16
    w = _weight(64, 128, 4, 32, dtype, 15)
    w8 = _weight(64, 128, 8, 32, dtype, 16)
    x = torch.randn(2, 128).to(dtype)
    y = torch.empty(2, 64, dtype=dtype)

    def launch(x=x, w=w, y=y, m=2, n=64, k=128, bits=4, group=32, dtype_code=2, x_stride=128, qweight=None):
        qw = w.qweight if qweight is None else qweight
        return lib.launch_marlin(_ptr(x), x_stride, _ptr(qw), _ptr(w.scales), _ptr(w.zeros), None, _ptr(y), m, n,
                                 k, bits, group, dtype_code)

    assert launch(m=17) == BAD_SHAPE
    assert launch(n=60) == BAD_SHAPE
    assert launch(k=112) == BAD_SHAPE
    assert launch(group=16) == BAD_SHAPE
    assert launch(group=48) == BAD_SHAPE
    assert launch(bits=3) == BAD_SHAPE
    assert launch(dtype_code=0) == BAD_SHAPE
    assert launch(x_stride=64) == BAD_SHAPE
    x_odd = torch.randn(2 * 128 + 1).to(dtype)[1:].view(2, 128)
    assert launch(x=x_odd) == BAD_ALIGNMENT
    assert launch(x_stride=132) == BAD_ALIGNMENT
    x8 = torch.randn(2 * 128 + 4).to(dtype)[4:].view(2, 128)  # 8-byte aligned: enough for the other kernel's int8
    assert launch(x=x8, w=w8, bits=8) == BAD_ALIGNMENT  # 16-byte cp.async chunks here
    q_odd = torch.zeros(w.qweight.numel() + 1, dtype=torch.int32)[1:].view_as(w.qweight)
    assert launch(qweight=q_odd) == BAD_ALIGNMENT
    assert launch(m=0) == OK
    assert launch() == LAUNCH_FAILED  # valid, no GPU
    assert launch(w=w8, bits=8) == LAUNCH_FAILED
    assert lib.workspace_marlin(2, 64, 128, 4, 32, 2) == LAUNCH_FAILED
    assert lib.workspace_marlin(2, 64, 128, 4, 16, 2) == BAD_SHAPE


# ---- registration and routing ----------------------------------------------------------------------------------------

def test_marlin_variant_is_registered_for_auto_only(monkeypatch):
    from qwen2vl_fast.ops import registry

    op = get_op("quant_linear")
    assert "cuda-marlin" in op.variants
    assert "cuda-marlin" not in op.implementations()  # never picked by name: raced only
    assert "cuda-marlin" not in op.candidates(torch.device("cpu"))
    monkeypatch.setattr(registry, "_CUDA_EXT_OK", True)  # as if _C were built (no GPU here)
    cands = op.candidates(torch.device("cuda"))
    assert "cuda-marlin" in cands and "cuda" in cands
    assert op.untuned(cands) != "cuda-marlin"  # the untuned default never changes


@pytest.fixture(scope="module")
def binding(tmp_path_factory):
    return binding_ops(tmp_path_factory)


def test_marlin_variant_through_the_binding_on_meta(binding, monkeypatch):
    """The variant runs quant_gemm_decode_marlin for decode rows (act order and bias through the shared wrapper),
    and the Triton kernel above 16 rows."""
    import qwen2vl_fast.kernels.quant_gemm as triton_quant

    from qwen2vl_fast.ops import cuda_ext

    calls = []

    class Recorder:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(binding, name)

    monkeypatch.setattr(cuda_ext, "_ops", lambda: Recorder())
    monkeypatch.setattr(cuda_ext, "_COUNTERS", {})
    monkeypatch.setattr(triton_quant, "quant_linear", lambda x, w, b=None: calls.append("triton"))
    meta = torch.device("meta")
    w = _weight(72, 256, 4, 128, torch.bfloat16, 31).to(meta)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(32)).to(meta)
    w_act = QuantizedWeight(w.qweight, w.scales, w.zeros, 4, 128, perm)
    y = cuda_ext.quant_linear_cuda_marlin(torch.empty(2, 5, 256, dtype=torch.bfloat16, device=meta), w_act,
                                          torch.empty(72, device=meta))
    assert y.shape == (2, 5, 72) and y.dtype == torch.bfloat16 and calls == ["quant_gemm_decode_marlin"]
    calls.clear()
    cuda_ext.quant_linear_cuda(torch.empty(1, 256, dtype=torch.bfloat16, device=meta), w)
    assert calls == ["quant_gemm_decode"]  # the registered "cuda" implementation is unchanged
    calls.clear()
    cuda_ext.quant_linear_cuda_marlin(torch.empty(17, 256, dtype=torch.bfloat16, device=meta), w)
    assert calls == ["triton"]


def test_binding_quant_gemm_decode_marlin(binding):
    """csrc/quant_ops.cpp: the schema and Meta shapes of the new op, and its argument checks (shared with
    quant_gemm_decode)."""
    assert str(binding.quant_gemm_decode_marlin.default._schema) == (
        "qwen2vl_fast::quant_gemm_decode_marlin(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, "
        "int bits, int group_size, Tensor(a!) counters) -> Tensor")
    meta = torch.device("meta")

    def args(m=3, n=72, k=256, bits=4, group=128):
        g = k // group if group != -1 else 1
        bf = {"dtype": torch.bfloat16, "device": meta}
        return [torch.empty(m, k, **bf), torch.empty(k * bits // 32, n, dtype=torch.int32, device=meta),
                torch.empty(g, n, **bf), torch.empty(g, n, **bf), torch.empty(n, **bf), bits, group,
                torch.zeros(16, dtype=torch.int32, device=meta)]

    for m, bits, group in ((1, 4, 128), (16, 8, -1), (0, 4, 32)):
        y = binding.quant_gemm_decode_marlin(*args(m=m, bits=bits, group=group))
        assert y.shape == (m, 72) and y.dtype == torch.bfloat16
    for kw, message in (({"m": 17}, "at most 16 rows"), ({"n": 60}, "multiple of 8"),
                        ({"group": 16}, "group_size 16 must be -1 or divide")):
        with pytest.raises(RuntimeError, match=message):
            binding.quant_gemm_decode_marlin(*args(**kw))
    with pytest.raises(NotImplementedError):  # CUDA and Meta kernels only
        binding.quant_gemm_decode_marlin(*[torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t
                                           for t in args()])


def test_marlin_cuda_kernel_rejects_bad_input_without_a_gpu(binding):
    """The op's CUDA kernel on storage-less "cuda:0" tensors: every check raises before any data access; a call
    that passes them fails later (no GPU, no storage), before any launch."""
    bf16 = torch.bfloat16
    x17, x2 = StoragelessCuda((17, 128), bf16), StoragelessCuda((2, 128), torch.float16)
    qweight, counters = StoragelessCuda((16, 72), torch.int32), StoragelessCuda((8192,), torch.int32)
    scales = StoragelessCuda((4, 72), bf16)
    op = binding.quant_gemm_decode_marlin
    for call, message in (
            (lambda: op(x17, qweight, scales, scales, None, 4, 32, counters), "at most 16 rows"),
            (lambda: op(x2, qweight, scales, scales, None, 4, 32, counters), "scales must be Half like x"),
            (lambda: op(StoragelessCuda((2, 128), bf16), qweight, scales, scales, None, 4, 32,
                        StoragelessCuda((8192,), torch.int64)), "counters must be a contiguous int32"),
            (lambda: op(StoragelessCuda((2, 128), bf16, strides=(1, 2)), qweight, scales, scales, None, 4, 32,
                        counters), "rows must be contiguous"),
            (lambda: op(StoragelessCuda((2, 128), bf16), StoragelessCuda((16, 72), torch.int32, strides=(1, 16)),
                        scales, scales, None, 4, 32, counters), "qweight must be contiguous"),
            (lambda: op(StoragelessCuda((2, 128), bf16), qweight, scales, scales, StoragelessCuda((64,), bf16), 4,
                        32, counters), "bias must be a contiguous"),
            (lambda: op(StoragelessCuda((2, 128), bf16), qweight, scales, scales, None, 4, 32, counters), None)):
        with pytest.raises(RuntimeError, match=message):
            call()


# ---- GPU ------------------------------------------------------------------------------------------------------------

def _gpu_ops():
    ops = extension_ops()
    if not hasattr(ops, "quant_gemm_decode_marlin"):
        pytest.fail("qwen2vl_fast._C has no quant_gemm_decode_marlin: rebuild it")
    return ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 9, 16])
@pytest.mark.parametrize("n,k,group", [(72, 96, 32), (200, 384, 64), (3584, 3584, 128), (4608, 3584, -1),
                                       (3584, 18944, 128), (37888, 3584, 128)])
def test_gpu_marlin_matches_reference_and_is_deterministic(m, n, k, group, bits, dtype):
    _gpu_ops()
    from qwen2vl_fast.ops.cuda_ext import decode_gemm

    w = _weight(n, k, bits, group, dtype, m + n).to("cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    y = decode_gemm(x, w, bias, kernel="quant_gemm_decode_marlin")
    assert_matches(y.cpu(), reference(x.cpu(), w.to("cpu"), bias.cpu()))
    for _ in range(3):
        assert torch.equal(decode_gemm(x, w, bias, kernel="quant_gemm_decode_marlin"), y)  # run to run
    other = decode_gemm(x, w, bias)  # the register-direct kernel: the same products, summed in another order
    assert_matches(y.cpu(), other.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_marlin_dequantisation_is_bit_exact(bits):
    _gpu_ops()
    from qwen2vl_fast.ops.cuda_ext import decode_gemm

    n, k, dtype = 136, 512, torch.bfloat16
    w = _weight(n, k, bits, 64, dtype, 11)
    dense = dequantize(w, dtype)
    wc = w.to("cuda")
    for first in range(0, k, 16):
        ks = torch.arange(first, first + 16)
        x = torch.zeros(16, k, dtype=dtype)
        x[torch.arange(16), ks] = 1
        y = decode_gemm(x.cuda(), wc, kernel="quant_gemm_decode_marlin").cpu()
        assert torch.equal(y, dense[:, ks].t().contiguous())


@pytest.mark.gpu
def test_gpu_marlin_rejects_bad_input_and_captures():
    ops = _gpu_ops()
    from qwen2vl_fast.ops.cuda_ext import decode_gemm

    w = _weight(72, 128, 4, 32, torch.bfloat16, 23).to("cuda")
    counters = torch.zeros(8192, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        ops.quant_gemm_decode_marlin(torch.randn(17, 128, device="cuda").bfloat16(), w.qweight, w.scales, w.zeros,
                                     None, 4, 32, counters)
    with pytest.raises(RuntimeError, match="scales must be Half like x"):
        ops.quant_gemm_decode_marlin(torch.randn(2, 128, device="cuda").half(), w.qweight, w.scales, w.zeros, None,
                                     4, 32, counters)
    x = torch.randn(2, 128, device="cuda").bfloat16()
    eager = decode_gemm(x, w, kernel="quant_gemm_decode_marlin")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_gemm(x, w, kernel="quant_gemm_decode_marlin")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
def test_gpu_auto_races_the_marlin_variant(tmp_path):
    """`auto` measures cuda-marlin next to the register-direct kernel, Triton and the reference at a 7B shape;
    whichever wins, the result matches the reference. The report names every candidate's time."""
    _gpu_ops()
    from qwen2vl_fast.ops import resolve

    table = resolve("auto", "cuda", cache_path=tmp_path / "dispatch.json")
    w = _weight(3584, 3584, 4, 128, torch.bfloat16, 3).to("cuda")
    x = torch.randn(1, 3584, device="cuda").bfloat16()
    y = table.quant_linear(x, w)
    assert_matches(y.cpu(), reference(x.cpu(), w.to("cpu")))
    rows = [r for r in table.dispatch_report() if r[0] == "quant_linear"]
    assert rows and "cuda-marlin" in rows[0][3]


SHAPES_7B = [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)]


def _graph_ms(fn, calls: int) -> float:
    """Milliseconds per call of `fn(i)` for i in range(calls), captured once into a CUDA graph (no launch gaps)
    and replayed; the median of 5 replays."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)  # warm-up, outside the graph (workspace allocations, occupancy query)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[2]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_marlin_bandwidth_at_7b_decode_shapes(bits):
    """The issue's goal, measured (reported, asserted only loosely): at M = 1 on the 7B layer shapes (bf16, group
    128) each decode kernel's bytes (packed weights + scales + zeros + x + y) per second against the measured copy
    bandwidth (bench/roofline.py), weights rotated over copies exceeding 2x L2 so they stream from HBM. Goal:
    the Marlin-class kernel >= 80%. Prints one line per shape; writes $OUT/marlin_bandwidth_int{bits}.json when
    OUT is set."""
    import json
    import os

    from helpers_bench import bench_module

    _gpu_ops()
    from qwen2vl_fast.ops.cuda_ext import decode_gemm

    roofline = bench_module("roofline")
    ceiling = roofline.device_ceilings(torch.device("cuda"), torch.bfloat16)["gbps"]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, n, k in SHAPES_7B:
        w = _weight(n, k, bits, 128, torch.bfloat16, n).to("cuda")
        nbytes = n * k * bits // 8 + 2 * w.scales.numel() * 2 + 2 * (k + n)
        copies = max(1, -(-2 * l2 // nbytes))
        ws = [QuantizedWeight(w.qweight.clone(), w.scales.clone(), w.zeros.clone(), bits, 128) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda").bfloat16()
        row = {"layer": name, "N": n, "K": k, "bits": bits, "bytes": nbytes, "copy_gbps": ceiling}
        for label, kernel in (("register", "quant_gemm_decode"), ("marlin", "quant_gemm_decode_marlin")):
            def call(i, kernel=kernel, x=x, ws=ws):
                return decode_gemm(x, ws[i % len(ws)], None, kernel=kernel)

            ms = _graph_ms(call, 4 * copies)
            row[f"{label}_us"] = ms * 1e3
            row[f"{label}_pct_of_copy"] = 100 * nbytes / (ms * 1e-3) / 1e9 / ceiling
        rows.append(row)
        print(f"int{bits} {name:8s} N {n:6d} K {k:6d}: register-direct {row['register_us']:7.2f} us "
              f"({row['register_pct_of_copy']:5.1f}%), marlin {row['marlin_us']:7.2f} us "
              f"({row['marlin_pct_of_copy']:5.1f}% of {ceiling:.0f} GB/s; goal 80%)")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"marlin_bandwidth_int{bits}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    for row in rows:
        assert row["marlin_pct_of_copy"] < 110, "above the copy ceiling: the weights were read from L2"
