import math

import pytest

import torch

from omni.train import TrainConfig, lr_at, train


def _problem():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4))
    target = torch.tensor([1.0, -2.0, 3.0, 0.5])
    return w, (lambda step: (((w - target) ** 2).sum(), 4)), target


def test_it_learns():
    w, loss_fn, target = _problem()
    hist = train({"w": w}, loss_fn, TrainConfig(steps=200, lr=0.1, progress=False))
    assert hist.loss[-1] < 0.01 * hist.loss[0]
    torch.testing.assert_close(w.detach(), target, atol=0.1, rtol=0)


def test_non_finite_steps_are_skipped_and_counted():
    w, loss_fn, _ = _problem()

    def poisoned(step):
        loss, n = loss_fn(step)
        return (loss * float("nan") if step in (3, 7) else loss), n

    hist = train({"w": w}, poisoned, TrainConfig(steps=20, lr=0.1, progress=False))
    assert hist.skipped == 2
    assert torch.isfinite(w).all()
    assert math.isnan(hist.loss[3]) and hist.loss[-1] < hist.loss[0]


def test_warmup_and_cosine_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_frac=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(10, cfg) - 1.0) < 1e-9 and abs(lr_at(100, cfg) - 0.1) < 1e-9
    assert lr_at(50, cfg) < lr_at(20, cfg)


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_a_straight_run(tmp_path):
    cfg = TrainConfig(steps=10, lr=0.05, warmup=2, ckpt_every=3, ckpt_dir=str(tmp_path), progress=False)
    w_ref, f_ref, _ = _problem()
    straight = train({"w": w_ref}, f_ref, TrainConfig(steps=10, lr=0.05, warmup=2, progress=False))

    w1, f1, _ = _problem()

    def crashing(step):
        if step == 7:
            raise Interrupted  # dies during step 7; the last checkpoint is after step 5
        return f1(step)

    try:
        train({"w": w1}, crashing, cfg)
    except Interrupted:
        pass
    w2, f2, _ = _problem()  # a new process: parameters back at their init
    resumed = train({"w": w2}, f2, cfg)
    assert resumed.step == list(range(10))
    assert resumed.loss == straight.loss  # bit-identical: weights and Adam moments were restored
    torch.testing.assert_close(w2.detach(), w_ref.detach(), atol=0, rtol=0)


def test_a_checkpoint_torn_between_its_two_files_is_refused(tmp_path):
    """Weights and history are two files; a run killed between their writes must not resume with
    new weights and an old history (it would silently repeat steps)."""
    import json

    import pytest

    w = torch.nn.Parameter(torch.ones(2, 2))
    cfg = TrainConfig(steps=4, lr=0.1, ckpt_every=2, ckpt_dir=str(tmp_path), progress=False)
    train({"w": w}, lambda step: ((w * step).sum() ** 2, 1), cfg)
    meta = json.loads((tmp_path / "train_state.json").read_text())
    meta["next_step"] = 2  # the history of the step-2 checkpoint beside the weights of step 4
    (tmp_path / "train_state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights of step 4 but history of step 2"):
        train({"w": w}, lambda step: ((w * step).sum() ** 2, 1), cfg)


def test_dtype_offers_only_what_the_loop_runs():
    """float16 autocast needs a loss scaler the loop does not have: it is not offered, and refused naming the parameter."""
    from omni.experiments.alignment import AlignConfig
    from omni.params import ParamError
    from omni.train import DTYPES

    assert DTYPES == ("bfloat16", "float32")
    with pytest.raises(ParamError, match="parameter `dtype` = 'float16'"):
        AlignConfig(dtype="float16")
