"""Extra buffer types: the hazard named where the build uses AMX, and the fallback when the engine dies with them."""

from inference.engine.llama.native import compute_threads, cpu_quota, describe_exit, extra_buffer_hazard

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


def cgroup(tmp_path, membership, files):
    """A cgroup tree as the kernel shows it: /proc/self/cgroup's lines and the controller files they point to."""
    tmp_path.mkdir(parents=True)
    (tmp_path / "self-cgroup").write_text(membership)
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"root": tmp_path / "fs", "membership": tmp_path / "self-cgroup"}


def test_the_cgroup_cpu_quota_is_read_from_v2_and_v1(tmp_path):
    # v2, in a container's own namespace ("/"), docker run --cpus=1.5:
    assert cpu_quota(**cgroup(tmp_path / "a", "0::/\n", {"cpu.max": "150000 100000\n"})) == 1.5
    # v2, a Kubernetes pod's container cgroup seen from the host:
    kube = "0::/kubepods.slice/pod1/cri-abc\n"
    assert cpu_quota(**cgroup(tmp_path / "b", kube, {"kubepods.slice/pod1/cri-abc/cpu.max": "200000 100000"})) == 2
    assert cpu_quota(**cgroup(tmp_path / "c", "0::/\n", {"cpu.max": "max 100000\n"})) is None
    # v1 (hybrid hosts, like this one), cpu and cpuacct mounted together:
    v1 = "4:memory:/x\n1:cpu,cpuacct:/docker/abc\n0::/\n"
    files = {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
             "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(**cgroup(tmp_path / "d", v1, files)) == 3
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(**cgroup(tmp_path / "e", "1:cpu:/\n", unlimited)) is None
    assert cpu_quota(**cgroup(tmp_path / "f", "", {})) is None  # nothing to read: no quota known


def test_threads_follow_the_quota_when_it_is_below_the_affinity_mask():
    assert compute_threads(None, 16)[0] == 16
    assert compute_threads(2.0, 16) == (2, "the cgroup CPU quota allows 2 of the 16 CPUs in this process's affinity mask")
    assert compute_threads(1.5, 16)[0] == 1  # never a thread more than the quota: it would be throttled every step
    assert compute_threads(0.5, 16)[0] == 1
    assert compute_threads(8.0, 4)[0] == 4  # the mask is the smaller bound
