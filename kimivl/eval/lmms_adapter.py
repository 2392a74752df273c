"""kimivl as an lmms-eval model (lmms-eval is installed separately; kimivl does not depend on it).

Importing this module with lmms-eval installed registers the model as ``kimivl``. Run lmms-eval through it::

    python -m kimivl.eval.lmms_adapter --model kimivl --model_args pretrained=DIR,dtype=bfloat16,device=cuda \\
        --tasks mmmu_val --batch_size 4 --output_path logs/

(any lmms-eval command-line arguments; this only registers the model first). Requests are lmms-eval's "simple"
ones: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the visuals (PIL images, image
paths, or video paths) come first in the user turn, unless the context has one ``<image>`` mark per image, in
which case they go there. ``gen_kwargs`` ``max_new_tokens``, ``temperature``, ``top_p`` and ``until`` (stop
strings, cut from the answer) are honoured. Only generation is supported: ``loglikelihood`` raises.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

try:
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model
except ImportError:  # lmms-eval not installed: the class still works on its own (and in tests)
    _Base, register_model = object, None

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
        device: str = "cpu",
        batch_size: int | str = 1,
        max_new_tokens: int = 1024,
        model=None,
        processor=None,
        **_,
    ):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("KimiVLLmms needs pretrained=<checkpoint directory> (or a model and processor)")
            import torch

            from kimivl import KimiVL, KimiVLProcessor
            from kimivl.precision import checkpoint_load_dtype

            dtype = checkpoint_load_dtype(pretrained, device, getattr(torch, dtype) if dtype else None)
            model = KimiVL.from_pretrained(pretrained, dtype=dtype, device=device)
            processor = KimiVLProcessor.from_pretrained(pretrained)
        self.model, self.processor = model.eval(), processor
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" -> 1
        self.max_new_tokens = int(max_new_tokens)
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
                    answers[i] = _cut(text, gen_kwargs.get("until"))
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


if register_model is not None:
    register_model("kimivl")(KimiVLLmms)


def main() -> None:
    """lmms-eval's command line with the ``kimivl`` model registered."""
    if register_model is None:
        raise SystemExit("lmms-eval is not installed: pip install lmms-eval (kimivl does not depend on it)")
    from lmms_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
