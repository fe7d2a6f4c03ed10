"""Unaligned MLP widths are zero-padded to multiples of 64 at load (qwen2vl_fast/align.py) without changing
the logits; quantized MLPs keep their layout; the quantizer still writes the checkpoint's shapes.

The tiny presets cover both unaligned cases: Qwen2.5-VL's vision MLP is 88 wide (SwiGLU with biases, as 3420 in
the released models) and both tiny LLMs are 96 wide; the tiny Qwen2-VL vision MLP (128) is aligned already."""

import pytest
import torch
from safetensors import safe_open

import qwen2vl_fast
from qwen2vl_fast import layout
from qwen2vl_fast.align import ALIGNMENT, aligned_width, pad_mlp_widths, strip_mlp_padding
from qwen2vl_fast.checkpoint import load_checkpoint
from qwen2vl_fast.config import load_config, parse_config
from qwen2vl_fast.model import Qwen2VLFastModel
from qwen2vl_fast.ops import resolve
from qwen2vl_fast.presets import REAL_PRESETS, preset_config
from qwen2vl_fast.quant import QuantizedWeight, pack_int32
from qwen2vl_fast.quant.export import calibration_hessians, default_calibration_chats, quantize_checkpoint

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
IMG, VS, VE = 151655, 151652, 151653
VISION = "visual.blocks.0.mlp."
DECODER = "model.layers.0.mlp."


def image_inputs():
    grid = torch.tensor([[1, 10, 14]])  # merged 5x7: cut by Qwen2.5-VL's windows
    return dict(input_ids=torch.tensor([[1, VS] + [IMG] * 35 + [VE, 2, 3]]), pixel_values=torch.randn(140, 1176),
                image_grid_thw=grid)


def unpadded_model(path, device="cpu", backend="torch"):
    """The fp32 model as load() builds it, minus the padding: the reference the padded model must match."""
    cfg = load_config(path)
    weights = load_checkpoint(path, cfg, device=device, dtype=torch.float32)
    return Qwen2VLFastModel(cfg, weights, resolve(backend, device, cfg))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_swiglu_halves_are_padded_separately_with_zeros(tiny_checkpoints):
    path = tiny_checkpoints["tiny-qwen2.5-vl"]
    cfg = load_config(path)
    original = load_checkpoint(path, cfg, dtype=torch.float32)
    padded = pad_mlp_widths(cfg, dict(original))
    for p, width, has_bias in ((VISION, 88, True), (DECODER, 96, False)):
        up, down = padded[p + "gate_up_proj.weight"], padded[p + "down_proj.weight"]
        assert up.shape == (2 * 128, 64) and down.shape == (64, 128)
        gate, up_half = original[p + "gate_up_proj.weight"].chunk(2)
        assert torch.equal(up[:width], gate) and torch.equal(up[128:128 + width], up_half)
        assert not up[width:128].any() and not up[128 + width:].any()
        assert torch.equal(down[:, :width], original[p + "down_proj.weight"]) and not down[:, width:].any()
        if has_bias:
            bias, gate_b = padded[p + "gate_up_proj.bias"], original[p + "gate_up_proj.bias"].chunk(2)
            assert bias.shape == (256,) and torch.equal(bias[:width], gate_b[0])
            assert torch.equal(bias[128:128 + width], gate_b[1])
            assert not bias[width:128].any() and not bias[128 + width:].any()
    assert padded[VISION + "down_proj.bias"] is original[VISION + "down_proj.bias"]  # down's N is not padded


def test_aligned_mlps_are_left_alone_and_padding_is_idempotent(tiny_checkpoints):
    path = tiny_checkpoints["tiny-qwen2-vl"]
    cfg = load_config(path)
    original = load_checkpoint(path, cfg, dtype=torch.float32)
    padded = pad_mlp_widths(cfg, dict(original))
    for name in ("fc1.weight", "fc1.bias", "fc2.weight"):  # QuickGELU fc1/fc2, 128 wide: aligned
        assert padded[VISION + name] is original[VISION + name]
    assert padded[DECODER + "gate_up_proj.weight"].shape == (256, 64)
    again = pad_mlp_widths(cfg, dict(padded))
    assert all(again[n] is padded[n] for n in padded)


@pytest.mark.parametrize("family", FAMILIES)
def test_strip_mlp_padding_gives_the_checkpoint_shapes_back(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    cfg = load_config(path)
    original = load_checkpoint(path, cfg, dtype=torch.float32)
    stripped = strip_mlp_padding(cfg, pad_mlp_widths(cfg, dict(original)))
    assert stripped.keys() == original.keys()
    assert all(torch.equal(stripped[n], original[n]) for n in original)
    model = qwen2vl_fast.load(path, dtype=torch.float32)
    assert {n: tuple(t.shape) for n, t in strip_mlp_padding(cfg, model.state_dict()).items()} == \
        layout.fused_tensor_shapes(cfg)


def random_quantized(n, k, bits=4, group_size=32):
    q = torch.randint(0, 2 ** bits, (k, n))
    groups = k // group_size
    return QuantizedWeight(pack_int32(q, bits), torch.full((groups, n), 0.01), torch.full((groups, n), 8.0),
                           bits, group_size)


def test_quantized_mlps_keep_their_layout(tiny_checkpoints):
    """A quantized MLP, and a dense down_proj behind a quantized gate/up, keep the checkpoint's width."""
    path = tiny_checkpoints["tiny-qwen2-vl"]
    cfg = load_config(path)
    weights = load_checkpoint(path, cfg, dtype=torch.float32)
    quantized_up = random_quantized(2 * 96, 64)
    weights[DECODER + "gate_up_proj.weight"] = quantized_up
    dense_down = weights[DECODER + "down_proj.weight"]
    weights["model.layers.1.mlp.gate_up_proj.weight"] = random_quantized(2 * 96, 64)
    weights["model.layers.1.mlp.down_proj.weight"] = random_quantized(64, 96)
    pad_mlp_widths(cfg, weights)
    assert weights[DECODER + "gate_up_proj.weight"] is quantized_up
    assert weights[DECODER + "down_proj.weight"] is dense_down
    assert weights["model.layers.1.mlp.down_proj.weight"].in_features == 96


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_released_models_have_no_unaligned_k_after_padding_but_the_patch_embedding(preset):
    """Every linear of every released preset, on the meta device: after padding, only the patch embedding's
    K = 1176 (the processor's pixel rows, 16-byte aligned in bf16) is not a multiple of 64, and no N is."""
    cfg = parse_config(preset_config(preset))
    weights = {n: torch.empty(s, device="meta") for n, s in layout.fused_tensor_shapes(cfg).items()}
    pad_mlp_widths(cfg, weights)
    unaligned = {n for n, t in weights.items() if t.dim() == 2 and "embed_tokens" not in n
                 and (t.shape[0] % ALIGNMENT or t.shape[1] % ALIGNMENT)}
    assert unaligned == {"visual.patch_embed.weight"}
    if cfg.model_type == "qwen2_5_vl":  # 3420 -> 3456
        assert weights[VISION + "gate_up_proj.weight"].shape == (2 * 3456, 1280)
        assert weights[VISION + "down_proj.weight"].shape == (1280, 3456)
    assert aligned_width(3420) == 3456 and aligned_width(3456) == 3456


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_logits_equal_unpadded_fp32(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    padded = qwen2vl_fast.load(path, dtype=torch.float32, backend="torch")
    assert padded.weights[DECODER + "down_proj.weight"].shape[1] == 128  # the padding really happened
    inputs = image_inputs()
    a, b = padded(**inputs).logits, unpadded_model(path)(**inputs).logits
    assert rel(a, b) <= 1e-6, f"{family}: padded vs unpadded ||Δ||/||ref|| = {rel(a, b):.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_weights_on_the_triton_backend(triton_device, tiny_checkpoints, family):
    """The Triton GEMMs (interpreted on the CPU) on padded vs unpadded weights: the vision tower and the decoder's
    hidden states (not the 151936-wide lm_head, too slow interpreted). Triton vs torch on the padded weights
    load() gives is test_vision_triton's."""
    path = tiny_checkpoints[family]
    padded = qwen2vl_fast.load(path, device=triton_device, dtype=torch.float32, backend="triton")
    for op in ("linear", "linear_act", "linear_swiglu"):
        assert padded.ops.chosen[op] == "triton"
    reference = unpadded_model(path, device=triton_device, backend="triton")
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, 1176, device=triton_device)
    assert rel(padded.visual(pixels, grid), reference.visual(pixels, grid)) <= 1e-6
    embeds = torch.randn(1, 11, 64, device=triton_device)
    positions = torch.arange(11, device=triton_device).view(1, 1, -1).expand(3, 1, -1)
    ours = padded.language_model(embeds, positions, None)
    assert rel(ours, reference.language_model(embeds, positions, None)) <= 1e-6


def test_quantizer_writes_the_checkpoint_shapes(tmp_path, tiny_checkpoints):
    """GPTQ runs the (padded) dense model for its Hessians; the export still holds the checkpoint's widths."""
    dense = tiny_checkpoints["tiny-qwen2.5-vl"]
    cfg = load_config(dense)
    chats = default_calibration_chats(1)
    assert calibration_hessians(dense, chats)[DECODER + "down_proj"].shape == (96, 96)
    out = quantize_checkpoint(dense, tmp_path / "q", bits=4, group_size=32, fmt="gptq", method="gptq", chats=chats)
    hub = layout.hub_tensor_shapes(cfg)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    for name, shape in hub.items():
        prefix = name[: -len(".weight")]
        if prefix + ".qweight" in shapes:  # packed (K * 4 / 32, N)
            assert shapes[prefix + ".qweight"] == (shape[1] // 8, shape[0]), name
        else:
            assert shapes[name] == shape, name
    assert shapes[DECODER + "down_proj.qweight"] == (96 // 8, 64)


@pytest.mark.gpu
def test_real_width_vision_mlp_padded_in_bf16_on_gpu():
    """Qwen2.5-VL's 3420-wide vision MLP at real shapes on the GPU kernels, padded to 3456 (the unmasked K loop)
    vs unpadded, in bf16: within 2x torch's own bf16 error against fp32 (DESIGN.md's low-precision rule)."""
    cfg = parse_config(preset_config("qwen2.5-vl-7b"))
    weights = {n: torch.empty(s, device="meta") for n, s in layout.fused_tensor_shapes(cfg).items()}
    names = [VISION + n for n in ("gate_up_proj.weight", "gate_up_proj.bias", "down_proj.weight", "down_proj.bias")]
    for name in names:
        weights[name] = (torch.randn(weights[name].shape, device="cuda") * 0.03).to(torch.bfloat16)
    dense = [weights[n] for n in names]
    padded = [pad_mlp_widths(cfg, weights)[n] for n in names]
    assert padded[2].shape == (1280, 3456)
    x = torch.randn(1024, 1280, device="cuda").to(torch.bfloat16)

    def mlp(ops, up_w, up_b, down_w, down_b, dtype=torch.bfloat16):
        h = ops.linear_swiglu(x.to(dtype), up_w.to(dtype), up_b.to(dtype))
        return ops.linear(h, down_w.to(dtype), down_b.to(dtype)).float()

    torch_ops, triton_ops = resolve("torch", "cuda"), resolve("triton", "cuda")
    ref32 = mlp(torch_ops, *dense, dtype=torch.float32)
    ours, theirs = rel(mlp(triton_ops, *padded), ref32), rel(mlp(torch_ops, *dense), ref32)
    assert ours <= 2 * theirs + 1e-3, f"padded triton bf16 error {ours:.3e} vs torch bf16 {theirs:.3e}"
