"""What each stage reads: its own stream of samples, and only records it can train on, checked before training with
errors that name the file and line."""

import dataclasses
import itertools
import json
import os
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl.data.formats import DataError, write_records
from kimivl.data.indexed import Concat, JsonlRecords
from kimivl.data.mixture import Mixture
from kimivl.distributed.world import World
from kimivl.model.kimivl import KimiVL
from kimivl.rl.trainer import difficulties_of
from kimivl.train.recipe import RecipeError
from kimivl.train.stages.base import StageContext, loop_config
from kimivl.train.stages.joint import JointStage, check_sources, stage_mixture
from kimivl.train.stages.joint import prepare as prepare_joint
from kimivl.train.stages.rl import RLStage, check_problems
from kimivl.train.stages.vit import CaptionStream, ViTStage, caption_of, prepare
from kimivl.train.state import TrainState


def _image(path, colour=(200, 30, 30)):
    Image.fromarray(np.full((28, 28, 3), colour, dtype=np.uint8)).save(path)
    return path.name


def _asked(image, answer="red", question="What colour?"):
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    return {"messages": [user, {"role": "assistant", "content": answer}], "meta": {"gold": "red"}}


def _ctx(items, processor, text=None, seed=0):
    """A stage context over ``items`` (name -> records)."""
    sources = SimpleNamespace(
        items=items,
        is_text=text or dict.fromkeys(items, False),
        checked=set(),
        encoder=lambda p: None,
        fewest=lambda p: None,
        progress=False,
        answers_only=set(),
        difficulties=lambda names: [d for name in names for d in difficulties_of(items[name])],
    )
    return StageContext(SimpleNamespace(seed=seed, out=None), sources, processor)


def test_errors_name_the_file_and_line_not_the_index_among_kept_records(tmp_path, small_processor):
    image = _image(tmp_path / "a.png")
    lines = [json.dumps({**_asked(image), "meta": {"difficulty": d}}) for d in ("easy", "hard", "easy")]
    broken = {"messages": [{"role": "user", "content": "hi"}], "meta": {"difficulty": "easy"}}
    # two blank lines, three records (one filtered out), then the record with no answer on line 6
    (tmp_path / "c.jsonl").write_text("\n\n" + "\n".join(lines) + "\n" + json.dumps(broken) + "\n")
    easy = JsonlRecords(tmp_path / "c.jsonl", text=False, keep=lambda n, r: r["meta"]["difficulty"] == "easy")
    assert len(easy) == 3 and easy.where(2) == f"{tmp_path / 'c.jsonl'}:6"
    assert Concat([easy, easy]).where(4) == f"{tmp_path / 'c.jsonl'}:5"
    stage = JointStage(name="sft", kind="joint", steps=1, lr=1e-3, mix={"c": 1})
    with pytest.raises(DataError, match=rf"data source 'c': {tmp_path / 'c.jsonl'}:6 has no assistant turn"):
        check_sources(stage, _ctx({"c": easy}, small_processor), None)


def test_video_frames_and_files_are_checked_before_training(tmp_path, small_processor):
    image = str(tmp_path / _image(tmp_path / "a.png"))
    (tmp_path / "notes.png").write_text("a text file posing as an image")
    (tmp_path / "clip.mp4").write_text("a text file posing as a video")

    def with_video(part):
        record = _asked(image)
        record["messages"][0]["content"].append({"type": "video", **part})
        return record

    stage = JointStage(name="sft", kind="joint", steps=1, lr=1e-3, mix={"c": 1})
    encode = lambda name, record: small_processor.encode_for_training(record["messages"])  # noqa: E731
    check_sources(stage, _ctx({"c": [with_video({"frames": [str(tmp_path / "a.png")] * 2})]}, small_processor), encode)
    frames = with_video({"frames": [str(tmp_path / "a.png"), str(tmp_path / "notes.png")]})
    # past the records a stage encodes to probe its sources: found by the check of every record alone
    with pytest.raises(DataError, match=f"record 10 names {tmp_path / 'notes.png'}, which is no image that can be"):
        check_sources(stage, _ctx({"c": [_asked(image)] * 9 + [frames]}, small_processor), encode)
    clip = with_video({"video": str(tmp_path / "clip.mp4")})
    with pytest.raises(DataError, match=f"record 1 names {tmp_path / 'clip.mp4'}, which is no video that can be"):
        check_sources(stage, _ctx({"c": [clip]}, small_processor), encode)


def test_the_probe_encodes_a_record_whose_floor_is_the_budget_and_skips_one_over_it(small_processor):
    """Training skips a record whose floor of tokens (``fewest``) is over the budget, not one at it: the probe of a
    source's first records encodes what training may take, so a record of exactly ``budget`` tokens too."""
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "4"}]} for q in "abc"]
    floors = {"a": 256, "b": 257, "c": 1}  # the stage's budget, one over it, well under it
    encoded = []

    def encode(name, record):
        encoded.append(record["messages"][0]["content"])
        return small_processor.encode_for_training(record["messages"])

    stage = JointStage(name="sft", kind="joint", steps=1, lr=1e-3, budget=256, mix={"c": 1})
    fewest = lambda name, record: floors[record["messages"][0]["content"]]  # noqa: E731
    check_sources(stage, _ctx({"c": chats}, small_processor), encode, fewest)
    assert encoded == ["a", "c"]


def test_a_source_checked_for_one_stage_kind_is_checked_again_for_another(small_processor):
    chat = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    ctx = _ctx({"c": [chat]}, small_processor)
    encode = lambda name, record: small_processor.encode_for_training(record["messages"])  # noqa: E731
    check_sources(JointStage(name="sft", kind="joint", steps=1, lr=1e-3, mix={"c": 1}), ctx, encode)
    with pytest.raises(DataError, match="record 1 is no RL problem"):  # a joint stage's check is not an rl stage's
        check_problems(RLStage(name="rl", kind="rl", steps=1, lr=1e-3, sources=["c"]), ctx)


def _meta_model(small_model):
    with torch.device("meta"):
        return KimiVL(small_model.config)


def test_a_vit_stage_takes_only_records_with_an_image_and_an_answer(tmp_path, small_model, small_processor):
    image = str(tmp_path / _image(tmp_path / "a.png"))
    stage = ViTStage(name="vit", kind="vit", steps=1, lr=1e-3, sources=["c"], images_per_batch=2)
    model = _meta_model(small_model)
    with pytest.raises(RecipeError, match=r"stage 'vit': sources \['c'\] hold text documents"):
        prepare(stage, _ctx({"c": ["a document"]}, small_processor, text={"c": True}), model)
    no_image = {"messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}]}
    no_answer = {"messages": _asked(image)["messages"][:1]}
    for bad in (no_image, no_answer):
        with pytest.raises(DataError, match="record 2 has no user turn with an image and an assistant answer"):
            prepare(stage, _ctx({"c": [_asked(image), bad]}, small_processor), model)
    # a system turn first, the answer as a list of parts: the caption is the question and the answer's text
    framed = _asked(image, answer=[{"type": "text", "text": "red"}])
    framed["messages"].insert(0, {"role": "system", "content": "Be brief."})
    assert caption_of(framed) == (image, "What colour?", "red")
    # an image in a system turn is no caption's, and a user turn's text may come before its image
    shown = {"role": "system", "content": [{"type": "image", "image": "logo.png"}, {"type": "text", "text": "Hi."}]}
    reordered = {"role": "user", "content": framed["messages"][1]["content"][::-1]}
    assert caption_of({"messages": [shown, reordered, framed["messages"][2]]}) == (image, "What colour?", "red")
    # the answer is the assistant turn right after the user's image, in a conversation of several turns
    chat = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}, *_asked(image)["messages"]]
    chat += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    assert caption_of({"messages": chat}) == (image, "What colour?", "red")
    assert "passes over c" in prepare(stage, _ctx({"c": [framed]}, small_processor), model).data_line
    pixels, tokens = CaptionStream({"c": [framed]}, small_processor, 2, seed=0, stream="vit").pair(0)
    assert small_processor.tokenizer.decode(tokens) == "What colour? red"


def test_a_caption_of_megabytes_is_cut_to_its_row_without_being_tokenized_whole(tmp_path, small_processor, monkeypatch):
    """A caption row holds 62 tokens, yet the whole answer was tokenized at every draw; now only the first of the
    tokenizer's pieces (``MAX_ENCODE_CHARS`` characters) is, and the row's tokens are the same."""
    from kimivl.processing.tokenizer import MAX_ENCODE_CHARS

    answer = "The red square is next to the blue circle. " * 30_000  # 1.3 MB
    record = _asked(str(tmp_path / _image(tmp_path / "a.png")), answer)
    whole = small_processor.tokenizer.encode(f"What colour? {answer}", allow_special=False)
    pieces, encode = [], small_processor.tokenizer._enc.encode_ordinary
    monkeypatch.setattr(small_processor.tokenizer._enc, "encode_ordinary", lambda t: pieces.append(len(t)) or encode(t))
    _, tokens = CaptionStream({"c": [record]}, small_processor, 2, seed=0, stream="vit").pair(0)
    assert tokens == whole[:62] and sum(pieces) <= MAX_ENCODE_CHARS < len(answer)


def test_each_vit_stage_draws_its_own_stream(tmp_path, small_processor):
    records = [_asked(str(tmp_path / _image(tmp_path / f"{i}.png", (i, 0, 0))), str(i)) for i in range(50)]

    def captions(seed, stream):
        data = CaptionStream({"c": records}, small_processor, 4, seed=seed, stream=stream)
        return [small_processor.tokenizer.decode(data.pair(i)[1]) for i in range(40)]

    assert captions(0, "vit") == captions(0, "vit")
    assert sum(a == b for a, b in zip(captions(0, "vit"), captions(0, "vit-2"))) < 6  # chance: 40 / 50
    assert sum(a == b for a, b in zip(captions(0, "vit"), captions(1, "vit"))) < 6


def test_a_vit_stage_trains_the_tower_and_seeded_heads_on_new_images_each_batch(tmp_path, small_model, small_processor):
    records = [_asked(str(tmp_path / _image(tmp_path / f"{i}.png", (i, 0, 0))), str(i)) for i in range(8)]
    stage = ViTStage(name="vit", kind="vit", steps=1, lr=1e-3, sources=["c"], images_per_batch=2, accum=3)
    try:
        prepared = prepare(stage, _ctx({"c": records}, small_processor), small_model)
        trained = {n for n, p in small_model.named_parameters() if p.requires_grad}
        assert trained == {n for n, _ in small_model.named_parameters() if n.startswith("vision_tower.")}
        assert prepared.data_line == "stage vit: 6 captioned images, 0.75 passes over c"  # steps x accum x images

        def heads(seed):
            trainee = prepare(stage, _ctx({"c": records}, small_processor, seed=seed), small_model).trainee
            return {n: p.detach() for n, p in trainee.named_parameters() if not n.startswith("tower.")}

        same, other = heads(0), heads(1)
        assert all(torch.equal(p, same[n]) for n, p in heads(0).items())  # the recipe's seed draws the heads
        assert not torch.equal(same["text_pos"], other["text_pos"])
    finally:
        small_model.requires_grad_(True)
    data = CaptionStream({"c": records}, small_processor, 2, seed=0, stream="vit")
    (first, at), (second, _) = itertools.islice(data.batches(0), 2)
    assert at == 2 and not torch.equal(first.text_ids, second.text_ids)  # each batch draws new samples
    resumed, _ = next(data.batches(at))
    assert torch.equal(resumed.text_ids, second.text_ids) and torch.equal(resumed.pixel_values, second.pixel_values)


def test_a_stage_s_loop_settings_reach_its_training_loop():
    for stage in (
        ViTStage(name="v", kind="vit", steps=7, lr=1e-3, sources=["c"], accum=3, clip=0.25, log_every=2, ckpt_every=5),
        JointStage(
            name="j", kind="joint", steps=7, lr=1e-3, mix={"c": 1}, accum=3, clip=0.25, log_every=2, ckpt_every=5
        ),
    ):
        cfg = loop_config(stage, SimpleNamespace(bf16=False), sources={"c": {"records": 1, "index": None}})
        got = (cfg.steps, cfg.accum, cfg.clip, cfg.log_every, cfg.ckpt_every, cfg.bf16, cfg.sources)
        assert got == (7, 3, 0.25, 2, 5, False, {"c": {"records": 1, "index": None}}), stage.kind
        assert cfg.settings == stage.record() and cfg.settings["clip"] == 0.25 and "ckpt_every" not in cfg.settings


def _truncated(path):
    """A PNG whose header reads (so the checks before training pass it) but whose pixels are cut short."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    return path.name


def _with_a_truncated_image(tmp_path, at: int, n: int):
    """A source of ``n`` captioned images whose record ``at`` (0-based) has a truncated one, written as JSONL after a
    blank line (so record ``at`` is on line ``at + 2``)."""
    good, bad = _image(tmp_path / "a.png"), _truncated(tmp_path / "cut.png")
    records = [_asked(bad if i == at else good) for i in range(n)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in records))
    return path, JsonlRecords(path, text=False)


def test_a_vit_sample_that_cannot_be_encoded_names_its_source_file_and_line(tmp_path, small_processor):
    """The vit stage stopped with the image's error alone ("cannot decode image cut.png: image file is truncated")."""
    path, records = _with_a_truncated_image(tmp_path, at=3, n=5)
    data = CaptionStream({"other": [_asked(str(tmp_path / "a.png"))], "c": records}, small_processor, 4, seed=0)
    with pytest.raises(DataError, match=rf"sample \d+: {path}:5 of source 'c' cannot be encoded: cannot decode image "):
        for i in range(200):  # sample i draws any of the 6 records: the cut one comes soon
            data.pair(i)


def test_the_records_standardize_images_measures_are_checked_before_training(tmp_path, small_processor):
    """Record 13 past the first 8 (the records encoded to probe a source), among the 32 that standardize_images
    encodes: that stage failed at setup with the image's error alone, naming no record."""
    path, records = _with_a_truncated_image(tmp_path, at=12, n=20)
    encode = lambda name, record: small_processor.encode_for_training(record["messages"])  # noqa: E731
    stage = JointStage(name="sft", kind="joint", steps=1, lr=1e-3, mix={"c": 1})
    check_sources(stage, _ctx({"c": records}, small_processor), encode)  # not calibrated: record 13 is not probed
    stage.standardize_images = 1.0
    with pytest.raises(DataError, match=rf"data source 'c': {path}:14 cannot be encoded: cannot decode image .*cut"):
        check_sources(stage, _ctx({"c": records}, small_processor), encode)


def test_a_stage_training_the_vision_side_only_refuses_text_documents_and_warns_of_rows_without_images(
    tmp_path, small_processor, caplog
):
    """A row without images reaches no weight of the vision tower or projector: a source of text documents in the mix
    of a stage that trains only them would train nothing (and the run passed the check, then crashed at its first
    text row); a conversation source whose first records hold no image is named in a warning."""
    image = _image(tmp_path / "a.png")
    plain = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
    items = {"c": [_asked(str(tmp_path / image))], "t": ["red and blue"], "p": [plain]}
    text = {"c": False, "t": True, "p": False}

    def encode(name, item):
        return (
            small_processor.encode_text(item) if text[name] else small_processor.encode_for_training(item["messages"])
        )

    def check(**settings):
        stage = JointStage(name="align", kind="joint", steps=1, lr=1e-3, **settings)
        check_sources(stage, _ctx(items, small_processor, text=text), encode)

    with pytest.raises(
        RecipeError,
        match=r"stage 'align': data sources \['t'\] hold text documents \(t\), and the stage trains only "
        r"\['multi_modal_projector'\], which a row without images never reaches: .* or train language_model too",
    ):
        check(mix={"c": 1, "t": 1}, train=["multi_modal_projector"])
    with pytest.raises(RecipeError, match=r"data sources \['t'\] hold text documents"):  # drawn as the mix moves
        check(mix={"c": 1, "t": 0}, mix_end={"t": 1}, train=["vision_tower", "multi_modal_projector"])
    check(mix={"c": 1, "t": 0}, train=["multi_modal_projector"])  # never drawn
    check(mix={"c": 1, "t": 1})  # the language model trains on its rows
    assert "hold no image" not in caplog.text
    check(mix={"c": 1, "p": 1}, train=["multi_modal_projector"])
    assert "the first 1 records of data source 'p' hold no image, and the stage trains only" in caplog.text
    assert "source 'c' hold no image" not in caplog.text
    items["m"], text["m"] = [_asked(str(tmp_path / image)), plain] * 2, False  # every other record has an image
    caplog.clear()
    check(mix={"m": 1, "p": 1}, train=["vision_tower"])
    assert "source 'm' hold no image" not in caplog.text
    assert "the first 1 records of data source 'p' hold no image, and the stage trains only ['vision_tower']" in (
        caplog.text
    )


def _lengths_ctx(small_processor, tmp_path):
    """Sources of short and long texts (written once: a later call reads the files as they are then)."""
    short, long = ["red"] * 40, [" ".join(random.Random(0).choices(["red", "blue"], k=60))] * 40
    if not (tmp_path / "short.jsonl").is_file():
        write_records(tmp_path / "short.jsonl", [{"text": t} for t in short])
        write_records(tmp_path / "long.jsonl", [{"text": t} for t in long])
    items = {n: JsonlRecords(tmp_path / f"{n}.jsonl", text=True) for n in ("short", "long")}
    return _ctx(items, small_processor, text={"short": True, "long": True})


def test_the_sample_count_is_planned_over_the_whole_stage_mix(tmp_path, small_processor):
    """A mix moving from short samples to long ones holds, on average, samples of their mean length: the probe
    samples the stage's mean shares, not its end weights."""
    ctx = _lengths_ctx(small_processor, tmp_path)
    encode = lambda name, text: small_processor.encode_text(text)  # noqa: E731
    short, long = (len(encode(n, ctx.sources.items[n][0]).input_ids) for n in ("short", "long"))
    stage = JointStage(
        name="pretrain", kind="joint", steps=10, lr=1e-3, budget=256, mix={"short": 1}, mix_end={"long": 1}
    )
    _, line = stage_mixture(stage, ctx, encode)
    mean = int(line.split("(")[1].split(" tokens")[0])
    assert abs(mean - (short + long) / 2) < (long - short) / 4, (line, short, long)


def test_samples_over_the_budget_are_counted_when_the_stage_ends(tmp_path, small_model, small_processor, caplog):
    ctx = _lengths_ctx(small_processor, tmp_path)
    ctx.recipe = SimpleNamespace(seed=0, out=tmp_path / "run", bf16=False)
    ctx.sources.encoder = lambda processor: lambda name, text: processor.encode_text(text)
    long = len(small_processor.encode_text(ctx.sources.items["long"][0]).input_ids)
    stage = JointStage(name="s", kind="joint", steps=2, lr=1e-3, budget=long - 1, mix={"short": 1, "long": 1})
    prepared = prepare_joint(stage, ctx, small_model)
    optimizer = torch.optim.SGD([p for p in small_model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared.run(optimizer, scheduler, False)
    small_model.requires_grad_(True)
    skipped = [r.getMessage() for r in caplog.records if "were skipped" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("stage s: ")
    count = int(skipped[0].split(": ")[1].split()[0])
    assert count > 0 and skipped[0].endswith(f"samples over the budget of {long - 1} tokens were skipped")


def _run_joint(small_model, small_processor, tmp_path, answers_only=(), **settings):
    """Two steps of a joint stage over short and long texts (``answers_only``: the sources so marked), resuming what
    ``tmp_path / 'run'`` holds."""
    ctx = _lengths_ctx(small_processor, tmp_path)
    ctx.sources.answers_only = set(answers_only)
    ctx.recipe = SimpleNamespace(seed=0, out=tmp_path / "run", bf16=False)
    ctx.sources.encoder = lambda processor: lambda name, text: processor.encode_text(text)
    stage = JointStage(
        name="s", kind="joint", steps=2, lr=1e-3, **{"budget": 256, "mix": {"short": 1, "long": 1}, **settings}
    )
    prepared = prepare_joint(stage, ctx, small_model)
    optimizer = torch.optim.SGD([p for p in small_model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    try:
        prepared.run(optimizer, scheduler, False)
    finally:
        small_model.requires_grad_(True)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"mix": {"short": 3, "long": 1}}, "mix: {'short': 1, 'long': 1} then, {'short': 3, 'long': 1} now"),
        ({"mix_end": {"long": 1}}, "mix_end: None then, {'long': 1} now"),
        ({"replacement": False}, "replacement: True then, False now"),
        ({"budget": 200}, "budget: 256 then, 200 now"),
        (
            {"clip": 0.01, "accum": 2, "bias_update_rate": 0.5, "rope_theta": 800000.0},
            "accum: 1 then, 2 now; bias_update_rate: 0.001 then, 0.5 now; clip: 1.0 then, 0.01 now; "
            "rope_theta: None then, 800000.0 now",
        ),
    ],
)
def test_resuming_after_the_stage_s_settings_changed_is_refused(
    tmp_path, small_model, small_processor, caplog, change, named
):
    """A changed mix (or mix_end, replacement, budget) went on from the saved sample index in another stream: a pass
    without replacement drew 15 distinct records of 20. The seed was refused; these were accepted without a word, and
    so were a changed clip, accum, bias_update_rate or rope_theta (two RoPE bases in one stage)."""
    from kimivl.train.step import TrainingError

    _run_joint(small_model, small_processor, tmp_path)
    with caplog.at_level("WARNING"):
        _run_joint(small_model, small_processor, tmp_path, ckpt_every=5, log_every=3, recompute=True)  # free to change
    assert "holds no record" not in caplog.text
    with pytest.raises(TrainingError, match=rf"s: the settings of this run differ from .*\({re.escape(named)}\)"):
        _run_joint(small_model, small_processor, tmp_path, **change)


def test_a_checkpoint_of_an_earlier_kimivl_compares_the_settings_it_recorded(
    tmp_path, small_model, small_processor, caplog
):
    """Before the stage's settings were recorded whole, a checkpoint held those its data stream followed (``data``),
    or none: those are compared, the others resume with a warning naming them."""
    from kimivl.train.step import TrainingError

    _run_joint(small_model, small_processor, tmp_path)
    trainer = tmp_path / "run" / "s" / "checkpoints" / "step-0000002" / "trainer.pt"
    saved = torch.load(trainer, weights_only=True)
    del saved["settings"], saved["sources"]
    saved["data"] = {"mix": {"short": 1, "long": 1}, "mix_end": None, "replacement": True, "budget": 256}
    torch.save(saved, trainer)
    with pytest.raises(TrainingError, match=r"\(replacement: True then, False now\)"):
        _run_joint(small_model, small_processor, tmp_path, replacement=False)
    everything = JointStage(name="s", kind="joint", steps=1, lr=1e-3, mix={"short": 1}).record()
    for recorded in (saved["data"], {}):
        unrecorded = ", ".join(sorted(set(everything) - set(recorded)))
        assert "clip" in unrecorded and ("mix" in unrecorded) == (not recorded)
        saved["data"] = recorded or None
        torch.save(saved, trainer)
        caplog.clear()
        with caplog.at_level("WARNING"):
            _run_joint(small_model, small_processor, tmp_path, clip=0.01)
        assert f"holds no record of the stage's settings {unrecorded} (written before kimivl kept them)" in caplog.text
        assert "may come from a kimivl before 2026-12-06" not in caplog.text  # a pass with replacement
    caplog.clear()  # no record at all: perhaps the stream before 2026-12-06, whose order a pass without replacement
    with caplog.at_level("WARNING"):  # would mix with today's
        _run_joint(small_model, small_processor, tmp_path, replacement=False)
    assert "may come from a kimivl before 2026-12-06, whose joint stages drew their samples in another order" in (
        caplog.text
    )


def test_resuming_after_a_source_s_records_changed(tmp_path, small_model, small_processor, caplog):
    """Records added to a source (or removed) between a kill and --resume were drawn by their index without a word:
    the rest of a pass without replacement drew some records twice and others never. Now refused, naming the
    counts; a record fixed in place (as many records, as a data error asks) resumes with a warning naming the source,
    and a copy of the file (another mtime) resumes as it is."""
    from kimivl.train.step import TrainingError

    _run_joint(small_model, small_processor, tmp_path, replacement=False)
    short = tmp_path / "short.jsonl"
    lines = short.read_text().splitlines(keepends=True)
    short.write_text("".join(lines + [json.dumps({"text": "blue"}) + "\n"]))
    with pytest.raises(TrainingError, match=r"s: the data sources .* \(short: 40 records then, 41 now\): .* Restore"):
        _run_joint(small_model, small_processor, tmp_path, replacement=False)
    short.write_text("".join(lines[:-1]))
    with pytest.raises(TrainingError, match=r"\(short: 40 records then, 39 now\)"):
        _run_joint(small_model, small_processor, tmp_path, replacement=False)
    short.write_text("".join(lines))
    os.utime(short, (1, 1))  # a copy: same records, another mtime
    with caplog.at_level("WARNING"):
        _run_joint(small_model, small_processor, tmp_path, replacement=False)
    assert "changed since" not in caplog.text
    short.write_text("".join([json.dumps({"text": "blue"}) + "\n", *lines[1:]]))  # record 1 fixed in place
    with caplog.at_level("WARNING"):
        _run_joint(small_model, small_processor, tmp_path, replacement=False)
    assert "s: data sources short changed since " in caplog.text and "long" not in caplog.text


def test_resuming_after_a_source_s_answers_only_was_toggled(tmp_path, small_model, small_processor):
    """A source's ``answers_only`` toggled between a kill and --resume trained the rest of the stage on other targets
    (reasoning kept, or dropped) without a word: counts and bytes of the file are the same."""
    from kimivl.train.step import TrainingError

    _run_joint(small_model, small_processor, tmp_path)
    with pytest.raises(TrainingError, match=r"s: the data sources .* \(long: answers_only False then, True now\)"):
        _run_joint(small_model, small_processor, tmp_path, answers_only={"long"})
    _run_joint(small_model, small_processor, tmp_path)


def _run_rl(tmp_path, model, processor, clip=1.0, budget=2048, **rl):
    """One iteration of an rl stage (its ``clip``, its ``rl`` settings) on the problems of ``tmp_path / 'p.jsonl'``,
    resuming what ``tmp_path / 'run'`` holds."""
    from kimivl.train.stages.rl import prepare as prepare_rl

    stage = RLStage(
        name="rl",
        kind="rl",
        steps=1,
        lr=1e-3,
        budget=budget,
        ckpt_every=1,
        clip=clip,
        sources=["p"],
        rl={"problems": 2, "samples": 2, "max_new_tokens": 2, "updates": 1, "temperature": 1.0, **rl},
    )
    ctx = _ctx({"p": JsonlRecords(tmp_path / "p.jsonl", text=False)}, processor)
    ctx.recipe = SimpleNamespace(seed=0, out=tmp_path / "run", bf16=False, stages=[stage])
    prepared = prepare_rl(stage, ctx, model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    try:
        prepared.run(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), False)
    finally:
        model.requires_grad_(True)


def test_resuming_an_rl_stage_after_its_settings_or_problems_changed(tmp_path, small_model, small_processor, caplog):
    """An rl stage recorded none of its settings: a resume after its temperature, samples, problems, objective, clip
    (...) changed went on silently, and one after its problems were reordered gave the sampler's successes and visits
    of each index to another problem (only another count was caught, by the sampler)."""
    from kimivl.train.step import TrainingError

    problems = [
        {
            "messages": [{"role": "user", "content": f"question {'?' * i}"}],
            "meta": {"task": "toy", "gold": i, "difficulty": "easy"},
        }
        for i in range(4)
    ]
    write_records(tmp_path / "p.jsonl", problems)
    _run_rl(tmp_path, small_model, small_processor)
    _run_rl(tmp_path, small_model, small_processor, budget=1024)  # rows packed for log-probs: memory, not the update
    _run_rl(tmp_path, small_model, small_processor, keep_checkpoints=3)  # what is kept, not what is trained
    changed = {"temperature": 1.5, "samples": 4, "problems": 4, "tau": 5.0, "length_weight": 0.5, "length_warmup": 2}
    named = (
        "rl.length_warmup: 0 then, 2 now; rl.length_weight: 0.0 then, 0.5 now; rl.problems: 2 then, 4 now; "
        "rl.samples: 2 then, 4 now; rl.tau: 0.5 then, 5.0 now; rl.temperature: 1.0 then, 1.5 now"
    )
    with pytest.raises(TrainingError, match=rf"rl: the settings of this run differ from .*\({re.escape(named)}\)"):
        _run_rl(tmp_path, small_model, small_processor, **changed)
    changed = {"objective": "grpo", "curriculum": {0.0: {"easy": 1}}, "clip": 0.5}
    named = "clip: 1.0 then, 0.5 now; rl.curriculum: None then, {0.0: {'easy': 1}} now; rl.objective: 'opmd' then"
    with pytest.raises(TrainingError, match=re.escape(named)):
        _run_rl(tmp_path, small_model, small_processor, **changed)
    write_records(tmp_path / "p.jsonl", problems + problems[:1])
    with pytest.raises(TrainingError, match=r"rl: the data sources .*\(p: 4 records then, 5 now\)"):
        _run_rl(tmp_path, small_model, small_processor)
    write_records(tmp_path / "p.jsonl", problems[::-1])
    with caplog.at_level("WARNING"):
        _run_rl(tmp_path, small_model, small_processor)
    assert "rl: data sources p changed since " in caplog.text


def test_an_rl_stage_trains_its_parts_on_the_problems_of_all_its_sources(tmp_path, small_model, small_processor):
    """The stage's ``train`` parts alone are trained, on the problems of every source (4 drawn of 2 + 2), and its run
    returns the last iteration's metrics; a prompt over the model's context is refused when the stage starts."""
    from kimivl.train.stages.rl import prepare as prepare_rl

    for name, n in (("p", 2), ("q", 2), ("long", 1)):
        words = "1 + " * 3000 if name == "long" else "2 + 2"
        problem = {"messages": [{"role": "user", "content": f"{words}?"}], "meta": {"task": "toy", "gold": 4}}
        write_records(tmp_path / f"{name}.jsonl", [problem] * n)
    items = {name: JsonlRecords(tmp_path / f"{name}.jsonl", text=False) for name in ("p", "q", "long")}
    rl = {"problems": 4, "samples": 2, "max_new_tokens": 2, "updates": 1}
    stage = RLStage(name="rl", kind="rl", steps=1, lr=1e-3, sources=["p", "q"], train=["multi_modal_projector"], rl=rl)
    ctx = _ctx(items, small_processor)
    ctx.recipe = SimpleNamespace(seed=0, out=tmp_path / "run", bf16=False, stages=[stage])
    try:
        prepared = prepare_rl(stage, ctx, small_model)
        trained = {n.split(".")[0] for n, p in small_model.named_parameters() if p.requires_grad}
        assert trained == {"multi_modal_projector"}
        optimizer = torch.optim.SGD([p for p in small_model.parameters() if p.requires_grad], lr=0.0)
        metrics = prepared.run(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), False)
    finally:
        small_model.requires_grad_(True)
    assert 0 <= metrics["accuracy"] <= 1 and "reward" in metrics
    stage.sources = ["long"]
    with pytest.raises(DataError, match="'long': .* does not fit the model's context"):
        prepare_rl(stage, ctx, small_model)


def test_resuming_a_vit_stage_after_its_settings_changed_is_refused(tmp_path, small_model, small_processor):
    from kimivl.train.step import TrainingError

    records = [_asked(str(tmp_path / _image(tmp_path / f"{i}.png", (i, 0, 0))), str(i)) for i in range(4)]
    ctx = _ctx({"c": records, "d": records[:2]}, small_processor)
    ctx.recipe = SimpleNamespace(seed=0, out=tmp_path / "run", bf16=False)

    def run(sources, **settings):
        stage = ViTStage(
            name="vit", kind="vit", steps=1, lr=1e-3, sources=sources, **{"images_per_batch": 2, **settings}
        )
        prepared = prepare(stage, ctx, small_model)
        optimizer = torch.optim.SGD([p for p in prepared.trainee.parameters() if p.requires_grad], lr=0.0)
        try:
            prepared.run(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), False)
        finally:
            small_model.requires_grad_(True)

    run(["c"])
    run(["c"])
    with pytest.raises(TrainingError, match=r"vit: the settings .*\(sources: \['c'\] then, \['c', 'd'\] now\)"):
        run(["c", "d"])
    with pytest.raises(TrainingError, match=r"vit: the settings .*\(images_per_batch: 2 then, 4 now\)"):
        run(["c"], images_per_batch=4)
    with pytest.raises(TrainingError, match=r"vit: the settings .*\(accum: 1 then, 2 now; clip: 1.0 then, 0.5 now\)"):
        run(["c"], accum=2, clip=0.5)


def test_the_mix_moves_over_every_accumulated_row_and_a_sample_of_the_budget_fits(tmp_path, small_processor):
    """Each step packs ``accum`` rows, so the horizon over which weights go from ``mix`` to ``mix_end`` is ``accum``
    times longer; a probe sample exactly as long as the budget fits it."""
    ctx = _lengths_ctx(small_processor, tmp_path)
    encode = lambda name, text: small_processor.encode_text(text)  # noqa: E731
    stage = dict(name="p", kind="joint", steps=10, lr=1e-3, budget=256, mix={"short": 1}, mix_end={"long": 1})
    one, _ = stage_mixture(JointStage(**stage, accum=1), ctx, encode)
    three, _ = stage_mixture(JointStage(**stage, accum=3), ctx, encode)
    assert one.horizon > 10 and abs(three.horizon - 3 * one.horizon) < 3
    long = len(encode("long", ctx.sources.items["long"][0]).input_ids)
    exact, line = stage_mixture(
        JointStage(**{**stage, "budget": long, "mix": {"long": 1}, "mix_end": None}), ctx, encode
    )
    assert exact.budget == long and f"({long} tokens each on average, 1.0 a row)" in line
    from kimivl.train.stages.joint import packed_rows

    # a row filled exactly holds both; the last row counts by the share of the budget it fills
    assert [packed_rows(n, 8) for n in ([4, 4], [4, 5], [8, 1, 7, 3])] == [1, 1.625, 2.375]


def test_the_plan_samples_until_its_samples_fill_rows(tmp_path, small_processor):
    """32 samples that all fit one row said 32 a row of any budget: here rows of 256 tokens hold 85 of these 3-token
    texts. The probe samples on until its samples fill rows (up to ``PROBE_LIMIT``), and its count is
    what packing then draws."""
    ctx = _lengths_ctx(small_processor, tmp_path)
    encode = lambda name, text: small_processor.encode_text(text)  # noqa: E731
    stage = JointStage(name="p", kind="joint", steps=5, lr=1e-3, budget=256, mix={"short": 1})
    data, line = stage_mixture(stage, ctx, encode)
    drawn = next(i for row, (_, i) in enumerate(data.batches(0), 1) if row == 5)
    assert data.horizon == drawn == 5 * 85, (line, drawn)  # before: 5 * 32


def test_the_plan_counts_the_samples_it_skips_and_names_the_shortest_when_none_fits(tmp_path, small_processor):
    """About half the samples (the long texts) are over the budget: the horizon counts the indices they take too, the
    line says how many of all those probed were over, and a budget no sample fits names the shortest of them."""
    ctx = _lengths_ctx(small_processor, tmp_path)
    encode = lambda name, text: small_processor.encode_text(text)  # noqa: E731
    stage = JointStage(name="p", kind="joint", steps=20, lr=1e-3, budget=30, mix={"short": 1, "long": 1})
    data, line = stage_mixture(stage, ctx, encode)
    drawn = next(i for row, (_, i) in enumerate(data.batches(0), 1) if row == 20)
    assert abs(data.horizon - drawn) < 0.15 * drawn, (line, drawn)  # counting fitting samples alone: about half
    over, probed = map(int, re.search(r"; (\d+) of (\d+) sampled records are over the budget", line).groups())
    assert probed > 32 and 0.4 < over / probed < 0.6, line  # the count probed, not the 32 probed at least
    # records of 20 and 40 tokens, none within a budget of 16
    lengths = _ctx({"a": [20], "b": [40]}, small_processor)
    with pytest.raises(RecipeError, match=r"none of 32 sampled records fits .* \(the shortest holds 20\)"):
        stage_mixture(dataclasses.replace(stage, budget=16, mix={"a": 1, "b": 1}), lengths, lambda name, n: _tokens(n))


def _tokens(n):
    return SimpleNamespace(input_ids=[0] * n)


class _Probe:
    """A stand-in for a probe's ``Mixture``: ``sample(i)`` is ``draw(i)``."""

    def __init__(self, budget, draw):
        self.budget, self.sample = budget, draw


def test_the_probe_counts_only_samples_that_fit_and_stops_at_its_limit():
    from kimivl.train.stages.joint import PROBE_LIMIT, probe_lengths

    # samples of 1 token fill no row of a budget this large: the probe ends at its limit (a sample past it: IndexError)
    assert len(probe_lengths(_Probe(10**9, ([(object(), 1)] * 1024).__getitem__))) == PROBE_LIMIT == 1024
    # 32 samples of 50 that fit fill 16 rows of 100 at sample 62; the odd ones, over the budget, fill none
    odd_over = _Probe(100, lambda i: (None, 10**6) if i % 2 else (object(), 50))
    assert probe_lengths(odd_over) == [(10**6, True) if i % 2 else (50, False) for i in range(63)]


def test_the_check_opens_each_image_once_and_finds_the_same_bad_one(tmp_path, small_processor, monkeypatch):
    from kimivl.train.stages import base

    images = [str(tmp_path / _image(tmp_path / name)) for name in ("a.png", "b.png")]
    (tmp_path / "bad.png").write_text("a text file posing as an image")
    opened = []

    def counted(f, path):
        opened.append(path)
        return open_image(f, path)

    open_image = base.open_image
    monkeypatch.setattr(base, "open_image", counted)
    no_problem = lambda record: None  # noqa: E731
    base.check_records(_ctx({"c": [_asked(images[i % 2]) for i in range(50)]}, small_processor), ["c"], no_problem)
    assert sorted(opened) == images  # 50 records, 2 images: each opened once
    records = [_asked(images[i % 2]) for i in range(30)]
    records[20] = _asked(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match=f"record 21 names {tmp_path / 'bad.png'}, which is no image that can be"):
        base.check_records(_ctx({"c": records}, small_processor), ["c"], no_problem)


@pytest.mark.parametrize("progress", [True, False])
def test_a_large_source_shows_a_bar_while_it_is_checked(tmp_path, small_processor, monkeypatch, progress):
    from kimivl.train.stages import base

    image = _image(tmp_path / "a.png")
    write_records(tmp_path / "c.jsonl", [_asked(str(tmp_path / image))] * 3)
    bars = []

    def recorded(**kwargs):
        bars.append(kwargs)
        return progress_bar(**kwargs)

    progress_bar = base.progress_bar
    monkeypatch.setattr(base, "progress_bar", recorded)
    monkeypatch.setattr(base, "PROGRESS_BYTES", (tmp_path / "c.jsonl").stat().st_size)  # the file is "large"
    ctx = _ctx({"c": JsonlRecords(tmp_path / "c.jsonl", text=False)}, small_processor)
    ctx.sources.progress = progress
    base.check_records(ctx, ["c"], lambda record: None)
    assert [(b["total"], b["disable"]) for b in bars] == [(3, not progress)]


def test_the_warnings_of_a_resume_come_from_rank_0_alone(caplog):
    """Every rank reads the same checkpoint, and each logged its warnings: 8 copies on 8 ranks."""
    then = {"short": {"records": 2, "index": "a", "answers_only": False}}
    for rank in (0, 1):
        state = SimpleNamespace(
            sources={"short": {"records": 2, "index": "b", "answers_only": False}},
            settings={"clip": 1.0},
            world=World(rank=rank, size=2),
            stage="s",
            ckpt_dir=Path("c"),
        )
        state.stream = Mixture({"short": [1, 2]}, None, 8, {"short": 1}, seed=1, stream="s")
        caplog.clear()
        with caplog.at_level("WARNING"):
            TrainState._check_sources(state, Path("f"), then)
            TrainState._check_settings(state, Path("f"), None, None)
            TrainState._load_stream(state, Path("f"), Mixture({"short": [1, 2]}, None, 8, {"short": 1}).state_dict())
        assert ("s: data sources short changed since f" in caplog.text) == (rank == 0), caplog.text
        assert ("s: f holds no record of the stage's settings clip" in caplog.text) == (rank == 0), caplog.text
        another = "s: the data stream of this run is not the one f saved its draws of (seed: 0 then, 1 now; stream: ''"
        assert (another in caplog.text) == (rank == 0), caplog.text
