"""Seeded generators of a synthetic multimodal world, one task family per module.

Every generator is ``make_<task>(rng: random.Random, difficulty: str | None = None) -> Sample``; the same
``rng`` state always gives the same sample. The text-only corpora, ``TEXTS``, make documents:
``make_text(rng) -> str`` short ones, ``make_long(rng) -> str`` long ones.
"""

from kimivl.data.synthetic.caption import make_caption
from kimivl.data.synthetic.chart import make_chart
from kimivl.data.synthetic.gui import make_gui
from kimivl.data.synthetic.interleaved import make_interleaved
from kimivl.data.synthetic.long import make_long
from kimivl.data.synthetic.ocr import make_ocr
from kimivl.data.synthetic.reasoning import make_reasoning
from kimivl.data.synthetic.sample import DIFFICULTIES, THINK_CLOSE, THINK_OPEN, Clip, Sample, thinking_target
from kimivl.data.synthetic.text import make_text
from kimivl.data.synthetic.video import make_video

GENERATORS = {
    "caption": make_caption,
    "ocr": make_ocr,
    "chart": make_chart,
    "gui": make_gui,
    "video": make_video,
    "reasoning": make_reasoning,
    "interleaved": make_interleaved,
}
TEXTS = {"text": make_text, "long": make_long}
TASKS = (*GENERATORS, *TEXTS)

__all__ = [
    "DIFFICULTIES",
    "GENERATORS",
    "TASKS",
    "TEXTS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "Clip",
    "Sample",
    "make_caption",
    "make_chart",
    "make_gui",
    "make_interleaved",
    "make_long",
    "make_ocr",
    "make_reasoning",
    "make_text",
    "make_video",
    "thinking_target",
]
