"""Extra buffer types: the self-test in a child process, and serving without them when it dies."""

import asyncio
import logging

from conftest import own_engine, says_four

from inference.engine.base import ChatMessage, GenerationRequest, SamplingParams
from inference.engine.llama.native import describe_exit, extra_buffer_hazard, self_test, use_extra_buffers

INTEL_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
             "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
             "REPACK = 1 | ")


def test_the_hazard_is_named_only_where_the_build_uses_amx():
    assert extra_buffer_hazard(INTEL_AMX) == "AMX"
    assert extra_buffer_hazard(INTEL_AMX.replace("AMX_INT8 = 1", "AMX_INT8 = 0")) is None
    assert extra_buffer_hazard("CPU : NEON = 1 | ARM_FMA = 1 | REPACK = 1 | ") is None


def test_the_self_test_decodes_with_extra_buffers_and_reports_a_crash(model_file):
    path, _ = model_file
    assert self_test(path) is None
    assert self_test(path, crash_test=True) == describe_exit(-11) == "died of SIGSEGV (Segmentation fault)"


def test_auto_serves_without_extra_buffers_when_the_self_test_dies(model_file, caplog):
    path, _ = model_file
    with caplog.at_level(logging.WARNING, logger="inference.engine.llama.native"):
        assert use_extra_buffers("auto", path, crash_test=True) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without llama.cpp's extra buffer types" in warnings[0]
    assert "SIGSEGV" in warnings[0]
    # Forced either way, nothing is tested.
    assert use_extra_buffers("off", path, crash_test=True) is False
    assert use_extra_buffers("on", path) is True


def test_an_engine_whose_extra_buffers_would_crash_loads_without_them_and_answers(model_file):
    # The test-only setting makes the engine dereference NULL if it loads with extra buffers: it answering proves
    # it did not.
    with own_engine(model_file, max_concurrent=1, crash_test=True) as engine:
        async def ask():
            generation = await engine.generate(GenerationRequest(
                SamplingParams(max_tokens=16, temperature=0), messages=(ChatMessage("user", "What is 2+2?"),)))
            return "".join([piece async for piece in generation])

        assert says_four(asyncio.run(ask()))
