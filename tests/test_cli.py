"""The kimivl command: chat on a saved checkpoint."""

import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl import KimiVL, KimiVLProcessor, generate
from kimivl.cli import _read_piped, main


def _typed(monkeypatch, *lines):
    """A session's input, not from a terminal: these lines, then Ctrl-D."""
    typed = iter(lines)
    monkeypatch.setattr("sys.stdin", io.StringIO())

    def read(prompt=""):
        for line in typed:
            return line
        raise EOFError

    monkeypatch.setattr("builtins.input", read)


def test_chat_one_question_with_image(checkpoint, small_model, small_processor, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(img)
    assert (
        main(
            [
                "chat",
                "--model",
                str(checkpoint),
                "--image",
                str(img),
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
                "--dtype",
                "float32",
                "What colour?",
            ]
        )
        == 0
    )
    expected = generate(
        small_model,
        small_processor,
        [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "What colour?"}]}],
        max_new_tokens=5,
    )
    assert capsys.readouterr().out.strip() == expected.strip()


def test_chat_about_a_video(checkpoint, small_model, small_processor, tmp_path, capsys):
    import av

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 56, 56, "yuv420p"
        for i in range(8):  # 2 s: a square moving right
            frame = np.zeros((56, 56, 3), np.uint8)
            frame[20:36, 4 + 5 * i : 20 + 5 * i] = 255
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    args = ["--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32", "Which way does it move?"]
    assert main(["chat", "--model", str(checkpoint), "--video", str(clip), *args]) == 0
    expected = generate(
        small_model,
        small_processor,
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": str(clip)}, {"type": "text", "text": "Which way does it move?"}],
            }
        ],
        max_new_tokens=5,
    )
    assert capsys.readouterr().out.strip() == expected.strip()
    assert main(["chat", "--model", str(checkpoint), "--video", str(tmp_path / "none.mp4"), "hi"]) == 2
    assert "none.mp4" in capsys.readouterr().err


@pytest.fixture
def piped():
    """Puts bytes behind a pipe and names it as bash's ``<(...)`` does (``/dev/fd/N``): it can be read once."""
    opened = []

    def pipe(data: bytes) -> str:
        read, write = os.pipe()
        opened.append(read)

        def feed():
            with os.fdopen(write, "wb") as f:
                f.write(data)

        threading.Thread(target=feed, daemon=True).start()
        return f"/dev/fd/{read}"

    yield pipe
    for fd in opened:
        os.close(fd)


def test_chat_reads_a_piped_image_and_video_once(
    checkpoint, small_model, small_processor, tmp_path, monkeypatch, capsys, piped
):
    """``--image /dev/stdin`` (or ``<(...)``) was read to its end by the check before the model loads, then found
    empty when the answer read it again; in a session it was re-read each turn."""
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(img)
    flags = ["--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32"]
    assert main(["chat", *flags, "--image", piped(img.read_bytes()), "What colour?"]) == 0
    captured = capsys.readouterr()
    message = {
        "role": "user",
        "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "What colour?"}],
    }
    first = generate(small_model, small_processor, [message], max_new_tokens=5)
    assert captured.out.strip() == first.strip(), captured.err
    _typed(monkeypatch, "What colour?", "And now?")  # a session: the image stays in the history of the second turn
    assert main(["chat", *flags, "--image", piped(img.read_bytes())]) == 0
    captured = capsys.readouterr()
    history = [message, {"role": "assistant", "content": first.strip()}, {"role": "user", "content": "And now?"}]
    second = generate(small_model, small_processor, history, max_new_tokens=5)
    assert captured.out.split("\n")[:2] == [first.strip(), second.strip()], captured.err
    import av

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 56, 56, "yuv420p"
        for i in range(4):
            frame = np.full((56, 56, 3), 60 * i, np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    assert main(["chat", *flags, "--video", piped(clip.read_bytes()), "What happens?"]) == 0
    captured = capsys.readouterr()
    message = {
        "role": "user",
        "content": [{"type": "video", "video": str(clip)}, {"type": "text", "text": "What happens?"}],
    }
    assert captured.out.strip() == generate(small_model, small_processor, [message], max_new_tokens=5).strip()
    assert main(["chat", *flags, "--image", piped(b"GIF89a" + bytes(30)), "hi"]) == 2
    assert "--image /dev/fd/" in capsys.readouterr().err  # a bad piped image is named by its path, not its length


def test_chat_interactive_and_errors(checkpoint, monkeypatch, capsys, tmp_path):
    _typed(monkeypatch, "Count the circles.", "And squares?")
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["chat", "--model", str(checkpoint), "--image", str(bad), "hi"]) == 2
    assert "bad.png" in capsys.readouterr().err
    loaded = []  # bad settings and media are named before the model loads (minutes for the A3B)
    monkeypatch.setattr("kimivl.cli._load", lambda *a: loaded.append(a))
    for flags, words in (
        (["--image", str(bad)], "bad.png"),
        (["--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--video", str(bad)], "bad.png"),
    ):
        assert main(["chat", "--model", str(checkpoint), *flags, "hi"]) == 2
        assert words in capsys.readouterr().err and not loaded, flags


def test_a_turn_that_cannot_be_answered_leaves_the_session_going(checkpoint, monkeypatch, capsys):
    """One prompt over the context ended the interactive session (exit 2) and lost the conversation."""
    monkeypatch.setattr("kimivl.inference.chat.stream_generate", lambda *a, **k: iter(["an answer"]))
    _typed(monkeypatch, "word " * 6000, "Count the circles.")
    monkeypatch.setattr("sys.stdin", _Terminal())
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "does not fit the model's context" in captured.err and "ask again" in captured.err
    assert captured.out.split("\n")[1:] == ["an answer", "", ""]  # no empty answer line, as a piped session has


def test_a_piped_video_of_megabytes_is_read_whole(piped):
    """A piped ``--video`` is held in memory up to ``PIPED_VIDEO_BYTES`` (1 GiB): a clip of a few MiB is its bytes."""
    clip = bytes(range(256)) * (3 << 12)  # 3 MiB
    assert _read_piped(argparse.Namespace(image=[], video=piped(clip))) == ([], clip)


def test_a_pipe_or_file_another_user_opened_is_read_through_this_process_s_descriptor(unprivileged, tmp_path):
    """``sudo -u svc kimivl chat --video /dev/stdin ... < clip`` (or ``cat clip |``): the file or pipe is the calling
    user's, and opening /dev/stdin anew is refused ("Permission denied: '/dev/stdin'"); its descriptor reads it. One
    open for writing only (``--image /dev/stdout``) is named, not a bare "Bad file descriptor"."""
    read, write = os.pipe()
    os.write(write, b"clip bytes")
    os.close(write)
    os.fchmod(read, 0)  # as another user's pipe: this one may not open it anew
    (tmp_path / "clip").write_bytes(b"file bytes")
    (tmp_path / "clip").chmod(0)
    shell_opened = os.open(tmp_path / "clip", os.O_RDONLY)  # as the shell's "<" opens it, before sudo
    unread, out = os.pipe()
    try:
        for fd, data in ((read, b"clip bytes"), (shell_opened, b"file bytes")):
            video = f"/dev/fd/{fd}"
            assert unprivileged(lambda: _read_piped(argparse.Namespace(image=[], video=video))) == ([], data)
        with pytest.raises(ValueError, match=rf"--image /dev/fd/{out} cannot be read: Bad file descriptor"):
            _read_piped(argparse.Namespace(image=[f"/dev/fd/{out}"], video=None))
    finally:
        for fd in (read, shell_opened, out, unread):
            os.close(fd)


def test_a_piped_session_keeps_a_line_for_each_answer_and_exits_2_when_a_question_failed(
    checkpoint, monkeypatch, capsys
):
    """``kimivl chat < questions.txt > answers.txt`` with a question refused (too long for the context, not UTF-8)
    left that answer's line out, so each later answer sat on an earlier question's line, exited 0 and said "ask
    again". Now a refused question's answer line is empty, stderr names the question and its line, and the session
    exits 2 naming every one refused."""
    import sys

    def stream(model, processor, messages, **sampling):
        yield f"answer to {len(messages)} messages"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    typed = b"q1\n\n" + b"word " * 6000 + b"\nq3\n\xff\xfe\nq5\n"  # a blank line is no question
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    assert main(["chat", "--model", str(checkpoint)]) == 2
    out, err = capsys.readouterr()
    assert out == "answer to 1 messages\n\nanswer to 3 messages\n\nanswer to 5 messages\n"
    lines = err.splitlines()
    assert lines[0].startswith("kimivl chat: error: question 2 (line 3): the question does not fit the model's context")
    assert lines[1].startswith("kimivl chat: error: question 4 (line 5): the line is not UTF-8 text")
    assert lines[2:] == [
        "kimivl chat: error: 2 of 5 questions not answered: question 2 (line 3), question 4 (line 5); each left an "
        "empty answer line"
    ]
    assert "ask again" not in err


def test_a_large_model_is_announced_as_it_loads(checkpoint, monkeypatch, capsys):
    """Loading the A3B (33 GB, about 45 s from a warm cache, minutes from disk) printed nothing: chat, serve and eval
    sat silent. Weights from ``LOAD_NOTICE_BYTES`` up are announced, with their size, device and dtype, and the time
    the load took; a small model loads unsaid."""
    import kimivl.cli

    def stream(model, processor, messages, **sampling):
        yield "an answer"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    assert main(["chat", "--model", str(checkpoint), "--dtype", "float32", "Hi"]) == 0
    assert "kimivl: load" not in capsys.readouterr().err
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    monkeypatch.setattr(kimivl.cli, "LOAD_NOTICE_BYTES", size)
    assert main(["chat", "--model", str(checkpoint), "--dtype", "float32", "Hi"]) == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if line.startswith("kimivl: load")]
    assert said[0] == f"kimivl: loading {checkpoint} ({size / 1e9:.1f} GB in 1 file) on cpu in float32"
    assert re.fullmatch(r"kimivl: loaded in \d+ s", said[1]) and len(said) == 2 and out == "an answer\n"
    monkeypatch.setattr("kimivl.checkpoint.weights_size", lambda path: (2, 33_000_000_000))  # the A3B's, in SI GB
    assert main(["chat", "--model", str(checkpoint), "--dtype", "float32", "Hi"]) == 0
    assert f"kimivl: loading {checkpoint} (33.0 GB in 2 files) on cpu in float32\n" in capsys.readouterr().err


def test_a_piped_answer_stopped_by_ctrl_c_makes_the_session_exit_2(checkpoint, monkeypatch, capsys):
    """``kimivl chat < questions.txt > answers.txt`` with an answer cut short by Ctrl-C exited 0: the answers file
    held half an answer as if it were whole. Now stderr names the question and the session exits 2 naming it."""
    import sys

    asked = []

    def stream(model, processor, messages, **sampling):
        asked.append(messages[-1]["content"][0]["text"])
        yield "half an"
        if asked[-1] == "q2":
            raise KeyboardInterrupt
        yield " answer"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    typed = b"q1\n\nq2\nq3\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    assert main(["chat", "--model", str(checkpoint)]) == 2
    out, err = capsys.readouterr()
    assert out == "half an answer\nhalf an\nhalf an answer\n"
    assert err.splitlines() == [
        "kimivl chat: question 2 (line 3) stopped; the question is dropped from the conversation",
        "kimivl chat: error: 1 answer stopped by Ctrl-C: question 2 (line 3); each line holds what was said before",
    ]


def test_a_full_conversation_drops_its_earliest_exchanges_to_fit_the_context(checkpoint, tmp_path, monkeypatch, capsys):
    """Once the history filled the 4096-token context every question failed ("ask again") and none could fit again.
    The earliest exchanges, their media with them, are now dropped until the prompt leaves room for the answer's
    --max-new-tokens (or none is left to drop), and no more; the ids the model sees are the kept conversation's, as
    encoded in one call. A question that alone does not fit is refused."""
    from kimivl.config import KimiVLConfig
    from kimivl.inference import chat

    processor = KimiVLProcessor.from_pretrained(checkpoint)
    context = KimiVLConfig.from_pretrained(checkpoint).text_config.max_position_embeddings
    answer = "The circles are red. " * 130
    assert 900 < len(processor.tokenizer.encode(answer)) < 1400  # three exchanges fill the context
    prompts = []

    def stream_ids(model, ids, pixel_values, grids, params, stop_ids):
        prompts.append((ids[0], pixel_values is not None))
        yield from ([t] for t in processor.tokenizer.encode(answer))

    monkeypatch.setattr(chat, "stream_ids", stream_ids)
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(img)
    questions = ["Count the circles.", "And squares?", "Which is more?", "word " * 5000, "Why?", "And now?", "Sure?"]
    _typed(monkeypatch, *questions)
    # piped, as the questions are here, the question refused makes the session exit 2 at its end
    assert main(["chat", "--model", str(checkpoint), "--image", str(img), "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err
    assert f"the question does not fit the model's context of {context} tokens: with the system prompt it takes" in err
    asked = [q for q in questions if not q.startswith("word")]
    assert len(prompts) == len(asked)
    exchanges, first, drops = [], 0, []  # first: the earliest exchange kept
    for i, (question, (ids, pixels)) in enumerate(zip(asked, prompts)):
        image = [{"type": "image", "image": str(img)}] if i == 0 else []
        message = {"role": "user", "content": [*image, {"type": "text", "text": question}]}
        fits = [
            k
            for k in range(first, i + 1)
            if len(processor.encode([*sum(exchanges[k:], []), message]).input_ids) + 300 <= context or k == i
        ]
        drops += [fits[0] - first] * (fits[0] > first)
        first = fits[0]
        kept = [*sum(exchanges[first:], []), message]
        assert ids == processor.encode(kept).input_ids, i
        assert pixels == (first == 0), i
        exchanges.append([message, {"role": "assistant", "content": answer.strip()}])
    assert drops and first > 1  # the conversation filled the context more than once
    notes = [line for line in err.splitlines() if "dropped" in line]
    assert len(notes) == len(drops)
    assert all(("first exchange " if d == 1 else f"first {d} exchanges") in n for d, n in zip(drops, notes)), notes
    assert notes[0].endswith(f"(with 1 image) to fit the model's context of {context} tokens"), notes
    assert "image" not in "".join(notes[1:])


def _answering(monkeypatch, processor, answer: str) -> list:
    """The prompts the chat session asks the model (their ids), each answered with ``answer``'s tokens."""
    from kimivl.inference import chat

    prompts = []

    def stream_ids(model, ids, pixel_values, grids, params, stop_ids):
        prompts.append(ids[0])
        yield from ([t] for t in processor.tokenizer.encode(answer))

    monkeypatch.setattr(chat, "stream_ids", stream_ids)
    return prompts


def _text(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def test_a_prompt_that_leaves_exactly_max_new_tokens_keeps_the_whole_conversation(checkpoint, monkeypatch, capsys):
    """Prompt + --max-new-tokens == context fits: no exchange is dropped for it (with '>=' the first one was); one
    token more and the first exchange is dropped."""
    from kimivl.config import KimiVLConfig

    processor = KimiVLProcessor.from_pretrained(checkpoint)
    context = KimiVLConfig.from_pretrained(checkpoint).text_config.max_position_embeddings
    answer = "The circles are red. " * 20
    kept = [_text("Count the circles."), {"role": "assistant", "content": answer.strip()}, _text("Why?")]
    room = context - len(processor.encode(kept).input_ids)
    assert 3000 < room < 4000
    for max_new, prompt in ((room, kept), (room + 1, kept[2:])):
        prompts = _answering(monkeypatch, processor, answer)
        _typed(monkeypatch, "Count the circles.", "Why?")
        assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", str(max_new)]) == 0
        dropped = "kimivl chat: dropped the first exchange of the conversation" in capsys.readouterr().err
        assert dropped == (max_new > room) and prompts[1] == processor.encode(prompt).input_ids, max_new


def test_a_question_as_long_as_the_context_is_refused_before_any_exchange_is_dropped(checkpoint, monkeypatch, capsys):
    """A question whose prompt alone is the context's 4096 tokens leaves no room for an answer: it is refused and the
    conversation kept (with '>' it was let through, the whole conversation dropped for it)."""
    from kimivl.config import KimiVLConfig

    processor = KimiVLProcessor.from_pretrained(checkpoint)
    context = KimiVLConfig.from_pretrained(checkpoint).text_config.max_position_embeddings
    frame = len(processor.encode([_text("Z")]).input_ids) - 1  # a 'Z' is a token of its own: no merge has one
    question = "Z" * (context - frame)
    assert len(processor.encode([_text(question)]).input_ids) == context == 4096
    answer = "The circles are red. " * 20
    prompts = _answering(monkeypatch, processor, answer)
    _typed(monkeypatch, "Count the circles.", question, "Why?")
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "8"]) == 2  # piped: a question refused
    err = capsys.readouterr().err
    assert f"does not fit the model's context of {context} tokens: with the system prompt it takes {context}\n" in err
    assert "dropped" not in err and len(prompts) == 2
    kept = [_text("Count the circles."), {"role": "assistant", "content": answer.strip()}, _text("Why?")]
    assert prompts[1] == processor.encode(kept).input_ids


def test_a_question_of_megabytes_is_refused_before_it_is_tokenized(checkpoint, monkeypatch, capsys):
    """A 50 MB line piped into a session was tokenized whole (22 s, about 1 GB) before being refused as too long."""
    from kimivl.processing.tokenizer import KimiTokenizer

    processor = KimiVLProcessor.from_pretrained(checkpoint)
    question = "ab" * (4096 * processor.tokenizer.longest_token)
    seen, encode = [], KimiTokenizer.encode
    monkeypatch.setattr(
        KimiTokenizer, "encode", lambda self, text, *a, **k: (seen.append(len(text)), encode(self, text, *a, **k))[1]
    )
    prompts = _answering(monkeypatch, processor, "Fine.")
    _typed(monkeypatch, question, "Why?")
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "question 1 (line 1): the question does not fit the model's context of 4096 tokens: with the system " in err
    assert "prompt it takes at least " in err
    assert len(prompts) == 1 and max(seen) < 1000  # the other question answered; the long one never tokenized


def test_the_session_skips_blank_lines_and_ctrl_c_stops_only_the_answer(checkpoint, monkeypatch, capsys):
    """A blank line ended the session (a paste with a blank line in it ended it midway); Ctrl-C during an answer
    ended the session (exit 130) and lost the conversation. Now a blank line is skipped; Ctrl-C stops the answer and
    drops its question; Ctrl-C at the prompt still ends the session, and Ctrl-D ends it on a line of its own."""
    seen = []

    def stream(model, processor, messages, **sampling):
        seen.append(list(messages))  # the session's history, as it was asked
        yield "half an"
        if len(seen) == 2:
            raise KeyboardInterrupt
        yield " answer"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    typed = iter(["first", "", "  ", "second", "third"])

    def read(prompt):
        print(prompt, end="")
        for line in typed:
            return line
        raise EOFError

    monkeypatch.setattr("builtins.input", read)
    monkeypatch.setattr("sys.stdin", _Terminal())
    assert main(["chat", "--model", str(checkpoint)]) == 0
    out, err = capsys.readouterr()
    assert "Ctrl-D or Ctrl-C ends" in out
    assert out.split("\n")[1:] == ["> half an answer", "> > > half an", "> half an answer", "> ", ""]
    assert "kimivl chat: stopped; the question is dropped from the conversation" in err
    text = [[p["text"] for p in m["content"]] if m["role"] == "user" else m["content"] for m in seen[-1]]
    assert text == [["first"], "half an answer", ["third"]]

    def interrupt(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupt)
    assert main(["chat", "--model", str(checkpoint)]) == 130
    assert "kimivl chat: interrupted" in capsys.readouterr().err


class _Terminal(io.StringIO):
    """A stdin, stdout or stderr that is a terminal."""

    def isatty(self):
        return True


def test_a_piped_session_prints_the_answers_alone_and_a_closed_stdin_is_refused(checkpoint, monkeypatch, capsys):
    """``printf 'q1\\nq2\\n' | kimivl chat > out`` mixed the banner and the '> ' prompts into the answers; ``kimivl chat
    <&-`` (stdin closed) died with RuntimeError 'input(): lost sys.stdin' after loading the model."""
    import sys

    def stream(model, processor, messages, **sampling):
        yield f"answer to {len(messages)} messages"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"q1\nq2\n"), encoding="utf-8"))
    assert main(["chat", "--model", str(checkpoint)]) == 0
    assert capsys.readouterr().out == "answer to 1 messages\nanswer to 3 messages\n"
    loaded = []
    monkeypatch.setattr("kimivl.cli._load", lambda *a: loaded.append(a))
    closed = io.TextIOWrapper(io.BytesIO())
    closed.close()
    for stdin in (None, closed):
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["chat", "--model", str(checkpoint)]) == 2
        err = capsys.readouterr().err
        assert "kimivl chat: error: stdin is closed" in err and "give the question as an argument" in err
    assert not loaded


@pytest.mark.parametrize("seed, seeds", [(5, [5, 6, 7]), (2**64 - 2, [2**64 - 2, 2**64 - 1, 0])])
def test_each_question_of_a_session_draws_with_a_seed_of_its_own(checkpoint, monkeypatch, capsys, seed, seeds):
    """Every turn was sampled with the same --seed, so the same question asked twice at temperature 1 gave the same
    answer again (3 sessions in 20 for a probe), and turns drew correlated tokens: question n uses seed + n - 1."""
    import sys

    used = []

    def stream(model, processor, messages, **sampling):
        used.append(sampling["seed"])
        yield "a"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"q\n\nq\nq\n"), encoding="utf-8"))
    assert main(["chat", "--model", str(checkpoint), "--temperature", "1", "--seed", str(seed)]) == 0
    assert used == seeds and capsys.readouterr().out == "a\na\na\n"
    used.clear()
    assert main(["chat", "--model", str(checkpoint), "--temperature", "1", "--seed", str(seed), "q"]) == 0
    assert used == seeds[:1]  # a one-question chat draws as a session's first question


def test_a_question_from_a_terminal_that_is_not_utf8_reaches_the_model_as_typed(checkpoint, monkeypatch, capsys):
    """Under LC_ALL=C (no UTF-8 mode) Python reads "café" as lone surrogates, which reached the model as U+FFFD,
    typed or as the argument; in a UTF-8 locale a line that is not UTF-8 (a Latin-1 terminal) ended the session."""
    import io
    import sys

    seen = []

    def stream(model, processor, messages, **sampling):
        seen.append(messages[-1]["content"][-1]["text"])
        yield "ok"

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    typed = "café?\n".encode() + b"caf\xe9?\n" + "naïve?\n".encode()  # the second line is Latin-1
    for encoding, errors in (("ascii", "surrogateescape"), ("utf-8", "strict")):  # LC_ALL=C; a UTF-8 locale
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding=encoding, errors=errors))
        assert main(["chat", "--model", str(checkpoint)]) == 2  # piped: the session goes on, and fails at its end
        assert seen[-2:] == ["café?", "naïve?"], encoding
        out, err = capsys.readouterr()
        assert out == "ok\n\nok\n" and err.count("question 2 (line 2): the line is not UTF-8 text") == 1
    assert main(["chat", "--model", str(checkpoint), "caf\udcc3\udca9?"]) == 0  # argv as Python reads it then
    assert seen[-1] == "café?"
    assert main(["chat", "--model", str(checkpoint), "caf\udce9?"]) == 2
    assert "the question is not UTF-8 text" in capsys.readouterr().err


def test_a_session_whose_stdin_is_the_image_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    """``cat img.png | kimivl chat --image /dev/stdin`` without a question printed the banner and ended, exit 0: stdin
    was the image, so no question could be read from it."""
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(img)
    loaded = []
    monkeypatch.setattr("kimivl.cli._load", lambda *a: loaded.append(a))
    read, write = os.pipe()
    saved = os.dup(0)
    try:
        os.write(write, img.read_bytes())
        os.close(write)
        os.dup2(read, 0)
        assert main(["chat", "--model", str(checkpoint), "--image", "/dev/stdin"]) == 2
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    err = capsys.readouterr().err
    assert "--image /dev/stdin reads stdin" in err and "give the question as an argument" in err and not loaded


def _read_until(fd: int, text: str, seconds: float) -> str:
    """What a terminal shows up to ``text``, read from its primary side."""
    import select
    import time

    shown, deadline = b"", time.monotonic() + seconds
    while text.encode() not in shown:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"{text!r} not shown in {seconds} s; the terminal shows ...{shown[-400:]!r}")
        try:
            shown += os.read(fd, 1 << 16)
        except OSError:  # the session ended and closed the terminal
            raise AssertionError(f"the session ended before showing {text!r}: ...{shown[-400:]!r}") from None
    return shown.decode()


@pytest.mark.skipif(
    not hasattr(os, "openpty") or importlib.util.find_spec("readline") is None, reason="needs a pty and readline"
)
def test_at_a_terminal_lines_are_edited_and_read_whole(checkpoint, tmp_path):
    """At a terminal the prompt had no line editing: an arrow key went into the question as an escape sequence, a
    line over 4095 characters was cut by the terminal's line limit, silently, and a paste of several lines was as many
    questions. With readline a paste (bracketed, readline 8.1+) is one question; Ctrl-D ends on a new line."""
    import readline
    import subprocess
    import sys

    script = tmp_path / "session.py"
    script.write_text(
        "import sys\n"
        "from kimivl import cli\n"
        "from kimivl.inference import chat\n"
        "def stream(model, processor, messages, **sampling):\n"
        "    question = messages[-1]['content'][-1]['text']\n"
        "    yield f'[{len(question)} {question[:12]!r} {question[-4:]!r}]'\n"
        "chat.stream_generate = stream\n"
        "sys.exit(cli.main(['chat', '--model', sys.argv[1]]))\n"
    )
    primary, secondary = os.openpty()
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "TERM": "xterm", "INPUTRC": "/dev/null", "PYTHONPATH": root}
    with subprocess.Popen(
        [sys.executable, str(script), str(checkpoint)], stdin=secondary, stdout=secondary, stderr=secondary, env=env
    ) as session:
        os.close(secondary)
        try:
            _read_until(primary, "> ", 120)
            os.write(primary, b"What is 2+2" + b"\x1b[D" * 3 + b" \r")  # Left three times, then a space
            _read_until(primary, "[12 'What is  2+2' ' 2+2']\r\n> ", 30)
            os.write(primary, ("circles " * 749 + "the end.").encode() + b"\r")  # 6000 characters, 1500 tokens
            _read_until(primary, "[6000 'circles circ' 'end.']\r\n> ", 30)
            if "libedit" not in (readline.__doc__ or "") and readline._READLINE_VERSION >= 0x0801:
                os.write(primary, b"\x1b[200~one\rtwo\r\rthree\x1b[201~\r")  # a paste, as the terminal brackets it
                _read_until(primary, "[14 'one\\ntwo\\n\\nthr' 'hree']\r\n> ", 30)
            os.write(primary, b"\x04")
            assert _read_until(primary, "\r\n", 30) == "\r\n"  # the shell's prompt on a new line
            assert session.wait(30) == 0
        finally:
            session.kill()
            os.close(primary)


def _stream(pieces):
    from kimivl.cli import _StreamPrinter

    printer = _StreamPrinter()
    for piece in pieces:
        printer.feed(piece)
    return printer.close()


def test_thinking_output_is_shown_apart(capsys):
    """The answer alone goes to stdout; the reasoning and the headers to stderr (``kimivl chat "q" > answer.txt``
    saved '[reasoning]\\n...\\n[answer]\\n20')."""
    assert _stream(["◁think▷ 2+2 is 4 ◁/think▷ 4"]) == "4"
    assert capsys.readouterr() == ("4\n", "[reasoning]\n2+2 is 4\n[answer]\n")
    # markers and whitespace split across pieces, as a streamed answer arrives
    assert _stream(["◁th", "ink", "▷ 2+2", " is", " 4 ", " ◁/", "think", "▷", " ", "4", "\n"]) == "4"
    assert capsys.readouterr() == ("4\n", "[reasoning]\n2+2 is 4\n[answer]\n")
    assert _stream(["pl", "ain", " text "]) == "plain text"
    assert capsys.readouterr() == ("plain text\n", "")
    assert _stream(["a ◁", "b"]) == "a ◁b"  # a marker's prefix that turns out not to be one is printed
    assert capsys.readouterr() == ("a ◁b\n", "")
    # a marker after the first close, or a second open in the reasoning, is text, as parse_thinking keeps it; text
    # before a close without an open was printed before it could be told reasoning
    assert _stream(["x ◁/think▷ y ◁th", "ink▷ z ◁/think▷ w"]) == "y ◁think▷ z ◁/think▷ w"
    assert capsys.readouterr() == ("x\ny ◁think▷ z ◁/think▷ w\n", "[answer]\n")
    assert _stream(["◁think▷ a ◁think▷ b ◁/", "think▷ c"]) == "c"
    assert capsys.readouterr() == ("c\n", "[reasoning]\na ◁think▷ b\n[answer]\n")
    # a reasoning never closed is no answer: an empty line on stdout; an empty reasoning, the two headers
    assert _stream(["◁think▷ still thinking"]) == ""
    assert capsys.readouterr() == ("\n", "[reasoning]\nstill thinking\n")
    assert _stream(["◁think▷◁/think▷ 7"]) == "7"
    assert capsys.readouterr() == ("7\n", "[reasoning]\n[answer]\n")


def test_an_answer_a_console_cannot_encode_is_printed_escaped(checkpoint, monkeypatch):
    """On an ASCII stdout (PYTHONIOENCODING=ascii, LANG=C, a Windows console) an answer stopped at its first non-ASCII
    character with a UnicodeEncodeError, taken for a user's error: exit 2, or in a session a turn thrown away."""
    import io
    import sys

    answers = []

    def stream(model, processor, messages, **sampling):
        answers.append(messages)
        yield from ["a leaf ", "\U0001f33f", " é"]

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    for session in (False, True):
        out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
        monkeypatch.setattr(sys, "stdout", out)
        _typed(monkeypatch, "hi", "again")
        assert main(["chat", "--model", str(checkpoint), *([] if session else ["hi"])]) == 0
        out.flush()
        printed = out.buffer.getvalue().decode("ascii")
        assert printed.count("a leaf \\U0001f33f \\xe9\n") == (2 if session else 1), printed
    assert answers[-1][1] == {"role": "assistant", "content": "a leaf \U0001f33f é"}  # the first turn was kept


def test_a_path_in_bytes_the_locale_cannot_decode_is_printed_as_those_bytes(checkpoint, tmp_path, monkeypatch):
    """Under LC_ALL=C without UTF-8 mode Python reads a path's non-ASCII bytes as lone surrogates, and its stdout
    writes them back as those bytes (surrogateescape); kimivl's escaping of what the console cannot show printed them
    as \\udce6\\udca8 instead. A character the console lacks is still printed as its escape."""
    import sys

    link = os.path.join(os.fsencode(tmp_path), "模型".encode() + b" mod\xe8le")  # UTF-8, then a Latin-1 byte
    os.symlink(checkpoint, link)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="surrogateescape")  # stdout under LC_ALL=C
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["info", link.decode("ascii", "surrogateescape")]) == 0  # argv as Python reads it under LC_ALL=C
    print("a leaf \U0001f33f")
    out.flush()
    printed = out.buffer.getvalue()
    assert link in printed and b"\\udc" not in printed, printed
    assert printed.endswith(b"a leaf \\U0001f33f\n"), printed


def test_chat_takes_its_defaults_from_the_checkpoints_generation_config(checkpoint, tmp_path, capsys, monkeypatch):
    """Hugging Face's generation_config.json sets chat's sampling defaults; a flag still wins."""
    from kimivl import cli

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0, "max_new_tokens": 2, "top_k": 5}))
    model, processor = KimiVL.from_pretrained(ckpt), KimiVLProcessor.from_pretrained(ckpt)
    question = [{"role": "user", "content": [{"type": "text", "text": "Count the circles."}]}]
    sampled, answer = [], cli._answer
    monkeypatch.setattr(cli, "_answer", lambda *a: sampled.append(dict(a[3])) or answer(*a))
    for flags, new_tokens in (([], 2), (["--max-new-tokens", "6"], 6)):
        assert main(["chat", "--model", str(ckpt), "--dtype", "float32", *flags, "Count the circles."]) == 0
        expected = generate(model, processor, question, temperature=0.0, max_new_tokens=new_tokens).strip()
        assert capsys.readouterr().out.strip() == expected, flags
        assert (sampled[-1]["temperature"], sampled[-1]["max_new_tokens"]) == (0, new_tokens), flags


def test_the_shipped_models_generation_configs_follow_the_spec():
    """Section 9: Instruct temperature 0.2; Thinking 0.6 to 0.8 with a long budget (here within the 4K context)."""
    from kimivl.config import KimiVLConfig
    from kimivl.demo import DEFAULT_MODEL
    from kimivl.inference.generation_config import generation_defaults

    thinking = DEFAULT_MODEL.parent / "kimivl-tiny-thinking"
    assert generation_defaults(DEFAULT_MODEL) == {"temperature": 0.2}
    found = generation_defaults(thinking)
    context = KimiVLConfig.from_pretrained(thinking).text_config.max_position_embeddings
    assert 0.6 <= found["temperature"] <= 0.8 and 160 < found["max_new_tokens"] <= context // 2


def test_the_shipped_recipes_export_the_shipped_models_generation_configs():
    """Training a shipped model again writes the generation_config.json it ships with (export.generation)."""
    from kimivl.demo import DEFAULT_MODEL
    from kimivl.train.recipe import load_recipe

    recipes = Path(__file__).parents[1] / "recipes"
    for recipe, model in (("tiny.yaml", "kimivl-tiny"), ("tiny-rl.yaml", "kimivl-tiny-thinking")):
        export = load_recipe(recipes / recipe).export
        shipped = json.loads((DEFAULT_MODEL.parent / model / "generation_config.json").read_text())
        assert Path(export["path"]).name == model
        assert shipped == {"do_sample": True, **export["generation"]}


def test_path_flags_expand_a_tilde(tmp_path, monkeypatch):
    """A shell leaves ``~`` in ``--model=~/m`` (after ``=``) and in quotes: the path named a ``~`` folder here."""
    from kimivl.cli import _data_paths, build_parser
    from kimivl.eval.tasks import get_task

    monkeypatch.setenv("HOME", str(tmp_path))
    parse = build_parser().parse_args
    args = parse(["chat", "--model=~/m", "--image=~/a.png", "--image", "~/b.png", "--video=~/v.mp4", "hi"])
    assert (args.model, args.image, args.video) == (
        f"{tmp_path}/m",
        [f"{tmp_path}/a.png", f"{tmp_path}/b.png"],
        f"{tmp_path}/v.mp4",
    )
    args = parse(["eval", "--task", "ocrbench", "--model=~/m", "--predictions=~/p.jsonl", "--out=~/e"])
    assert (args.model, args.predictions, args.out) == (f"{tmp_path}/m", f"{tmp_path}/p.jsonl", f"{tmp_path}/e")
    tasks = [get_task("ocrbench"), get_task("mmmu")]
    assert _data_paths(["ocrbench=~/o.tsv", "mmmu=~/u"], tasks) == {
        "ocrbench": f"{tmp_path}/o.tsv",
        "mmmu": f"{tmp_path}/u",
    }
    assert _data_paths(["~/o.tsv"], tasks[:1]) == {"ocrbench": f"{tmp_path}/o.tsv"}
    args = parse(["train", "~/r.yaml", "--out=~/run"])
    assert (args.recipe, args.out) == (f"{tmp_path}/r.yaml", f"{tmp_path}/run")
    args = parse(["serve", "--model=~/m", "--allowed-local-media-path=~/media"])
    assert (args.model, args.allowed_local_media_path) == (f"{tmp_path}/m", f"{tmp_path}/media")
    assert parse(["demo", "--model=~/m", "--examples=~/x"]).examples == f"{tmp_path}/x"
    assert parse(["info", "~/m"]).path == f"{tmp_path}/m"


@pytest.mark.parametrize(
    "argv,flag,text",
    [
        (["chat"], "--seed SEED", "the sampling seed; a session's question n uses seed + n - 1 (default 0)"),
        (["serve"], "--port PORT", "port to listen on (default 8000)"),
        (["eval"], "--batch-size BATCH_SIZE", "rows generated together (default 8)"),
        (["demo"], "--examples EXAMPLES", "held-out split directory (default: the bundled examples/heldout)"),
        ([], "--top-p TOP_P", "nucleus sampling's mass (default 1.0: off)"),
        ([], "--max-new-tokens MAX_NEW_TOKENS", "tokens per answer at most (default 160)"),
        ([], "--seed SEED", "the first chunk's sampling seed (default 0)"),
    ],
)
def test_help_says_what_each_flag_is_and_its_default(argv, flag, text, capsys):
    """chat --seed, serve --port, eval --batch-size, demo --examples and passk's --top-p, --max-new-tokens and --seed
    had no help text: neither what they set nor their default."""
    from kimivl.rl import passk

    with pytest.raises(SystemExit) as e:
        (main if argv else passk.main)([*argv, "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{flag} {text}" in help_text


def test_help_does_not_wait_for_torch():
    """``kimivl --help`` and a command's help imported torch (seconds), through the package's own imports: its names
    are now imported when first used."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom kimivl.cli import main\n"
        "for argv in ([], ['serve'], ['train'], ['eval']):\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import kimivl\nassert kimivl.KimiVL.__name__ == 'KimiVL' and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_at_a_terminal_the_models_control_characters_print_as_their_escapes(checkpoint, monkeypatch, capsys):
    """``kimivl chat`` wrote the model's output to the terminal as it came: a prompt-injected image or document could
    make it set the clipboard (OSC 52), clear the screen, reverse what follows (U+202E) or overwrite the answer
    (``\\r``, ``\\b``). At a terminal they are printed as escapes (line breaks and tabs kept), the reasoning on stderr
    too, whatever pieces the sequences are split across; piped, the bytes are the model's; the conversation keeps
    the answer as generated."""
    import sys

    pieces = ["◁think▷ ", "\x1b]52;c;cHduZWQ=", "\x07 plan\r", "\x08 ◁/think▷ A\x1b[", "31mRED\x1b[2J"]
    pieces += [" \u202eevil\r\x08X\x00Y", "\nline\ttab"]
    answer = "A\x1b[31mRED\x1b[2J \u202eevil\r\x08X\x00Y\nline\ttab"
    seen = []

    def stream(model, processor, messages, **sampling):
        seen.append(messages)
        yield from pieces

    monkeypatch.setattr("kimivl.inference.chat.stream_generate", stream)
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", _Terminal())
        m.setattr(sys, "stderr", _Terminal())
        _typed(m, "hi", "again")
        assert main(["chat", "--model", str(checkpoint)]) == 0
        out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
    escaped = "A\\x1b[31mRED\\x1b[2J \\u202eevil\\r\\x08X\\x00Y\nline\ttab\n"
    assert out == escaped * 2
    assert err == "[reasoning]\n\\x1b]52;c;cHduZWQ=\\x07 plan\\r\\x08\n[answer]\n" * 2
    assert seen[1][1] == {"role": "assistant", "content": answer}
    assert main(["chat", "--model", str(checkpoint), "hi"]) == 0
    assert capsys.readouterr() == (answer + "\n", "[reasoning]\n\x1b]52;c;cHduZWQ=\x07 plan\r\x08\n[answer]\n")
