"""bat.cpu (ISA flags, usable CPUs under cgroup quotas), the int8 scheme per ISA, --precision resolution,
`python -m bat.tag --info`."""
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bat.cpu
from bat.cpu import CPUs, cgroup_quota, cpu_isa, cpu_limits, cpus_string, isa_string, parse_cpuinfo, parse_flags, \
    usable_cpus
from bat.onnx_graph import INT8_SCHEMES, describe_int8, int8_scheme
from bat import precision

ROOT = Path(__file__).resolve().parents[1]

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c"
AVX2 = BASE + " avx2 bmi1 bmi2"  # e.g. a Zen 2 / Haswell server
AVX512_VNNI_BF16 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx512_vbmi2"
SKYLAKE = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl"  # AVX-512 without VNNI
AMX = AVX512_VNNI_BF16 + " amx_bf16 avx512_fp16 amx_tile amx_int8"  # Sapphire Rapids
ALDER_LAKE = AVX2 + " avx_vnni"  # VNNI on 256-bit vectors, no AVX-512


def test_parse_avx2_only():
    isa = parse_flags(AVX2)
    assert isa.avx2 and not (isa.avx512 or isa.vnni or isa.bf16 or isa.amx)
    assert not isa.native_bf16 and not isa.int8_dot_int32
    assert isa_string(isa) == "x86-64 AVX2"


def test_parse_avx512_vnni_bf16():
    isa = parse_flags(AVX512_VNNI_BF16)
    assert isa.avx2 and isa.avx512 and isa.vnni and isa.bf16 and not isa.amx
    assert isa.native_bf16 and isa.int8_dot_int32
    assert isa_string(isa) == "x86-64 AVX-512 VNNI BF16"


def test_parse_amx_and_avx_vnni():
    isa = parse_flags(AMX)
    assert isa.amx and isa.amx_int8 and isa.amx_bf16 and isa.vnni
    assert isa_string(isa) == "x86-64 AVX-512 VNNI BF16 AMX"
    assert parse_flags("amx_int8 amx_bf16").amx is False  # the tile unit itself is needed
    small = parse_flags(ALDER_LAKE)
    assert small.vnni and not small.avx512 and isa_string(small) == "x86-64 AVX2 VNNI"


def test_parse_cpuinfo_text_and_arm():
    text = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {AVX512_VNNI_BF16}\n\nprocessor\t: 1\n"
    assert parse_cpuinfo(text, arch="x86_64") == parse_flags(AVX512_VNNI_BF16)
    arm = parse_cpuinfo("processor : 0\nFeatures : fp asimd asimddp bf16 i8mm\n", arch="arm64")
    assert arm.arch == "aarch64" and arm.bf16 and arm.int8_dot_int32 and not arm.x86
    unknown = parse_cpuinfo("no flags here", arch="AMD64")
    assert unknown.source == "unknown" and "unknown" in isa_string(unknown)


def test_this_machine_reads():
    isa = cpu_isa()
    assert isa_string(isa).split()[0] in ("x86-64", "aarch64") or isa.source == "unknown"


@pytest.mark.parametrize("flags, arch, scheme, words", [
    (AVX2, "x86_64", "dynamic-7bit", "reduce_range: no VNNI"),
    (SKYLAKE, "x86_64", "dynamic-7bit", "no VNNI"),
    (AVX512_VNNI_BF16, "x86_64", "dynamic-8bit", "AVX-512 VNNI kernels"),
    (ALDER_LAKE, "x86_64", "dynamic-8bit", "VNNI kernels"),
    (AMX, "x86_64", "dynamic-8bit", "AMX kernels"),
    ("fp asimd asimddp", "aarch64", "dynamic-8bit", "ARM64"),
])
def test_int8_scheme_per_isa(flags, arch, scheme, words):
    got, why = int8_scheme(parse_flags(flags, arch))
    assert got == scheme and words in why
    assert describe_int8(got, why).startswith(f"int8: {INT8_SCHEMES[scheme]} (")


def test_int8_scheme_unknown_cpu_is_safe():
    assert int8_scheme(parse_flags("", "x86_64", source="unknown"))[0] == "dynamic-7bit"
    line = describe_int8(*int8_scheme(parse_flags(AVX2)))
    assert line == "int8: dynamic, 7-bit weights (reduce_range) (reduce_range: no VNNI on this CPU (x86-64 AVX2))"


def normalised_matmul_graph(path):
    """y = x @ (w / ||w||) and z = x @ v: CGP's prototype matmul (B normalised in the graph) next to a plain
    weight matmul. Named nodes, as the exporter writes them (the quantiser excludes nodes by name)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ReduceL2", ["w", "axes"], ["norm"], "l2", keepdims=1),
             helper.make_node("Div", ["w", "norm"], ["w_unit"], "unit"),
             helper.make_node("MatMul", ["x", "w_unit"], ["y"], "prototypes"),
             helper.make_node("MatMul", ["x", "v"], ["z"], "weights")]
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "v")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", k]) for o, k in (("y", 32), ("z", 16))],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(path))


@pytest.mark.parametrize("scheme, quantised", [("dynamic-8bit", {"y", "z"}), ("dynamic-7bit", {"z"})])
def test_quantize_int8_folds_normalised_weights(tmp_path, scheme, quantised):
    """The in-graph normalisation is folded to a constant first, so with 8-bit weights that matmul is
    quantised too; with 7-bit (reduce_range) weights it stays float32. The float32 values are unchanged."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from bat.onnx_graph import fold_constants, quantize_int8

    path = tmp_path / "g.onnx"
    normalised_matmul_graph(path)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    folded_path = tmp_path / "folded.onnx"
    normalised_matmul_graph(folded_path)
    assert len(fold_constants(str(folded_path))) == 1
    got = ort.InferenceSession(str(folded_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(want, got))  # folding is exact
    quantize_int8(str(path), scheme)
    g = onnx.load(str(path)).graph
    float_outputs = {n.output[0] for n in g.node if n.op_type == "MatMul"}
    assert {"y", "z"} - float_outputs == quantised
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert all(np.abs(a - b).max() < 0.05 * np.abs(a).max() for a, b in zip(want, got))


def test_precision_resolves_per_isa():
    no_bf16, bf16, amx = parse_flags(AVX2), parse_flags(AVX512_VNNI_BF16), parse_flags(AMX)
    assert precision.resolve("cpu", "auto", no_bf16) == "fp32"
    assert precision.resolve("cpu", "auto", parse_flags(SKYLAKE)) == "fp32"
    assert precision.resolve("cpu", "auto", bf16) == "bf16" and precision.resolve("cpu", "auto", amx) == "bf16"
    assert precision.resolve("cuda", "auto", no_bf16) == "bf16"  # CUDA: bf16 as before
    assert precision.resolve("cpu", "fp32", bf16) == "fp32" and precision.resolve("cpu", "bf16", no_bf16) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve("cpu", "fp16")


def test_precision_autocast_runs_bf16_on_cpu():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast("cpu", "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with precision.autocast("cpu", "auto", parse_flags(AVX2)):
        assert (x @ w).dtype == torch.float32


def test_precision_flag_accepted():
    import probe_cgp

    assert probe_cgp.Config.__dataclass_fields__["precision"].default == "cuda-bf16"  # CPU bf16 is opt-in (see its help)
    assert precision.resolve("cpu", "cuda-bf16") == "fp32" and precision.resolve("cuda", "cuda-bf16") == "bf16"
    before = precision._process_default
    try:
        assert precision.set_default("fp32") == "fp32" and precision.resolve("cpu") == "fp32"
        with pytest.raises(ValueError):
            precision.set_default("int4")
    finally:
        precision.set_default(before)
    out = subprocess.run([sys.executable, "probe_cgp.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--precision" in out.stdout


def test_predict_precision():
    from bat.frontend import Frontend
    from bat.heads import CGP
    from bat.model import Encoder, EncoderConfig
    from bat.probes import Probe

    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=64, depth=2, num_heads=1)).eval()
    probe = Probe(enc, CGP(64, 2, 3, num_prototypes=8), Frontend("bat", target_frames=112), ["a", "b", "c"],
                  "multiclass", clip_samples=16000).eval()
    x = torch.randn(2, 16000) * 0.1
    fp32, bf16 = probe.predict(x), probe.predict(x, precision="bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05 and not torch.equal(fp32, bf16)


def test_tag_info_prints_isa(tmp_path):
    stub = tmp_path / "torch"  # bat.tag --info stays torch-free: an import of torch fails here
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('torch is unavailable (test stub)')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}{__import__('os').pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "bat.tag", "--info"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"cpu: {isa_string()}" and lines[1].startswith("onnxruntime ")
    assert "CPUExecutionProvider" in lines[1]
    assert lines[2] == cpus_string() and lines[2].startswith(f"cpus: {usable_cpus()} usable")
    scheme = "8-bit weights" if cpu_isa().int8_dot_int32 else "7-bit weights (reduce_range)"  # VNNI/AMX/ARM64 or not
    assert lines[3].startswith("int8 here: export.py --quantize int8 writes dynamic, ") and scheme in lines[3]
    assert lines[4].startswith("bf16 here: " + ("native" if cpu_isa().native_bf16 else "emulated"))


def test_fused_graph_keeps_no_cpu_only_node(tmp_path):
    """fuse_graph's file also serves onnxruntime's CUDA provider: a head's Linear + sigmoid must not become
    FusedGemm (a CPU-only kernel: that node would run on the CPU of a GPU session). Same outputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from bat.onnx_graph import fuse_graph

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["scores"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 16])], inits)
    path = tmp_path / "head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    fuse_graph(str(path))
    ops = {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}
    assert ("com.microsoft", "FusedGemm") not in ops and ("", "Sigmoid") in ops, ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ usable CPUs: fake cgroup trees

def cgroup_tree(root: Path, cgroup: str, files: dict) -> Path:
    """A fake /proc/self/cgroup (its text) and /sys/fs/cgroup files ({path under /sys/fs/cgroup: text or bytes})."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        path = root / "sys/fs/cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


@pytest.fixture
def big_node(monkeypatch):
    """A 64-CPU machine that lets this process run on all of them (what a container on a big node sees)."""
    monkeypatch.setattr(bat.cpu.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(bat.cpu.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def test_cgroup_v2_quota(tmp_path, big_node):
    root = cgroup_tree(tmp_path, "0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "200000 100000\n"})
    assert cgroup_quota(root) == 2.0 and usable_cpus(root) == 2
    assert cpu_limits(root) == CPUs(machine=64, affinity=64, quota=2.0, usable=2)


def test_cgroup_v2_no_limit_and_rounding_up(tmp_path, big_node):
    unlimited = cgroup_tree(tmp_path / "a", "0::/ctr\n", {"ctr/cpu.max": "max 100000\n"})
    assert cgroup_quota(unlimited) is None and usable_cpus(unlimited) == 64
    half_more = cgroup_tree(tmp_path / "b", "0::/ctr\n", {"ctr/cpu.max": "150000 100000\n"})
    assert cgroup_quota(half_more) == 1.5 and usable_cpus(half_more) == 2  # 1.5 CPUs of time: 2 threads
    tiny = cgroup_tree(tmp_path / "c", "0::/ctr\n", {"ctr/cpu.max": "10000 100000\n"})
    assert usable_cpus(tiny) == 1  # at least one


def test_cgroup_v2_limit_on_a_parent_or_at_the_namespace_root(tmp_path, big_node):
    # Kubernetes puts the pod's limit on the pod's cgroup; the container's own says "max".
    pod = cgroup_tree(tmp_path / "a", "0::/kubepods/pod1/ctr\n",
                      {"kubepods/pod1/cpu.max": "400000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert cgroup_quota(pod) == 4.0 and usable_cpus(pod) == 4
    tighter_below = cgroup_tree(tmp_path / "b", "0::/a/b\n", {"a/cpu.max": "400000 100000",
                                                                "a/b/cpu.max": "250000 100000"})
    assert cgroup_quota(tighter_below) == 2.5  # the tightest level binds
    # Docker with a cgroup namespace: /proc/self/cgroup says "/" and the limit is at the mount's top;
    # a path the mount does not show falls back to the top as well.
    for i, path in enumerate(("/", "/docker/0123abcd", "/../../system.slice/x")):
        root = cgroup_tree(tmp_path / f"ns{i}", f"0::{path}\n", {"cpu.max": "300000 100000"})
        assert usable_cpus(root) == 3, path


@pytest.mark.parametrize("files", [
    {},  # no cpu.max at all (the host's root cgroup has none)
    {"ctr/cpu.max": "lots of cpus"},
    {"ctr/cpu.max": "200000"},
    {"ctr/cpu.max": "200000 100000 7"},
    {"ctr/cpu.max": "0 100000"},
    {"ctr/cpu.max": "-100000 100000"},
    {"ctr/cpu.max": "200000 0"},
    {"ctr/cpu.max": b"\xff\xfe\x00garbage"},
    {"ctr/cpu.max/oops": "a folder where the file should be"},
], ids=["missing", "words", "one-number", "three-numbers", "zero", "negative", "zero-period", "binary", "folder"])
def test_cgroup_odd_files_mean_no_limit(tmp_path, big_node, files):
    root = cgroup_tree(tmp_path, "0::/ctr\n", files)
    assert cgroup_quota(root) is None and usable_cpus(root) == 64


def test_cgroup_missing_or_garbled_proc_file(tmp_path, big_node):
    assert cgroup_quota(tmp_path / "nothing") is None and usable_cpus(tmp_path / "nothing") == 64
    root = cgroup_tree(tmp_path, "not a cgroup line\n::::\n12\n", {"cpu.max": "100000 100000"})
    assert cgroup_quota(root) is None


def test_cgroup_v1_quota(tmp_path, big_node):
    lines = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuacct:/docker/abc\n0::/\n"
    root = cgroup_tree(tmp_path / "a", lines, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                                               "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(root) == 0.5 and usable_cpus(root) == 1
    # Docker on cgroup v1 without a namespace: the host's path is shown, the mount is the container's cgroup.
    root = cgroup_tree(tmp_path / "b", lines, {"cpu/cpu.cfs_quota_us": "600000", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_quota(root) == 6.0 and usable_cpus(root) == 6
    unlimited = cgroup_tree(tmp_path / "c", lines, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_quota(unlimited) is None and usable_cpus(unlimited) == 64
    no_period = cgroup_tree(tmp_path / "d", lines, {"cpu/cpu.cfs_quota_us": "200000"})
    assert cgroup_quota(no_period) is None
    not_cpu = cgroup_tree(tmp_path / "e", "3:cpuacct:/\n", {"cpuacct/cpu.cfs_quota_us": "100000",
                                                             "cpuacct/cpu.cfs_period_us": "100000"})
    assert cgroup_quota(not_cpu) is None  # cpuacct only accounts; the cpu controller limits


def test_affinity_smaller_than_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(bat.cpu.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(bat.cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # taskset -c 0-2
    root = cgroup_tree(tmp_path, "0::/ctr\n", {"ctr/cpu.max": "800000 100000"})
    assert cpu_limits(root) == CPUs(machine=64, affinity=3, quota=8.0, usable=3)
    assert cpus_string(cpu_limits(root)) == "cpus: 3 usable (affinity 3 of 64)"
    monkeypatch.delattr(bat.cpu.os, "sched_getaffinity", raising=False)  # macOS, Windows: the machine's count
    assert cpu_limits(root) == CPUs(machine=64, affinity=64, quota=8.0, usable=8)


def test_cpus_string():
    assert cpus_string(CPUs(machine=64, affinity=64, quota=None, usable=64)) == "cpus: 64 usable"
    assert cpus_string(CPUs(machine=64, affinity=64, quota=100.0, usable=64)) == "cpus: 64 usable"
    assert cpus_string(CPUs(machine=64, affinity=64, quota=2.0, usable=2)) == \
        "cpus: 2 usable (cgroup CPU quota 2 of 64)"
    assert cpus_string(CPUs(machine=64, affinity=64, quota=1.5, usable=2)) == \
        "cpus: 2 usable (cgroup CPU quota 1.5 of 64)"
    assert cpus_string(CPUs(machine=64, affinity=3, quota=2.5, usable=3)) == \
        "cpus: 3 usable (cgroup CPU quota 2.5 of 64)"  # both bind equally: the quota is the news


def test_tagger_threads_follow_the_cgroup_quota(tmp_path, big_node, monkeypatch):
    """bat.tag / Tagger / examples/serve.py with --threads 0: onnxruntime's own default counts the node's 64
    cores, so the session is given the quota's 2 threads; an explicit count is kept; unlimited: onnxruntime's."""
    pytest.importorskip("onnxruntime")
    from bat.tag import create_session

    graph = tmp_path / "g.onnx"
    normalised_matmul_graph(graph)
    root = cgroup_tree(tmp_path / "limited", "0::/ctr\n", {"ctr/cpu.max": "200000 100000"})
    monkeypatch.setattr(bat.cpu, "cpu_limits", functools.partial(cpu_limits, root))

    def threads(**kwargs):
        return create_session(str(graph), **kwargs)[0].get_session_options().intra_op_num_threads

    assert threads() == 2 and threads(threads=0) == 2
    assert threads(threads=1) == 1 and threads(threads=8) == 8  # what was asked, quota or not
    unlimited = cgroup_tree(tmp_path / "unlimited", "0::/ctr\n", {"ctr/cpu.max": "max 100000"})
    monkeypatch.setattr(bat.cpu, "cpu_limits", functools.partial(cpu_limits, unlimited))
    assert threads() == 0  # onnxruntime's own choice (physical cores) on a machine with no limit


def test_training_scripts_keep_torchs_threads_within_the_cpu_quota(monkeypatch):
    """run_processes (pretrain.py, probe_cgp.py, finetune.py) lowers torch's threads to the usable CPUs (torch
    counts the node's cores), unless OMP_NUM_THREADS says otherwise."""
    from types import SimpleNamespace

    import torch

    from bat import run_control

    before, seen = torch.get_num_threads(), []
    main = lambda cfg, rank, world, device: seen.append(torch.get_num_threads())  # noqa: E731
    monkeypatch.setattr(run_control, "usable_cpus", lambda: 1)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        run_control.run_processes(main, SimpleNamespace(device="cpu"))
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice
        torch.set_num_threads(2)
        run_control.run_processes(main, SimpleNamespace(device="cpu"))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]
