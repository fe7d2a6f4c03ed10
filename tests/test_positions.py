"""M-RoPE position ids and vision metadata against transformers, and against the original release formula
where transformers differs (transformers 5's video restart; 4.5x's truncated second_per_grid_t)."""

import random
import types

import pytest
import torch
import transformers
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf25
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf2

from qwen2vl_fast.config import parse_config
from qwen2vl_fast.errors import InputError, Qwen2VLFastError
from qwen2vl_fast.positions import mrope_position_ids, vision_metadata
from qwen2vl_fast.presets import preset_config

IMG, VID, VS, VE = 151655, 151656, 151652, 151653
TF_MAJOR = int(transformers.__version__.split(".")[0])


def config(name, **vision):
    raw = preset_config(name)
    raw["vision_config"].update(vision)
    return raw, parse_config(raw)


def original_rope_index(cfg, ids, mask, image_grid, video_grid, spg):
    """REFERENCE.md §4 written out token by token: the original Qwen release semantics (floor(t*spg*tps))."""
    b, L = ids.shape
    pos = torch.ones(3, b, L, dtype=torch.long)
    deltas = []
    images, videos = list(map(list, image_grid or [])), list(map(list, video_grid or []))
    spg = list(spg) if spg is not None else [1.0] * len(videos)
    qwen25 = cfg.model_type == "qwen2_5_vl"
    for r in range(b):
        toks = [int(t) for t, m in zip(ids[r], mask[r]) if m]
        out, i, nxt = [], 0, 0
        while i < len(toks):
            if toks[i] in (IMG, VID):
                is_vid = toks[i] == VID
                t, h, w = videos.pop(0) if is_vid else images.pop(0)
                s = spg.pop(0) if is_vid else 0.0
                hm, wm = h // 2, w // 2
                for ti in range(t):
                    tp = int(ti * s * cfg.vision.tokens_per_second) if qwen25 else ti
                    for hi in range(hm):
                        for wi in range(wm):
                            out.append((nxt + tp, nxt + hi, nxt + wi))
                nxt = max(max(p) for p in out[-t * hm * wm:]) + 1
                i += t * hm * wm
            else:
                out.append((nxt, nxt, nxt))
                nxt += 1
                i += 1
        cols = [j for j in range(L) if mask[r, j]]
        for j, p in zip(cols, out):
            pos[:, r, j] = torch.tensor(p)
        deltas.append(max(max(p) for p in out) + 1 - L)
    return pos, torch.tensor(deltas).unsqueeze(1)


def random_batch(rng, n_rows, allow_video=True):
    """Random rows of text and vision spans, left padded; returns ids, mask, image grids, video grids."""
    rows, images, videos = [], [], []
    for _ in range(n_rows):
        row = [rng.randrange(5000) for _ in range(rng.randrange(0, 4))]
        for _ in range(rng.randrange(0, 4)):
            video = allow_video and rng.random() < 0.4
            grid = [rng.randint(1, 4) if video else 1, 2 * rng.randint(1, 5), 2 * rng.randint(1, 5)]
            (videos if video else images).append(grid)
            row += [VS] + [VID if video else IMG] * (grid[0] * grid[1] * grid[2] // 4) + [VE]
            row += [rng.randrange(5000) for _ in range(rng.randrange(0, 5))]
        rows.append(row or [7])
    L = max(map(len, rows))
    ids = torch.tensor([[151643] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, images, videos


def hf_rope_index(raw, ids, mask, images, videos, spg=None):
    if raw["model_type"] == "qwen2_vl":
        fake = types.SimpleNamespace(config=transformers.Qwen2VLConfig(**raw))
        cls = hf2.Qwen2VLModel
    else:
        fake = types.SimpleNamespace(config=transformers.Qwen2_5_VLConfig(**raw))
        cls = hf25.Qwen2_5_VLModel
    kw = dict(input_ids=ids, attention_mask=mask, image_grid_thw=torch.tensor(images) if images else None,
              video_grid_thw=torch.tensor(videos) if videos else None)
    if spg is not None:
        kw["second_per_grid_ts"] = torch.tensor(spg)
    return cls.get_rope_index(fake, **kw)


@pytest.mark.skipif(TF_MAJOR >= 5, reason="transformers 5 changed get_rope_index; see the original-formula tests")
@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("seed", range(12))
def test_positions_match_transformers_get_rope_index(name, seed):
    rng = random.Random(seed)
    raw, cfg = config(name)
    ids, mask, images, videos = random_batch(rng, n_rows=rng.randint(1, 3))
    # integer seconds per grid: where the transformers 4.57 code (which truncates spg first) is right
    spg = [float(rng.choice([1, 2])) for _ in videos] if "2.5" in name and videos else None
    ref_pos, ref_delta = hf_rope_index(raw, ids, mask, images, videos, spg)
    pos, delta = mrope_position_ids(cfg, ids, mask, torch.tensor(images) if images else None,
                                    torch.tensor(videos) if videos else None, spg)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("seed", range(12))
def test_positions_match_original_formula(name, seed):
    rng = random.Random(100 + seed)
    _, cfg = config(name)
    ids, mask, images, videos = random_batch(rng, n_rows=rng.randint(1, 3))
    spg = [rng.choice([0.5, 0.25, 1.0, 1.5, 2.0]) for _ in videos] if videos else None
    expected = original_rope_index(cfg, ids, mask, images, videos, spg)
    got = mrope_position_ids(cfg, ids, mask, torch.tensor(images) if images else None,
                             torch.tensor(videos) if videos else None, spg)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_text_after_long_video_resumes_at_max_plus_one():
    """Original semantics (where transformers 5 differs): a 3-patch video on a 2x2 merged grid spans T
    positions 0..2, so the text after it restarts at start + 3, not at start + max(h, w) // 2 = start + 2."""
    _, cfg = config("tiny-qwen2-vl")
    ids = torch.tensor([[5, VS] + [VID] * 12 + [VE, 6]])
    pos, delta = mrope_position_ids(cfg, ids, None, None, torch.tensor([[3, 4, 4]]))
    start = 2
    assert pos[:, 0, 2:14].max() == start + 2
    assert pos[:, 0, 14].tolist() == [start + 3] * 3  # <|vision_end|>
    assert int(delta) == pos.max() + 1 - ids.shape[1]


def test_qwen25_fractional_seconds_per_grid_are_multiplied_before_truncation():
    _, cfg = config("tiny-qwen2.5-vl")  # tokens_per_second 2
    ids = torch.tensor([[VS] + [VID] * 4 * 4 + [VE]])
    pos, _ = mrope_position_ids(cfg, ids, None, None, torch.tensor([[4, 4, 4]]), [0.75])
    t_rows = pos[0, 0, 1:17].view(4, 4)[:, 0] - 1
    assert t_rows.tolist() == [0, 1, 3, 4]  # floor(t * 0.75 * 2) for t = 0..3


def test_text_only_matches_cumsum_and_padding_holds_one():
    _, cfg = config("tiny-qwen2-vl")
    ids = torch.tensor([[151643, 151643, 4, 5, 6], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = mrope_position_ids(cfg, ids, mask)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2] and pos[0, 1].tolist() == [0, 1, 2, 3, 4]
    assert delta.tolist() == [[-2], [0]]


class _SyncCounter:
    """Counts the tensor-to-host conversions that force a device sync."""

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.names:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=original, _name=name, **k):
                self.calls.append(_name)
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_positions_need_no_host_sync_per_image(monkeypatch):
    _, cfg = config("tiny-qwen2.5-vl")
    rows = [[1, VS] + [IMG] * 6 + [VE, 2, VS] + [VID] * 8 + [VE], [VS] + [IMG] * 4 + [VE, 3, VS] + [IMG] * 2 + [VE]]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    images, videos = torch.tensor([[1, 4, 6], [1, 4, 4], [1, 2, 4]]), torch.tensor([[2, 4, 4]])
    counter = _SyncCounter(monkeypatch)
    mrope_position_ids(cfg, ids, mask, images, videos, [1.0] * len(videos), check=False)
    assert counter.calls == []
    mrope_position_ids(cfg, ids, mask, images, videos, [1.0] * len(videos), check=True)
    assert counter.calls == ["item"]  # the whole batch's placeholder check, once


@pytest.mark.parametrize("ids, grid, what", [
    ([VS] + [IMG] * 5 + [VE], [[1, 4, 6]], "fewer pads than the grid"),
    ([VS] + [IMG] * 7 + [VE], [[1, 4, 6]], "more pads than the grid"),
    ([VS] + [IMG] * 3 + [VE, 9, VS] + [IMG] * 3 + [VE], [[1, 4, 6]], "one image's pads split in two"),
])
def test_placeholder_mismatch_is_a_clear_error(ids, grid, what):
    _, cfg = config("tiny-qwen2-vl")
    with pytest.raises(InputError, match="placeholders do not match"):
        mrope_position_ids(cfg, torch.tensor([ids]), None, torch.tensor(grid))


def test_image_span_crossing_rows_is_rejected():
    _, cfg = config("tiny-qwen2-vl")
    ids = torch.tensor([[1, 2, VS, IMG, IMG, IMG], [IMG, IMG, IMG, VE, 3, 4]])
    with pytest.raises(Qwen2VLFastError):
        mrope_position_ids(cfg, ids, None, torch.tensor([[1, 4, 6]]))


def test_pads_without_a_grid_are_rejected():
    _, cfg = config("tiny-qwen2-vl")
    ids = torch.tensor([[VS] + [IMG] * 4 + [VE, VS] + [VID] * 4 + [VE]])
    with pytest.raises(InputError):
        mrope_position_ids(cfg, ids, None, None, torch.tensor([[1, 4, 4]]))


# --- vision metadata ---------------------------------------------------------------------------------------

GRIDS = [[[1, 4, 6]], [[1, 16, 16]], [[1, 18, 26]], [[3, 10, 14]], [[1, 2, 2], [2, 8, 6], [1, 34, 20]],
         [[1, 64, 96]]]


V4_INTERNALS = pytest.mark.skipif(TF_MAJOR >= 5, reason="compares with transformers 4 internals (get_window_index, "
                                  "rot_pos_emb); end-to-end logits parity covers transformers 5")


@V4_INTERNALS
@pytest.mark.parametrize("grids", GRIDS)
def test_window_index_and_window_seqlens_match_transformers(grids):
    _, cfg = config("qwen2.5-vl-7b")
    hf_self = types.SimpleNamespace(window_size=112, spatial_merge_size=2, patch_size=14, spatial_merge_unit=4)
    ref_index, ref_cu = hf25.Qwen2_5_VisionTransformerPretrainedModel.get_window_index(hf_self, torch.tensor(grids))
    ref_cu = torch.unique_consecutive(torch.tensor(ref_cu, dtype=torch.int32))
    meta = vision_metadata(cfg, torch.tensor(grids), "cpu")
    assert torch.equal(meta.window_index, ref_index)
    assert torch.equal(meta.window.cu_seqlens, ref_cu)
    assert torch.equal(meta.window_index[meta.reverse_index], torch.arange(len(ref_index)))


@V4_INTERNALS
@pytest.mark.parametrize("name", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
@pytest.mark.parametrize("grids", GRIDS)
def test_vision_rotary_tables_and_frames_match_transformers(name, grids):
    _, cfg = config(name)
    grid = torch.tensor(grids)
    hf_self = types.SimpleNamespace(spatial_merge_size=2, rotary_pos_emb=hf2.VisionRotaryEmbedding(40))
    angles = hf2.Qwen2VisionTransformerPretrainedModel.rot_pos_emb(hf_self, grid)
    meta = vision_metadata(cfg, grid, "cpu")
    if meta.window_index is not None:
        angles = angles.view(-1, 4, angles.shape[-1])[meta.window_index].reshape(-1, angles.shape[-1])
    emb = torch.cat((angles, angles), dim=-1)
    assert torch.equal(meta.cos, emb.cos()) and torch.equal(meta.sin, emb.sin())
    frames = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0, dtype=torch.int32)
    assert torch.equal(meta.full.cu_seqlens, torch.nn.functional.pad(frames, (1, 0)))


@pytest.mark.parametrize("grid", [[[1, 5, 6]], [[0, 4, 4]], [[1, 4, -2]]])
def test_invalid_grids_are_rejected(grid):
    _, cfg = config("qwen2-vl-2b")
    with pytest.raises(InputError, match="grid_thw"):
        vision_metadata(cfg, torch.tensor(grid), "cpu")
