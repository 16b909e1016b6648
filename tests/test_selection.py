"""probe_cgp.py --select auto (bat.selection): the held-out part comes from the training list only, early
stopping stops, the lr tested is the one best on the held-out part, and --baseline logmel writes its floor."""
import json

import probe_cgp
from bat import selection
from bat.tasks import TASKS, Run, plan_runs


def test_held_out_part_is_stratified_and_never_touches_the_test_clips(demo_sets):
    (run,) = plan_runs(str(demo_sets / "train"), str(demo_sets / "test"))
    carved = selection.carve_held_out(run, 0.2, seed=0)
    train, held, test = set(carved.train.files), set(carved.val.files), set(run.test.files)
    assert held and held | train == set(run.train.files) and not held & train
    assert not held & test and carved.test is run.test
    per_class = [sum(1 for labs in carved.val.labels if labs[0] == c) for c in run.train.classes]
    assert per_class == [1] * len(run.train.classes)  # 20 % of 5 clips per class


def test_selection_applies_to_your_own_data_only():
    plain = Run("test", object(), None, object())
    assert selection.applies("auto", TASKS["generic"], plain)
    assert not selection.applies("none", TASKS["generic"], plain)
    for ref in ("esc50", "audioset", "scv2", "hsn"):  # REF's recipes keep REF's schedules
        assert not selection.applies("auto", TASKS[ref], plain)
    assert not selection.applies("auto", TASKS["generic"], Run("test", object(), [1, 2], object()))  # own val split


def test_early_stop_waits_for_the_warm_up_and_counts_ties_as_no_improvement():
    stop = selection.EarlyStop(patience=2, start=10)
    assert not any(stop.update(s, 0.5) for s in (2, 4, 6, 8, 10))  # flat during warm-up: never stops
    assert not stop.update(12, 0.5)
    assert stop.update(14, 0.5)  # two ties after the warm-up
    low = selection.EarlyStop(patience=1, lower=True)
    assert not low.update(1, 0.3) and not low.update(2, 0.2) and low.update(3, 0.25)


def test_pick_lr_takes_the_best_held_out_score_and_the_smaller_lr_on_ties():
    assert selection.pick_lr({1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}) == 3e-3
    assert selection.pick_lr({1e-3: 0.7, 3e-3: 0.7}) == 1e-3
    assert selection.pick_lr({1e-3: 0.3, 3e-3: 0.2}, lower=True) == 3e-3


def test_select_auto_stops_early_tests_the_chosen_lr_and_writes_the_floor(demo_sets, tmp_path):
    cfg = probe_cgp.Config(encoder="random:tiny", train=str(demo_sets / "train"), test=str(demo_sets / "test"),
                           out=str(tmp_path / "o"), prototypes=16, steps=3000, batch_size=8, workers=0,
                           warmup_steps=5, patience=3, lr_grid=(1e-3, 1e-2), baseline="logmel")
    metrics = probe_cgp.main(cfg)
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    sel, held = saved["selection"], saved["held_out"]
    assert all(s < 3000 for s in sel["stopped_at"].values())  # stopped well before the cap
    scores = sel["lr_grid"]
    assert sel["lr"] == held["lr"] == float(max(scores, key=scores.get))
    assert held["accuracy"] == scores[f"{sel['lr']:g}"] and held["num_clips"] == 6
    assert saved["num_train"] == 24 and saved["num_test"] == 12  # 6 of the 30 training clips held out
    assert sel["eval_every"] == selection.MIN_EVAL_STEPS and saved["selected"]["step"] == held["step"]
    floor = saved["baseline"]["logmel"]
    assert 0 <= floor["accuracy"] <= 1 and floor["num_train"] == 30 and floor["num_test"] == 12
    assert metrics["accuracy"] == saved["accuracy"]


def test_summary_notes_when_the_largest_lr_of_the_grid_won():
    def lines(chosen):
        sel = {"lr_grid": {"0.001": 0.5, "0.003": 0.6, "0.01": 0.7}}
        held = {"accuracy": sel["lr_grid"][f"{chosen:g}"], "num_clips": 10, "lr": chosen, "step": 40}
        return selection.summary_lines({"accuracy": 0.6, "held_out": held, "selection": sel})

    assert any("largest lr tried won" in line and "0.03 0.1" in line for line in lines(0.01))
    assert not any("largest lr" in line for line in lines(0.003))
    # the grid's keys are written with :g; --lr 3e-4 x 10 is 0.0029999999999999996, still the largest
    sel = {"lr_grid": {f"{3e-4 * f:g}": 0.5 for f in (1, 3, 10)}}
    held = {"accuracy": 0.5, "num_clips": 10, "lr": 3e-4 * 10, "step": 40}
    assert any("largest lr" in line for line in selection.summary_lines({"accuracy": 0.5, "held_out": held,
                                                                           "selection": sel}))


def test_select_none_keeps_the_fixed_schedule(demo_sets, tmp_path):
    cfg = probe_cgp.Config(encoder="random:tiny", train=str(demo_sets / "train"), test=str(demo_sets / "test"),
                           out=str(tmp_path / "o"), prototypes=16, steps=20, batch_size=8, workers=0, select="none")
    metrics = probe_cgp.main(cfg)
    assert "held_out" not in metrics and "selection" not in metrics and "baseline" not in metrics
    assert metrics["num_train"] == 30
