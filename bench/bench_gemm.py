"""Every GEMM the models run, at their real shapes: our Triton GEMM vs cuBLAS, torch.compile and the dispatch.

Cases (weights (N, K) as nn.Linear stores them; M rows of activations), from the presets' configs:
- vision, M = the 6144 patches of one 1344x896 image (grid 1x64x96) and its 1536 merged tokens:
  Qwen2-VL (2B preset): qkv 1280->3840, proj 1280->1280, fc1+QuickGELU 1280->5120, fc2 5120->1280,
  merger fc1+GELU 5120->5120, merger fc2 5120->1536; Qwen2.5-VL (3B preset): gate/up+SwiGLU 1280->2x3420,
  down 3420->1280, merger fc2 5120->2048 (its qkv, proj and merger fc1 are Qwen2-VL's shapes: timed once).
- LLM decode, M = 1 (`--llm-ms`), for 2B, 3B and 7B: fused qkv (with bias), o_proj, gate/up+SwiGLU, down.
- lm_head at M = 1 and at the prefill M (`--prefill-m`, default 1600: the image's 1536 tokens + 64 text tokens).
Candidates: ours-triton (kernels/gemm.py `linear` / `linear_act` / `linear_swiglu` through the op registry),
ours-splitk and ours-splitk-2pass (M <= 16, plain and SwiGLU: kernels/gemv_splitk.py, the split-K decode GEMV with its
reduction in the launch or in a second kernel, both raced by `auto`; at M = 1 ours-splitk-mma, its tensor-core tile),
auto (`resolve("auto")`: the runtime's measured dispatch, by construction the faster of its candidates; its
first call measures them, outside the timing), torch-eager (the op's reference: cuBLAS `F.linear` with its bias
epilogue, plus the separate activation where ours fuses one) and torch-compile (that reference compiled, for the
fused-epilogue cases only: for a plain linear it is the same cuBLAS call).
Timing (bench/compare.py): one method for every candidate of a case (CUDA-graph replays, else a pre-filled
queue), inputs rotated past 2x L2 for the memory-bound cases (intensity under the measured ridge: every M = 1
case). Reported per candidate: median / p20 / p80 ms, TFLOP/s and GB/s, % of the measured roofline, speedup over
the best PyTorch alternative; per case the speedup of the best of ours and of auto. JSON: "gemm" (written case
by case, so a timeout keeps the finished cases).

    python bench/bench_gemm.py [--dtype bfloat16] [--reps 30] [--llm-presets qwen2-vl-2b qwen2.5-vl-3b qwen2-vl-7b]
        [--llm-ms 1] [--prefill-m 1600] [--groups vision llm] [--no-compile]
CPU smoke (tiny shapes, float32; ours only under TRITON_INTERPRET=1; numbers say nothing about speed):
    TRITON_INTERPRET=1 python bench/bench_gemm.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

if __package__ in (None, ""):
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    import bench  # noqa: F401
    import qwen2vl_fast  # noqa: F401
    sys.path.remove(_ROOT)

from bench import compare, harness, results, roofline
from bench.harness import fast_impls
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.ops import get_op
from qwen2vl_fast.presets import preset_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMAGE_GRID = (64, 96)  # 1344x896 pixels / 14
PREFILL_TEXT = 64
VISION_PRESETS = ("qwen2-vl-2b", "qwen2.5-vl-3b")
LLM_PRESETS = ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2-vl-7b")
SMOKE = dict(vision_presets=("tiny-qwen2-vl", "tiny-qwen2.5-vl"), llm_presets=("tiny-qwen2-vl",), grid=(4, 6),
             llm_ms=[1], prefill_m=14, vocab=512)
OP_OF_ACT = {"none": "linear", "quick_gelu": "linear_act", "gelu": "linear_act", "swiglu": "linear_swiglu"}


@dataclass(frozen=True)
class GemmShape:
    """y = act(x @ w.T + b): x (M, K), w (N, K); SwiGLU stacks [gate; up] so N = 2I and y is (M, I)."""

    m: int
    n: int
    k: int
    act: str = "none"
    bias: bool = False
    mlp_role: str = ""  # "up" (N is the MLP width, x2 for SwiGLU) or "down" (K is): what the runtime may pad
    mlp_width: int = 0

    @property
    def op(self) -> str:
        return OP_OF_ACT[self.act]

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.act == "swiglu" else self.n

    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def nbytes(self, dsize: int) -> int:
        """The fewest bytes: x and w read once, y written once, the bias read once."""
        return (self.m * self.k + self.n * self.k + self.m * self.n_out + (self.n if self.bias else 0)) * dsize

    def text(self) -> str:
        epi = "" if self.act == "none" else f"+{self.act}"
        return f"M{self.m} N{self.n} K{self.k}{epi}{' bias' if self.bias else ''}"


def runtime_shape(s: GemmShape) -> GemmShape:
    """The shape the runtime's weights have: MLP widths zero-padded to its alignment where `qwen2vl_fast.load`
    pads them (qwen2vl_fast.align; Qwen2.5-VL's vision 3420 -> 3456). Ours and auto run that shape, the PyTorch
    alternatives the checkpoint's; FLOPs and bytes count the checkpoint's (the useful work)."""
    from qwen2vl_fast.align import aligned_width

    if not s.mlp_role:
        return s
    width = aligned_width(s.mlp_width)
    if width == s.mlp_width:
        return s
    if s.mlp_role == "up":
        return replace(s, n=width * (2 if s.act == "swiglu" else 1), mlp_width=width)
    return replace(s, k=width, mlp_width=width)


@dataclass
class NamedShape:
    shape: GemmShape
    names: list = field(default_factory=list)  # "qwen2-vl-2b vision proj", ... (one shape, several layers)


def vision_shapes(preset: str, grid=IMAGE_GRID) -> dict:
    """{layer: GemmShape} of one ViT block and the merger for an image of `grid` patches."""
    v = parse_config(preset_config(preset)).vision
    e, i, patches = v.embed_dim, v.mlp_hidden_size, grid[0] * grid[1]
    merged, mh = patches // v.merge_unit, v.merger_hidden_size
    out = {"qkv": GemmShape(patches, 3 * e, e, bias=True), "proj": GemmShape(patches, e, e, bias=True)}
    up, down = dict(mlp_role="up", mlp_width=i), dict(mlp_role="down", mlp_width=i)
    if v.uses_windows:  # Qwen2.5-VL: SwiGLU MLP with biases
        out.update(gate_up=GemmShape(patches, 2 * i, e, "swiglu", True, **up),
                   down=GemmShape(patches, e, i, bias=True, **down))
    else:
        out.update(fc1=GemmShape(patches, i, e, "quick_gelu", True, **up),
                   fc2=GemmShape(patches, e, i, bias=True, **down))
    out.update(merger_fc1=GemmShape(merged, mh, mh, "gelu", True),
               merger_fc2=GemmShape(merged, v.out_hidden_size, mh, bias=True))
    return out


def llm_shapes(preset: str, ms, prefill_m: int, vocab=None) -> dict:
    """{layer: GemmShape} of one decoder layer at each M in `ms`, and lm_head at M = 1 and `prefill_m`."""
    t = parse_config(preset_config(preset)).text
    h, d = t.hidden_size, t.head_dim
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * d
    out = {}
    i = t.intermediate_size
    for m in ms:
        out.update({f"qkv M{m}": GemmShape(m, qkv, h, bias=True),
                    f"o_proj M{m}": GemmShape(m, h, t.num_attention_heads * d),
                    f"gate_up M{m}": GemmShape(m, 2 * i, h, "swiglu", mlp_role="up", mlp_width=i),
                    f"down M{m}": GemmShape(m, h, i, mlp_role="down", mlp_width=i)})
    for m in sorted({1, prefill_m}):
        out[f"lm_head M{m}"] = GemmShape(m, vocab or t.vocab_size, h)
    return out


def all_shapes(groups, vision_presets, llm_presets, grid, llm_ms, prefill_m, vocab=None) -> list[NamedShape]:
    """Every distinct shape, in order, with the layers that share it."""
    found: dict[GemmShape, NamedShape] = {}

    def add(name, shape):
        found.setdefault(shape, NamedShape(shape)).names.append(name)
    if "vision" in groups:
        for p in vision_presets:
            for layer, s in vision_shapes(p, grid).items():
                add(f"{p} vision {layer}", s)
    if "llm" in groups:
        for p in llm_presets:
            for layer, s in llm_shapes(p, llm_ms, prefill_m, vocab).items():
                add(f"{p} {layer.split(' M')[0]}", s)
    return list(found.values())


def _make_args(s: GemmShape, dtype, device):
    """Fresh random (x, w, b[, act]) for one call of shape `s` (never zeros: METHOD.md)."""
    extra = () if s.act in ("none", "swiglu") else (s.act,)

    def make():
        x = torch.randn(s.m, s.k, device=device, dtype=dtype)
        w = torch.randn(s.n, s.k, device=device, dtype=dtype) * 0.02
        b = torch.randn(s.n, device=device, dtype=dtype) * 0.02 if s.bias else None
        return (x, w, b, *extra)
    return make


def gemm_case(named: NamedShape, dtype, device, auto, compile_ok: bool) -> compare.Case:
    s = named.shape
    ours_shape = runtime_shape(s)
    make, make_ours = _make_args(s, dtype, device), _make_args(ours_shape, dtype, device)
    tag = "" if ours_shape == s else f"padded {s.mlp_width}->{ours_shape.mlp_width}"
    ref = get_op(s.op).reference
    cands = {name: compare.Candidate(fn, make_ours, "ours", tag) for name, fn in fast_impls(s.op, device).items()}
    cands.update(splitk_candidates(ours_shape, dtype, device, make_ours, tag))
    if auto is not None:
        cands["auto"] = compare.Candidate(getattr(auto, s.op), make_ours, "auto", tag)
    cands["torch-eager"] = compare.Candidate(ref, make)
    if compile_ok and s.act != "none":
        cands["torch-compile"] = compare.Candidate(torch.compile(ref, dynamic=False), make)
    dsize = torch.empty((), dtype=dtype).element_size()
    where = named.names[0] + (f" (+{len(named.names) - 1})" if len(named.names) > 1 else "")
    return compare.Case(f"{where}: {s.op} {s.text()}", s.flops(), s.nbytes(dsize), cands,
                        meta=dict(op=s.op, M=s.m, N=s.n, K=s.k, act=s.act, bias=s.bias, layers=named.names,
                                  runtime_N=ours_shape.n, runtime_K=ours_shape.k))


def splitk_candidates(s: GemmShape, dtype, device, make, tag="", interpreted: bool = False) -> dict:
    """The split-K decode GEMV (kernels/gemv_splitk.py) at M <= 16: "ours-splitk" and "ours-splitk-2pass" are the
    candidates `auto` races (the op's "triton-splitk" variants: reduced in the launch, or by a second kernel); at
    M = 1 "ours-splitk-mma" its
    tensor-core tile in place of the CUDA-core GEMV: the alternatives a GPU run compares for tuning. On CUDA (where
    `auto` races it), or under the interpreter with `interpreted` (tests)."""
    from qwen2vl_fast.ops.registry import triton_auto_on, triton_runs_on

    if s.m > 16 or s.act not in ("none", "swiglu") or not (triton_auto_on(device) or
                                                         (interpreted and triton_runs_on(device))):
        return {}
    from qwen2vl_fast.kernels import gemv_splitk as gs

    variants = get_op(s.op).variants
    out = {"ours-splitk": compare.Candidate(variants["triton-splitk"][0], make, "ours", tag),
           "ours-splitk-2pass": compare.Candidate(variants["triton-splitk-2pass"][0], make, "ours", tag)}
    if s.m == 1:
        mma = gs.pick_config(2, s.n_out, s.k, dtype, s.act)  # the 16-row tensor-core tile and its plan

        def on_mma(x, w, b):
            return gs.gemv_splitk(x, w, b, s.act, mma)
        out["ours-splitk-mma"] = compare.Candidate(on_mma, make, "ours", tag)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bfloat16 (float32 with --smoke)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--groups", nargs="+", default=["vision", "llm"], choices=["vision", "llm"])
    p.add_argument("--vision-presets", nargs="+", default=list(VISION_PRESETS))
    p.add_argument("--llm-presets", nargs="+", default=list(LLM_PRESETS))
    p.add_argument("--llm-ms", nargs="+", type=int, default=[1], help="M of the decoder-layer linears")
    p.add_argument("--prefill-m", type=int, default=IMAGE_GRID[0] * IMAGE_GRID[1] // 4 + PREFILL_TEXT)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-auto", action="store_true", help="leave out the measured-dispatch candidate")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the script, not of speed)")
    p.add_argument("--l2-bytes", type=int, default=None, help="rotation target / 2 (default: the device's L2)")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.smoke:
        args.vision_presets, args.llm_presets = list(SMOKE["vision_presets"]), list(SMOKE["llm_presets"])
        args.llm_ms, args.prefill_m = SMOKE["llm_ms"], SMOKE["prefill_m"]
        args.dtype = args.dtype or "float32"
    args.dtype = args.dtype or "bfloat16"
    return args


def goals(summaries: list) -> dict:
    """The issue's bar: every op >= 1.0x the best PyTorch alternative (auto is what the runtime runs)."""
    below = [s["kernel"] for s in summaries if s.get("speedup_auto") is not None and s["speedup_auto"] < 1.0]
    measured = [s for s in summaries if s.get("speedup_auto") is not None]
    return dict(auto_ge_1x_every_case=(not below) if measured else None, auto_below_1x=below,
                cases_measured=len(measured))


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    compare.allow_recompiles(256)
    cuda = device.type == "cuda"
    ceilings = roofline.device_ceilings(device, dtype)
    l2 = args.l2_bytes or harness.l2_cache_bytes(device)
    grid = SMOKE["grid"] if args.smoke else IMAGE_GRID
    shapes = all_shapes(args.groups, args.vision_presets, args.llm_presets, grid, args.llm_ms, args.prefill_m,
                        SMOKE["vocab"] if args.smoke else None)
    auto = None if args.no_auto else compare.auto_table(device)
    compile_ok = cuda and not args.no_compile  # on the CPU inductor would build C++ for minutes: nothing to learn
    out = results.ResultFile("gemm", args.out_dir)
    payload = dict(dtype=args.dtype, device=str(device), cpu_smoke=not cuda, smoke_shapes=args.smoke,
                   image_grid=list(grid), prefill_m=args.prefill_m, llm_ms=args.llm_ms, reps=args.reps,
                   ceilings=ceilings, l2_bytes=l2, cases=[], rows=[], goals={})
    if not cuda:
        print("CPU run: a smoke test of the script; its times say nothing about GPU speed")
    if not any(fast_impls("linear", device)):
        print("note: no fast GEMM runs here (on the CPU set TRITON_INTERPRET=1 for the Triton interpreter)")

    keep_report = compare.record_dispatch(payload, auto)

    def after_case(case, rows, summary):
        payload["goals"] = goals(payload["cases"] + [summary])
        keep_report(case, rows, summary)

    cases = (gemm_case(named, dtype, device, auto, compile_ok) for named in shapes)
    compare.run_cases(cases, ceilings, out, payload, device=device, warmup=args.warmup, rep=args.reps, l2_bytes=l2,
                      on_case=after_case)
    path = out.finish(payload)
    print_summary(payload, path)
    return 0


def _cell(value, fmt: str, width: int) -> str:
    return format(value, f">{width}{fmt}") if value is not None else f"{'-':>{width}}"


def print_summary(p: dict, path) -> None:
    c = p["ceilings"]
    print(f"\ngemm  {p['dtype']}  {p['device']} ({results.gpu_name()})  ceilings {c['tflops']:.4g} TFLOP/s "
          f"{c['gbps']:.4g} GB/s{'  [CPU smoke]' if p['cpu_smoke'] else ''}")
    print(f"{'case':72s} {'best pytorch':>13s} {'ms':>9s} {'best ours':>12s} {'ms':>9s} {'x ours':>7s} "
          f"{'x auto':>7s} {'% roof':>7s}")
    for s in p["cases"]:
        print(f"{s['kernel']:72s} {_cell(s['best_pytorch'], 's', 13)} {_cell(s['best_pytorch_ms'], '.4f', 9)} "
              f"{_cell(s['best_ours'], 's', 12)} {_cell(s['best_ours_ms'], '.4f', 9)} "
              f"{_cell(s.get('speedup_best_ours'), '.2f', 7)} {_cell(s.get('speedup_auto'), '.2f', 7)} "
              f"{roofline.format_pct(s.get('pct_of_roofline_best_ours'), 7)}")
    if p.get("ceiling_under_measured"):
        print(f"{len(p['ceiling_under_measured'])} figures above a measured ceiling ({roofline.CEILING_UNDER_MEASURED}"
              f": bandwidth methods {p['ceilings'].get('gbps_methods')})")
    print(f"goals: {p['goals']}")
    print(f"result: {path}")


if __name__ == "__main__":
    sys.exit(main())
