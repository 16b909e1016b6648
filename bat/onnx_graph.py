"""ONNX graph edits export.py applies after torch.onnx.export: an optional `lengths` input, onnxruntime's
fusions stored in the file, dynamic int8 quantisation. Needs onnx and onnxruntime (not torch)."""
from __future__ import annotations

import logging
import os

import numpy as np


def temp_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")


def optional_lengths(proto) -> None:
    """Make the `lengths` input optional: an initializer of the same name is its default ([-1]: every
    row is its full length), expanded to the batch in the graph. Callers that feed only `waveform`
    (one clip, or clips of equal length) need not know it exists."""
    from onnx import helper, numpy_helper

    g = proto.graph
    for node in g.node:
        node.input[:] = ["lengths_per_row" if name == "lengths" else name for name in node.input]
    for out in g.output:  # (never an output, but keep the graph well-formed if it were)
        assert out.name != "lengths"
    head = [helper.make_node("Shape", ["waveform"], ["waveform_batch"], start=0, end=1),
            helper.make_node("Expand", ["lengths", "waveform_batch"], ["lengths_per_row"])]
    for i, node in enumerate(head):
        g.node.insert(i, node)
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "lengths"))
    (inp,) = [i for i in g.input if i.name == "lengths"]
    inp.type.tensor_type.shape.dim[0].dim_param = "lengths_batch"


def drop_softmax_nan_guards(proto) -> int:
    """Remove the exporter's `Where(IsNaN(softmax), 0, softmax)` after every attention softmax. It guards
    rows whose keys are all masked; the encoder always attends to its CLS token, so no row is, and the
    guard only costs time (~7 % of a tiny tagger in onnxruntime: two passes over every attention map).
    Returns how many were removed."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    rename, dead = {}, set()
    for n in g.node:
        cond = producer.get(n.input[0]) if n.op_type == "Where" else None
        if (cond is not None and cond.op_type == "IsNaN" and cond.input[0] == n.input[2]
                and producer.get(n.input[2]) is not None and producer[n.input[2]].op_type == "Softmax"
                and n.output[0] not in {o.name for o in g.output}):
            rename[n.output[0]] = n.input[2]
            dead.add(id(n))
            if readers[cond.output[0]] == 1:
                dead.add(id(cond))
    keep = [n for n in g.node if id(n) not in dead]
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del g.node[:]
    g.node.extend(keep)
    return len(rename)


def fuse_graph(path: str) -> None:
    """Store the graph after onnxruntime's basic and extended fusions (LayerNorm, MatMul+Add, ...) and
    its transformer optimiser's pattern fusions, so each session skips that work; the check below runs
    on the fused file."""
    store_optimized(path, "extended")
    fuse_gelu(path)


def store_optimized(path: str, level: str) -> None:
    """Rewrite the file in place as onnxruntime's CPU session optimises it at `level` (basic: constant
    folding and standard-op rewrites; extended: also its fused CPU kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    opts.optimized_model_filepath = temp_path(path)
    opts.log_severity_level = 3
    # The file also serves the CUDA provider: GemmActivationFusion writes FusedGemm (the head's Linear +
    # sigmoid), a CPU-only kernel that would put that node on the CPU of a GPU session. The other fusions
    # (FusedMatMul, BiasGelu, SkipLayerNormalization) have CUDA kernels.
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"], disabled_optimizers=["GemmActivationFusion"])
    os.replace(opts.optimized_model_filepath, path)


def fuse_gelu(path: str) -> None:
    """The exporter writes GELU as x * 0.5 * (1 + erf(x / sqrt 2)): five element-wise passes over the MLP's
    widest tensor that the session-level fusions above leave alone. onnxruntime's transformer optimiser
    (pattern matching in Python, no session) folds them, with the bias Add, into one BiasGelu/Gelu node
    and the same exact erf maths. Measured on a base tagger, one thread, 10-s clip: float32 2.06 -> 1.78 s
    (scores equal to 6e-8), int8 1.28 -> 1.20 s. It finds no attention pattern in this graph."""
    import contextlib
    import io

    from onnxruntime.transformers.optimizer import optimize_model

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:  # its shape-inference fallback prints to stdout; the fusions do not need it
        with contextlib.redirect_stdout(io.StringIO()):
            model = optimize_model(path, model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
            model.save_model_to_file(temp_path(path))
    finally:
        logging.getLogger().setLevel(level)
    os.replace(temp_path(path), path)


# int8 schemes (bat.cpu gives the ISA). Measured on a 2-core AVX-512 VNNI BF16 EPYC, onnxruntime 1.31, random
# tiny encoder + CGP head (527 classes, 10 000 prototypes: near-tied scores, the hard case), export.py's check
# clips, top-1 agreement with eager float32: dynamic 7-bit 93.9 %, dynamic 8-bit 99.4 %, 8-bit per-channel
# 97.0 % (and slower); 10-s clip, 2 threads: 46.8 / 43.8 ms vs 68.4 ms eager. On AVX2 CPUs 7-bit was needed
# (8-bit: 33 % -> 92 % agreement with 7-bit, largest score difference 8.4e-3 -> 7.4e-4).
INT8_SCHEMES = {
    "dynamic-8bit": "dynamic, 8-bit weights",
    "dynamic-7bit": "dynamic, 7-bit weights (reduce_range)",
    "static-qdq": "static QDQ, 8-bit weights and activations calibrated on demo clips",
}


def int8_scheme(isa) -> tuple[str, str]:
    """(scheme, reason) for a bat.cpu.ISA, following onnxruntime's quantisation guide: reduce_range on x86
    without VNNI (u8 x s8 pairs summed in int16 there, which saturates with 8-bit weights); full-range
    8-bit with VNNI, AMX or on ARM64 (int32 sums). Pure: depends only on `isa`."""
    from bat.cpu import isa_string

    kernels = "AMX" if isa.amx_int8 else "VNNI" if isa.vnni else None
    if isa.x86 and kernels:
        return "dynamic-8bit", f"{'AVX-512 ' if isa.avx512 and kernels == 'VNNI' else ''}{kernels} kernels"
    if isa.arch == "aarch64":
        return "dynamic-8bit", "ARM64 int8 dot products"
    if isa.x86 and isa.source != "unknown":
        return "dynamic-7bit", f"reduce_range: no VNNI on this CPU ({isa_string(isa)})"
    return "dynamic-7bit", f"reduce_range: CPU extensions unknown ({isa_string(isa)})"


def describe_int8(scheme: str, reason: str) -> str:
    """The line export.py prints: "int8: dynamic, 8-bit weights (AVX-512 VNNI kernels)"."""
    return f"int8: {INT8_SCHEMES[scheme]} ({reason})"


def fold_constants(path: str) -> set[str]:
    """Constant-fold the graph in place with onnxruntime's basic level (standard ONNX ops only) and return
    the initializers the folding created. It turns CGP's prototypes, L2-normalised in the graph, into one
    constant, so the quantiser sees their MatMul as weights. Exact: the folded values are what onnxruntime's
    float32 kernels compute at every call (fuse_graph folds the float32 graph the same way). The optional
    `lengths` input is an initializer that is also a graph input, which onnxruntime never folds."""
    import onnx

    before = {i.name for i in onnx.load(path, load_external_data=False).graph.initializer}
    store_optimized(path, "basic")
    return {i.name for i in onnx.load(path, load_external_data=False).graph.initializer} - before


def quantize_int8(path: str, scheme: str = "dynamic-7bit", calibration=None) -> None:
    """int8 weights for the encoder's and head's MatMuls (onnxruntime.quantization), `scheme` one of
    INT8_SCHEMES (see int8_scheme). The front-end (DFT basis, mel filters) stays float32: its dB floor and
    min-max stretch would magnify the error. static-qdq needs `calibration`: an iterable of input feeds.
    The scheme is recorded in the metadata (`int8_scheme`)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; one of {', '.join(INT8_SCHEMES)}")
    folded = fold_constants(path)
    proto = onnx.load(path)
    keep_float = {n.name for n in proto.graph.node if n.op_type == "MatMul" and any(
        "basis" in i or "fbank" in i for i in n.input)}
    # CGP's prototype matmul (B folded above from the run-time-normalised prototypes): ~30 % of a tiny
    # tagger's int8 time when left float32. With 8-bit weights quantising it kept agreement (random tiny,
    # VNNI, 192 clips: 98.4 -> 99.0 %) for 37 -> 30 ms; with 7-bit weights (AVX2) agreement on random weights
    # fell below 98 % for ~5 % speed, so there it stays float32.
    if scheme == "dynamic-7bit":
        keep_float |= {n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in folded}
    # The exporter's recorded intermediate shapes trip the quantiser's own shape inference: let it redo them.
    proto.graph.ClearField("value_info")
    meta = {p.key: p.value for p in proto.metadata_props}
    meta["int8_scheme"] = scheme
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice is for CNNs
    tmp = temp_path(path)
    common = dict(op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, nodes_to_exclude=sorted(keep_float),
                  reduce_range=scheme == "dynamic-7bit", extra_options={"MatMulConstBOnly": True})
    if scheme == "static-qdq":
        from onnxruntime.quantization import CalibrationDataReader

        if calibration is None:
            raise ValueError("static-qdq quantisation needs calibration inputs")

        class Reader(CalibrationDataReader):
            def __init__(self, feeds):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        onnx.save(proto, tmp)  # quantize_static calibrates a session on a file
        quantize_static(tmp, tmp, Reader(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, **common)
    else:
        quantize_dynamic(proto, tmp, **common)
    out = onnx.load(tmp)
    del out.metadata_props[:]
    out.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in meta.items())
    onnx.save(out, tmp)
    os.replace(tmp, path)
