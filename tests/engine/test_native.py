"""Extra buffer types: the hazard named where the build uses AMX, and the fallback when the engine dies with them."""

from inference.engine.llama.native import describe_exit, extra_buffer_hazard

INTEL_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
             "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
             "REPACK = 1 | ")


def test_the_hazard_is_named_only_where_the_build_uses_amx():
    assert extra_buffer_hazard(INTEL_AMX) == "AMX"
    assert extra_buffer_hazard(INTEL_AMX.replace("AMX_INT8 = 1", "AMX_INT8 = 0")) is None
    assert extra_buffer_hazard("CPU : NEON = 1 | ARM_FMA = 1 | REPACK = 1 | ") is None


def test_an_exit_status_is_told_in_words():
    assert describe_exit(-11) == "died of SIGSEGV (Segmentation fault)"
    assert describe_exit(-9) == "died of SIGKILL (Killed)"
    assert describe_exit(1) == "exited with status 1"
