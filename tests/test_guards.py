"""Stability guards of omni.train, each made to fire: a run of non-finite steps stops the run, LoRA
gradients clip on their own, an early lr factor, a projector held still for its first steps, a batch
without a supervised target is an error; the audio path runs in fp32 under autocast; k-bit asked for
without CUDA is refused before anything loads. Resume stays bit-identical with frozen and skipped steps."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from omni.train import TrainConfig, lr_at, train


def _quadratic(names=("w",), scale=1.0):
    torch.manual_seed(0)
    params = {n: torch.nn.Parameter(torch.zeros(4)) for n in names}
    target = torch.tensor([1.0, -2.0, 3.0, 0.5]) * scale

    def loss_fn(step):
        return sum(((p - target) ** 2).sum() for p in params.values()), 4

    return params, loss_fn


def test_non_finite_steps_in_a_row_stop_the_run():
    params, loss_fn = _quadratic()

    def diverged(step):
        loss, n = loss_fn(step)
        return (loss * float("inf") if step >= 5 else loss), n

    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row.*max_bad_steps=3"):
        train(params, diverged, TrainConfig(steps=50, lr=0.1, max_bad_steps=3, progress=False))
    # isolated bad steps (never 3 in a row) are only counted
    params, loss_fn = _quadratic()
    hist = train(params, lambda s: ((loss_fn(s)[0] * (float("nan") if s % 3 == 0 else 1.0)), 4),
                 TrainConfig(steps=12, lr=0.1, max_bad_steps=2, progress=False))
    assert hist.skipped == 4


def test_lora_parameters_are_clipped_on_their_own(tmp_path):
    # grads: 2 * (0 - target) -> norm 2 * |target| * scale, large for both parameters
    params, loss_fn = _quadratic(names=("gpt.h.0.c_q.lora_A.default.weight", "projector.w"), scale=10.0)
    cfg = TrainConfig(steps=1, lr=1e-3, grad_clip=1000.0, lora_grad_clip=0.5, ckpt_every=1, ckpt_dir=str(tmp_path), progress=False)
    train(params, loss_fn, cfg)
    state = load_file(tmp_path / "train_state.safetensors")
    # after one step Adam's first moment is (1 - beta1) * the clipped gradient
    lora_norm = state["adam/gpt.h.0.c_q.lora_A.default.weight/exp_avg"].norm().item() / 0.1
    proj_norm = state["adam/projector.w/exp_avg"].norm().item() / 0.1
    full = 2 * 10 * torch.tensor([1.0, -2.0, 3.0, 0.5]).norm().item()
    assert lora_norm == pytest.approx(0.5, rel=1e-4)
    assert proj_norm == pytest.approx(full, rel=1e-4)  # under grad_clip=1000: untouched by the LoRA clip


def test_early_lr_factor():
    cfg = TrainConfig(steps=20, lr=1.0, warmup=0, min_lr_frac=1.0, early_lr_factor=0.1, early_steps=5)
    assert [lr_at(s, cfg) for s in (0, 4, 5, 19)] == [pytest.approx(0.1), pytest.approx(0.1), 1.0, 1.0]
    params, loss_fn = _quadratic()
    hist = train(params, loss_fn, replace(cfg, progress=False))
    assert hist.lr[:5] == [pytest.approx(0.1)] * 5 and hist.lr[5] == 1.0


def test_freeze_projector_steps_holds_the_projector_still():
    params, loss_fn = _quadratic(names=("projector.w", "gpt.lora_A"))
    seen = []

    def watched(step):
        seen.append({n: p.detach().clone() for n, p in params.items()})
        return loss_fn(step)

    train(params, watched, TrainConfig(steps=6, lr=0.1, freeze_projector_steps=3, progress=False))
    # seen[s] = values before step s: steps 0, 1, 2 leave the projector alone, step 3 moves it
    assert all(torch.equal(seen[s]["projector.w"], seen[0]["projector.w"]) for s in range(4))
    assert not torch.equal(seen[4]["projector.w"], seen[0]["projector.w"])
    assert not torch.equal(seen[1]["gpt.lora_A"], seen[0]["gpt.lora_A"])


def test_a_batch_without_supervised_targets_is_an_error():
    params, loss_fn = _quadratic()
    with pytest.raises(ValueError, match="no supervised target token"):
        train(params, lambda s: (loss_fn(s)[0], 0 if s == 2 else 4), TrainConfig(steps=5, progress=False))


class Interrupted(Exception):
    pass


def test_resume_is_bit_identical_with_frozen_and_skipped_steps(tmp_path):
    def run(cfg, crash_at=None):
        params, loss_fn = _quadratic(names=("projector.w", "gpt.w"))

        def f(step):
            if step == crash_at:
                raise Interrupted
            loss, n = loss_fn(step)
            return (loss * float("nan") if step == 1 else loss), n

        try:
            return train(params, f, cfg), params
        except Interrupted:
            return None, params

    base = TrainConfig(steps=10, lr=0.05, warmup=2, freeze_projector_steps=4, progress=False)
    straight, p_ref = run(base)
    ckpt = replace(base, ckpt_every=3, ckpt_dir=str(tmp_path))
    run(ckpt, crash_at=7)
    resumed, p = run(ckpt)
    assert resumed.loss[2:] == straight.loss[2:] and resumed.skipped == straight.skipped == 1
    for n in p:
        torch.testing.assert_close(p[n].detach(), p_ref[n].detach(), atol=0, rtol=0)


def test_audio_path_stays_fp32_under_autocast(tiny_alignment):
    from omni.model.encoder import collate_states

    model = tiny_alignment.result.model
    rows = tiny_alignment.cache.select(split="test")[:2]
    hidden, lengths = collate_states([s.float() for s in tiny_alignment.cache.load_states(rows)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, _ = model.audio_tokens(hidden, lengths)
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16  # autocast is on here
    assert tokens.dtype == torch.float32


def test_k_bit_without_cuda_is_refused_before_anything_loads(tmp_path):
    from omni.experiments import alignment
    from omni.experiments.alignment import AlignConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="load_in='4bit' needs CUDA"):  # refused when the config is built
        alignment.run(AlignConfig(corpus=str(tmp_path / "corpus"), features=str(tmp_path / "features"),
                                  lm=str(tmp_path / "lm"), load_in="4bit", trainable="projector+lora", device="cpu"))
    assert not any(tmp_path.iterdir())  # no corpus, no cache, no LM was built


def test_freeze_projector_steps_reaches_the_loop_from_align_config(tiny_alignment):
    """AlignConfig.freeze_projector_steps >= steps: the projector ends where it started, the layer mix moved.
    (MLflow gets every AlignConfig field, guards included, through omni.track.open_run.)"""
    from omni.experiments import alignment
    from omni.model.lm import load_lm
    from omni.model.speech_lm import SpeechLM, SpeechLMConfig

    cfg = replace(tiny_alignment.cfg, steps=3, eval_every=3, eval_clips=2, max_new_tokens=2, out="", freeze_projector_steps=3)
    res = alignment.run(cfg, cache=tiny_alignment.cache)
    gpt, tok = load_lm(cfg.lm)
    torch.manual_seed(cfg.seed)  # alignment.run's own seeding, before it builds the audio path
    init = SpeechLM(gpt, tok, tiny_alignment.cache.n_states, tiny_alignment.cache.d_model,
                    SpeechLMConfig(cfg.layer, cfg.k, cfg.projector, prompt=cfg.prompt, prompt_position=cfg.prompt_position))
    for n, p in init.projector.state_dict().items():
        assert torch.equal(p, res.model.projector.state_dict()[n]), n
    assert not torch.equal(init.select.state_dict()["weights"], res.model.select.state_dict()["weights"])
