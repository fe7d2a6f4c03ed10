"""Sizes are checked before the expensive part (issue 11): a prompt too long for the KV cache, or more prompts
than max_batch, is refused from the text and the images' sizes alone, before any image is resized or the vision
tower runs; `Processor.count_tokens` gives the lengths the processor will produce; the default image budget
fits the cache; and the engine serves the next request."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_fast.engine import Engine
from qwen2vl_fast.errors import EngineError, PromptError
from qwen2vl_fast.processing.image import ImageProcessor
from qwen2vl_fast.processing.processor import Processor

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
MAX_LEN = 256


def picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def chat(*images, text="What is in the picture?"):
    parts = [img if isinstance(img, dict) else {"type": "image", "image": img} for img in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, max_batch=2,
                                  max_len=MAX_LEN, cuda_graphs=False, warmup=False)


@pytest.fixture
def calls(engine, monkeypatch):
    """Counts of the expensive steps: the image processor's pixel work, the vision tower, the processor's plan."""
    counts = {"pixels": 0, "vision": 0, "plan": 0}

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ImageProcessor, "__call__", spy("pixels", ImageProcessor.__call__))
    monkeypatch.setattr(Processor, "count_tokens", spy("plan", Processor.count_tokens))
    monkeypatch.setattr(engine.model.visual, "forward", spy("vision", engine.model.visual.forward))
    return counts


def test_too_long_image_prompt_is_refused_before_the_vision_tower(engine, calls, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (1600, 1200), (120, 30, 200)).save(path)  # sized from its header, never decoded here
    big = {"type": "image", "image": str(path), "max_pixels": 1600 * 1200}  # ~2400 tokens > the 256-token cache
    with pytest.raises(PromptError, match="exceeds the KV cache length 256") as refused:
        engine.generate(chat(big), max_new_tokens=4)
    assert calls["vision"] == 0 and calls["pixels"] == 0  # the vision tower never ran, no pixel was resized
    assert calls["plan"] == 1
    assert "max_pixels" in str(refused.value) and "--max-len" in str(refused.value)
    with pytest.raises(PromptError, match="exceeds the KV cache length"):  # the engine's own budget, too big
        Engine(engine.model, engine.processor, max_batch=2, max_len=MAX_LEN, max_pixels=10**6).generate(
            chat(picture(600, 800)), max_new_tokens=4)
    assert calls["pixels"] == calls["vision"] == 0
    [c] = engine.generate(chat(picture(60, 90)), max_new_tokens=3, ignore_eos=True)  # still serves
    assert len(c.token_ids) == 3 and calls["vision"] == 1


def test_too_long_video_prompt_is_refused_before_any_frame_is_decoded(engine, calls, tmp_path, monkeypatch):
    import av

    from qwen2vl_fast.processing import video as video_module

    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as c:  # 30 frames at 10 fps: 6 sampled, 3 x (10 x 13) = 390 tokens > the cache
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    decoded = []
    monkeypatch.setattr(video_module, "_decode_file", lambda *a, **k: decoded.append(a) or 1 / 0)
    part = {"type": "video", "video": path}
    assert engine.processor.count_tokens(chat(part))[0] > MAX_LEN
    with pytest.raises(PromptError, match="exceeds the KV cache length 256"):
        engine.generate(chat(part), max_new_tokens=4)
    assert decoded == [] and calls["vision"] == 0 and calls["plan"] == 2  # ours above, then the engine's


def test_too_many_prompts_are_refused_before_any_preprocessing(engine, calls):
    with pytest.raises(EngineError, match="3 prompts exceed the engine's max_batch 2") as refused:
        engine.generate([chat(picture(300, 400, i)) for i in range(3)], max_new_tokens=2)
    assert calls == {"pixels": 0, "vision": 0, "plan": 0}  # refused before any preprocessing
    assert "max_batch=3" in str(refused.value)
    processed = engine.processor([chat(picture(60, 90, i)) for i in range(3)])
    calls["pixels"] = 0
    with pytest.raises(EngineError, match="max_batch"):
        engine.generate(processed, max_new_tokens=2)
    assert calls == {"pixels": 0, "vision": 0, "plan": 0}
    assert len(engine.generate([chat(picture(60, 90))] * 2, max_new_tokens=2)) == 2


def test_a_processed_dict_too_long_is_refused_before_the_vision_tower(engine, calls):
    processed = engine.processor(chat({"type": "image", "image": picture(448, 448), "max_pixels": 448 * 448}))
    assert processed["attention_mask"].sum() > MAX_LEN
    with pytest.raises(PromptError, match="exceeds the KV cache length"):
        engine.generate(processed, max_new_tokens=2)
    assert calls["vision"] == 0
    empty = engine.processor(chat(text="Hi"))
    empty["attention_mask"][:] = 0
    with pytest.raises(PromptError, match="empty prompt"):
        engine.generate(empty, max_new_tokens=2)


def test_the_default_image_budget_fits_a_photo_in_the_cache(engine, calls):
    budget = engine.image_max_pixels()
    assert budget == MAX_LEN // 2 * 784 < engine.processor.image_processor.max_pixels
    [c] = engine.generate(chat(picture(1500, 2000)), max_new_tokens=2)  # 4:3, 3 MP: 3.8k tokens unbudgeted
    assert calls["vision"] == 1 and len(c.token_ids) >= 1
    default = Engine(engine.model, engine.processor, max_batch=1, cuda_graphs=False, warmup=False)
    assert default.max_len == min(engine.model.config.text.max_position_embeddings, 8192)
    ip = engine.processor.image_processor
    h, w = ip.target_size(3000, 4000, max_pixels=default.image_max_pixels())  # a 12 MP phone photo
    assert (h // 28) * (w // 28) <= default.max_len // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_count_tokens_matches_the_processor(tiny_checkpoints, family, tmp_path):
    processor = Processor.from_pretrained(tiny_checkpoints[family])
    jpeg = tmp_path / "a.jpg"
    picture(97, 213, 1).save(jpeg)
    png = io.BytesIO()
    picture(50, 40, 2).convert("RGBA").save(png, format="PNG")
    chats = [
        chat(picture(60, 90), str(jpeg)),
        chat({"type": "image", "image": "file://" + str(jpeg), "max_pixels": 56 * 56}, png.getvalue()),
        chat(np.zeros((33, 77, 3), dtype=np.uint8), torch.zeros(3, 41, 29, dtype=torch.uint8), text="two"),
        chat({"type": "image", "image": picture(30, 300), "resized_height": 100, "resized_width": 120}),
        [{"role": "user", "content": "no image at all"}],
    ]
    expect = processor(chats, max_pixels=200 * 784)["attention_mask"].sum(1).tolist()
    assert processor.count_tokens(chats, max_pixels=200 * 784) == expect
    texts = ["<|vision_start|><|image_pad|><|vision_end|>hi", "plain text"]
    images = [picture(70, 70)]
    assert processor.count_tokens(texts, images) == processor(texts, images)["attention_mask"].sum(1).tolist()


def test_count_tokens_leaves_unreadable_images_to_the_processor(tiny_checkpoints, tmp_path):
    processor = Processor.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    counts = processor.count_tokens(chat(str(bad), str(tmp_path / "missing.png"), "https://example.com/a.png"))
    text_only = processor.count_tokens(chat(text="What is in the picture?"))
    assert counts[0] == text_only[0] + 3 * 2  # vision start + end per image, no image tokens
