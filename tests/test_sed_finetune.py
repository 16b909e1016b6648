"""finetune.py --task dcase2016 end to end on a generated event set (tiny random encoder, few steps)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

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


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from intra-op threads; on a shared 2-core machine one keeps these runs fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sed_run(task, out, *flags, **values):
    """finetune.main --task dcase2016 in this process; tiny batches, coloured noise on every recording."""
    argv = ["--encoder", "random:tiny", "--task", "dcase2016", "--train", task, "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1", "--noise", "--noise-prob", "1", *flags]
    for k, v in values.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return finetune.main(finetune.parse_config(argv))


def test_resumed_sed_finetune_with_loader_workers_reproduces_the_uninterrupted_run(tmp_path, one_thread):
    """Every recording gets coloured noise, drawn in the loader from a generator keyed on the recording's place in
    the stream of batches: a run stopped and resumed, with another --workers each time (a resumed run may change
    it), draws what an uninterrupted one did. The noise used to come from the RNG of the process that loaded the
    recording: the same draws only where the resumed run replayed every earlier batch in loader workers seeded
    alike, not with --workers 0 (the replayed batches advanced the main process's RNG) or another count."""
    # 5 recordings in batches of 2: 3 batches an epoch, so step 4 is the second epoch's first batch
    task = make_event_task(str(tmp_path / "task"), n_train=5, n_valid=1, n_test=1, train_s=2.0, test_s=2.0)
    straight = sed_run(task, tmp_path / "a", workers=2, val_every=2)
    assert sed_run(task, tmp_path / "b", workers=2, val_every=2, stop_after=1) is None
    assert sed_run(task, tmp_path / "b", workers=0, val_every=2, stop_after=3) is None
    resumed = sed_run(task, tmp_path / "b", workers=2, val_every=2)
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(straight, sort_keys=True)  # NaN == NaN here


def test_a_resumed_sed_finetune_does_not_load_the_batches_it_already_trained_on(tmp_path, one_thread, monkeypatch):
    """A resumed run starts its stream of training batches where the interrupted one stopped: it loads none of
    the earlier recordings again (it used to read every earlier batch, each a whole recording through the
    front-end, before its first step: hours, when resuming late in REF's 4000 steps)."""
    task = make_event_task(str(tmp_path / "task"), n_train=4, n_valid=1, n_test=1, train_s=2.0, test_s=2.0)
    assert sed_run(task, tmp_path / "o", workers=0, stop_after=3) is None
    loaded, getitem = [], sed.EventDataset.__getitem__

    def counted(self, key):
        if self.target_frames is not None:  # the training set (evaluation reads whole recordings)
            loaded.append(key)
        return getitem(self, key)

    monkeypatch.setattr(sed.EventDataset, "__getitem__", counted)
    assert sed_run(task, tmp_path / "o", workers=0)["steps"] == 4
    assert len(loaded) == 2  # the last step's batch of two recordings, nothing before it
    assert all(key.draws[2] == 3 for key in loaded)  # batch 3 of the stream: keyed where it stands in it


def test_a_test_during_sed_finetuning_scores_without_drop_path_and_leaves_the_training_alone(tmp_path):
    """--eval-every tests mid-training (and a resumed run may change it): the test must run the model in eval mode
    (no drop-path, whose draws would also move the RNG the augmentations use) and leave the training's steps as
    they were, and its scores at the last step must equal the final test's when the last model is tested."""
    task = make_event_task(str(tmp_path / "task"), n_train=5, n_valid=1, n_test=1, train_s=2.0, test_s=2.0)

    def run(out, *flags):
        argv = ["--encoder", "random:tiny", "--task", "dcase2016", "--train", task, "--out", str(tmp_path / out),
                "--steps", "4", "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1", "--workers", "0",
                "--val-every", "0", *flags]
        return finetune.main(finetune.parse_config(argv))

    plain, tested = run("a"), run("b", "--eval-every", "3")
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert plain["frame_mAP"] == tested["frame_mAP"]
    assert [h["step"] for h in tested["history"] if h["split"] == "test"] == [3]
