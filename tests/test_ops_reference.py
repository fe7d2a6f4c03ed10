"""The PyTorch references in qwen2vl_fast.ops against transformers' own modules and functions (or a float64
hand reference where transformers has no standalone function), on fresh random inputs in odd shapes and the
real model shapes, in float32 and, where the device supports it, float16/bfloat16 (transformers run in the same
dtype). Where the reference performs the same arithmetic as transformers, the results must be bit-identical.
Then the op registry: listing, resolution, the backend environment override and its refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.activations import QuickGELUActivation
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf
from helpers_attention import varlen_f64

from qwen2vl_fast import ops
from qwen2vl_fast.errors import BackendError, Qwen2VLFastError
from qwen2vl_fast.ops import BACKEND_ENV, VarlenMeta, get_op
from qwen2vl_fast.presets import preset_config

V4_ONLY = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5, reason="compares with transformers 4 internals; transformers 5 renamed them (end-to-end parity covers it)")

# dtype, tolerance for "the same computation, possibly in another order" (vs transformers in that dtype).
DTYPES = [
    pytest.param(torch.float32, dict(atol=1e-6, rtol=1e-5), id="fp32"),
    pytest.param(torch.float16, dict(atol=1e-3, rtol=1e-3), id="fp16"),
    pytest.param(torch.bfloat16, dict(atol=1e-2, rtol=1.6e-2), id="bf16"),
]
# Tolerances against a float64 reference computed from the same (rounded) inputs: attention, GEMMs.
F64_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def ref(name):
    return get_op(name).reference


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def check(actual, expected, *, exact=False, **tol):
    """Same shape and dtype, no NaN/inf, and equal (bitwise when `exact`) or close."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    if exact:
        assert torch.equal(actual, expected), f"max diff {(actual.double() - expected.double()).abs().max()}"
    else:
        torch.testing.assert_close(actual, expected, **tol)


# ---------------------------------------------------------------------------------------------- norms
NORM_SHAPES = [(37, 1280), (2, 5, 3584), (3, 7, 33), (1, 1, 64)]


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_layer_norm(device, shape, dtype, tol):
    d = shape[-1]
    ln = torch.nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(d)), ln.bias.copy_(torch.randn(d))
    ln = ln.to(device=device, dtype=dtype)
    x = randn(*shape, dtype=dtype, device=device, scale=3.0) + 1.5
    with torch.no_grad():
        check(ref("layer_norm")(x, ln.weight, ln.bias, 1e-6), ln(x), **tol)


@V4_ONLY
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_rms_norm_bit_identical_to_qwen2_rmsnorm(device, shape, dtype, tol):
    d = shape[-1]
    norm = hf.Qwen2RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) * 2)
    norm = norm.to(device=device, dtype=dtype)
    x = randn(*shape, dtype=dtype, device=device, scale=4.0)
    with torch.no_grad():
        check(ref("rms_norm")(x, norm.weight, 1e-6), norm(x), exact=True)


@V4_ONLY
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_add_rms_norm(device, dtype, tol):
    x, res = randn(5, 33, dtype=dtype, device=device), randn(5, 33, dtype=dtype, device=device, scale=10)
    w, eps = randn(33, dtype=dtype, device=device), 1e-6
    out, new_res = ref("add_rms_norm")(x, res, w, eps)
    check(new_res, x + res, exact=True)
    check(out, ref("rms_norm")(x + res, w, eps), exact=True)
    norm = hf.Qwen2RMSNorm(33, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        check(out, norm(res + x), exact=True)


# ------------------------------------------------------------------------------------------ activations
ACT_SHAPES = [(37, 5120), (3, 5, 17), (1,)]


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("name, module", [("quick_gelu", QuickGELUActivation()), ("gelu", torch.nn.GELU()),
                                          ("quick_gelu", transformers.activations.ACT2FN["quick_gelu"])],
                         ids=["quick_gelu", "gelu", "quick_gelu-ACT2FN"])
def test_activation(device, shape, dtype, tol, name, module):
    x = randn(*shape, dtype=dtype, device=device, scale=4.0)
    check(ref(name)(x), module(x), exact=True)


@pytest.mark.parametrize("rows, inter", [((37,), 3420), ((2, 5), 17), ((1,), 1)])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_silu_and_mul(device, rows, inter, dtype, tol):
    gate, up = randn(*rows, inter, dtype=dtype, device=device, scale=4), randn(*rows, inter, dtype=dtype, device=device)
    fused = torch.cat([gate, up], dim=-1)
    silu = transformers.activations.ACT2FN["silu"]
    # Not bitwise: silu on a strided half of the fused row may take another vectorised path than on `gate`.
    check(ref("silu_and_mul")(fused), silu(gate) * up, **tol)


# ----------------------------------------------------------------------------------------- vision rotary
def hf_vision_cos_sin(grid_thw, head_dim, merge, device):
    """cos/sin exactly as Qwen2VisionTransformerPretrainedModel.forward builds them (rot_pos_emb path)."""
    owner = SimpleNamespace(spatial_merge_size=merge, rotary_pos_emb=hf.VisionRotaryEmbedding(head_dim // 2))
    rpe = hf.Qwen2VisionTransformerPretrainedModel.rot_pos_emb(owner, torch.tensor(grid_thw))
    emb = torch.cat((rpe, rpe), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


@V4_ONLY
@pytest.mark.parametrize("grid, merge", [([[1, 3, 5]], 1), ([[1, 4, 6]], 2), ([[2, 4, 4], [1, 2, 6]], 2)],
                         ids=["3x5-odd", "4x6", "video+image"])
@pytest.mark.parametrize("heads, head_dim", [(16, 80), (3, 12)])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_vision_rotary_matches_transformers(device, grid, merge, heads, head_dim, dtype, tol):
    cos, sin = hf_vision_cos_sin(grid, head_dim, merge, device)
    s = cos.shape[0]
    assert s == sum(t * h * w for t, h, w in grid)
    qkv = randn(s, 3 * heads * head_dim, dtype=dtype, device=device, scale=2)
    # As VisionAttention does: reshape (S, 3, H, D), then per-tensor (S, H, D).
    q_hf, k_hf, v_hf = qkv.reshape(s, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q_hf, k_hf = hf.apply_rotary_pos_emb_vision(q_hf, k_hf, cos, sin)
    q, k, v = ref("vision_rotary")(qkv, cos, sin, heads)
    check(q, q_hf, exact=True)
    check(k, k_hf, exact=True)
    check(v, v_hf, exact=True)


# ------------------------------------------------------------------------------------------------ M-RoPE
def random_position_ids(b, length, device):
    """(3, B, L): a text run (all three rows equal), an image block (T fixed, H/W grid), then text again."""
    pos = torch.randint(0, 5000, (3, b, length))
    pos[:, :, :5] = torch.arange(5)  # text: identical rows
    pos[0, 1, 5:20] = 5  # image: one T, varying H and W
    return pos.to(device)


@V4_ONLY
@pytest.mark.parametrize("preset", ["qwen2-vl-7b", "tiny-qwen2-vl", "qwen2.5-vl-3b"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_mrope_matches_transformers(device, preset, dtype, tol):
    text_cfg = transformers.AutoConfig.for_model(**preset_config(preset)).text_config
    section = text_cfg.rope_scaling["mrope_section"]
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(section) * 2 == head_dim
    rotary = hf.Qwen2VLRotaryEmbedding(text_cfg, device=device)
    b, length, hq, hkv = 2, 37, text_cfg.num_attention_heads, text_cfg.num_key_value_heads
    position_ids = random_position_ids(b, length, device)
    q, k = randn(b, hq, length, head_dim, dtype=dtype, device=device), randn(b, hkv, length, head_dim, dtype=dtype,
                                                                             device=device)

    cos_hf, sin_hf = rotary(q, position_ids)  # (3, B, L, D) in q's dtype
    q_hf, k_hf = hf.apply_multimodal_rotary_pos_emb(q, k, cos_hf, sin_hf, section)

    cos, sin = ref("mrope_cos_sin")(position_ids, rotary.inv_freq, section, dtype)
    pick = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(section * 2, dim=-1))], dim=-1)  # noqa: E731
    check(cos, pick(cos_hf), exact=True)
    check(sin, pick(sin_hf), exact=True)
    q_r, k_r = ref("apply_rotary")(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # ours: (B, L, H, D)
    check(q_r.transpose(1, 2), q_hf, exact=True)
    check(k_r.transpose(1, 2), k_hf, exact=True)


def test_mrope_cos_sin_rejects_bad_section():
    with pytest.raises(ValueError, match="mrope_section"):
        ref("mrope_cos_sin")(torch.zeros(3, 1, 2, dtype=torch.long), torch.ones(8), [2, 3, 4], torch.float32)


# --------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("lengths, heads, head_dim", [
    ([64] * 5 + [17, 3, 64, 1], 16, 80),   # Qwen2.5-VL windows incl. a partial and a one-token window
    ([480], 16, 80),                       # one long frame
    ([64] * 4 + [17, 5], 4, 64),           # a contiguous run of equal windows (views, no gather), then others
    ([5, 1, 7, 7, 2, 0, 9], 3, 36),        # odd dims; a zero-length segment is dropped
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_varlen_attention(device, lengths, heads, head_dim, dtype):
    s = sum(lengths)
    meta = VarlenMeta.from_lengths(lengths, device)
    assert meta.lengths == tuple(n for n in lengths if n) and meta.max_seqlen == max(lengths)
    assert meta.cu_seqlens.dtype == torch.int32 and meta.cu_seqlens.tolist() == [0] + list(
        torch.tensor([n for n in lengths if n]).cumsum(0).tolist())
    q, k, v = (randn(s, heads, head_dim, dtype=dtype, device=device, scale=1.5) for _ in range(3))
    scale = head_dim ** -0.5
    out = ref("varlen_attention")(q, k, v, meta, scale)
    check(out, varlen_f64(q, k, v, meta.lengths, scale).to(dtype), **F64_TOL[dtype])


def causal_f64(q, k, v, key_padding_mask, scale):
    """(B, L, H, D) float64: causal softmax attention with kv head g serving q heads g*r .. g*r + r - 1."""
    b, length, hq, _ = q.shape
    rep = hq // k.shape[2]
    qt, kt, vt = q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2)
    kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()[None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    scores = (qt @ kt.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], -math.inf)
    return (torch.softmax(scores, dim=-1) @ vt).transpose(1, 2)


def hf_eager_causal(q, k, v, key_padding_mask, scale):
    """transformers' eager_attention_forward (repeat_kv, fp32 softmax) with its additive 4D causal mask."""
    b, length, hq, _ = q.shape
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()[None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    module = SimpleNamespace(num_key_value_groups=hq // k.shape[2], training=False)
    out, _ = hf.eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        mask[:, None], scaling=scale)
    return out  # already (B, L, H, D)


@pytest.mark.parametrize("rep, head_dim", [(1, 128), (2, 128), (6, 128), (7, 128), (2, 20), (7, 20)])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-pad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_causal_attention(device, rep, padded, head_dim, dtype):
    b, length, hkv = 3, 19, 2
    hq = hkv * rep
    q = randn(b, length, hq, head_dim, dtype=dtype, device=device, scale=1.5)
    k, v = (randn(b, length, hkv, head_dim, dtype=dtype, device=device, scale=1.5) for _ in range(2))
    real = torch.tensor([length, 12, 1], device=device)
    mask = (torch.arange(length, device=device)[None] >= (length - real)[:, None]) if padded else None
    scale = head_dim ** -0.5

    out = ref("causal_attention")(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()  # padded query rows too
    rows = mask if padded else torch.ones(b, length, dtype=torch.bool, device=device)
    exact = causal_f64(q, k, v, mask, scale)[rows]
    torch.testing.assert_close(out[rows], exact.to(dtype), **F64_TOL[dtype])
    with torch.no_grad():
        hf_out = hf_eager_causal(q, k, v, mask, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(out[rows], hf_out[rows], **F64_TOL[dtype])
    else:  # transformers' eager path rounds the scores to fp16/bf16 before its fp32 softmax: ours must not be worse
        assert (out[rows].double() - exact).abs().max() <= (hf_out[rows].double() - exact).abs().max()
    if padded:  # an all-True mask is the same as no mask
        full = torch.ones(b, length, dtype=torch.bool, device=device)
        torch.testing.assert_close(ref("causal_attention")(q, k, v, full, scale),
                                   ref("causal_attention")(q, k, v, None, scale), **F64_TOL[dtype])


# ----------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("patches, embed_dim", [(37, 1280), (4, 64), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_patch_embed_matches_conv3d(device, patches, embed_dim, dtype):
    pe = hf.PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=embed_dim)
    with torch.no_grad():
        pe.proj.weight.normal_(0, 0.02)
    pe = pe.to(device=device, dtype=dtype)
    pixel_values = randn(patches, 3 * 2 * 14 * 14, device=device, scale=1.2)  # the processor's fp32 rows
    with torch.no_grad():
        expected = pe(pixel_values)  # x.view(-1, 3, 2, 14, 14) -> Conv3d(kernel=stride=(2, 14, 14))
        out = ref("patch_embed")(pixel_values, pe.proj.weight.reshape(embed_dim, -1))
    check(out, expected, **F64_TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_linear(device, bias, dtype):
    lin = torch.nn.Linear(33, 17, bias=bias).to(device=device, dtype=dtype)
    x = randn(2, 5, 33, dtype=dtype, device=device)
    with torch.no_grad():
        check(ref("linear")(x, lin.weight, lin.bias), lin(x), exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_embedding(device, dtype):
    table = randn(151936, 8, dtype=dtype, device=device)
    ids = torch.tensor([[151655, 0, 151935], [7, 7, 151643]], device=device)
    check(ref("embedding")(ids, table), table[ids], exact=True)


# ---------------------------------------------------------------------------------------------- registry
EXPECTED_OPS = {"layer_norm", "rms_norm", "add_rms_norm", "quick_gelu", "gelu", "silu_and_mul", "vision_rotary",
                "mrope_cos_sin", "apply_rotary", "varlen_attention", "causal_attention", "patch_embed", "linear",
                "embedding", "linear_act", "linear_swiglu", "patch_embed_frames", "add_layer_norm", "merger",
                "rope_kv_write", "prefill_attention", "decode_attention", "sample", "quant_linear",
                "rope_decode_attention", "decode_rows", "decode_commit"}


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    return monkeypatch


def test_available_lists_every_op(no_backend_env):
    listing = ops.available("cpu")
    assert set(listing) == EXPECTED_OPS == set(ops.all_ops())
    for name, entry in listing.items():
        assert set(entry) == {"implementations", "runs_here", "candidates", "auto", "doc"}, name
        assert "torch" in entry["implementations"] and "torch" in entry["runs_here"]
        assert entry["auto"] == "torch", name  # nothing faster runs on the CPU
        assert entry["candidates"] == ["torch"], name  # so nothing is raced there
        assert entry["doc"], name
    if not torch.cuda.is_available():
        assert ops.available() == listing


def test_resolve_torch_gives_the_references(no_backend_env):
    for backend in ("torch", "auto"):
        table = ops.resolve(backend, "cpu")
        assert set(table.chosen) == EXPECTED_OPS and set(table.chosen.values()) == {"torch"}
        for name in EXPECTED_OPS:
            assert getattr(table, name) is get_op(name).reference
        assert table.device == torch.device("cpu") and "rms_norm=torch" in repr(table)


def test_env_var_overrides_backend(no_backend_env):
    no_backend_env.setenv(BACKEND_ENV, "torch")
    table = ops.resolve("cuda", "cpu")  # would be refused on the CPU without the override
    assert table.backend == "torch" and set(table.chosen.values()) == {"torch"}
    assert ops.normalize_backend("triton") == "torch"


@pytest.mark.parametrize("via_env", [False, True], ids=["argument", "env"])
def test_unknown_backend_refused(no_backend_env, via_env):
    if via_env:
        no_backend_env.setenv(BACKEND_ENV, "tpu")
    with pytest.raises(BackendError) as exc:
        ops.resolve("torch" if via_env else "tpu", "cpu")
    message = str(exc.value)
    assert "'tpu'" in message and all(b in message for b in ("auto", "torch", "triton", "cuda"))
    assert (BACKEND_ENV in message) == via_env
    assert isinstance(exc.value, Qwen2VLFastError)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fast_backend_without_an_implementation_here_refused(no_backend_env, backend):
    runnable = [name for name, op in ops.all_ops().items() if backend in op.implementations("cpu")]
    if runnable:  # once an implementation runs on the CPU (e.g. the Triton interpreter) it must be picked
        assert {n for n, b in ops.resolve(backend, "cpu").chosen.items() if b == backend} == set(runnable)
        return
    with pytest.raises(BackendError, match=f"backend '{backend}' has no op that runs on cpu"):
        ops.resolve(backend, "cpu")


# --- fused ops: each reference equals the unfused composition it replaces ---------------------------------

def test_fused_references_equal_their_compositions(device):
    import torch.nn.functional as F

    from qwen2vl_fast.processing.patchify import CLIP_MEAN, CLIP_STD, normalize_patchify

    x, w, b = torch.randn(37, 64, device=device), torch.randn(96, 64, device=device), torch.randn(96, device=device)
    lin = F.linear(x, w, b)
    assert torch.equal(get_op("linear_act").reference(x, w, b, "none"), lin)
    assert torch.equal(get_op("linear_act").reference(x, w, b, "quick_gelu"), get_op("quick_gelu").reference(lin))
    assert torch.equal(get_op("linear_act").reference(x, w, b, "gelu"), F.gelu(lin))
    with pytest.raises(ValueError):
        get_op("linear_act").reference(x, w, b, "relu")
    assert torch.equal(get_op("linear_swiglu").reference(x, w, b), get_op("silu_and_mul").reference(lin))
    res, nw, nb = torch.randn(37, 64, device=device), torch.randn(64, device=device), torch.randn(64, device=device)
    normed, new_res = get_op("add_layer_norm").reference(x, res, nw, nb, 1e-6)
    assert torch.equal(new_res, x + res) and torch.equal(normed, F.layer_norm(x + res, (64,), nw, nb, 1e-6))
    frames = torch.randint(0, 256, (3, 3, 56, 84), dtype=torch.uint8, device=device)
    pw = torch.randn(64, 1176, device=device)
    rows, _ = normalize_patchify(frames, CLIP_MEAN, CLIP_STD)
    assert torch.equal(get_op("patch_embed_frames").reference(frames, pw, CLIP_MEAN, CLIP_STD), F.linear(rows, pw))
    mx = torch.randn(48, 16, device=device)
    f1w, f1b = torch.randn(64, 64, device=device), torch.randn(64, device=device)
    f2w, f2b = torch.randn(32, 64, device=device), torch.randn(32, device=device)
    lw = torch.randn(16, device=device)
    for lb in (None, torch.randn(16, device=device)):
        n = get_op("rms_norm").reference(mx, lw, 1e-6) if lb is None else F.layer_norm(mx, (16,), lw, lb, 1e-6)
        ref = F.linear(F.gelu(F.linear(n.reshape(12, 64), f1w, f1b)), f2w, f2b)
        assert torch.equal(get_op("merger").reference(mx, lw, lb, f1w, f1b, f2w, f2b, 1e-6), ref)


def test_resolve_passes_over_implementations_that_do_not_support_the_model(no_backend_env, monkeypatch):
    """An implementation declaring `supports` is chosen only for models it handles; others get the next backend
    (so no kernel ever has to fall back at run time)."""
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.ops import registry
    from qwen2vl_fast.presets import preset_config

    op = get_op("quick_gelu")
    monkeypatch.setitem(op.impls, "triton", (lambda x: x, lambda dev: True))
    monkeypatch.setitem(op.auto_on, "triton", lambda dev: True)
    monkeypatch.setitem(op.supports, "triton", lambda cfg: cfg.vision.head_dim == 80)
    real, tiny = parse_config(preset_config("qwen2-vl-7b")), parse_config(preset_config("tiny-qwen2-vl"))
    assert registry.resolve("triton", "cpu", real).chosen["quick_gelu"] == "triton"
    assert registry.resolve("triton", "cpu", tiny).chosen["quick_gelu"] == "torch"
    assert registry.resolve("auto", "cpu").chosen["quick_gelu"] == "triton"  # no config: not filtered
    assert op.implementations("cpu", tiny) == ["torch"]
