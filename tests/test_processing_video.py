"""Video preprocessing: frame sampling, pixel budget, decoding and errors (qwen2vl_fast.processing.video).

Synthetic videos are written with PyAV. Frame i carries its index as an 8-bit code of black/white column
blocks, so the decoded, lossy frames still tell which source frames were sampled. The sampling rules are
written out here a second time (`rule_nframes`, `rule_size`), independently of the module, from qwen-vl-utils.
"""

import math
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_fast.errors import VideoError
from qwen2vl_fast.processing.patchify import normalize, patchify
from qwen2vl_fast.processing.resize import resize_uint8
from qwen2vl_fast.processing.video import VideoProcessor, load_video, sample_indices, smart_nframes


def _encoders():
    found = []
    for name in ("mpeg4", "libx264"):
        try:
            av.codec.Codec(name, "w")
            found.append(name)
        except Exception:
            pass
    return found


ENCODERS = _encoders()
BITS = 8


def code_frame(i, h, w):
    """Frame i: column block b is white where bit b of i is set (block width w // BITS)."""
    a = np.zeros((h, w, 3), np.uint8)
    bw = w // BITS
    for b in range(BITS):
        if i >> b & 1:
            a[:, b * bw:(b + 1) * bw] = 255
    return a


def read_code(frame):
    """uint8 (3, H, W) at the source size -> the frame index it carries (block centres, robust to codecs)."""
    h, w = frame.shape[1:]
    bw = w // BITS
    bits = [frame[:, h // 4:3 * h // 4, b * bw + bw // 4:(b + 1) * bw - bw // 4].float().mean() > 127
            for b in range(BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_video(path, n=30, fps=10, w=64, h=48, codec=None):
    codec = codec or ENCODERS[0]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(code_frame(i, h, w), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """30 frames, 10 fps, 64x48."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


# ---- the rules, written out independently (qwen-vl-utils, Qwen2.5-VL era) ----

def rule_nframes(total, video_fps, fps=2.0, nframes=None, min_frames=4, max_frames=768):
    if nframes is not None:
        n = round(nframes / 2) * 2
    else:
        lo = math.ceil(min_frames / 2) * 2
        hi = math.floor(min(max_frames, total) / 2) * 2
        n = total / video_fps * fps
        n = min(min(max(n, lo), hi), total)
        n = math.floor(n / 2) * 2
    return n if 2 <= n <= total else None


def rule_resize(h, w, lo, hi, f=28):
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return hb, wb


def rule_size(h, w, n, min_pixels=128 * 784, max_pixels=None, total_pixels=int(128000 * 784 * 0.9)):
    budget = max(min(768 * 784, total_pixels / n * 2), int(min_pixels * 1.05))
    if max_pixels is not None:
        budget = min(max_pixels, budget)
    return rule_resize(h, w, min_pixels, budget)


# ---- frame counts and indices ----

@pytest.mark.parametrize("args, expected", [
    ((30, 10), 6), ((30, 10, 1.0), 4), ((31, 10), 6), ((300, 30), 20), ((7, 10), 4), ((3, 10), 2),
    ((1000, 10), 200), ((1000, 10, 2.0, None, 4, 50), 50), ((1000, 10, 2.0, None, 4, 51), 50),
    ((20, 10, 2.0, None, 5), 6), ((30, 10, None, 6), 6), ((30, 10, None, 5), 4), ((30, 10, None, 7), 8),
    ((30, 10, None, 30), 30),
])
def test_smart_nframes_hand_examples(args, expected):
    assert smart_nframes(*args) == expected


def test_smart_nframes_matches_written_rules():
    for total in (1, 2, 3, 5, 8, 17, 30, 99, 1000, 5000):
        for vfps in (1, 7.5, 10, 29.97, 60):
            for fps in (0.5, 1.0, 2.0, 3.3):
                for lo, hi in ((4, 768), (1, 10), (6, 7), (3, 2000)):
                    want = rule_nframes(total, vfps, fps, None, lo, hi)
                    if want is None:
                        with pytest.raises(VideoError, match="too short"):
                            smart_nframes(total, vfps, fps, None, lo, hi)
                    else:
                        assert smart_nframes(total, vfps, fps, None, lo, hi) == want, (total, vfps, fps, lo, hi)
            for nf in (1, 2, 3, 5, 9, 30, 31):
                want = rule_nframes(total, vfps, nframes=nf)
                if want is None:
                    with pytest.raises(VideoError, match="nframes"):
                        smart_nframes(total, vfps, nframes=nf)
                else:
                    assert smart_nframes(total, vfps, nframes=nf) == want


def test_sample_indices_hand_example():
    idx, sample_fps = sample_indices(30, 10)
    assert idx.tolist() == torch.linspace(0, 29, 6).round().long().tolist() == [0, 6, 12, 17, 23, 29]
    assert sample_fps == pytest.approx(2.0)
    idx, sample_fps = sample_indices(50, 10, video_start=1.0, video_end=3.0)  # frames 10..30, 21 of them
    assert idx.tolist() == [10, 17, 23, 30] and sample_fps == pytest.approx(4 / 21 * 10)


@pytest.mark.parametrize("codec", ENCODERS)
def test_decoded_frames_are_the_sampled_ones(tmp_path, codec):
    path = write_video(tmp_path / f"v_{codec}.mp4", n=30, fps=10, codec=codec)
    frames, sample_fps = load_video(path)
    assert frames.dtype == torch.uint8 and frames.shape == (6, 3, 48, 64)
    assert [read_code(f) for f in frames] == [0, 6, 12, 17, 23, 29]
    assert sample_fps == pytest.approx(2.0)
    frames, _ = load_video("file://" + path, nframes=10)
    assert [read_code(f) for f in frames] == torch.linspace(0, 29, 10).round().long().tolist()


@pytest.mark.parametrize("opts", [dict(fps=4.0), dict(fps=1.0), dict(max_frames=4), dict(min_frames=12, fps=1.0),
                                  dict(nframes=5), dict(nframes=30), dict(video_start=0.5, video_end=2.0),
                                  dict(video_start=2.2)])
def test_sampling_options_on_a_file(clip, opts):
    frames, sample_fps = load_video({"video": clip, **opts})
    start = math.ceil(opts.get("video_start", 0) * 10)
    end = min(math.floor(opts.get("video_end", 3.0) * 10), 29)
    count = end - start + 1
    rule = {k: opts[k] for k in ("fps", "nframes", "min_frames", "max_frames") if k in opts}
    n = rule_nframes(count, 10, **rule)
    assert [read_code(f) for f in frames] == torch.linspace(start, end, n).round().long().tolist()
    assert sample_fps == pytest.approx(n / count * 10)


# ---- pixel budget, grid, outputs ----

def test_processor_outputs_on_a_file(clip):
    out = VideoProcessor()([clip])
    h, w = rule_size(48, 64, 6)
    assert (h, w) == (280, 392)
    assert out["video_grid_thw"].tolist() == [[3, h // 14, w // 14]] and out["video_grid_thw"].dtype == torch.int64
    assert out["pixel_values_videos"].shape == (3 * 20 * 28, 1176)
    assert out["pixel_values_videos"].dtype == torch.float32
    assert out["fps"] == [pytest.approx(2.0)] and out["second_per_grid_ts"] == [pytest.approx(1.0)]


def test_pixel_values_are_normalize_patchify_of_the_sampled_frames(clip):
    proc = VideoProcessor()
    out = proc({"video": clip, "nframes": 8}, device="cpu")
    frames, sample_fps = load_video(clip, nframes=8)
    h, w = rule_size(48, 64, 8)
    rows, grid = patchify(normalize(resize_uint8(frames, h, w)))
    assert torch.equal(out["pixel_values_videos"], rows)
    assert out["video_grid_thw"].tolist() == [list(grid)] == [[4, h // 14, w // 14]]
    assert out["second_per_grid_ts"] == [pytest.approx(2 / sample_fps)] == [pytest.approx(2 / (8 / 30 * 10))]


def test_frame_size_matches_written_rules():
    proc = VideoProcessor()
    for h, w in ((48, 64), (84, 112), (1080, 1920), (720, 1280), (2160, 3840), (300, 40), (1000, 1000)):
        for n in (2, 6, 100, 300, 768):
            assert proc.frame_size(h, w, n) == rule_size(h, w, n), (h, w, n)
            assert proc.frame_size(h, w, n, total_pixels=50000) == rule_size(h, w, n, total_pixels=50000)
            assert proc.frame_size(h, w, n, min_pixels=3136, max_pixels=200000) == \
                rule_size(h, w, n, min_pixels=3136, max_pixels=200000)
    # the total budget binds for long videos: 768 frames of 1080p get 235200 = 300 * 784 pixels each at most
    h, w = proc.frame_size(1080, 1920, 768)
    assert h * w <= 300 * 784 and (h, w) == rule_resize(1080, 1920, 128 * 784, 300 * 784)
    # a larger per-video max_pixels cannot raise the budget (qwen-vl-utils caps it)
    assert proc.frame_size(1080, 1920, 6, max_pixels=10 ** 9) == proc.frame_size(1080, 1920, 6)
    # resized_height / resized_width: smart_resize of those with the image defaults
    assert proc.frame_size(48, 64, 6, resized_height=100, resized_width=150) == (112, 140)


def test_total_pixels_budget_end_to_end(tmp_path):
    path = write_video(tmp_path / "big.mp4", n=30, fps=10, w=112, h=84)
    out = VideoProcessor(min_pixels=3136)(path, total_pixels=18816)  # 6 frames -> 6272 pixels each at most
    assert rule_size(84, 112, 6, min_pixels=3136, total_pixels=18816) == (56, 84)
    assert out["video_grid_thw"].tolist() == [[3, 4, 6]]
    assert out["pixel_values_videos"].shape[0] == 3 * 4 * 6
    out = VideoProcessor()({"video": path, "resized_height": 100, "resized_width": 150})
    assert out["video_grid_thw"].tolist() == [[3, 8, 10]]


def test_env_var_sets_total_pixels():
    code = "from qwen2vl_fast.processing import video; print(video.VIDEO_TOTAL_PIXELS)"
    env = dict(os.environ, VIDEO_MAX_PIXELS="123456.7")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "123456"


# ---- already-sampled frames ----

def _frames(n, h=48, w=64):
    return [code_frame(i, h, w) for i in range(n)]


def test_frame_list_is_padded_and_matches_the_tensor_path(tmp_path):
    arrays = _frames(5)
    pils = [Image.fromarray(a) for a in arrays]
    paths = []
    for i, im in enumerate(pils):
        paths.append(str(tmp_path / f"f{i}.png"))
        im.save(paths[-1])
    proc = VideoProcessor()
    out = proc([pils])
    h, w = rule_resize(48, 64, 4 * 784, 16384 * 784)  # sized as images (qwen-vl-utils' fetch_image per frame)
    assert (h, w) == (56, 56)
    assert out["video_grid_thw"].tolist() == [[3, h // 14, w // 14]]  # ceil(5 / 2) temporal patches
    assert out["fps"] == [2.0] and out["second_per_grid_ts"] == [1.0]
    padded = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays + arrays[-1:]])
    assert torch.equal(out["pixel_values_videos"], patchify(normalize(resize_uint8(padded, h, w)))[0])
    tensor = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    for other in (proc([arrays]), proc({"video": paths}), proc([tensor]), proc(tensor), proc(np.stack(arrays))):
        assert torch.equal(other["pixel_values_videos"], out["pixel_values_videos"])
        assert torch.equal(other["video_grid_thw"], out["video_grid_thw"])
    frames, fps = load_video({"video": pils, "fps": 4.0})
    assert frames.shape[0] == 6 and torch.equal(frames[5], frames[4]) and fps == 4.0
    assert proc({"video": pils, "fps": 4.0})["second_per_grid_ts"] == [0.5]


def test_presampled_frames_use_the_image_budget():
    proc = VideoProcessor()
    big = torch.zeros(2, 3, 1080, 1920, dtype=torch.uint8)
    assert proc.frame_size(1080, 1920, None) == rule_resize(1080, 1920, 3136, 16384 * 784) == (1092, 1932)
    assert proc.frame_size(1080, 1920, None, total_pixels=1000) == (1092, 1932)  # no total budget for frames
    assert proc(big)["video_grid_thw"].tolist() == [[1, 78, 138]]
    out = proc({"video": big, "max_pixels": 200000, "min_pixels": 100000})
    assert out["video_grid_thw"].tolist() == [[1, *(s // 14 for s in rule_resize(1080, 1920, 100000, 200000))]]
    small = [code_frame(0, 48, 64)] * 2
    assert proc([small], min_pixels=128 * 784)["video_grid_thw"].tolist() == \
        [[1, *(s // 14 for s in rule_resize(48, 64, 128 * 784, 16384 * 784))]]
    out = proc({"video": small, "resized_height": 100, "resized_width": 150})
    assert out["video_grid_thw"].tolist() == [[1, 8, 10]]


def test_rgba_frames_are_composited_on_white():
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    frames, _ = load_video([rgba, rgba])
    assert int(frames.min()) == 255


def test_several_videos_are_concatenated(clip):
    out = VideoProcessor()([clip, {"video": clip, "nframes": 4}, _frames(2)])
    grids = out["video_grid_thw"].tolist()
    assert [g[0] for g in grids] == [3, 2, 1]
    assert out["pixel_values_videos"].shape[0] == sum(math.prod(g) for g in grids)
    assert out["fps"] == [pytest.approx(2.0), pytest.approx(4 / 30 * 10), 2.0]


def test_from_pretrained(tmp_path):
    import json

    assert VideoProcessor.from_pretrained(tmp_path).fps == 2.0
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    proc = VideoProcessor.from_pretrained(tmp_path)
    assert (proc.min_pixels, proc.max_pixels) == (128 * 784, 768 * 784)  # the image budget is not a video one
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"fps": 1.0, "min_frames": 2, "max_frames": 100, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    proc = VideoProcessor.from_pretrained(tmp_path)
    assert (proc.fps, proc.min_frames, proc.max_frames, proc.image_mean) == (1.0, 2, 100, (0.5,) * 3)
    (tmp_path / "video_preprocessor_config.json").write_text("{not json")
    with pytest.raises(VideoError, match="unreadable JSON"):
        VideoProcessor.from_pretrained(tmp_path)


# ---- errors ----

def test_file_errors(tmp_path):
    proc = VideoProcessor()
    with pytest.raises(VideoError, match="no such video file") as e:
        proc(str(tmp_path / "missing.mp4"))
    assert "missing.mp4" in str(e.value)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="corrupt.mp4.*cannot be read as a video"):
        proc(str(bad))
    for url in ("http://example.com/a.mp4", "https://example.com/a.mp4"):
        with pytest.raises(VideoError, match="no network"):
            proc(url)
    png = tmp_path / "still.png"
    Image.fromarray(code_frame(3, 48, 64)).save(png)
    with pytest.raises(VideoError, match="still.png.*too short.*1 frame"):
        proc(str(png))
    with pytest.raises(VideoError, match="no such video file"):
        proc(str(tmp_path))  # a directory


def test_audio_only_file(tmp_path):
    path = str(tmp_path / "tone.wav")
    with av.open(path, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    with pytest.raises(VideoError, match="tone.wav: has no video stream"):
        load_video(path)


def test_video_without_frames_and_too_short(tmp_path):
    empty = str(tmp_path / "empty.avi")
    with av.open(empty, "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    with pytest.raises(VideoError, match="empty.avi.*no frames"):
        load_video(empty)
    one = write_video(tmp_path / "one.mp4", n=1)
    with pytest.raises(VideoError, match="one.mp4.*too short"):
        load_video(one)
    three = write_video(tmp_path / "three.mp4", n=3)
    assert load_video(three)[0].shape[0] == 2
    with pytest.raises(VideoError, match=r"nframes=4 .*outside \[2, 3\]"):
        load_video(three, nframes=4)


@pytest.mark.parametrize("opts, match", [
    (dict(fps=0), "fps=0 must be a positive"), (dict(fps=-1.0), "positive"), (dict(fps="2"), "positive"),
    (dict(nframes=True), "positive"), (dict(nframes=float("nan")), "positive"), (dict(max_pixel=5), "unknown"),
    (dict(resized_height=100), "both resized_height"), (dict(fps=2.0, nframes=4), "either fps"),
    (dict(video_start=-1), "non-negative"), (dict(video_start=2.0, video_end=1.0), "empty range"),
    (dict(min_pixels=10 ** 6, max_pixels=1000), "min_pixels"), (dict(nframes=64), "outside"),
])
def test_bad_options(clip, opts, match):
    with pytest.raises(VideoError, match=match):
        VideoProcessor()({"video": clip, **opts})


def test_bad_frames():
    proc = VideoProcessor()
    with pytest.raises(VideoError, match="no frames"):
        proc([[]])
    with pytest.raises(VideoError, match="no videos"):
        proc([])
    with pytest.raises(VideoError, match="one size"):
        proc([[code_frame(0, 48, 64), code_frame(1, 56, 64)]])
    with pytest.raises(VideoError, match="HxWx3 uint8"):
        proc([[np.zeros((48, 64, 3), np.float32)] * 2])
    with pytest.raises(VideoError, match="wrap the frames"):
        proc([Image.new("RGB", (64, 48))])
    with pytest.raises(VideoError, match=r"uint8 \(T, 3, H, W\)"):
        proc(torch.zeros(4, 3, 48, 64))
    with pytest.raises(VideoError, match="no frames"):
        proc(torch.zeros(0, 3, 48, 64, dtype=torch.uint8))
    with pytest.raises(VideoError, match="'video' key"):
        proc({"frames": []})
    with pytest.raises(VideoError, match="video 2 of 2: .*missing.png"):
        proc([_frames(2), {"video": ["/nonexistent/missing.png"]}])


@pytest.mark.parametrize("codec", ENCODERS)
def test_damaged_files_give_frames_or_a_video_error(tmp_path, codec):
    """Bytes overwritten in the second half of the file: whatever still decodes is sampled (corrupt packets are
    skipped, sampling is redone over the frames that decode), or a VideoError says why not; nothing else."""
    data = bytearray(open(write_video(tmp_path / "ok.mkv", n=40, codec=codec), "rb").read())
    rng = np.random.default_rng(1)
    for k in range(5):
        damaged = bytearray(data)
        for pos in rng.integers(len(damaged) // 3, len(damaged), 40):
            damaged[pos] = rng.integers(0, 256)
        path = tmp_path / f"damaged{k}.mkv"
        path.write_bytes(bytes(damaged))
        try:
            frames, sample_fps = load_video(str(path))
        except VideoError as e:
            assert str(path) in str(e)
            continue
        assert frames.dtype == torch.uint8 and frames.shape[0] % 2 == 0 and frames.shape[0] >= 2
        assert frames.shape[1:] == (3, 48, 64) and sample_fps > 0


def test_outputs_on_the_test_device(clip, device):
    """Frames move to `device` as uint8 before the resize; every output tensor lives there."""
    out = VideoProcessor()({"video": clip, "nframes": 4}, device=device)
    assert out["pixel_values_videos"].device.type == device.type == out["video_grid_thw"].device.type
    frames, _ = load_video(clip, nframes=4)
    h, w = rule_size(48, 64, 4)
    assert torch.equal(out["pixel_values_videos"], patchify(normalize(resize_uint8(frames.to(device), h, w)))[0])
