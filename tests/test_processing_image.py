"""qwen2vl_fast.processing.image: sizes, pixel values, input kinds, errors, from_pretrained.

Tolerance against transformers' slow processor (PIL bicubic), measured on 60 random natural-ish images
(20..1500 px a side, smooth gradients + sinusoids + hard-edged rectangles + noise sigma 3 levels), in normalised
units where one uint8 level is 1 / (255 * std) ~ 0.0146:
  mean |diff| <= 0.0023 (~0.16 level), relative L2 <= 0.0082, max |diff| <= 0.131 (~9 levels, at isolated
  pixels next to hard edges), fraction of values off by more than 0.02 (~1.4 levels) <= 2.1e-5.
Images that are only upscaled are (near) identical; wherever a side is downscaled the antialias passes round
differently and ~15% of values move by one level. The asserted bounds add a margin of about 1.5-2x:
  mean <= 0.004, rel L2 <= 0.012, max <= 0.25, fraction off by > 0.03 (~2 levels) <= 1e-3.
Against transformers' fast (torchvision) processor the CPU pipeline is bit-identical (checked with torchvision
0.28 / torch 2.13 on 120 random size x budget cases and a mixed batch; the test below skips without torchvision).
"""

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwen2vl_fast.errors import ConfigError, ImageError, Qwen2VLFastError
from qwen2vl_fast.processing.image import ImageProcessor, load_image
from qwen2vl_fast.processing.resize import resize_uint8

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
LEVEL = 1 / (255 * max(STD))  # one uint8 level in normalised units, at most


def natural(h, w, seed=0):
    """A uint8 (h, w, 3) image with smooth gradients, waves, hard-edged flat rectangles and mild noise."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    for c in range(3):
        fx, fy = r.uniform(1, 6, 2) / max(h, w)
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * x + fy * y) + r.uniform(0, 6)) + 40 * (x / w - y / h)
    for _ in range(6):
        y0, x0 = r.integers(0, h), r.integers(0, w)
        img[y0:y0 + r.integers(1, h // 2 + 2), x0:x0 + r.integers(1, w // 2 + 2)] = r.uniform(0, 255, 3)
    img += r.normal(0, 3, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def reference(img_chw, h, w):
    """Our own reference from torch primitives: uint8 bicubic antialias resize on the CPU, normalise, and the
    REFERENCE.md §5 transpose, written independently of the package."""
    x = F.interpolate(img_chw[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    m = torch.tensor(MEAN) * 255
    s = torch.tensor(STD) * 255
    x = (x.float() - m[:, None, None]) / s[:, None, None]
    frames = torch.stack([x, x])  # an image is two identical temporal frames
    gh, gw = h // 14, w // 14
    p = frames.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gh * gw, 1176)


def unpatchify(pv, grid):
    """pixel_values (N, 1176) of one image -> the normalised (3, H, W) of its first temporal frame."""
    _, gh, gw = grid
    p = pv.reshape(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]  # (h/2, w/2, mh, mw, C, py, px)
    return p.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * 14, gw * 14)


def white():
    return (255 - torch.tensor(MEAN) * 255) / (torch.tensor(STD) * 255)


@pytest.fixture(scope="module")
def hf_slow():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)


@pytest.fixture(scope="module")
def proc():
    return ImageProcessor()


# --- 1. grids ----------------------------------------------------------------------------------------------
HALF = [14, 42, 70, 98, 126, 154, 182, 210, 238, 266, 294, 322, 350, 378, 406, 434, 462, 490]  # x/28 = k + .5
SIZES = ([(h, w) for h, w in zip(HALF, HALF[::-1])] + [(70, 98), (98, 70), (126, 42), (42, 126), (70, 70)]
         + [(28, 28), (20, 600), (600, 20), (15, 2999), (10, 1000), (14, 14), (2, 150), (5, 5), (27, 29),
            (56, 56), (57, 55), (100, 3000), (3000, 100), (224, 224), (480, 640), (768, 1024), (333, 517),
            (719, 1279), (1000, 999), (1080, 1920), (1234, 77), (41, 43), (85, 1555), (2000, 12),
            (112, 112), (140, 168), (99, 1401), (4, 700), (7, 50), (18, 3500)])
BUDGETS = [dict(), dict(max_pixels=50_000), dict(min_pixels=100_000), dict(min_pixels=200_704, max_pixels=200_704),
           dict(min_pixels=784, max_pixels=784 * 4), dict(max_pixels=1_003_520)]


def test_grid_matches_transformers(hf_slow, proc):
    assert len(SIZES) >= 50
    cases = [(s, b) for s in SIZES for b in BUDGETS[:1]] + [(s, b) for s in SIZES[::4] for b in BUDGETS[1:]]
    for (h, w), budget in cases:
        a = np.zeros((h, w, 3), np.uint8)
        # the budget goes to the constructor: transformers 5 ignores per-call min/max_pixels
        hf = hf_slow if not budget else type(hf_slow)(min_pixels=budget.get("min_pixels", 3136),
                                                      max_pixels=budget.get("max_pixels", 12845056))
        ref = hf(images=[a], return_tensors="pt")["image_grid_thw"]
        if ref.prod() * 196 > budget.get("max_pixels", 12845056):  # transformers silently exceeds the budget:
            try:  # resize.smart_resize refuses that (today); matching transformers would be fine too
                ours = proc(a, **budget)
            except ImageError as e:
                assert "cannot meet max_pixels" in str(e)
                continue
        else:
            ours = proc(a, **budget)
        assert torch.equal(ours["image_grid_thw"], ref), ((h, w), budget)
        assert ours["pixel_values"].shape == (int(ref.prod()), 1176)
        assert ours["image_grid_thw"].dtype == torch.int64 and ours["pixel_values"].dtype == torch.float32


def test_grid_huge_matches_transformers_smart_resize(proc):
    try:  # transformers 5 moved the PIL processor out; this module then needs torchvision
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(2160, 3840), (6000, 8000), (8000, 6000), (4000, 20), (12000, 16000), (30000, 200), (4321, 1234)]:
        for budget in BUDGETS:
            mn, mx = budget.get("min_pixels", 3136), budget.get("max_pixels", 12845056)
            ref = hf_smart_resize(h, w, 28, mn, mx)
            try:
                assert proc.target_size(h, w, **budget) == ref, ((h, w), budget)
            except ImageError as e:  # only where transformers exceeds the budget (see above)
                assert ref[0] * ref[1] > mx and "cannot meet max_pixels" in str(e)
    out = proc(np.zeros((2160, 3840, 3), np.uint8))  # the processor itself on a 4K frame
    assert out["image_grid_thw"].tolist() == [[1, *(s // 14 for s in hf_smart_resize(2160, 3840, 28, 3136, 12845056))]]


# --- 2. pixel values vs the slow (PIL) processor -------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(480, 640), (333, 517), (40, 300), (700, 90), (1080, 1920), (28, 28), (123, 457),
                                 (1469, 99)])
def test_pixel_values_close_to_transformers_slow(hf_slow, proc, h, w):
    a = natural(h, w, seed=h * 7 + w)
    ref = hf_slow(images=[a], return_tensors="pt")
    ours = proc(a)
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    diff = ours["pixel_values"] - ref["pixel_values"]
    assert diff.abs().mean() <= 0.004
    assert diff.norm() / ref["pixel_values"].norm() <= 0.012
    assert diff.abs().max() <= 0.25
    assert (diff.abs() > 0.03).float().mean() <= 1e-3


# --- 3. bit-exact against the torch reference (and torchvision / the fast processor where present) -------------
@pytest.mark.parametrize("h,w,budget", [(480, 640, {}), (56, 56, {}), (70, 98, {}), (333, 517, {}), (20, 600, {}),
                                        (1080, 1920, dict(max_pixels=400_000)), (90, 80, dict(min_pixels=60_000))])
def test_pixel_values_bit_identical_to_torch_reference(proc, h, w, budget):
    a = natural(h, w, seed=3)
    out = proc(a, **budget)
    _, gh, gw = out["image_grid_thw"][0].tolist()
    ref = reference(torch.from_numpy(a).permute(2, 0, 1).contiguous(), gh * 14, gw * 14)
    assert torch.equal(out["pixel_values"], ref)


def test_batch_same_size_and_order(proc):
    imgs = [natural(300, 400, 1), natural(120, 90, 2), natural(300, 400, 3), natural(300, 400, 4)]
    together = proc(imgs)
    alone = [proc(a) for a in imgs]
    assert torch.equal(together["pixel_values"], torch.cat([o["pixel_values"] for o in alone]))
    assert torch.equal(together["image_grid_thw"], torch.cat([o["image_grid_thw"] for o in alone]))
    empty = proc([])
    assert empty["pixel_values"].shape == (0, 1176) and empty["image_grid_thw"].shape == (0, 3)


def test_device_argument(proc, device):
    a = natural(250, 330, 5)
    cpu, dev = proc(a), proc(a, device=device)
    assert dev["pixel_values"].device.type == dev["image_grid_thw"].device.type == device.type
    assert torch.equal(dev["image_grid_thw"].cpu(), cpu["image_grid_thw"])
    if device.type == "cpu":
        assert torch.equal(dev["pixel_values"], cpu["pixel_values"])
    else:  # float32 resize on the GPU vs the CPU's uint8 kernel, which rounds and clamps between its two passes:
        # emulated on the CPU, mean 0.15-0.2 level, max 10 levels at isolated pixels by hard edges
        diff = (dev["pixel_values"].cpu() - cpu["pixel_values"]).abs()
        assert diff.mean() <= 0.35 * LEVEL and diff.max() <= 16 * LEVEL


@pytest.mark.gpu
def test_cuda_resize_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    for (h, w), (th, tw) in [((480, 640), (476, 644)), ((1080, 1920), (700, 1250)), ((100, 90), (224, 196))]:
        x = torch.from_numpy(natural(h, w, 9)).permute(2, 0, 1).contiguous().cuda()
        ref = tvf.resize(x, [th, tw], interpolation=InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(resize_uint8(x, th, tw), ref)
        assert torch.equal(resize_uint8(x[None].expand(2, -1, -1, -1), th, tw), ref[None].expand(2, -1, -1, -1))
    a = natural(480, 640, 1)
    out = ImageProcessor()(a, device="cuda")
    assert out["pixel_values"].is_cuda and out["image_grid_thw"].is_cuda


def test_cpu_pipeline_bit_identical_to_transformers_fast(proc):
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLImageProcessorFast

    fast = Qwen2VLImageProcessorFast(min_pixels=3136, max_pixels=12845056)
    for h, w in [(480, 640), (333, 517), (70, 98), (1080, 1920)]:
        a = natural(h, w, 11)
        ref = fast(images=[torch.from_numpy(a).permute(2, 0, 1).contiguous()], return_tensors="pt")
        ours = proc(a)
        assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
        assert torch.equal(ours["pixel_values"], ref["pixel_values"])


# --- 4. input kinds --------------------------------------------------------------------------------------------
def test_pil_modes(proc):
    rgb = natural(56, 84, 4)
    base = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(load_image(Image.fromarray(rgb)), base)
    grey = rgb[..., 0]
    assert torch.equal(load_image(Image.fromarray(grey, "L")), torch.from_numpy(grey)[None].expand(3, -1, -1))
    one = Image.fromarray(grey > 128)
    assert one.mode == "1" and set(load_image(one).unique().tolist()) <= {0, 255}
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert torch.equal(load_image(pal), torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1))
    assert load_image(Image.new("CMYK", (84, 56), (255, 0, 0, 0)))[:, 0, 0].tolist() == [0, 255, 255]
    i16 = Image.fromarray(np.array([[0, 257, 32768, 65535] * 21] * 56, np.uint16))
    assert i16.mode == "I;16" and load_image(i16)[0, 0, :4].tolist() == [0, 1, 128, 255]  # scaled, not clipped
    for im in (pal, one, i16, Image.fromarray(grey, "L"), Image.new("CMYK", (84, 56))):
        out = proc(im)
        assert out["image_grid_thw"].tolist() == [[1, 4, 6]] and torch.isfinite(out["pixel_values"]).all()


def test_transparency_becomes_white(proc):
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[..., :3] = 30
    rgba[:28, :, 3] = 255  # top half opaque dark, bottom half fully transparent
    la = Image.new("LA", (56, 56), (30, 0))
    pal = Image.new("P", (56, 56), 1)
    pal.putpalette([0, 0, 0, 30, 30, 30] + [0] * 762)
    pal.info["transparency"] = 1
    for src in (Image.fromarray(rgba, "RGBA"), rgba, torch.from_numpy(rgba).permute(2, 0, 1), la, pal):
        out = proc(src)
        x = unpatchify(out["pixel_values"], out["image_grid_thw"][0].tolist())
        assert torch.equal(x[:, 28:], white()[:, None, None].expand(3, 28, 56)), type(src)
    opaque = unpatchify(proc(rgba)["pixel_values"], (1, 4, 4))[:, :28]
    assert torch.equal(opaque, ((30 - torch.tensor(MEAN) * 255) / (torch.tensor(STD) * 255))[:, None, None]
                       .expand(3, 28, 56))


def test_arrays_and_tensors(proc):
    a = natural(64, 90, 6)
    base = load_image(a)
    assert base.shape == (3, 64, 90) and base.dtype == torch.uint8 and base.is_contiguous()
    chw = torch.from_numpy(a).permute(2, 0, 1)
    for same in (Image.fromarray(a), chw, chw.contiguous(), torch.from_numpy(a), a.astype(np.float32) / 255,
                 torch.from_numpy(a).permute(2, 0, 1).double() / 255, np.ascontiguousarray(a.transpose(2, 0, 1)),
                 a[..., ::-1][..., ::-1], {"image": a}):
        assert torch.equal(load_image(same), base)
    assert torch.equal(load_image(a[..., 0]), torch.from_numpy(a[..., 0])[None].expand(3, -1, -1))
    assert torch.equal(load_image(a[..., :1]), load_image(a[..., 0]))
    assert torch.equal(load_image(torch.from_numpy(a[..., 0])), load_image(a[..., 0]))
    ref = proc(a)
    for same in (chw, a.astype(np.float64) / 255, Image.fromarray(a)):
        assert torch.equal(proc(same)["pixel_values"], ref["pixel_values"])


def test_files_and_uris(proc, tmp_path):
    a = natural(70, 98, 7)
    png = tmp_path / "my image.png"
    Image.fromarray(a).save(png)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    jpeg_bytes = buf.getvalue()
    jpg_decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"))).permute(2, 0, 1)
    png_uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    jpg_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes).decode()
    base = torch.from_numpy(a).permute(2, 0, 1)
    for src in (str(png), png, f"file://{png}", "file://" + str(png).replace(" ", "%20"), png_uri, png.read_bytes()):
        assert torch.equal(load_image(src), base), src if len(str(src)) < 200 else type(src)
    assert torch.equal(load_image(jpg_uri), jpg_decoded)
    assert torch.equal(load_image(jpeg_bytes), jpg_decoded)
    out = proc([str(png), jpg_uri, {"image": f"file://{png}", "type": "image"}])
    assert out["image_grid_thw"].tolist() == [[1, 4, 8]] * 3
    assert torch.equal(out["pixel_values"][:32], out["pixel_values"][64:])


def test_per_image_overrides(proc):
    a = natural(300, 500, 8)
    out = proc([a, {"image": a, "max_pixels": 50_000}, {"image": a, "min_pixels": 400_000},
                {"image": a, "resized_height": 100, "resized_width": 200},
                {"image": a, "resized_height": 10, "resized_width": 10},
                {"image_url": {"url": a}, "resized_height": 280, "resized_width": 280, "max_pixels": 50_000}])
    grids = out["image_grid_thw"].tolist()
    assert grids == [[1, 22, 36], [1, 12, 20], [1, 36, 60], [1, 8, 14], [1, 4, 4], [1, 14, 14]]
    assert out["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)
    # call-level options apply to every image, a dict's own keys win
    out = proc([a, {"image": a, "max_pixels": 12_845_056}], max_pixels=50_000)
    assert out["image_grid_thw"].tolist() == [[1, 12, 20], [1, 22, 36]]
    assert proc(a, resized_height=56, resized_width=84)["image_grid_thw"].tolist() == [[1, 4, 6]]


# --- 5. errors -------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_image_error(proc, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"this is not an image")
    good = natural(56, 56, 0)
    trunc = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.fromarray(natural(200, 200, 1)).save(buf, "PNG")
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = [
        (str(bad), "corrupt.png"), (trunc, "truncated.png"), (str(tmp_path / "missing.jpg"), "not found"),
        (f"file://{tmp_path}/missing.jpg", "not found"), (str(tmp_path), "directory"),
        (np.zeros((0, 10, 3), np.uint8), "no pixels"), (Image.new("RGB", (0, 5)), "no pixels"),
        (torch.zeros(3, 5, 0, dtype=torch.uint8), "no pixels"),
        (np.zeros((10, 2500, 3), np.uint8), "aspect ratio"), (42, "unsupported image type"),
        (None, "unsupported image type"), (np.zeros((4, 5, 6, 3), np.uint8), "dimensions"),
        (np.zeros((10, 10, 2), np.uint8), "shape"), (np.zeros((10, 10, 7), np.uint8), "shape"),
        (np.zeros((10, 10, 3), np.uint16), "dtype"), (torch.zeros(3, 10, 10, dtype=torch.int64), "dtype"),
        (good.astype(np.float32), "[0, 1]"), (np.full((10, 10), np.nan, np.float32), "[0, 1]"),
        ("https://example.com/cat.png", "no network"), ("http://example.com/cat.png", "local file"),
        ("data:image/png;base64,@@not base64@@", "base64"), ("data:image/png;base64,", "empty"),
        ("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode(), "cannot read"),
        ("data:text/plain,hello", "data:image"), (b"\x89PNG garbage", "cannot read"),
        ({"min_pixels": 100}, "no 'image'"), ({"image": good, "max_pixel": 100}, "unknown image option"),
        ({"image": good, "resized_height": 100}, "together"), ({"image": good, "max_pixels": -5}, "positive"),
        ({"image": good, "min_pixels": "big"}, "positive"),
    ]
    for src, words in cases:
        with pytest.raises(ImageError, match=None) as err:
            proc(src)
        assert words in str(err.value), (src if not isinstance(src, np.ndarray) else src.shape, str(err.value))
        assert isinstance(err.value, Qwen2VLFastError)
    for budget, words in [(dict(min_pixels=10_000, max_pixels=5_000), "larger than"),
                          (dict(min_pixels=0, max_pixels=500), "below one 28x28"), (dict(max_pixels=True), "positive")]:
        with pytest.raises(ImageError, match=words):
            proc(good, **budget)
    with pytest.raises(ImageError, match="image 2 of 2"):
        proc([good, 3.5])
    with pytest.raises(ImageError, match="larger than"):
        ImageProcessor(min_pixels=5000, max_pixels=4000)
    # stateless: the same instance still works, with the same numbers
    assert torch.equal(proc(good)["pixel_values"], ImageProcessor()(good)["pixel_values"])


# --- 6. from_pretrained ----------------------------------------------------------------------------------------
def test_from_pretrained(tmp_path):
    a = natural(300, 500, 9)
    d1, d2, d3, d4 = (tmp_path / n for n in ("minmax", "size", "none", "broken"))
    for d in (d1, d2, d3, d4):
        d.mkdir()
    (d1 / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 50_000, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": list(MEAN), "image_std": list(STD), "image_processor_type": "Qwen2VLImageProcessor"}))
    (d2 / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 400_000, "longest_edge": 1_003_520}, "image_processor_type": "Qwen2VLImageProcessor",
         "merge_size": 2}))
    (d4 / "preprocessor_config.json").write_text("{not json")
    p1, p2, p3 = (ImageProcessor.from_pretrained(d) for d in (d1, d2, d3))
    assert (p1.min_pixels, p1.max_pixels) == (3136, 50_000)
    assert (p2.min_pixels, p2.max_pixels) == (400_000, 1_003_520)
    assert (p3.min_pixels, p3.max_pixels) == (3136, 12_845_056)
    assert p1(a)["image_grid_thw"].tolist() == [[1, 12, 20]]
    assert p2(a)["image_grid_thw"].tolist() == [[1, 36, 60]]
    assert p3(a)["image_grid_thw"].tolist() == [[1, 22, 36]]
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(d4)
    with pytest.raises(ConfigError, match="not found"):
        ImageProcessor.from_pretrained(tmp_path / "nowhere")


def test_exif_orientation_not_applied(proc, tmp_path):
    im = Image.fromarray(natural(56, 112, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": transformers and qwen-vl-utils ignore it, and so do we
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes())
    assert Image.open(path).getexif()[0x0112] == 6
    assert load_image(path).shape == (3, 56, 112)
    assert proc(path)["image_grid_thw"].tolist() == [[1, 4, 8]]
