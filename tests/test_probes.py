"""The probe registry and its one selection protocol (experiments/core/probes): the folds, the choice (the
first best in grid order, its cost, the grid's edges), each probe scored on the folds exactly as a brute force
does, the final refit, the defaults where nothing can be validated, and every probe choosing on the same data."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sk
from experiments.core import probes
from experiments.core.probes import ProbeTask, Selection, choose, holdout, run_probe, stratified_kfold
from experiments.core.probes.finetune import finetune_predict, finetune_runs


def _task(n_per_class=6, classes=4, d=6, seed=0, folds=3, extras=None):
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, d, generator=g)
    y = torch.arange(classes).repeat(n_per_class)
    x = centers[y] + torch.randn(len(y), d, generator=g)
    ty = torch.arange(classes).repeat(5)
    tx = centers[ty] + torch.randn(len(ty), d, generator=g)
    return ProbeTask(x, y, tx, ty, classes, stratified_kfold(y, folds, seed), seed=seed, extras=extras or {})


def test_stratified_kfold_validates_every_example_once_with_every_class_in_every_fold():
    y = torch.arange(3).repeat(7)[torch.randperm(21, generator=torch.Generator().manual_seed(0))]
    sel = stratified_kfold(y, 5, seed=1)
    assert sel.rule == "k-fold" and len(sel.folds) == 5 and sel.describe() == "5-fold"
    vals = torch.cat([val for _, val in sel.folds])
    assert sorted(vals.tolist()) == list(range(21))  # each example validated exactly once
    for fit, val in sel.folds:
        assert not set(fit.tolist()) & set(val.tolist()) and len(fit) + len(val) == 21
        assert set(y[val].tolist()) == {0, 1, 2}
    assert stratified_kfold(y, 5, seed=1).fingerprint() == sel.fingerprint() != stratified_kfold(y, 5, 2).fingerprint()
    assert len(stratified_kfold(torch.tensor([0, 0, 1, 1, 1]), 5, 0).folds) == 2  # capped at the smallest class
    assert stratified_kfold(torch.tensor([0, 1, 2]), 5, 0).rule == "none"  # one example a class: nothing to validate
    with pytest.raises(ValueError, match="rule"):
        Selection("loo")


def test_choose_takes_the_first_best_counts_the_cost_and_reports_the_grid_edge():
    task = _task()
    hits = {1: 3, 2: 5, 3: 5}

    def score(fit, val, settings):
        return [hits[s["a"]] for s in settings]

    c = choose(task, {"a": [1, 2, 3], "b": ["x"]}, {"a": 9, "b": "x"}, score)
    assert c.setting == {"a": 2, "b": "x"}  # a tie goes to the first in grid order
    assert c.val_acc == pytest.approx(3 * 5 / len(task.y)) and c.tried == 3 and c.select_s > 0
    assert [e["val_acc"] for e in c.scores] == pytest.approx([9 / 24, 15 / 24, 15 / 24])
    assert c.edges == [] and c.selection.startswith("3-fold ")
    c = choose(task, {"a": [1, 2, 3]}, {}, lambda f, v, s: [{1: 1, 2: 0, 3: 0}[e["a"]] for e in s])
    assert c.setting == {"a": 1} and c.edges == ["a=min"]
    # without a grid the default is used and, with selection data, scored but not chosen
    c = choose(task, None, {"a": 3}, score)
    assert (c.setting, c.tried, c.select_s, c.scores) == ({"a": 3}, 1, 0.0, None) and c.val_acc is not None
    # nothing to validate: the default, unscored
    none = ProbeTask(task.x, task.y, task.test_x, task.test_y, 4, Selection("none"))
    c = choose(none, {"a": [1, 2]}, {"a": 7}, score)
    assert (c.setting, c.val_acc, c.tried, c.selection) == ({"a": 7}, None, 1, "none")


def _brute_sk_fold_accuracy(task, k, kernel, mult, ridge):
    """Every validation example predicted by sk.sparse_krr from its fold's fit part, one fold at a time."""
    x = F.normalize(task.x, dim=1)
    hits = 0
    for fit, val in task.selection.folds:
        ls = mult * sk.auto_lengthscale(x[fit], k=min(k, len(fit)))
        f = sk.sparse_krr(x[val], x[fit], F.one_hot(task.y[fit], task.num_classes).float(), k=k, kernel=kernel,
                          lengthscale=ls, ridge=ridge)
        hits += int((f.argmax(1) == task.y[val]).sum())
    return hits / len(task.y)


def test_sk_probe_scores_its_grid_on_the_folds_as_a_brute_force_does_then_refits():
    task = _task(n_per_class=8)
    grid = {"k": [3, 8], "kernel": ["gaussian", "laplacian"], "lengthscale_mult": [0.5, 2.0], "ridge": [1e-2]}
    res = run_probe("sk", task, {"grid": grid, "default": {}})
    brute = {(e["k"], e["kernel"], e["lengthscale_mult"]): _brute_sk_fold_accuracy(task, e["k"], e["kernel"],
                                                                                 e["lengthscale_mult"], 1e-2)
             for e in res.grid}
    assert len(res.grid) == 8 and len(set(brute.values())) > 1  # the settings differ: the choice means something
    for e in res.grid:
        assert e["val_acc"] == pytest.approx(brute[(e["k"], e["kernel"], e["lengthscale_mult"])]), e
    best = max(brute.values())
    first = next(key for key, v in brute.items() if v == best)
    assert (res.chosen["k"], res.chosen["kernel"], res.chosen["lengthscale_mult"]) == first
    # the final support is every labelled example, at the chosen multiple of its own auto lengthscale
    x = F.normalize(task.x, dim=1)
    assert res.chosen["lengthscale"] == pytest.approx(first[2] * sk.auto_lengthscale(x, k=first[0]))
    assert res.settings_tried == 8 and res.selection == f"3-fold {task.selection.fingerprint()}"


def test_a_holdout_without_refit_reads_out_from_the_fit_part_only():
    task = _task(n_per_class=10)
    fit, val = torch.arange(0, 30), torch.arange(30, 40)
    hold = ProbeTask(task.x, task.y, task.test_x, task.test_y, 4, holdout(fit, val), refit=False)
    res = run_probe("knn", hold, {"grid": None, "default": {"k": 3, "temperature": 0.07}})
    ref = run_probe("knn", ProbeTask(task.x[fit], task.y[fit], task.test_x, task.test_y, 4, Selection("none")),
                    {"grid": None, "default": {"k": 3, "temperature": 0.07}})
    assert torch.equal(res.pred, ref.pred) and res.val_acc is not None and ref.val_acc is None


def test_probes_take_their_defaults_where_nothing_can_be_validated():
    task = _task(n_per_class=1)
    assert task.selection.rule == "none"
    lin = run_probe("linear", task, {"grid": {"C": [0.1, 10.0]}, "default": {"C": 1.0}, "max_iter": 20})
    assert (lin.chosen, lin.select_s, lin.settings_tried, lin.val_acc, lin.selection) == ({"C": 1.0}, 0.0, 1, None, "none")
    assert lin.fit_s > 0
    knn = run_probe("knn", task, {"grid": {"k": [1, 2]}, "default": {"k": 20, "temperature": 0.07}})
    assert knn.chosen == {"k": 4, "T": 0.07}  # k capped at the four labelled examples


def _finetune_task(n_per_class, folds=2):
    def make_tail():
        return nn.Linear(6, 6)

    task = _task(n_per_class=n_per_class, folds=folds)
    task.extras.update(act=task.x.clone(), test_act=task.test_x.clone(), make_tail=make_tail)
    return task


FT = {"grid": {"lr": [1e-4, 1e-2, 1e-1], "steps": [3, 12, 30]}, "default": {"lr": 1e-2, "steps": 7}, "batch_size": 8}


def _ft_fold_accuracy(task, lr, steps):
    hits = 0
    for fit, val in task.selection.folds:
        (_, model), = finetune_runs(task.extras["act"][fit], task.y[fit], task.extras["make_tail"], 4, 6, lr=lr,
                                    checkpoints=[steps], batch_size=8, weight_decay=0.0, seed=task.seed, device="cpu")
        hits += int((finetune_predict(model, task.extras["act"][val], "cpu") == task.y[val]).sum())
    return hits / len(task.y)


def test_finetune_chooses_lr_and_steps_on_the_folds_then_refits_on_the_whole_draw():
    task = _finetune_task(10)
    res = run_probe("finetune", task, FT)
    scores = {(lr, s): _ft_fold_accuracy(task, lr, s) for lr in FT["grid"]["lr"] for s in FT["grid"]["steps"]}
    assert len(set(scores.values())) > 1
    best = max(scores.values())
    first = next(k for k, v in scores.items() if v == best)  # ties: the first lr, then the fewest steps
    assert (res.chosen["lr"], res.chosen["steps"]) == first and res.val_acc == pytest.approx(best)
    assert res.settings_tried == 9 and 0 < res.select_s <= res.fit_s
    (_, model), = finetune_runs(task.extras["act"], task.y, task.extras["make_tail"], 4, 6, lr=first[0],
                                checkpoints=[first[1]], batch_size=8, weight_decay=0.0, seed=0, device="cpu")
    assert torch.equal(res.pred, finetune_predict(model, task.extras["test_act"], "cpu"))
    assert run_probe("finetune", _task(), FT) is None  # no activations, no last block: nothing to fine-tune


def test_finetune_runs_scores_step_counts_along_one_run():
    """The checkpoint at s steps of a run that goes on to more steps is the model of a run of s steps."""
    task = _finetune_task(10)
    act, tail = task.extras["act"], task.extras["make_tail"]
    kw = dict(batch_size=8, weight_decay=0.0, seed=0, device="cpu")
    along = {s: finetune_predict(m, act, "cpu") for s, m in finetune_runs(act, task.y, tail, 4, 6, lr=1e-2,
                                                                          checkpoints=[30, 3, 12], **kw)}
    assert sorted(along) == [3, 12, 30]
    for s in (3, 12, 30):
        (_, m), = finetune_runs(act, task.y, tail, 4, 6, lr=1e-2, checkpoints=[s], **kw)
        assert torch.equal(along[s], finetune_predict(m, act, "cpu")), s
    assert not torch.equal(along[3], along[30])


def test_every_probe_with_a_setting_chooses_on_the_same_folds(monkeypatch):
    seen = {}
    for name in ("sk", "knn", "linear", "mlp", "finetune"):
        module = getattr(probes, name)
        real = module.choose

        def recording(task, grid, default, score_fold, *a, _name=name, _real=real, **k):
            folds = []

            def spy(fit, val, settings):
                folds.append((fit.clone(), val.clone()))
                return score_fold(fit, val, settings)

            out = _real(task, grid, default, spy, *a, **k)
            seen[_name] = folds
            return out

        monkeypatch.setattr(module, "choose", recording)
    task = _finetune_task(6, folds=3)
    options = {"sk": {"grid": {"k": [2, 4], "kernel": ["gaussian"], "lengthscale_mult": [1.0], "ridge": [1e-2]},
                      "default": {}},
               "knn": {"grid": {"k": [2, 4], "temperature": [0.1]}, "default": {}},
               "linear": {"grid": {"C": [0.1, 1.0]}, "default": {}, "max_iter": 10},
               "mlp": {"grid": {"lr": [1e-2], "weight_decay": [0.0]}, "default": {}, "epochs": 1, "hidden": 8,
                       "batch_size": 8},
               "finetune": {"grid": {"lr": [1e-2], "steps": [2]}, "default": {}, "batch_size": 8}}
    results = {name: run_probe(name, task, opts) for name, opts in options.items()}
    reference = seen["sk"]
    assert len(reference) == 3
    for name, folds in seen.items():
        assert len(folds) == len(reference) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                    for a, b in zip(folds, reference)), name
    assert len({r.selection for r in results.values()}) == 1


def test_unknown_probe_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown probe 'svm': registered are"):
        run_probe("svm", _task(), {})
    assert {"sk", "knn", "ncm", "linear", "mlp", "finetune"} <= set(probes.PROBES)
