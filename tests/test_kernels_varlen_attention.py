"""Triton varlen attention (kernels/varlen_attention.py) against the reference in qwen2vl_fast.ops.attention and a
float64 per-segment loop.

Inputs are what the vision tower passes: q, k, v strided views of one (S, 3*H*D) qkv buffer. fp32: within 1e-5 of
the reference; fp16 (bf16 on CUDA): DESIGN.md's rule, max error vs float64 <= 2x torch's own low-precision max
error + 1e-3. Segments: Qwen2.5-VL windows from the real window metadata (packed two or three to a tile), a long
frame cut into several tiles, single and one-token segments; head dims 16..128 and the ViT's 80 (64 + 16 split)
with its 16 heads. Rows of one segment must not see another's keys: perturbing one segment's k/v leaves every
other output bit-identical. On the CPU this runs under the Triton interpreter, so S stays in the low hundreds.
"""

import pytest
import torch
from conftest import TEST_DEVICE, float_dtypes
from helpers_attention import varlen_f64

from qwen2vl_fast.config import parse_config
from qwen2vl_fast.errors import BackendError
from qwen2vl_fast.ops import VarlenMeta, get_op, resolve
from qwen2vl_fast.positions import vision_metadata
from qwen2vl_fast.presets import preset_config

K = pytest.importorskip("qwen2vl_fast.kernels.varlen_attention", reason="triton is not installed")

DTYPES = [pytest.param(dt, id=str(dt).split(".")[-1]) for dt, _, _ in float_dtypes(TEST_DEVICE)]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
LOW_PRECISION_ATOL = 1e-3
reference = get_op("varlen_attention").reference


def qkv_views(s, h, d, dtype, device, scale=1.5):
    """q, k, v (S, H, D) as the model has them: views of one (S, 3*H*D) buffer, row stride 3*H*D."""
    qkv = (torch.randn(s, 3 * h * d, device=device) * scale).to(dtype)
    return qkv.view(s, 3, h, d).unbind(1)


def check(ours, q, k, v, meta, scale):
    """fp32: close to the reference (and to float64); 16-bit: DESIGN.md's 2x-torch-error rule vs float64."""
    assert ours.shape == q.shape and ours.dtype == q.dtype and ours.is_contiguous()
    assert torch.isfinite(ours).all(), "rows left unwritten or NaN"
    ref64 = varlen_f64(q, k, v, meta.lengths, scale)
    torch_lp = reference(q, k, v, meta, scale)
    if q.dtype == torch.float32:
        torch.testing.assert_close(ours, torch_lp, **FP32_TOL)
        torch.testing.assert_close(ours.double(), ref64, **FP32_TOL)
    else:
        err = (ours.double() - ref64).abs().max().item()
        err_pt = (torch_lp.double() - ref64).abs().max().item()
        assert err <= 2 * err_pt + LOW_PRECISION_ATOL, f"ours {err:.3e} vs torch {q.dtype} {err_pt:.3e}"


def window_metas(device):
    """Real Qwen2.5-VL metadata: a 10x14-patch image (5x7 merged units cut by 4x4-unit windows: windows of
    64/48/16/12 tokens) and a 2-frame 4x6 video (24-token windows), plus the per-frame full-attention segments."""
    cfg = parse_config(preset_config("tiny-qwen2.5-vl"))
    meta = vision_metadata(cfg, torch.tensor([[1, 10, 14], [2, 4, 6]]), device)
    assert meta.window.lengths == (64, 48, 16, 12, 24, 24) and meta.full.lengths == (140, 24, 24)
    return {"window": meta.window, "full": meta.full}


@pytest.mark.parametrize("lengths", [
    [64] * 3 + [17, 3, 64, 1],  # windows, a partial and a one-token window: packed tiles
    [300],                      # one frame over several 64/128-row tiles with a partial key block
    [5],                        # a single tiny segment
    [1] * 7 + [2] * 5,          # many tiny segments in one tile
], ids=["windows", "long", "single", "tiny"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(triton_device, lengths, dtype):
    h, d = 2, 80
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q, k, v = qkv_views(sum(lengths), h, d, dtype, triton_device)
    check(K.varlen_attention(q, k, v, meta, d ** -0.5), q, k, v, meta, d ** -0.5)


def _config(name):
    """A config of the table by name: "_LONG", or "variant:n128" for LONG_VARIANTS["n128"]."""
    return K.LONG_VARIANTS[name.split(":")[1]] if name.startswith("variant:") else getattr(K, name)


@pytest.mark.parametrize("config", ["_LONG", "_SHORT", "_FP32", "variant:n128", "variant:2cta"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_launch_config(triton_device, monkeypatch, config, dtype):
    """Each tile shape of the config table on the same packing, whatever dtype it is picked for here. With
    BLOCK_M 128 the 70+50+5 pack spans two key blocks: the 50-row window sees none of its keys in the first."""
    monkeypatch.setattr(K, "pick_config", lambda *a: _config(config))
    lengths = [300, 70, 50, 5, 64, 1]
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q, k, v = qkv_views(sum(lengths), 2, 80, dtype, triton_device)
    check(K.varlen_attention(q, k, v, meta, 80 ** -0.5), q, k, v, meta, 80 ** -0.5)


@pytest.mark.parametrize("kind", ["window", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_window_and_frame_metadata(triton_device, kind, dtype):
    meta = window_metas(triton_device)[kind]
    q, k, v = qkv_views(sum(meta.lengths), 2, 80, dtype, triton_device)
    check(K.varlen_attention(q, k, v, meta, 80 ** -0.5), q, k, v, meta, 80 ** -0.5)


@pytest.mark.parametrize("heads, head_dim", [(16, 80), (2, 16), (2, 32), (1, 64), (1, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(triton_device, heads, head_dim, dtype):
    lengths = [9, 23] if heads == 16 else [40, 90, 7]
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q, k, v = qkv_views(sum(lengths), heads, head_dim, dtype, triton_device)
    check(K.varlen_attention(q, k, v, meta, head_dim ** -0.5), q, k, v, meta, head_dim ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segments_do_not_leak(triton_device, dtype):
    """Change one segment's keys and values: every other row's output stays bit-identical, the segment's own
    rows change. Segments 30+20+14 share one packed tile, 70 spans two."""
    lengths = [30, 20, 14, 70, 5]
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    h, d = 2, 80
    qkv = (torch.randn(sum(lengths), 3, h, d, device=triton_device) * 1.5).to(dtype)
    for lo, hi in ((30, 50), (64, 134)):
        before = K.varlen_attention(*qkv.unbind(1), meta, d ** -0.5)
        changed = qkv.clone()
        changed[lo:hi, 1:] = (torch.randn(hi - lo, 2, h, d, device=triton_device) * 1.5).to(dtype)
        after = K.varlen_attention(*changed.unbind(1), meta, d ** -0.5)
        assert torch.equal(after[:lo], before[:lo]) and torch.equal(after[hi:], before[hi:])
        assert not torch.equal(after[lo:hi], before[lo:hi])


def test_every_row_written_into_poisoned_out(triton_device):
    meta = window_metas(triton_device)["window"]
    q, k, v = qkv_views(sum(meta.lengths), 2, 80, torch.float32, triton_device)
    out = torch.full(q.shape, float("nan"), device=triton_device)
    assert K.varlen_attention(q, k, v, meta, 0.1, out=out) is out
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, k, v, meta, 0.1), **FP32_TOL)


def test_other_strides(triton_device):
    """Head-major (H, S, D) storage, and k/v from different buffers: only the last-dim stride must be 1."""
    lengths, h, d = [33, 64, 3], 3, 32
    meta = VarlenMeta.from_lengths(lengths, triton_device)
    q = torch.randn(h, sum(lengths), d, device=triton_device).transpose(0, 1)
    k = torch.randn(sum(lengths), h, 2 * d, device=triton_device)[..., :d]
    v = torch.randn(sum(lengths), h, d, device=triton_device)
    check(K.varlen_attention(q, k, v, meta, 0.2), q, k, v, meta, 0.2)


def test_plan_tiles_cover_rows_once_and_pack_short_segments():
    lengths = [64, 48, 16, 12, 24, 24, 200, 1, 130]
    tiles = torch.tensor(K.plan_tiles(lengths, 64)).view(-1, 4)
    starts = torch.tensor([0] + lengths).cumsum(0)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    covered = torch.zeros(sum(lengths), dtype=torch.long)
    for row_lo, row_hi, kv_lo, kv_hi in tiles.tolist():
        assert 0 < row_hi - row_lo <= 64 and kv_lo <= row_lo and row_hi <= kv_hi
        covered[row_lo:row_hi] += 1
        first, last = seg[row_lo].item(), seg[row_hi - 1].item()
        assert (kv_lo, kv_hi) == (starts[first].item(), starts[last + 1].item())  # exactly its segments' keys
        if first != last:  # a pack holds whole short segments only
            assert (row_lo, row_hi) == (kv_lo, kv_hi) and kv_hi - kv_lo <= 64
    assert (covered == 1).all()
    spans = (tiles[:, 3] - tiles[:, 2]).tolist()
    assert spans == sorted(spans, reverse=True)  # longest key ranges first
    # 64 | 48+16 | 12+24+24 | 200 as 4 chunks | 1 | 130 as 3 chunks
    assert len(tiles) == 1 + 1 + 1 + 4 + 1 + 3


def test_prepare_is_memoised_per_meta(triton_device, monkeypatch):
    meta = VarlenMeta.from_lengths([20, 5, 64], triton_device)
    plan = K.prepare(meta, triton_device)
    assert K.prepare(meta, triton_device) is plan
    assert plan.seg_ids.dtype == torch.int32 and plan.seg_ids.tolist() == [0] * 20 + [1] * 5 + [2] * 64
    q, k, v = qkv_views(89, 1, 16, torch.float32, triton_device)
    K.varlen_attention(q, k, v, meta, 0.25)
    calls = []
    monkeypatch.setattr(K, "plan_tiles", lambda *a: calls.append(a) or [])
    monkeypatch.setattr(K.torch, "repeat_interleave", lambda *a, **kw: calls.append(a))
    K.varlen_attention(q, k, v, meta, 0.25)  # a later layer: no metadata rebuilt
    assert calls == []


def test_rejects_unsupported_inputs(triton_device):
    meta = VarlenMeta.from_lengths([4, 4], triton_device)
    for d in (8, 72, 112, 320):
        q = torch.randn(8, 1, d, device=triton_device)
        with pytest.raises(BackendError, match=f"head_dim.*got {d}"):
            K.varlen_attention(q, q, q, meta, 0.1)
    q = torch.randn(8, 1, 32, device=triton_device)
    with pytest.raises(ValueError, match="unit stride"):
        K.varlen_attention(q, q, torch.randn(8, 1, 64, device=triton_device)[..., ::2], meta, 0.1)
    with pytest.raises(ValueError, match="segments cover 8"):
        K.varlen_attention(q[:7], q[:7], q[:7], meta, 0.1)


def test_registered_as_the_triton_implementation(triton_device):
    from qwen2vl_fast.ops.attention import varlen_attention_triton

    ops = resolve("triton", triton_device)
    assert ops.chosen["varlen_attention"] == "triton" and ops.varlen_attention is varlen_attention_triton
    meta = VarlenMeta.from_lengths([17, 3], triton_device)
    q, k, v = qkv_views(20, 2, 16, torch.float32, triton_device)
    torch.testing.assert_close(ops.varlen_attention(q, k, v, meta, 0.25), reference(q, k, v, meta, 0.25),
                               **FP32_TOL)


def test_long_variants_replace_only_the_long_config_and_are_raced_candidates(triton_device):
    """pick_config's `variant` swaps LONG for a LONG_VARIANTS entry where LONG would run (long 16-bit segments with
    enough tiles) and nowhere else; `auto` has each as a candidate of varlen_attention, and each gives the
    reference's result (here through the SHORT / FP32 configs it falls back to at this size)."""
    bf16, f32 = torch.bfloat16, torch.float32
    for name, cfg in K.LONG_VARIANTS.items():
        assert K.pick_config(bf16, 6144, 6144, 16, variant=name) == cfg != K._LONG
        assert K.pick_config(bf16, 6144, 6144, 16) == K._LONG
        assert K.pick_config(bf16, 64, 6144, 16, variant=name) == K._SHORT  # windows
        assert K.pick_config(bf16, 256, 256, 2, variant=name) == K._SHORT  # too few tiles for LONG
        assert K.pick_config(f32, 6144, 6144, 16, variant=name) == K._FP32
    with pytest.raises(ValueError, match="unknown varlen attention variant"):
        K.pick_config(bf16, 6144, 6144, 16, variant="n256")
    variants = get_op("varlen_attention").variants
    assert {"triton-n128", "triton-2cta"} <= set(variants)
    meta = VarlenMeta.from_lengths([17, 3], triton_device)
    q, k, v = qkv_views(20, 2, 16, torch.float32, triton_device)
    for label in ("triton-n128", "triton-2cta"):
        fn, runs = variants[label]
        assert not runs(torch.device("cpu"), False)  # auto never races an interpreted kernel on the CPU
        torch.testing.assert_close(fn(q, k, v, meta, 0.25), reference(q, k, v, meta, 0.25), **FP32_TOL)


def test_custom_op_traces_as_one_node(triton_device):
    """torch.compile sees the launch as one opaque node (register_fake gives its output's shape)."""
    meta = VarlenMeta.from_lengths([17, 3], triton_device)
    q, k, v = qkv_views(20, 2, 16, torch.float32, triton_device)
    plan = K.prepare(meta, triton_device)
    args = (q, k, v, plan.seg_ids, plan.tiles(64), 0.25, 64, 32, 4, 2, 0)
    compiled = torch.compile(torch.ops.qwen2vl_fast.varlen_attention_triton, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), reference(q, k, v, meta, 0.25), **FP32_TOL)



# Compiles the kernel for sm_90a in a fresh interpreter: under TRITON_INTERPRET=1 (set by conftest) @triton.jit
# gives InterpretedFunctions, which the compiler cannot take.
_COMPILE_SM90 = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwen2vl_fast.kernels import varlen_attention as K

cfg = K.LONG_VARIANTS[sys.argv[1].split(":")[1]] if sys.argv[1].startswith("variant:") else getattr(K, sys.argv[1])
fn = K._varlen_attention_kernel
sig = {n: "*bf16" for n in ("Q_ptr", "K_ptr", "V_ptr", "O_ptr")}
sig.update({"Seg_ptr": "*i32", "Tiles_ptr": "*i32", "qk_scale": "fp32"})
sig.update({n: "i32" for n in fn.arg_names if n.startswith("stride_")})
consts = dict(D_MAIN=64, D_TAIL=16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION="tf32", WHILE_LOOP=False)
sig.update({c: "constexpr" for c in consts})
sig = {n: sig[n] for n in fn.arg_names}
# what a launch on the model's qkv views gets: 16-byte aligned pointers, strides multiples of 16
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
         if n.endswith("_ptr") or n.startswith("stride_")}
kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                     **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg})))
ptx = kernel.asm["ptx"]
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "k.ptx"), "w").write(ptx)
    r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                       capture_output=True, text=True, check=True)
print(json.dumps(dict(wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
                      spills=[int(n) for n in re.findall(r"(\d+) bytes spill stores", r.stderr)],
                      registers=[int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)])))
"""


@pytest.mark.parametrize("config", ["_LONG", "_SHORT", "variant:n128", "variant:2cta"])
def test_gpu_path_compiles_for_hopper(config):
    """The GPU code path (the `for` key loop the interpreter cannot run) compiled for sm_90a without a GPU:
    tensor-core wgmma for the 64 + 16 head-dim split, a software-pipelined (cp.async) key loop, no spills."""
    import json
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90, config], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["wgmma"] > 0 and info["cp_async"] > 0, info
    assert info["spills"] and max(info["spills"]) == 0 and max(info["registers"]) <= 255, info
    cap = _config(config).maxnreg
    assert cap is None or max(info["registers"]) <= cap, info  # 2cta: two 256-thread CTAs fit the register file
