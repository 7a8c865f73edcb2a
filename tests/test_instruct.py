"""Instruction tuning on a tiny random model: conversations parse with audio where the tag stands,
answers are tokenised as prose, the loss covers assistant tokens only (a mean per turn, then per
conversation), batches follow the task mix, a few steps lower the loss, greedy answers in a batch
match each question asked alone, a Hugging Face backbone goes the same way, and tuning can start from
an alignment run."""

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import pytest

from conftest import tiny_lm
from test_bench import fake_cache, fake_rows
from omni.data.instructions import InstructionConfig, build_instructions
from omni.data.manifest import write_manifest
from omni.eval.texture import load_questions
from omni.experiments.trained import load_run
from omni.experiments.tuning import (
    TuningConfig, answerer, build_model, conversation_batch, conversation_loss, encode, read_conversations, tune,
)

TASKS = ("gender", "style", "same_speaker", "last_word")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    rows = fake_rows({"train": 24, "val": 8, "test": 8})
    sets = build_instructions(rows, InstructionConfig(seed=0, tasks=TASKS, chains=0))  # tiny_lm: 256 positions
    for split in ("train", "val", "test"):
        write_manifest(root / "instr" / f"{split}.jsonl", sets[split])
    cache = fake_cache(root / "cache", rows, informative=True)
    cfg = TuningConfig(instructions=str(root / "instr"), lm=str(tiny_lm(root / "lm")), layer="weighted",
                         steps=12, batch_size=8, lr=3e-3, warmup=0, device="cpu")
    return root, rows, cache, cfg


def test_multi_turn_audio_in_place_and_assistant_only_loss(setup):
    root, rows, cache, cfg = setup
    a, b = Path(rows[0]["audio"]), Path(rows[1]["audio"])
    conv = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "user", "value": f"Listen: <audio>{a}</audio> and say the gender."},
        {"from": "assistant", "value": "female"},
        {"from": "human", "value": f"<audio>{b}</audio> Same speaker?"},
        {"from": "gpt", "value": "no"}]}
    path = write_manifest(root / "multi.jsonl", [conv])
    [parsed] = read_conversations(path)
    assert parsed[1] == ("user", ["Listen:", a, "and say the gender."]) and parsed[3] == ("human", [b, "Same speaker?"])

    model = build_model(cfg, cache, torch.device("cpu"))
    tok = model.tokenizer
    states = dict(zip([a, b], cache.load_states([0, 1])))
    idx, embeds, targets, _ = conversation_batch(model, [parsed], states)
    trained = targets[0][targets[0] >= 0].tolist()
    assert trained == tok.encode(" female") + [tok.eos_id] + tok.encode(" no") + [tok.eos_id]

    # the first clip's audio tokens sit right after "...User: Listen:" and before " and say the gender."
    seq, _ = encode(parsed, tok)
    p = seq.index(a)
    assert tok.decode(idx[0, 1:p].tolist()) == "Be brief.\nUser: Listen:"
    with torch.no_grad():
        hidden, frames = cache.load_states([0])[0].float()[None], torch.tensor([5])
        tokens, n = model.audio_tokens(hidden, frames)
    n = int(n[0])
    assert torch.allclose(embeds[0, p : p + n], tokens[0, :n])
    assert tok.decode(idx[0, p + n : p + n + 21].tolist()) == " and say the gender.\n"

    # the loss is the cross-entropy over exactly those positions, a mean per turn, then over the turns
    loss, count = conversation_loss(model, [parsed], states)
    logits = model.gpt(idx, embeds=embeds)
    pos = (targets[0] >= 0).nonzero()[:, 0].tolist()
    n1 = len(tok.encode(" female")) + 1
    turns = [pos[:n1], pos[n1:]]
    want = sum(F.cross_entropy(logits[0, p], targets[0, p]) for p in turns) / 2
    assert count == len(trained) and torch.allclose(loss, want)
    # and the audio reaches it: another clip in the first tag changes the loss
    other = {**states, a: cache.load_states([5])[0]}
    assert abs(conversation_loss(model, [parsed], other)[0].item() - loss.item()) > 1e-6


def test_few_steps_lower_the_loss_save_and_bench(setup, capsys):
    root, rows, cache, cfg = setup
    res = tune(replace(cfg, out=str(root / "run"), eval_every=6, trainable="projector+lm"), cache=cache)
    assert [e["step"] for e in res.history.evals] == [5, 11] and res.history.evals[-1]["val_loss"] == res.val_loss
    first, last = sum(res.history.loss[:3]) / 3, sum(res.history.loss[-3:]) / 3
    assert last < first - 0.1, res.history.loss
    assert res.val_loss == res.val_loss and res.val_loss < 10
    assert (root / "run" / "audio_path.safetensors").is_file() and (root / "run" / "lm" / "model.safetensors").is_file()

    # the saved run reloads as it was (the one loader of trained runs), and `omni texture` scores it with its three baselines
    from omni.cli import main

    loaded, _ = load_run(root / "run")
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)
    assert answerer(loaded, cache)(qs[:5]) == answerer(res.model, cache)(qs[:5])
    assert main(["texture", "--run", str(root / "run"), "--out", str(root / "bench"), "--bench-per-task", "3"]) == 0
    printed = capsys.readouterr().out
    assert "texture" in printed and "linear probe" in printed
    scores = json.loads((root / "bench" / "scores.json").read_text())["scores"]
    assert set(scores) == {"model", "train majority", "transcript only (reference)", "shuffled audio", "linear probe"}
    asked = load_questions(root / "instr" / "test.jsonl", check_audio=False, max_per_task=3)
    assert scores["model"]["gender"]["n"] == sum(q["task"] == "gender" for q in asked) == scores["linear probe"]["gender"]["n"]
    assert "transcribe" not in scores["linear probe"] and (root / "bench" / "bench.png").stat().st_size > 1000
    assert main(["bench", "--run", str(root)]) == 2  # not a run folder: one line, exit 2 (and `bench`, the old name, still works)
    assert "`bench` is now `texture`" in capsys.readouterr().err
    # --features: the questions' clips from another cache (a separate test corpus); one lacking them is refused
    small = fake_cache(root / "bench_small_cache", rows[:3], informative=False)
    assert main(["texture", "--run", str(root / "run"), "--out", str(root / "bench2"), "--features", str(small.path)]) == 2
    assert "not in the feature cache" in capsys.readouterr().err



def test_greedy_answers_in_a_batch_match_each_question_alone(setup):
    """answerer() right-pads questions of different lengths in one batch and decodes them together;
    each answer must be what the question gets when it is asked alone."""
    root, rows, cache, cfg = setup
    model = build_model(cfg, cache, torch.device("cpu"))  # random: its answers differ per question
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:6]
    ask = answerer(model, cache, max_new_tokens=10)
    got = ask(qs)
    assert got == [ask([q])[0] for q in qs]
    assert len(set(got)) > 1  # not one answer for every question: the check compares something


def test_projector_only_keeps_the_lm_and_bad_input(setup):
    root, rows, cache, cfg = setup
    model = build_model(cfg, cache, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    proj = model.projector.fc2.weight.detach().clone()
    tune(replace(cfg, trainable="projector", steps=3, out=""), cache=cache, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.gpt.state_dict().items())
    assert not torch.equal(proj, model.projector.fc2.weight)
    with pytest.raises(ValueError, match="trainable"):
        tune(replace(cfg, trainable="lora"), cache=cache)
    with pytest.raises(ValueError, match="trainable"):  # changed after construction: tune checks again
        bad = replace(cfg)
        bad.trainable = "lora"
        tune(bad, cache=cache)
    with pytest.raises(ValueError, match=r"train.jsonl: row 1 is \d+ tokens with its audio, over the LM's sequence_len=16"):
        model.gpt.config.sequence_len = 16
        tune(cfg, cache=cache, model=model)
    small = fake_cache(root / "small_cache", rows[:4], informative=False)
    with pytest.raises(ValueError, match="not in the feature cache"):
        tune(cfg, cache=small)


def test_lora_adapters_train_the_base_stays_bit_identical_and_round_trip(setup):
    """The default, projector+lora: peft adapters on attention + MLP train, every base weight of the LM
    stays bit-identical, only the adapters are saved, and the reloaded run answers exactly as the trained one."""
    from omni.model.gpt import GPT
    from omni.model.lm import GPT_TARGETS, lora_parameters

    root, rows, cache, cfg = setup
    assert TuningConfig().trainable == "projector+lora" and cfg.trainable == "projector+lora"
    base = GPT.load(cfg.lm).state_dict()
    res = tune(replace(cfg, out=str(root / "lora_run"), steps=8), cache=cache)
    lora = lora_parameters(res.model.gpt)
    # adapters on every attention and MLP projection of the one block (c_proj is in both), A and B each
    modules = {n.split(".lora_")[0] for n in lora}
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(GPT_TARGETS) and len(modules) == 6 and len(lora) == 12
    moved = {n.split(".lora_")[0] for n, p in lora.items() if "lora_B" in n and p.abs().max() > 0}  # B starts at zero
    assert moved == modules
    # base weights: the same tensors, bit for bit (peft's base_layer names mapped back)
    after = {k.replace(".base_layer", ""): v for k, v in res.model.gpt.state_dict().items() if "lora_" not in k}
    assert set(after) == set(base) and all(torch.equal(base[k], after[k]) for k in base)
    out = root / "lora_run"
    assert (out / "lora.safetensors").is_file() and (out / "lora.json").is_file() and not (out / "lm").exists()
    assert json.loads((out / "audio_path.json").read_text())["lm"] == str(Path(cfg.lm).resolve())

    loaded, meta = load_run(out)
    assert meta["instruct"]["lora_rank"] == 16 and set(lora_parameters(loaded.gpt)) == set(lora)
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:8]
    got = answerer(res.model, cache, max_new_tokens=6)(qs)
    assert answerer(loaded, cache, max_new_tokens=6)(qs) == got
    # and the adapters matter: the same run without them answers differently
    bare, _ = load_run(out)
    with torch.no_grad():
        for n, p in lora_parameters(bare.gpt).items():
            if "lora_B" in n:
                p.zero_()
    assert answerer(bare, cache, max_new_tokens=6)(qs) != got


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, r"parameter `steps` = 0: must be >= 1"),
    ("lora_rank", 0, r"parameter `lora_rank` = 0: must be >= 1"),
    ("lora_alpha", 0.0, r"parameter `lora_alpha` = 0.0: must be > 0"),
    ("lora_dropout", 1.0, r"parameter `lora_dropout` = 1.0: must be in \[0, 1\)"),
    ("lr", -1.0, r"parameter `lr` = -1.0: must be > 0"),
    ("warmup", -1, r"parameter `warmup` = -1: must be >= 0"),
    ("trainable", "lora", r"parameter `trainable` = 'lora': must be one of projector, projector\+lora, projector\+lm"),
    ("layer", "top", r"parameter `layer` = 'top'"),
    ("projector", "mlp", r"parameter `projector`"),
    ("device", "tpu", r"parameter `device` = 'tpu'"),
])
def test_config_refuses_bad_values_naming_the_parameter(field, value, message):
    from omni.params import ParamError

    with pytest.raises((ParamError, ValueError), match=message):
        TuningConfig(**{field: value})
