"""kimivl as an lmms-eval model (lmms-eval is installed separately; kimivl does not depend on it).

Importing this module with lmms-eval installed registers the model as ``kimivl``. Run lmms-eval through it::

    python -m kimivl.eval.lmms_adapter --model kimivl --model_args pretrained=DIR,dtype=bfloat16,device=cuda \\
        --tasks mmmu_val --batch_size 4 --output_path logs/

(any lmms-eval command-line arguments; this only registers the model first). Requests are lmms-eval's "simple"
ones: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the visuals (PIL images, image
paths, or video paths) come first in the user turn, unless the context has one ``<image>`` mark per image, in
which case they go there. ``gen_kwargs`` ``max_new_tokens``, ``temperature``, ``top_p`` and ``until`` (stop
strings, cut from the answer) are honoured. Of a thinking model's output only the answer goes to lmms-eval's
scorers, as ``kimivl eval`` scores it (``official_text``: the text after ``◁/think▷``, an unclosed reasoning as the
empty answer), and the stop strings are cut from that answer; ``keep_thinking=true`` passes the whole output on.
Only generation is supported: ``loglikelihood`` raises.

Model arguments (``--model_args``, strings): ``pretrained``, ``dtype`` (bfloat16, float16, float32, float64; default the
checkpoint's), ``device`` (default ``cuda`` when there is a GPU, else ``cpu``), ``batch_size`` (a positive integer;
``auto`` or ``auto:N``, lmms-eval's automatic sizing, is a batch of 1: kimivl does not search for the largest batch
that fits), ``max_new_tokens`` (a positive integer, default 1024), ``keep_thinking`` (true/false, default false); a
bad value is a ``ValueError`` naming it. lmms-eval's ``--batch_size`` and ``--device`` arrive as these arguments.

Where lmms-eval looks the model up depends on its release, so ``register`` puts ``kimivl`` in every place it knows:
``lmms_eval.models.MODEL_REGISTRY_V2`` (0.7, whose ``get_model`` reads only that), ``AVAILABLE_SIMPLE_MODELS`` or,
before it, ``AVAILABLE_MODELS`` (from 0.2.3, dotted class paths), and ``lmms_eval.api.registry`` (earlier releases).
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

try:
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model
except ImportError:  # lmms-eval not installed: the class still works on its own (and in tests)
    _Base, register_model = object, None

MODEL_NAME = "kimivl"
CLASS_PATH = "kimivl.eval.lmms_adapter.KimiVLLmms"  # what lmms-eval imports by name (even when run as __main__)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
IMAGE_MARK = "<image>"


def _visual_part(visual) -> dict:
    if isinstance(visual, (str, os.PathLike)) and str(visual).lower().endswith(VIDEO_SUFFIXES):
        return {"type": "video", "video": str(visual)}
    if isinstance(visual, dict):
        raise TypeError("kimivl takes images and videos; this task gives audio or another non-visual input")
    return {"type": "image", "image": visual}


def request_messages(context: str, visuals) -> list[dict]:
    """One lmms-eval request as a kimivl user turn."""
    if visuals is None:
        visuals = []
    elif not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    parts = [_visual_part(v) for v in visuals]
    pieces = context.split(IMAGE_MARK)
    if parts and len(pieces) == len(parts) + 1:
        content = []
        for piece, part in zip(pieces, [*parts, None]):
            if piece:
                content.append({"type": "text", "text": piece})
            if part:
                content.append(part)
        return [{"role": "user", "content": content}]
    text = context.replace(IMAGE_MARK, "").strip()
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _positive_int(name: str, value) -> int:
    """``value`` (an int or its decimal string, as model_args give it) if a positive integer, else a ValueError."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(f"KimiVLLmms: {name} must be a positive integer, got {value!r}")
    return int(text)


def _batch_size(value) -> int:
    """``batch_size``: a positive integer; lmms-eval's ``auto`` and ``auto:N`` (N re-tries of its search) give 1."""
    text = str(value).strip()
    if text == "auto" or (text.startswith("auto:") and text[5:].isascii() and text[5:].isdigit()):
        return 1
    if text.startswith("auto"):
        raise ValueError(f"KimiVLLmms: batch_size must be a positive integer, auto or auto:N, got {value!r}")
    return _positive_int("batch_size", value)


def _flag(name: str, value) -> bool:
    """A boolean model argument: a bool, or true/false (yes/no, 1/0) as a string."""
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"KimiVLLmms: {name} must be true or false, got {value!r}")


def _cut(text: str, until) -> str:
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop)[0]
    return text


class KimiVLLmms(_Base):
    """lmms-eval model: ``pretrained`` is a kimivl checkpoint directory (or pass ``model`` and ``processor``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 1024,
        keep_thinking: bool | str = False,
        model=None,
        processor=None,
        **_,
    ):
        super().__init__()
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.keep_thinking = _flag("keep_thinking", keep_thinking)
        if model is None:
            if not pretrained:
                raise ValueError("KimiVLLmms needs pretrained=<checkpoint directory> (or a model and processor)")
            import torch

            from kimivl import KimiVL, KimiVLProcessor
            from kimivl.checkpoint import WEIGHT_DTYPES
            from kimivl.devices import check_device
            from kimivl.precision import checkpoint_load_dtype

            names = [str(d).removeprefix("torch.") for d in WEIGHT_DTYPES]
            if dtype is not None and dtype not in names:
                raise ValueError(f"KimiVLLmms: dtype must be one of {', '.join(names)}, got {dtype!r}")
            device = check_device(device)  # None: a GPU when there is one
            dtype = checkpoint_load_dtype(pretrained, device, getattr(torch, dtype) if dtype else None)
            model = KimiVL.from_pretrained(pretrained, dtype=dtype, device=device)
            processor = KimiVLProcessor.from_pretrained(pretrained)
        self.model, self.processor = model.eval(), processor
        self.task_dict = getattr(self, "task_dict", {})

    def _sampling(self, gen_kwargs: dict) -> dict:
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        return {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "temperature": temperature,
            "top_p": float(gen_kwargs.get("top_p") or 1.0),
        }

    def generate_until(self, requests) -> list[str]:
        """Answers in request order, generated in batches of requests that share their generation settings."""
        from kimivl.eval.answers import official_text
        from kimivl.inference.chat import generate

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="kimivl", disable=getattr(self, "rank", 0) != 0)
        for members in groups.values():
            gen_kwargs = requests[members[0]].args[1]
            for start in range(0, len(members), self.batch_size_per_gpu):
                chunk = members[start : start + self.batch_size_per_gpu]
                conversations = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
                    conversations.append(request_messages(context, visuals))
                texts = generate(self.model, self.processor, conversations, **self._sampling(gen_kwargs))
                for i, text in zip(chunk, texts):
                    answers[i] = _cut(text if self.keep_thinking else official_text(text), gen_kwargs.get("until"))
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "kimivl's lmms-eval adapter only generates: choose tasks whose output_type is "
            "generate_until (loglikelihood scoring is not implemented)"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("kimivl's lmms-eval adapter does not implement multi-round generation")


def register() -> None:
    """Register ``kimivl`` where the installed lmms-eval's ``get_model`` looks it up (see the module docstring)."""
    import lmms_eval.models as models

    register_model(MODEL_NAME)(KimiVLLmms)
    if hasattr(models, "MODEL_REGISTRY_V2"):
        from lmms_eval.models.registry_v2 import ModelManifest

        manifest = ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
        models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    elif hasattr(models, "AVAILABLE_SIMPLE_MODELS"):
        models.AVAILABLE_SIMPLE_MODELS[MODEL_NAME] = CLASS_PATH
    elif hasattr(models, "AVAILABLE_MODELS"):
        models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH


if register_model is not None:
    register()


def main() -> None:
    """lmms-eval's command line with the ``kimivl`` model registered."""
    if register_model is None:
        raise SystemExit("lmms-eval is not installed: pip install lmms-eval (kimivl does not depend on it)")
    from lmms_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
