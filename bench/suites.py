"""The microbenchmark cases of the pytest-benchmark suites (bench/test_kernels.py): every op of the registry at the
released models' real shapes, ours against the best PyTorch alternatives, as `compare.Case`s.

The cases of the script benchmarks are reused as they are (bench_gemm.py: every GEMM; bench_vision_kernels.py:
varlen attention, the norms, rotary, patch embedding; bench_llm_kernels.py: prefill / decode attention, rope + KV
write, add_rms_norm; bench_quant.py: the weight-only int4 / int8 GEMMs), and the ops they leave out are built here
(`op_cases`): rms_norm, layer_norm, gelu, quick_gelu, silu_and_mul, apply_rotary (+ Liger's M-RoPE where
installed), mrope_cos_sin, merger, causal_attention, embedding, sample. Where flash-attn is installed, its varlen
kernel races the packed attention ops (varlen_attention, prefill_attention).

`collect(device, dtype, smoke)` returns `Spec`s: a case id, its op, suite, candidate names and the Case itself.
Building a Case allocates next to nothing (inputs are drawn by each candidate's `make_args` when it is timed); the
quantized weights of the quant suite are made on first use, one layer at a time. `smoke=True`: tiny shapes (the
CPU run that keeps the suites working; its times say nothing about GPU speed).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from bench import compare
from bench.harness import fast_impls

SUITES = ("gemm", "vision", "llm", "quant", "ops")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Spec:
    """One case of one suite: `case_id` (the pytest id), `op` (the registry op it measures), `label` (what the
    report prints), `candidates` (names, in the Case's order), `case` (the compare.Case)."""

    suite: str
    op: str
    label: str
    dtype: str
    case: compare.Case
    candidates: list = field(default_factory=list)

    @property
    def case_id(self) -> str:
        return safe_id(f"{self.suite}-{self.label}-{self.dtype}")


def safe_id(text: str) -> str:
    """A pytest id: letters, digits and . _ + = - kept, every other run made one '_'."""
    text = text.replace("->", " to ").replace("(", " ").replace(")", " ")
    return re.sub(r"_*-_*", "-", re.sub(r"[^A-Za-z0-9._+=-]+", "_", text)).strip("_")


def _ours(op, device, auto, make_args, tag: str = "") -> dict:
    """Every fast implementation of `op` that runs on `device` ("ours-triton", "ours-cuda") and the measured
    dispatch ("auto"); an op with no fast implementation runs its reference: that is "ours-torch"."""
    from qwen2vl_fast.ops import get_op

    cands = {name: compare.Candidate(fn, make_args, "ours", tag) for name, fn in fast_impls(op, device).items()}
    if not cands:
        cands["ours-torch"] = compare.Candidate(get_op(op).reference, make_args, "ours", tag)
    if auto is not None and len(get_op(op).impls) + len(get_op(op).variants) > 1:  # else auto is the reference
        cands["auto"] = compare.Candidate(getattr(auto, op), make_args, "auto", tag)
    return cands


def _alternatives(op, cands, make_args, compile_ok, eager: bool = True) -> dict:
    """The op's reference eagerly (when it is not already "ours-torch") and under torch.compile (static shapes)."""
    from qwen2vl_fast.ops import get_op

    ref = get_op(op).reference
    if eager and "ours-torch" not in cands:
        cands["torch-eager"] = compare.Candidate(ref, make_args)
    if compile_ok:
        cands["torch-compile"] = compare.Candidate(torch.compile(ref, dynamic=False), make_args)
    return cands


# ------------------------------------------------------------------------------------------ shapes of the new cases

@dataclass(frozen=True)
class OpShapes:
    """The shapes of the cases built here. Real: one 1344x896 image (6144 patches, 1536 merged tokens), a
    1600-token prefill (the image + 64 text tokens), decode rows 1 and 16; the 2B and 7B decoders, the Qwen2-VL
    (2B) and Qwen2.5-VL (3B) vision towers."""

    llm_presets: tuple = ("qwen2-vl-2b", "qwen2-vl-7b")
    vision_presets: tuple = ("qwen2-vl-2b", "qwen2.5-vl-3b")
    patches: int = 6144
    prefill: int = 1600
    decode_rows: tuple = (1, 16)
    sample_rows: tuple = (1, 16)
    vocab: int | None = None  # None: the preset's


REAL_SHAPES = OpShapes()
SMOKE_SHAPES = OpShapes(llm_presets=("tiny-qwen2-vl",), vision_presets=("tiny-qwen2-vl", "tiny-qwen2.5-vl"),
                        patches=32, prefill=24, decode_rows=(2,), sample_rows=(2,), vocab=512)


def _cfg(preset):
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import preset_config

    return parse_config(preset_config(preset))


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _shared_randn(tag: str, shape: tuple, dtype, device, scale: float = 1.0):
    """A random tensor that every call of a case (and its rotated copies) shares, made on first use and kept
    for the next few cases only: weights and tables are not allocated while the cases are collected."""
    return torch.randn(*shape, device=device, dtype=dtype) * scale


def norm_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """rms_norm: the decoder's (decode rows, prefill) and Qwen2.5-VL's ViT norm; layer_norm: Qwen2-VL's ViT norm.
    Alternatives: the reference, its compile, and F.rms_norm (torch's own fused RMSNorm) where torch has it."""
    dsize = dtype.itemsize
    rows = {}
    for p in sh.llm_presets:
        h = _cfg(p).text.hidden_size
        for m in (*sh.decode_rows, sh.prefill):
            rows.setdefault(("rms_norm", m, h), p)
    for p in sh.vision_presets:
        v = _cfg(p).vision
        rows.setdefault(("rms_norm" if v.uses_windows else "layer_norm", sh.patches, v.embed_dim), f"{p} vision")
    for (op, m, h), where in rows.items():
        def make(m=m, h=h, op=op):
            x = _randn(m, h, device=device, dtype=dtype)
            w, b = (_shared_randn(f"norm {i}", (h,), dtype, device) for i in "wb")
            return (x, w, 1e-6) if op == "rms_norm" else (x, w, b, 1e-6)
        cands = _alternatives(op, _ours(op, device, auto, make), make, compile_ok)
        if op == "rms_norm" and hasattr(F, "rms_norm"):
            cands["F.rms_norm"] = compare.Candidate(lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps), make)
        nbytes = (2 * m * h + (1 if op == "rms_norm" else 2) * h) * dsize
        yield op, compare.Case(f"{op} {m}x{h} ({where})", 5 * m * h, nbytes, cands, meta=dict(M=m, N=h))


def activation_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """gelu (the merger's fc1 output), quick_gelu (Qwen2-VL's fc1 output), silu_and_mul (the decoder's gate/up
    output at the decode rows and the prefill)."""
    dsize = dtype.itemsize
    for p in sh.vision_presets:
        v = _cfg(p).vision
        if not v.uses_windows:
            yield from _elementwise("quick_gelu", sh.patches, v.mlp_hidden_size, device, dtype, auto, compile_ok,
                                    f"{p} vision fc1")
        yield from _elementwise("gelu", sh.patches // v.merge_unit, v.merger_hidden_size, device, dtype, auto,
                                compile_ok, f"{p} merger fc1")
    for p in sh.llm_presets:
        i = _cfg(p).text.intermediate_size
        for m in (*sh.decode_rows, sh.prefill):
            def make(m=m, i=i):
                return (_randn(m, 2 * i, device=device, dtype=dtype),)
            cands = _alternatives("silu_and_mul", _ours("silu_and_mul", device, auto, make), make, compile_ok)
            yield "silu_and_mul", compare.Case(f"silu_and_mul {m}x2x{i} ({p})", 5 * m * i, 3 * m * i * dsize, cands,
                                               meta=dict(M=m, N=i))


def _elementwise(op, m, n, device, dtype, auto, compile_ok, where):
    def make():
        return (_randn(m, n, device=device, dtype=dtype),)
    cands = _alternatives(op, _ours(op, device, auto, make), make, compile_ok)
    yield op, compare.Case(f"{op} {m}x{n} ({where})", 8 * m * n, 2 * m * n * dtype.itemsize, cands,
                           meta=dict(M=m, N=n))


def _liger_mrope():
    """Liger's fused M-RoPE (section selection + rotation in one kernel), or None where liger-kernel is absent."""
    try:
        from liger_kernel.transformers.qwen2vl_mrope import liger_multimodal_rotary_pos_emb
    except ImportError:
        return None
    return liger_multimodal_rotary_pos_emb


def rotary_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """apply_rotary (q, k of a prefill by the merged M-RoPE tables) and mrope_cos_sin (the tables from 3-row
    positions). Liger's M-RoPE, where installed, races apply_rotary: it takes the per-axis tables and selects the
    sections itself, so it does strictly more per call than ours (which reads tables merged once per forward)."""
    dsize = dtype.itemsize
    liger = _liger_mrope() if device.type == "cuda" else None
    for p in sh.llm_presets:
        t = _cfg(p).text
        hq, hkv, d, L = t.num_attention_heads, t.num_key_value_heads, t.head_dim, sh.prefill

        def make(L=L, hq=hq, hkv=hkv, d=d):
            q, k = _randn(1, L, hq, d, device=device, dtype=dtype), _randn(1, L, hkv, d, device=device, dtype=dtype)
            cos, sin = _randn(1, L, d, device=device, dtype=dtype), _randn(1, L, d, device=device, dtype=dtype)
            return q, k, cos, sin
        cands = _alternatives("apply_rotary", _ours("apply_rotary", device, auto, make), make, compile_ok)
        if liger is not None:
            section = list(t.mrope_section)

            def make_liger(L=L, hq=hq, hkv=hkv, d=d):
                q, k = _randn(1, hq, L, d, device=device, dtype=dtype), _randn(1, hkv, L, d, device=device, dtype=dtype)
                return q, k, _randn(3, 1, L, d, device=device, dtype=dtype), _randn(3, 1, L, d, device=device,
                                                                                   dtype=dtype)
            cands["liger-mrope"] = compare.Candidate(
                lambda q, k, cos, sin, s=section: liger(q, k, cos, sin, s, 1), make_liger)
        nbytes = (4 * L * (hq + hkv) * d + 2 * L * d) * dsize  # q, k read and written; cos, sin read
        yield "apply_rotary", compare.Case(f"apply_rotary 1x{L} {hq}/{hkv}x{d} ({p})", 6 * L * (hq + hkv) * d,
                                           nbytes, cands, meta=dict(L=L, Hq=hq, Hkv=hkv, D=d))

        half = d // 2
        inv_freq = 1.0 / (t.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))

        def make_tables(L=L, inv_freq=inv_freq, section=tuple(t.mrope_section)):
            return torch.randint(0, L, (3, 1, L), device=device), inv_freq, section, dtype
        cands = _alternatives("mrope_cos_sin", _ours("mrope_cos_sin", device, auto, make_tables), make_tables,
                              compile_ok)
        yield "mrope_cos_sin", compare.Case(f"mrope_cos_sin 1x{L} D{d} ({p})", 0, 3 * L * 8 + 2 * L * d * dsize,
                                            cands, meta=dict(L=L, D=d))


def merger_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """The patch merger of each tower (norm, fc1 + GELU, fc2) on one image's patches."""
    dsize = dtype.itemsize
    for p in sh.vision_presets:
        v = _cfg(p).vision
        n, e, mh, out = sh.patches, v.embed_dim, v.merger_hidden_size, v.out_hidden_size
        def make(n=n, e=e, mh=mh, out=out, p=p, windows=v.uses_windows):
            def w(name, *shape, scale=0.02):
                return _shared_randn(f"{p} merger {name}", shape, dtype, device, scale)
            return (_randn(n, e, device=device, dtype=dtype), w("ln_w", e, scale=1.0),
                    None if windows else w("ln_b", e, scale=1.0), w("fc1_w", mh, mh), w("fc1_b", mh),
                    w("fc2_w", out, mh), w("fc2_b", out), 1e-6)
        cands = _alternatives("merger", _ours("merger", device, auto, make), make, compile_ok)
        rows = n // v.merge_unit
        flops = 2 * rows * mh * (mh + out)
        nbytes = (n * e + mh * mh + out * mh + rows * out) * dsize
        yield "merger", compare.Case(f"merger {n}x{e}->{rows}x{out} ({p})", flops, nbytes, cands,
                                     meta=dict(M=rows, N=out, K=mh))


def causal_attention_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """causal_attention (the batched-prefill path; the registry runs its reference, SDPA with GQA): one prompt of
    the prefill length, against each SDPA backend pinned."""
    from bench.bench_llm_kernels import _sdpa_chain
    from bench.bench_vision_kernels import sdpa_backends

    for p in sh.llm_presets:
        t = _cfg(p).text
        hq, hkv, d, L = t.num_attention_heads, t.num_key_value_heads, t.head_dim, sh.prefill
        scale = d ** -0.5

        def make(L=L, hq=hq, hkv=hkv, d=d):
            return (_randn(1, L, hq, d, device=device, dtype=dtype), _randn(1, L, hkv, d, device=device, dtype=dtype),
                    _randn(1, L, hkv, d, device=device, dtype=dtype), None, scale)

        def bhld(make=make):
            q, k, v, _, _ = make()
            return tuple(x.transpose(1, 2) for x in (q, k, v))
        cands = _ours("causal_attention", device, auto, make)
        if device.type == "cuda":
            for name, backend in sdpa_backends().items():
                cands[name] = _sdpa_chain(backend, True, scale, hq // hkv, bhld)
        flops = 4 * hq * d * L * (L + 1) // 2
        nbytes = (2 * L * hq + 2 * L * hkv) * d * dtype.itemsize
        yield "causal_attention", compare.Case(f"causal_attention 1x{L} {hq}/{hkv}x{d} ({p})", flops, nbytes, cands,
                                               meta=dict(L=L, Hq=hq, Hkv=hkv, D=d))


def embedding_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """embedding: the token lookup at the decode rows and the prefill. The table is shared by every rotated copy
    (only the ids are drawn anew): it dwarfs L2 already. Alternative: index_select on the table."""
    dsize = dtype.itemsize
    for p in sh.llm_presets:
        t = _cfg(p).text
        vocab, h = sh.vocab or t.vocab_size, t.hidden_size
        for m in (*sh.decode_rows, sh.prefill):
            def make(m=m, vocab=vocab, h=h, p=p):
                return (torch.randint(0, vocab, (1, m), device=device),
                        _shared_randn(f"{p} embedding", (vocab, h), dtype, device))
            cands = _ours("embedding", device, auto, make)
            cands["index_select"] = compare.Candidate(lambda ids, tab: tab.index_select(0, ids.view(-1)), make)
            yield "embedding", compare.Case(f"embedding 1x{m} of {vocab}x{h} ({p})", 0, 2 * m * h * dsize + 8 * m,
                                            cands, meta=dict(M=m, N=h), memory_bound=True)


def sample_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """sample: temperature, top-k, top-p and repetition penalty over the whole vocabulary (fp32 logits, as the
    engine hands them over). Alternative: the reference under torch.compile."""
    for p in sh.llm_presets[:1]:
        vocab = sh.vocab or _cfg(p).text.vocab_size
        for b in sh.sample_rows:
            def make(b=b, vocab=vocab):
                logits = torch.randn(b, vocab, device=device)
                return (logits, torch.full((b,), 0.7, device=device), torch.full((b,), 50, device=device,
                                                                                dtype=torch.long),
                        torch.full((b,), 0.9, device=device), torch.full((b,), 1.05, device=device),
                        torch.rand(b, vocab, device=device) < 0.01, torch.empty(b, vocab, device=device).exponential_())
            cands = _ours("sample", device, auto, make)
            if compile_ok:
                from qwen2vl_fast.ops import get_op

                cands["torch-compile"] = compare.Candidate(torch.compile(get_op("sample").reference, dynamic=False),
                                                           make)
            yield "sample", compare.Case(f"sample {b}x{vocab}", 0, b * vocab * (4 + 4 + 1) + 8 * b, cands,
                                         meta=dict(B=b, V=vocab))


def step_state_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    """decode_rows / decode_commit: the decode step's bookkeeping (engine/decode_state.py) for every bucket row
    live, greedy over the whole vocabulary (the graph's path for greedy batches). They rewrite the state they
    read (lengths advance, counts grow): harmless to the timing. Alternatives: the references, eager and
    compiled (the ATen kernel chains they replace)."""
    from qwen2vl_fast.ops import step_state as F

    for p in sh.llm_presets[:1]:
        vocab = sh.vocab or _cfg(p).text.vocab_size
        for b in sh.sample_rows:
            def state(b=b):
                ints = torch.zeros(b, F.INT_FIELDS, dtype=torch.long, device=device)
                ints[:, F.LENGTH], ints[:, F.MAX_NEW] = 100, 1 << 40
                return ints, torch.arange(b, device=device), torch.ones(b, dtype=torch.bool, device=device)

            def make_rows(state=state):
                ints, rows, live = state()
                return ints, rows, live, torch.ones(1, dtype=torch.long, device=device)

            cands = _alternatives("decode_rows", _ours("decode_rows", device, auto, make_rows), make_rows, compile_ok)
            yield "decode_rows", compare.Case(f"decode_rows {b}", 0, b * (8 * 4 + 1 + 8 * 3 + 1 + 8), cands,
                                              meta=dict(B=b))

            def make_commit(b=b, vocab=vocab, state=state):
                ints, rows, live = state()
                return (torch.randn(b, vocab, device=device), None, ints,
                        torch.full((b,), 1.05, device=device), torch.rand(b, vocab, device=device) < 0.01,
                        torch.tensor([151643, 151645], device=device), rows, live,
                        torch.empty(b, dtype=torch.long, device=device))

            cands = _alternatives("decode_commit", _ours("decode_commit", device, auto, make_commit), make_commit,
                                  compile_ok)
            yield "decode_commit", compare.Case(f"decode_commit greedy {b}x{vocab}", 0, b * vocab * (4 + 1),
                                                cands, meta=dict(B=b, V=vocab), memory_bound=True)


OP_CASES = (norm_cases, activation_cases, rotary_cases, merger_cases, causal_attention_cases, embedding_cases,
            sample_cases, step_state_cases)


def op_cases(sh: OpShapes, device, dtype, auto, compile_ok):
    for build in OP_CASES:
        yield from build(sh, device, dtype, auto, compile_ok)


# ------------------------------------------------------------------------------------------ the script benchmarks'

def gemm_cases(smoke: bool, device, dtype, auto, compile_ok):
    from bench import bench_gemm as g

    if smoke:
        s = g.SMOKE
        shapes = g.all_shapes(["vision", "llm"], s["vision_presets"], s["llm_presets"], s["grid"], s["llm_ms"],
                              s["prefill_m"], s["vocab"])
    else:
        shapes = g.all_shapes(["vision", "llm"], g.VISION_PRESETS, g.LLM_PRESETS, g.IMAGE_GRID, [1],
                              g.IMAGE_GRID[0] * g.IMAGE_GRID[1] // 4 + g.PREFILL_TEXT)
    for named in shapes:
        case = g.gemm_case(named, dtype, device, auto, compile_ok)
        yield case.meta["op"], case


def _flash_attn_varlen():
    """FlashAttention's varlen kernel (flash_attn.flash_attn_varlen_func), or None where flash-attn is absent."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def with_flash_attn(op: str, case: compare.Case, device) -> compare.Case:
    """FlashAttention's varlen kernel as one more alternative of the packed attention ops (varlen_attention:
    non-causal per segment; prefill_attention: causal, GQA native) on the same packed (q, k, v, meta, scale) as
    ours, where flash-attn is installed (CUDA only)."""
    fa = _flash_attn_varlen() if torch.device(device).type == "cuda" else None
    if fa is None or op not in ("varlen_attention", "prefill_attention"):
        return case
    ours = next(compare._variants(c)[0] for c in case.candidates.values() if compare._variants(c)[0].side != "pytorch")

    def run(q, k, v, meta, scale, causal=op == "prefill_attention"):
        return fa(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen, softmax_scale=scale,
                  causal=causal)
    case.candidates["flash-attn-varlen"] = compare.Candidate(run, ours.make_args)
    return case


def vision_cases(smoke: bool, device, dtype, auto, compile_ok):
    from bench import bench_vision_kernels as v

    vs = v.SMOKE if smoke else v.REAL
    for case in (*v.attention_cases(vs, device, dtype, auto), *v.reference_cases(vs, device, dtype, auto, compile_ok)):
        op = case.label.split()[0]
        yield op, with_flash_attn(op, case, device)


def llm_cases(smoke: bool, device, dtype, auto, compile_ok):
    from bench import bench_llm_kernels as m

    shapes = {"tiny": m.SMOKE_SHAPE} if smoke else dict(m.SHAPES)
    sizes = m.SMOKE if smoke else m.REAL
    for name, s in shapes.items():
        for group in (m.prefill_attention_cases(s, sizes, device, dtype, auto),
                      m.decode_attention_cases(s, sizes, device, dtype, auto),
                      m.rope_decode_attention_cases(s, sizes, device, dtype, auto),
                      m.rope_cases(s, sizes, device, dtype, auto, compile_ok),
                      m.norm_cases(s, sizes, device, dtype, auto, compile_ok)):
            for case in group:
                op = case.label.split()[0]
                case.label, case.meta = f"{name} {case.label}", dict(case.meta, shape=name)
                yield op, with_flash_attn(op, case, device)


def quant_cases(smoke: bool, device, dtype, auto, compile_ok):
    """bench_quant.py's cases: cuBLAS on the dense weight vs every fast quant_linear per bit width. The weights
    of a layer are drawn and quantized on the first call of any of its candidates (`_layer_weights`, one layer
    held at a time), so collecting the cases costs nothing."""
    from bench import bench_quant as q

    qdtype = torch.float16 if smoke else dtype  # the Triton interpreter has no bfloat16
    shapes, ms, group = (["tiny"], [1, 4], 32) if smoke else (["7b", "72b"], [1, 16, 64, 256], 128)
    tables = fast_impls("quant_linear", device)
    for preset in shapes:
        for name, n, k in q.SHAPES[preset]:
            weights = _LazyLayer(preset, name, n, k, group, (4, 8), qdtype, device)
            for m in ms:
                yield "quant_linear", _quant_case(q, preset, name, n, k, m, group, weights, tables, qdtype, device)


class _LazyLayer:
    """The dense and quantized weights of one layer, made on first use (cached: one layer at a time)."""

    def __init__(self, *key):
        self.key = key

    def get(self):
        return _layer_weights(*self.key)


@functools.lru_cache(maxsize=1)
def _layer_weights(preset, name, n, k, group, bits, dtype, device):
    from qwen2vl_fast.quant.quantizer import quantize_rtn

    dense = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    quantized = {}
    for b in bits:
        qw = quantize_rtn(dense.float(), b, group).to(device)
        qw.scales, qw.zeros = qw.scales.to(dtype), qw.zeros.to(dtype)
        quantized[b] = qw
    return dense, quantized


def _quant_case(q, preset, name, n, k, m, group, weights: _LazyLayer, tables, dtype, device) -> compare.Case:
    dsize = dtype.itemsize
    act_bytes = (m * k + m * n) * dsize

    def make_dense():
        return torch.randn(m, k, device=device, dtype=dtype), weights.get()[0].clone()
    cands = {"cublas-dense": compare.Candidate(F.linear, make_dense)}
    for bits in (4, 8):
        weight_bytes = n * k * bits / 8 + 2 * n * (k // group) * dsize  # packed words + scales + zeros

        def make_q(bits=bits):
            return torch.randn(m, k, device=device, dtype=dtype), q._fresh_copy(weights.get()[1][bits])
        for impl, fn in tables.items():
            cands[f"{impl}-int{bits}"] = compare.Candidate(fn, make_q, "ours", nbytes=weight_bytes + act_bytes)
    return compare.Case(f"{preset} {name} M={m}", 2 * m * n * k, n * k * dsize + act_bytes, cands,
                        meta=dict(preset=preset, layer=name, M=m, N=n, K=k))


SUITE_BUILDERS: dict[str, Callable] = {
    "gemm": gemm_cases, "vision": vision_cases, "llm": llm_cases, "quant": quant_cases,
    "ops": lambda smoke, device, dtype, auto, compile_ok: op_cases(SMOKE_SHAPES if smoke else REAL_SHAPES, device,
                                                                   dtype, auto, compile_ok),
}


def collect(device, dtype_name: str, smoke: bool, suites=SUITES, auto=None, compile_ok: bool | None = None) -> list:
    """Every Spec of `suites` on `device` in `dtype_name`. `auto`: the measured-dispatch table (None: no "auto"
    candidate); compile_ok (default: on CUDA) adds the torch.compile alternatives."""
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    compile_ok = device.type == "cuda" if compile_ok is None else compile_ok
    specs = []
    for suite in suites:
        for op, case in SUITE_BUILDERS[suite](smoke, device, dtype, auto, compile_ok):
            specs.append(Spec(suite, op, case.label, "float16" if suite == "quant" and smoke else dtype_name, case,
                              list(case.candidates)))
    return specs
