"""Every reference attention runs in memory linear in the sequence (issue 11, item 1).

Each long case runs in a fresh subprocess, one thread, and measures the growth of the peak resident set
(`ru_maxrss`) across the op call, inputs already allocated and SDPA warmed up. Bound: PEAK_BOUND_MB = 200 MB.
The previous versions went far over it where they were quadratic: prefill with 3-D SDPA inputs grew 5.5 GB
at 12k tokens (16 s), the padded causal forward with a dense (B, 1, L, L) mask 0.7 GB at 2 x 8000; the fixed
ones grow under 50 MB (varlen and decode were already linear: 20 MB and 49 MB, the latter the cache gather).
The small cases check the new code against the previous implementation, kept here verbatim.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from qwen2vl_fast.ops import attention as attention_ops
from qwen2vl_fast.ops.attention import VarlenMeta, causal_attention, varlen_attention
from qwen2vl_fast.ops.decoding import decode_attention, prefill_attention

PEAK_BOUND_MB = 200

# The tiny model's LLM heads (tiny-qwen2-vl: 4 query heads over 2 kv heads, head_dim 16) and vision heads.
_SETUP = {
    "prefill": """
        from qwen2vl_fast.ops.decoding import prefill_attention as op
        from qwen2vl_fast.ops.attention import VarlenMeta
        T = 12000
        q, k, v = torch.randn(T, 4, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16)
        args = (q, k, v, VarlenMeta.from_lengths([T], "cpu"), 0.25)
        warm = (q[:64], k[:64], v[:64], VarlenMeta.from_lengths([64], "cpu"), 0.25)
    """,
    "causal": """
        from qwen2vl_fast.ops.attention import causal_attention as op
        L = 12000
        q, k, v = torch.randn(1, L, 4, 16), torch.randn(1, L, 2, 16), torch.randn(1, L, 2, 16)
        args = (q, k, v, None, 0.25)
        warm = (q[:, :64], k[:, :64], v[:, :64], None, 0.25)
    """,
    "causal_padded": """
        from qwen2vl_fast.ops.attention import causal_attention as op
        B, L = 2, 8000
        q, k, v = torch.randn(B, L, 4, 16), torch.randn(B, L, 2, 16), torch.randn(B, L, 2, 16)
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, :1000] = False  # left padding
        args = (q, k, v, mask, 0.25)
        warm = (q[:, :64], k[:, :64], v[:, :64], mask[:, -64:], 0.25)
    """,
    "varlen": """
        from qwen2vl_fast.ops.attention import varlen_attention as op
        from qwen2vl_fast.ops.attention import VarlenMeta
        S = 16000  # one large image: a single full-attention segment
        q, k, v = torch.randn(S, 4, 16), torch.randn(S, 4, 16), torch.randn(S, 4, 16)
        args = (q, k, v, VarlenMeta.from_lengths([S], "cpu"), 0.25)
        warm = (q[:64], k[:64], v[:64], VarlenMeta.from_lengths([64], "cpu"), 0.25)
    """,
    "decode": """
        from qwen2vl_fast.ops.decoding import decode_attention as op
        B, L = 2, 80000
        kc, vc = torch.randn(B, L, 2, 16), torch.randn(B, L, 2, 16)
        q, slots, lengths = torch.randn(B, 4, 16), torch.arange(B), torch.tensor([L, L // 2])
        args = (q, kc, vc, slots, lengths, 0.25)
        warm = (q, kc[:, :64], vc[:, :64], slots, torch.tensor([64, 32]), 0.25)
    """,
}

_MEASURE = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
{setup}
scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
op(*warm)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
t0 = time.perf_counter()
out = op(*args)
seconds = time.perf_counter() - t0
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale - before
print(json.dumps(dict(peak_mb=grown, seconds=seconds, finite=bool(torch.isfinite(out).all()))))
"""


def _measure(case: str) -> dict:
    code = _MEASURE.format(setup=textwrap.dedent(_SETUP[case]))
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(_SETUP))
def test_peak_memory_is_linear(case):
    got = _measure(case)
    assert got["finite"]
    assert got["peak_mb"] < PEAK_BOUND_MB, f"{case}: peak RSS grew {got['peak_mb']:.0f} MB (bound {PEAK_BOUND_MB})"


# ------------------------------------------------------------ the previous implementations, for parity
def _previous_prefill(q, k, v, meta, scale):
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    start = 0
    for n in meta.lengths:
        sl = slice(start, start + n)
        qs = q[sl].transpose(0, 1)
        ks = k[sl].transpose(0, 1).repeat_interleave(rep, dim=0)
        vs = v[sl].transpose(0, 1).repeat_interleave(rep, dim=0)
        out[sl] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
        start += n
    return out


def _previous_causal(q, k, v, key_padding_mask, scale):
    _, L, hq, _ = q.shape
    rep = hq // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    if key_padding_mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = causal[None] & key_padding_mask[:, None, :].bool()
        mask = mask | torch.eye(L, dtype=torch.bool, device=q.device)[None]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 6), (12, 2)])
def test_prefill_matches_previous(hq, hkv):
    torch.manual_seed(0)
    meta = VarlenMeta.from_lengths([1, 37, 130, 5], "cpu")
    T = sum(meta.lengths)
    q, k, v = torch.randn(T, hq, 16), torch.randn(T, hkv, 16), torch.randn(T, hkv, 16)
    _close(prefill_attention(q, k, v, meta, 0.3), _previous_prefill(q, k, v, meta, 0.3))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)])
def test_causal_matches_previous(monkeypatch, padded, hq, hkv):
    torch.manual_seed(0)
    monkeypatch.setattr(attention_ops, "MASK_BLOCK_ELEMENTS", 1)  # the smallest query block (64 rows): 4 blocks
    b, L = 3, 201
    q, k, v = torch.randn(b, L, hq, 16), torch.randn(b, L, hkv, 16), torch.randn(b, L, hkv, 16)
    mask = None
    if padded:
        mask = torch.ones(b, L, dtype=torch.bool)
        mask[1, :70] = False
        mask[2, :200] = False  # a row with a single real token
    _close(causal_attention(q, k, v, mask, 0.25), _previous_causal(q, k, v, mask, 0.25))


def test_varlen_and_decode_unchanged_numerics():
    """varlen and decode were already linear; pin them to a dense per-segment / per-row softmax."""
    torch.manual_seed(0)
    meta = VarlenMeta.from_lengths([64, 64, 17, 200], "cpu")
    S = sum(meta.lengths)
    q, k, v = torch.randn(S, 4, 16), torch.randn(S, 4, 16), torch.randn(S, 4, 16)
    got, start = varlen_attention(q, k, v, meta, 0.25), 0
    for n in meta.lengths:
        sl = slice(start, start + n)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[sl], k[sl]) * 0.25, dim=-1)
        _close(got[sl], torch.einsum("hqk,khd->qhd", p, v[sl]))
        start += n
    kc, vc = torch.randn(3, 50, 2, 16), torch.randn(3, 50, 2, 16)
    qd, slots, lengths = torch.randn(2, 4, 16), torch.tensor([2, 0]), torch.tensor([50, 7])
    got = decode_attention(qd, kc, vc, slots, lengths, 0.25)
    for i in range(2):
        kk = kc[slots[i], :lengths[i]].repeat_interleave(2, dim=1)
        vv = vc[slots[i], :lengths[i]].repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,khd->hk", qd[i], kk) * 0.25, dim=-1)
        _close(got[i], torch.einsum("hk,khd->hd", p, vv))


@pytest.mark.parametrize("lengths", [[96], [32, 32, 32], [40, 56], []])
def test_varlen_one_full_run_returns_sdpa_output_without_a_copy(lengths):
    """A sequence that is one segment (or one run of equal segments) is one SDPA call whose (B, L, H, D) output is
    returned as a view: no copy into a separate output (per ViT layer at 1344x896 that copy is a 16 MB round trip).
    Mixed lengths still fill one output; the values equal a dense per-segment softmax either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    torch.manual_seed(1)
    meta = VarlenMeta.from_lengths(lengths, "cpu")
    S = sum(lengths)
    q, k, v = torch.randn(S, 4, 16), torch.randn(S, 4, 16), torch.randn(S, 4, 16)
    with Ops() as rec:
        got = varlen_attention(q, k, v, meta, 0.25)
    assert got.shape == (S, 4, 16) and got.is_contiguous()
    copies = [n for n in rec.names if n.split("::")[-1].split(".")[0] in ("copy_", "index_copy_", "clone", "_to_copy")]
    assert (not copies) == (len(set(lengths)) <= 1), rec.names
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[sl], k[sl]) * 0.25, dim=-1)
        _close(got[sl], torch.einsum("hqk,khd->qhd", p, v[sl]))
        start += n
