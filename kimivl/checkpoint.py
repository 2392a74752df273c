"""Safetensors checkpoints in the official layout: ``model.safetensors`` or shards with
``model.safetensors.index.json``, under the official key names. Pickle files are never opened.

Loading copies tensor by tensor into an already-allocated model, so a 16B checkpoint never exists twice in memory.
Shards named by an index must lie inside the checkpoint directory; tensors whose kind (float or not) differs from
the model's, and float8 (quantized) tensors, are refused, and non-finite values are reported by name.

Saving marks every file it writes (``WRITER`` in the safetensors metadata and in the index's metadata), so a later
save into the same directory can tell the files of an older kimivl save, which it replaces or removes, from another
model's, which make it refuse before anything is written; a ``config.json`` is kimivl's when it configures a Kimi-VL
model (``model_type`` ``kimi_vl``), and every file of a directory that a recipe exported to (``EXPORT_RECORD``) is
kimivl's (an export may predate the mark). It never overwrites or deletes a file it cannot tell is kimivl's.

The mark's value names the save that wrote the file (a conversion marks its files with its source's index's), the
index last: a save over a sharded checkpoint that a crash or a full disk cut short leaves shards of two saves, which
loading refuses (a marked shard of another save than its index's) instead of mixing old and new weights. Training
checkpoints and exports are written elsewhere and renamed into place, and never hold such a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kimivl.config import KimiVLConfig, set_weight_dtype
from kimivl.files import WriteError, file_mode, write_text_atomic
from kimivl.files import write_error as _write_error
from kimivl.model.moe import ROUTER_KEY_SUFFIXES, router_dtype

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
EXPORT_RECORD = "kimivl-run.json"  # in a model that a recipe exported: which run wrote it
FROZEN_FINGERPRINT = "kimivl_frozen_fingerprint"  # safetensors metadata of a training checkpoint's frozen shard
WRITER = "kimivl_checkpoint"  # metadata key marking a file (shard or index) that save_checkpoint wrote: the save's id
UNNAMED = "1"  # the mark of a file written before saves were named (or by a gathered save, always into a new folder)
# Keys that released checkpoints may carry but that hold nothing a model needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The dtypes weights are loaded and saved in (those a config's torch_dtype can name).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Their names in safetensors headers; a float dtype of another name (F8_E4M3 ...) is a quantized checkpoint's.
STORED_FLOATS = ("F32", "BF16", "F16", "F64")
# torch's names of the float8 dtypes of quantized releases, by their safetensors names.
FLOAT8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model or cannot be read."""


class CheckpointReadError(CheckpointError):
    """A checkpoint file that cannot be read (damaged, cut short); the message names it."""


class CheckpointWriteError(CheckpointError, WriteError):
    """Writing a checkpoint failed (a full disk, a read-only directory); also an ``OSError``, as the failure was."""


def check_directory(path: str | os.PathLike) -> None:
    """A checkpoint is read from its directory: a file given instead (its ``config.json``, a shard) is refused, naming
    the directory to give."""
    if os.path.isfile(path):
        path = os.fspath(path)
        raise CheckpointError(f"{path} is a file: give the checkpoint directory ({os.path.dirname(path) or '.'})")


def weights_size(path: str | os.PathLike) -> tuple[int, int]:
    """How many safetensors files the directory ``path`` holds, and their bytes (a broken link counts as none)."""
    files = [f for f in Path(path).glob("*.safetensors") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def checkpoint_files(path: str | os.PathLike) -> dict[str, list[str]]:
    """Map each safetensors file of the checkpoint at ``path`` to the keys it should hold (None = all)."""
    check_directory(path)
    path = os.fspath(path)
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                parsed = json.load(f)
                weight_map = parsed["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        except RecursionError:
            raise CheckpointError(f"{index} is not a valid safetensors index: its JSON is nested too deeply") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index}: 'weight_map' must map tensor names to shard file names, got {type(weight_map).__name__}"
            )
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise CheckpointError(
                    f"{index}: 'weight_map' must map tensor names to shard file names; {key!r} maps to {name!r}"
                )
            if os.path.isabs(name) or ".." in PurePath(name).parts or PurePath(name).drive:
                raise CheckpointError(
                    f"{index}: shard {name!r} (for {key!r}) lies outside the checkpoint directory; "
                    "an index may only name files inside it"
                )
            files.setdefault(os.path.join(path, name), []).append(key)
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        _check_one_save(index, _save_of(parsed), files)
        return files
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return {single: None}
    pickles = (
        [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))] if os.path.isdir(path) else []
    )
    hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {path}{hint}")


def _check_one_save(index: str, save: str, files: dict[str, list[str]]) -> None:
    """Refuse shards that another save than the index's (``save``) wrote: a save into the folder was cut short (over
    an older kimivl save or a gathered one, whose files all bear ``UNNAMED``, too). Unmarked shards (an official
    checkpoint's) are not kimivl's to judge; shards of frozen weights, hard-linked from the checkpoint before, keep
    their own save's mark."""
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - a broken header: _read_headers names it
            continue
        if meta.get(WRITER, save) != save and FROZEN_FINGERPRINT not in meta:
            raise CheckpointError(
                f"{os.path.dirname(index)} holds shards of two saves: {os.path.basename(file)} is not of the save "
                f"its index records (a save or conversion into the folder was cut short, by a crash or a full disk); "
                "save or convert the model into it again"
            )


def _save_of(index: dict) -> str:
    """The save that wrote the checkpoint of this (parsed) index: ``UNNAMED`` for another writer's or an older one."""
    meta = index.get("metadata")
    mark = meta.get(WRITER) if isinstance(meta, dict) else None
    return mark if isinstance(mark, str) else UNNAMED


def _read_headers(files: dict[str, list[str] | None]) -> dict[str, tuple[str, list[int], str]]:
    """key -> (file, shape, safetensors dtype such as 'BF16' or 'I8') from the safetensors headers only."""
    found: dict[str, tuple[str, list[int], str]] = {}
    for file, listed in files.items():
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in keys}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointReadError(f"cannot read {file}: {_unopenable(file) or e}") from None
        if listed is not None and set(listed) - set(keys):
            raise CheckpointError(f"{file} lacks keys its index assigns to it: {sorted(set(listed) - set(keys))[:10]}")
        for k in keys:
            if listed is not None and k not in listed:
                continue  # the index is authoritative about which file holds a key
            found[k] = (file, *shapes[k])
    return found


def _unopenable(file: str) -> str | None:
    """Why ``file`` cannot be opened for reading (safetensors calls a file it may not read "No such file"), if so."""
    try:
        with open(file, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def check_dtype(dtype: object) -> None:
    """A ``ValueError`` unless ``dtype`` is one of the torch dtypes weights are held and saved in (a string such as
    ``"bfloat16"`` is refused too: ``getattr(torch, name)`` gives the dtype)."""
    if not isinstance(dtype, torch.dtype) or dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be a floating torch.dtype ({', '.join(map(str, WEIGHT_DTYPES))}), got {dtype!r}")


def check_save_arguments(max_shard_bytes: object, dtype: object) -> None:
    """A ``ValueError`` for a ``max_shard_bytes`` that is not a positive integer or a ``dtype`` (None: as held) that
    ``check_dtype`` refuses: checked before a save writes anything."""
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    if dtype is not None:
        check_dtype(dtype)


def _is_float(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith(("F", "BF"))


def check_weight_dtypes(path: str | os.PathLike, found: dict[str, tuple[str, list[int], str]]) -> None:
    """A ``CheckpointError`` when a tensor of the checkpoint at ``path`` (headers ``found``) is stored in a float dtype
    outside ``WEIGHT_DTYPES``: a quantized checkpoint (float8 weights), whose values mean nothing without their
    scales, which kimivl does not apply."""
    odd = {}
    for k, (_, _, dtype) in sorted(found.items()):
        if _is_float(dtype) and dtype not in STORED_FLOATS:
            odd.setdefault(FLOAT8_NAMES.get(dtype, dtype), []).append(k)
    if odd:
        kinds = ", ".join(f"{name} ({len(keys)} tensors, e.g. {keys[0]})" for name, keys in odd.items())
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} holds {kinds}: {' and '.join(odd)} weights (a quantized checkpoint) are "
            "not supported; use the bf16 release"
        )


def check_tensors(
    path: str | os.PathLike,
    found: dict[str, tuple[str, list[int], str]],
    expected: dict[str, torch.Tensor],
    elsewhere: set[str] = frozenset(),
    model: str = "the model",
) -> None:
    """Raise one ``CheckpointError`` listing every problem of the checkpoint at ``path`` whose headers are ``found``
    (``_read_headers``) for a model whose tensors (or views of them) are ``expected`` by name: a missing tensor, an
    unexpected one (not expected and not in ``elsewhere``, the names other ranks load), a shape that differs, and a
    float tensor where the model holds an integer one, or the reverse; a quantized checkpoint is refused first, as
    such (``check_weight_dtypes``). The message names the model as ``model`` says."""
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_SUFFIXES)}
    check_weight_dtypes(path, found)
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - elsewhere)
    wrong = [
        f"{k}: checkpoint {list(shape)} vs model {list(expected[k].shape)}"
        for k, (_, shape, _) in sorted(found.items())
        if k in expected and list(shape) != list(expected[k].shape)
    ]
    kind = [
        f"{k}: checkpoint {dtype} where the model holds {expected[k].dtype}"
        for k, (_, _, dtype) in sorted(found.items())
        if k in expected and _is_float(dtype) != expected[k].dtype.is_floating_point
    ]
    if missing or unexpected or wrong or kind:
        parts = [
            f"{title} ({len(items)}):\n  " + "\n  ".join(items[:20]) + ("\n  ..." if len(items) > 20 else "")
            for title, items in (
                ("missing tensors", missing),
                ("unexpected tensors", unexpected),
                ("wrongly shaped tensors", wrong),
                ("tensors of the wrong kind (integer or bool for float, or the reverse)", kind),
            )
            if items
        ]
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not match {model}:\n" + "\n".join(parts))


def warn_non_finite(path: str | os.PathLike, names: list[str]) -> None:
    """Warn, naming them, that the tensors ``names`` loaded from ``path`` hold NaN or inf values."""
    if names:
        more = " ..." if len(names) > 10 else ""
        log.warning(
            "checkpoint %s holds NaN or inf values in %d tensors: %s%s; its outputs will not be usable",
            os.fspath(path),
            len(names),
            ", ".join(names[:10]),
            more,
        )


def is_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf (an integer or empty tensor always): whether its least and greatest values are
    finite, as ``aminmax`` gives NaN for a tensor holding one (over 10x faster than ``isfinite(t).all()`` on a CPU)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the checkpoint at ``path`` into ``model`` (already allocated), strictly: every model tensor must be
    present with its shape, and no unknown tensor may be left over. All problems are reported in one error."""
    files = checkpoint_files(path)
    found = _read_headers(files)
    slots = model.state_dict(keep_vars=True)
    check_tensors(path, found, slots)
    non_finite = []
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    if k in slots and found[k][0] == file:
                        slots[k].copy_(f.get_tensor(k))
                        if not is_finite(slots[k]):
                            non_finite.append(k)
    warn_non_finite(path, non_finite)


def _shards(state: dict[str, torch.Tensor], max_bytes: int, dtype: torch.dtype | None = None) -> list[list[str]]:
    """The keys of ``state`` in order, cut into files of at most ``max_bytes`` (a larger tensor alone) as saved in
    ``dtype`` (``saved_dtype``; None: as held)."""
    shards, size = [[]], 0
    for k, t in state.items():
        n = t.numel() * saved_dtype(k, t, dtype).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def shard_file_names(count: int) -> list[str]:
    """The safetensors file names of a checkpoint in ``count`` files."""
    return [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(path: str | os.PathLike, weight_map: dict[str, str], total: int, save: str = UNNAMED) -> None:
    """The index of a checkpoint in several files (``total`` bytes of tensors), marked as kimivl's ``save``."""
    index = {"metadata": {"total_size": total, WRITER: save}, "weight_map": weight_map}
    write_text_atomic(os.path.join(path, INDEX), json.dumps(index, indent=2))


def _atomic_save(
    tensors: dict[str, torch.Tensor], file: str, metadata: dict[str, str] | None = None, save: str = UNNAMED
) -> None:
    """Write ``file``, marked as kimivl's ``save``, by way of ``file.tmp``, readable as ``open`` would make it
    (safetensors creates files 0o600, which another user, a serving container, cannot read). A failed write is an
    ``OSError`` with the errno of the failure (safetensors reports it as a ``SafetensorError`` ending in
    ``(os error N)``); a failure of any kind leaves no ``file.tmp``."""
    tmp = file + ".tmp"
    try:
        try:
            save_file(tensors, tmp, metadata={"format": "pt", WRITER: save, **(metadata or {})})
        except SafetensorError as e:
            found = re.search(r"\(os error (\d+)\)", str(e))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code)) from None
        os.chmod(tmp, file_mode())
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _make_folder(path: str) -> None:
    """The folder a save writes into, made if need be; a full disk or a read-only one is a ``CheckpointWriteError``."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise write_error(e, path) from None


def write_error(e: OSError, file: str | os.PathLike) -> CheckpointWriteError:
    """The error for an OS failure while writing ``file``: a full disk says so."""
    return _write_error(e, file, CheckpointWriteError)


def _frozen_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """State keys whose tensors are (views of) parameters with ``requires_grad=False``."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    return {k for k, t in state.items() if t.untyped_storage().data_ptr() in frozen}


def _fingerprint(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    """Names, shapes, dtypes and float64 sums (of values and of magnitudes) of ``keys``' tensors: equal for a frozen
    shard that did not change."""
    rows = [
        f"{k}:{list(state[k].shape)}:{state[k].dtype}:{state[k].sum(dtype=torch.float64).item()!r}:"
        f"{state[k].abs().sum(dtype=torch.float64).item()!r}"
        for k in keys
    ]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _link_unchanged(previous: str, file: str, fingerprint: str) -> bool:
    """Hard-link ``previous`` to ``file`` when it holds the shard of this ``fingerprint``; False otherwise (then the
    caller writes the shard, which is always safe)."""
    if not os.path.isfile(previous):
        return False
    try:
        with safe_open(previous, framework="pt") as f:
            if (f.metadata() or {}).get(FROZEN_FINGERPRINT) != fingerprint:
                return False
        os.link(previous, file + ".tmp")
    except Exception:  # an unreadable file, a filesystem without hard links: write the shard instead
        return False
    os.replace(file + ".tmp", file)
    return True


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    frozen_apart: bool = False,
    frozen_from: str | os.PathLike | None = None,
) -> list[str]:
    """Write the model's tensors under the official names, sharded above ``max_shard_bytes``. Each file is
    written to a temporary name and renamed, so a crash never leaves a half-written file, and marked with this save's
    id, the index last, so that loading refuses a folder a crash left holding shards of two saves.
    Returns file names.

    ``frozen_apart`` (training checkpoints) puts the tensors of frozen parameters in shards of their own, marked
    with a fingerprint; a frozen shard that the checkpoint ``frozen_from`` holds unchanged is hard-linked from it
    instead of written again, so a stage that trains a small part of a large model writes its frozen weights once."""
    check_save_arguments(max_shard_bytes, dtype)
    path = os.fspath(path)
    _make_folder(path)
    state = model.state_dict()
    frozen = _frozen_keys(model, state) if frozen_apart else set()
    parts = [{k: t for k, t in state.items() if (k in frozen) == side} for side in (True, False)]
    groups = [g for part in parts if part for g in _shards(part, max_shard_bytes, dtype)]
    names = shard_file_names(len(groups))
    keep = set(names) | ({INDEX} if len(groups) > 1 else set())
    stale = _stale_files(path, keep | {CONFIG})  # a config.json beside the weights describes them
    file, save = path, uuid.uuid4().hex
    try:
        for keys, name in zip(groups, names):
            file = os.path.join(path, name)
            metadata = None
            if keys[0] in frozen:
                metadata = {FROZEN_FINGERPRINT: _fingerprint(state, keys)}
                if frozen_from is not None and _link_unchanged(
                    os.path.join(frozen_from, name), file, metadata[FROZEN_FINGERPRINT]
                ):
                    continue
            _atomic_save({k: _for_file(k, state[k], dtype) for k in keys}, file, metadata, save)
        if len(groups) > 1:
            file = os.path.join(path, INDEX)
            total = sum(t.numel() * saved_dtype(k, t, dtype).itemsize for k, t in state.items())
            write_index(path, {k: name for keys, name in zip(groups, names) for k in keys}, total, save)
    except OSError as e:  # _atomic_save removed its temporary file
        raise write_error(e, file) from None
    for name in stale:
        log.info("removing %s of an older kimivl save from %s", name, path)
        os.remove(os.path.join(path, name))
    return names


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype) -> None:
    """The checkpoint at ``src`` written again to ``dst`` (a new directory, one holding an older kimivl save, or
    ``src`` itself) with its floating-point tensors in ``dtype`` (the routers' in float32 at least: ``saved_dtype``),
    file by file, so that one file is in memory at a time; the files keep their names and keys, and ``config.json`` is
    copied with its dtype fields naming ``dtype`` (``set_weight_dtype``: text_config's, and the top level's and
    vision_config's where the source has them). The dtype, the source's config and tensor dtypes (a quantized
    checkpoint is refused) and the files ``dst`` holds (another model's are refused) are checked before anything is
    written; a failed conversion removes a ``dst`` that it created."""
    check_dtype(dtype)
    check_directory(src)
    src, dst = os.fspath(src), os.fspath(dst)
    source_config = os.path.join(src, CONFIG)
    if not os.path.isfile(source_config):
        raise CheckpointError(f"no config.json in {src}: a checkpoint to convert needs the config of its model")
    KimiVLConfig.from_json_file(source_config)  # a ConfigError for a broken one
    with open(source_config, encoding="utf-8") as f:
        config = json.load(f)
    set_weight_dtype(config, str(dtype).removeprefix("torch."))
    files = checkpoint_files(src)
    check_weight_dtypes(src, _read_headers(files))
    names = [os.path.relpath(f, src) for f in files]
    indexed = os.path.isfile(os.path.join(src, INDEX))
    created = not os.path.exists(dst)
    _make_folder(dst)
    in_place = os.path.samefile(src, dst)  # then the files overwritten are the source's own
    try:
        stale = _stale_files(dst, {*names, *([INDEX] if indexed else []), CONFIG}, checked=not in_place)
        _write_converted(src, dst, names, indexed, dtype, config)
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    for name in stale:
        os.remove(os.path.join(dst, name))


def _write_converted(src: str, dst: str, names: list[str], indexed: bool, dtype: torch.dtype, config: dict) -> None:
    """``convert_checkpoint``'s writing: the files ``names`` of ``src`` in ``dtype``, its index, then ``config``."""
    file, total, index = dst, 0, None
    if indexed:
        with open(os.path.join(src, INDEX), encoding="utf-8") as f:
            index = json.load(f)
    save = UNNAMED if index is None else _save_of(index)
    try:
        for name in names:
            file = os.path.join(dst, name)
            os.makedirs(os.path.dirname(file), exist_ok=True)
            total += _convert_file(os.path.join(src, name), file, dtype, save)
        if index is not None:
            file = os.path.join(dst, INDEX)
            index["metadata"] = {"total_size": total, WRITER: save}
            write_text_atomic(file, json.dumps(index, indent=2))
        file = os.path.join(dst, CONFIG)
        write_text_atomic(file, json.dumps(config, indent=2) + "\n")
    except OSError as e:  # _atomic_save removed its temporary file
        raise write_error(e, file) from None


def _convert_file(source: str, file: str, dtype: torch.dtype, save: str) -> int:
    """The safetensors ``source`` written to ``file`` in ``dtype`` (``_for_file``), read a tensor at a time, marked as
    the source's ``save`` (its index's: a conversion cut short in place leaves one save's weights, some in the new
    dtype, and a frozen shard linked from another save is that save's no more); returns the bytes of tensors written.
    The converted tensors are freed on return, before the caller reads the next file."""
    with safe_open(source, framework="pt") as f:
        tensors = {k: _for_file(k, f.get_tensor(k), dtype) for k in f.keys()}
    _atomic_save(tensors, file, None, save)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def saved_dtype(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a save in ``dtype`` (None: as held) writes the tensor ``t`` of state key ``key`` in: ``dtype`` for a
    float tensor, except a router's weight and selection bias, which take ``router_dtype(dtype)``, float32 at least
    (as ``to_dtype`` holds them: in bf16 the bias's small updates would round away and a reloaded model would choose
    other experts); integer tensors as held."""
    if dtype is None or not t.is_floating_point():
        return t.dtype
    return router_dtype(dtype) if key.endswith(ROUTER_KEY_SUFFIXES) else dtype


def _for_file(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.to(saved_dtype(key, t, dtype)).clone()  # a private, contiguous copy: expert views share storage


def _written_by_kimivl(file: str) -> bool:
    """Whether ``file`` is kimivl's: a shard or an index carrying the mark of ``save_checkpoint``, or a
    ``config.json`` of a Kimi-VL model (``model_type`` ``kimi_vl``, as every config kimivl writes has)."""
    try:
        if os.path.basename(file) == CONFIG:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
            return isinstance(config, dict) and config.get("model_type") == "kimi_vl"
        if file.endswith(".json"):
            with open(file, encoding="utf-8") as f:
                meta = json.load(f).get("metadata")
        else:
            with safe_open(file, framework="pt") as f:
                meta = f.metadata()
        return isinstance(meta, dict) and WRITER in meta
    except Exception:  # noqa: BLE001 - unreadable (any safetensors or JSON failure): not known to be ours
        return False


def check_overwrite(path: str | os.PathLike, names: list[str]) -> None:
    """Refuse (``CheckpointError``, before anything is written) a save of the files ``names`` into ``path`` that
    would overwrite one of them in a directory that is not a Kimi-VL model's: Kimi-VL's are those with a
    ``config.json`` of a Kimi-VL model, a recipe's export, and, without a ``config.json``, a tokenizer of Kimi-VL's
    class (``TikTokenTokenizer``). Files not there yet overwrite nothing."""
    there = [n for n in names if os.path.exists(os.path.join(path, n))]
    if not there or os.path.isfile(os.path.join(path, EXPORT_RECORD)):
        return
    config = os.path.join(path, CONFIG)
    if os.path.exists(config):
        ours = _written_by_kimivl(config)
    else:
        try:
            with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
                ours = json.load(f).get("tokenizer_class") == "TikTokenTokenizer"
        except (OSError, ValueError, AttributeError):  # missing, unreadable or not a JSON object
            ours = False
    if not ours:
        raise CheckpointError(
            f"{path} is not a Kimi-VL model's directory, and this save would overwrite its {', '.join(there)}; "
            "save into an empty directory, or move those files away first"
        )


def _stale_files(path: str, writes: set[str], checked: bool = True) -> list[str]:
    """Check ``path`` before a save writes the files ``writes`` (shards, an index, ``config.json``) there, and return
    the shards and index of an older kimivl save that it does not write (removed once the new files are written). A
    file that the save would overwrite (unless ``checked`` is false: the caller knows them to be its own) or leave
    stale and that is not kimivl's (``_written_by_kimivl``, or in a recipe's export) is never overwritten or deleted:
    the save is refused before anything is written."""
    stale = sorted(
        n
        for n in os.listdir(path)
        if n not in writes and (n == INDEX or (n.startswith("model") and n.endswith(".safetensors")))
    )
    if os.path.isfile(os.path.join(path, EXPORT_RECORD)):  # a recipe's export: all kimivl's
        return stale
    replaced = [n for n in writes if checked and os.path.exists(os.path.join(path, n))]
    foreign = sorted(n for n in [*replaced, *stale] if not _written_by_kimivl(os.path.join(path, n)))
    if foreign:
        raise CheckpointError(
            f"{path} holds files that this save would overwrite or leave inconsistent and that kimivl did not "
            f"write: {', '.join(foreign[:10])}; save into an empty directory, or move those files away first"
        )
    return stale
