"""The small Qwen2-style test tokenizer: real special-token ids, loads in tokenizers and transformers."""

import importlib.util
import json
import os

import pytest

from qwen2vl_fast.testing.tokenizer import (
    CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tokenizer_json,
    write_preprocessor_config,
    write_tokenizer,
)

tokenizers = pytest.importorskip("tokenizers")

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION_CHAT = (
    SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEXTS = [
    "hello world",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé, 日本語, emoji 🙂 and numbers 12345 / 3.14",
    "  leading spaces\ttabs\n\nnew lines\r\n trailing   ",
    "def f(x):\n    return x ** 2  # code\n",
    "it's they're I'LL we've",
]


def _expected_specials(model_type):
    last = 151656 if model_type == "qwen2_vl" else 151664
    return {t: i for t, i in QWEN_SPECIAL_TOKENS.items() if i <= last}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tok_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    paths = write_tokenizer(str(out), model_type=request.param)
    assert all(os.path.isfile(p) for p in paths)
    assert {os.path.basename(p) for p in paths} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.json"}
    return str(out), request.param


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir[0])


def test_special_table_is_the_real_one():
    assert len(QWEN_SPECIAL_TOKENS) == 22
    assert sorted(QWEN_SPECIAL_TOKENS.values()) == list(range(151643, 151665))
    assert QWEN_SPECIAL_TOKENS["<|image_pad|>"] == 151655 and QWEN_SPECIAL_TOKENS["<|video_pad|>"] == 151656
    with pytest.raises(ValueError):
        build_tokenizer_json("llama")


def test_json_layout_small_and_deterministic(tok_dir):
    d, model_type = tok_dir
    assert os.path.getsize(os.path.join(d, "tokenizer.json")) < 200_000
    doc = build_tokenizer_json(model_type)
    assert doc == build_tokenizer_json(model_type)
    assert doc["normalizer"] == {"type": "NFC"}
    split, byte_level = doc["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and not byte_level["add_prefix_space"] and not byte_level["use_regex"]
    assert doc["decoder"]["type"] == "ByteLevel"
    assert doc["post_processor"]["type"] == "ByteLevel"  # no template: no BOS is added
    specials = _expected_specials(model_type)
    assert {t["content"]: t["id"] for t in doc["added_tokens"]} == specials
    # The regular vocab is 0..n-1 (256 bytes + a few hundred merges); then nothing until 151643.
    regular = sorted(i for t, i in doc["model"]["vocab"].items() if t not in specials)
    assert regular == list(range(len(regular)))
    assert 256 + 300 <= len(regular) < 2000
    assert len(doc["model"]["merges"]) == len(regular) - 256


def test_special_tokens_encode_to_real_ids(tok_dir):
    d, model_type = tok_dir
    tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    specials = _expected_specials(model_type)
    for text, token_id in specials.items():
        assert tok.encode(text).ids == [token_id], text
        assert tok.token_to_id(text) == token_id
        assert tok.decode([token_id], skip_special_tokens=False) == text
    if model_type == "qwen2_vl":  # the Qwen2.5 additions are plain text here
        assert all(i < 151643 for i in tok.encode("<tool_call><|fim_pad|>").ids)
    ids = tok.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>").ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert ids[ids.index(151652) : ids.index(151652) + 3] == [151652, 151655, 151653]


def test_serialization_keeps_real_ids(tok_dir, capfd):
    d, _ = tok_dir
    tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    again = tokenizers.Tokenizer.from_str(tok.to_str())  # prints the harmless "vocab has holes" warning
    capfd.readouterr()
    assert again.encode(VISION_CHAT).ids == tok.encode(VISION_CHAT).ids
    assert again.token_to_id("<|video_pad|>") == 151656


def test_text_round_trips_with_small_ids(tok_dir):
    d, _ = tok_dir
    tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    enc = tok.encode("hello world")
    assert tok.decode(enc.ids) == "hello world"
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids and max(ids) < 151643, text
        assert tok.decode(ids) == text
    # Common words are single tokens, space-prefixed like GPT-2/Qwen ("Ġ" is the space byte).
    assert tok.encode("You are a helpful assistant.").tokens == ["You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", "."]
    assert tok.encode("Describe this image").tokens == ["Describe", "Ġthis", "Ġimage"]
    assert tok.encode("in the").ids[-1] == tok.token_to_id("Ġthe")


def test_transformers_tokenizer_matches_tokenizers(tok_dir, hf_tokenizer):
    d, model_type = tok_dir
    transformers = pytest.importorskip("transformers")
    raw = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert hf_tokenizer.is_fast
    assert type(hf_tokenizer).__name__ in ("Qwen2TokenizerFast", "Qwen2Tokenizer")  # transformers 5 drops "Fast"
    expected = raw.encode(VISION_CHAT).ids
    assert hf_tokenizer(VISION_CHAT)["input_ids"] == expected
    assert hf_tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == 151645
    assert hf_tokenizer.pad_token_id == 151643 and hf_tokenizer.bos_token is None
    assert hf_tokenizer.model_max_length == (32768 if model_type == "qwen2_vl" else 131072)
    plain = "system\nYou are a helpful assistant.\nuser\nDescribe this image.\nassistant\n"
    assert hf_tokenizer.decode(expected, skip_special_tokens=True) == plain
    # vocab.json + merges.txt let the slow (pure-Python) tokenizer load too, with the same ids.
    slow = transformers.AutoTokenizer.from_pretrained(d, use_fast=False)
    assert not slow.is_fast or int(transformers.__version__.split(".")[0]) >= 5  # v5 has no slow tokenizers
    for text in [VISION_CHAT, *TEXTS]:
        assert slow(text)["input_ids"] == raw.encode(text).ids, text


def test_chat_template(tok_dir, hf_tokenizer):
    d, _ = tok_dir
    with open(os.path.join(d, "chat_template.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE

    def render(messages, **kw):
        return hf_tokenizer.apply_chat_template(messages, tokenize=False, **kw)

    image_msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    assert render(image_msg, add_generation_prompt=True) == VISION_CHAT
    assert render(image_msg) == VISION_CHAT[: -len("<|im_start|>assistant\n")]
    ids = hf_tokenizer.apply_chat_template(image_msg, add_generation_prompt=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert list(ids) == hf_tokenizer(VISION_CHAT)["input_ids"]

    compare = [{"type": "video"}, {"type": "image", "image": "a.png"}, {"type": "text", "text": "Compare."}]
    follow_up = [{"type": "image_url", "image_url": "b.png"}, {"type": "text", "text": "And this?"}]
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": compare},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": follow_up},
    ]
    img, vid = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    assert render(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{vid}{img}Compare.<|im_end|>\n"
        "<|im_start|>assistant\nThey differ.<|im_end|>\n"
        f"<|im_start|>user\n{img}And this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(conversation, add_vision_id=True).count("Picture 2: " + img) == 1
    assert "Video 1: " + vid in render(conversation, add_vision_id=True)
    assert render([{"role": "user", "content": "hi"}]) == SYSTEM + "<|im_start|>user\nhi<|im_end|>\n"


def test_qwen2vl_processor_expands_image_pad(tok_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    d, _ = tok_dir
    write_preprocessor_config(d)
    if importlib.util.find_spec("torchvision") is not None:
        processor = transformers.AutoProcessor.from_pretrained(d)
    elif int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 builds Qwen2VLProcessor only with torchvision installed")
    else:
        # Without torchvision, transformers cannot build Qwen2VLProcessor's (video) processor at all;
        # an image-only subclass keeps the real image-processor + pad-expansion code under test.
        class ImageOnlyQwen2VLProcessor(transformers.Qwen2VLProcessor):
            attributes = ["image_processor", "tokenizer"]

        processor = ImageOnlyQwen2VLProcessor.from_pretrained(d, use_fast=False)
    assert isinstance(processor, transformers.Qwen2VLProcessor)
    assert processor.image_token_id == 151655
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (84, 56, 3), dtype=np.uint8))  # 56 wide
    text = "<|vision_start|><|image_pad|><|vision_end|>What is this?"
    out = processor(text=[text], images=[image], return_tensors="pt")
    grid = out["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 4]]
    n_pad = int(grid.prod()) // 4
    ids = out["input_ids"][0].tolist()
    assert ids.count(151655) == n_pad == 6
    start = ids.index(151652)
    assert ids[start : start + n_pad + 2] == [151652] + [151655] * n_pad + [151653]
    assert out["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert chat == VISION_CHAT
