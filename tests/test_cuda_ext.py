"""The CUDA C++ kernels (csrc/rotary_2d.cu, csrc/patch_gather.cu) and their "cuda" registrations.

Without a GPU (CI): the kernel files compile with nvcc for sm_90a and stay Torch-free; their per-thread bodies,
which are __host__ __device__, are replayed on the CPU thread by thread with the launchers' own geometry and
compared bit for bit with the references (index math, coverage, numerics); the launchers' argument checks return
the documented status codes; the registrations exist and never import the extension on the CPU.
The bindings on meta tensors (schemas, Meta kernels' shapes, Torch-side checks): against the real nvcc-built
qwen2vl_fast._C where torch has CUDA (a missing _C fails there unless setup.py would not build it: see
helpers_cuda.extension_ops), against the binding files built with g++ where torch is CPU-only.
With a GPU (`gpu` mark, needs the built extension qwen2vl_fast._C): the ops against the references.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_cuda import StoragelessCuda, binding_ops, build_host_replay, extension_ops

from qwen2vl_fast.errors import BackendError
from qwen2vl_fast.ops import get_op, resolve
from qwen2vl_fast.ops.rotary import vision_rotary
from qwen2vl_fast.processing.patchify import CLIP_MEAN, CLIP_STD, normalize_patchify

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/kernels.h DTypeCode
OK, BAD_SHAPE, BAD_ALIGNMENT = 0, 1, 2  # csrc/common.h Status
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- CPU: files, compilation, registrations -----------------------------------------------------------------

def test_kernel_files_are_torch_free():
    assert {p.name for p in KERNEL_FILES} >= {"rotary_2d.cu", "patch_gather.cu"}
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    for path in [*KERNEL_FILES, CSRC / "kernels.h", CSRC / "common.h"]:
        bad = [line for line in path.read_text().splitlines() if torch_include.search(line)]
        assert not bad, f"{path.name} includes Torch headers: {bad}"


@needs_nvcc
def test_kernel_files_compile_for_hopper(tmp_path):
    """What .ci/compile_cuda.sh does (sm_90a), one nvcc per file."""
    for path in KERNEL_FILES:
        cmd = [NVCC, "-std=c++17", "-O3", "-gencode", "arch=compute_90a,code=sm_90a", f"-I{CSRC}", "-c", str(path),
               "-o", str(tmp_path / (path.name + ".o"))]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{path.name} does not compile:\n{result.stderr}"


def test_cuda_implementations_are_registered_and_refused_on_cpu():
    for name in ("vision_rotary", "patch_embed_frames"):
        assert "cuda" in get_op(name).implementations()
        assert "cuda" not in get_op(name).implementations("cpu")
    with pytest.raises(BackendError):
        resolve("cuda", "cpu")


def test_cuda_ext_does_not_import_the_extension():
    code = ("import sys, torch, qwen2vl_fast.ops as ops; ops.available('cpu'); ops.resolve('auto', 'cpu'); "
            "assert 'qwen2vl_fast._C' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ---- CPU: replay of the kernels' per-thread bodies ----------------------------------------------------------

# A host program that includes the kernel files and runs their __host__ __device__ per-thread functions for every
# (block, thread) in the order a GPU might, with the launchers' own geometry, dispatch and argument checks.
_REPLAY_SOURCE = r"""
#include <cstring>
#include <vector>

#include "rotary_2d.cu"
#include "patch_gather.cu"

using namespace qwen2vl_fast;

namespace {

struct ReplayRotary {
  void* qkv; const float* cos; const float* sin; int64_t S; int H; int64_t row_stride;
  template <typename T, int D, int VEC>
  int run() const {
    constexpr int kPairs = D / 2 / VEC;
    const rotary_detail::Geometry geo = rotary_detail::geometry(kPairs, 2 * H);
    if (geo.threads_per_row * geo.rows_per_block > rotary_detail::kTargetThreads) return 100;
    for (int64_t row = 0; row < S; ++row)
      for (int x = 0; x < geo.threads_per_row; ++x)
        rotary_detail::rotate_row<T, D, VEC>(static_cast<T*>(qkv) + row * row_stride, cos + row * D,
                                             sin + row * D, x % kPairs, x / kPairs, geo.groups, 2 * H);
    return kOk;
  }
};

struct ReplayGather {
  const gather_detail::Args* a; int64_t grid;
  template <typename T, int VEC, class L>
  int run() const {
    using namespace gather_detail;
    const L l(*a);
    const int n = kThreads;
    std::vector<uint4> smem((Smem<T, L>::bytes(l) + 15) / 16);
    for (int64_t block = 0; block < grid; ++block) {
      std::memset(smem.data(), 0xA5, smem.size() * sizeof(uint4));  // garbage must never reach the output
      const Smem<T, L> sm(smem.data(), l);
      for (int t = 0; t < n; ++t) build_lut<T>(sm.lut, *a, l, t, n);
      for (int t = 0; t < n; ++t) build_colmap(sm.colmap, l, t, n);
      for (int64_t g = block; g < a->groups; g += grid) {
        for (int t = 0; t < n; ++t) {
          if (a->word_loads) stage_tile<4>(sm.tile, *a, l, g, t, n);
          else stage_tile<1>(sm.tile, *a, l, g, t, n);
        }
        for (int t = 0; t < n; ++t) emit_group<T, VEC>(static_cast<T*>(a->out), sm.tile, sm.lut, sm.colmap, l, g, t, n);
      }
    }
    return kOk;
  }
};

}  // namespace

// vectorised: -1 = the launcher's choice, 0 = scalar, 1 = 16-byte. *used gets the path taken (0/1).
extern "C" int replay_rotary_2d(void* qkv, const float* cos, const float* sin, int64_t S, int H, int D,
                                int64_t row_stride, int dtype_code, int vectorised, int* used) {
  const int elem = dtype_code == kFloat32 ? 4 : 2;
  bool vec = rotary_detail::can_vectorise(qkv, cos, sin, row_stride, elem);
  if (vectorised == 0) vec = false;
  if (vectorised == 1 && !vec) return 101;
  *used = vec ? 1 : 0;
  return rotary_detail::dispatch(dtype_code, D, vec, ReplayRotary{qkv, cos, sin, S, H, row_stride});
}

// *path: 1 = 16-byte stores, 2 = the compile-time layout, 4 = 4-byte staging loads.
extern "C" int replay_patch_gather(const uint8_t* frames, void* out, int64_t T, int C, int64_t H, int64_t W,
                                   const float* mean, const float* std, int patch, int tp, int merge, int dtype_code,
                                   int64_t grid, int force_any_layout, int force_scalar, int force_byte_loads,
                                   int* path) {
  gather_detail::Args a;
  bool vec = false, fixed = false;
  const int status = gather_detail::prepare(frames, out, T, C, H, W, mean, std, patch, tp, merge, dtype_code, &a,
                                            &vec, &fixed);
  if (status != kOk || a.groups == 0) return status;
  if (force_any_layout) fixed = false;
  if (force_scalar) vec = false;
  if (force_byte_loads) a.word_loads = false;
  *path = (vec ? 1 : 0) | (fixed ? 2 : 0) | (a.word_loads ? 4 : 0);
  const int64_t blocks = grid > 0 && grid < a.groups ? grid : a.groups;
  return gather_detail::dispatch(dtype_code, vec, fixed, ReplayGather{&a, blocks});
}

// The real launchers, for their argument checks (these calls return before any CUDA call).
extern "C" int launch_rotary_2d(void* qkv, const float* cos, const float* sin, int64_t S, int H, int D,
                                int64_t row_stride, int dtype_code) {
  return qwen2vl_rotary_2d(qkv, cos, sin, S, H, D, row_stride, dtype_code, nullptr);
}
extern "C" int launch_patch_gather(const uint8_t* frames, void* out, int64_t T, int C, int64_t H, int64_t W,
                                   const float* mean, const float* std, int patch, int tp, int merge, int dtype_code) {
  return qwen2vl_patch_gather(frames, out, T, C, H, W, mean, std, patch, tp, merge, dtype_code, nullptr);
}
"""


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """The replay library (tests/helpers_cuda.py)."""
    so = build_host_replay(_REPLAY_SOURCE, tmp_path_factory.mktemp("cuda_replay"))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    so.replay_rotary_2d.argtypes = [ptr, ptr, ptr, i64, i32, i32, i64, i32, i32, ctypes.POINTER(i32)]
    so.replay_patch_gather.argtypes = [ptr, ptr, i64, i32, i64, i64, ptr, ptr, i32, i32, i32, i32, i64, i32, i32, i32,
                                       ctypes.POINTER(i32)]
    so.launch_rotary_2d.argtypes = [ptr, ptr, ptr, i64, i32, i32, i64, i32]
    so.launch_patch_gather.argtypes = [ptr, ptr, i64, i32, i64, i64, ptr, ptr, i32, i32, i32, i32]
    return so


def _rotary_case(s, h, d, dtype, pad=0, offset=0):
    """qkv (s, 3hd) as a view into a larger buffer (row padding `pad`, base offset `offset` elements)."""
    width = 3 * h * d
    buf = torch.randn(s * (width + pad) + offset, dtype=torch.float32).to(dtype)
    qkv = buf[offset:].as_strided((s, width), (width + pad, 1))
    # Both halves of the table independent (the model's repeat them): every cos/sin column must reach its pair.
    angles = torch.randn(s, d) * 20
    return qkv, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("s, h, d, pad, offset, vec", [
    (37, 16, 80, 0, 0, 1),    # the ViT's heads, odd S, 16-byte path
    (5, 3, 64, 0, 0, 1),
    (9, 2, 128, 0, 0, 1),
    (37, 16, 80, 0, 0, 0),    # forced scalar path
    (11, 16, 80, 3, 1, 0),    # padded rows, misaligned base: the launcher picks the scalar path
    (1, 1, 80, 0, 0, 1),      # a single head (G = 1, most head slots idle)
])
def test_rotary_replay_matches_reference(replay, dtype, s, h, d, pad, offset, vec):
    qkv, cos, sin = _rotary_case(s, h, d, dtype, pad, offset)
    q_ref, k_ref, v_ref = (t.clone() for t in vision_rotary(qkv.contiguous(), cos, sin, h))
    v_before = qkv[:, 2 * h * d:].clone()
    used = ctypes.c_int(-1)
    status = replay.replay_rotary_2d(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), s, h, d, qkv.stride(0),
                                     DTYPE_CODE[dtype], -1 if (pad or offset) else vec, ctypes.byref(used))
    assert status == OK
    assert used.value == vec
    q, k, v = qkv.reshape(s, 3, h, d).unbind(1)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)  # same fp32 ops, each rounded once: bit-identical
    assert torch.equal(qkv[:, 2 * h * d:], v_before) and torch.equal(v, v_ref)


def test_rotary_launcher_argument_checks(replay):
    qkv, cos, sin = _rotary_case(4, 2, 80, torch.bfloat16)
    args = (qkv.data_ptr(), cos.data_ptr(), sin.data_ptr())
    assert replay.launch_rotary_2d(*args, 4, 2, 72, qkv.stride(0), 2) == BAD_SHAPE    # head_dim not compiled
    assert replay.launch_rotary_2d(*args, 4, 0, 80, qkv.stride(0), 2) == BAD_SHAPE    # no heads
    assert replay.launch_rotary_2d(*args, 4, 2, 80, qkv.stride(0), 7) == BAD_SHAPE    # unknown dtype
    assert replay.launch_rotary_2d(*args, 4, 2, 80, 100, 2) == BAD_SHAPE              # overlapping rows
    assert replay.launch_rotary_2d(qkv.data_ptr() + 1, *args[1:], 4, 2, 80, qkv.stride(0), 2) == BAD_ALIGNMENT
    assert replay.launch_rotary_2d(*args, 0, 2, 80, qkv.stride(0), 2) == OK           # nothing to do, no launch


def _gather_reference(frames, mean, std, patch, tp, merge, dtype):
    rows, _ = normalize_patchify(frames, mean, std, patch, tp, merge)
    return rows.to(dtype)


def _replay_gather(replay, frames, mean, std, patch, tp, merge, dtype, grid=0, any_layout=0, scalar=0, byte_loads=0):
    t, c, h, w = frames.shape
    n = -(-t // tp) * (h // patch) * (w // patch)
    out = torch.full((n, c * tp * patch * patch), float("nan"), dtype=dtype)
    m32, s32 = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    path = ctypes.c_int(-1)
    status = replay.replay_patch_gather(frames.data_ptr(), out.data_ptr(), t, c, h, w, m32.data_ptr(), s32.data_ptr(),
                                        patch, tp, merge, DTYPE_CODE[dtype], grid, any_layout, scalar, byte_loads,
                                        ctypes.byref(path))
    assert status == OK
    return out, path.value


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("t", [1, 3, 4])
def test_patch_gather_replay_matches_normalize_patchify(replay, dtype, t):
    frames = torch.randint(0, 256, (t, 3, 56, 84), dtype=torch.uint8)
    ref = _gather_reference(frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, dtype)
    out, path = _replay_gather(replay, frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, dtype, grid=2)  # 2 blocks stride
    assert path == 1 | 2 | 4  # 16-byte stores, compile-time layout, 4-byte staging loads
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("any_layout, scalar, byte_loads", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
def test_patch_gather_replay_fallback_paths(replay, dtype, any_layout, scalar, byte_loads):
    frames = torch.randint(0, 256, (3, 3, 28, 56), dtype=torch.uint8)
    ref = _gather_reference(frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, dtype)
    out, path = _replay_gather(replay, frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, dtype, grid=3, any_layout=any_layout,
                               scalar=scalar, byte_loads=byte_loads)
    assert path == (0 if scalar else 1) | (0 if any_layout else 2) | (0 if byte_loads else 4)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape, patch, tp, merge, mean, std", [
    ((2, 3, 64, 96), 16, 1, 2, CLIP_MEAN, CLIP_STD),     # 16-pixel patches, no temporal pairing
    ((5, 1, 42, 42), 7, 3, 3, (0.5,), (0.25,)),          # one channel, tp 3 (last frame repeated), 3x3 groups
    ((2, 4, 14, 28), 14, 2, 1, (0.1, 0.2, 0.3, 0.4), (0.9, 0.8, 0.7, 0.6)),  # four channels, no merging
])
def test_patch_gather_replay_other_layouts(replay, shape, patch, tp, merge, mean, std):
    frames = torch.randint(0, 256, shape, dtype=torch.uint8)
    for dtype in ALL_DTYPES:
        out, path = _replay_gather(replay, frames, mean, std, patch, tp, merge, dtype)
        assert not path & 2
        assert torch.equal(out, _gather_reference(frames, mean, std, patch, tp, merge, dtype))


def test_patch_gather_replay_misaligned_frames(replay):
    buf = torch.randint(0, 256, (1 + 2 * 3 * 28 * 28,), dtype=torch.uint8)
    frames = buf[1:].view(2, 3, 28, 28)  # contiguous, base not 4-byte aligned: byte staging loads
    out, path = _replay_gather(replay, frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, torch.float32)
    assert path == 1 | 2
    assert torch.equal(out, _gather_reference(frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, torch.float32))


def test_patch_gather_launcher_argument_checks(replay):
    frames = torch.zeros(2, 3, 56, 56, dtype=torch.uint8)
    out = torch.empty(8, 1176)
    m, s = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)

    def launch(t=2, c=3, h=56, w=56, patch=14, tp=2, merge=2, dtype=0):
        return replay.launch_patch_gather(frames.data_ptr(), out.data_ptr(), t, c, h, w, m.data_ptr(), s.data_ptr(),
                                          patch, tp, merge, dtype)

    assert launch(h=50) == BAD_SHAPE            # not a multiple of patch * merge
    assert launch(w=42) == BAD_SHAPE
    assert launch(c=5) == BAD_SHAPE             # more channels than mean/std slots
    assert launch(patch=0) == BAD_SHAPE
    assert launch(dtype=5) == BAD_SHAPE
    assert launch(h=128, w=128, patch=64) == BAD_SHAPE  # the staged square would not fit in shared memory
    assert launch(t=0) == OK                    # no rows, no launch


# ---- the bindings on meta tensors: the real extension with a CUDA torch, g++-built ones with a CPU-only torch ----

@pytest.fixture(scope="module")
def binding(tmp_path_factory):
    """torch.ops.qwen2vl_fast with the bindings' schemas, Meta kernels and Torch-side checks (helpers_cuda)."""
    return binding_ops(tmp_path_factory)


def test_binding_schemas_and_meta_shapes(binding):
    assert str(binding.rotary_2d_.default._schema) == (
        "qwen2vl_fast::rotary_2d_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads) -> ()")
    assert str(binding.patch_gather.default._schema) == (
        "qwen2vl_fast::patch_gather(Tensor frames, float[] mean, float[] std, int patch, int temporal_patch, "
        "int merge, ScalarType dtype) -> Tensor")
    meta = torch.device("meta")
    for (t, h, w), rows in (((1, 56, 84), 24), ((3, 56, 84), 48), ((4, 28, 28), 8)):
        frames = torch.empty(t, 3, h, w, dtype=torch.uint8, device=meta)
        out = binding.patch_gather(frames, list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2, torch.bfloat16)
        assert out.shape == (rows, 1176) and out.dtype == torch.bfloat16 and out.device == meta
    qkv = torch.empty(7, 3 * 16 * 80, dtype=torch.bfloat16, device=meta)
    table = torch.empty(7, 80, device=meta)
    binding.rotary_2d_(qkv, table, table, 16)


def test_binding_traces_on_fake_cuda_tensors(binding):
    """What torch.compile and CUDA-graph capture see, without a GPU: FakeTensors on "cuda" go through the Meta
    kernels (outputs on the inputs' device, with their shapes and dtypes) and each op traces as one node."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(frames, qkv, table, x, qweight, scales, counters):
        rows = binding.patch_gather(frames, list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2, torch.bfloat16)
        binding.rotary_2d_(qkv, table, table, 16)
        return rows, qkv, binding.quant_gemm_decode(x, qweight, scales, scales, None, 4, 128, counters)

    with FakeTensorMode():
        cuda, bf16 = torch.device("cuda"), torch.bfloat16
        args = (torch.empty(2, 3, 56, 84, dtype=torch.uint8, device=cuda),
                torch.empty(7, 3 * 16 * 80, dtype=bf16, device=cuda), torch.empty(7, 80, device=cuda),
                torch.empty(3, 256, dtype=bf16, device=cuda), torch.empty(32, 72, dtype=torch.int32, device=cuda),
                torch.empty(2, 72, dtype=bf16, device=cuda), torch.zeros(16, dtype=torch.int32, device=cuda))
        rows, _, y = f(*args)
        graph = make_fx(f)(*args)
    assert (rows.shape, rows.dtype, rows.device.type) == ((24, 1176), bf16, "cuda")
    assert (y.shape, y.dtype, y.device.type) == ((3, 72), bf16, "cuda")
    calls = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert calls == [f"qwen2vl_fast.{op}.default" for op in ("patch_gather", "rotary_2d_", "quant_gemm_decode")]


def test_binding_argument_checks(binding):
    meta = torch.device("meta")
    frames = torch.empty(2, 3, 56, 84, dtype=torch.uint8, device=meta)
    mean, std = list(CLIP_MEAN), list(CLIP_STD)
    with pytest.raises(RuntimeError, match="not a multiple of patch"):
        binding.patch_gather(frames[:, :, :50], mean, std, 14, 2, 2, torch.float32)
    with pytest.raises(RuntimeError, match="uint8"):
        binding.patch_gather(frames.float(), mean, std, 14, 2, 2, torch.float32)
    with pytest.raises(RuntimeError, match="3 channels but 2 means"):
        binding.patch_gather(frames, mean[:2], std, 14, 2, 2, torch.float32)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        binding.patch_gather(frames, mean, std, 14, 2, 2, torch.int32)
    qkv = torch.empty(7, 3 * 16 * 80, dtype=torch.bfloat16, device=meta)
    table = torch.empty(7, 80, device=meta)
    with pytest.raises(RuntimeError, match="head_dim must be 64, 80 or 128, got 40"):
        binding.rotary_2d_(qkv, table, table, 32)
    with pytest.raises(RuntimeError, match=r"cos must be \(S, D\)"):
        binding.rotary_2d_(qkv, table[:, :64], table, 16)
    with pytest.raises(RuntimeError, match="sin must be float32"):
        binding.rotary_2d_(qkv, table, table.half(), 16)
    with pytest.raises(NotImplementedError):  # CUDA and Meta kernels only
        binding.patch_gather(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), mean, std, 14, 2, 2, torch.float32)


def _cuda_kernel_raises(call, message):
    """`call()` reaches a CUDA kernel of the binding and raises RuntimeError matching `message`."""
    with pytest.raises(RuntimeError, match=message):
        call()


def test_cuda_kernels_reject_bad_input_without_a_gpu(binding):
    """The CUDA kernels' own check paths (not the Meta kernels'), on storage-less "cuda:0" tensors: the calls of
    test_rotary_2d_cuda_rejects_bad_input, test_patch_gather_cuda_misaligned_frames_and_bad_input and
    test_cuda_quant_decode.py::test_gpu_op_rejects_bad_input, which segfaulted on the H200 (torch 2.11), raise
    here, views included. A call that passes the checks fails later (no GPU, no storage), before any launch."""
    bf16, f32 = torch.bfloat16, torch.float32
    s, h, d = 8, 2, 80
    qkv = StoragelessCuda((s, 3 * h * d), bf16)
    cos, sin = StoragelessCuda((s, d), f32), StoragelessCuda((s, d), f32)
    view = StoragelessCuda((s, 3 * h * d - 6), bf16, strides=(3 * h * d, 1))  # qkv[:, :-6]: head_dim 79
    _cuda_kernel_raises(lambda: binding.rotary_2d_(view, cos, sin, h), "head_dim must be 64, 80 or 128, got 79")
    contiguous = StoragelessCuda((s, 3 * h * d - 6), bf16)
    _cuda_kernel_raises(lambda: binding.rotary_2d_(contiguous, cos, sin, h), "head_dim must be 64, 80 or 128")
    _cuda_kernel_raises(lambda: binding.rotary_2d_(qkv, StoragelessCuda((s, d), torch.float16), sin, h),
                        "cos must be float32, got Half")
    _cuda_kernel_raises(lambda: binding.rotary_2d_(view, StoragelessCuda((s, d), torch.float16), sin, h),
                        "head_dim")  # a view with a wrong dtype: the first failed check names its problem
    _cuda_kernel_raises(lambda: binding.rotary_2d_(StoragelessCuda((s, 3 * h * d), bf16, strides=(1, s)), cos, sin,
                                                   h), "rows must be contiguous")
    passed = None  # past the checks, any error: the device guard or stream (no GPU), a data_ptr() (no storage)
    _cuda_kernel_raises(lambda: binding.rotary_2d_(qkv, cos, sin, h), passed)
    mean, std = list(CLIP_MEAN), list(CLIP_STD)
    frames = StoragelessCuda((3, 3, 56, 56), torch.uint8, offset=1)  # buf[1:].view(3, 3, 56, 56)
    narrow = StoragelessCuda((3, 3, 50, 56), torch.uint8, strides=(3 * 56 * 56, 56 * 56, 56, 1), offset=1)
    _cuda_kernel_raises(lambda: binding.patch_gather(narrow, mean, std, 14, 2, 2, f32),
                        "frame size 50x56 is not a multiple of patch \\* merge = 28")
    _cuda_kernel_raises(lambda: binding.patch_gather(StoragelessCuda((3, 3, 56, 56), f32), mean, std, 14, 2, 2, f32),
                        "uint8")
    _cuda_kernel_raises(lambda: binding.patch_gather(frames, mean[:2], std, 14, 2, 2, f32), "3 channels but 2 means")
    _cuda_kernel_raises(lambda: binding.patch_gather(frames, mean, std, 14, 2, 2, f32), passed)
    x17, x2 = StoragelessCuda((17, 128), bf16), StoragelessCuda((2, 128), torch.float16)
    qweight, counters = StoragelessCuda((16, 72), torch.int32), StoragelessCuda((8192,), torch.int32)
    scales = StoragelessCuda((4, 72), bf16)
    _cuda_kernel_raises(lambda: binding.quant_gemm_decode(x17, qweight, scales, scales, None, 4, 32, counters),
                        "at most 16 rows")
    _cuda_kernel_raises(lambda: binding.quant_gemm_decode(x2, qweight, scales, scales, None, 4, 32, counters),
                        "scales must be Half like x")
    _cuda_kernel_raises(lambda: binding.quant_gemm_decode(StoragelessCuda((2, 128), bf16), qweight, scales, scales,
                                                          None, 4, 32, StoragelessCuda((8192,), torch.int64)),
                        "counters must be a contiguous int32")


def test_binding_messages_print_sizes_dtypes_and_devices_as_torch_does(binding):
    """The bindings build their messages with msg() (std::to_string, no iostreams: see csrc/binding_utils.h); the
    texts read as torch prints sizes, strides, dtypes and devices."""
    bf16, f32 = torch.bfloat16, torch.float32
    qkv, cos = StoragelessCuda((8, 480), bf16), StoragelessCuda((8, 80), f32)
    cases = [
        (lambda: binding.rotary_2d_(StoragelessCuda((8, 480), bf16, strides=(1, 8)), cos, cos, 2),
         "rotary_2d_: qkv's rows must be contiguous and not overlap, got strides [1, 8]"),
        (lambda: binding.rotary_2d_(qkv, StoragelessCuda((8, 40), f32), cos, 2),
         "rotary_2d_: cos must be (S, D) = (8, 80), got [8, 40]"),
        (lambda: binding.rotary_2d_(StoragelessCuda((480,), bf16), cos, cos, 2),
         "rotary_2d_: qkv must be (S, 3*H*D), got shape [480]"),
        (lambda: binding.rotary_2d_(StoragelessCuda((8, 480), torch.int32), cos, cos, 2),
         "rotary_2d_: qkv must be float32, float16 or bfloat16, got Int"),
        (lambda: binding.rotary_2d_(qkv, torch.zeros(8, 80), cos, 2),
         "rotary_2d_: cos and sin must be on cuda:0 with qkv, got cpu and cuda:0"),
        (lambda: binding.quant_gemm_decode(StoragelessCuda((2, 128), bf16), StoragelessCuda((16, 72), torch.int32),
                                           StoragelessCuda((4, 72), bf16), StoragelessCuda((4, 72), bf16), None, 4,
                                           48, StoragelessCuda((64,), torch.int32)),
         "quant_gemm_decode: group_size 48 must be -1 or divide K = 128 and be a multiple of 32"),
        (lambda: binding.quant_gemm_decode(StoragelessCuda((2, 128), bf16), StoragelessCuda((16, 72), torch.int32),
                                           StoragelessCuda((4, 72), bf16), StoragelessCuda((4, 72), bf16), None, 5,
                                           32, StoragelessCuda((64,), torch.int32)),
         "quant_gemm_decode: bits must be 4 or 8, got 5"),
    ]
    for call, text in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert str(info.value).splitlines()[0] == text


def test_every_binding_check_message_is_built_by_msg():
    """No TORCH_CHECK of csrc/ hands c10::str more than one piece (its ostringstream path): a message is one string
    literal or one msg(...) call."""
    offenders = []
    for path in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
        source = re.sub(r"//[^\n]*", "", path.read_text())
        for m in re.finditer(r"\bTORCH_CHECK\(", source):
            args, depth, i, start, quote = [], 1, m.end(), m.end(), None
            while depth:
                c = source[i]
                if quote:
                    quote = None if c == quote and source[i - 1] != "\\" else quote
                elif c in "\"'":
                    quote = c
                elif c in "([{":
                    depth += 1
                elif c in ")]}":
                    depth -= 1
                elif c == "," and depth == 1:
                    args.append(source[start:i].strip())
                    start = i + 1
                i += 1
            args.append(source[start:i - 1].strip())
            message = args[1:]
            ok = len(message) <= 1 and (not message or message[0].startswith(("msg(", '"')))
            if not ok:
                offenders.append(f"{path.name}:{source.count(chr(10), 0, m.start()) + 1}: {args[0][:60]}")
    assert not offenders, "TORCH_CHECK messages not built by msg():\n" + "\n".join(offenders)


def test_binding_quant_gemm_decode(binding):
    """csrc/quant_ops.cpp: the schema, Meta shapes and every argument check (the kernel: test_cuda_quant_decode)."""
    assert str(binding.quant_gemm_decode.default._schema) == (
        "qwen2vl_fast::quant_gemm_decode(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, "
        "int bits, int group_size, Tensor(a!) counters) -> Tensor")
    meta = torch.device("meta")
    bf16 = dict(dtype=torch.bfloat16, device=meta)

    def args(m=3, n=72, k=256, bits=4, group=128, dtype=torch.bfloat16, bias=True):
        g = k // group if group != -1 else 1
        return [torch.empty(m, k, dtype=dtype, device=meta), torch.empty(k * bits // 32, n, dtype=torch.int32, device=meta),
                torch.empty(g, n, **bf16), torch.empty(g, n, **bf16), torch.empty(n, **bf16) if bias else None, bits, group,
                torch.zeros(16, dtype=torch.int32, device=meta)]

    for m, bits, group in ((1, 4, 128), (16, 8, -1), (0, 4, 32)):
        y = binding.quant_gemm_decode(*args(m=m, bits=bits, group=group))
        assert y.shape == (m, 72) and y.dtype == torch.bfloat16 and y.device == meta
    bad = [
        (dict(m=17), "at most 16 rows"),
        (dict(n=60), "multiple of 8"),
        (dict(k=240, group=-1), "multiple of 32 for 4-bit"),
        (dict(group=16), "group_size 16 must be -1 or divide"),
        (dict(bits=3, k=256), "bits must be 4 or 8"),
    ]
    for kw, message in bad:
        a = args(**kw) if kw.get("bits") != 3 else [*args()[:5], 3, 128, args()[7]]
        with pytest.raises(RuntimeError, match=message):
            binding.quant_gemm_decode(*a)
    a = args()
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        binding.quant_gemm_decode(a[0].float(), *a[1:])
    with pytest.raises(RuntimeError, match="scales must be BFloat16 like x"):
        binding.quant_gemm_decode(a[0], a[1], a[2].half(), *a[3:])
    with pytest.raises(RuntimeError, match=r"zeros must be \(K / group, N\) = \(2, 72\)"):
        binding.quant_gemm_decode(a[0], a[1], a[2], a[3][:1], *a[4:])
    with pytest.raises(RuntimeError, match="rows hold 256 inputs of 4 bits, x has K = 128"):
        binding.quant_gemm_decode(a[0][:, :128], *a[1:])
    with pytest.raises(RuntimeError, match="bias must be a contiguous"):
        binding.quant_gemm_decode(*a[:4], a[4][:8], *a[5:])
    with pytest.raises(NotImplementedError):  # CUDA and Meta kernels only
        binding.quant_gemm_decode(*[torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t
                                    for t in a])


# ---- GPU: the built extension against the references --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("s, h, d, pad, offset", [
    (1031, 16, 80, 0, 0), (4099, 16, 80, 0, 0), (33, 3, 64, 0, 0), (17, 2, 128, 0, 0), (129, 16, 80, 3, 1)])
def test_rotary_2d_cuda_matches_reference(dtype, s, h, d, pad, offset):
    ops = extension_ops()
    qkv, cos, sin = (t.cuda() for t in _rotary_case(s, h, d, dtype, 0, 0))
    if pad or offset:  # a strided, misaligned view: the scalar path
        buf = torch.randn(s * (qkv.shape[1] + pad) + offset, device="cuda").to(dtype)
        view = buf[offset:].as_strided(qkv.shape, (qkv.shape[1] + pad, 1))
        view.copy_(qkv)
        qkv = view
    q_ref, k_ref, v_ref = (t.clone() for t in vision_rotary(qkv.contiguous(), cos, sin, h))
    v_before = qkv[:, 2 * h * d:].clone()
    ops.rotary_2d_(qkv, cos, sin, h)
    q, k, v = qkv.reshape(s, 3, h, d).unbind(1)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(qkv[:, 2 * h * d:], v_before) and torch.equal(v, v_ref)


@pytest.mark.gpu
def test_rotary_2d_cuda_rejects_bad_input():
    ops = extension_ops()
    qkv, cos, sin = (t.cuda() for t in _rotary_case(8, 2, 80, torch.bfloat16))
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.rotary_2d_(qkv[:, :-6], cos, sin, 2)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rotary_2d_(qkv, cos.half(), sin, 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.rotary_2d_(qkv.cpu(), cos.cpu(), sin.cpu(), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, patch, tp, merge", [
    ((1, 3, 56, 84), 14, 2, 2), ((3, 3, 56, 84), 14, 2, 2), ((4, 3, 812, 1204), 14, 2, 2),
    ((1, 3, 2044, 2044), 14, 2, 2), ((2, 3, 64, 96), 16, 1, 2), ((5, 1, 42, 42), 7, 3, 3)])
def test_patch_gather_cuda_matches_normalize_patchify(dtype, shape, patch, tp, merge):
    ops = extension_ops()
    c = shape[1]
    mean, std = (CLIP_MEAN, CLIP_STD) if c == 3 else ((0.5,) * c, (0.25,) * c)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    out = ops.patch_gather(frames, list(mean), list(std), patch, tp, merge, dtype)
    assert torch.equal(out, _gather_reference(frames, mean, std, patch, tp, merge, dtype))
    assert torch.equal(out.cpu(), _gather_reference(frames.cpu(), mean, std, patch, tp, merge, dtype))


@pytest.mark.gpu
def test_patch_gather_cuda_misaligned_frames_and_bad_input():
    ops = extension_ops()
    buf = torch.randint(0, 256, (1 + 3 * 3 * 56 * 56,), dtype=torch.uint8, device="cuda")
    frames = buf[1:].view(3, 3, 56, 56)
    out = ops.patch_gather(frames, list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2, torch.float32)
    assert torch.equal(out, _gather_reference(frames, CLIP_MEAN, CLIP_STD, 14, 2, 2, torch.float32))
    with pytest.raises(RuntimeError, match="multiple"):
        ops.patch_gather(frames[:, :, :50], list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2, torch.float32)
    with pytest.raises(RuntimeError, match="uint8"):
        ops.patch_gather(frames.float(), list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2, torch.float32)
    with pytest.raises(RuntimeError, match="means"):
        ops.patch_gather(frames, list(CLIP_MEAN[:2]), list(CLIP_STD), 14, 2, 2, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_patch_embed_frames_cuda_matches_reference(dtype):
    extension_ops()
    frames = torch.randint(0, 256, (3, 3, 112, 140), dtype=torch.uint8, device="cuda")
    weight = (torch.randn(1280, 1176, device="cuda") * 0.02).to(dtype)
    table = resolve("cuda", "cuda")
    assert table.chosen["patch_embed_frames"] == "cuda" and table.chosen["vision_rotary"] == "cuda"
    out = table.patch_embed_frames(frames, weight, CLIP_MEAN, CLIP_STD)
    ref = get_op("patch_embed_frames").reference(frames, weight, CLIP_MEAN, CLIP_STD)
    # Same rows (bit-identical) into the same cuBLAS call; the tolerance only guards against algorithm choice.
    torch.testing.assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_vision_rotary_via_resolve(dtype):
    extension_ops()
    table = resolve("cuda", "cuda")
    qkv, cos, sin = (t.cuda() for t in _rotary_case(65, 16, 80, dtype))
    ref = [t.clone() for t in vision_rotary(qkv, cos, sin, 16)]
    out = table.vision_rotary(qkv, cos, sin, 16)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    # head_dim 16 (the tiny presets) is refused, never silently run on the reference
    qkv, cos, sin = (t.cuda() for t in _rotary_case(65, 4, 16, dtype))
    with pytest.raises(BackendError, match="head_dim"):
        table.vision_rotary(qkv, cos, sin, 4)


@pytest.mark.gpu
def test_ops_compile_as_single_nodes():
    """torch.compile sees both ops (Meta kernels give the shapes; rotary_2d_ is functionalised)."""
    ops = extension_ops()

    def f(frames, qkv, cos, sin):
        rows = ops.patch_gather(frames, list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2, torch.bfloat16)
        ops.rotary_2d_(qkv, cos, sin, 16)
        return rows, qkv

    frames = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, device="cuda")
    qkv, cos, sin = (t.cuda() for t in _rotary_case(64, 16, 80, torch.bfloat16))
    qkv_eager = qkv.clone()
    rows_eager, _ = f(frames, qkv_eager, cos, sin)
    rows, out = torch.compile(f, fullgraph=True)(frames, qkv, cos, sin)
    assert torch.equal(rows, rows_eager) and torch.equal(out, qkv_eager) and torch.equal(qkv, qkv_eager)


def test_extension_is_built():
    """Where setup.py builds qwen2vl_fast._C (a CUDA torch and an nvcc of its CUDA major), it imports and registers
    every op: a failed build fails here instead of turning the binding and GPU tests into skips."""
    ops = extension_ops()
    for name in ("rotary_2d_", "patch_gather", "quant_gemm_decode"):
        assert hasattr(ops, name), name
