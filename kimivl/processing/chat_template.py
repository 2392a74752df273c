"""The Kimi-VL chat format (spec section 9) and the thinking-output splitter.

Messages are dicts ``{"role": "system"|"user"|"assistant", "content": str | list[part]}``. A part is
``{"type": "text", "text": str}``, ``{"type": "image", "image": <path | bytes | PIL image | array>}`` (``"image_url"``
or ``"url"`` are accepted in place of ``"image"``), or ``{"type": "video", "video": <path | bytes | file>,
"fps": 1.0, "max_frames": 64, "max_decoded": None, "max_frame_pixels": 2**26, "max_decoded_pixels": None}`` which is
decoded and written as timestamped frames (see ``kimivl.processing.video``), or ``{"type": "video", "frames":
[images], "timestamps": [seconds]}`` for frames sampled beforehand (timestamps may be an array; without them, one
frame a second). Numbers may be numpy's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kimivl.processing.image import ImageProcessor

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
IMAGE_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"
THINK_OPEN = "◁think▷"
THINK_CLOSE = "◁/think▷"


class MessageError(ValueError):
    """A conversation that is not in the chat format (messages, roles, content parts)."""


# A rendered conversation is a list of segments (text, is_structure): the template's own markup, whose special-token
# strings become special ids, and message content, which is always encoded as plain text.
Segment = tuple[str, bool]


def _turn(role: str, content: list[Segment]) -> list[Segment]:
    return [(f"<|im_{role}|>{role}<|im_middle|>", True), *content, ("<|im_end|>", True)]


def part_type(part: Any, where: str, error: type[ValueError] = MessageError) -> str:
    """The ``type`` of a content part ('text', 'image' or 'video') once its shape is checked; ``error`` names the
    exception raised (the data loaders raise their ``DataError``)."""
    if not isinstance(part, dict):
        raise error(f"{where}: a content part must be an object (dict), got {type(part).__name__}")
    kind = part.get("type")
    if kind not in ("text", "image", "video"):
        raise error(f"{where}: unknown part type {kind!r} (expected 'text', 'image' or 'video')")
    if kind == "text" and not isinstance(part.get("text"), str):
        raise error(f"{where}: a text part needs a string 'text'")
    return kind


def _image_payload(part: dict, where: str) -> Any:
    for key in ("image", "image_url", "url"):
        if key in part:
            value = part[key]
            if key == "image_url" and isinstance(value, dict):
                value = value.get("url")
            if value is None:
                break
            return value
    raise MessageError(f"{where}: image part has no 'image' (or 'image_url' / 'url') value")


def _video_parts(part: dict, where: str, image_processor: ImageProcessor | None) -> list[dict]:
    from kimivl.processing.image import MAX_PIXELS
    from kimivl.processing.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, frames_to_parts, load_video

    if part.get("frames") is not None:  # pre-sampled frames (the data format's alternative to a file)
        return frames_to_parts(part["frames"], part.get("timestamps"))  # no timestamps: one frame a second
    if part.get("video") is None:
        raise MessageError(f"{where}: video part has no 'video' (a file) or 'frames' (a list of images)")
    frames, times = load_video(
        part["video"],
        fps=part.get("fps", DEFAULT_FPS),
        max_frames=part.get("max_frames", DEFAULT_MAX_FRAMES),
        max_decoded=part.get("max_decoded"),
        max_frame_pixels=part.get("max_frame_pixels", MAX_PIXELS),
        image_processor=image_processor,
        max_decoded_pixels=part.get("max_decoded_pixels"),
    )
    return frames_to_parts(frames, times)


def _render_content(
    content: Any, where: str, media: list, image_processor: ImageProcessor | None = None
) -> list[Segment]:
    if isinstance(content, str):
        return [(content, False)]
    if not isinstance(content, list):
        raise MessageError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    out: list[Segment] = []
    for j, part in enumerate(content):
        at = f"{where}, part {j}"
        kind = part_type(part, at)
        if kind == "text":
            out.append((part["text"], False))
        elif kind == "image":
            media.append(_image_payload(part, at))
            out.append((IMAGE_PLACEHOLDER, True))
        else:
            out += _render_content(_video_parts(part, at, image_processor), at, media)
    return out


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list]:
    """Render ``messages`` as the prompt string; also return the images in placeholder order.

    Each image placeholder holds one ``<|media_pad|>``; the processor repeats it (h/2)*(w/2) times for the image
    of the same index. Video parts contribute one image per sampled frame. The string is for display and offsets:
    special-token strings inside message content look like markup here, so encode with ``chat_segments`` instead.
    """
    segments, media = chat_segments(messages, add_generation_prompt)
    return "".join(text for text, _ in segments), media


def chat_segments(
    messages: list[dict], add_generation_prompt: bool = True, image_processor: ImageProcessor | None = None
) -> tuple[list[Segment], list]:
    """``messages`` as ``(text, is_structure)`` segments in order, and the images in placeholder order. Only
    structure segments may be encoded with special tokens; content segments are plain text. Video frames are
    resized as they are decoded, as ``image_processor`` (default: the official settings) resizes images."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    media: list = []
    out: list[Segment] = []
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise MessageError(f"{where}: must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in msg or msg["content"] is None:
            raise MessageError(f"{where}: missing 'content'")
        if i == 0 and role != "system":
            out += _turn("system", [(DEFAULT_SYSTEM_PROMPT, False)])
        out += _turn(role, _render_content(msg["content"], where, media, image_processor))
    if add_generation_prompt:
        out.append((GENERATION_PROMPT, True))
    return out, media


def parse_thinking(text: str) -> tuple[str | None, str]:
    """Split a thinking model's output into ``(reasoning, answer)``, both stripped: the rule of the chat, eval and RL
    rewards. The server (``kimivl.serve.reasoning``) splits alike only outputs that open with ``◁think▷`` (those it can
    tell while streaming; its answer unstripped): any other is all answer there, ``reasoning ◁/think▷ answer`` too.

    As the model card's parser: the answer is what follows the first ``◁/think▷``, the reasoning what precedes it
    (after a ``◁think▷``, when one opens it); an unclosed ``◁think▷`` leaves the answer empty, the rest reasoning.
    No think markers: ``(None, text)``.
    """
    head, closed, answer = text.partition(THINK_CLOSE)
    _, opened, reasoning = head.partition(THINK_OPEN)
    if closed:
        return (reasoning if opened else head).strip(), answer.strip()
    if opened:
        return reasoning.strip(), ""
    return None, text.strip()
