"""Configuration dataclasses for Kimi-VL, read from and written to the official ``config.json`` schema.

Unknown fields of an official file are kept in ``extra`` and written back unchanged, so a load/save round trip
never loses information. Those that other DeepSeek-V3 or transformers configs use to change the math
(``rope_parameters``, ``rope_interleave``, ``mlp_bias``, ``head_dim``, a top-level ``tie_word_embeddings``,
``quantization_config``) are refused unless they say what kimivl computes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from kimivl.files import write_text_atomic
from kimivl.finite import finite

log = logging.getLogger(__name__)

# Bounds that no real model comes near (DeepSeek-V3: 61 layers, 671B parameters): a config past them is a mistake,
# refused before anything is built (building 10^9 layers would hang, allocating them would exhaust memory).
MAX_LAYERS = 1024
MAX_PARAMETERS = 2 * 10**12
# torch_dtype values a checkpoint may declare (the float types torch loads weights in).
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64", "float", "half", "double")
# The names a config gives the dtype of its weights under: transformers 4's and transformers 5's.
DTYPE_KEYS = ("torch_dtype", "dtype")


class ConfigError(ValueError):
    """An impossible or malformed configuration value."""


def _split_known(cls, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in d.items() if k in names}, {k: v for k, v in d.items() if k not in names}


def _to_dict(obj) -> dict[str, Any]:
    out = dict(obj.extra)
    for f in dataclasses.fields(obj):
        if f.name != "extra":
            v = getattr(obj, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(obj, part: str, names: tuple[str, ...], low: int, high: int | None = None) -> None:
    """Each field an integer (not a bool) in [low, high]."""
    for name in names:
        v = getattr(obj, name)
        ok = _is_int(v) and v >= low and (high is None or v <= high)
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        _require(ok, f"{part}.{name} must be {kind}{f' (at most {high})' if high is not None else ''}, got {v!r}")


def _floats(obj, part: str, names: tuple[str, ...], positive: bool) -> None:
    """Each field a finite number (not a bool), > 0 (``positive``) or >= 0."""
    for name in names:
        v = getattr(obj, name)
        ok = (_is_int(v) or isinstance(v, float)) and finite(v) and (v > 0 if positive else v >= 0)
        _require(ok, f"{part}.{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")


def _types(obj, part: str, names: tuple[str, ...], kind: type) -> None:
    for name in names:
        v = getattr(obj, name)
        _require(isinstance(v, kind), f"{part}.{name} must be a {'boolean' if kind is bool else 'string'}, got {v!r}")


def _token_id(part: str, name: str, v: Any, vocab: int) -> None:
    _require(_is_int(v) and 0 <= v < vocab, f"{part}.{name} must be a token id in [0, vocab_size={vocab}), got {v!r}")


def _show(v: Any) -> str:
    return json.dumps(v, default=repr)


def _absent_or(extra: dict[str, Any], part: str | None, name: str, implemented: bool, why: str) -> None:
    """A field kimivl does not read (kept in ``extra``) that would change the model's math: refused unless absent or
    ``implemented`` (null counts as false, as transformers reads it)."""
    if name in extra:
        v, where = extra[name], f"{part}.{name}" if part else name
        ok = v is implemented or (v is None and implemented is False)
        _require(ok, f"{where} {_show(v)} is not supported: {why} ({name} {_show(implemented)})")


def _no_quantization(extra: dict[str, Any], part: str | None) -> None:
    where = f"{part}.quantization_config" if part else "quantization_config"
    _require(
        extra.get("quantization_config") is None,
        f"{where} {_show(extra.get('quantization_config'))}: quantized checkpoints are not supported; "
        "use the bf16 release",
    )


def _dtype_fields(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field, value) for each dtype field of the config dict ``d`` that names one (``DTYPE_KEYS``, null ones left
    out): text_config's first, then the top level's, then vision_config's."""
    parts = (("text_config.", d["text_config"]), ("", d), ("vision_config.", d["vision_config"]))
    return [(where + key, part[key]) for where, part in parts for key in DTYPE_KEYS if part.get(key) is not None]


def set_weight_dtype(d: dict[str, Any], name: str) -> None:
    """Make the config dict ``d`` say its weights are stored in ``name`` (``"float32"``): ``text_config.torch_dtype``,
    and every other dtype field ``d`` has (the top level's, vision_config's; ``torch_dtype`` or ``dtype``), so that the
    config never contradicts itself (transformers' ``torch_dtype="auto"`` reads the top-level one)."""
    d["text_config"]["torch_dtype"] = name
    for part in (d, d["text_config"], d["vision_config"]):
        for key in DTYPE_KEYS:
            if key in part:
                part[key] = name


@dataclass
class VisionConfig:
    """MoonViT (``vision_config``, model_type ``moonvit``)."""

    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: tuple[int, int] = (2, 2)
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    model_type: str = "moonvit"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()
        self.merge_kernel_size = tuple(self.merge_kernel_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_dim(self) -> int:
        """Width of one merged token entering the projector."""
        return self.hidden_size * self.merge_kernel_size[0] * self.merge_kernel_size[1]

    def validate(self) -> None:
        k = self.merge_kernel_size
        _require(
            isinstance(k, (list, tuple)) and len(k) == 2 and all(_is_int(x) and x >= 1 for x in k),
            f"vision_config.merge_kernel_size must be two positive integers, got {k!r}",
        )
        _ints(
            self,
            "vision_config",
            (
                "patch_size",
                "init_pos_emb_height",
                "init_pos_emb_width",
                "num_attention_heads",
                "hidden_size",
                "intermediate_size",
            ),
            1,
        )
        _ints(self, "vision_config", ("num_hidden_layers",), 1, MAX_LAYERS)
        _floats(self, "vision_config", ("layer_norm_eps", "rope_theta"), positive=True)
        _types(self, "vision_config", ("model_type",), str)
        _require(
            self.model_type == "moonvit",
            f"vision_config.model_type {self.model_type!r} is not supported: kimivl implements MoonViT "
            "(model_type 'moonvit')",
        )
        _no_quantization(self.extra, "vision_config")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"vision_config.num_attention_heads ({self.num_attention_heads}) must divide "
            f"hidden_size ({self.hidden_size})",
        )
        _require(
            self.head_dim % 4 == 0,
            f"vision head dim {self.head_dim} must be a multiple of 4 for the 2D RoPE "
            "(half the pairs rotate by column, half by row)",
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        known, extra = _split_known(cls, d)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class TextConfig:
    """The DeepSeek-V3-style language model (``text_config``, model_type ``deepseek_v3``)."""

    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.446
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 800000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int = 163584
    eos_token_id: int | list[int] = 163585
    pad_token_id: int | None = 0  # null (as transformers writes for DeepSeek-V3): pad_id is the first eos id
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek_v3"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()
        if self.pad_token_id is None:
            log.info("text_config.pad_token_id is null: padding with the eos id %d", self.pad_id)

    @property
    def pad_id(self) -> int:
        """The id batches are padded with: ``pad_token_id``, or the first eos id where that is null (the null itself
        is kept, and written back)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id if _is_int(self.eos_token_id) else self.eos_token_id[0]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    def validate(self) -> None:
        part = "text_config"
        _ints(
            self,
            part,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "moe_intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_group",
                "topk_group",
                "moe_layer_freq",
                "max_position_embeddings",
            ),
            1,
        )
        _ints(self, part, ("num_hidden_layers",), 1, MAX_LAYERS)
        _ints(self, part, ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"), 0)
        _floats(self, part, ("rms_norm_eps", "rope_theta", "routed_scaling_factor"), positive=True)
        _floats(self, part, ("aux_loss_alpha", "initializer_range"), positive=False)
        _types(self, part, ("norm_topk_prob", "seq_aux", "attention_bias", "tie_word_embeddings"), bool)
        _types(self, part, ("topk_method", "scoring_func", "hidden_act", "model_type", "torch_dtype"), str)
        _require(
            self.model_type == "deepseek_v3",
            f"text_config.model_type {self.model_type!r} is not supported: kimivl implements Kimi-VL's "
            "DeepSeek-V3-style language model (model_type 'deepseek_v3')",
        )
        _require(
            self.torch_dtype in FLOAT_DTYPES,
            f"text_config.torch_dtype must name a float type ({', '.join(FLOAT_DTYPES[:4])}), got {self.torch_dtype!r}",
        )
        eos = self.eos_token_id
        _require(
            _is_int(eos) or (isinstance(eos, list) and eos and all(_is_int(e) for e in eos)),
            f"text_config.eos_token_id must be a token id or a non-empty list of token ids, got {eos!r}",
        )
        for e in [eos] if _is_int(eos) else eos:
            _token_id(part, "eos_token_id", e, self.vocab_size)
        _token_id(part, "bos_token_id", self.bos_token_id, self.vocab_size)
        if self.pad_token_id is not None:
            _token_id(part, "pad_token_id", self.pad_token_id, self.vocab_size)
        _require(
            self.q_lora_rank is None, "text_config.q_lora_rank must be null: Kimi-VL's MLA has no query compression"
        )
        _require(
            self.num_key_value_heads == self.num_attention_heads,
            f"text_config.num_key_value_heads ({self.num_key_value_heads}) must equal "
            f"num_attention_heads ({self.num_attention_heads}) for MLA",
        )
        _require(
            self.qk_rope_head_dim % 2 == 0,
            f"text_config.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)",
        )
        _require(
            self.n_routed_experts % self.n_group == 0,
            f"text_config.n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})",
        )
        _require(
            self.topk_group <= self.n_group,
            f"text_config.topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})",
        )
        per_group = self.n_routed_experts // self.n_group
        _require(
            self.num_experts_per_tok <= self.topk_group * per_group,
            f"text_config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts reachable "
            f"in topk_group={self.topk_group} groups of {per_group}",
        )
        _require(
            self.n_group == 1 or per_group >= 2,
            "text_config: grouped routing scores each group by its top-2 experts, so every group needs "
            f"at least 2 experts (got {per_group})",
        )
        _require(
            self.scoring_func == "sigmoid",
            f"text_config.scoring_func {self.scoring_func!r} unsupported (Kimi-VL uses 'sigmoid')",
        )
        _require(
            self.topk_method == "noaux_tc",
            f"text_config.topk_method {self.topk_method!r} unsupported (Kimi-VL uses 'noaux_tc')",
        )
        _require(self.hidden_act == "silu", f"text_config.hidden_act {self.hidden_act!r} unsupported (expected 'silu')")
        _require(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"text_config.first_k_dense_replace ({self.first_k_dense_replace}) must be in "
            f"[0, num_hidden_layers={self.num_hidden_layers}]",
        )
        _require(
            self.rope_scaling is None,
            "text_config.rope_scaling is not supported: Kimi-VL uses plain RoPE (rope_scaling null)",
        )
        _require(
            not self.tie_word_embeddings,
            "text_config.tie_word_embeddings must be false: Kimi-VL's lm_head and embed_tokens are separate weights, "
            "and tied ones are not supported",
        )
        _require(
            self.num_nextn_predict_layers == 0,
            "text_config.num_nextn_predict_layers must be 0: multi-token prediction layers are not supported",
        )
        self._validate_extra()

    def _validate_extra(self) -> None:
        """The fields of other DeepSeek-V3 configs that kimivl does not read but that change the math: refused unless
        they say what kimivl computes."""
        x = self.extra
        _absent_or(x, "text_config", "rope_interleave", True, "Kimi-VL's RoPE rotates interleaved pairs")
        _absent_or(x, "text_config", "mlp_bias", False, "Kimi-VL's MLPs have no biases")
        _no_quantization(x, "text_config")
        if x.get("head_dim") is not None:
            _require(
                x["head_dim"] == self.qk_rope_head_dim and _is_int(x["head_dim"]),
                f"text_config.head_dim {_show(x['head_dim'])} is not supported: a DeepSeek-V3 config's head_dim is "
                f"the RoPE width, qk_rope_head_dim ({self.qk_rope_head_dim})",
            )
        if x.get("qk_head_dim") is not None:
            _require(
                x["qk_head_dim"] == self.qk_head_dim and _is_int(x["qk_head_dim"]),
                f"text_config.qk_head_dim {_show(x['qk_head_dim'])} must be qk_nope_head_dim + qk_rope_head_dim "
                f"({self.qk_head_dim})",
            )
        rope = x.get("rope_parameters")
        if rope is not None:
            plain = {"rope_type": "default", "rope_theta": self.rope_theta}
            _require(
                isinstance(rope, dict) and rope.keys() <= plain.keys() and rope.get("rope_type") == "default",
                f"text_config.rope_parameters {_show(rope)} is not supported: Kimi-VL uses plain RoPE "
                f"(rope_parameters {_show(plain)})",
            )
            _require(
                rope.get("rope_theta", self.rope_theta) == self.rope_theta,
                f"text_config.rope_parameters.rope_theta {_show(rope['rope_theta'])} disagrees with "
                f"rope_theta {self.rope_theta}",
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        """``rope_parameters`` (what transformers 5 writes in place of ``rope_theta``) gives ``rope_theta`` where the
        dict has none."""
        rope = d.get("rope_parameters")
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d = {**d, "rope_theta": rope["rope_theta"]}
        known, extra = _split_known(cls, d)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        rope = out.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:  # rope_theta may have been set since (long context)
            out["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        return out


@dataclass
class KimiVLConfig:
    """The whole model: ``vision_config`` + ``text_config`` + the top-level fields of ``config.json``."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    media_placeholder_token_id: int = 163605
    ignore_index: int = -100
    pad_token_id: int | None = 0
    model_type: str = "kimi_vl"
    architectures: list[str] = field(default_factory=lambda: ["KimiVLForConditionalGeneration"])
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig.from_dict(self.text_config)
        self.validate()

    def validate(self) -> None:
        """Check the whole config, its parts included: ``KimiVL`` calls it again, so that a config changed since it
        was built (a part replaced or a field set, say a smaller ``vocab_size``) is refused before a model is built
        on it, not when the model is saved."""
        self.vision_config.validate()
        self.text_config.validate()
        _require(self.model_type == "kimi_vl", f"model_type must be 'kimi_vl', got {self.model_type!r}")
        vocab = self.text_config.vocab_size
        _require(
            _is_int(self.media_placeholder_token_id) and 0 <= self.media_placeholder_token_id < vocab,
            f"media_placeholder_token_id ({self.media_placeholder_token_id!r}) is outside the vocabulary "
            f"(vocab_size {vocab})",
        )
        _require(
            self.ignore_index == -100 and _is_int(self.ignore_index),
            f"ignore_index must be -100, the label kimivl's processor and training write for positions not scored "
            f"(Kimi-VL's value), got {self.ignore_index!r}",
        )
        if self.pad_token_id is not None:  # kept null as read: padding uses text_config.pad_id
            _token_id("config", "pad_token_id", self.pad_token_id, vocab)
        for where, pad in (("pad_token_id", self.pad_token_id), ("text_config.pad_token_id", self.text_config.pad_id)):
            _require(
                pad != self.media_placeholder_token_id,
                f"{where} ({pad}) is the media_placeholder_token_id: padding would be read as image slots; pad with "
                "another id",
            )
        _absent_or(
            self.extra, None, "tie_word_embeddings", False, "Kimi-VL's lm_head and embed_tokens are separate weights"
        )
        _no_quantization(self.extra, None)
        _require(
            isinstance(self.architectures, list) and all(isinstance(a, str) for a in self.architectures),
            f"architectures must be a list of strings, got {self.architectures!r}",
        )
        n = estimated_parameters(self)
        _require(
            n <= MAX_PARAMETERS,
            f"this config describes a model of about {n:.3g} parameters "
            f"({n * 2 / 2**30:.3g} GiB in bfloat16), over the {MAX_PARAMETERS:.0e} that kimivl builds: "
            "check its sizes (hidden_size, num_hidden_layers, vocab_size, experts)",
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KimiVLConfig:
        """The weights' dtype is ``text_config.torch_dtype``; where that is absent or null, the first of
        ``text_config.dtype``, the top level's ``torch_dtype`` or ``dtype`` and vision_config's that names one."""
        _require(isinstance(d, dict), f"a config must be a JSON object, got {type(d).__name__}")
        for part in ("vision_config", "text_config"):
            _require(isinstance(d.get(part), dict), f"config.json has no {part} object")
        declared = _dtype_fields(d)
        for where, name in declared:
            _require(
                name in FLOAT_DTYPES,
                f"{where} must name a float type ({', '.join(FLOAT_DTYPES[:4])}), got {_show(name)}",
            )
        if declared and d["text_config"].get("torch_dtype") is None:
            d = {**d, "text_config": {**d["text_config"], "torch_dtype": declared[0][1]}}
        if len({name for _, name in declared}) > 1:
            log.warning(
                "config.json names different dtypes for its weights (%s): taking %s, as %s says",
                ", ".join(f"{where} {name}" for where, name in declared),
                declared[0][1],
                declared[0][0],
            )
        known, extra = _split_known(cls, d)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out

    def with_weight_dtype(self, name: str) -> KimiVLConfig:
        """A copy whose every dtype field names ``name`` (``set_weight_dtype``)."""
        d = self.to_dict()
        set_weight_dtype(d, name)
        return KimiVLConfig.from_dict(d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> KimiVLConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path} is not a config: its JSON is nested too deeply") from None
        except PermissionError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> KimiVLConfig:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            found = stat.S_ISREG(os.stat(file).st_mode)
        except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL, or a name the OS cannot take
            found = False
        except OSError as e:  # a folder this user may not enter: its config.json is there, unreadable
            raise ConfigError(f"cannot read {file}: {e.strerror}") from None
        if not found:
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_json_file(file)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` in ``path`` atomically (``write_text_atomic``: a crash leaves the old file whole, and
        a ``config.json`` that is a symlink, as in a Hugging Face cache, is replaced, its target left alone)."""
        os.makedirs(path, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        write_text_atomic(os.path.join(path, "config.json"), text)

    @classmethod
    def from_preset(cls, name: str) -> KimiVLConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()


def estimated_parameters(config: KimiVLConfig) -> int:
    """The parameter count of ``config``'s model from its sizes alone (norms and biases left out), so that a config
    can be judged before anything is built."""
    t, v = config.text_config, config.vision_config
    heads = t.num_attention_heads
    attention = (
        t.hidden_size * heads * (t.qk_nope_head_dim + t.qk_rope_head_dim)
        + t.hidden_size * (t.kv_lora_rank + t.qk_rope_head_dim)
        + t.kv_lora_rank * heads * (t.qk_nope_head_dim + t.v_head_dim)
        + heads * t.v_head_dim * t.hidden_size
    )
    moe = (
        t.n_routed_experts + t.n_shared_experts
    ) * 3 * t.hidden_size * t.moe_intermediate_size + t.n_routed_experts * t.hidden_size
    dense = 3 * t.hidden_size * t.intermediate_size
    moe_layers = sum(1 for i in range(t.first_k_dense_replace, t.num_hidden_layers) if t.is_moe_layer(i))
    text = (
        2 * t.vocab_size * t.hidden_size  # embed_tokens and lm_head (never tied)
        + t.num_hidden_layers * attention
        + moe_layers * moe
        + (t.num_hidden_layers - moe_layers) * dense
    )
    vision = (
        v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        + v.init_pos_emb_height * v.init_pos_emb_width * v.hidden_size
        + 3 * v.patch_size**2 * v.hidden_size
    )
    projector = v.merged_dim * (v.merged_dim + t.hidden_size)
    return text + vision + projector


def _a3b() -> KimiVLConfig:
    return KimiVLConfig(text_config=TextConfig(eos_token_id=[163585, 163586]))


# Tiny vocabulary: 3840 BPE ranks then the 256 special ids, laid out like the official table
# (the official table starts at 163584; the placeholder is special number 21).
TINY_VOCAB = 4096
TINY_SPECIAL_BASE = 3840


def _tiny() -> KimiVLConfig:
    base = TINY_SPECIAL_BASE
    return KimiVLConfig(
        vision_config=VisionConfig(
            init_pos_emb_height=16,
            init_pos_emb_width=16,
            num_attention_heads=4,
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
        ),
        text_config=TextConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            max_position_embeddings=4096,
            rope_theta=50000.0,
            bos_token_id=base,
            eos_token_id=[base + 1, base + 2],
        ),
        media_placeholder_token_id=base + 21,
    )


def _kimivl_tiny() -> KimiVLConfig:
    """The config ``recipes/tiny.yaml`` starts from (6.5M parameters): the shipped kimivl-tiny's sizes, wider than
    ``tiny`` so it can learn the synthetic world, with ``tiny``'s 4,096-token vocabulary and RoPE base 50,000. The
    recipe sizes the vocabulary to the tokenizer it trains (2,048 ranks + 256 special tokens) with that tokenizer's
    special ids, and its long-context stage raises ``rope_theta`` to 800,000: ``models/kimivl-tiny`` (5.6M)."""
    cfg = _tiny()
    cfg.vision_config = VisionConfig(
        init_pos_emb_height=16,
        init_pos_emb_width=16,
        num_attention_heads=4,
        num_hidden_layers=3,
        hidden_size=128,
        intermediate_size=256,
    )
    cfg.text_config = dataclasses.replace(
        cfg.text_config,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    return cfg


PRESETS = {"kimi-vl-a3b": _a3b, "tiny": _tiny, "kimivl-tiny": _kimivl_tiny}
