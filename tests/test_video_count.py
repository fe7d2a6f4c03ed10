"""`Processor.count_tokens` counts videos exactly from their sizes alone (issue 11 item 2): a video file's frame
count, rate and size come from its container (no frame decoded), frames given already sampled from their shapes
and headers; the processor's sampling and pixel budget then give the grid. Videos the processor refuses count 0
and the processor still raises the VideoError."""

import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from qwen2vl_fast.errors import VideoError
from qwen2vl_fast.processing import image as image_module
from qwen2vl_fast.processing import video as video_module
from qwen2vl_fast.processing.image import ImageProcessor
from qwen2vl_fast.processing.processor import Processor

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except ValueError:  # av.codec.codec.UnknownCodecError
        return False


X264 = "libx264" if _has_encoder("libx264") else "mpeg4"  # B-frames, reordered packets


def write_video(path, n, fps, w, h, codec="mpeg4"):
    rng = np.random.default_rng(n)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def picture(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def chat(*parts, text="Describe it."):
    content = [p if isinstance(p, dict) else {"type": "video", "video": p} for p in parts]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(d / "a.mp4", n=30, fps=10, w=64, h=48),             # nb_frames in the container
        "mkv": write_video(d / "b.mkv", n=57, fps=24, w=120, h=90, codec=X264),  # no frame count: packets
        "avi": write_video(d / "c.avi", n=9, fps=5, w=200, h=36),
        "mov": write_video(d / "d.mov", n=75, fps=30, w=160, h=120, codec=X264),
        "odd": write_video(d / "e.mp4", n=13, fps=Fraction(15, 2), w=90, h=130),            # fractional rate, odd count
    }


@pytest.fixture(scope="module")
def frame_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    paths = []
    for i in range(3):
        paths.append(str(d / f"f{i}.png"))
        picture(70, 110, i).save(paths[-1])
    return paths


@pytest.fixture(scope="module", params=FAMILIES)
def processor(request, tiny_checkpoints):
    return Processor.from_pretrained(tiny_checkpoints[request.param])


def expected(processor, text, **kw):
    return processor(text, **kw)["attention_mask"].sum(1).tolist()


def the_chats(videos, frame_files):
    return [
        chat(videos["mp4"]),
        chat({"type": "image", "image": picture(60, 90)}, videos["mkv"], {"type": "text", "text": "and"},
             {"type": "video", "video": "file://" + videos["avi"], "nframes": 6}, text="Compare them."),
        chat({"type": "video", "video": videos["mov"], "fps": 4.0, "max_pixels": 150 * 784},
             {"type": "video", "video": videos["odd"], "min_frames": 2, "max_frames": 6}),
        chat({"type": "video", "video": videos["mov"], "video_start": 0.5, "video_end": 1.9},
             {"type": "video", "video": videos["mkv"], "total_pixels": 20 * 128 * 784, "min_pixels": 64 * 784}),
        chat({"type": "video", "video": videos["mkv"], "nframes": 9, "resized_height": 100, "resized_width": 150}),
        chat([picture(50, 70, i) for i in range(5)],                    # odd count: padded with the last frame
             {"type": "video", "video": frame_files, "max_pixels": 40 * 784}),
        chat(torch.zeros(3, 3, 45, 67, dtype=torch.uint8),
             np.zeros((4, 33, 100, 3), dtype=np.uint8),
             {"type": "video", "video": [np.zeros((200, 28, 3), np.uint8)] * 2, "resized_height": 56,
              "resized_width": 84}),
        [{"role": "user", "content": "no video at all"}],
    ]


def test_counts_equal_the_processor(processor, videos, frame_files):
    chats = the_chats(videos, frame_files)
    for one in chats:  # each alone, then all in one batch
        assert processor.count_tokens(one) == expected(processor, one)
    assert processor.count_tokens(chats) == expected(processor, chats)
    counts = processor.count_tokens(chats[:3])
    assert all(c > 100 for c in counts)  # videos count, not 0


@pytest.mark.parametrize("kw", [
    {"fps": 1.0}, {"nframes": 4}, {"video_max_pixels": 140 * 784, "max_pixels": 30 * 784},
    {"video_min_pixels": 32 * 784, "total_pixels": 40 * 128 * 784}, {"min_frames": 6, "max_frames": 8},
])
def test_call_options_are_honoured(processor, videos, kw):
    chats = [chat(videos["mp4"], {"type": "image", "image": picture(120, 80)}),
             chat({"type": "video", "video": videos["mov"], "fps": 3.0}, videos["avi"])]
    if "nframes" in kw:  # a per-video fps would clash with the call's nframes
        chats[1] = chat(videos["mov"], videos["avi"])
    assert processor.count_tokens(chats, **kw) == expected(processor, chats, **kw)


def test_plain_text_with_video_arguments(processor, videos):
    texts = ["<|vision_start|><|video_pad|><|vision_end|>one", "none",
             "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>two"]
    vids = [videos["mkv"], {"video": videos["mp4"], "nframes": 4}]
    images = [picture(64, 64)]
    assert processor.count_tokens(texts, images, vids) == expected(processor, texts, images=images, videos=vids)


def test_second_per_grid_ts_does_not_change_the_count(tiny_checkpoints, videos):
    one = chat({"type": "video", "video": videos["mov"], "fps": 1.5})
    counts = {f: Processor.from_pretrained(tiny_checkpoints[f]).count_tokens(one) for f in FAMILIES}
    out = Processor.from_pretrained(tiny_checkpoints["tiny-qwen2.5-vl"])(one)
    assert "second_per_grid_ts" in out and counts["tiny-qwen2.5-vl"] == out["attention_mask"].sum(1).tolist()
    assert counts["tiny-qwen2-vl"] == counts["tiny-qwen2.5-vl"]


def test_counting_decodes_no_frame_and_is_fast(processor, videos, frame_files, monkeypatch):
    chats = the_chats(videos, frame_files)
    want = expected(processor, chats)

    def refuse(*args, **kwargs):
        raise AssertionError("count_tokens decoded or resized pixels")

    for module, name in ((video_module, "_decode_file"), (video_module, "_frame"), (video_module, "_load"),
                         (video_module, "resize_uint8"), (video_module, "normalize_patchify"),
                         (image_module, "resize_uint8")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(ImageProcessor, "__call__", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)  # image files: header only
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", refuse, raising=False)
    processor.count_tokens(chats)  # warm (imports)
    start = time.perf_counter()
    got = processor.count_tokens(chats)
    elapsed = time.perf_counter() - start
    assert got == want
    # 8 prompts, 12 videos (one Matroska file's packets counted three times), 5 image files' headers: a few ms
    # alone; generous for a shared CI machine, still far below decoding and resizing them
    print(f"count_tokens: {elapsed * 1e3:.1f} ms")
    assert elapsed < 0.5, elapsed


def test_refused_videos_count_zero_and_the_processor_raises(processor, videos, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    truncated = tmp_path / "truncated.mp4"
    with open(videos["mp4"], "rb") as f:
        truncated.write_bytes(f.read()[:200])
    wav = str(tmp_path / "tone.wav")
    with av.open(wav, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    empty = str(tmp_path / "empty.avi")
    with av.open(empty, "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    one_frame = write_video(tmp_path / "one.mp4", n=1, fps=10, w=64, h=48)
    still = tmp_path / "still.png"
    picture(48, 64).save(still)
    bad_frame = tmp_path / "bad.png"
    bad_frame.write_bytes(b"not an image")
    refused = [
        str(corrupt), str(text), str(truncated), wav, empty, one_frame, str(still), str(tmp_path / "missing.mp4"),
        "https://example.com/a.mp4", str(tmp_path),
        {"type": "video", "video": videos["mp4"], "nframes": 64},            # more frames than the video has
        {"type": "video", "video": videos["mp4"], "fps": 0},
        {"type": "video", "video": videos["mp4"], "fps": 2.0, "nframes": 4},
        {"type": "video", "video": videos["mp4"], "video_start": 2.0, "video_end": 1.0},
        {"type": "video", "video": videos["mp4"], "resized_height": 100},
        [], [picture(48, 64), picture(56, 64)], [str(bad_frame), str(bad_frame)],
        torch.zeros(4, 3, 48, 64), np.zeros((4, 48, 64, 3), np.float32), [np.zeros((48, 64), np.uint8)] * 2,
    ]
    text_only = processor.count_tokens(chat(text="Describe it."))[0]
    for item in refused:
        one = chat(item)
        assert processor.count_tokens(one) == [text_only + 2], item  # <|vision_start|>, <|vision_end|> only
        with pytest.raises(VideoError):
            processor(one)
    mixed = chat(str(corrupt), videos["mp4"])  # the good video still counts
    good = expected(processor, chat(videos["mp4"]))[0]
    assert processor.count_tokens(mixed) == [good + 2]
