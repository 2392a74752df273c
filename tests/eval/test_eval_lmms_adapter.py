"""The lmms-eval adapter against a minimal fake of lmms-eval's model API (lmms-eval itself is not installed)."""

import importlib
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from kimivl import generate


@pytest.fixture()
def fake_lmms_eval(monkeypatch):
    registry: dict = {}

    class lmms:  # lmms-eval's name
        def __init__(self):
            self.task_dict = {}

    def register_model(*names):
        def decorate(cls):
            assert issubclass(cls, lmms)
            registry.update(dict.fromkeys(names, cls))
            return cls

        return decorate

    modules = {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": types.ModuleType("lmms_eval.api"),
        "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
        "lmms_eval.api.registry": types.ModuleType("lmms_eval.api.registry"),
        "lmms_eval.models": types.ModuleType("lmms_eval.models"),  # before 0.2.3: get_model read api.registry
    }
    modules["lmms_eval.api.model"].lmms = lmms
    modules["lmms_eval.api.registry"].register_model = register_model
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    import kimivl.eval.lmms_adapter as adapter

    yield importlib.reload(adapter), registry, lmms
    monkeypatch.undo()
    importlib.reload(adapter)  # back to the state without lmms-eval


def request(context, gen_kwargs, doc_id, task="demo", split="test"):
    return SimpleNamespace(args=(context, gen_kwargs, lambda doc: doc["visuals"], doc_id, task, split))


def test_registered_and_generates_in_request_order(fake_lmms_eval, small_model, small_processor):
    adapter, registry, base = fake_lmms_eval
    cls = registry["kimivl"]
    assert cls is adapter.KimiVLLmms and issubclass(cls, base)
    lm = cls(model=small_model, processor=small_processor, batch_size=2)
    img = Image.new("RGB", (56, 56), (10, 200, 10))
    lm.task_dict = {"demo": {"test": {0: {"visuals": [img]}, 1: {"visuals": []}, 2: {"visuals": [img, img]}}}}
    greedy = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    reqs = [
        request("What colour?", greedy, 0),
        request("Count the circles.", {"max_new_tokens": 3}, 1),
        request("<image>left, <image>right: same?", greedy, 2),
    ]
    answers = lm.generate_until(reqs)
    expected = [
        generate(
            small_model,
            small_processor,
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What colour?"}]}],
            max_new_tokens=4,
        ),
        generate(
            small_model,
            small_processor,
            [{"role": "user", "content": [{"type": "text", "text": "Count the circles."}]}],
            max_new_tokens=3,
        ),
        generate(
            small_model,
            small_processor,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": img},
                        {"type": "text", "text": "left, "},
                        {"type": "image", "image": img},
                        {"type": "text", "text": "right: same?"},
                    ],
                }
            ],
            max_new_tokens=4,
        ),
    ]
    assert answers == [e.split("\n\n")[0] for e in expected]
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood(reqs)


def test_imports_without_lmms_eval(small_model, small_processor):
    import kimivl.eval.lmms_adapter as adapter

    assert "lmms_eval" not in sys.modules
    lm = adapter.KimiVLLmms(model=small_model, processor=small_processor)
    assert lm.generate_until([]) == []
    assert adapter.request_messages("clip <image>?", ["a.mp4"])[0]["content"][1] == {"type": "video", "video": "a.mp4"}
    with pytest.raises(SystemExit, match="not installed"):
        adapter.main()


def test_loads_a_checkpoint_directory(checkpoint, small_model, small_processor):
    import kimivl.eval.lmms_adapter as adapter

    lm = adapter.KimiVLLmms(pretrained=str(checkpoint), dtype="float32", batch_size="auto")
    assert lm.batch_size_per_gpu == 1 and next(lm.model.parameters()).dtype == torch.float32
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Count the circles."}]}]
    assert generate(lm.model, lm.processor, prompt, max_new_tokens=4) == generate(
        small_model, small_processor, prompt, max_new_tokens=4
    )
    with pytest.raises(ValueError, match="needs pretrained=<checkpoint directory>"):
        adapter.KimiVLLmms()
    with pytest.raises(TypeError, match="images and videos"):
        adapter.request_messages("listen", [{"array": [0.0], "sampling_rate": 16000}])


def test_a_thinking_models_reasoning_is_not_passed_to_the_scorers(monkeypatch, small_model, small_processor):
    import kimivl.eval.lmms_adapter as adapter
    import kimivl.inference.chat as chat

    outputs = ["◁think▷6 x 5 is 30.\n\nPlus 1.◁/think▷31\n\nDone.", "◁think▷still thinking", "plain\n\n42"]
    monkeypatch.setattr(chat, "generate", lambda model, processor, convs, **kw: outputs[: len(convs)])
    reqs = [request("What is 6 x 5 + 1?", {"until": ["\n\n"]}, None) for _ in outputs]
    reqs = [SimpleNamespace(args=(*r.args[:2], None, *r.args[3:])) for r in reqs]  # no visuals
    lm = adapter.KimiVLLmms(model=small_model, processor=small_processor, batch_size=3)
    assert lm.generate_until(reqs) == ["31", "", "plain"]  # the answer after ◁/think▷, then the stop string cut
    keep = adapter.KimiVLLmms(model=small_model, processor=small_processor, batch_size=3, keep_thinking="true")
    assert keep.generate_until(reqs) == ["◁think▷6 x 5 is 30.", "◁think▷still thinking", "plain"]


@pytest.mark.parametrize(
    "args, words",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": "-1"}, "batch_size must be a positive integer, got '-1'"),
        ({"batch_size": "two"}, "batch_size must be a positive integer, got 'two'"),
        ({"max_new_tokens": "0"}, "max_new_tokens must be a positive integer, got '0'"),
        ({"max_new_tokens": "1.5"}, "max_new_tokens must be a positive integer"),
        ({"keep_thinking": "maybe"}, "keep_thinking must be true or false, got 'maybe'"),
        ({"pretrained": "ckpt", "dtype": "bogus"}, "dtype must be one of float32, bfloat16, float16, float64"),
    ],
)
def test_bad_model_args_are_refused_when_the_model_is_made(args, words, small_model, small_processor):
    import kimivl.eval.lmms_adapter as adapter

    given = {} if "pretrained" in args else {"model": small_model, "processor": small_processor}
    with pytest.raises(ValueError, match=re.escape(words)):
        adapter.KimiVLLmms(**given, **args)
    ok = adapter.KimiVLLmms(model=small_model, processor=small_processor, batch_size="3", max_new_tokens="16")
    assert (ok.batch_size_per_gpu, ok.max_new_tokens, ok.keep_thinking) == (3, 16, False)


def _import_class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _models_module(layout: str) -> dict:
    """A fake ``lmms_eval.models`` (and ``registry_v2``) whose ``get_model`` looks models up as that layout does:
    ``v2`` (0.7: MODEL_REGISTRY_V2 of ModelManifests), ``simple`` (AVAILABLE_SIMPLE_MODELS and
    AVAILABLE_CHAT_TEMPLATE_MODELS), ``available`` (0.2.3-0.3: AVAILABLE_MODELS); none reads api.registry."""
    models = types.ModuleType("lmms_eval.models")
    made = {"lmms_eval.models": models}
    if layout == "v2":
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class ModelManifest:
            model_id: str
            simple_class_path: str | None = None
            chat_class_path: str | None = None

        class ModelRegistryV2:
            def __init__(self):
                self.manifests = {"qwen2_vl": ModelManifest("qwen2_vl", "lmms_eval.models.simple.qwen2_vl.Qwen2_VL")}

            def register_manifest(self, manifest, *, overwrite=False):
                assert overwrite or manifest.model_id not in self.manifests
                self.manifests[manifest.model_id] = manifest

            def get_model_class(self, name, force_simple=False):
                if name not in self.manifests:
                    raise ValueError(f"Model '{name}' not found in available models")
                manifest = self.manifests[name]
                return _import_class(manifest.chat_class_path or manifest.simple_class_path)

        registry_v2 = types.ModuleType("lmms_eval.models.registry_v2")
        registry_v2.ModelManifest = ModelManifest
        made["lmms_eval.models.registry_v2"] = registry_v2
        models.MODEL_REGISTRY_V2 = ModelRegistryV2()
        models.AVAILABLE_SIMPLE_MODELS = {"qwen2_vl": "Qwen2_VL"}  # 0.7 keeps the table, get_model ignores it
        models.get_model = lambda name, force_simple=False: models.MODEL_REGISTRY_V2.get_model_class(name, force_simple)
        return made
    tables = (
        ("AVAILABLE_SIMPLE_MODELS", "AVAILABLE_CHAT_TEMPLATE_MODELS") if layout == "simple" else ("AVAILABLE_MODELS",)
    )
    for table in tables:
        setattr(models, table, {})

    def get_model(name, force_simple=False):
        found = [getattr(models, t)[name] for t in reversed(tables) if name in getattr(models, t)]
        if not found:
            raise ValueError(f"Model {name} not found in available models.")
        path = found[-1] if force_simple else found[0]
        return _import_class(path if "." in path else f"lmms_eval.models.{name}.{path}")

    models.get_model = get_model
    return made


@pytest.mark.parametrize("layout", ["v2", "simple", "available"])
def test_lmms_evals_get_model_finds_kimivl_in_each_releases_layout(layout, monkeypatch):
    """simple_evaluate calls lmms_eval.models.get_model("kimivl"), which (from 0.2.3 on) never reads the
    api.registry decorator's table: the adapter registers where each release's get_model looks."""
    base = types.ModuleType("lmms_eval.api.model")
    base.lmms = type("lmms", (), {"__init__": lambda self: None})
    registry = types.ModuleType("lmms_eval.api.registry")
    registry.MODEL_REGISTRY = {}
    registry.register_model = lambda *names: (
        lambda cls: registry.MODEL_REGISTRY.update(dict.fromkeys(names, cls)) or cls
    )
    modules = {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": types.ModuleType("lmms_eval.api"),
        "lmms_eval.api.model": base,
        "lmms_eval.api.registry": registry,
        **_models_module(layout),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    import kimivl.eval.lmms_adapter as adapter

    try:
        adapter = importlib.reload(adapter)
        models = sys.modules["lmms_eval.models"]
        assert models.get_model("kimivl") is adapter.KimiVLLmms and issubclass(adapter.KimiVLLmms, base.lmms)
        assert models.get_model("kimivl", force_simple=True) is adapter.KimiVLLmms
        assert registry.MODEL_REGISTRY["kimivl"] is adapter.KimiVLLmms  # the old table too
        adapter.register()  # registering again (lmms-eval imports the module by name after __main__ did) is fine
        assert models.get_model("kimivl") is adapter.KimiVLLmms
    finally:
        monkeypatch.undo()
        importlib.reload(adapter)


@pytest.mark.parametrize("value", ["auto", "auto:4", " auto:1 "])
def test_batch_size_auto_is_a_batch_of_one(value, small_model, small_processor):
    import kimivl.eval.lmms_adapter as adapter

    lm = adapter.KimiVLLmms(model=small_model, processor=small_processor, batch_size=value)
    assert lm.batch_size_per_gpu == 1
    for bad in ("auto:", "auto:x", "automatic"):
        with pytest.raises(
            ValueError, match=re.escape(f"batch_size must be a positive integer, auto or auto:N, got {bad!r}")
        ):
            adapter.KimiVLLmms(model=small_model, processor=small_processor, batch_size=bad)


@pytest.mark.parametrize("gpu, want", [(True, "cuda"), (False, "cpu")])
def test_the_device_defaults_to_the_gpu_when_there_is_one(gpu, want, monkeypatch, checkpoint):
    import kimivl
    import kimivl.eval.lmms_adapter as adapter
    import kimivl.precision

    loaded = {}

    def from_pretrained(path, dtype=None, device=None):
        loaded.update(path=path, device=device)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(kimivl.precision, "checkpoint_load_dtype", lambda path, device, requested: torch.float32)
    monkeypatch.setattr(kimivl.KimiVL, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(kimivl.KimiVLProcessor, "from_pretrained", staticmethod(lambda path: "processor"))
    adapter.KimiVLLmms(pretrained=str(checkpoint))
    assert loaded == {"path": str(checkpoint), "device": want}
    with pytest.raises(ValueError, match="device='tpu': not a device name"):
        adapter.KimiVLLmms(pretrained=str(checkpoint), device="tpu")


def test_requests_are_batched_by_their_generation_settings(monkeypatch, small_model, small_processor):
    """Requests sharing gen_kwargs go to generate together, at most batch_size at a time, with their sampling
    settings; the answers come back in request order."""
    import kimivl.eval.lmms_adapter as adapter
    import kimivl.inference.chat as chat

    calls = []

    def fake(model, processor, convs, **kw):
        calls.append((len(convs), kw))
        return [c[0]["content"][-1]["text"] for c in convs]

    monkeypatch.setattr(chat, "generate", fake)
    greedy, hot, off = (
        {"max_new_tokens": 5},
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 0.7, "do_sample": False},
    )
    kwargs = [greedy, hot, greedy, greedy, off]
    reqs = [SimpleNamespace(args=(f"q{i}", kw, None, i, "demo", "test")) for i, kw in enumerate(kwargs)]
    lm = adapter.KimiVLLmms(model=small_model, processor=small_processor, batch_size=2, max_new_tokens=9)
    assert lm.generate_until(reqs) == ["q0", "q1", "q2", "q3", "q4"]
    assert calls == [
        (2, {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0}),
        (1, {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0}),
        (1, {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9}),
        (1, {"max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0}),  # do_sample false: greedy
    ]
