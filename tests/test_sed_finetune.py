"""finetune.py --task dcase2016 end to end on a generated event set (tiny random encoder, few steps)."""
import json

import numpy as np
import pytest
import torch

import bat
import finetune
from bat import sed
from bat.checkpoint import load_encoder
from bat.cli import FlagError
from synth_sets import make_event_task


def test_sed_finetune_trains_selects_on_validation_scores_test_and_reloads(tmp_path):
    task = make_event_task(str(tmp_path / "task"), n_train=4, n_valid=2, n_test=2, train_s=4.0, test_s=6.0)
    out = tmp_path / "out"
    # lr 1e-2 overshoots after the first step (validation frame mAP .30 at step 1, about .2 after), so the best
    # validation score is not the last one: the checks below can tell "best on validation" (REF) from "last step"
    cfg = finetune.parse_config(["--encoder", "random:tiny", "--task", "dcase2016", "--train", task, "--out", str(out),
                                 "--workers", "0", "--steps", "4", "--batch-size", "2", "--val-every", "1",
                                 "--warmup-steps", "1", "--lr", "1e-2"])
    m = finetune.main(cfg)
    assert m["task"] == "sed" and m["num_train"] == 4 and m["num_test"] == 2
    assert 0 <= m["frame_mAP"] <= 1 and (np.isnan(m["onset_f1"]) or 0 <= m["onset_f1"] <= 1)
    valid = [h for h in m["history"] if h["split"] == "valid"]
    assert [h["step"] for h in valid] == [1, 2, 3, 4]
    best = max(h["frame_mAP"] for h in valid)
    chosen = [h for h in valid if h["frame_mAP"] == best][-1]  # ties: the later, as REF
    assert m["selected"] == {"step": chosen["step"], "val_frame_mAP": chosen["frame_mAP"]}
    assert chosen["step"] != valid[-1]["step"] and best > valid[-1]["frame_mAP"] + 0.01, valid  # not the last
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["frame_mAP"] == pytest.approx(m["frame_mAP"])

    probe = bat.load_probe(str(out / "model.safetensors"))
    assert probe.frame_wise and probe.head.mode == "frame" and probe.labels == json.loads((out / "config.json").read_text())["classes"]
    # the saved model is the selected one: it scores the selected validation score and the reported test scores
    _, valid_split, test = sed.plan_splits(task)
    cpu = torch.device("cpu")
    assert sed.valid_frame_map(probe.encoder.eval(), probe.head.eval(), valid_split, probe.labels, cpu) == \
        pytest.approx(m["selected"]["val_frame_mAP"], abs=1e-6)
    again = sed.test_sed(probe.encoder.eval(), probe.head.eval(), test, probe.labels, cpu)
    assert again["frame_mAP"] == pytest.approx(m["frame_mAP"], abs=1e-6)
    # the encoder was trained, not only the head (fine-tuning)
    torch.manual_seed(cfg.seed)  # finetune.py draws random:* encoders from this seed
    fresh = load_encoder("random:tiny").state_dict()
    tuned = probe.encoder.state_dict()
    assert any(not torch.equal(fresh[k], tuned[k]) for k in fresh if k.startswith("blocks."))


def test_librispeech_finetune_is_refused_in_one_line(tmp_path):
    cfg = finetune.parse_config(["--encoder", "random:tiny", "--task", "librispeech", "--train", str(tmp_path),
                                 "--out", str(tmp_path / "out"), "--workers", "0"])
    with pytest.raises(FlagError, match="librispeech") as e:
        finetune.main(cfg)
    assert "\n" not in str(e.value)
