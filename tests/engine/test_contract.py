"""The engine contract (engine/base.py) is what the service may ask of an engine: both engines answer all of it,
so the service never probes with hasattr or getattr."""

import inspect

from inference.engine.base import Engine, Generation, Tokenizer
from inference.engine.llama.engine import LlamaEngine
from inference.engine.llama.generation import LlamaGeneration
from inference.engine.upstream import UpstreamEngine, UpstreamGeneration


def members(protocol):
    names = {name for name in vars(protocol) if not name.startswith("_")}
    return names | set(protocol.__annotations__)


def test_both_engines_answer_everything_the_contract_names(tmp_path):
    engines = [LlamaEngine(tmp_path / "model.gguf"), UpstreamEngine("http://127.0.0.1:9/v1")]
    for engine in engines:
        missing = sorted(name for name in members(Engine) if name not in dir(engine))  # no property is run
        assert not missing, f"{type(engine).__name__} lacks {missing}"
        assert engine.health is None and engine.queue_depth == 0 and not engine.busy
    assert engines[1].progress is None and engines[1].restart("stuck") is False


def test_generations_carry_every_field_the_service_reads():
    for generation in (LlamaGeneration, UpstreamGeneration):
        source = inspect.getsource(generation.__init__)
        for name in Generation.__annotations__:
            assert f"self.{name}" in source, f"{generation.__name__} does not set {name}"
        for name in ("take_reasoning", "cancel", "aclose", "__aiter__"):
            assert callable(getattr(generation, name, None)), f"{generation.__name__} lacks {name}"


def test_only_the_embedded_engine_has_a_tokenizer_here():
    assert issubclass(LlamaEngine, Tokenizer) and not issubclass(UpstreamEngine, Tokenizer)
