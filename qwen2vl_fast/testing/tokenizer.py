"""A small Qwen2-style tokenizer for random-weight test and benchmark checkpoints.

Real Qwen2-VL checkpoints ship a 151k-entry byte-level BPE vocabulary. Tests only
need something that *behaves* like it: the same pre-tokenizer, normalizer and
decoder, a byte-level BPE with a few hundred merges learned (deterministically, by
the tiny trainer below) from a built-in English text, and - what really matters to
the engine - the special tokens at their real ids (151643 and up). Ids between the
regular vocabulary and 151643 do not exist.

The special tokens are placed both in the BPE model's vocab and in "added_tokens"
with the same explicit ids: `tokenizers` assigns an added token the model's id for
that string when it has one, and would otherwise number it right after the model
vocabulary, so putting them in the model vocab is what pins them to the real ids.
The price: whenever `tokenizers` serializes this vocab (Tokenizer.to_str/save, and so
transformers' save_pretrained, deepcopy, pickling) it prints a very long, harmless
"OrderedVocab ... contains holes" line to stdout; the ids survive the round trip.

    write_tokenizer(out_dir, model_type="qwen2_vl")   # tokenizer.json, vocab/merges, configs
    write_preprocessor_config(out_dir)                 # image processor config, for AutoProcessor

`model_type` "qwen2_vl" writes ids 151643-151656; "qwen2_5_vl" also 151657-151664.
"""

import json
import os
import re
from collections import Counter
from functools import lru_cache

QWEN_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    # added by Qwen2.5-VL
    "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
# Qwen2.5 marks the tool-call tags as non-special (they stay visible when decoding).
_NON_SPECIAL = {"<tool_call>", "</tool_call>"}
_LAST_ID = {"qwen2_vl": 151656, "qwen2_5_vl": 151664}
_MAX_LENGTH = {"qwen2_vl": 32768, "qwen2_5_vl": 131072}

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_MERGES = 640  # upper bound; the corpus runs out of pairs a little before

# Training text for the merges (original prose, biased towards prompt vocabulary).
_CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant gives an answer.
Hello world! Hello there, how are you today? I am fine, thank you, and I hope you are well.
Describe this image in detail. What is in the picture? What happens in this video?
The image shows a small red house next to a tall green tree, and the sky is blue.
There is a dog in the picture; the dog is running on the grass with a ball in its mouth.
In the video a man walks along the street, then he stops and looks at the camera.
Please read the text in the image and tell me what it says. The text says "open".
How many people are in this photo? There are three people: two women and one man.
What color is the car? The car is white. Where is the cat? The cat is on the table.
Write a short story about a robot who wants to learn how to paint the sea at night.
Once upon a time there was a robot that lived by the sea. Every night it looked at the
water and the moon, and every morning it tried to paint what it had seen the night before.
The first picture was not very good, but the robot did not give up. It worked for many
days and many nights, and one day the picture was so good that people came from the city
to see it. The robot was happy, because now it knew that it could make something new.
Can you explain what this chart shows? The chart shows the number of visitors for each
month of the year. The number is highest in the summer and lowest in the winter.
Find the bounding box of the object in the image and give the coordinates of the box.
This is a test of the tokenizer. It should work for any text, with numbers like 2024 or
3.14, with punctuation, and with new lines. The model reads the tokens and writes an answer.
The quick brown fox jumps over the lazy dog. A good answer is short, clear and correct.
We would like to know more about the world, about people, about time and about life.
Thank you for your help. You are welcome. Let me know if there is anything else I can do.
Common words: about after also because been before being between both could down each even
first from have here into just know like little long made make many more most much must never
only other over right said same should since some still such than their them then these they
think those through under very want were when where which while with work would year your.
"""


def _byte_symbols():
    """The byte-level alphabet: each of the 256 bytes as one printable unicode char.

    Printable latin-1 bytes stand for themselves; the others (control chars, space,
    ...) are shifted to code points 256 and up. Ordered printable-first, like Qwen2.
    """
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table = {b: chr(b) for b in keep}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return [table[b] for b in keep + shifted]


def _learn_merges(num_merges=NUM_MERGES):
    """Greedy byte-level BPE over _CORPUS; ties go to the lexicographically smallest pair."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    text = normalizers.NFC().normalize_str(_CORPUS)
    # Each word is its symbols joined by spaces (byte-level symbols never contain one).
    words = Counter(" ".join(piece) for piece, _ in pre.pre_tokenize_str(text))
    merges = []
    while len(merges) < num_merges:
        pairs = Counter()
        for word, n in words.items():
            symbols = word.split(" ")
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((a, b))
        adjacent = re.compile(r"(?<!\S)" + re.escape(f"{a} {b}") + r"(?!\S)")
        words = Counter({adjacent.sub(a + b, word): n for word, n in words.items()})
    return merges


def _special_tokens(model_type):
    if model_type not in _LAST_ID:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(_LAST_ID)}")
    return {t: i for t, i in QWEN_SPECIAL_TOKENS.items() if i <= _LAST_ID[model_type]}


@lru_cache(maxsize=None)
def _tokenizer_json_text(model_type):
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges = _learn_merges()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    specials = _special_tokens(model_type)
    vocab.update(specials)  # pins the added tokens to these ids (see module docstring)
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t not in _NON_SPECIAL}
        for t, i in specials.items()
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            dict(byte_level),
        ]},
        "post_processor": dict(byte_level),  # offsets only; no BOS/template
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }
    return json.dumps(doc, ensure_ascii=False)


def build_tokenizer_json(model_type="qwen2_vl") -> dict:
    """The tokenizer.json content (a fresh dict each call). qwen2_5_vl adds ids 151657-151664."""
    return json.loads(_tokenizer_json_text(model_type))


# ChatML with Qwen2-VL's vision placeholders; a default system turn is inserted when the
# conversation does not start with one. `add_vision_id` prefixes "Picture N: "/"Video N: ".
from ..processing.chat import DEFAULT_CHAT_TEMPLATE as CHAT_TEMPLATE  # noqa: E402


def _tokenizer_config(model_type):
    specials = _special_tokens(model_type)
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t not in _NON_SPECIAL}
            for t, i in specials.items()
        },
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>" and t not in _NON_SPECIAL],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": _MAX_LENGTH[model_type],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def write_tokenizer(out_dir, model_type="qwen2_vl") -> list:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json, plus vocab.json and
    merges.txt for the slow (pure-Python) Qwen2Tokenizer; return the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    text = _tokenizer_json_text(model_type)
    model = json.loads(text)["model"]
    tok_path = os.path.join(out_dir, "tokenizer.json")
    merges_path = os.path.join(out_dir, "merges.txt")
    with open(tok_path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in model["merges"]))
    regular = {t: i for t, i in model["vocab"].items() if t not in QWEN_SPECIAL_TOKENS}
    return [
        tok_path,
        _write_json(os.path.join(out_dir, "vocab.json"), regular),
        merges_path,
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(model_type)),
        # The processor reads its template from here (the tokenizer's copy serves the tokenizer).
        _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE}),
    ]


def write_preprocessor_config(out_dir, min_pixels=3136, max_pixels=12845056) -> str:
    """Write the Qwen2-VL image processor config (patch 14, temporal 2, merge 2, CLIP mean/std)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    return _write_json(os.path.join(out_dir, "preprocessor_config.json"), cfg)
