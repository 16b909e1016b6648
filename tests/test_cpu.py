"""bat.cpu (ISA flags), the int8 scheme per ISA, --precision resolution, `python -m bat.tag --info`."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bat.cpu import cpu_isa, isa_string, parse_cpuinfo, parse_flags
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
