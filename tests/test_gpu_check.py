"""benchmarks/gpu_check.py --smoke: every GPU check's code path at toy size, here on the CPU, so the command
handed to a lent GPU machine is known to run before the machine is paid for."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("pretrain_step", "pretrain_compile", "sdpa_backend", "probe_features", "probe_step", "finetune_step",
          "scripts", "export_parity", "tagger_latency")
# What runs on a CPU too: these must really run there, with positive figures.
MUST_RUN = ("pretrain_step", "probe_features", "probe_step", "scripts", "export_parity")


def test_smoke_run_writes_every_check(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for key in ("device", "torch", "onnxruntime", "providers", "checks"):
        assert key in report
    assert isinstance(report["providers"], list) and report["mode"] == "smoke"
    checks = report["checks"]
    assert set(checks) == set(CHECKS)
    for name, result in checks.items():
        assert result["status"] in ("ok", "skipped", "failed"), name
        assert result["status"] != "failed", (name, result.get("reason"))
        if result["status"] == "skipped":
            assert result["reason"], name
    for name in MUST_RUN:
        assert checks[name]["status"] == "ok", (name, checks[name].get("reason"))

    step = checks["pretrain_step"]
    for key in ("steps_per_s", "clips_per_s", "model_tflops_per_step", "peak_memory_mb"):
        assert step[key] > 0, key
    assert step["mfu"] is None or step["mfu"] > 0
    if step["mfu"] is None:
        assert step["mfu_reason"]

    features = checks["probe_features"]
    assert features["clips_per_s"]["fp32"] > 0 and features["clips_per_s"]["bf16"] > 0
    assert 0.9 < features["cls_cosine_min"] <= 1.0 + 1e-6 and 0 <= features["top1_agreement_last_cls"] <= 1

    probe = checks["probe_step"]  # fp32 on the CPU: both backwards give autograd's gradient
    assert probe["sparse"]["steps_per_s"] > 0 and probe["dense"]["steps_per_s"] > 0
    assert probe["precision"] == "fp32" and probe["prototype_grad_rel_diff"] < 1e-4

    scripts = checks["scripts"]  # pretrain.py ran to its end on this device (the CPU here); every command parsed
    assert scripts["device_flag"] == "cpu"
    assert scripts["pretrain"]["status"] == "ok" and scripts["pretrain"]["exit"] == 0 and scripts["pretrain"]["seconds"] > 0
    assert scripts["probe_cgp"]["status"] == scripts["finetune"]["status"] == "skipped"

    fp32 = checks["export_parity"]["fp32"]  # the CPU provider here, the CUDA provider on a GPU
    assert fp32["status"] == "ok" and 0 <= max(fp32["max_abs_diff"].values()) < 1e-3
    assert fp32["top1_agreement"] == 1.0 and fp32["export_seconds"] > 0

    latency = checks["tagger_latency"]["fp32/batch1"]
    if checks["tagger_latency"]["status"] == "ok":
        assert latency["onnxruntime"]["ms"] > 0 and latency["torch_eager"]["ms"] > 0
