"""omni.experiments.pretrain_lm on a tiny setting (depth 1, 300-token BPE, 32-token windows, 8 steps, Sherlock only):
the LM folder loads through omni.model.lm.load_lm and gives the same logits, bits per byte is sane and
right on a known answer, the speech corpus's held-out sentences never reach the LM, a seed fixes the
run, and under torchrun (2 processes, gloo) the ranks stay identical because gradients are averaged."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni import track
from omni.data import text
from omni.data.synth import held_out_sentences
from omni.experiments.pretrain_lm import (GAP_MAX, SPAN_MAX, SPAN_MIN, PretrainConfig, bits_per_byte, copy_test, corpus, draw_windows,
                                          induction_share, random_copy, run)
from omni.model.gpt import GPT, GPTConfig
from omni.model.lm import load_lm
from omni.model.tokenizer import BPETokenizer, ByteTokenizer

TINY = dict(sources="sherlock", vocab_size=300, depth=1, sequence_len=32, batch_size=4, steps=8, warmup=2,
            eval_every=4, eval_tokens=512, device="cpu", seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "lm"
    run_id = track.start_run("test-pretrain", "tiny")  # conftest.py points MLflow at a throwaway store
    res = run(PretrainConfig(out=str(out), **TINY), track.Tracker(run_id))
    res.run_id = run_id
    return res


def test_lm_folder_loads_and_gives_the_same_logits(tiny):
    out = Path(tiny.config.out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "pretrain.json", "tokenizer.json"]
    gpt, tok = load_lm(out, torch.device("cpu"))
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300 == gpt.config.vocab_size
    s = "It was a dark night, said Holmes."
    assert tok.decode(tok.encode(s)) == s and len(tok.encode(s)) < len(s)  # merges were learned
    idx = torch.tensor([tok.encode(s, bos=True)])
    tiny.model.eval()
    with torch.no_grad():
        assert torch.equal(gpt(idx), tiny.model(idx))
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["val_bpb"] == tiny.val_bpb and meta["config"]["depth"] == 1 and len(meta["samples"]) == 4
    assert meta["train_tokens"] == tiny.n_train_tokens


def test_training_and_validation_numbers(tiny):
    logged = track.run_metrics(tiny.run_id)  # the final numbers reach MLflow (the tracker buffers)
    assert logged["val_bpb"] == pytest.approx(tiny.val_bpb) and logged["train_tokens"] == tiny.n_train_tokens
    assert [s for s, _ in track.metric_history(tiny.run_id, "val_bpb")] == [3, 7, 8]
    assert logged["copy_nats"] == pytest.approx(tiny.copy_nats) and 0 < tiny.copy_nats < 10 and 0 < tiny.first_nats < 10
    h = tiny.history
    assert len(h.loss) == 8 and h.skipped == 0 and all(map(math.isfinite, h.loss))
    assert [e["step"] for e in h.evals] == [3, 7] and tiny.val_bpb == h.evals[-1]["val_bpb"]
    # learning shows on the fixed validation text; the training loss of 8 steps mixes prose with copy
    # windows whose share the curriculum changes per step, so it is not monotone
    assert h.evals[1]["val_bpb"] < h.evals[0]["val_bpb"]
    assert math.isfinite(tiny.val_bpb) and 0 < tiny.val_bpb < 8.0
    assert all(s.startswith(p) for s, p in zip(tiny.samples, ["Holmes", "It was a dark", "The door opened and", "I have"]))


def test_bits_per_byte_of_a_uniform_model():
    # all logits 0: every token costs ln(V) nats; bytes per token are measured on the stream itself
    tok = ByteTokenizer()
    gpt = GPT(GPTConfig(sequence_len=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    torch.nn.init.zeros_(gpt.lm_head.weight)
    val_text = "Holmes looked at the door. " * 40
    val_ids = torch.tensor(tok.encode(val_text, bos=True))
    n_bytes = len(val_text.encode())
    got = bits_per_byte(gpt, val_ids, n_bytes, seq=64, batch=3, max_tokens=10_000)
    assert got == pytest.approx(math.log2(257) * len(val_ids) / n_bytes, rel=1e-5)
    with pytest.raises(ValueError, match="eval_tokens=32"):
        bits_per_byte(gpt, val_ids, n_bytes, seq=64, batch=3, max_tokens=32)


def test_held_out_speech_sentences_never_reach_the_lm():
    held = {text.sentence_key(s) for s in held_out_sentences()}

    def units(*texts):  # the sentences of the LM text, as the exclusion keys them
        return {text.sentence_key(u) for t in texts for para in t.split("\n\n") for u in text.split_sentences(para)}

    train, val = corpus("sherlock")
    assert len(held) > 100 and not held & units(train, val)
    # the check can fail: without the exclusion every held-out sentence is in the text
    assert held <= units(*text.lm_splits(sources=("sherlock",)))


def test_a_seed_fixes_the_run(tiny, tmp_path):
    again = run(PretrainConfig(out=str(tmp_path / "again"), **TINY))
    assert again.history.loss == tiny.history.loss and again.val_bpb == tiny.val_bpb
    for (n, a), b in zip(again.model.state_dict().items(), tiny.model.state_dict().values()):
        assert torch.equal(a, b), n
    other = run(replace(PretrainConfig(out=str(tmp_path / "other"), **TINY), seed=1, steps=2))
    assert other.history.loss != tiny.history.loss[:2]


def test_bad_parameters_are_named_before_training(tmp_path):
    with pytest.raises(ValueError, match="parameter `tokenizer`"):
        run(replace(PretrainConfig(out=str(tmp_path / "x"), **TINY), tokenizer="words"))
    with pytest.raises(ValueError, match="eval_tokens=16"):
        run(replace(PretrainConfig(out=str(tmp_path / "x"), **TINY), tokenizer="byte", eval_tokens=16))
    assert not (tmp_path / "x").exists()


# Runs `python -m omni.experiments.pretrain_lm`'s main() in each torchrun process, keeping what that rank trained.
SPY = r"""
import json, os, sys
import torch
from safetensors.torch import save_file
from omni import train as T
from omni.experiments import pretrain_lm as P

out, mode = sys.argv[1], sys.argv[2]
if mode == "no-average":
    T._average_gradients = lambda plist: None  # what DDP would be without the all-reduce
kept = {}
real_train = P.train

def train(params, *a, **k):
    probe = torch.nn.Parameter(torch.zeros(3))  # a known gradient per rank: 1 on rank 0, 2 on rank 1
    probe.grad = torch.full((3,), float(os.environ["RANK"]) + 1)
    T._average_gradients([probe])
    kept["_probe"] = probe.grad.tolist()
    hist = real_train(params, *a, **k)
    kept.update({n: p.detach().clone().contiguous() for n, p in params.items()})
    kept["_losses"] = hist.loss
    return hist

P.train = train
P.main(["--out", out, "--sources", "sherlock", "--tokenizer", "byte", "--depth", "1", "--sequence-len", "32",
        "--batch-size", "4", "--steps", "5", "--warmup", "0", "--eval-every", "5", "--eval-tokens", "256", "--device", "cpu"])
rank = os.environ["RANK"]
json.dump({"losses": kept.pop("_losses"), "probe": kept.pop("_probe")}, open(f"{out}/losses{rank}.json", "w"))
save_file(kept, f"{out}/rank{rank}.safetensors")
"""


def _torchrun(tmp_path: Path, mode: str) -> Path:
    script = tmp_path / "spy.py"
    script.write_text(SPY)
    out = tmp_path / mode
    out.mkdir()
    # `torchrun` itself is this module: --standalone picks a free local port, so parallel runs do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out), mode]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("saved to") == 1  # rank 0 saves and says so
    return out


def test_ddp_ranks_stay_identical_only_with_gradient_averaging(tmp_path):
    out = _torchrun(tmp_path, "average")
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    saved = load_file(out / "model.safetensors")
    assert set(r0) == set(saved) and len(r0) > 3
    for n in r0:
        assert torch.equal(r0[n], r1[n]) and torch.equal(r0[n], saved[n]), n
    l0, l1 = (json.loads((out / f"losses{r}.json").read_text()) for r in (0, 1))
    assert l0["losses"] != l1["losses"]  # each rank drew its own batches, yet the weights agree
    assert l0["probe"] == l1["probe"] == [1.5, 1.5, 1.5]  # the mean of the ranks' gradients, not their sum

    diverged = _torchrun(tmp_path, "no-average")  # the check can fail: without the all-reduce they drift
    d0, d1 = load_file(diverged / "rank0.safetensors"), load_file(diverged / "rank1.safetensors")
    assert any(not torch.equal(d0[n], d1[n]) for n in d0)


def _repeats(w: list[int]) -> list[tuple[int, int, int]]:
    """(start of a span, its repeat's start, length) for each maximal verbatim repeat of >= SPAN_MIN tokens."""
    out, n = [], len(w)
    for d in range(1, n):
        run = 0
        for i in range(d, n + 1):
            if i < n and w[i] == w[i - d]:
                run += 1
            else:
                if run >= SPAN_MIN:
                    out.append((i - run - d, i - run, run))
                run = 0
    return out


def test_plain_windows_are_the_stream():
    ids = torch.arange(10, 2000)
    plain = draw_windows(ids, 8, 40, 0, 4096, torch.Generator().manual_seed(1))
    assert plain.shape == (8, 41) and all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 41)) for w in plain)


def test_induction_windows_repeat_random_spans_at_varied_distances():
    ids = torch.arange(10, 2000)  # the stream never repeats itself
    gen = torch.Generator().manual_seed(1)
    windows = draw_windows(ids, 64, 256, 0, 500, gen, induction=1.0)
    assert torch.equal(windows, draw_windows(ids, 64, 256, 0, 500, torch.Generator().manual_seed(1), induction=1.0))  # seeded
    assert not (windows == 0).any() and int(windows.max()) < 500  # random ids of the vocabulary, never BOS
    distances, starts = set(), set()
    for w in windows.tolist():
        reps = [r for r in _repeats(w) if r[2] >= SPAN_MIN + 2]  # chance repeats of random ids are short
        assert reps, "an induction window without a repeated span"
        distances |= {b - a for a, b, _ in reps}
        starts.add(reps[0][0])
    assert len(distances) > 30 and len(starts) > 20  # neither the distance nor the place is fixed (no positional shortcut)
    assert max(distances) > SPAN_MAX + GAP_MAX // 2 and min(distances) <= SPAN_MAX


def test_repeat_windows_copy_their_own_prose_and_the_rest_stay_plain():
    ids = torch.arange(10, 5000)
    mixed = draw_windows(ids, 200, 128, 0, 4096, torch.Generator().manual_seed(2), repeat=0.5)
    plain = [bool(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 129))) for w in mixed]
    assert 60 < sum(plain) < 140  # about half
    for w, p in zip(mixed.tolist(), plain):
        if not p:
            assert _repeats(w) and all(t >= 10 for t in w)  # prose tokens, repeated verbatim


def test_induction_share_anneals_to_its_floor():
    cfg = PretrainConfig(induction=0.8, induction_floor=0.1, induction_steps=100)
    assert [round(induction_share(cfg, s), 3) for s in (0, 50, 100, 500)] == [0.8, 0.45, 0.1, 0.1]
    assert induction_share(replace(cfg, induction_steps=0), 0) == 0.1
    with pytest.raises(ValueError, match="induction_floor"):
        PretrainConfig(induction_floor=1.5)


def test_random_copy_counts_the_repeats_predicted():
    class Copier(torch.nn.Module):  # predicts, in the second half, the token one reading back
        def forward(self, x):
            n = x.size(1)
            L = (n - 1) // 2
            logits = torch.zeros(x.size(0), n, 50)
            for p in range(L + 1, n):
                logits[torch.arange(x.size(0)), p, x[:, p - L]] = 50.0
            return logits

    Copier.parameters = lambda self: iter([torch.zeros(1)])
    assert random_copy(Copier(), 0, 50) == 1.0
    uniform = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    assert random_copy(uniform, 0, 50) < 0.2


def test_copy_test_scores_the_second_reading_apart_from_the_first():
    tok = ByteTokenizer()
    V = tok.vocab_size

    class Copier(torch.nn.Module):  # predicts, from the second reading on, the token one reading back
        def forward(self, x):
            n = x.size(1)
            L = (n - 1) // 2  # input: BOS, L tokens, BOS, L - 1 tokens
            logits = torch.zeros(1, n, V)
            for p in range(L + 1, n):
                logits[0, p, x[0, p - L]] = 50.0
            return logits

    Copier.parameters = lambda self: iter([torch.zeros(1)])
    first, second = copy_test(Copier(), tok, ["hello there", "a b"])
    assert first == pytest.approx(math.log(V), rel=1e-4) and second < 1e-3


def test_repeat_noise_misspells_the_source_only_and_costs_no_draws_when_off():
    from omni.experiments.pretrain_lm import repeat_spans

    w = torch.arange(1000, 1256)  # distinct ids: where a repeat sits, its values say where its source was
    clean = repeat_spans(w.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(repeat_spans(w.clone(), torch.Generator().manual_seed(3), noise=0.0, vocab_size=5000, bos_id=7), clean)
    first = int((clean != w).nonzero()[0])  # where the first repeat starts
    at = int(clean[first]) - 1000  # where its source starts
    L = 1
    while first + L < 256 and clean[first + L] == clean[first] + L:
        L += 1
    assert L >= SPAN_MIN
    noisy = repeat_spans(w.clone(), torch.Generator().manual_seed(3), noise=0.5, vocab_size=5000, bos_id=7)
    assert torch.equal(noisy[first : first + L], w[at : at + L])  # the repeat is the clean text
    hit = noisy[at : at + L] != w[at : at + L]  # its source is misspelt, about half of it, never with BOS
    assert 0 < int(hit.sum()) < L and not (noisy[at : at + L] == 7).any()
    assert torch.equal(noisy[:at], w[:at])  # nothing before the source changed


def test_copy_test_with_noise_misspells_only_the_first_reading(tiny):
    """noise=0 is the plain copy test (no draws); noise > 0 reads the sentence after a misspelt copy,
    seeded: the same figure twice, a different one from the clean test."""
    gpt, tok = tiny.model, load_lm(Path(tiny.config.out), torch.device("cpu"))[1]
    sents = ["It was a dark night, said Holmes.", "The door opened and I have seen it."]
    clean = copy_test(gpt, tok, sents)
    assert copy_test(gpt, tok, sents, noise=0.0, seed=5) == clean
    noisy = copy_test(gpt, tok, sents, noise=0.5, seed=1)
    assert noisy == copy_test(gpt, tok, sents, noise=0.5, seed=1) and noisy[1] != clean[1]
    assert all(map(math.isfinite, noisy))
