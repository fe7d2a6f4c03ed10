"""Chat messages: the Qwen2-VL chat template, rendered with Jinja like transformers, and the media they hold.

Messages follow the qwen-vl-utils format: `{"role": "user", "content": [{"type": "image", "image": ...},
{"type": "video", "video": ...}, {"type": "text", "text": "..."}]}`; content may also be a plain string.
Media parts may carry per-item options (min_pixels, max_pixels, resized_height, resized_width, fps, nframes,
...), passed on to the image and video processors.
"""

from __future__ import annotations

from functools import lru_cache

from ..errors import PromptError

# ChatML with one <|vision_start|><|image_pad|><|vision_end|> per image and the <|video_pad|> form per video,
# and the default system prompt when the chat opens without one (the official Qwen2-VL template's behaviour).
DEFAULT_CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_MEDIA_KEYS = {"image": ("image", "image_url"), "video": ("video",)}


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise PromptError(f"the chat template does not compile: {e}") from None


def render_chat(messages: list, template: str | None = None, add_generation_prompt: bool = True,
                **extra) -> str:
    """The prompt text of one chat (placeholders not yet expanded)."""
    check_messages(messages)
    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except PromptError:
        raise
    except Exception as e:  # a template's own errors (undefined keys, type errors) name the chat, not Jinja
        raise PromptError(f"rendering the chat template failed: {type(e).__name__}: {e}") from None


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("a chat must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"message {i} content must be a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part_kind(part) is None:
                raise PromptError(f"message {i} part {j} must be a dict of type text, image or video, got {part!r:.80}")


def part_kind(part: dict):
    kind = part.get("type")
    if kind in ("image", "image_url") or any(k in part for k in _MEDIA_KEYS["image"]):
        return "image"
    if kind == "video" or "video" in part:
        return "video"
    if kind == "text" or "text" in part:
        return "text"
    return None


def extract_media(messages: list) -> tuple[list, list]:
    """The images and videos of a chat, in order, as the processors accept them (dicts keep their options)."""
    images, videos = [], []
    for m in messages:
        if isinstance(m["content"], str):
            continue
        for part in m["content"]:
            kind = part_kind(part)
            if kind == "image":
                source = next((part[k] for k in _MEDIA_KEYS["image"] if k in part), None)
                if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
                    source = source.get("url")
                if source is None:
                    raise PromptError(f"image part without an image: {part!r:.80}")
                images.append({**_options(part), "image": source})
            elif kind == "video":
                videos.append({**_options(part), "video": part["video"]})
    return images, videos


def _options(part: dict) -> dict:
    return {k: v for k, v in part.items() if k not in ("type", "image", "image_url", "video", "text")}
