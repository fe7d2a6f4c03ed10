"""Ahead-of-time sweep: compile every Triton kernel launch the models make for Hopper (sm_90a), without a GPU,
and check what ptxas reports against the hardware's limits.

For each real preset (Qwen2-VL 2B/7B/72B, Qwen2.5-VL 3B/7B/72B) and each 16-bit dtype, the sweep calls the
kernels' own launchers (gemm.gemm, quant_gemm.quant_gemm, norms.rms_norm, llm_attention.decode_attention,
llm_attention.rope_decode_attention, ...)
at the models' real shapes, so every tile size, warp count, stage count and split count comes from the
launchers' own selection logic (gemm.pick_config, varlen_attention.pick_config, decode_num_splits, ...):
nothing of their tables is repeated here. The launchers run on CPU tensors made by torch.empty, whose pages
are never touched (a 152064 x 8192 lm_head costs address space, not memory); every JIT kernel's `run` is
swapped for a recorder, so a launch records its arguments instead of running. The recorded arguments go
through Triton's own specialisation (ints equal to 1 become constants, pointers and ints divisible by 16 get
the divisibility hint), as a real launch on a GPU would, and each distinct specialisation is compiled once
with `triton.compile` for GPUTarget("cuda", 90, 32) in a pool of worker processes.

Checked per compiled kernel (`problems`): it compiles; ptxas spills nothing (spill stores and loads 0 bytes);
dynamic shared memory <= 227 KB, sm_90's per-block opt-in maximum; registers x threads fit the 64K-register
file (registers rounded up to the allocation unit of 8 per thread). Registers and spills come from ptxas's own
report (`ptxas -v`, which Triton runs and prints when knobs.nvidia.dump_ptxas_log is set); shared memory from
the compiled kernel's metadata. Uses Triton internals (ASTSource, the JIT's binder and _pack_args) as of the
pinned 3.6 (they also work with 3.9: PYTHONPATH to another Triton runs the same sweep against its compiler).

Model shapes: vision width / heads / head_dim / MLP width, LLM hidden / heads / kv heads / intermediate / vocab,
from qwen2vl_fast.presets through the config parser. MLP widths that are not multiples of 64 are swept both raw
and padded to the next multiple of 64 (Qwen2.5-VL's vision 3420 -> 3456), so either checkpoint layout is covered.

Run: python -m qwen2vl_fast.kernels.aot_sweep [--json out.json] [--workers 2]   (not under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch

SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size)
SMEM_LIMIT = 227 * 1024  # sm_90's opt-in maximum of dynamic shared memory per block (232448 bytes)
REGISTER_FILE = 65536  # 32-bit registers per SM, the most one block may hold
REGISTER_UNIT = 8  # registers are allocated per warp in units of 256, i.e. 8 per thread
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Activation rows of the GEMMs. M enters a compile only through the tile config the launcher picks and through
# M == 1 (the JIT turns an int argument equal to 1 into a constant), so one M per config suffices: 1 (decode,
# specialised), 16 (decode tile), 32 and 64 (the two small-batch tile heights), 256 (mid-size prefill) and
# 4096 (large prefill).
GEMM_ROWS = (1, 16, 32, 64, 256, 4096)
QUANT_ROWS = (1, 16, 32, 64, 4096)  # the quantized GEMM has no separate mid-size tile
GEMV_ROWS = (1, 2, 4, 8, 16)  # the engine's CUDA-graph buckets up to 16: the split-K plan depends on M
QUANT_PRESETS = ("qwen2-vl-7b", "qwen2-vl-72b")  # the 7B and 72B LLMs (the 2.5 models share their LLM shapes)
QUANT_FORMATS = ((4, 128), (4, -1), (8, 128), (8, -1))  # (bits, group size): grouped and per-channel
DECODE_BATCHES = (1, 4, 16)  # CUDA-graph buckets of the default engine (max_batch 16) giving distinct splits
ENGINE_MAX_BATCH, ENGINE_MAX_LEN = 16, 8192  # the engine's default KV cache (engine/engine.py)


# ------------------------------------------------------------------------------------------ shapes

def padded_widths(width: int) -> tuple:
    """A width and, when it is not a multiple of 64, the multiple of 64 the loader may pad it to."""
    padded = -(-width // 64) * 64
    return (width,) if padded == width else (width, padded)


def vision_dtype(model_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the vision tower runs in: Qwen2.5-VL's stays bf16 when fp16 is asked for (model.py)."""
    return torch.bfloat16 if dtype == torch.float16 and model_type == "qwen2_5_vl" else dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


# ------------------------------------------------------------------------------------------ workloads

@dataclass
class Workload:
    """One call of a launcher at a model's shape: `run()` launches (and so records) its kernels."""

    family: str
    name: str  # "preset dtype what", how a failure is reported
    run: Callable[[], None]


def _empty(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype)  # CPU, never written: the pages are never committed


@dataclass
class _Segments:
    """What the attention launchers read of an ops.VarlenMeta (duck-typed: kernels do not import ops)."""

    cu_seqlens: torch.Tensor
    lengths: tuple
    max_seqlen: int

    @staticmethod
    def of(lengths) -> _Segments:
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        return _Segments(torch.tensor(cu, dtype=torch.int32), tuple(lengths), max(lengths))


def _gemm(rows, n, k, dtype, epilogue, bias):
    from . import gemm

    def run():
        w_rows = 2 * n if epilogue == "swiglu" else n
        gemm.gemm(_empty(rows, k, dtype=dtype), _empty(w_rows, k, dtype=dtype),
                  _empty(w_rows, dtype=dtype) if bias else None, epilogue)
    return run


def _vision_linears(v) -> list:
    """(what, N, K, epilogue, bias) of every dense layer of the vision tower and the merger."""
    e, out = v.embed_dim, v.out_hidden_size
    layers = [("vision.qkv", 3 * e, e, "none", True), ("vision.proj", e, e, "none", True)]
    if v.hidden_act == "quick_gelu":
        layers += [("vision.fc1", v.mlp_hidden_size, e, "quick_gelu", True),
                   ("vision.fc2", e, v.mlp_hidden_size, "none", True)]
    else:
        for width in padded_widths(v.mlp_hidden_size):
            layers += [("vision.gate_up", width, e, "swiglu", True), ("vision.down", e, width, "none", True)]
    hidden = v.merger_hidden_size
    return layers + [("merger.fc1", hidden, hidden, "gelu", True), ("merger.fc2", out, hidden, "none", True)]


def _llm_linears(t) -> list:
    """(what, N, K, epilogue, bias) of every dense layer of the decoder and the LM head."""
    h = t.hidden_size
    layers = [("llm.qkv", t.qkv_out_features, h, "none", True),
              ("llm.o_proj", h, t.num_attention_heads * t.head_dim, "none", False)]
    for width in padded_widths(t.intermediate_size):
        layers += [("llm.gate_up", width, h, "swiglu", False), ("llm.down", h, width, "none", False)]
    return layers + [("llm.lm_head", t.vocab_size, h, "none", False)]


def gemm_workloads(label, cfg, dtype) -> Iterator[Workload]:
    vdt = vision_dtype(cfg.model_type, dtype)
    for linears, dt in ((_vision_linears(cfg.vision), vdt), (_llm_linears(cfg.text), dtype)):
        for what, n, k, epilogue, bias in linears:
            for rows in GEMM_ROWS:
                yield Workload("gemm", f"{label(dt)} {what} {epilogue} M={rows} N={n} K={k}",
                               _gemm(rows, n, k, dt, epilogue, bias))


def patch_embed_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import patch_embed

    v, dt = cfg.vision, vision_dtype(cfg.model_type, dtype)
    for rows in GEMM_ROWS[1:]:  # at least 4 patches (one 28 x 28 image)
        def run(rows=rows):
            patch_embed.patch_embed(_empty(rows, v.patch_dim, dtype=dt), _empty(v.embed_dim, v.patch_dim, dtype=dt))
        yield Workload("patch_embed", f"{label(dt)} patch_embed M={rows} N={v.embed_dim} K={v.patch_dim}", run)
    # the fused uint8-frames variant: an image (T = 1, the JIT specialises it) and a 4-frame video
    for frames, h, w in ((1, 448, 448), (4, 336, 588)):
        def run(frames=frames, h=h, w=w):
            patch_embed.embed_frames(_empty(frames, v.in_channels, h, w, dtype=torch.uint8),
                                     _empty(v.embed_dim, v.patch_dim, dtype=dt), (0.5,) * v.in_channels,
                                     (0.25,) * v.in_channels, v.patch_size, v.temporal_patch_size,
                                     v.spatial_merge_size)
        yield Workload("patch_embed", f"{label(dt)} patch_embed_frames T={frames} {h}x{w}", run)


def norm_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import norms

    v, t = cfg.vision, cfg.text
    vdt = vision_dtype(cfg.model_type, dtype)
    rms_vision = v.hidden_act != "quick_gelu"  # Qwen2.5-VL's tower and merger use RMSNorm, Qwen2-VL's LayerNorm
    cases = [("vision", v.embed_dim, vdt, rms_vision, (4096,)), ("llm", t.hidden_size, dtype, True, (1, 4096))]
    for where, n, dt, rms, row_counts in cases:
        for rows in row_counts:
            def run(n=n, dt=dt, rms=rms, rows=rows):
                x, r, w = _empty(rows, n, dtype=dt), _empty(rows, n, dtype=dt), _empty(n, dtype=dt)
                out, res_out = torch.empty_like(x), torch.empty_like(x)
                if rms:
                    norms.rms_norm(x, w, 1e-6, out=out)
                    norms.add_rms_norm(x, r, w, 1e-6, out=out, residual_out=res_out)
                else:
                    norms.layer_norm(x, w, w, 1e-6, out=out)
                    norms.add_layer_norm(x, r, w, w, 1e-6, out=out, residual_out=res_out)
            kind = "rms_norm" if rms else "layer_norm"
            yield Workload("norms", f"{label(dt)} {where} {kind} (+add) rows={rows} N={n}", run)


def activation_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import activations

    v, t = cfg.vision, cfg.text
    vdt = vision_dtype(cfg.model_type, dtype)
    if v.hidden_act == "quick_gelu":
        def quick(rows=4096):
            x = _empty(rows, v.mlp_hidden_size, dtype=vdt)
            activations.quick_gelu(x, out=torch.empty_like(x))
        yield Workload("activations", f"{label(vdt)} vision quick_gelu N={v.mlp_hidden_size}", quick)

    def gelu(rows=1024):
        x = _empty(rows, v.merger_hidden_size, dtype=vdt)
        activations.gelu(x, out=torch.empty_like(x))
    yield Workload("activations", f"{label(vdt)} merger gelu N={v.merger_hidden_size}", gelu)
    for rows in (1, 4096):  # the quantized MLP: silu(gate) * up after a quantized gate_up GEMM
        for width in padded_widths(t.intermediate_size):
            def silu(rows=rows, width=width):
                gu = _empty(rows, 2 * width, dtype=dtype)
                activations.silu_and_mul(gu, out=_empty(rows, width, dtype=dtype))
            yield Workload("activations", f"{label(dtype)} llm silu_and_mul rows={rows} I={width}", silu)


def rotary_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import rotary

    v, dt = cfg.vision, vision_dtype(cfg.model_type, dtype)

    def run(tokens=4096):
        qkv = _empty(tokens, 3 * v.embed_dim, dtype=dt)
        cos = _empty(tokens, v.head_dim, dtype=torch.float32)
        rotary.vision_rotary(qkv, cos, torch.empty_like(cos), v.num_heads)
    yield Workload("rotary", f"{label(dt)} vision_rotary heads={v.num_heads} D={v.head_dim}", run)


def _qkv_views(tokens, t, dtype):
    """q (T, Hq, D), k, v (T, Hkv, D): views of one fused qkv projection output, as the decoder splits it."""
    d = t.head_dim
    qkv = _empty(tokens, t.qkv_out_features, dtype=dtype)
    q, k, v = qkv.split([t.num_attention_heads * d, t.num_key_value_heads * d, t.num_key_value_heads * d], -1)
    return (q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d))


def _kv_cache(t, dtype):
    shape = (ENGINE_MAX_BATCH, ENGINE_MAX_LEN, t.num_key_value_heads, t.head_dim)
    return _empty(*shape, dtype=dtype), _empty(*shape, dtype=dtype)


def mrope_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import mrope

    t = cfg.text
    half = t.head_dim // 2
    inv_freq = _empty(half, dtype=torch.float32)
    for tokens in (1, 4096):  # a decode step (batch 1) and a prefill
        def tables(tokens=tokens):
            mrope.mrope_cos_sin(torch.zeros(3, 1, tokens, dtype=torch.int64), inv_freq, t.mrope_section, dtype)

        def kv_write(tokens=tokens):
            q, k, v = _qkv_views(tokens, t, dtype)
            cos = _empty(tokens, t.head_dim, dtype=dtype)
            idx = torch.zeros(tokens, dtype=torch.int64)
            mrope.rope_kv_write(q, k, v, cos, torch.empty_like(cos), *_kv_cache(t, dtype), idx, idx)
            mrope.mrope_kv_write(q, k, v, torch.zeros(3, tokens, dtype=torch.int64), inv_freq, t.mrope_section,
                                 *_kv_cache(t, dtype), idx, idx)

        def rotate(tokens=tokens):
            q, k, _ = _qkv_views(tokens, t, dtype)
            cos = _empty(1, tokens, t.head_dim, dtype=dtype)
            mrope.apply_rotary(q.unsqueeze(0), k.unsqueeze(0), cos, torch.empty_like(cos))
        yield Workload("mrope", f"{label(dtype)} mrope_cos_sin T={tokens}", tables)
        yield Workload("mrope", f"{label(dtype)} rope_kv_write + mrope_kv_write T={tokens} Hq={t.num_attention_heads}"
                                f" Hkv={t.num_key_value_heads}", kv_write)
        yield Workload("mrope", f"{label(dtype)} apply_rotary T={tokens}", rotate)


def varlen_attention_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import varlen_attention

    v, dt = cfg.vision, vision_dtype(cfg.model_type, dtype)
    # one small image (few tiles: the short config), one large image (the long config), and for Qwen2.5-VL
    # its 64-token windows
    cases = [("image 1024 patches", (1024,)), ("image 4096 patches", (4096,))]
    if v.uses_windows:
        cases.append(("windows 64 x 64", (64,) * 64))
    # the raced LONG alternatives (the dispatch's varlen_attention variants) on the large image
    variants = [(what, lengths, None) for what, lengths in cases]
    variants += [(f"image 4096 patches variant={name}", (4096,), name) for name in varlen_attention.LONG_VARIANTS]
    for what, lengths, variant in variants:
        def run(lengths=lengths, variant=variant):
            s = sum(lengths)
            q, k, vv = _empty(s, 3 * v.embed_dim, dtype=dt).view(s, 3, v.num_heads, v.head_dim).unbind(1)
            varlen_attention.varlen_attention(q, k, vv, _Segments.of(lengths), v.head_dim ** -0.5, variant=variant)
        yield Workload("varlen_attention", f"{label(dt)} {what} heads={v.num_heads} D={v.head_dim}", run)


def llm_attention_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import llm_attention

    t = cfg.text
    scale = t.head_dim ** -0.5
    for tokens in (300, 4096):  # a short prompt (few tiles: the short config) and a long one
        def prefill(tokens=tokens):
            q, k, v = _qkv_views(tokens, t, dtype)
            llm_attention.prefill_attention(q, k, v, _Segments.of((tokens,)), scale)
        yield Workload("llm_attention", f"{label(dtype)} prefill T={tokens} Hq={t.num_attention_heads} "
                                        f"Hkv={t.num_key_value_heads}", prefill)
    for batch in DECODE_BATCHES:
        def decode(batch=batch):
            q, _, _ = _qkv_views(batch, t, dtype)
            rows = torch.arange(batch)
            llm_attention.decode_attention(q, *_kv_cache(t, dtype), rows, rows + 1, scale)
        splits = llm_attention.decode_num_splits(batch, t.num_key_value_heads, ENGINE_MAX_LEN)
        yield Workload("llm_attention", f"{label(dtype)} decode B={batch} max_len={ENGINE_MAX_LEN} "
                                        f"splits={splits}", decode)
    # the fused decode step (rotary + cache write + attention + in-launch merge): the engine's buckets, and a
    # batch past the split threshold (NUM_SPLITS 1: the direct-write path)
    for batch in (*DECODE_BATCHES, 256):
        def rope_decode(batch=batch):
            q, k, v = _qkv_views(batch, t, dtype)
            cos = _empty(batch, t.head_dim, dtype=dtype)
            rows = torch.arange(batch)
            llm_attention.rope_decode_attention(q, k, v, cos, torch.empty_like(cos), *_kv_cache(t, dtype), rows,
                                                rows + 1, scale)
        splits = llm_attention.decode_num_splits(batch, t.num_key_value_heads, ENGINE_MAX_LEN)
        yield Workload("llm_attention", f"{label(dtype)} rope_decode B={batch} max_len={ENGINE_MAX_LEN} "
                                        f"splits={splits}", rope_decode)


def _quantized(k, n, bits, group, dtype):
    from ..quant.weight import QuantizedWeight

    g = k if group == -1 else group
    return QuantizedWeight(_empty(k * bits // 32, n, dtype=torch.int32), _empty(k // g, n, dtype=dtype),
                           _empty(k // g, n, dtype=dtype), bits, group)


def quant_gemm_workloads(label, cfg, dtype) -> Iterator[Workload]:
    from . import quant_gemm

    t = cfg.text
    h, width = t.hidden_size, t.intermediate_size
    layers = [("qkv", t.qkv_out_features, h, True), ("o_proj", h, h, False), ("gate_up", 2 * width, h, False),
              ("down", h, width, False), ("lm_head", t.vocab_size, h, False)]
    for bits, group in QUANT_FORMATS:
        for what, n, k, bias in layers:
            for rows in QUANT_ROWS:
                def run(rows=rows, n=n, k=k, bias=bias, bits=bits, group=group):
                    w = _quantized(k, n, bits, group, dtype)
                    quant_gemm.quant_gemm(_empty(rows, k, dtype=dtype), w.qweight, w.scales, w.zeros, bits, group,
                                          None, _empty(n, dtype=dtype) if bias else None)
                yield Workload("quant_gemm", f"{label(dtype)} llm.{what} int{bits} g{group} M={rows} N={n} K={k}",
                               run)


def _gemv_splitk(rows, n, k, dtype, epilogue, bias, reduce="kernel"):
    from . import gemv_splitk

    def run():
        w_rows = 2 * n if epilogue == "swiglu" else n
        gemv_splitk.gemv_splitk(_empty(rows, k, dtype=dtype), _empty(w_rows, k, dtype=dtype),
                                _empty(w_rows, dtype=dtype) if bias else None, epilogue, reduce=reduce)
    return run


def gemv_splitk_workloads(label, cfg, dtype) -> Iterator[Workload]:
    """The split-K decode GEMV (a candidate of linear / linear_swiglu at M <= 16) at every decoder linear and the
    LM head, for every CUDA-graph batch bucket up to 16 (the split plan depends on M); the two-pass reduction
    (the fallback) at M = 1 and 16."""
    for what, n, k, epilogue, bias in _llm_linears(cfg.text):
        for rows in GEMV_ROWS:
            yield Workload("gemv_splitk", f"{label(dtype)} {what} {epilogue} M={rows} N={n} K={k}",
                           _gemv_splitk(rows, n, k, dtype, epilogue, bias))
        for rows in (1, 16):
            yield Workload("gemv_splitk", f"{label(dtype)} {what} {epilogue} M={rows} N={n} K={k} reduce=pass",
                           _gemv_splitk(rows, n, k, dtype, epilogue, bias, "pass"))


STEP_BATCHES = (1, 16, 128)  # decode-step bookkeeping: the smallest, the default engine's and the largest bucket


def decode_step_workloads(label, cfg, dtype) -> Iterator[Workload]:
    """The decode step's bookkeeping kernels (dtype-free but for the logits): rows, and the greedy / given-token
    commit over the preset's vocabulary."""
    from qwen2vl_fast.ops import step_state as F

    from . import decode_step

    vocab = cfg.text.vocab_size
    for batch in STEP_BATCHES:
        def state(batch=batch):
            return (_empty(128, F.INT_FIELDS, dtype=torch.long), torch.arange(batch),
                    _empty(batch, dtype=torch.bool))

        def rows(state=state):
            ints, r, active = state()
            decode_step.decode_rows(ints, r, active, _empty(1, dtype=torch.long))
        yield Workload("decode_step", f"{label(dtype)} decode_rows B={batch}", rows)
        for greedy in (True, False):
            def commit(batch=batch, greedy=greedy, state=state):
                ints, r, live = state()
                out = _empty(batch, dtype=torch.long)
                decode_step.decode_commit(_empty(batch, vocab, dtype=dtype), None if greedy else out, ints,
                                          _empty(128, dtype=torch.float32), _empty(128, vocab, dtype=torch.bool),
                                          _empty(2, dtype=torch.long), r, live, out)
            yield Workload("decode_step", f"{label(dtype)} decode_commit {'greedy' if greedy else 'given'} "
                                          f"B={batch} V={vocab}", commit)


FAMILIES = {
    "gemm": gemm_workloads, "patch_embed": patch_embed_workloads, "norms": norm_workloads,
    "activations": activation_workloads, "rotary": rotary_workloads, "mrope": mrope_workloads,
    "varlen_attention": varlen_attention_workloads, "llm_attention": llm_attention_workloads,
    "quant_gemm": quant_gemm_workloads, "gemv_splitk": gemv_splitk_workloads, "decode_step": decode_step_workloads,
}


def workloads(presets=None, dtypes=("bf16", "fp16"), families=None) -> Iterator[Workload]:
    """Every launcher call of the sweep, for the real presets (or `presets`) in each of `dtypes`."""
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import REAL_PRESETS, preset_config

    for preset in presets or REAL_PRESETS:
        cfg = parse_config(preset_config(preset))
        for name in dtypes:
            def label(dt, preset=preset):
                return f"{preset} {dtype_name(dt)}"
            for family, make in FAMILIES.items():
                if families and family not in families:
                    continue
                if family == "quant_gemm" and preset not in QUANT_PRESETS:
                    continue
                yield from make(label, cfg, DTYPES[name])


# ------------------------------------------------------------------------------------------ recording launches

@dataclass
class Job:
    """One distinct specialisation of a kernel: what `triton.compile` needs, and every workload that launches it."""

    module: str
    kernel: str
    family: str
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]]}
    options: dict  # the CUDAOptions fields, as the JIT would compile them
    config: str  # the launch parameters, readable
    cases: list = field(default_factory=list)

    @property
    def threads(self) -> int:
        return self.options["num_warps"] * 32 * self.options.get("num_ctas", 1)


def _kernel_modules() -> list:
    """Every kernel module of this package (one file per kernel family)."""
    package = importlib.import_module(__package__)
    return [importlib.import_module(f"{__package__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)
            if info.name != __name__.rsplit(".", 1)[-1]]


def _jit_functions() -> list:
    """Every @triton.jit function of the kernel modules, once each (helpers such as gemm._tile_coords are imported
    by several modules)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module in _kernel_modules():
        found.update((id(obj), obj) for obj in vars(module).values() if isinstance(obj, JITFunction))
    return list(found.values())


def entry_kernels() -> list:
    """(module, name) of every kernel a launcher launches: by convention the @triton.jit functions named *_kernel
    (the others are device helpers inlined into them)."""
    return sorted((fn.fn.__module__, fn.fn.__name__) for fn in _jit_functions() if fn.fn.__name__.endswith("_kernel"))


@contextlib.contextmanager
def recording(sink: list):
    """Within the block, a kernel launch appends (kernel, args, kwargs) to `sink` instead of running."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the AOT sweep needs compiled kernels: run it without TRITON_INTERPRET=1")
    kernels = _jit_functions()
    for kernel in kernels:
        def run(*args, grid, warmup, _kernel=kernel, **kwargs):
            sink.append((_kernel, args, kwargs))
        kernel.run = run
    try:
        yield sink
    finally:
        for kernel in kernels:
            del kernel.run


class Specialiser:
    """Turns recorded launch arguments into (signature, constexprs, attrs, options) exactly as JITFunction.run
    does on a GPU (same binder, same _pack_args), for the sm_90 backend."""

    def __init__(self):
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.knobs, self.backend = knobs, make_backend(GPUTarget(*SM90))
        self._make_binder, self._binders = create_function_from_signature, {}

    def job(self, kernel, args, kwargs, family: str) -> Job:
        binder = self._binders.get(kernel)
        if binder is None:
            binder = self._binders[kernel] = self._make_binder(kernel.signature, kernel.params, self.backend)
        kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or self.knobs.runtime.debug,
                      instrumentation_mode=self.knobs.compilation.instrumentation_mode)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, specialization,
                                                                  options)
        names = list(signature)
        dtype = next((t[1:] for t in signature.values() if t in ("*bf16", "*fp16", "*fp32")), "-")
        config = dtype + " " + " ".join(f"{names[path[0]]}={value}" for path, value in constexprs.items()
                          if value is not None and names[path[0]].isupper())
        config += f" warps={options.num_warps} stages={options.num_stages}"
        if getattr(options, "maxnreg", None):
            config += f" maxnreg={options.maxnreg}"
        return Job(kernel.fn.__module__, kernel.fn.__name__, family, signature, constexprs,
                   {path: list(map(list, v)) for path, v in attrs.items()}, dict(options.__dict__), config)


def _key(job: Job) -> str:
    return repr((job.module, job.kernel, sorted(job.signature.items()), sorted(job.constexprs.items()),
                 sorted(job.attrs.items()), sorted((k, repr(v)) for k, v in job.options.items())))


def collect_jobs(loads) -> list:
    """The distinct compile jobs of `loads` (Workloads), each with the names of the workloads that launch it."""
    specialiser, jobs = Specialiser(), {}
    for load in loads:
        launches = []
        with recording(launches):
            load.run()
        if not launches:
            raise RuntimeError(f"{load.name}: the launcher launched no kernel")
        for kernel, args, kwargs in launches:
            job = specialiser.job(kernel, args, kwargs, load.family)
            jobs.setdefault(_key(job), job).cases.append(load.name)
    return list(jobs.values())


# ------------------------------------------------------------------------------------------ compiling

_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes from `ptxas -v` (the largest, should a log hold several functions)."""
    usage = [tuple(map(int, m)) for m in _PTXAS_USAGE.findall(log)]
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    if not usage or not regs:
        raise RuntimeError(f"no ptxas resource report in the log: {log[-2000:]!r}")
    return {"regs": max(regs), "stack": max(u[0] for u in usage), "spill_stores": max(u[1] for u in usage),
            "spill_loads": max(u[2] for u in usage)}


def _worker_setup() -> None:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and with it the report


def compile_job(job: Job) -> dict:
    """Compile one job for sm_90a; its ptxas resource report and shared memory, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs,
                    attrs={path: [tuple(a) for a in v] for path, v in job.attrs.items()})
    log, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget(*SM90), options=job.options)
        result = dict(parse_ptxas_log(log.getvalue()), shared=compiled.metadata.shared)
    except Exception as e:  # noqa: BLE001 -- a failure to compile is a result to report, not a crash of the sweep
        result = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _cost(job: Job) -> int:
    """A rough compile-time order (bigger tiles and more warps take longer): longest first balances the pool."""
    names = list(job.signature)
    size = 1
    for (i,), value in job.constexprs.items():
        if names[i].startswith("BLOCK") and isinstance(value, int):
            size *= max(1, value)
    return size * job.options["num_warps"]


def compile_all(jobs: list, workers: int = 2, progress: Callable[[int, int], None] | None = None) -> list:
    """compile_job over `jobs` in `workers` spawned processes (fresh imports without the interpreter); results
    in the order of `jobs`."""
    import multiprocessing

    results: list = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_setup) as pool:
        futures = {pool.submit(compile_job, jobs[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress:
                progress(done, len(jobs))
    return results


def problems(job: Job, result: dict) -> list:
    """What is wrong with a compiled job: nothing, or the broken limits."""
    if "error" in result:
        return [f"does not compile: {result['error']}"]
    found = []
    if result["spill_stores"] or result["spill_loads"]:
        found.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    if result["shared"] > SMEM_LIMIT:
        found.append(f"shared memory {result['shared']} B > {SMEM_LIMIT} B")
    allocated = -(-result["regs"] // REGISTER_UNIT) * REGISTER_UNIT
    if allocated * job.threads > REGISTER_FILE:
        found.append(f"{result['regs']} registers x {job.threads} threads > {REGISTER_FILE}")
    return found


def summary_rows(jobs: list, results: list) -> list:
    """One JSON-ready row per job: what it is, what ptxas said, what is wrong, which workloads launch it."""
    rows = []
    for job, result in zip(jobs, results):
        rows.append({"family": job.family, "kernel": job.kernel, "config": job.config, "threads": job.threads,
                     **result, "problems": problems(job, result), "cases": job.cases})
    return rows


def unswept_rows(jobs: list) -> list:
    """A failing row for each entry kernel no workload launched: a new kernel needs a workload here."""
    launched = {(job.module, job.kernel) for job in jobs}
    return [{"family": module.rsplit(".", 1)[-1], "kernel": name, "config": "", "threads": 0,
             "error": "no sweep workload launches it", "problems": ["not swept: add a workload to aot_sweep.py"],
             "cases": []}
            for module, name in entry_kernels() if (module, name) not in launched]


def describe(row: dict) -> str:
    """A failing or notable row, on one line (plus its first workloads)."""
    usage = ("error" if "error" in row else
             f"regs={row['regs']} spill={row['spill_stores']}/{row['spill_loads']} B smem={row['shared']} B")
    more = f" (+{len(row['cases']) - 3} more)" if len(row["cases"]) > 3 else ""
    return (f"{row['family']}/{row['kernel']} [{row['config']}] {usage}: {'; '.join(row['problems']) or 'ok'}\n"
            f"    launched by: {' | '.join(row['cases'][:3])}{more}")


def worst_by_family(rows: list) -> dict:
    """{family: (most registers, most shared memory)} over the compiled rows."""
    out: dict = {}
    for row in rows:
        if "error" in row:
            continue
        regs, smem = out.get(row["family"], (0, 0))
        out[row["family"]] = (max(regs, row["regs"]), max(smem, row["shared"]))
    return out


def sweep(workers: int = 2, presets=None, dtypes=("bf16", "fp16"), families=None, log=None) -> list:
    """Enumerate, dedupe, compile, check: the summary rows (see summary_rows)."""
    start = time.perf_counter()
    jobs = collect_jobs(workloads(presets, dtypes, families))
    if log:
        log(f"{len(jobs)} distinct kernels to compile ({time.perf_counter() - start:.1f} s to enumerate)")

    def progress(done, total):
        if log and (done % 25 == 0 or done == total):
            log(f"  compiled {done}/{total} ({time.perf_counter() - start:.0f} s)")
    rows = summary_rows(jobs, compile_all(jobs, workers, progress))
    return rows + (unswept_rows(jobs) if not (presets or families) else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write every job's row here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--presets", nargs="*")
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--families", nargs="*", choices=sorted(FAMILIES))
    args = parser.parse_args(argv)
    rows = sweep(args.workers, args.presets, tuple(args.dtypes), args.families,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for family, (regs, smem) in sorted(worst_by_family(rows).items()):
        print(f"{family:18s} max registers {regs:3d}  max shared {smem / 1024:6.1f} KB")
    failing = [row for row in rows if row["problems"]]
    for row in failing:
        print(describe(row))
    print(f"{len(rows)} kernels compiled for sm_90a, {len(failing)} over a limit")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
