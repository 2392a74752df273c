import math
import random
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kimivl.data.synthetic import (
    DIFFICULTIES,
    GENERATORS,
    THINK_CLOSE,
    THINK_OPEN,
    Clip,
    Sample,
    make_caption,
    make_chart,
    make_gui,
    make_interleaved,
    make_long,
    make_ocr,
    make_reasoning,
    make_text,
    make_video,
)
from kimivl.data.synthetic.arithmetic import _ok, make_arithmetic, solve
from kimivl.data.synthetic.caption import describe
from kimivl.data.synthetic.draw import COLOURS, TOKEN_PX, canvas_size, draw_shape, render_text
from kimivl.data.synthetic.geometry import make_geometry
from kimivl.data.synthetic.long import FACTS, RECALL
from kimivl.data.synthetic.text import SENTENCES
from kimivl.data.synthetic.vocab import NUMBER_WORDS

SEEDS = range(12)


def samples(make, difficulty=None, seeds=SEEDS):
    return [make(random.Random(seed), difficulty) for seed in seeds]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def colour_mask(img: Image.Image, colour: str) -> np.ndarray:
    return (pixels(img) == COLOURS[colour]).all(-1)


def components(mask: np.ndarray) -> int:
    """8-connected components of a boolean mask."""
    seen, count = np.zeros_like(mask), 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        seen[y, x] = True
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def px(box, img):
    return [round(v * (img.width if i % 2 == 0 else img.height)) for i, v in enumerate(box)]


@pytest.mark.parametrize("task", sorted(GENERATORS))
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_samples_are_well_formed_and_deterministic(task, difficulty):
    make = GENERATORS[task]
    for seed in range(6):
        s = make(random.Random(seed), difficulty)
        assert isinstance(s, Sample) and s.content and isinstance(s.content[-1], str) and s.question.strip()
        assert isinstance(s.answer, str) and s.answer.strip()
        assert s.meta["task"] in (task, "reasoning") and s.meta["difficulty"] == difficulty and "kind" in s.meta
        gold = s.meta["gold"]
        if task != "gui":  # gui answers format the gold point or box
            assert s.answer == (", ".join(gold) if isinstance(gold, list) else str(gold))
        assert s.images and all(im.mode == "RGB" and min(im.size) >= 16 for im in s.images)
        again = make(random.Random(seed), difficulty)
        assert (again.question, again.answer, again.meta, again.solution) == (s.question, s.answer, s.meta, s.solution)
        assert [im.tobytes() for im in again.images] == [im.tobytes() for im in s.images]


def test_unknown_difficulty_is_rejected():
    with pytest.raises(ValueError, match="unknown difficulty 'medium-rare'"):
        make_caption(random.Random(0), "medium-rare")


def test_canvas_sizes_vary_and_mostly_fit_the_token_budget():
    rng = random.Random(0)
    sizes = [canvas_size(rng) for _ in range(2000)]
    patches = [(w // 14) * (h // 14) for w, h in sizes]
    assert all(56 <= min(s) and max(s) <= 448 for s in sizes)
    assert sum(p <= 256 for p in patches) / len(patches) > 0.85 and max(patches) <= 1024
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.4 and max(ratios) > 2.5 and len(set(sizes)) > 1500


@pytest.mark.parametrize(
    "shape, area",
    [
        ("circle", math.pi),
        ("square", 1.7**2),
        ("triangle", 1.9 * 1.8 / 2),
        ("star", 5 * 0.45 * math.sin(math.pi / 5)),  # five points at r, five inner corners at 0.45 r
        ("diamond", 1.5),
    ],
)
def test_each_shape_fills_its_own_area_within_its_radius(shape, area):
    img, r = Image.new("RGB", (200, 200), (255, 255, 255)), 60
    draw_shape(ImageDraw.Draw(img), shape, 100, 100, r, COLOURS["red"])
    mask = colour_mask(img, "red")
    ys, xs = np.nonzero(mask)
    assert mask[100, 100] and mask.sum() == pytest.approx(area * r * r, rel=0.04)
    assert 100 - r <= min(xs.min(), ys.min()) and max(xs.max(), ys.max()) <= 100 + r
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        draw_shape(ImageDraw.Draw(img), "hexagon", 100, 100, r, COLOURS["red"])


def test_text_styles_lean_and_thicken_only_as_named():
    def ink(style):
        return np.asarray(render_text("IIII\nIIII", 24, (0, 0, 0), style))[..., 3] > 127

    def lean(mask):  # how far right the top third of the ink sits from the bottom third
        ys, xs = np.nonzero(mask)
        return xs[ys < mask.shape[0] / 3].mean() - xs[ys > 2 * mask.shape[0] / 3].mean()

    regular, bold, slanted = ink("regular"), ink("bold"), ink("slanted")
    assert lean(regular) == lean(bold) == 0 and lean(slanted) > 0.15 * slanted.shape[0]
    assert bold.sum() > 1.5 * regular.sum()
    with pytest.raises(ValueError, match="unknown font style 'italic'"):
        render_text("I", 24, (0, 0, 0), "italic")


def test_captions_name_each_shape_with_its_article_and_place():
    objects = [
        {"colour": "orange", "shape": "circle", "position": "top left"},
        {"colour": "red", "shape": "star", "position": "centre"},
        {"colour": "blue", "shape": "square", "position": "right"},
    ]
    assert describe(objects) == (
        "An orange circle at the top left, a red star in the centre and a blue square on the right."
    )
    assert describe(objects[1:2]) == "A red star in the centre."


def test_caption_answers_match_the_drawn_shapes():
    for s in samples(make_caption, seeds=range(40)):
        img, objects = s.images[0], s.meta["objects"]
        for o in objects:
            x1, y1, x2, y2 = px(o["box"], img)
            assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
            assert colour_mask(img, o["colour"])[(y1 + y2) // 2, (x1 + x2) // 2]
        for colour in {o["colour"] for o in objects}:  # one blob per object of each colour
            assert components(colour_mask(img, colour)) == sum(o["colour"] == colour for o in objects)
        kind, gold, question = s.meta["kind"], s.meta["gold"], s.question
        if kind == "count_all":
            assert gold == len(objects)
        elif kind == "count_colour":
            colour = question.split()[2]
            assert gold == components(colour_mask(img, colour))
        elif kind == "count":
            colour, shape = question.split()[2], question.split()[3][:-1]
            assert gold == sum(o["colour"] == colour and o["shape"] == shape for o in objects)
        elif kind == "colour":
            assert [o["colour"] for o in objects if f"the {o['shape']}?" in question] == [gold]
        elif kind == "describe":
            assert gold.count(",") + gold.count(" and ") == len(objects) - 1


def test_ocr_text_lies_inside_its_box():
    for s in samples(make_ocr, seeds=range(30)):
        img = s.images[0]
        arr = pixels(img)
        background = np.median(arr.reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.linalg.norm(arr - background, axis=-1) > 120)  # ink; noise stays far below
        assert len(xs) > 10
        x1, y1, x2, y2 = px(s.meta["box"], img)
        assert x1 - 1 <= xs.min() and xs.max() <= x2 and y1 - 1 <= ys.min() and ys.max() <= y2
        assert s.answer == s.meta["gold"] and ("\n" in s.answer) == (s.meta["kind"] == "page")


def ink_cells(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(inked, clear): per token cell, whether it holds ink, and whether none of that ink continues into a
    neighbouring cell."""
    arr = pixels(img)
    ink = np.linalg.norm(arr - np.median(arr.reshape(-1, 3), axis=0), axis=-1) > 100  # noise stays far below
    rows, cols = img.height // TOKEN_PX, img.width // TOKEN_PX
    ink = ink[: rows * TOKEN_PX, : cols * TOKEN_PX]
    across = np.zeros_like(ink)  # ink pixels with an ink neighbour on the other side of a cell border
    cut_x = ink[:, TOKEN_PX - 1 : -1 : TOKEN_PX] & ink[:, TOKEN_PX::TOKEN_PX]
    across[:, TOKEN_PX - 1 : -1 : TOKEN_PX] |= cut_x
    across[:, TOKEN_PX::TOKEN_PX] |= cut_x
    cut_y = ink[TOKEN_PX - 1 : -1 : TOKEN_PX] & ink[TOKEN_PX::TOKEN_PX]
    across[TOKEN_PX - 1 : -1 : TOKEN_PX] |= cut_y
    across[TOKEN_PX::TOKEN_PX] |= cut_y

    def per_cell(mask):
        return mask.reshape(rows, TOKEN_PX, cols, TOKEN_PX).any((1, 3))

    return per_cell(ink), ~per_cell(across)


@pytest.mark.parametrize("make", [make_ocr, make_arithmetic])
def test_easy_print_puts_one_character_in_each_token_cell(make):
    for s in samples(make, "easy", seeds=range(40)):
        img = s.images[0]
        assert img.width % TOKEN_PX == 0 and img.height % TOKEN_PX == 0
        text = s.answer if make is make_ocr else f"{s.meta['expression']} = ?"
        inked, clear = ink_cells(img)
        rows, cols = np.nonzero(inked)
        n = len(text.replace(" ", ""))
        assert len(set(rows)) == 1 and sorted(cols) == list(range(cols.min(), cols.min() + n))
        assert clear.all()  # every character stays inside its own cell
        if make is make_ocr:
            x1, y1, x2, y2 = px(s.meta["box"], img)
            assert (x1, y1, x2, y2) == (
                cols.min() * TOKEN_PX,
                rows[0] * TOKEN_PX,
                (cols.max() + 1) * TOKEN_PX,
                (rows[0] + 1) * TOKEN_PX,
            )
    if make is make_ocr:  # true one-digit sums, never below zero
        for s in samples(make, "easy", seeds=range(40)):
            assert eval(s.answer.replace("×", "*").replace("=", "==")) and int(s.answer.split("= ")[1]) >= 0


def test_easy_geometry_labels_sit_in_their_own_token_cells():
    for s in samples(make_geometry, "easy", seeds=range(30)):
        inked, clear = ink_cells(s.images[0])
        assert (inked & clear).sum() == 2  # the two one-digit labels; the figure's sides cross cell borders


def test_chart_bars_are_proportional_to_values():
    charts = [s for s in samples(make_chart, seeds=range(40))]
    assert {s.meta["chart"] for s in charts} == {"bar", "line"}
    for s in charts:
        img, values = s.images[0], s.meta["values"]
        assert ("bar" in s.question) == (s.meta["chart"] == "bar") == ("point" not in s.question)
        mask = colour_mask(img, s.meta["colour"])
        if s.meta["chart"] == "bar":
            heights = {}
            for k, box in s.meta["marks"].items():
                x1, _, x2, _ = px(box, img)
                heights[k] = int(mask[:, (x1 + x2) // 2].sum())
            units = {heights[k] / values[k] for k in values}
            assert len(units) == 1 and units.pop() >= 3
        else:
            ys = {}
            for k, (x, y) in s.meta["marks"].items():
                cx, cy = round(x * img.width), round(y * img.height)
                assert mask[cy - 1 : cy + 2, cx - 1 : cx + 2].any()
                ys[k] = y * img.height
            keys = sorted(values)
            slopes = [(ys[a] - ys[b]) / (values[b] - values[a]) for a in keys for b in keys if values[a] != values[b]]
            assert not slopes or (max(slopes) - min(slopes) < 0.05 and min(slopes) >= 3)
        kind, gold = s.meta["kind"], s.meta["gold"]
        if kind == "max":
            assert values[gold] == max(values.values())
        elif kind == "min":
            assert values[gold] == min(values.values())
        elif kind == "value":
            assert gold == values[s.question.rstrip("?")[-1]]


def test_hard_chart_questions_compare_two_different_bars():
    kinds, sizes = set(), set()
    for s in samples(make_chart, "hard", seeds=range(40)):
        kind, values, keys = s.meta["kind"], s.meta["values"], re.findall(r"(?:bar|point) ([A-F])\b", s.question)
        kinds.add(kind)
        sizes.add(len(values))
        if kind == "sum":
            assert len(set(keys)) == 2 and s.meta["gold"] == values[keys[0]] + values[keys[1]]
        elif kind == "diff":
            assert s.meta["gold"] == values[keys[0]] - values[keys[1]] > 0
    assert kinds == {"value", "diff", "sum"} and sizes == {5, 6}  # categories


def test_gui_gold_box_is_the_named_widget():
    for s in samples(make_gui, seeds=range(40)):
        img, widgets = s.images[0], s.meta["widgets"]
        labels = [w["label"] for w in widgets]
        assert len(set(labels)) == len(labels)
        target = [w for w in widgets if f"'{w['label']}'" in s.question]
        assert len(target) == 1 and target[0]["box"] == s.meta["box"]
        arr = pixels(img)
        for w in widgets:
            x1, y1, x2, y2 = px(w["box"], img)
            fill = COLOURS[w["colour"]] if w["kind"] == "button" else (255, 255, 255)
            for x, y in ((x1 + 2, y1 + 2), (x2 - 3, y2 - 3), (x1 + 2, y2 - 3)):
                assert tuple(arr[y, x]) == fill
            if w["kind"] == "field":  # room to type after the label
                assert (arr[y1 + 2 : y2 - 2, x2 - 26 : x2 - 2] == 255).all()
        bx1, by1, bx2, by2 = s.meta["box"]
        if s.meta["kind"] == "point":
            x, y = s.meta["gold"]
            assert s.answer == f"({x:.2f}, {y:.2f})"
            assert bx1 <= x <= bx2 and by1 <= y <= by2
        else:
            assert s.answer.startswith("[") and all(abs(a - b) <= 0.0051 for a, b in zip(s.meta["gold"], s.meta["box"]))


def test_video_motion_and_order_match_the_frames():
    clips = samples(make_video, seeds=range(30))
    assert {s.meta["kind"] for s in clips} >= {"direction", "mover", "first", "last", "order"}
    for s in clips:
        clip = s.content[0]
        assert isinstance(clip, Clip) and len(clip.frames) == len(clip.timestamps) >= 3
        assert clip.timestamps == sorted(clip.timestamps) == s.meta["timestamps"]
        assert len({f.size for f in clip.frames}) == 1
        objects = s.meta["objects"]
        if s.meta["kind"] in ("direction", "mover"):  # the mover, its still distractors and one more for "mover"
            most = {"easy": 1, "medium": 2, "hard": 4}[s.meta["difficulty"]] + (s.meta["kind"] == "mover")
            assert len(objects) <= most
            mover = objects[0]
            centres = []
            for frame in clip.frames:
                ys, xs = np.nonzero(colour_mask(frame, mover["colour"]))
                centres.append((xs.mean(), ys.mean()))
            dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
            moved = {"right": dx, "left": -dx, "down": dy, "up": -dy}
            if s.meta["kind"] == "direction":
                assert max(moved, key=moved.get) == s.meta["gold"] and moved[s.meta["gold"]] > 5
            else:
                assert s.meta["gold"] == f"{mover['colour']} {mover['shape']}"
                for o in objects[1:]:
                    assert len({frame.tobytes() for frame in [f.crop(f.getbbox()) for f in clip.frames]}) > 1
                    assert all(
                        colour_mask(f, o["colour"]).sum() == colour_mask(clip.frames[0], o["colour"]).sum()
                        for f in clip.frames
                    )
        else:
            first_seen = [
                next(k for k, f in enumerate(clip.frames) if colour_mask(f, o["colour"]).any()) for o in objects
            ]
            assert first_seen == sorted(first_seen) and len(set(first_seen)) == len(first_seen)
            names = [f"{o['colour']} {o['shape']}" for o in objects]
            gold = s.meta["gold"]
            assert gold == {"first": names[0], "last": names[-1], "order": names}[s.meta["kind"]]


def test_reasoning_answers_and_thinking_targets():
    problems = samples(make_reasoning, seeds=range(60))
    assert {s.meta["kind"] for s in problems} == {"arithmetic", "geometry"}
    for s in problems:
        gold = s.meta["gold"]
        assert isinstance(gold, int) and s.solution.endswith(f"The answer is {gold}.")
        assert s.target(thinking=True) == f"{THINK_OPEN}{s.solution}{THINK_CLOSE}{s.answer}"
        assert s.target() == s.answer == str(gold)
        if s.meta["kind"] == "arithmetic":
            assert eval(s.meta["expression"].replace("×", "*").replace("÷", "/")) == gold
            assert s.meta["operations"] == {"easy": 1, "medium": 2, "hard": 3}[s.meta["difficulty"]]
        else:
            d, figure = s.meta["sides"], s.meta["figure"]
            area = {
                "rectangle": d["w"] * d["h"],
                "square": d["w"] ** 2,
                "triangle": d["w"] * d["h"] / 2,
                "l-shape": d["w"] * d["h"] - d.get("cut_w", 0) * d.get("cut_h", 0),
            }[figure]
            perimeter = 2 * (d["w"] + d["h"])
            assert gold == (area if "area" in s.question else perimeter)


def test_arithmetic_solutions_take_one_operation_of_two_numbers_at_a_time():
    assert solve(("+", ("-", 9, 1), ("×", 3, 4))) == (
        20,
        "Plan: brackets first, then × and ÷, then + and - from left to right.\n"
        "3 × 4 = 12, so we get 9 - 1 + 12.\n"
        "9 - 1 = 8, so we get 8 + 12.\n"
        "8 + 12 = 20.\n"
        "Check: 20 - 12 = 8, which matches.\n"
        "The answer is 20.",
    )
    assert solve(("×", ("+", 2, 3), ("-", 9, ("÷", 8, 4))))[1].splitlines()[1:5] == [
        "2 + 3 = 5, so we get 5 × (9 - 8 ÷ 4).",
        "8 ÷ 4 = 2, so we get 5 × (9 - 2).",
        "9 - 2 = 7, so we get 5 × 7.",
        "5 × 7 = 35.",
    ]
    assert solve(("÷", 8, 2))[1] == "8 ÷ 2 = 4.\nCheck: 4 × 2 = 8, which matches.\nThe answer is 4."
    assert _ok(("-", 3, 3)) and _ok(("×", 37, 27))  # every result in 0..999
    assert not _ok(("-", 3, 4)) and not _ok(("×", 40, 25)) and not _ok(("÷", 7, 2))  # below, above, inexact
    step = re.compile(r"(\d+) ([-+×÷]) (\d+) = (\d+)(?:\.|, so we get (.+)\.)")
    for s in samples(make_arithmetic, seeds=range(40)):
        steps = [step.fullmatch(line) for line in s.solution.splitlines() if step.fullmatch(line)]
        assert len(steps) == s.meta["operations"]
        for m in steps:
            a, op, b, v = int(m[1]), m[2], int(m[3]), int(m[4])
            assert {"+": a + b, "-": a - b, "×": a * b, "÷": a / b}[op] == v
            assert m[5] is None or eval(m[5].replace("×", "*").replace("÷", "/")) == s.meta["gold"]


def test_interleaved_documents_have_two_figures_and_consistent_answers():
    for s in samples(make_interleaved, seeds=range(30)):
        kinds = [type(p) for p in s.content]
        assert kinds == [str, Image.Image, str, Image.Image, str]
        assert "Figure 1" in s.content[0] and "Figure 2" in s.content[2]
        figures, gold, q = s.meta["figures"], s.meta["gold"], s.question
        if s.meta["kind"] == "count":
            assert gold == len(figures[int(q.split("Figure ")[1][0]) - 1])
        elif s.meta["kind"] == "more":
            assert gold == f"Figure {1 if len(figures[0]) > len(figures[1]) else 2}"
        elif s.meta["kind"] == "total":
            colour = q.split()[2]
            assert gold == sum(o["colour"] == colour for f in figures for o in f)


def test_text_documents_are_deterministic_and_varied():
    docs = [make_text(random.Random(i)) for i in range(200)]
    assert docs == [make_text(random.Random(i)) for i in range(200)]
    assert len(set(docs)) == 200 and all(d.strip() == d and "  " not in d for d in docs)
    assert any("\n\n" in d for d in docs)


def test_text_sentences_state_true_facts():
    word = {w: i for i, w in enumerate(NUMBER_WORDS)}
    for make in SENTENCES:
        for seed in range(30):
            text, family = make(random.Random(seed)), make.__name__
            n = [int(x) for x in re.findall(r"\d+", text)]
            if family == "_sum":
                m = re.fullmatch(r"(\w+) plus (\w+) is (\w+)\.(?: In digits, \d+ \+ \d+ = \d+\.)?", text)
                a, b, c = (word[x.lower()] for x in m.groups())
                assert a + b == c and n in ([], [a, b, c])
            elif family == "_product":
                assert n[0] * n[1] == n[2] == n[3] and n[3] // n[4] == n[5] == n[0] and n[4] == n[1]
            elif family == "_story":
                assert n[0] + n[1] == n[2] if " more. " in text else n[0] - n[1] == n[2] >= 0
            elif family == "_counting":
                counted = [word[x] for x in text.removeprefix("Counting: ")[:-1].split(", ")]
                assert 3 <= len(counted) <= 6 and counted == list(range(counted[0], counted[0] + len(counted)))
            elif family == "_spelling":
                m = re.fullmatch(r"The word (\w+) is spelled ([\w-]+) and has (\d+) letters\.", text)
                assert m[2] == "-".join(m[1]) and int(m[3]) == len(m[1])
            elif family == "_compare":
                assert n[0] > n[1] and n[2:] == n[1::-1]
            elif family == "_chart":
                assert n[0] == n[1] and text.split()[4] == text.split()[12]
            elif family == "_geometry":
                assert n[0] * n[1] == n[2] and 2 * (n[0] + n[1]) == n[3]


def test_long_documents_end_by_recalling_one_of_their_facts():
    docs = [make_long(random.Random(seed)) for seed in range(80)]
    assert docs == [make_long(random.Random(seed)) for seed in range(80)]
    patterns = {
        kind: re.escape(fact).replace(re.escape("{key}"), r"(\w+)").replace(re.escape("{n}"), r"\d{3,7}")
        for kind, (_, fact) in FACTS.items()
    }
    sizes, depths, counts = [], [], set()
    for doc in docs:
        body, recalled = doc.split("\n\n" + RECALL)
        kind = next(k for k, p in patterns.items() if re.fullmatch(p, recalled))
        stated = list(re.finditer(patterns[kind], body))
        assert 1 <= len(stated) <= 3 and len({m.group(1) for m in stated}) == len(stated)  # one fact per key
        assert [m.group(0) for m in stated].count(recalled) == 1
        assert not any(re.search(p, body) for k, p in patterns.items() if k != kind)
        counts.add(len(stated))
        sizes.append(len(body))
        depths += [m.start() / len(body) for m in stated]
    assert counts == {1, 2, 3} and min(sizes) < 1500 and max(sizes) > 8000
    assert min(depths) < 0.05 and max(depths) > 0.95
