"""kernels/patch_embed.py against the op references: the plain GEMM over the processor's rows, and the fused
uint8-frames variant (normalise + patchify in the GEMM prologue) for images (T = 1: the frame used twice) and
videos (T = 3: the last frame repeated; T = 4), on grids of 2x2, 4x6 and 10x14 patches, with contiguous and
strided frames. fp32 within 1e-4 relative; fp16 by the DESIGN rule (2x PyTorch's own fp16 error + atol)."""

from __future__ import annotations

import pytest
import torch

from conftest import float_dtypes
from qwen2vl_fast.ops import get_op, resolve
from qwen2vl_fast.processing.patchify import CLIP_MEAN, CLIP_STD, normalize_patchify

pe = pytest.importorskip("qwen2vl_fast.kernels.patch_embed")
gemm = pytest.importorskip("qwen2vl_fast.kernels.gemm")

DTYPES = [pytest.param(d, atol, id=str(d).split(".")[-1]) for d, atol, _ in float_dtypes("cpu")]
GRIDS = [(2, 2), (4, 6), (10, 14)]  # patches (h, w): 28x28, 56x84, 140x196 pixels


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def nan_empty(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gemm, "_empty", nan_empty)


def frames_of(t, gh, gw, device):
    return torch.randint(0, 256, (t, 3, gh * 14, gw * 14), dtype=torch.uint8, device=device)


def weight_of(e, dtype, device):
    return (torch.randn(e, 1176, device=device) * 0.03).to(dtype)


def check(out, ref32, ref_lp, dtype, atol):
    assert out.shape == ref32.shape and out.dtype == dtype and torch.isfinite(out).all()
    err = (out.float() - ref32).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * ref32.abs().max().item(), f"relative error {err / ref32.abs().max().item():.3g}"
    else:
        torch_err = (ref_lp.float() - ref32).abs().max().item()
        assert err <= 2 * torch_err + atol, f"error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


@pytest.mark.parametrize("n, e", [(1, 5), (37, 64), (130, 40)])
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_patch_embed(triton_device, n, e, dtype, atol):
    pixels = torch.randn(n, 1176, device=triton_device) * 1.2  # the processor's fp32 rows
    w = weight_of(e, dtype, triton_device)
    ref = get_op("patch_embed").reference
    check(pe.patch_embed(pixels, w), ref(pixels, w.float()), ref(pixels, w), dtype, atol)


@pytest.mark.parametrize("t", [1, 3, 4])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_patch_embed_frames(triton_device, t, grid, dtype, atol):
    frames = frames_of(t, *grid, triton_device)
    w = weight_of(40, dtype, triton_device)
    ref = get_op("patch_embed_frames").reference
    out = pe.patch_embed_frames(frames, w, CLIP_MEAN, CLIP_STD)
    assert out.shape == (-(-t // 2) * grid[0] * grid[1], 40)
    check(out, ref(frames, w.float(), CLIP_MEAN, CLIP_STD), ref(frames, w, CLIP_MEAN, CLIP_STD), dtype, atol)


def test_image_uses_its_frame_twice_and_video_repeats_the_last(triton_device):
    """T = 1 equals the same frame given twice; T = 3 equals frames + a copy of frame 2 (fp32: only the
    summation order of identical inputs could differ, and it does not)."""
    w = weight_of(24, torch.float32, triton_device)
    img = frames_of(1, 2, 4, triton_device)
    torch.testing.assert_close(pe.patch_embed_frames(img, w, CLIP_MEAN, CLIP_STD),
                               pe.patch_embed_frames(img.expand(2, -1, -1, -1), w, CLIP_MEAN, CLIP_STD), rtol=0, atol=0)
    vid = frames_of(3, 2, 4, triton_device)
    padded = torch.cat([vid, vid[-1:]])
    torch.testing.assert_close(pe.patch_embed_frames(vid, w, CLIP_MEAN, CLIP_STD),
                               pe.patch_embed_frames(padded, w, CLIP_MEAN, CLIP_STD), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_strided_frames_and_tensor_stats(triton_device, dtype, atol):
    """Frames as a channels-last view (strides (H*W*C, 1, W*C, C)), mean/std given as tensors, a real-width
    slice of the 1280-row weight (64 rows)."""
    hwc = torch.randint(0, 256, (2, 56, 84, 3), dtype=torch.uint8, device=triton_device)
    frames = hwc.permute(0, 3, 1, 2)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    w = weight_of(64, dtype, triton_device)
    ref = get_op("patch_embed_frames").reference
    out = pe.patch_embed_frames(frames, w, mean, std)
    check(out, ref(frames.contiguous(), w.float(), CLIP_MEAN, CLIP_STD),
          ref(frames.contiguous(), w, CLIP_MEAN, CLIP_STD), dtype, atol)


def test_fused_equals_the_two_step_path(triton_device):
    """patch_embed_frames == patch_embed(normalize_patchify(frames)) with both kernels (fp32)."""
    frames = frames_of(3, 4, 6, triton_device)
    w = weight_of(40, torch.float32, triton_device)
    rows, _ = normalize_patchify(frames, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(pe.patch_embed_frames(frames, w, CLIP_MEAN, CLIP_STD), pe.patch_embed(rows, w),
                               rtol=1e-5, atol=1e-5)


def test_many_small_tiles(triton_device):
    """A forced 16x16x16 tile (74 K steps with a tail of 8, 18x3 tile grid, GROUP_M 4)."""
    frames = frames_of(3, 4, 6, triton_device)
    w = weight_of(40, torch.float32, triton_device)
    out = pe.embed_frames(frames, w, CLIP_MEAN, CLIP_STD, config=gemm.GemmConfig(16, 16, 16, 4, 4, 1))
    ref = get_op("patch_embed_frames").reference(frames, w, CLIP_MEAN, CLIP_STD)
    check(out, ref, None, torch.float32, 0.0)


def test_bad_arguments(triton_device):
    w = weight_of(8, torch.float32, triton_device)
    with pytest.raises(ValueError, match="uint8"):
        pe.patch_embed_frames(frames_of(1, 2, 2, triton_device).float(), w, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="multiples of 28"):
        pe.patch_embed_frames(torch.zeros(1, 3, 42, 56, dtype=torch.uint8, device=triton_device), w, CLIP_MEAN,
                              CLIP_STD)
    with pytest.raises(ValueError, match="does not match"):
        pe.patch_embed_frames(frames_of(1, 2, 2, triton_device), w[:, :1000], CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="one per channel"):
        pe.patch_embed_frames(frames_of(1, 2, 2, triton_device), w, CLIP_MEAN[:2], CLIP_STD[:2])


def test_custom_op_fake(triton_device):
    frames = frames_of(3, 2, 4, triton_device)
    w = weight_of(16, torch.float32, triton_device)
    torch.library.opcheck(torch.ops.qwen2vl_fast.patch_embed_frames_triton.default,
                          (frames, w, list(CLIP_MEAN), list(CLIP_STD), 14, 2, 2),
                          test_utils=("test_schema", "test_faketensor"))


def test_registry_picks_triton(triton_device):
    chosen = resolve("triton", triton_device).chosen
    assert chosen["patch_embed"] == "triton" and chosen["patch_embed_frames"] == "triton"
