"""The ``kimivl`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import itertools
import logging
import math
import os
import shlex
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kimivl.config import PRESETS, ConfigError, KimiVLConfig
from kimivl.exits import run_command, stop_code
from kimivl.files import FULL, WriteError, own_descriptor, path_text, write_error
from kimivl.terminal import is_terminal, printable
from kimivl.train.recipe import PARTS


def _fmt(n: int, billions: bool) -> str:
    return f"{n / 1e9:.3f}B" if billions else f"{n / 1e6:.3f}M"


def cmd_info(args: argparse.Namespace) -> int:
    from kimivl.inference import PREFILL_CHUNK
    from kimivl.model.params import parameter_counts

    parts = args.train or []
    if parts and parts[-1] not in PARTS and not args.path and not args.preset:  # info --train CKPT: the path came last
        args.path = _path(parts.pop())
    if any(part not in PARTS for part in parts):
        raise CommandError(f"--train takes parts of the model ({', '.join(PARTS)}), got {parts}")
    if not args.path and not args.preset:
        if args.context is None:
            raise CommandError("info needs a checkpoint directory or --preset NAME")
        args.preset = "kimi-vl-a3b"
    config = KimiVLConfig.from_preset(args.preset) if args.preset else KimiVLConfig.from_pretrained(args.path)
    limit = config.text_config.max_position_embeddings
    if args.context is not None and not 0 < args.context <= limit:
        raise CommandError(f"--context must be 1..{limit} tokens (the model's context), got {args.context}")
    _at_least_one(args, "prefill_chunk", "dp_shard", "ep")
    if args.prefill_chunk is not None and args.context is None:
        raise CommandError("--prefill-chunk sizes the prefill of --context's memory estimate: give --context too")
    training = args.train is not None or bool(args.freeze)  # --train alone: every part
    if (args.dp_shard or args.ep) and not training:
        raise CommandError("--dp-shard and --ep plan a training run: give --train (and --freeze) too")
    if args.ep and not args.dp_shard:
        raise CommandError("--ep splits the experts of a sharded run: give --dp-shard too")
    model = plan = None
    if training:  # checked before anything is printed
        import torch

        from kimivl import KimiVL
        from kimivl.train.trainable import set_trainable

        with torch.device("meta"):
            model = KimiVL(config)  # float32, as training keeps its weights
        set_trainable(model, args.train or list(PARTS), args.freeze)
        if args.dp_shard:  # what the plan refuses too (experts that do not split over --ep)
            from kimivl.distributed.plan import rank_memory_plan

            plan = rank_memory_plan(model, args.dp_shard, args.ep or 1)
    counts = parameter_counts(config)
    tc, vc = config.text_config, config.vision_config
    print(
        f"{args.preset or args.path}: vision {vc.num_hidden_layers}x{vc.hidden_size}, "
        f"LM {tc.num_hidden_layers}x{tc.hidden_size}, {tc.n_routed_experts} experts "
        f"(top-{tc.num_experts_per_tok}, {tc.n_shared_experts} shared), vocab {tc.vocab_size}"
    )
    print(f"{'part':<24}{'total':>12}{'active':>12}")
    billions = counts["total"].total >= 1e9
    for name, c in counts.items():
        print(f"{name:<24}{_fmt(c.total, billions):>12}{_fmt(c.active, billions):>12}")
    print("active = parameters used per token (routed experts: the chosen ones only); a text token uses the LM's alone")
    if args.context is not None:
        _print_context_memory(config, args.context, args.prefill_chunk or PREFILL_CHUNK)
    if model is not None:
        from kimivl.train.trainable import hold_frozen_in_bf16, memory_plan

        frozen = f", less {' '.join(args.freeze)}" if args.freeze else ""
        if plan is not None:
            print(f"training {' + '.join(args.train or PARTS)}{frozen} sharded, with recompute: {plan}")
            return 0
        stored = _weights_dtype(args.preset, args.path, config)
        if stored == "bfloat16":  # as joint stages hold a bf16 checkpoint's frozen weights (``plan_recipe``)
            hold_frozen_in_bf16(model, lambda name, p: True)
        print(
            f"training {' + '.join(args.train or PARTS)}{frozen} from a {stored} checkpoint under bf16 autocast: "
            f"{memory_plan(model)}"
        )
    return 0


def _weights_dtype(preset: str | None, path: str | None, config: KimiVLConfig) -> str:
    """The dtype ``info --train`` plans the weights as loaded from: a preset's released checkpoint's (bfloat16), a
    checkpoint's as its safetensors headers say (``header_dtype``, as ``train --plan`` reads them: a stage's ``final``
    is float32), or, for a directory of a config alone, the dtype the config declares."""
    from kimivl.checkpoint import INDEX, SINGLE
    from kimivl.train.plan import header_dtype

    if preset:
        return "bfloat16"
    if any((Path(path) / name).is_file() for name in (SINGLE, INDEX)):
        return header_dtype(Path(path))
    return config.text_config.torch_dtype


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _print_context_memory(config: KimiVLConfig, context: int, chunk: int) -> None:
    """``info --context``: the compressed cache and the prefill's peak activations at that length, in bf16, by the
    formulas of ``kimivl.inference.memory``."""
    import torch

    from kimivl.inference.cache import MLACache
    from kimivl.inference.memory import cache_bytes, prefill_activation_bytes

    tc = config.text_config
    per_token = MLACache.bytes_per_token(tc, torch.bfloat16)
    print(
        f"context {context} tokens, bf16: compressed cache {per_token} bytes/token (per-head K/V would take "
        f"{MLACache.uncompressed_bytes_per_token(tc)}), {_size(cache_bytes(tc, context))} at {context} tokens"
    )
    for label, size in ((f"in chunks of {chunk} tokens", chunk), ("in one pass", context)):
        act = prefill_activation_bytes(tc, context, size)
        print(
            f"prefill activations {label}: peak {_size(act['peak'])} (attention over the cache "
            f"{_size(act['attention'])}, MLP {_size(act['mlp'])}, residual stream {_size(act['residual'])}, prompt "
            f"embeddings {_size(act['prompt'])})"
        )
    print("estimates by formula (batch 1, beyond weights and cache): see kimivl/inference/memory.py")


class CommandError(ValueError):
    """A command-line setting that cannot work here (e.g. a device this machine lacks)."""


def _at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Each of these numeric flags, when given, is at least 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def resolve_device(name: str | None) -> str:
    """``--device``: a GPU when there is one and none was named; a named device must exist here and hold weights."""
    from kimivl.devices import DeviceError, check_device

    try:
        return check_device(name, "--device")
    except DeviceError as e:
        raise CommandError(str(e)) from None


def _load(path: str, dtype: str, device: str | None):
    import torch

    from kimivl import KimiVL, KimiVLProcessor
    from kimivl.checkpoint import CheckpointError, check_directory, weights_size
    from kimivl.precision import checkpoint_load_dtype

    try:
        check_directory(path)
    except CheckpointError as e:
        raise CommandError(f"--model {e}") from None
    device = resolve_device(device)
    dtype = checkpoint_load_dtype(path, device, getattr(torch, dtype) if dtype else None)
    processor = KimiVLProcessor.from_pretrained(path)  # first: a tokenizer not the model's is refused in seconds
    files, size = weights_size(path)  # a broken link counts as none: from_pretrained names it
    said = size >= LOAD_NOTICE_BYTES  # a large model takes a while (about 45 s for the A3B's 33 GB from a warm cache)
    if said:
        count = f"{files} file{'s' * (files != 1)}"
        print(
            f"kimivl: loading {printable(path)} ({size / 1e9:.1f} GB in {count}) on {device} in "
            f"{str(dtype).removeprefix('torch.')}",
            file=sys.stderr,
            flush=True,
        )
    start = time.monotonic()
    model = KimiVL.from_pretrained(path, dtype=dtype, device=device)
    if said:
        print(f"kimivl: loaded in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return model, processor


LOAD_NOTICE_BYTES = 1 << 30  # weights from this size up are announced as they load, and the time it took


def _user_message(text: str, images: list[str | bytes], video: str | bytes | None) -> dict:
    parts = [{"type": "image", "image": f} for f in images]
    if video:
        parts.append({"type": "video", "video": video})
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


PIPED_VIDEO_BYTES = 1 << 30  # a --video read from a pipe is held in memory: at most this


def _piped(path: str) -> bool:
    """Whether ``path`` is a pipe or device (``/dev/stdin``, bash's ``<(...)``), which can be read once."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # the check names what is wrong
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _read_piped(args: argparse.Namespace) -> tuple[list[str | bytes], str | bytes | None]:
    """Chat's images and video: a piped one, or one this process holds open (``/dev/stdin`` of ``< file``), is read
    here, once, and its bytes stand for it in the check and in every turn; a file stays a path (named in errors, a
    video not held in memory)."""
    from kimivl.processing.image import ImageProcessor

    images: list[str | bytes] = []
    for path in args.image:
        if not _read_here(path):
            images.append(path)
            continue
        with _open_piped("--image", path) as f:
            images.append(ImageProcessor().read_stream(f, path))
    video = args.video
    if video and _read_here(video):
        with _open_piped("--video", video) as f:
            video = f.read(PIPED_VIDEO_BYTES + 1)
        if len(video) > PIPED_VIDEO_BYTES:
            raise CommandError(
                f"--video {args.video} is over {PIPED_VIDEO_BYTES} bytes; stopped reading it (save it to a file)"
            )
    return images, video


def _read_here(path: str) -> bool:
    return _piped(path) or own_descriptor(path) is not None


@contextlib.contextmanager
def _open_piped(flag: str, path: str) -> Iterator[BinaryIO]:
    """A piped file opened for reading: through this process's own descriptor where ``path`` names one (``/dev/stdin``,
    ``/dev/fd/N``), as opening it anew is refused for a file or pipe of another user (``sudo -u svc kimivl chat ...
    < x``). A failed read names ``flag``."""
    fd = own_descriptor(path)
    try:
        with open(path, "rb") if fd is None else os.fdopen(fd, "rb", closefd=False) as f:
            yield f
    except OSError as e:  # /dev/stdout, open for writing only
        raise CommandError(f"{flag} {path} cannot be read: {e.strerror or e}") from None


class _StreamPrinter:
    """Prints an answer piece by piece as it is generated; a thinking model's ``◁think▷ ... ◁/think▷`` becomes
    ``[reasoning]`` and ``[answer]`` headers, with the whitespace around the markers dropped. The answer is the
    command's result, on stdout; the reasoning and the headers, its process, go to stderr (each write flushed, so a
    terminal shows them in order). As ``parse_thinking`` reads it, only the first ``◁think▷`` before the first
    ``◁/think▷`` and that ``◁/think▷`` are markers; any other is text, so what follows ``[answer]`` is the answer the
    history keeps. Written to a terminal, the text's control characters but its line breaks and tabs are printed as
    their escapes (``printable``): a prompt-injected image or document cannot make the model's output clear the
    screen, set the clipboard or overwrite what was printed; piped or redirected, the text is written as it is."""

    def __init__(self):
        from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN

        self.markers = {THINK_OPEN: ("[reasoning]", sys.stderr), THINK_CLOSE: ("[answer]", sys.stdout)}
        self.close_tag = THINK_CLOSE
        self.stream = sys.stdout  # where text goes now: stderr in the reasoning
        self.text, self.held, self.space, self.fresh = "", "", "", True
        self.terminals = {stream for stream in (sys.stdout, sys.stderr) if is_terminal(stream)}

    def _emit(self, content: str) -> None:
        if self.fresh:
            content = content.lstrip()
        if not content:
            return
        body = content.rstrip()
        if body:
            text = self.space + body
            if self.stream in self.terminals:  # each character alone: a piece's escapes need no other piece
                text = printable(text, keep="\n\t")
            print(text, end="", file=self.stream, flush=True)
            self.fresh, self.space = False, ""
        self.space += content[len(body) :]

    def _end_line(self) -> None:
        if not self.fresh:
            print(file=self.stream, flush=True)

    def feed(self, piece: str) -> None:
        self.text += piece
        self.held += piece
        while True:
            found = [(self.held.find(m), m) for m in self.markers if m in self.held]
            if not found:
                break
            at, marker = min(found)
            self._emit(self.held[:at])
            self._end_line()
            header, self.stream = self.markers[marker]
            print(header, file=sys.stderr, flush=True)
            self.held, self.space, self.fresh = self.held[at + len(marker) :], "", True
            if marker == self.close_tag:
                self.markers = {}  # what follows the first close is the answer, markers and all
            else:
                del self.markers[marker]  # in the reasoning, only its close is a marker
        keep = max((k for m in self.markers for k in range(1, len(m)) if self.held.endswith(m[:k])), default=0)
        self._emit(self.held[: len(self.held) - keep])
        self.held = self.held[len(self.held) - keep :]

    def close(self) -> str:
        """Print what is held and end the answer's line on stdout (an empty answer too: one line per answer); return
        the answer (the reasoning of a thinking model apart)."""
        from kimivl.processing.chat_template import parse_thinking

        self._emit(self.held)
        if self.stream is not sys.stdout:  # a reasoning never closed: no answer
            self._end_line()
        print(flush=True)
        return parse_thinking(self.text)[1]


def _answer(model, processor, messages: list[dict], sampling: dict) -> str:
    """Stream the answer to ``messages`` onto the console; return it."""
    from kimivl.inference.chat import stream_generate

    printer = _StreamPrinter()
    for piece in stream_generate(model, processor, messages, **sampling):
        printer.feed(piece)
    return printer.close()


def _check_chat_inputs(
    args: argparse.Namespace, sampling: dict, images: list[str | bytes], video: str | bytes | None
) -> None:
    """The sampling settings, images and video of a chat, checked before the model loads (minutes for the A3B)."""
    from kimivl.inference.sampling import SamplingParams
    from kimivl.processing.image import ImageError, ImageProcessor
    from kimivl.processing.video import check_video_file

    SamplingParams.from_kwargs(**sampling)
    for path, image in zip(args.image, images):
        try:
            ImageProcessor().load(image)
        except ImageError as e:
            if not isinstance(image, bytes):
                raise
            raise ImageError(f"--image {path}: {e}") from None  # the bytes' name is their length
    if video:
        check_video_file(args.video, video if isinstance(video, bytes) else None)


def _sampling_flags(args: argparse.Namespace) -> dict:
    """chat's sampling flags that were given, each checked alone, so that a bad one is named as typed."""
    from kimivl.inference.generation_config import KEYS
    from kimivl.inference.sampling import SamplingError, SamplingParams

    flags = {k: getattr(args, k) for k in KEYS if getattr(args, k) is not None}
    for name, value in flags.items():
        try:
            SamplingParams.from_kwargs(**{name: value})
        except SamplingError as e:  # "top_p must be ..." as "--top-p must be ..."
            raise SamplingError(f"--{name.replace('_', '-')}{str(e).removeprefix(name)}") from None
    return flags


def _utf8(text: str, encoding: str, what: str) -> str:
    """``text`` as it was typed. Where the locale is not UTF-8 (``LC_ALL=C``), Python reads the bytes it cannot decode
    as lone surrogates (``surrogateescape``), which are no text to tokenize: their bytes are read as UTF-8 here, and
    refused when they are not UTF-8 either."""
    try:
        text.encode("utf-8")  # no lone surrogate: the text as decoded
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode(encoding, "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise CommandError(
            f"{what} is not UTF-8 text (it holds bytes that UTF-8 does not read): set the terminal and the locale to "
            "UTF-8 (e.g. LANG=C.UTF-8)"
        ) from None


def _reads_stdin(path: str) -> bool:
    """Whether ``path`` is this process's stdin (``/dev/stdin``, ``/dev/fd/0``)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(0))
    except OSError:
        return False


def _media(messages: list[dict]) -> str:
    """The images and video in ``messages``, in words ('' for none)."""
    kinds = [p["type"] for m in messages if isinstance(m["content"], list) for p in m["content"]]
    images = kinds.count("image")
    return " and ".join([f"{images} image{'s' * (images > 1)}"] * (images > 0) + ["the video"] * ("video" in kinds))


def cmd_chat(args: argparse.Namespace) -> int:
    question = args.question
    if question is not None:
        question = _utf8(question, sys.getfilesystemencoding(), "the question")
        if not question.strip():
            raise CommandError("the question is empty; ask something, or leave it out for an interactive session")
    if question is None and (sys.stdin is None or sys.stdin.closed):  # `<&-`, as some schedulers and daemons run
        raise CommandError(
            "stdin is closed, so a session cannot read questions from it: give the question as an argument"
        )
    media = [*(("--image", path) for path in args.image), ("--video", args.video)]
    for flag, path in media if question is None else []:
        if path and _reads_stdin(path):
            raise CommandError(
                f"{flag} {path} reads stdin, so a session cannot read questions from it: give the question as an "
                "argument"
            )
    from kimivl.inference.generation_config import recommended_sampling

    # a flag given wins; then the checkpoint's generation_config.json; then the Instruct model's settings
    flags = _sampling_flags(args)
    sampling = {**recommended_sampling(args.model), **flags, "seed": args.seed}
    images, video = _read_piped(args)  # attached to the first turn
    _check_chat_inputs(args, sampling, images, video)
    model, processor = _load(args.model, args.dtype, args.device)
    if question:
        _answer(model, processor, [_user_message(question, images, video)], sampling)
        return 0
    return _session(model, processor, images, video, sampling)


def _unanswered(refused: list[int], stopped: list[int], asked_lines: list[int]) -> str:
    """What a piped session says at its end of the questions (numbered from 1) refused and the answers stopped."""

    def named(questions: list[int]) -> str:
        return ", ".join(f"question {q} (line {asked_lines[q - 1]})" for q in questions)

    said = []
    if refused:
        said.append(
            f"{len(refused)} of {len(asked_lines)} questions not answered: {named(refused)}; each left an empty answer "
            "line"
        )
    if stopped:
        said.append(
            f"{len(stopped)} answer{'s' if len(stopped) > 1 else ''} stopped by Ctrl-C: {named(stopped)}; each line "
            "holds what was said before"
        )
    return "; ".join(said)


def _session(model, processor, images: list[str | bytes], video: str | bytes | None, sampling: dict) -> int:
    """The interactive chat: each question is answered with the conversation so far (the media in its first
    question); when they no longer fit the model's context, its earliest exchanges are dropped. Question n (from 1)
    is sampled with seed ``seed + n - 1``: reproducible, and no turn repeats another's draws. Piped, stdout holds
    one answer per question, an empty line for a question refused, and a refused question or an answer stopped by
    Ctrl-C (its line holds what was said before) makes the session exit 2 at its end."""
    from kimivl.processing.chat_template import DEFAULT_SYSTEM_PROMPT

    terminal = sys.stdin.isatty()  # else questions come from a pipe or file: stdout holds the answers alone
    if terminal:
        try:  # line editing, no 4095-character limit on a line, and (readline 8.1+) a paste of several lines as one
            import readline  # noqa: F401
        except ImportError:  # a Python built without it: plain input()
            pass
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused, the session goes on
    context = model.config.text_config.max_position_embeddings
    system = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    # Each turn is encoded on its own, between special tokens, so a prompt's tokens are the system turn's and the
    # generation prompt's (frame) and each turn's, counted once as the turn joins the conversation.
    frame = len(processor.encode(system).input_ids)
    bare = len(processor.encode(system, add_generation_prompt=False).input_ids)

    def tokens(message: dict) -> int:
        return len(processor.encode([*system, message], add_generation_prompt=False).input_ids) - bare

    history: list[dict] = []  # questions and answers, in turn
    sizes: list[int] = []  # each exchange's tokens
    asked_lines: list[int] = []  # each question's line of the input
    refused: list[int] = []  # piped: the questions (numbered from 1) not answered
    stopped: list[int] = []  # piped: the questions whose answer Ctrl-C cut short
    if terminal:
        print("kimivl chat: type a message; Ctrl-D or Ctrl-C ends (Ctrl-C while answering stops the answer).")
    for number in itertools.count(1):
        try:
            line = input("> " if terminal else "")
        except EOFError:
            if terminal:
                print()  # the shell's prompt on a line of its own
            if refused or stopped:
                raise CommandError(_unanswered(refused, stopped, asked_lines)) from None
            return 0
        message = None
        try:
            if not line.strip():
                continue
            asked_lines.append(number)
            question = _utf8(line, getattr(sys.stdin, "encoding", None) or "utf-8", "the line").strip()
            message = _user_message(question, images, video)
            asked, floor = processor.fewest_tokens([message]), "at least "  # megabytes are refused untokenized
            if frame + asked < context:
                asked, floor = tokens(message), ""
            if frame + asked >= context:
                held = _media([message])
                raise CommandError(
                    f"the question does not fit the model's context of {context} tokens: with the system prompt"
                    f"{f' and {held}' if held else ''} it takes {floor}{frame + asked}"
                )
            drop = 0  # the earliest exchanges, until the prompt leaves its answer room (or none is left to drop)
            while drop < len(sizes) and frame + sum(sizes[drop:]) + asked + sampling["max_new_tokens"] > context:
                drop += 1
            if drop:
                held = _media(history[: 2 * drop])
                print(
                    f"kimivl chat: dropped the first {'exchange' if drop == 1 else f'{drop} exchanges'} of the "
                    f"conversation{f' (with {held})' if held else ''} to fit the model's context of {context} tokens",
                    file=sys.stderr,
                )
                del history[: 2 * drop], sizes[:drop]
            history.append(message)
            turn = {**sampling, "seed": (sampling["seed"] + len(asked_lines) - 1) % 2**64}  # turns draw apart
            answer = _answer(model, processor, history, turn)
        except KeyboardInterrupt:
            print(flush=True)
            where = "" if terminal else f"question {len(asked_lines)} (line {number}) "
            print(f"kimivl chat: {where}stopped; the question is dropped from the conversation", file=sys.stderr)
            if not terminal:  # its answer line holds a part: the session's exit says so
                stopped.append(len(asked_lines))
        except ValueError as e:  # this question cannot be answered: the session goes on
            if terminal:
                print(f"kimivl chat: error: {printable(e)}; ask again", file=sys.stderr)
            else:  # its answer is left empty (a line break alone): the answers stay one for each question
                refused.append(len(asked_lines))
                print(
                    f"kimivl chat: error: question {len(asked_lines)} (line {number}): {printable(e)}", file=sys.stderr
                )
                print(flush=True)
        else:
            images, video = [], None
            history.append({"role": "assistant", "content": answer})
            sizes.append(asked + tokens(history[-1]))
            continue
        if history and history[-1] is message:
            history.pop()


IDLE_CONNECTIONS = 1024  # kimivl serve's default --limit-concurrency, beyond the requests the engine holds


def _loopback(host: str) -> bool:
    """Whether ``--host`` binds loopback only: every address it resolves to (as the bind resolves it: ``127.1``,
    ``LOCALHOST``, ``::ffff:127.0.0.1`` too) is in 127.0.0.0/8 or ::1; False for a name that does not resolve."""
    import ipaddress
    import socket

    try:
        found = socket.getaddrinfo(host.strip("[]").lower(), None)
    except (OSError, UnicodeError):
        return False
    addresses = [ipaddress.ip_address(info[4][0]) for info in found]
    return bool(addresses) and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses)


def _listen(host: str, port: int) -> list:
    """``open_sockets(host, port)``; one that cannot be opened is a ``CommandError`` saying what to change, before the
    model loads, not uvicorn's error after it."""
    import errno

    from kimivl.serve.listen import open_sockets

    try:
        return open_sockets(host, port)
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        advice = {
            errno.EADDRINUSE: "another server listens there: choose another --port",
            errno.EACCES: "this user may not listen there: choose another --port (1024 or more)",
        }.get(e.errno, "give --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
        raise CommandError(f"cannot listen on --host/--port {where} ({e.strerror or e}); {advice}") from None


def _allowed_host(text: str) -> str:
    """An ``--allowed-host`` as the Host guard compares a request's Host: lower case, an IPv6 address out of its
    brackets. One with a port is refused: the guard compares names only, so the port would never be checked."""
    name = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not name or "[" in name or "]" in name or name.count(":") == 1:
        raise CommandError(
            f"--allowed-host takes a host name or address without a port (requests to it are let in on any port), "
            f"e.g. kimi.example.com or [fd00::1], got {text!r}"
        )
    return name.lower()


def _no_colour() -> bool:
    """Whether the environment asks for plain text: ``NO_COLOR`` set and not empty (no-color.org), or ``TERM=dumb``."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def _event_loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kimivl.inference.generation_config import recommended_sampling
    from kimivl.serve.app import LOOPBACK_NAMES, HeaderDeadlineProtocol, check_api_key, create_app
    from kimivl.serve.engine import Engine
    from kimivl.serve.listen import PreboundServer
    from kimivl.serve.schema import Limits

    _at_least_one(args, "port", "max_batch", "max_queue", "prefill_chunk")
    if _event_loop_running():
        raise CommandError(
            "this thread runs an event loop already (a notebook's), and the server runs its own: start it in a "
            "process of its own, e.g. subprocess.Popen([sys.executable, '-m', 'kimivl', 'serve', ...])"
        )
    if args.host.startswith("[") and args.host.endswith("]"):  # an IPv6 address as a URL writes it: [::1]
        args.host = args.host[1:-1]
    held = args.max_batch + args.max_queue  # the requests the engine holds, each on its connection
    if args.limit_concurrency is None:
        args.limit_concurrency = held + IDLE_CONNECTIONS
    if args.limit_concurrency <= held:
        raise CommandError(
            f"--limit-concurrency must be over --max-batch + --max-queue ({held}), so that "
            f"every request the engine can hold has its connection, got {args.limit_concurrency}"
        )
    given = "--api-key" if args.api_key is not None else "the environment variable KIMIVL_API_KEY"
    api_key = args.api_key if args.api_key is not None else os.environ.get("KIMIVL_API_KEY")
    if api_key is not None:
        try:
            check_api_key(api_key)
        except ValueError as e:
            raise CommandError(f"{e} (this one came from {given})") from None
    if args.port > 65535:
        raise CommandError(f"--port must be at most 65535, got {args.port}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise CommandError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    allowed_hosts = [_allowed_host(h) for h in args.allowed_host]
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise CommandError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    what = (
        "--served-model-name"
        if args.served_model_name
        else "the model directory's name (the default --served-model-name)"
    )
    name = _utf8(name, sys.getfilesystemencoding(), what)  # argv under LC_ALL=C holds bytes as lone surrogates
    sampling = recommended_sampling(args.model)  # the chat page's, as kimivl chat's (a bad file fails before loading)
    sockets = _listen(args.host, args.port)
    try:
        model, processor = _load(args.model, args.dtype, args.device)
        engine = Engine(
            model, processor, max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk
        )
        limits = Limits(
            context=model.config.text_config.max_position_embeddings,
            max_batch=args.max_batch,
            allowed_local_media_path=args.allowed_local_media_path,
        )
        # on loopback, no name re-pointed at it gets in; a reverse proxy's public name is added with --allowed-host
        names = (*LOOPBACK_NAMES, args.host, *allowed_hosts)
        hosts = tuple(dict.fromkeys(n.lower() for n in names)) if _loopback(args.host) else None
        app = create_app(engine, name, api_key=api_key, limits=limits, hosts=hosts, sampling=sampling)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="info",
            timeout_graceful_shutdown=args.shutdown_timeout,
            limit_concurrency=args.limit_concurrency,
            http=HeaderDeadlineProtocol,  # closes connections whose headers do not arrive
            # uvicorn colours by stdout alone, but its server log goes to stderr: a log file got escape codes
            use_colors=not _no_colour() and is_terminal(sys.stdout) and is_terminal(sys.stderr),
        )
        try:
            PreboundServer(config).run(sockets=sockets)
        except KeyboardInterrupt:  # a Ctrl-C the server passed on once it had shut down (as uvicorn.run)
            pass
        finally:  # a forced quit (a second Ctrl-C) skips the app's shutdown: the engine's thread must not die in torch
            engine.shutdown()
    finally:
        for sock in sockets:
            sock.close()
    return 0


@contextlib.contextmanager
def _console_log(level: int, fmt: str) -> Iterator[None]:
    """Log records from ``level`` up to stderr in ``fmt``, each on a line of its own above the progress bars (not
    glued to the end of a bar's line) while the block runs; where logging is configured already (an application, a
    notebook's own ``basicConfig``) its configuration is used. Logging is left as it was found (a notebook calling
    ``main`` keeps its own)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    handler, level_before = None, root.level
    if not root.handlers:  # as logging.basicConfig does
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
        root.setLevel(level)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(level_before)


def cmd_train(args: argparse.Namespace) -> int:
    with _console_log(logging.INFO, "%(asctime)s %(name)s: %(message)s"):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from kimivl.distributed.world import close_world, init_world
    from kimivl.train.lock import check_free
    from kimivl.train.pipeline import run_recipe
    from kimivl.train.recipe import load_recipe

    _at_least_one(args, "dp_shard", "ep")
    overrides = {key: value for key, value in (("out", args.out), ("device", args.device)) if value is not None}
    for key, value in overrides.items():
        if not value.strip():  # e.g. an unset $OUT: the recipe's own would be used, unsaid
            raise CommandError(f"--{key} is empty: give one, or leave --{key} out for the recipe's '{key}'")
    if args.bf16 is not None:
        overrides["bf16"] = args.bf16
    if args.seed is not None:
        overrides["seed"] = args.seed
    recipe = load_recipe(args.recipe, overrides, device_needed=not args.plan)
    layout = {key: value for key, value in (("dp_shard", args.dp_shard), ("ep", args.ep)) if value is not None}
    if layout:
        recipe.parallel = {**(recipe.parallel or {}), **layout}
    if args.plan:
        from kimivl.train.plan import plan_recipe

        print("\n".join(plan_recipe(recipe, progress=True)))
        return 0
    world = init_world(recipe.parallel, recipe.device)
    try:
        recipe.device = world.device if world.active else recipe.device
        if not world.main:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
        check_free(recipe.out, world)  # a run there now is named, not the --resume that would then be refused
        started = any(recipe.out.glob("*/checkpoints")) or any(recipe.out.glob("*/final"))
        world.barrier()  # every rank has looked before any writes
        if started and not args.resume:
            raise ValueError(
                f"{recipe.out} already holds a run of this recipe; pass --resume to continue it "
                "(finished stages are kept) or choose another --out"
            )
        from kimivl.train.interrupt import Interrupted
        from kimivl.train.recipe import ExportRefused

        again = _resume_command(args)
        if world.active:
            again = f"torchrun (as before) -m {again}"
        try:
            run_recipe(recipe, world=world)
        except Interrupted as e:
            if world.main:
                print(f"kimivl train: {e}\nresume with: {again}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # outside a training step: building data, evaluating, writing a model, exporting
            if world.main:
                print(f"kimivl train: interrupted; {_kept(recipe)}\nresume with: {again}", file=sys.stderr)
            return 130
        except ExportRefused as e:
            raise ExportRefused(f"{e}, and resume with: {again}") from None
        return 0
    finally:
        close_world(world)


def _kept(recipe) -> str:
    """What a run interrupted between training steps keeps: its finished stages, and where."""
    from kimivl.train.pipeline import finished

    done = [s.name for s in recipe.stages if finished(recipe.out, s.name)]
    saved = "a stage under way resumes from its last checkpoint"
    if not done:
        return f"no stage had finished, {saved} (under {printable(recipe.out)})"
    stages = f"stage{'s' * (len(done) > 1)} {', '.join(done)}"
    return f"finished {stages} kept under {printable(recipe.out)}; {saved}"


def _resume_command(args: argparse.Namespace) -> str:
    """The command that resumes an interrupted ``kimivl train``: ``--resume`` and every setting the command line gave
    (out, device, seed, bf16, layout), so that the rest of the run trains as it began."""
    words = ["kimivl", "train", args.recipe, "--resume"]
    for flag, value in (
        ("--out", args.out),
        ("--device", args.device),
        ("--seed", args.seed),
        ("--dp-shard", args.dp_shard),
        ("--ep", args.ep),
    ):
        if value is not None:
            words += [flag, str(value)]
    if args.bf16 is not None:
        words.append("--bf16" if args.bf16 else "--no-bf16")
    return shlex.join(words)


def cmd_demo(args: argparse.Namespace) -> int:
    from kimivl.demo import run_demo

    run_demo(args.model, args.examples)
    return 0


def _data_paths(specs: list[str], tasks: list) -> dict[str, str]:
    """``--data`` values (``FILE`` or ``TASK=FILE``; ``TASK=FILE`` when several tasks run) as ``{task: path}``. A
    task given data twice is refused, and so is ``TASK=`` naming a known task that ``--task`` does not run (a path
    may hold ``=``: only a known task's name before it counts)."""
    from kimivl.eval.tasks import is_task_name

    names = [t.name for t in tasks]
    paths: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name not in names and is_task_name(name):
            raise CommandError(
                f"--data {spec}: task {name} is not among --task {','.join(names)}; add it to --task, or drop this "
                "--data"
            )
        if not (sep and name in names):
            if len(tasks) > 1:
                raise CommandError(
                    f"--data {spec}: with several tasks, write --data TASK=FILE, TASK one of {', '.join(names)}"
                )
            name, path = names[0], spec
        if not path:
            raise CommandError(f"--data {spec!r} gives no file: write --data FILE or --data TASK=FILE")
        path = _path(path)
        if name in paths:
            raise CommandError(f"--data gives task {name} two files, {paths[name]} and {path}: give one")
        paths[name] = path
    return paths


def _resume_advice(args: argparse.Namespace) -> str:
    """How to go on after an interrupted eval: the same command, less an ``--overwrite`` that would drop the kept."""
    return "Rerun the command without --overwrite" if args.overwrite else "Rerun the same command"


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        with _console_log(logging.WARNING, "%(name)s: %(message)s"):
            return _eval(args)
    except KeyboardInterrupt:
        print(
            f"kimivl eval: interrupted; the predictions written so far stay in {args.out}. {_resume_advice(args)} "
            "to resume.",
            file=sys.stderr,
        )
        return 130


def _max_new_tokens(args: argparse.Namespace, task) -> int:
    return args.max_new_tokens or (32 if task.name == "niah" else 512)


def _check_eval_inputs(args: argparse.Namespace, tasks: list, data: dict[str, str]) -> None:
    """What can be checked before a model loads: every task's data is there, and NIAH's options (when generating,
    lengths within the context of the checkpoint's config less the new tokens)."""
    from kimivl.eval import niah
    from kimivl.eval.tables import table_files

    for task in tasks:
        source = data.get(task.name) or task.default_data
        if source is not None:
            try:
                if task.needs_data:
                    table_files(source)  # a benchmark's table files (a directory holding none is an error too)
                elif not Path(source).exists():
                    raise FileNotFoundError(f"no such file or directory: {source}")
            except FileNotFoundError as e:
                raise CommandError(f"--data for {task.name}: {e}") from None
        if task.options.get("task") and source is not None:
            next(iter(task.load(source)), None)  # synthetic:<task>: an unknown one is an error listing the data's
        if task.name == "niah" and not args.predictions:
            niah.check_options(
                args.lengths,
                args.depths or niah.DEFAULT_DEPTHS,
                args.haystack or niah.KINDS,
                args.trials or 1,
                KimiVLConfig.from_pretrained(args.model).text_config.max_position_embeddings,
                _max_new_tokens(args, task),
            )


def _eval(args: argparse.Namespace) -> int:
    from functools import partial

    from kimivl import generate
    from kimivl.eval.report import headline
    from kimivl.eval.runner import EvalInterrupted, checkpoint_fingerprint, rescoring_samples, run_task
    from kimivl.eval.tasks import get_task

    tasks = [get_task(name.strip()) for name in args.task.split(",") if name.strip()]
    if not tasks:
        raise CommandError(f"--task {args.task!r} names no task; give one or more, comma-separated")
    _at_least_one(args, "batch_size", "max_new_tokens", "limit", "trials")
    data = _data_paths(args.data, tasks)
    for task in tasks:
        if task.needs_data and task.name not in data:
            raise ValueError(f"task {task.name} needs --data (a local copy of the benchmark)")
    if args.predictions and not Path(args.predictions).is_file():
        raise CommandError(f"--predictions {args.predictions}: no such file")
    if args.predictions and len(tasks) != 1:
        raise ValueError("--predictions re-scores one task at a time")
    if not args.predictions and not args.model:
        raise ValueError("give --model to generate answers, or --predictions to re-score saved ones")
    _check_eval_inputs(args, tasks, data)
    model, processor, context, fingerprint = None, None, None, None
    if args.model:
        fingerprint = checkpoint_fingerprint(args.model)
        model, processor = _load(args.model, args.dtype, args.device)
        context = model.config.text_config.max_position_embeddings
    unscored = []  # tasks whose every row was skipped: no number to publish
    for task in tasks:
        max_new = _max_new_tokens(args, task)
        answer = None if args.predictions else partial(generate, model, processor, max_new_tokens=max_new)
        options = {
            **task.options,
            "processor": processor,
            "context": context,
            "max_new_tokens": max_new,
            "lengths": args.lengths,
            "depths": args.depths,
            "kinds": args.haystack,
            "trials": args.trials,
            "media": not args.predictions,  # re-scoring needs no rendered pages (MMLongBench-Doc's PDFs)
        }
        options = {k: v for k, v in options.items() if v is not None}
        source = data.get(task.name) or task.default_data
        if args.predictions and task.from_index:
            samples = rescoring_samples(task, args.predictions)
        else:
            samples = task.load(source, **options)
        settings = None
        if not args.predictions:
            settings = {
                "model": path_text(Path(args.model).resolve()),  # the same path in any locale
                "checkpoint_fingerprint": fingerprint,
                "data": path_text(Path(source).resolve()) if source else None,
                "dtype": str(model.dtype).removeprefix("torch."),  # as loaded: the default depends on the CPU
                "max_new_tokens": max_new,
            }
            if task.name == "niah":  # the NIAH options make its rows; other tasks' predictions do not depend on them
                settings.update(lengths=args.lengths, depths=args.depths, haystack=args.haystack, trials=args.trials)
        try:
            result = run_task(
                task,
                samples,
                args.out,
                generate_fn=answer,
                predictions=args.predictions,
                batch_size=args.batch_size,
                limit=args.limit,
                mode=args.scoring,
                settings=settings,
                overwrite=args.overwrite,
                info={  # absolute, as run.json records them
                    "model": args.model and path_text(Path(args.model).resolve()),
                    "data": source and path_text(Path(source).resolve()),
                },
            )
        except EvalInterrupted as e:
            print(
                f"kimivl eval: interrupted; {e.kept} predictions of {e.task} kept in {e.path}. "
                f"{_resume_advice(args)} to resume from there.",
                file=sys.stderr,
            )
            return 130
        metrics = "  ".join(f"{k}={v:.1f}" for k, v in headline(result["metrics"]).items())
        print(
            f"{task.name}: {metrics}  (scored {result['scored']} rows: {result['answered']} answered, "
            f"{result['missing']} missing and scored as empty answers; {result['skipped']} skipped as malformed; "
            f"{args.scoring} scoring)"
        )
        if not result["scored"]:
            unscored.append(task.name)
        if result.get("table"):
            print(result["table"])
        for kind in ("missing", "skipped"):
            for row in result[f"{kind}_rows"][:5]:
                print(f"  {kind} {printable(row['index'])}: {printable(row['reason'])}")  # data may hold escapes
            if result[kind] > 5:
                print(f"  ... {result[kind] - 5} more {kind} rows in {args.out}/results.json")
    print(f"results: {args.out}/results.json, {args.out}/results.md")
    if unscored:
        print(
            f"kimivl eval: error: {', '.join(unscored)} scored 0 rows (every row skipped as malformed): no metrics; "
            f"see the skipped rows in {args.out}/results.json",
            file=sys.stderr,
        )
        return 1
    return 0


def _ints(text: str) -> list[int]:
    """``--lengths``/``--depths``: comma-separated whole numbers, ``k`` for 1024 (``1.5k`` is 1536); at least one (none
    is an error, not the default)."""
    values = []
    for x in filter(str.strip, text.split(",")):
        try:
            value = float(x.lower().removesuffix("k")) * (1024 if x.lower().endswith("k") else 1)
            if not math.isfinite(value):
                raise ValueError(x)
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{x.strip()!r} in {text!r} is not a whole number; give whole numbers")
            values.append(int(value))
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"{x.strip()!r} in {text!r} is not a number; give numbers, k for 1024, comma-separated (e.g. 1k,2k)"
            ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} holds no number; give one or more, comma-separated")
    return values


def _path(text: str) -> str:
    """A path flag's value with ``~`` expanded: a shell leaves it in ``--model=~/m`` (after ``=``) and in quotes."""
    return os.path.expanduser(text)


def build_parser() -> argparse.ArgumentParser:
    from kimivl.demo import DEFAULT_EXAMPLES, DEFAULT_MODEL
    from kimivl.inference import PREFILL_CHUNK

    parser = argparse.ArgumentParser(prog="kimivl", description="Kimi-VL in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts of a checkpoint or preset (no weights are loaded)")
    src = info.add_mutually_exclusive_group()
    src.add_argument("path", nargs="?", type=_path, help="checkpoint directory (its config.json)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in configuration")
    info.add_argument(
        "--train",
        nargs="*",
        metavar="PART",
        help=f"print the memory that training these parts takes ({', '.join(PARTS)}; none named: all)",
    )
    info.add_argument(
        "--freeze",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="parameter-name patterns kept frozen, e.g. '*.mlp.experts.*' (the routed experts)",
    )
    info.add_argument(
        "--context",
        type=int,
        metavar="TOKENS",
        help="print the cache and prefill activation memory at this context length (preset default: kimi-vl-a3b)",
    )
    info.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="TOKENS",
        help=f"with --context: tokens per prefill chunk (default {PREFILL_CHUNK}, as generation uses)",
    )
    info.add_argument("--dp-shard", type=int, help="with --train: the memory per rank, weights sharded over N ranks")
    info.add_argument("--ep", type=int, help="with --dp-shard: routed experts split over M of them")
    info.set_defaults(func=cmd_info)

    chat = sub.add_parser("chat", help="answer a question (or chat interactively) with a checkpoint")
    chat.add_argument("question", nargs="?", help="one question; without it, an interactive multi-turn session")
    chat.add_argument(
        "--model",
        type=_path,
        default=str(DEFAULT_MODEL),
        help="checkpoint directory (weights, tokenizer, preprocessor; default: the shipped kimivl-tiny)",
    )
    chat.add_argument(
        "--image",
        action="append",
        default=[],
        type=_path,
        help="an image file, or a pipe such as /dev/stdin (repeatable)",
    )
    chat.add_argument("--video", type=_path, help="a video file (or a pipe), fed as timestamped frames")
    given = "default: the checkpoint's generation_config.json, else"
    chat.add_argument("--max-new-tokens", type=int, help=f"{given} 512")
    chat.add_argument("--temperature", type=float, help=f"0 for greedy ({given} 0.2, as for Instruct)")
    chat.add_argument("--top-p", type=float, help=f"{given} 1.0")
    chat.add_argument(
        "--seed", type=int, default=0, help="the sampling seed; a session's question n uses seed + n - 1 (default 0)"
    )
    chat.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: the checkpoint's (float32 for bfloat16 on a CPU that multiplies bf16 slowly)",
    )
    chat.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible chat completions server (continuous batching)")
    serve.add_argument(
        "--model", type=_path, default=str(DEFAULT_MODEL), help="checkpoint directory (default: kimivl-tiny)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="on a loopback --host, a host name (or address) requests may also address, without a port (a reverse "
        "proxy's; repeatable)",
    )
    serve.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests (or set KIMIVL_API_KEY, unseen by ps)"
    )
    serve.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: the checkpoint's (as for chat)")
    serve.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    serve.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together (default 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429 (default 64)")
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens per prefill pass and between two decode steps; up to 4 passes' worth while more prompts "
        "wait than rows decode (default 512)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=25.0,
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM, how long open requests may finish before they are cancelled (default 25: within "
        "Kubernetes' grace period of 30 s)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        metavar="N",
        help="open connections (idle ones too) and requests in progress over which new requests get 503 (default "
        f"--max-batch + --max-queue + {IDLE_CONNECTIONS}; must be over --max-batch + --max-queue)",
    )
    serve.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    serve.add_argument(
        "--allowed-local-media-path",
        type=_path,
        help="a directory whose image files requests may name (default: data: URLs only)",
    )
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="run a training recipe (YAML): every stage in order, resumable")
    train.add_argument("recipe", type=_path, help="recipe file, e.g. recipes/tiny.yaml")
    train.add_argument("--resume", action="store_true", help="continue a run: skip finished stages, resume the rest")
    train.add_argument("--out", type=_path, help="run directory (default: the recipe's 'out')")
    train.add_argument("--device", help="where to train, e.g. cuda (default: the recipe's 'device', else cpu)")
    train.add_argument("--seed", type=int, help="the run's seed (default: the recipe's 'seed'), e.g. for RL repeats")
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast on or off (default: the recipe's 'bf16', else where the device multiplies bf16 fast)",
    )
    train.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's data and memory plan, then stop (no weights loaded, nothing written)",
    )
    train.add_argument(
        "--dp-shard", type=int, help="under torchrun: ranks that shard the weights (default: world size / dp_replicate)"
    )
    train.add_argument("--ep", type=int, help="under torchrun: ranks that split each layer's routed experts")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="the shipped kimivl-tiny answering bundled held-out questions")
    demo.add_argument(
        "--model", type=_path, default=str(DEFAULT_MODEL), help="checkpoint directory (default: kimivl-tiny)"
    )
    demo.add_argument(
        "--examples",
        type=_path,
        default=str(DEFAULT_EXAMPLES),
        help="held-out split directory (default: the bundled examples/heldout)",
    )
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="score a checkpoint (or saved predictions) on benchmarks, synthetic tasks, NIAH")
    ev.add_argument(
        "--task",
        required=True,
        help="comma-separated: mmmu, mathvista, ocrbench, screenspot, "
        "screenspot_pro, videomme, mmlongbench_doc, synthetic, synthetic:<task>, niah",
    )
    ev.add_argument("--model", type=_path, help="checkpoint directory (not needed with --predictions)")
    ev.add_argument(
        "--data",
        action="append",
        default=[],
        help="benchmark file or directory (TSV, parquet, JSON); with several tasks TASK=FILE (repeatable)",
    )
    ev.add_argument(
        "--predictions",
        type=_path,
        help="re-score this JSONL of {index, prediction[, extracted]} without loading a "
        "model (extracted: an answer parsed elsewhere, e.g. by an LLM, scored by the rules)",
    )
    ev.add_argument("--limit", type=int, help="only the first N rows of each task")
    ev.add_argument(
        "--scoring",
        choices=["official", "lenient"],
        default="official",
        help="official: each benchmark's own evaluation rules (default, comparable with published "
        "scores); lenient: kimivl's more forgiving answer parsing",
    )
    ev.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: drop the predictions already in --out for these tasks (needed when they "
        "come from another model, checkpoint, data or generation settings)",
    )
    ev.add_argument("--out", type=_path, default="runs/eval", help="output directory (default runs/eval)")
    ev.add_argument("--batch-size", type=int, default=8, help="rows generated together (default %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, help="default 512 (32 for niah)")
    ev.add_argument(
        "--lengths",
        type=_ints,
        help="niah prompt lengths, e.g. 1k,2k,4k (default: powers of two up to the model's context)",
    )
    ev.add_argument("--depths", type=_ints, help="niah needle depths in percent (default 0,10,...,100)")
    ev.add_argument("--haystack", type=lambda s: s.split(","), help="niah haystacks: text,video (default both)")
    ev.add_argument("--trials", type=int, help="niah cases per length and depth (default 1)")
    ev.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: the checkpoint's (float32 for bfloat16 on a CPU that multiplies bf16 slowly)",
    )
    ev.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    ev.set_defaults(func=cmd_eval)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a mistake in the user's input or setup raises: the project's errors (ConfigError, CheckpointError,
    DataError, RecipeError, ImageError, VideoError, SamplingError, TokenizerError, CommandError are ValueErrors;
    TrainingError), OS errors about the user's files (a missing file, a full disk), a missing optional package."""
    from kimivl.train.step import TrainingError

    return ConfigError, ValueError, TrainingError, OSError, ImportError


def _escape_unencodable() -> None:
    """On a console that is not UTF-8 (``PYTHONIOENCODING=ascii``, ``LANG=C`` without UTF-8 mode, a Windows console),
    a character it cannot show is printed as its escape (``\\U0001f33f``), as Python's stderr does: an answer no
    longer stops at it with a UnicodeEncodeError. Escapes, not ``?``: the character can still be told. A byte that
    Python read as a lone surrogate (a path from argv or the filesystem under ``LANG=C``) is written back as that byte,
    as Python's stdout does there: the path prints as it is."""
    codecs.register_error("kimivl.escape", _byte_or_escape)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="kimivl.escape")


def _byte_or_escape(e: UnicodeEncodeError) -> tuple[str | bytes, int]:
    """The encoding error handler of ``_escape_unencodable``, one character at a time: ``surrogateescape``'s byte,
    else ``backslashreplace``'s escape."""
    c = e.object[e.start]
    if "\udc80" <= c <= "\udcff":
        return bytes([ord(c) - 0xDC00]), e.start + 1
    return c.encode("ascii", "backslashreplace").decode("ascii"), e.start + 1


RESULT_ON_STDOUT = ("chat", "demo", "info", "eval")  # commands whose result is what they print (and train --plan)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user's mistake prints one ``kimivl CMD: error: ...`` message (no traceback) and exits 2;
    Ctrl-C exits 130 and a closed stdout (``| head``) 141, quietly."""
    _escape_unencodable()
    args = build_parser().parse_args(argv)
    prints = args.command in RESULT_ON_STDOUT or getattr(args, "plan", False)
    try:  # Ctrl-C, a reader gone (| head) and a closed stdout where the result is printed end in run_command
        return run_command(f"kimivl {args.command}", lambda: args.func(args), prints)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        if isinstance(e, OSError) and e.errno in FULL and not isinstance(e, WriteError):  # a write not wrapped
            e = write_error(e, e.filename) if e.filename else f"the disk is full ({e.strerror}): free space, try again"
        message = " ".join(line.strip() for line in str(e).split("\n") if line.strip())  # a \r mid-line: escaped
        from kimivl.demo import DEFAULT_EXAMPLES, DEFAULT_MODEL, NOT_SHIPPED

        if any(str(path) in message and not path.exists() for path in (DEFAULT_MODEL, DEFAULT_EXAMPLES)):
            message += f" ({NOT_SHIPPED})"  # an installed package, run away from a clone
        try:
            print(f"kimivl {args.command}: error: {printable(message)}", file=sys.stderr)  # it may quote a data file
        except BrokenPipeError as gone:  # stderr's reader has gone (2>&1 | true): the error unsaid, its status kept
            stop_code(f"kimivl {args.command}", gone)
        return 2


if __name__ == "__main__":
    sys.exit(main())
