"""qwen2vl_fast.patch: a transformers Qwen2-VL / Qwen2.5-VL model on our ops, in place, and back.

Same random checkpoints as test_parity (both families, fp32, CPU): patched logits against the same model
unpatched (text, image, video, left-padded batch), greedy `generate()` token for token with the default cache and
a StaticCache, `unpatch` bit-identical, patching twice, refusals (another class, unknown layouts, a changed
formula behind an unchanged layout), gradients, the report, our Triton kernels under the interpreter, and the
benchmark's CPU smoke run.
"""

import json

import pytest
import torch
import transformers
from test_parity import FAMILIES, cases, load_hf, rel_err
from torch import nn

import qwen2vl_fast
from qwen2vl_fast import Qwen2VLFastError
from qwen2vl_fast.hf_patch import ATTN_NAME, is_patched
from qwen2vl_fast.hf_patch.attention import PATHS
from qwen2vl_fast.testing.hf_compat import transformers_inputs

PARTS = {"vision tower", "rms_norm", "mlp", "mrope tables", "attention", "attention module", "decoder layer"}


@pytest.fixture()
def hf(tiny_checkpoints, request):
    """A fresh transformers model of `family` (parametrized indirectly); unpatched again after the test."""
    model = load_hf(tiny_checkpoints[request.param], torch.float32)
    model.family = request.param
    yield model
    qwen2vl_fast.unpatch(model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**transformers_inputs(inputs)).logits


def instance_forwards(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def storages(model):
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def attn_impls(model):
    return {m.config._attn_implementation for m in model.modules() if hasattr(m, "q_proj")}


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
@pytest.mark.parametrize("case", ["text_only", "one_image", "video", "left_padded_batch"])
def test_logits_equal_unpatched(hf, case):
    inputs = cases(hf.family)[case]
    ref = logits(hf, inputs)
    assert qwen2vl_fast.patch(hf) is hf
    out = logits(hf, inputs)
    assert out.shape == ref.shape
    err = rel_err(out, ref, inputs.get("attention_mask"))
    assert err <= 1e-4, f"{hf.family}/{case}: ||Δ||/||ref|| = {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_transformers_bf16_error(tiny_checkpoints, family):
    """A bf16 model, patched, against the fp32 reference: at most 2x (+ a floor) transformers' own bf16 error."""
    inputs = cases(family)["two_odd_images"]
    ref32 = logits(load_hf(tiny_checkpoints[family], torch.float32), inputs)
    hf16 = load_hf(tiny_checkpoints[family], torch.bfloat16)
    theirs = rel_err(logits(hf16, inputs), ref32)
    qwen2vl_fast.patch(hf16)
    ours = rel_err(logits(hf16, inputs), ref32)
    assert ours <= 2 * theirs + 1e-3, f"patched bf16 {ours:.3e} vs transformers bf16 {theirs:.3e}"


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_vision_tower_output_equals_unpatched(hf):
    """The tower called directly: transformers 4 returns the merged features, 5 a ModelOutput whose pooler_output
    they are and whose last_hidden_state is the last block's output (window order for Qwen2.5-VL)."""
    inputs = cases(hf.family)["two_odd_images"]
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid)
        qwen2vl_fast.patch(hf)
        out = hf.model.visual(pixels, grid_thw=grid)
    assert type(out) is type(ref)
    if torch.is_tensor(ref):
        assert rel_err(out, ref) <= 1e-5
    else:
        assert rel_err(out.pooler_output, ref.pooler_output) <= 1e-5
        assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-5


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("case", ["one_image", "left_padded_batch"])
def test_generate_identical_tokens(hf, cache, case):
    inputs = transformers_inputs(cases(hf.family)[case])
    kw = {"do_sample": False, "max_new_tokens": 24, "pad_token_id": 151643}
    if cache:
        kw["cache_implementation"] = cache
    ref = hf.generate(**inputs, **kw)
    qwen2vl_fast.patch(hf)
    PATHS.clear()
    out = hf.generate(**inputs, **kw)
    assert ref.shape[1] == inputs["input_ids"].shape[1] + 24
    assert torch.equal(out, ref)
    # every step on our attention ops: masks (padding, StaticCache) included, never the SDPA fallback
    assert "sdpa" not in PATHS and sum(PATHS.values()) == 24 * hf.config.get_text_config().num_hidden_layers
    # transformers 5 skips the mask of an unpadded StaticCache prefill: our prefill kernel, as without a cache
    prefill = "prefill" if case == "one_image" and (cache is None or int(transformers.__version__.split(".")[0]) >= 5) \
        else "masked prefill, packed"
    decode = "decode" if cache is None and case == "one_image" else "masked decode"
    assert set(PATHS) == {prefill, decode}


@pytest.mark.parametrize("L, S", [(1, 9), (3, 9), (9, 9)])
def test_causal_attention_with_queries_after_cached_keys(L, S):
    """ops.causal_attention (the masked path's op): L queries that are the last of S keys, a key mask with left
    padding and empty slots at the end (a StaticCache's) -> a float64 dense softmax over exactly the allowed keys."""
    from qwen2vl_fast.ops import resolve

    torch.manual_seed(0)
    b, hq, hkv, d = 2, 4, 2, 8
    q, k, v = torch.randn(b, L, hq, d), torch.randn(b, S, hkv, d), torch.randn(b, S, hkv, d)
    keep = torch.ones(b, S, dtype=torch.bool)
    keep[1, :2] = False  # left padding
    if L == 1:
        keep[:, -2:] = False  # empty cache slots after the current token: masked, never "attend to itself"
    out = resolve("torch", "cpu").causal_attention(q, k, v, keep, 0.3)
    rows, cols = torch.arange(S - L, S)[:, None], torch.arange(S)[None, :]
    allowed = (cols <= rows)[None] & keep[:, None, :]  # (B, L, S)
    kk, vv = k.double().repeat_interleave(2, 2), v.double().repeat_interleave(2, 2)
    scores = torch.einsum("blhd,bshd->bhls", q.double(), kk) * 0.3
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    ref = torch.einsum("bhls,bshd->blhd", probs, vv)
    # query rows that are real tokens (a decode step's query is: its own slot is just not at the end of a static cache)
    real = keep[:, S - L:] if L > 1 else torch.ones(b, 1, dtype=torch.bool)
    torch.testing.assert_close(out[real].double(), ref[real], rtol=1e-5, atol=1e-5)


def _two_chunks(model, cache_cls, split=5):
    """The decoder's output on a left-padded batch fed in two chunks (split tokens, then the rest) through one
    cache: the second chunk's queries follow cached keys (L > 1 after S - L cached tokens, under a mask)."""
    import inspect

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    text = model.model.language_model
    if cache_cls == "static":
        cache = transformers.StaticCache(config=model.config.get_text_config(), max_cache_len=16)
    else:
        cache = transformers.DynamicCache()
    name = "cache" if "cache" in inspect.signature(type(text).forward).parameters else "past_key_values"
    with torch.no_grad():
        a = text(input_ids=ids[:, :split], attention_mask=mask[:, :split], use_cache=True, **{name: cache})[0]
        b = text(input_ids=ids[:, split:], attention_mask=mask, use_cache=True, **{name: cache})[0]
    return torch.cat([a * mask[:, :split, None], b], dim=1)


@pytest.mark.parametrize("hf", FAMILIES[:1], indirect=True)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_masked_chunk_after_cached_tokens(hf, cache):
    """A second multi-token chunk after cached ones, left-padded: keys cut to the valid length, ops.causal_attention
    with the queries at the end of the keys; equal to transformers' SDPA with its mask."""
    ref = _two_chunks(hf, cache)
    qwen2vl_fast.patch(hf)
    PATHS.clear()
    out = _two_chunks(hf, cache)
    assert rel_err(out, ref) <= 1e-4
    assert "sdpa" not in PATHS and PATHS.get("masked prefill", 0) == hf.config.get_text_config().num_hidden_layers


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_fused_weights_are_views_and_round_trip(hf, tmp_path):
    """q/k/v and gate/up are fused into one tensor whose slices the modules' parameters are: memory holds one
    copy, state_dict / save_pretrained / load_state_dict / .to() keep working, the fused tensor follows."""
    inputs = cases(hf.family)["one_image"]
    ref = logits(hf, inputs)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    qwen2vl_fast.patch(hf)
    attn = hf.model.language_model.layers[0].self_attn
    mlp = hf.model.language_model.layers[0].mlp
    def storage(*params):
        return {p.untyped_storage().data_ptr() for p in params}

    assert len(storage(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)) == 1
    assert len(storage(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)) == 1
    assert len(storage(mlp.gate_proj.weight, mlp.up_proj.weight)) == 1
    # one copy: the unique storages hold exactly the parameters' bytes
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in hf.parameters()}
    assert sum(unique.values()) == nbytes
    after = hf.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert rel_err(logits(hf, inputs), ref) <= 1e-4

    hf.save_pretrained(tmp_path / "saved")  # safetensors: shared storage, disjoint slices (cloned on save)
    reloaded = load_hf(tmp_path / "saved", torch.float32)
    assert torch.equal(logits(reloaded, inputs), ref)

    hf.to(torch.float64)  # _apply converts, the fused tensors follow (one storage per group again)
    assert attn.q_proj.weight.dtype == torch.float64
    assert len(storage(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)) == 1
    hf.to(torch.float32)
    assert rel_err(logits(hf, inputs), ref) <= 1e-4

    # in-place loads write into the fused tensor; a re-assigned parameter is picked up (fused again)
    sd = {k: v * 1.01 if k.endswith("layers.0.self_attn.k_proj.weight") else v for k, v in before.items()}
    hf.load_state_dict(sd)
    changed = logits(hf, inputs)
    assert rel_err(changed, ref) > 1e-6
    attn.k_proj.weight = nn.Parameter(before[next(k for k in before if k.endswith("layers.0.self_attn.k_proj.weight"))])
    assert rel_err(logits(hf, inputs), ref) <= 1e-4
    qwen2vl_fast.unpatch(hf)
    assert torch.equal(logits(hf, inputs), ref)


@pytest.mark.parametrize("hf", FAMILIES[:1], indirect=True)
def test_tied_parameters_are_not_fused(hf):
    inputs = cases(hf.family)["one_image"]
    layers = hf.model.language_model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # one Parameter in two modules
    ref = logits(hf, inputs)
    qwen2vl_fast.patch(hf)
    report = hf.qwen2vl_fast_report
    assert any("not fused" in n and "layers.0.mlp" in n and "layers.1.mlp" in n for n in report.notes)
    assert layers[1].mlp.up_proj.weight is layers[0].mlp.up_proj.weight
    assert rel_err(logits(hf, inputs), ref) <= 1e-4
    qwen2vl_fast.unpatch(hf)
    assert layers[1].mlp.up_proj.weight is layers[0].mlp.up_proj.weight


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_static_cache_generate_compiles_to_one_graph(hf):
    """generate() with a StaticCache and transformers' own compilation of the decode step, forced on the CPU,
    fullgraph=True: the patched forwards trace without a graph break (dynamo's "eager" backend keeps it to a
    second; inductor compiles it too, in minutes on this CPU) and give the same tokens."""
    inputs = transformers_inputs(cases(hf.family)["one_image"])
    kw = {"do_sample": False, "max_new_tokens": 8, "pad_token_id": 151643, "cache_implementation": "static"}
    ref = hf.generate(**inputs, **kw)
    qwen2vl_fast.patch(hf)
    compile_config = transformers.CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles the decode step on CUDA only by default
    torch._dynamo.reset()
    try:
        assert torch.equal(hf.generate(**inputs, **kw, compile_config=compile_config), ref)
        assert "_compiled_call" in hf.__dict__  # the decode steps did run compiled
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_report_lists_every_patched_part(hf):
    qwen2vl_fast.patch(hf)
    report = hf.qwen2vl_fast_report
    cfg = hf.config.get_text_config()
    assert report.parts() == PARTS
    count = {p: sum(1 for _, part, _ in report.patched if part == p) for p in PARTS}
    n = cfg.num_hidden_layers
    assert count == {"vision tower": 1, "rms_norm": 2 * n + 1, "mlp": n, "mrope tables": 1, "attention": n,
                     "attention module": n, "decoder layer": n}
    paths = {path for path, _, _ in report.patched}
    assert {"model.visual", "model.language_model.norm", "model.language_model.layers.0.mlp",
            "model.language_model.layers.0.self_attn", "model.language_model.rotary_emb",
            "model.language_model.layers.1"} <= paths
    assert all("fused" in how for _, part, how in report.patched if part in ("mlp", "attention module"))
    for op in ("apply_rotary", "add_rms_norm", "linear_swiglu", "causal_attention", "prefill_attention"):
        assert op in report.ops
    assert not any("not fused" in n for n in report.notes)
    assert report.backend == "auto" and report.ops["rms_norm"] == "torch"  # the references on a plain CPU
    assert type(hf).__name__ in str(report) and report.transformers_version == transformers.__version__
    assert attn_impls(hf) == {ATTN_NAME}


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_unpatch_restores_bit_identical_behaviour(hf):
    inputs = cases(hf.family)["one_image"]
    impls, before = attn_impls(hf), instance_forwards(hf)
    ref = logits(hf, inputs)
    qwen2vl_fast.patch(hf)
    assert is_patched(hf) and len(instance_forwards(hf)) > len(before)
    assert len(storages(hf)) < len(list(hf.parameters()))  # q/k/v and gate/up fused
    qwen2vl_fast.unpatch(hf)
    assert not is_patched(hf) and not hasattr(hf, "qwen2vl_fast_report")
    assert instance_forwards(hf) == before and attn_impls(hf) == impls
    assert len(storages(hf)) == len(list(hf.parameters()))  # every parameter on its own storage again
    assert not [n for n, m in hf.named_modules() if "_apply" in m.__dict__]
    assert torch.equal(logits(hf, inputs), ref)
    assert qwen2vl_fast.unpatch(hf) is hf  # unpatching an unpatched model is a no-op


@pytest.mark.parametrize("hf", FAMILIES[:1], indirect=True)
def test_patching_twice_is_harmless(hf):
    inputs = cases(hf.family)["one_image"]
    ref = logits(hf, inputs)
    qwen2vl_fast.patch(hf)
    report, forwards = hf.qwen2vl_fast_report, instance_forwards(hf)
    once = logits(hf, inputs)
    qwen2vl_fast.patch(hf)
    assert hf.qwen2vl_fast_report is report and instance_forwards(hf) == forwards
    assert torch.equal(logits(hf, inputs), once)
    qwen2vl_fast.patch(hf, backend="torch")  # other arguments: re-patched, not stacked
    assert hf.qwen2vl_fast_report.backend == "torch" and instance_forwards(hf) == forwards
    qwen2vl_fast.unpatch(hf)
    assert instance_forwards(hf) == [] and torch.equal(logits(hf, inputs), ref)


@pytest.mark.parametrize("hf", FAMILIES[:1], indirect=True)
def test_other_classes_are_refused_by_name(hf):
    with pytest.raises(Qwen2VLFastError, match="Qwen2VLModel"):
        qwen2vl_fast.patch(hf.model)  # the base model without the LM head
    with pytest.raises(Qwen2VLFastError, match="Linear"):
        qwen2vl_fast.patch(nn.Linear(2, 2))


class _BareMLP(nn.Module):
    """A decoder MLP of an unknown layout: one fused projection where we expect gate_proj/up_proj."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, -1)
        return self.down_proj(nn.functional.silu(g) * u)


class _OnePlusNorm(nn.Module):
    """The RMSNorm layout (a weight, variance_epsilon) under another formula: x * (1 + w), as Gemma's."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * h.to(x.dtype)


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_unknown_layouts_are_refused_and_nothing_is_patched(hf):
    text = hf.model.language_model
    cfg = hf.config.get_text_config()
    original_mlp = text.layers[1].mlp
    text.layers[1].mlp = _BareMLP(cfg.hidden_size, cfg.intermediate_size)
    with pytest.raises(Qwen2VLFastError, match=r"layers\.1\.mlp.*gate_proj"):
        qwen2vl_fast.patch(hf)
    assert not is_patched(hf) and instance_forwards(hf) == [] and attn_impls(hf) == {"sdpa"}
    text.layers[1].mlp = original_mlp

    rotary = text.rotary_emb
    del text.rotary_emb  # a release that moved the rotary module: no decoder layout we know
    with pytest.raises(Qwen2VLFastError, match="expected one decoder"):
        qwen2vl_fast.patch(hf)
    text.rotary_emb = rotary

    # The right layout under a different formula: caught by the probe against transformers' own forwards, undone.
    layer = text.layers[0]
    original_norm = layer.input_layernorm
    layer.input_layernorm = _OnePlusNorm(original_norm)
    with pytest.raises(Qwen2VLFastError, match="decoder: patched output differs"):
        qwen2vl_fast.patch(hf)
    assert not is_patched(hf) and instance_forwards(hf) == [] and attn_impls(hf) == {"sdpa"}
    assert len(storages(hf)) == len(list(hf.parameters()))  # the fused weights were undone too
    layer.input_layernorm = original_norm
    # the post-attention norm is fused with the residual add in our layer forward: a changed formula there too
    layer.post_attention_layernorm = _OnePlusNorm(layer.post_attention_layernorm)
    with pytest.raises(Qwen2VLFastError, match="decoder: patched output differs"):
        qwen2vl_fast.patch(hf)
    assert not is_patched(hf) and instance_forwards(hf) == []


@pytest.mark.parametrize("hf", FAMILIES[1:], indirect=True)
def test_gradients_raise_or_run_the_original(hf):
    inputs = transformers_inputs(cases(hf.family)["one_image"])
    ref = logits(hf, inputs)
    qwen2vl_fast.patch(hf)
    with pytest.raises(Qwen2VLFastError, match="inference only"):
        hf(**inputs)  # grad enabled, parameters require grad
    with torch.inference_mode():
        assert rel_err(hf(**inputs).logits, ref) <= 1e-4

    qwen2vl_fast.patch(hf, on_grad="original")  # transformers' forwards whenever gradients are asked for
    out = hf(**inputs).logits
    out.square().mean().backward()
    assert rel_err(out.detach(), ref) <= 1e-5
    grads = [p.grad for p in hf.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)

    hf.requires_grad_(False)  # nothing requires grad: our ops run even with grad mode on
    qwen2vl_fast.patch(hf)
    assert rel_err(hf(**inputs).logits, ref) <= 1e-4
    hf.model.language_model.embed_tokens.weight.requires_grad_(True)  # only upstream: the activations need grad
    with pytest.raises(Qwen2VLFastError, match="inference only"):
        hf(**inputs)


@pytest.mark.parametrize("hf", FAMILIES, indirect=True)
def test_triton_kernels_under_the_patch(hf, triton_device):
    """backend="triton" (the interpreter on a CPU): our kernels, not the references, behind the patch."""
    inputs = cases(hf.family)["one_image"]
    ref = logits(hf, inputs)
    kw = {"do_sample": False, "max_new_tokens": 4, "pad_token_id": 151643}
    ref_tokens = hf.generate(**transformers_inputs(inputs), **kw)
    qwen2vl_fast.patch(hf, backend="triton")
    report = hf.qwen2vl_fast_report
    assert {report.ops[k] for k in ("rms_norm", "add_rms_norm", "linear_swiglu", "varlen_attention",
                                    "prefill_attention", "decode_attention", "mrope_cos_sin", "apply_rotary",
                                    "vision_rotary")} == {"triton"}
    assert rel_err(logits(hf, inputs), ref) <= 1e-4
    assert torch.equal(hf.generate(**transformers_inputs(inputs), **kw), ref_tokens)
    # a left-padded batch: the valid tokens packed for the Triton prefill kernel
    qwen2vl_fast.unpatch(hf)
    padded = cases(hf.family)["left_padded_batch"]
    ref_padded = logits(hf, padded)
    qwen2vl_fast.patch(hf, backend="triton")
    PATHS.clear()
    assert rel_err(logits(hf, padded), ref_padded, padded["attention_mask"]) <= 1e-4
    assert set(PATHS) == {"masked prefill, packed"}


def test_benchmark_cpu_smoke(tmp_path, monkeypatch):
    from helpers_bench import bench_module

    bench = bench_module("bench_hf_patch")
    monkeypatch.setenv("QWEN2VL_FAST_BENCH_CACHE", str(tmp_path / "ckpt"))
    monkeypatch.delenv("QWEN2VL_FAST_BENCH_OUT", raising=False)
    out = tmp_path / "results"
    rc = bench.main(["--presets", "tiny-qwen2-vl", "--device", "cpu", "--dtype", "float32", "--new-tokens", "4",
                     "--prompt-tokens", "8", "--image", "56x84", "--reps", "1", "--out-dir", str(out)])
    assert rc == 0
    files = sorted(out.glob("hf_patch-*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())["result"]["presets"]["tiny-qwen2-vl"]
    for part in ("generate", "vision"):
        for impl in ("unpatched", "patched"):
            assert r[part][impl]["median_ms"] > 0
        assert r[part]["speedup"] > 0
    assert r["generate"]["tokens_equal"] and r["vision"]["rel_err"] <= 1e-4
    assert r["param_bytes"]["patched"] == r["param_bytes"]["unpatched"]
    assert "sdpa" not in r["attention_paths"] and r["attention_paths"]["decode"] > 0
    assert "vision tower" in r["report"]
