"""The whole vision tower on the Triton backend against the torch backend (CPU: under the interpreter),
and, on a GPU, the tower without a host sync inside its blocks."""

import pytest
import torch

import qwen2vl_fast
from qwen2vl_fast.ops import resolve
from qwen2vl_fast.positions import vision_metadata
from qwen2vl_fast.vision import VisionTower

VISION_OPS = ("patch_embed", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "linear", "linear_act",
              "linear_swiglu", "vision_rotary", "varlen_attention", "merger")
FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
# grids with odd merged sizes, cut by the 4x4 windows, and a 3-temporal-patch video
GRIDS = [[[1, 4, 6]], [[1, 10, 14], [3, 4, 6]]]


def towers(path, device, dtype):
    """The same checkpoint's vision tower on the torch and the triton backend."""
    torch_model = qwen2vl_fast.load(path, device=device, dtype=dtype, backend="torch")
    triton_ops = resolve("triton", device)
    return torch_model.visual, VisionTower(torch_model.config, torch_model.weights, triton_ops), triton_ops


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_vision_op_has_a_triton_kernel(triton_device, tiny_checkpoints, family):
    ops = resolve("triton", triton_device)
    missing = [name for name in VISION_OPS if ops.chosen[name] != "triton"]
    assert not missing, f"vision ops without a Triton implementation: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grids", GRIDS)
def test_tower_fp32_triton_matches_torch(triton_device, tiny_checkpoints, family, grids):
    ref_tower, tower, _ = towers(tiny_checkpoints[family], triton_device, torch.float32)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, device=triton_device)
    ref = ref_tower(pixels, grid)
    out = tower(pixels, grid)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_fp16_triton_within_twice_torch_fp16_error(triton_device, tiny_checkpoints, family):
    """DESIGN.md's low-precision rule, on the whole tower: error vs the fp32 tower <= 2x torch's own fp16 error."""
    if family == "tiny-qwen2.5-vl":
        pytest.skip("Qwen2.5-VL's tower stays in bf16 (fp16 overflows); the interpreter has no bf16")
    path = tiny_checkpoints[family]
    grid = torch.tensor(GRIDS[1])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, device=triton_device)
    ref32 = qwen2vl_fast.load(path, device=triton_device, dtype=torch.float32, backend="torch").visual(pixels, grid)
    torch16, tower16, _ = towers(path, triton_device, torch.float16)
    ours, theirs = rel(tower16(pixels, grid), ref32), rel(torch16(pixels, grid), ref32)
    assert ours <= 2 * theirs + 1e-3, f"triton fp16 error {ours:.3e} vs torch fp16 {theirs:.3e}"


def test_model_forward_on_the_triton_backend_matches_transformers_numbers(triton_device, tiny_checkpoints):
    """The full model with backend="triton": vision ops on Triton, the rest on their references."""
    path = tiny_checkpoints["tiny-qwen2.5-vl"]
    grid = torch.tensor([[1, 10, 14]])
    ids = torch.tensor([[1, 151652] + [151655] * 35 + [151653, 2, 3]], device=triton_device)
    pixels = torch.randn(140, 1176, device=triton_device)
    ref = qwen2vl_fast.load(path, device=triton_device, dtype=torch.float32, backend="torch")(
        input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    model = qwen2vl_fast.load(path, device=triton_device, dtype=torch.float32, backend="triton")
    assert model.ops.chosen["varlen_attention"] == "triton"
    out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    assert rel(out, ref) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_tower_has_no_host_sync_inside_its_blocks(tiny_checkpoints, family, backend):
    """Metadata is built once per batch; the blocks themselves must never wait for the device."""
    model = qwen2vl_fast.load(tiny_checkpoints[family], device="cuda", dtype=torch.bfloat16, backend=backend)
    grid = torch.tensor([[1, 10, 14], [3, 4, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, device="cuda")
    meta = vision_metadata(model.config, grid, "cuda")
    x = model.ops.patch_embed(pixels, model.visual.patch_w)
    model.visual.forward(x, meta)  # warm-up: Triton compiles, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model.visual.forward(x, meta)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = qwen2vl_fast.load(tiny_checkpoints[family], device="cuda", dtype=torch.float32, backend="torch")
    assert rel(out, ref.visual(pixels, grid)) < 3e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_from_uint8_frames_on_triton_matches_torch(triton_device, tiny_checkpoints, family):
    """The fused patch embedding (uint8 frames -> normalise + gather inside the GEMM) in the whole tower."""
    ref_tower, tower, _ = towers(tiny_checkpoints[family], triton_device, torch.float32)
    frames = [torch.randint(0, 256, (1, 3, 56, 84), dtype=torch.uint8, device=triton_device),
              torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8, device=triton_device)]
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    assert rel(tower.from_frames(frames, grid), ref_tower.from_frames(frames, grid)) <= 1e-4
