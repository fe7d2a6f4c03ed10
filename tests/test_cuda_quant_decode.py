"""The CUDA C++ weight-only decode GEMM (csrc/quant_decode_gemm.cu) and its "cuda" quant_linear registration.

Without a GPU (CI): the kernel file compiles for sm_90a (test_cuda_ext.py compiles every .cu file); here its
lane-level bodies (loads, dequantisation into mma fragments, the epilogue, the split-K reduction) are replayed
on the CPU for every block, warp and lane, with the kernel's own plan, and a host emulation of the warp-wide
mma.sync m16n8k16 built from the PTX ISA's fragment layout. The replay checks:
  - the result against x @ dequantize(W)^T + b (plain PyTorch), on odd and real shapes, int4 / int8, fp16 / bf16,
    every group size, M = 1..16, with and without split-K;
  - that the dequantised weights are bit-identical to quant.dequantize (one-hot activations pick single weights),
    which also pins the free k-order inside the mma (slot -> packed nibble) to the activations' order;
  - determinism: the same bits whichever block of a column tile finishes last; the counters left at zero;
  - the launcher's argument checks (status codes), without a GPU.
The Python wrapper (ops/cuda_ext.py) into the binding's schema and Meta kernel, on meta tensors: against the real
qwen2vl_fast._C where torch has CUDA, the g++-built bindings where torch is CPU-only (tests/helpers_cuda.py).
With a GPU (`gpu` mark): the registered op against the reference, dispatch by M, CUDA-graph capture.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from helpers_cuda import binding_ops, build_host_replay, extension_ops

from qwen2vl_fast.ops import get_op
from qwen2vl_fast.quant.quantizer import quantize_rtn
from qwen2vl_fast.quant.weight import QuantizedWeight, dequantize

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/kernels.h DTypeCode
OK, BAD_SHAPE, BAD_ALIGNMENT, LAUNCH_FAILED = 0, 1, 2, 3  # csrc/common.h Status

_REPLAY_SOURCE = r"""
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "quant_decode_gemm.cu"

using namespace qwen2vl_fast;
using namespace qwen2vl_fast::qdecode;

namespace {

template <typename T>
float half_of(uint32_t reg, int i) {  // element i (0 = low 16 bits) of a packed pair
  const uint16_t bits = static_cast<uint16_t>(i ? reg >> 16 : reg & 0xffff);
  T h;
  std::memcpy(&h, &bits, 2);
  return detail::to_float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A (16x16) B (16x8) + C over a warp, from the PTX ISA's
// fragment layout: lane = 4 * group + t; A regs 0..3 = (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..),
// (row g+8, k 2t+8..); B regs 0..1 = (k 2t..2t+1, col g), (k 2t+8..2t+9, col g); C/D regs 0..3 = (row g, col 2t),
// (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1). Products are exact in fp32; the sum in double.
template <typename T>
void warp_mma(float* const d[32], const uint32_t* const a[32], const uint32_t* const b[32]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 2; ++i) {
      A[g][2 * t + i] = half_of<T>(a[lane][0], i);
      A[g + 8][2 * t + i] = half_of<T>(a[lane][1], i);
      A[g][2 * t + 8 + i] = half_of<T>(a[lane][2], i);
      A[g + 8][2 * t + 8 + i] = half_of<T>(a[lane][3], i);
      B[2 * t + i][g] = half_of<T>(b[lane][0], i);
      B[2 * t + 8 + i][g] = half_of<T>(b[lane][1], i);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      double sum = d[lane][i];
      for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
      d[lane][i] = static_cast<float>(sum);
    }
  }
}

// The kernel, block by block in `order`, warp by warp, lane by lane: the device code's loop and epilogue with
// its synchronisation made sequential (loads are pure, so issuing them per iteration changes nothing).
struct Replay {
  const Args& a;
  const std::vector<int64_t>& order;
  template <typename T, int BITS, int MT>
  int run() const {
    for (const int64_t block : order) {
      const int64_t tile = block % a.plan.col_tiles;
      const int split = static_cast<int>(block / a.plan.col_tiles);
      const int64_t begin = split * a.plan.iters_per_split;
      const int64_t end = std::min(begin + a.plan.iters_per_split, a.plan.iters);
      std::vector<Acc<MT>> acc(kWarps * 32, Acc<MT>{});
      std::vector<Raw<MT>> raw(32);
      std::vector<Frags<BITS, MT>> frags(32);
      for (int warp = 0; warp < kWarps; ++warp)
        for (int64_t it = begin + warp; it < end; it += kWarps) {
          for (int lane = 0; lane < 32; ++lane) {
            load_iteration<BITS, MT>(a, tile, it, lane, raw[lane]);
            make_fragments<T, BITS, MT>(raw[lane], frags[lane]);
          }
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
      std::vector<float> red((kWarps - 1) * 16 * MT * 32, 1e30f);  // garbage must never reach the output
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

}  // namespace

// order: 0 = blocks in launch order, 1 = reversed, 2 = shuffled (seed). plan_out: m_tiles, splits, col_tiles,
// iters, iters_per_split.
extern "C" int replay_quant_decode(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                                   const void* zeros, const void* bias, void* y, float* scratch,
                                   int64_t scratch_floats, int32_t* counters, int64_t counters_len, int64_t M,
                                   int64_t N, int64_t K, int bits, int64_t group_size, int dtype_code,
                                   int64_t slots, int order_mode, int seed, int64_t* plan_out) {
  int status = validate(x, x_stride, qweight, scales, zeros, bias, y, M, N, K, bits, group_size, dtype_code);
  if (status != kOk || M == 0) return status;
  Args a;
  status = make_args(x, x_stride, qweight, scales, zeros, bias, y, scratch, scratch_floats, counters, counters_len,
                     M, N, K, bits, group_size, slots, &a);
  plan_out[0] = a.plan.m_tiles;
  plan_out[1] = a.plan.splits;
  plan_out[2] = a.plan.col_tiles;
  plan_out[3] = a.plan.iters;
  plan_out[4] = a.plan.iters_per_split;
  if (status != kOk) return status;
  std::vector<int64_t> order(a.plan.col_tiles * a.plan.splits);
  std::iota(order.begin(), order.end(), 0);
  if (order_mode == 1) std::reverse(order.begin(), order.end());
  if (order_mode == 2) std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  return dispatch(dtype_code, bits, a.plan.m_tiles, Replay{a, order});
}

extern "C" int plan_quant_decode(int64_t M, int64_t N, int64_t K, int bits, int64_t slots, int64_t* plan_out) {
  const Plan p = make_plan(M, N, K, bits, slots);
  plan_out[0] = p.m_tiles;
  plan_out[1] = p.splits;
  plan_out[2] = p.col_tiles;
  plan_out[3] = p.iters;
  plan_out[4] = p.iters_per_split;
  return kOk;
}

// The real entry points, for their argument checks (no GPU here: valid calls end in kLaunchFailed).
extern "C" int launch_quant_decode(const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                                   const void* zeros, const void* bias, void* y, int64_t M, int64_t N, int64_t K,
                                   int bits, int64_t group_size, int dtype_code) {
  return qwen2vl_quant_gemm_decode(x, x_stride, qweight, scales, zeros, bias, y, nullptr, 0, nullptr, 0, M, N, K,
                                   bits, group_size, dtype_code, nullptr);
}
extern "C" int workspace_quant_decode(int64_t M, int64_t N, int64_t K, int bits, int64_t group_size,
                                      int dtype_code) {
  int64_t floats = 0, counters = 0;
  return qwen2vl_quant_decode_workspace(M, N, K, bits, group_size, dtype_code, &floats, &counters);
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = build_host_replay(_REPLAY_SOURCE, tmp_path_factory.mktemp("quant_decode_replay"))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    so.replay_quant_decode.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32,
                                       i64, i32, i64, i32, i32, ctypes.POINTER(i64)]
    so.plan_quant_decode.argtypes = [i64, i64, i64, i32, i64, ctypes.POINTER(i64)]
    so.launch_quant_decode.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32, i64, i32]
    so.workspace_quant_decode.argtypes = [i64, i64, i64, i32, i64, i32]
    return so


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


H100_SLOTS = 132 * 3  # SMs x resident blocks per SM (the kernel's ~160 registers at 128 threads allow 3)


def _plan(lib, m, n, k, bits, slots):
    out = (ctypes.c_int64 * 5)()
    lib.plan_quant_decode(m, n, k, bits, slots, out)
    return dict(zip(("m_tiles", "splits", "col_tiles", "iters", "iters_per_split"), list(out)))


def _weight(n, k, bits, group, dtype, seed, sym=False):
    g = torch.Generator().manual_seed(seed)
    w = quantize_rtn(torch.randn(n, k, generator=g) * 0.05, bits, group, sym=sym)
    return QuantizedWeight(w.qweight, w.scales.to(dtype), w.zeros.to(dtype), bits, group)


def run_replay(lib, x, w, bias=None, slots=H100_SLOTS, order=0, seed=0, x_stride=None, scratch_pad=0):
    """y (M, N) from the replayed kernel; also returns the plan and the counters after the run."""
    m, k = x.shape
    n = w.out_features
    plan = _plan(lib, m, n, k, w.bits, slots)
    y = torch.full((m, n), float("nan"), dtype=x.dtype)  # poisoned: every element must be written
    scratch = torch.full((plan["splits"] * m * n + scratch_pad,), float("nan"))
    counters = torch.zeros(plan["col_tiles"] + 3, dtype=torch.int32)
    out = (ctypes.c_int64 * 5)()
    status = lib.replay_quant_decode(_ptr(x), x.stride(0) if x_stride is None else x_stride, _ptr(w.qweight),
                                     _ptr(w.scales), _ptr(w.zeros), _ptr(bias), _ptr(y), _ptr(scratch),
                                     scratch.numel(), _ptr(counters), counters.numel(), m, n, k, w.bits,
                                     w.group_size, DTYPE_CODE[x.dtype], slots, order, seed, out)
    assert status == OK, f"replay returned status {status}"
    return y, plan, counters


def reference(x, w, bias=None):
    """x @ dequantize(W)^T + b with the dequantised weights in x's dtype (what the kernel multiplies), in float64,
    rounded once to x's dtype."""
    dense = dequantize(w, x.dtype).double()
    y = x.double() @ dense.t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # one or two roundings of the output apart


def assert_matches(y, ref):
    assert not torch.isnan(y).any(), "an output element was never written"
    scale = ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOL[y.dtype], atol=TOL[y.dtype] * scale * 0.05)


# ---- correctness against the reference ----------------------------------------------------------------------

ODD_CASES = [  # (M, N, K, bits, group): N not a multiple of the 64-column tile, K not of 256, every group kind
    (1, 72, 96, 4, 32), (3, 200, 192, 4, 64), (8, 8, 128, 4, 128), (9, 136, 256, 4, -1), (16, 64, 160, 4, 32),
    (1, 72, 48, 8, 16), (5, 200, 96, 8, 32), (13, 24, 256, 8, 128), (16, 136, 80, 8, -1), (2, 520, 384, 4, 128),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,bits,group", ODD_CASES)
def test_replay_matches_reference(lib, m, n, k, bits, group, dtype):
    seed = hash((m, n, k, bits, group)) % 1000
    w = _weight(n, k, bits, group, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype) if m % 2 else None
    for slots in (1, H100_SLOTS):  # one split, and split-K (tiny shapes split only when there are SMs to fill)
        y, plan, counters = run_replay(lib, x, w, bias, slots=slots)
        assert_matches(y, reference(x, w, bias))
        assert counters.eq(0).all()
        assert plan["m_tiles"] == (1 if m <= 8 else 2)


@pytest.mark.parametrize("bits", [4, 8])
def test_replay_symmetric_and_gptq_v1_style_zero_points(lib, bits):
    """Symmetric weights (zero 8 / 128) and the largest zero a GPTQ v1 checkpoint yields (stored 15 + 1 = 16)."""
    n, k, dtype = 72, 128, torch.bfloat16
    w = _weight(n, k, bits, 32, dtype, 3, sym=True)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert_matches(run_replay(lib, x, w)[0], reference(x, w))
    zeros = torch.full_like(w.zeros, float(2 ** bits))  # one past the largest stored value
    w16 = QuantizedWeight(w.qweight, w.scales, zeros, bits, 32)
    assert_matches(run_replay(lib, x, w16)[0], reference(x, w16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_replay_dequantisation_is_bit_exact(lib, bits, dtype):
    """One-hot activation rows pick single weights: y[r] = dequantize(W)[:, k_r] (+ b) exactly, for every k, so
    every packed position reaches the right mma slot, with the same rounding as quant.dequantize."""
    n, k, group = 136, 256, 64
    w = _weight(n, k, bits, group, dtype, 11)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(12)) * 0.1).to(dtype)
    dense = dequantize(w, dtype)
    for first in range(0, k, 16):
        ks = torch.arange(first, first + 16)
        x = torch.zeros(16, k, dtype=dtype)
        x[torch.arange(16), ks] = 1
        for slots in (1, H100_SLOTS):
            y = run_replay(lib, x, w, bias, slots=slots)[0]
            expected = (dense[:, ks].t().float() + bias.float()).to(dtype)
            assert torch.equal(y, expected), f"k {first}..{first + 15}, slots {slots}"


@pytest.mark.parametrize("bits", [4, 8])
def test_replay_real_decode_shape(lib, bits):
    """Qwen2-VL-7B's o_proj (3584 x 3584, group 128) at batch 1 with an H100's block slots: split-K in use."""
    n = k = 3584
    dtype = torch.bfloat16
    w = _weight(n, k, bits, 128, dtype, 5)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(6)).to(dtype)
    y, plan, counters = run_replay(lib, x, w)
    assert plan["splits"] > 1 and plan["col_tiles"] == 56
    assert_matches(y, reference(x, w))
    assert counters.eq(0).all()


def test_replay_batch16_real_width(lib):
    """M = 16 (two token tiles) at the 7B qkv width 4608, int4 group 128, K reduced to keep the replay quick."""
    w = _weight(4608, 512, 4, 128, torch.float16, 7)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(8)).to(torch.float16)
    y, plan, _ = run_replay(lib, x, w)
    assert plan["m_tiles"] == 2
    assert_matches(y, reference(x, w))


def test_replay_is_deterministic_whichever_block_finishes_last(lib):
    w = _weight(200, 1024, 4, 128, torch.bfloat16, 9)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    runs = [run_replay(lib, x, w, order=o, seed=s) for o, s in ((0, 0), (1, 0), (2, 1), (2, 2))]
    assert runs[0][1]["splits"] > 1
    for y, _, counters in runs:
        assert torch.equal(y, runs[0][0])
        assert counters.eq(0).all()


def test_replay_strided_activation_rows(lib):
    """x rows farther apart than K (a padded view): the kernel reads them through x_stride."""
    k, dtype = 128, torch.float16
    w = _weight(64, k, 4, 32, dtype, 13)
    buf = torch.randn(4, k + 24, generator=torch.Generator().manual_seed(14)).to(dtype)
    x = buf[:, :k]
    y = run_replay(lib, x, w, x_stride=k + 24)[0]
    assert_matches(y, reference(x.contiguous(), w))


# ---- the plan -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (8192, 29568)])
def test_plan_fills_one_wave_within_its_limits(lib, m, n, k):
    for bits in (4, 8):
        p = _plan(lib, m, n, k, bits, H100_SLOTS)
        assert p["col_tiles"] == -(-n // 64) and p["iters"] == k // (4 * 32 // bits)
        assert 1 <= p["splits"] <= 64
        assert (p["splits"] - 1) * p["iters_per_split"] < p["iters"] <= p["splits"] * p["iters_per_split"]
        if p["splits"] > 1:
            assert p["splits"] * p["col_tiles"] <= H100_SLOTS  # one wave: no partly filled second one
            assert p["iters_per_split"] >= 8  # >= 2 iterations per warp
            assert 8 * p["splits"] * m * n <= k * n * bits / 8 / 2  # partial sums <= half the weight bytes
        if p["col_tiles"] * 2 > H100_SLOTS:
            assert p["splits"] == 1  # a second split would not fit in the wave


# ---- argument checks of the real launcher (no GPU needed: it returns before any CUDA call) ------------------

def test_launcher_rejects_bad_arguments(lib):
    dtype = torch.bfloat16
    w = _weight(64, 128, 4, 32, dtype, 15)
    x = torch.randn(2, 128).to(dtype)
    y = torch.empty(2, 64, dtype=dtype)

    def launch(x=x, w=w, y=y, m=2, n=64, k=128, bits=4, group=32, dtype_code=2, x_stride=128, qweight=None):
        qw = w.qweight if qweight is None else qweight
        return lib.launch_quant_decode(_ptr(x), x_stride, _ptr(qw), _ptr(w.scales), _ptr(w.zeros), None, _ptr(y),
                                       m, n, k, bits, group, dtype_code)

    assert launch(m=17) == BAD_SHAPE  # the decode kernel stops at 16 rows
    assert launch(n=60) == BAD_SHAPE  # N % 8
    assert launch(k=112) == BAD_SHAPE  # K % 32 (int4)
    assert launch(group=16) == BAD_SHAPE  # a group smaller than one iteration's 32 k
    assert launch(group=48) == BAD_SHAPE  # K % group
    assert launch(bits=3) == BAD_SHAPE
    assert launch(dtype_code=0) == BAD_SHAPE  # fp32: no fp32 mma
    assert launch(x_stride=64) == BAD_SHAPE  # rows would overlap
    x_odd = torch.randn(2 * 128 + 1).to(dtype)[1:].view(2, 128)  # 2-byte offset
    assert launch(x=x_odd) == BAD_ALIGNMENT
    assert launch(x_stride=132) == BAD_ALIGNMENT  # a row stride of 264 bytes breaks 16-byte loads
    q_odd = torch.zeros(w.qweight.numel() + 1, dtype=torch.int32)[1:].view_as(w.qweight)
    assert launch(qweight=q_odd) == BAD_ALIGNMENT
    assert launch(m=0) == OK  # nothing to do, no CUDA call
    assert launch() == LAUNCH_FAILED  # valid, but no GPU here
    assert lib.workspace_quant_decode(2, 64, 128, 4, 32, 2) == LAUNCH_FAILED
    assert lib.workspace_quant_decode(2, 64, 128, 4, 16, 2) == BAD_SHAPE


def test_replay_rejects_a_short_workspace(lib):
    dtype = torch.bfloat16
    w = _weight(72, 1024, 4, 128, dtype, 16)
    x = torch.randn(1, 1024).to(dtype)
    plan = _plan(lib, 1, 72, 1024, 4, H100_SLOTS)
    assert plan["splits"] > 1
    y = torch.empty(1, 72, dtype=dtype)
    scratch = torch.empty(plan["splits"] * 72 - 1)
    counters = torch.zeros(plan["col_tiles"], dtype=torch.int32)
    out = (ctypes.c_int64 * 5)()
    status = lib.replay_quant_decode(_ptr(x), 1024, _ptr(w.qweight), _ptr(w.scales), _ptr(w.zeros), None, _ptr(y),
                                     _ptr(scratch), scratch.numel(), _ptr(counters), counters.numel(), 1, 72, 1024,
                                     4, 128, 2, H100_SLOTS, 0, 0, out)
    assert status == BAD_SHAPE


# ---- registration (CPU) --------------------------------------------------------------------------------------

def test_cuda_quant_linear_is_registered_and_refused_on_cpu():
    op = get_op("quant_linear")
    assert "cuda" in op.implementations()
    assert "cuda" not in op.implementations("cpu")


def test_model_level_support_check():
    """`resolve` hands quant_linear to the CUDA implementation only for checkpoints whose every linear it takes."""
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.ops.cuda_ext import decode_kernel_supports
    from qwen2vl_fast.presets import preset_config

    raw = preset_config("qwen2-vl-7b")
    assert decode_kernel_supports(parse_config(raw))  # not quantized: nothing to refuse
    for bits, group, ok in ((4, 128, True), (8, 128, True), (4, -1, True), (8, 16, True), (4, 16, False),
                            (4, 96, False)):
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": True, "desc_act": False}
        assert decode_kernel_supports(parse_config({**raw, "quantization_config": qc})) is ok, (bits, group)


def test_dispatch_by_rows(monkeypatch):
    """<= 16 rows of fp16/bf16 go to the decode kernel (act-order columns permuted first), more rows and fp32 to
    the Triton kernel. Both kernels are replaced by recorders here (no GPU)."""
    import qwen2vl_fast.kernels.quant_gemm as triton_quant
    from qwen2vl_fast.ops import cuda_ext

    calls = []

    def fake_decode(x2, w, bias=None):
        calls.append(("decode", x2.clone()))
        return F.linear(x2, dequantize(w, x2.dtype).index_select(1, w.perm) if w.perm is not None
                        else dequantize(w, x2.dtype), bias)

    def fake_triton(x, w, bias=None):
        calls.append(("triton", x))
        return get_op("quant_linear").reference(x, w, bias)

    monkeypatch.setattr(cuda_ext, "decode_gemm", fake_decode)
    monkeypatch.setattr(triton_quant, "quant_linear", fake_triton)
    w = _weight(72, 128, 4, 32, torch.float16, 21)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(22))
    w_act = QuantizedWeight(w.qweight, w.scales, w.zeros, 4, 32, perm)
    for rows, dtype, weight, kernel in ((1, torch.float16, w, "decode"), (16, torch.float16, w_act, "decode"),
                                        (17, torch.float16, w, "triton"), (4, torch.float32, w, "triton")):
        calls.clear()
        x = torch.randn(1, rows, 128).to(dtype)
        y = cuda_ext.quant_linear_cuda(x, weight)
        assert [c[0] for c in calls] == [kernel] and y.shape == (1, rows, 72)
        if kernel == "decode" and weight.perm is not None:
            assert torch.equal(calls[0][1], x.reshape(rows, 128)[:, perm])
        ref = get_op("quant_linear").reference(x, weight)
        torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)
    bad_scales = QuantizedWeight(w.qweight, w.scales.float(), w.zeros.float(), 4, 32)
    assert not cuda_ext.decode_kernel_handles(bad_scales, torch.float16)  # scales not in x's dtype: Triton


def test_bench_quant_reports_the_dispatch_crossover():
    """bench_quant's summary: the largest M up to which the CUDA decode kernel beats the Triton kernel."""
    from helpers_bench import bench_module

    decode_crossover = bench_module("bench_quant").decode_crossover

    def row(m, impl, ms, layer="o", bits=4):
        return dict(preset="7b", layer=layer, m=m, impl=f"ours-{impl}-int{bits}", median_ms=ms)

    rows = [row(1, "cuda", 1.0), row(1, "triton", 2.0), row(8, "cuda", 1.0), row(8, "triton", 1.5),
            row(16, "cuda", 2.0), row(16, "triton", 1.5), row(32, "cuda", 1.0), row(32, "triton", 1.0),
            row(1, "cuda", 3.0, "down"), row(1, "triton", 2.0, "down"), dict(preset="7b", layer="o", m=1,
                                                                             impl="cublas-bf16", median_ms=0.5)]
    got = {(c["layer"], c["bits"]): c["cuda_wins_up_to_m"] for c in decode_crossover(rows)}
    assert got == {("o", 4): 8, ("down", 4): 0}


# ---- the binding behind the Python wrapper, on meta tensors --------------------------------------------------

@pytest.fixture(scope="module")
def binding(tmp_path_factory):
    """torch.ops.qwen2vl_fast: the real extension with a CUDA torch, g++-built bindings with a CPU-only one."""
    return binding_ops(tmp_path_factory)


def test_wrapper_through_the_binding_on_meta(binding, monkeypatch):
    """ops/cuda_ext's decode_gemm and quant_linear_cuda into the binding's schema and Meta kernel (what
    torch.compile and graph capture see): output shapes and dtypes with leading dims, act order and bias, and the
    binding's checks reaching the caller (the kernel itself: the replay above and the GPU tests below)."""
    from qwen2vl_fast.ops import cuda_ext

    monkeypatch.setattr(cuda_ext, "_ops", lambda: binding)
    monkeypatch.setattr(cuda_ext, "_COUNTERS", {})  # keeps meta counters out of the module's cache
    meta = torch.device("meta")
    w = _weight(72, 256, 4, 128, torch.bfloat16, 31).to(meta)
    y = cuda_ext.decode_gemm(torch.empty(3, 256, dtype=torch.bfloat16, device=meta), w)
    assert y.shape == (3, 72) and y.dtype == torch.bfloat16 and y.device == meta
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(32)).to(meta)
    w_act = QuantizedWeight(w.qweight, w.scales, w.zeros, 4, 128, perm)
    bias = torch.empty(72, dtype=torch.float32, device=meta)  # cast to x's dtype by the wrapper
    y = cuda_ext.quant_linear_cuda(torch.empty(2, 5, 256, dtype=torch.bfloat16, device=meta), w_act, bias)
    assert y.shape == (2, 5, 72) and y.dtype == torch.bfloat16 and y.device == meta
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        cuda_ext.decode_gemm(torch.empty(17, 256, dtype=torch.bfloat16, device=meta), w)
    with pytest.raises(RuntimeError, match="scales must be Half like x"):
        cuda_ext.decode_gemm(torch.empty(2, 256, dtype=torch.float16, device=meta), w)


# ---- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n,k,group", [(72, 96, 32), (200, 384, 128), (3584, 3584, 128), (4608, 3584, -1),
                                       (3584, 18944, 128)])
def test_gpu_decode_kernel_matches_reference(m, n, k, group, bits, dtype):
    extension_ops()
    from qwen2vl_fast.ops.cuda_ext import decode_gemm

    w = _weight(n, k, bits, group, dtype, m + n).to("cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    y = decode_gemm(x, w, bias)
    assert_matches(y.cpu(), reference(x.cpu(), w.to("cpu"), bias.cpu()))
    assert torch.equal(decode_gemm(x, w, bias), y)  # deterministic run to run


@pytest.mark.gpu
def test_gpu_op_rejects_bad_input():
    extension_ops()
    from qwen2vl_fast.ops.cuda_ext import decode_gemm

    w = _weight(72, 128, 4, 32, torch.bfloat16, 23).to("cuda")
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        decode_gemm(torch.randn(17, 128, device="cuda").bfloat16(), w)
    with pytest.raises(RuntimeError, match="scales must be Half like x"):
        decode_gemm(torch.randn(2, 128, device="cuda").half(), w)
    y = decode_gemm(torch.randn(2, 128, device="cuda").bfloat16(), w)  # still usable
    assert y.shape == (2, 72)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_quantized_model_decodes_on_cuda_graphs(tiny_checkpoints, bits):
    """A quantized tiny model on the GPU with the cuda backend: quant_linear resolves to the CUDA implementation,
    the engine's graph-captured decode gives the eager decode's tokens, and the logits equal the dequantized
    bf16 twin's within kernel tolerance."""
    extension_ops()
    import qwen2vl_fast
    from qwen2vl_fast.engine import Engine
    from test_quant_model import QUANTIZED, random_quantized

    dense = qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2-vl"], device="cuda", dtype=torch.bfloat16, backend="cuda")
    gen = torch.Generator().manual_seed(bits)
    weights = dict(dense.weights)
    for name in list(weights):
        if name.startswith("model.layers.") and name.endswith(QUANTIZED):
            weights[name] = random_quantized(weights[name].cpu(), bits, 32, gen).to("cuda")
    Model = type(dense)
    model = Model(dense.config, weights, dense.ops)
    assert model.ops.chosen["quant_linear"] == "cuda"
    twin = Model(dense.config, {k: dequantize(v, torch.bfloat16) if isinstance(v, QuantizedWeight) else v
                                for k, v in weights.items()}, dense.ops)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]], device="cuda")
    a, b = model(input_ids=ids[:, :1]).logits.float(), twin(input_ids=ids[:, :1]).logits.float()
    assert float((a - b).norm() / b.norm()) < 1e-2  # one decode-sized row: the CUDA kernel
    prompts = dict(input_ids=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], device="cuda"),
                   attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device="cuda"))
    eager = Engine(model, max_batch=4, cuda_graphs=False).generate(prompts, max_new_tokens=8, ignore_eos=True)
    graphs = Engine(model, max_batch=4, cuda_graphs=True).generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]
