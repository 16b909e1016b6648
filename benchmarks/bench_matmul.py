"""Matrix-product rate (GFLOP/s) of the base encoder's MLP shape on this CPU, per library, in one run.

    python benchmarks/bench_matmul.py            # [4104, 768] @ [768, 3072]: 8 clips of 513 tokens
    python benchmarks/bench_matmul.py --threads 1

PyTorch's float32 matmul goes to MKL, which on AMD CPUs takes its AVX2 kernels even where the CPU has
AVX-512; oneDNN (PyTorch's bf16 path and its mkldnn linear) and onnxruntime's MLAS pick kernels by the
instruction set. So the rows say how much of a speed-up over "PyTorch eager float32" is the library's.
"""
import argparse
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bat.cpu import isa_string, usable_cpus  # noqa: E402

M, K, N = 4104, 768, 3072


def gflops(f, n=10):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return round(2 * M * K * N / ((time.perf_counter() - t) / n) / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=usable_cpus(),
                   help="threads for PyTorch and onnxruntime (default: the CPUs this process may use)")
    threads = p.parse_args().threads
    if threads < 1:
        p.error(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    a, lin = torch.randn(M, K), torch.nn.Linear(K, N)
    print(f"{isa_string()}, {threads} threads, torch {torch.__version__}, onnxruntime {ort.__version__}")
    with torch.inference_mode():
        print("PyTorch float32 Linear (MKL)", gflops(lambda: lin(a)), "GFLOP/s")
        print("PyTorch float32 mkldnn linear (oneDNN)", gflops(
            lambda: torch.ops.mkldnn._linear_pointwise(a, lin.weight, lin.bias, "none", [], "")), "GFLOP/s")
        with torch.autocast("cpu", torch.bfloat16):
            print("PyTorch bf16 autocast Linear (oneDNN)", gflops(lambda: lin(a)), "GFLOP/s")
    w = numpy_helper.from_array(lin.weight.detach().T.contiguous().numpy(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = a.numpy()
    print("onnxruntime float32 MatMul (MLAS)", gflops(lambda: sess.run(None, {"x": x})), "GFLOP/s")


if __name__ == "__main__":
    main()
