"""The processor: text or chat messages + images + videos -> the model's inputs.

Called like transformers' Qwen2-VL processor (`text=`, `images=`, `videos=`) or on chat messages in the
qwen-vl-utils format, it returns the same keys and layout: `input_ids` and `attention_mask` (left padded),
`pixel_values` / `image_grid_thw`, `pixel_values_videos` / `video_grid_thw` and, for Qwen2.5-VL,
`second_per_grid_ts`. Each `<|image_pad|>` / `<|video_pad|>` placeholder becomes grid.prod() // 4 copies.

The expansion happens on token ids, not on the text: special tokens are atomic for the tokenizer, so
expanding after tokenizing gives the ids transformers gets by expanding the string first, without
tokenizing a string with thousands of pad tokens in it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..errors import PromptError, Qwen2VLFastError, TokenizerError
from .chat import extract_media, render_chat

IMAGE_PAD, VIDEO_PAD, PAD = "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"


class Processor:
    def __init__(self, tokenizer, image_processor=None, video_processor=None, chat_template: Optional[str] = None,
                 max_length: Optional[int] = None, model_type: str = "qwen2_vl", merge_size: int = 2):
        """tokenizer: a `tokenizers.Tokenizer` holding the Qwen special tokens."""
        from .image import ImageProcessor
        from .video import VideoProcessor

        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.chat_template, self.max_length, self.model_type = chat_template, max_length, model_type
        self.merge_length = merge_size ** 2
        ids = {t: tokenizer.token_to_id(t) for t in (IMAGE_PAD, VIDEO_PAD, PAD)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"the tokenizer lacks the Qwen special tokens {missing}")
        self.image_token_id, self.video_token_id, self.pad_token_id = ids[IMAGE_PAD], ids[VIDEO_PAD], ids[PAD]

    @classmethod
    def from_pretrained(cls, checkpoint_dir) -> "Processor":
        """tokenizer.json (+ tokenizer_config.json / chat_template.json for the template), the image and video
        processors' configs, and config.json for the model type and context length."""
        import tokenizers

        from .image import ImageProcessor
        from .video import VideoProcessor

        d = os.fspath(checkpoint_dir)
        path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(path):
            raise PromptError(f"no tokenizer.json in {d!r}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            # it exists, so it is meant to be used: an error now, not "no tokenizer" at the first request
            raise TokenizerError(f"{path}: not a readable tokenizer ({e})") from None
        tok_cfg = _read_json(os.path.join(d, "tokenizer_config.json"))
        template = _read_json(os.path.join(d, "chat_template.json")).get("chat_template") or tok_cfg.get("chat_template")
        model_cfg = _read_json(os.path.join(d, "config.json"))
        text_cfg = model_cfg.get("text_config") or {}
        max_length = text_cfg.get("max_position_embeddings", model_cfg.get("max_position_embeddings"))
        return cls(tokenizer, ImageProcessor.from_pretrained(d), VideoProcessor.from_pretrained(d),
                   chat_template=template, max_length=max_length or tok_cfg.get("model_max_length"),
                   model_type=model_cfg.get("model_type", "qwen2_vl"))

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **extra) -> str:
        return render_chat(messages, self.chat_template, add_generation_prompt, **extra)

    def __call__(self, text=None, images=None, videos=None, *, device=None, padding_side: str = "left",
                 add_generation_prompt: bool = True, return_mm_token_type_ids: bool = False,
                 return_pixel_frames: bool = False, **media_kwargs) -> dict:
        """text: a string, a list of strings, one chat (list of messages) or a list of chats. With chats, the
        images and videos come from the messages. Returns a dict of tensors (on `device`) as described above.
        return_pixel_frames: images come back as resized uint8 `pixel_frames` (one per image) instead of
        `pixel_values`, for the model's fused patch embedding."""
        if padding_side not in ("left", "right"):
            raise PromptError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        unknown = set(media_kwargs) - set(_IMAGE_KW) - set(_VIDEO_KW)
        if unknown:
            raise PromptError(f"unknown processor arguments {sorted(unknown)}; image options: {', '.join(_IMAGE_KW)}; "
                              f"video options: {', '.join(_VIDEO_KW)}")
        texts, images, videos = self._normalize(text, images, videos, add_generation_prompt)
        rows = [enc.ids for enc in self.tokenizer.encode_batch(texts)] if texts is not None else None
        if rows is not None:  # refuse placeholder/media mismatches before any media work
            for token_id, media, name in ((self.image_token_id, images, "image"),
                                          (self.video_token_id, videos, "video")):
                found = sum(r.count(token_id) for r in rows)
                if found != len(media):
                    raise PromptError(f"the text holds {found} <|{name}_pad|> placeholder(s) but {len(media)} "
                                      f"{name}(s) were given")
        out: dict = {}
        if images:
            out.update(self.image_processor(images, device=device, return_frames=return_pixel_frames,
                                            **_only(media_kwargs, _IMAGE_KW)))
        if videos:
            v = self.video_processor(videos, device=device, **_only(media_kwargs, _VIDEO_KW))
            out.update(pixel_values_videos=v["pixel_values_videos"], video_grid_thw=v["video_grid_thw"])
            if self.model_type == "qwen2_5_vl":
                out["second_per_grid_ts"] = list(v["second_per_grid_ts"])
        if rows is None:
            return out
        rows = self._expand(rows, out.get("image_grid_thw"), out.get("video_grid_thw"))
        out.update(self._pad(rows, padding_side, device))
        if return_mm_token_type_ids:
            ids = out["input_ids"]
            out["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return out

    def count_tokens(self, text, images=None, videos=None, *, add_generation_prompt: bool = True,
                     **media_kwargs) -> list:
        """The length of each prompt of `text` (as __call__ takes it, with the same images, videos and options)
        once its placeholders are expanded, from the media's sizes alone, so that a caller can refuse an
        over-long prompt in milliseconds: nothing is decoded or resized and the vision tower is not involved.

        Images: files are opened for their header (PIL decodes no pixel for `.size`). Videos
        (`VideoProcessor.grid_thw`): a file's frame count, frame rate and frame size come from its container
        (PyAV, no frame decoded: the stream's frame count, or its packets counted where the container has none,
        as the video processor counts them), then the processor's own sampling (fps / nframes / min_frames /
        max_frames / video_start / video_end) and pixel budget (video_min_pixels / video_max_pixels /
        total_pixels, per video or per call) give the grid; frames given already sampled (tensor, array, list
        of images or image files) are sized from their shapes and headers. The counts are exact, but for a
        damaged video whose frames do not all decode (the processor then samples fewer frames).

        Media whose size cannot be known without decoding them (an image URL, a video whose container gives no
        frame size) or that __call__ would refuse (unreadable, corrupt, too short, bad options) count 0 tokens:
        the counts are then lower bounds, and __call__ raises what is wrong."""
        texts, images, videos = self._normalize(text, images, videos, add_generation_prompt)
        if texts is None:
            return []
        call = {k: v for k, v in _only(media_kwargs, _IMAGE_KW).items() if v is not None}
        costs = {self.image_token_id: [self._image_tokens(item, call) for item in images],
                 self.video_token_id: [self._video_tokens(item, _only(media_kwargs, _VIDEO_KW)) for item in videos]}
        counts, taken = [], dict.fromkeys(costs, 0)
        for enc in self.tokenizer.encode_batch(texts):
            count = len(enc.ids)
            for token_id, cost in costs.items():
                n = enc.ids.count(token_id)
                count += sum(cost[taken[token_id]:taken[token_id] + n]) - n
                taken[token_id] += n
            counts.append(count)
        return counts

    def _image_tokens(self, item, call: dict) -> int:
        from .image import _split

        try:
            source, own = _split(item)
            size = _header_size(source)
            if size is None:
                return 0
            h, w = self.image_processor.target_size(*size, **(call | own))
        except (Qwen2VLFastError, TypeError, ValueError):  # __call__ raises it with its own message
            return 0
        return (h // self.image_processor.patch_size) * (w // self.image_processor.patch_size) // self.merge_length

    def _video_tokens(self, item, call: dict) -> int:
        try:
            grid = self.video_processor.grid_thw(item, **call)
        except (Qwen2VLFastError, TypeError, ValueError):  # __call__ raises it with its own message
            return 0
        return 0 if grid is None else grid[0] * grid[1] * grid[2] // self.merge_length

    def _normalize(self, text, images, videos, add_generation_prompt):
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        videos = [] if videos is None else (list(videos) if isinstance(videos, (list, tuple)) else [videos])
        if text is None:
            return None, images, videos
        if isinstance(text, str):
            return [text], images, videos
        if not isinstance(text, (list, tuple)) or not text:
            raise PromptError(f"text must be a string, a list of strings or chat messages, got {type(text).__name__}")
        chats = [text] if isinstance(text[0], dict) else text
        if all(isinstance(t, str) for t in chats):
            return list(chats), images, videos
        if not all(isinstance(c, (list, tuple)) for c in chats):
            raise PromptError("a batch must hold only strings or only chats (lists of messages)")
        if images or videos:
            raise PromptError("with chat messages, pass images and videos inside the messages, not as arguments")
        texts = []
        for chat in chats:
            texts.append(render_chat(chat, self.chat_template, add_generation_prompt))
            chat_images, chat_videos = extract_media(chat)
            images += chat_images
            videos += chat_videos
        return texts, images, videos

    def _expand(self, rows, image_grid, video_grid):
        counts = {self.image_token_id: _lengths(image_grid, self.merge_length),
                  self.video_token_id: _lengths(video_grid, self.merge_length)}
        taken = {self.image_token_id: 0, self.video_token_id: 0}
        expanded = []
        for row in rows:
            ids = []
            for t in row:
                if t in counts:
                    ids.extend([t] * counts[t][taken[t]])
                    taken[t] += 1
                else:
                    ids.append(t)
            expanded.append(ids)
        longest = max(map(len, expanded))
        if self.max_length and longest > self.max_length:
            raise PromptError(f"the prompt is {longest} tokens long (with the vision tokens expanded), longer than "
                              f"the model's context of {self.max_length}; lower max_pixels or shorten the text")
        return expanded

    def _pad(self, rows, side, device):
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids.to(device or "cpu"), "attention_mask": mask.to(device or "cpu")}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list:
        return [self.decode(r, skip_special_tokens) for r in rows]


_IMAGE_KW = ("min_pixels", "max_pixels", "resized_height", "resized_width")
# Videos take their pixel budget as video_min_pixels / video_max_pixels here, so that min_pixels / max_pixels
# keep meaning the image budget, as in transformers' processor kwargs.
_VIDEO_KW = ("fps", "nframes", "min_frames", "max_frames", "total_pixels", "video_min_pixels", "video_max_pixels")


def _only(kwargs: dict, names) -> dict:
    return {k: v for k, v in kwargs.items() if k in names}


def _lengths(grid, merge_length) -> list:
    return [] if grid is None else [int(n) // merge_length for n in grid.prod(-1).tolist()]


def _header_size(source):
    """(height, width) of an image source without decoding its pixels, or None where that takes decoding (or
    the source is one the image processor refuses: it then says why)."""
    import io
    import warnings

    import numpy as np
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.height, source.width
    if isinstance(source, (torch.Tensor, np.ndarray)):  # the image processor's layout rules (image.py)
        shape = tuple(source.shape)
        if len(shape) == 2:
            return shape
        if len(shape) != 3:
            return None
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        channels_first = first and (isinstance(source, torch.Tensor) or not last)
        return shape[1:] if channels_first else (shape[:2] if last else None)
    if isinstance(source, (bytes, bytearray)):
        opened = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path[:7].lower() == "file://":
            path = path[7:]
        if not os.path.isfile(path):  # URLs, data URIs, percent-encoded paths: sized when loaded
            return None
        opened = path
    else:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opened) as im:
                return im.height, im.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # the image processor says why
        return None


def _read_json(path) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e})") from None
    return data if isinstance(data, dict) else {}
