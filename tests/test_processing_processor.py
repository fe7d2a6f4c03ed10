"""The processor: chat messages / text + media -> model inputs, against transformers' processor and tokenizer."""

import importlib.util

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import qwen2vl_fast
from qwen2vl_fast.errors import ImageError, PromptError, Qwen2VLFastError
from qwen2vl_fast.processing.processor import Processor
from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint
from qwen2vl_fast.testing.hf_compat import transformers_inputs

IMG, VID = 151655, 151656
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) % 256], -1) + rng.integers(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def frames(n, h, w):
    return [np.asarray(picture(h, w, seed=i)) for i in range(n)]


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def ckpt(request, tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("proc") / request.param, request.param,
                                   dtype=torch.float32, seed=2, std=0.15)


@pytest.fixture(scope="module")
def processor(ckpt):
    return Processor.from_pretrained(ckpt)


def chat_with_media():
    return [{"role": "user", "content": [
        {"type": "image", "image": picture(60, 90, 1)},
        {"type": "text", "text": "Compare this picture"},
        {"type": "image", "image": picture(130, 70, 2)},
        {"type": "text", "text": "with the clip"},
        {"type": "video", "video": frames(4, 56, 84), "fps": 2.0},
        {"type": "text", "text": "What changes?"},
    ]}]


def expand_like_transformers(text, image_grid, video_grid):
    """What transformers' processor does to the text: each placeholder becomes grid.prod() // 4 copies."""
    for token, grid in (("<|image_pad|>", image_grid), ("<|video_pad|>", video_grid)):
        if grid is None:
            continue
        parts = text.split(token)
        counts = [int(g.prod()) // 4 for g in grid]
        assert len(parts) == len(counts) + 1
        text = parts[0] + "".join("<|placeholder|>" * n + p for n, p in zip(counts, parts[1:]))
        text = text.replace("<|placeholder|>", token)
    return text


def test_chat_with_images_and_video_gives_transformers_ids(ckpt, processor):
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    chat = chat_with_media()
    out = processor(chat)
    text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == processor.apply_chat_template(chat)
    expected = hf_tok(expand_like_transformers(text, out["image_grid_thw"], out["video_grid_thw"]))["input_ids"]
    assert out["input_ids"][0].tolist() == expected
    assert (out["input_ids"] == IMG).sum() == out["image_grid_thw"].prod(-1).sum() // 4
    assert (out["input_ids"] == VID).sum() == out["video_grid_thw"].prod(-1).sum() // 4
    assert out["pixel_values"].shape == (int(out["image_grid_thw"].prod(-1).sum()), 1176)
    assert out["video_grid_thw"].tolist() == [[2, 4, 6]]
    if processor.model_type == "qwen2_5_vl":
        assert out["second_per_grid_ts"] == [1.0]  # 2 temporal patches per grid at 2 fps


def test_images_match_transformers_processor_expansion(ckpt, processor):
    """transformers' own Qwen2VLProcessor text expansion (image part; its video processor needs torchvision)."""
    class ImageOnly(transformers.Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]

    if not HAS_TORCHVISION and int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 builds Qwen2VLProcessor only with torchvision installed")
    hf = (transformers.AutoProcessor.from_pretrained(ckpt) if HAS_TORCHVISION
          else ImageOnly.from_pretrained(ckpt, use_fast=False))
    texts = ["<|vision_start|><|image_pad|><|vision_end|>two<|vision_start|><|image_pad|><|vision_end|>",
             "short <|vision_start|><|image_pad|><|vision_end|>"]
    images = [picture(60, 90, 1), picture(130, 70, 2), picture(40, 40, 3)]
    hf.tokenizer.padding_side = "left"
    ref = hf(text=texts, images=images, return_tensors="pt", padding=True)
    ours = processor(texts, images)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # resize kernels differ (PIL without torchvision): a few uint8 levels, see test_processing_image.py
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().mean() < 0.05


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' video processor needs torchvision")
def test_chat_with_video_matches_transformers_processor(ckpt, processor):
    hf = transformers.AutoProcessor.from_pretrained(ckpt)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]}]
    text = hf.apply_chat_template(chat, add_generation_prompt=True)
    image, video = picture(60, 90, 1), np.stack(frames(4, 56, 84))
    ref = hf(text=[text], images=[image], videos=[video], return_tensors="pt")
    ours = processor([text], images=[image], videos=[{"video": video, "fps": 2.0}])
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])


def test_batch_of_chats_is_left_padded(processor):
    chats = [chat_with_media(), [{"role": "user", "content": "Just text."}]]
    out = processor(chats)
    assert out["input_ids"].shape[0] == 2
    mask = out["attention_mask"]
    assert mask[0].all() and not mask[1].all()
    assert mask[1, -1] == 1 and mask[1, 0] == 0  # left padding
    assert (out["input_ids"][1][mask[1] == 0] == 151643).all()
    right = processor(chats, padding_side="right")
    assert right["attention_mask"][1, 0] == 1 and right["attention_mask"][1, -1] == 0


def test_processor_output_runs_the_model_like_transformers(ckpt, processor):
    out = processor([chat_with_media(), [{"role": "user", "content": [
        {"type": "image", "image": picture(30, 100, 5)}, {"type": "text", "text": "and this?"}]}]])
    ours = qwen2vl_fast.load(ckpt, dtype=torch.float32)(**out).logits
    hf_cls = (transformers.Qwen2VLForConditionalGeneration if processor.model_type == "qwen2_vl"
              else transformers.Qwen2_5_VLForConditionalGeneration)
    hf = hf_cls.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**transformers_inputs(out)).logits
    m = out["attention_mask"].bool()
    assert float((ours[m] - ref[m]).norm() / ref[m].norm()) <= 1e-4


def test_return_mm_token_type_ids(processor):
    out = processor(chat_with_media(), return_mm_token_type_ids=True)
    types = out["mm_token_type_ids"]
    assert torch.equal(types == 1, out["input_ids"] == IMG) and torch.equal(types == 2, out["input_ids"] == VID)


def test_plain_text_and_media_only_calls(processor):
    out = processor("hello world")
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape[0] == 1
    media = processor(images=[picture(56, 56)])
    assert set(media) == {"pixel_values", "image_grid_thw"}


@pytest.mark.parametrize("call, error, match", [
    (lambda p: p("<|image_pad|>", images=[]), PromptError, "1 <|image_pad|> placeholder"),
    (lambda p: p("no placeholder", images=[picture(56, 56)]), PromptError, "0 <|image_pad|>"),
    (lambda p: p("<|video_pad|><|video_pad|>", videos=[frames(2, 56, 56)]), PromptError, "2 <|video_pad|>"),
    (lambda p: p([{"role": "user", "content": [{"type": "image", "image": "https://example.com/a.png"}]}]),
     ImageError, "network"),
    (lambda p: p([]), PromptError, "text must be"),
    (lambda p: p([{"content": "no role"}]), PromptError, "role"),
    (lambda p: p([{"role": "user", "content": [{"type": "audio"}]}]), PromptError, "part 0"),
    (lambda p: p([[{"role": "user", "content": "hi"}]], images=[picture(56, 56)]), PromptError, "inside the messages"),
    (lambda p: p("x", padding_side="middle"), PromptError, "padding_side"),
    (lambda p: p("x", temperature=1.0), PromptError, "unknown processor arguments"),
])
def test_bad_input_is_a_typed_error_and_the_processor_stays_usable(processor, call, error, match):
    with pytest.raises(error, match=match):
        call(processor)
    assert issubclass(error, Qwen2VLFastError)
    assert processor(chat_with_media())["input_ids"].shape[0] == 1


def test_prompt_longer_than_the_context_is_refused(ckpt):
    p = Processor.from_pretrained(ckpt)
    p.max_length = 50
    with pytest.raises(PromptError, match="longer than the model's context of 50"):
        p([{"role": "user", "content": [{"type": "image", "image": picture(224, 224)}]}])
    assert p("short")["input_ids"].shape[1] < 50


def test_top_level_name_and_missing_tokenizer(tmp_path, ckpt):
    assert qwen2vl_fast.Processor is Processor
    with pytest.raises(PromptError, match="tokenizer.json"):
        Processor.from_pretrained(tmp_path)
