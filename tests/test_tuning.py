"""Instruction tuning on a tiny random model: conversations parse with audio where the tag stands,
answers are tokenised as prose, the loss covers assistant tokens only (a mean per turn, then per
conversation), batches follow the task mix, a few steps lower the loss, greedy answers in a batch
match each question asked alone, a Hugging Face backbone goes the same way, and tuning can start from
an alignment run."""

import collections
import json
import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import pytest

from conftest import tiny_lm
from test_texture import fake_cache, fake_rows
from omni.data import audio
from omni.data.instructions import TEXTURE_TASKS, InstructionConfig, answer_value, build_instructions
from omni.data.manifest import write_manifest
from omni.eval.texture import load_questions
from omni.eval.texture_baselines import shuffled_questions
from omni.experiments.audio_run import load_run
from omni.experiments import plots
from omni.model.encoder import collate_states
from omni.experiments.tuning import (
    TuningConfig, answerer, assemble, build_model, conversation_batch, conversation_loss, draw, encode, mix_pools, prompt,
    question_conversation, read_conversations, tune,
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
    cfg = TuningConfig(instructions=str(root / "instr"), lm=str(tiny_lm(root / "lm")), layer="weighted", trainable="projector+lora",
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

    model = build_model(cfg, cache.n_states, cache.d_model, torch.device("cpu")).model
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
    assert torch.allclose(embeds[0, p : p + n], tokens[0, :n], atol=1e-5)
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


def test_few_steps_lower_the_loss_save_and_bench(setup, capsys, monkeypatch):
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
    # --ladder-per-task: the listening ladder of the saved run beside its benchmark (silence: the fake cache's shape, not Whisper's)
    from omni.experiments import instruct

    monkeypatch.setattr(instruct, "silence_states", lambda encoder: torch.zeros(cache.n_states, 5, cache.d_model, dtype=torch.float16))
    assert main(["texture", "--run", str(root / "run"), "--out", str(root / "bench3"), "--bench-per-task", "3", "--ladder-per-task", "10"]) == 0
    assert "the largest fall" in capsys.readouterr().out
    saved = json.loads((root / "bench3" / "ladder.json").read_text())
    assert [r["task"] for r in saved["table"]] == ["gender", "style"] and len(saved["where_lost"]) == 2
    assert all(0 <= r["answer"] <= 1 and r["questions"] <= 10 for r in saved["table"]) and (root / "bench3" / "ladder.png").stat().st_size > 1000
    assert main(["texture", "--run", str(root / "run"), "--out", str(root / "bench4"), "--ladder-per-task", "-1"]) == 2
    assert "--ladder-per-task" in capsys.readouterr().err and not (root / "bench4").exists()  # refused before any work



def test_greedy_answers_in_a_batch_match_each_question_alone(setup):
    """answerer() right-pads questions of different lengths in one batch and decodes them together;
    each answer must be what the question gets when it is asked alone."""
    root, rows, cache, cfg = setup
    model = build_model(cfg, cache.n_states, cache.d_model, torch.device("cpu")).model  # random: its answers differ per question
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:6]
    ask = answerer(model, cache, max_new_tokens=10)
    got = ask(qs)
    assert got == [ask([q])[0] for q in qs]
    assert len(set(got)) > 1  # not one answer for every question: the check compares something


def test_projector_only_keeps_the_lm_and_bad_input(setup):
    root, rows, cache, cfg = setup
    frozen = replace(cfg, trainable="projector", steps=3, out="")
    built = build_model(frozen, cache.n_states, cache.d_model, torch.device("cpu"))
    model = built.model
    before = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    proj = model.projector.fc2.weight.detach().clone()
    tune(frozen, cache=cache, built=built)
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
        tune(frozen, cache=cache, built=built)
    small = fake_cache(root / "small_cache", rows[:4], informative=False)
    with pytest.raises(ValueError, match="not in the feature cache"):
        tune(cfg, cache=small)


def test_lora_adapters_train_the_base_stays_bit_identical_and_round_trip(setup):
    """projector+lora (instruct.yaml's recipe): peft adapters on attention + MLP train, every base weight of the LM
    stays bit-identical, only the adapters are saved, and the reloaded run (adapters merged, for inference) answers
    exactly as the trained one."""
    from omni.model.gpt import GPT
    from omni.model.lm import GPT_TARGETS, lora_parameters

    root, rows, cache, cfg = setup
    assert cfg.trainable == "projector+lora"
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

    loaded, meta = load_run(out)  # for inference: the adapters folded into the weights they adapt
    assert meta["config"]["lora_rank"] == 16 and not lora_parameters(loaded.gpt)
    weights = loaded.gpt.state_dict()
    assert set(weights) == set(base) and {k.rsplit(".", 1)[0] for k in base if not torch.equal(weights[k], base[k])} == moved
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:8]
    got = answerer(res.model, cache, max_new_tokens=6)(qs)
    assert answerer(loaded, cache, max_new_tokens=6)(qs) == got
    # and the adapters matter: the same run on the base weights answers differently
    bare, _ = load_run(out)
    bare.gpt.load_state_dict(base)
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


# --- format, loss, mix, backbones, layout, watching, the start and the budget -----------------


PROSE = ["The voice was higher than usual, and then lower again.", "She spoke faster, then slower, then fast and slow.",
         "A high voice and a low voice: the female voice and the male voice.", "Is it higher or lower? It is higher.",
         "He ran fast; she walked slow; the high notes and the low notes."] * 20


def test_answers_are_tokenised_as_prose():
    """Unnatural tokenisation: the prompt ends with "Assistant:" (no lone space token) and the answer is
    " " + answer, so a BPE trained on prose reads it as the whole word it learned ("higher" with its
    space, not h|ig|her) and the first tokens of high/higher and low/lower differ."""
    from omni.model.tokenizer import BPETokenizer

    tok = BPETokenizer.train(PROSE, vocab_size=320)

    def answer_ids(word: str) -> tuple[list[int | Path], list[int], int]:
        items, turn = encode([("user", [Path("/a.wav"), "Is the voice higher or lower than usual?"]), ("assistant", [word])], tok)
        return items, [t for t, k in zip(items, turn) if k == 0], turn.index(0)

    items, trained, start = answer_ids("higher")
    assert trained == tok.encode(" higher") + [tok.eos_id] and len(trained) == 2  # one whole-word token, then EOS
    assert tok.decode(items[items.index(Path("/a.wav")) + 1 : start]) == " Is the voice higher or lower than usual?\nAssistant:"
    for a, b in (("higher", "high"), ("lower", "low")):  # whole words of this prose; without the space: hi|g|her and hi|g|h, low|er and low
        assert answer_ids(a)[1][0] != answer_ids(b)[1][0], (a, b)


def test_loss_weighs_each_turn_then_each_conversation_equally(setup):
    """Loss weighting: a 12-word transcript and a one-word answer weigh the same in a batch (the mean of
    per-conversation means), not by their token counts."""
    root, rows, cache, cfg = setup
    model = build_model(cfg, cache.n_states, cache.d_model, torch.device("cpu")).model
    a, b = Path(rows[0]["audio"]).resolve(), Path(rows[1]["audio"]).resolve()
    states = dict(zip([a, b], cache.load_states([0, 1])))
    convs = [[("user", [a, "Transcribe the audio."]), ("assistant", ["the cat sat on a mat while dogs ran far away from home"])],
             [("user", [b, "Is the voice male or female?"]), ("assistant", ["female"])]]
    loss, n = conversation_loss(model, convs, states)
    idx, embeds, targets, _ = conversation_batch(model, convs, states)
    with torch.no_grad():
        logits = model.gpt(idx, embeds=embeds)
    per = [F.cross_entropy(logits[i][targets[i] >= 0], targets[i][targets[i] >= 0]) for i in range(2)]
    assert torch.allclose(loss, (per[0] + per[1]) / 2)
    token_mean = F.cross_entropy(logits[targets >= 0], targets[targets >= 0])
    assert not torch.allclose(loss, token_mean, atol=1e-3) and n == int((targets >= 0).sum())


def test_batches_follow_the_task_mix_and_balance_answers():
    """Format collapse and the training prior: batches draw texture_share of their rows from the texture
    tasks, each task equally often, and within a task each answer equally often (the rows as written
    are 3:2 male and mostly yes/no or letters elsewhere); what tune draws."""
    rows = fake_rows({"train": 240})
    labels = build_instructions(rows, InstructionConfig(seed=0))["train"]
    written = collections.Counter(answer_value(r) for r in labels if r["task"] == "gender")
    assert written["male"] > 1.3 * written["female"]
    drawn = [labels[i] for i in draw(mix_pools(labels), 8000, 0.85, random.Random(0))]
    texture = [r for r in drawn if r["task"] in TEXTURE_TASKS]
    assert abs(len(texture) / len(drawn) - 0.85) < 0.02
    per_task = collections.Counter(r["task"] for r in texture)
    assert set(per_task) == set(TEXTURE_TASKS) and max(per_task.values()) < 1.2 * min(per_task.values())
    for task in TEXTURE_TASKS:
        answers = collections.Counter(answer_value(r) for r in texture if r["task"] == task)
        assert len(answers) >= 2 and max(answers.values()) < 1.3 * min(answers.values()), (task, answers)
    other = collections.Counter(r["task"] for r in drawn if r["task"] not in TEXTURE_TASKS)
    assert set(other) == {"transcribe", "last_word", "mention", "multi_turn", "describe"}
    plain = collections.Counter(answer_value(labels[i]) for i in draw(mix_pools(labels, balance_answers=False), 4000, 1.0, random.Random(0))
                                if labels[i]["task"] == "gender")
    assert plain["male"] > 1.2 * plain["female"]  # without balancing the written prior comes back


def test_a_hugging_face_backbone_trains_and_answers_through_the_same_path(setup, tmp_path):
    """Hugging Face backbones: HFLM.forward takes embeds=, so a tiny HF model (its BOS != EOS) tunes with
    LoRA and answers through the same code; answers end at the tokenizer's EOS, not at BOS."""
    from conftest import tiny_hf_lm

    root, rows, cache, cfg = setup
    hf = replace(cfg, lm=str(tiny_hf_lm(tmp_path / "hf", bos=True)), steps=3, lora_rank=4, out=str(tmp_path / "run"))
    res = tune(hf, cache=cache)
    model, tok = res.model, res.model.tokenizer
    assert tok.eos_id != tok.bos_id and res.val_loss == res.val_loss
    convs = read_conversations(root / "instr" / "train.jsonl")[:2]
    clips = [s for c in convs for _, segs in c for s in segs if isinstance(s, Path)]
    row_of = {Path(r["audio"]).resolve(): i for i, r in enumerate(rows)}
    states = dict(zip(clips, cache.load_states([row_of[c] for c in clips])))
    idx, embeds, targets, _ = conversation_batch(model, convs, states)
    for b in range(2):
        assert targets[b][targets[b] >= 0][-1].item() == tok.eos_id
    with torch.no_grad():  # embeds= is the same forward as idx= where the embeddings are the token's own
        ids = idx.clamp(min=0)
        torch.testing.assert_close(model.gpt(ids, embeds=model.gpt.embed(ids)), model.gpt(ids))
    stops = []
    generate = model.gpt.generate
    model.gpt.generate = lambda *a, **kw: stops.append(kw["stop_token"]) or generate(*a, **kw)
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:4]
    got = answerer(model, cache, max_new_tokens=4)(qs)
    assert len(got) == 4 and all(isinstance(a, str) for a in got) and set(stops) == {tok.eos_id}
    loaded, _ = load_run(tmp_path / "run")
    assert answerer(loaded, cache, max_new_tokens=4)(qs) == got


def test_cached_answers_equal_the_training_forward_on_a_nanochat_style_lm(setup, tmp_path):
    """Answers go through the LM's KV cache with the question as a left-padded prefix; the prefix carries
    its token ids (audio_idx), so a GPT with value embeddings computes exactly what training's forward
    does (greedy, token by token); without them it would read the question differently."""
    from omni.model.gpt import GPT, GPTConfig

    root, rows, cache, cfg = setup
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(sequence_len=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, value_embeds=True, ve_gate_channels=8,
                        lambdas=True, smear=True, smear_channels=8, smear_keys=True))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    gpt.save(tmp_path / "nano")
    model = build_model(replace(cfg, lm=str(tmp_path / "nano")), cache.n_states, cache.d_model, torch.device("cpu")).model
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:6]
    got = answerer(model, cache, max_new_tokens=4)(qs)
    row_of = {Path(r["audio"]).resolve(): i for i, r in enumerate(rows)}
    want = []
    for q in qs:
        conv = question_conversation(q)
        clips = [s for s in conv[0][1] if isinstance(s, Path)]
        states = dict(zip(clips, cache.load_states([row_of[c] for c in clips])))
        seq, new = prompt(conv, model.tokenizer), []
        for _ in range(4):
            idx, embeds, _, _ = assemble(model, [seq + new], states)
            with torch.no_grad():
                new.append(model.gpt(idx, embeds=embeds)[0, -1].argmax().item())
            if new[-1] == model.tokenizer.eos_id:
                new.pop()
                break
        want.append(model.tokenizer.decode(new).strip())
    assert got == want and len(set(got)) > 1
    generate = model.gpt.generate
    model.gpt.generate = lambda *a, audio_idx=None, **kw: generate(*a, **kw)  # the prefix's text as soft tokens only
    assert answerer(model, cache, max_new_tokens=4)(qs) != want


def test_the_voice_again_before_the_answer_is_read_alike_in_training_the_benchmark_and_the_chat(setup, tmp_path):
    """voice_at_answer: the clip's voice tokens stand again right before "Assistant:" (never a target);
    the benchmark's cached greedy answers and the chat's (which reads the question, then [voice] and the
    role word, into the clip's cache) are what training's forward gives, token by token."""
    from types import SimpleNamespace

    from omni.experiments.tuning import Voice
    from omni.model.gpt import GPT, GPTConfig
    from omni.serve.chat_worker import run_alone
    from omni.serve.session import Clip, Session, sampling

    root, rows, cache, cfg = setup
    with pytest.raises(ValueError, match="voice_at_answer"):
        replace(cfg, voice_at_answer=True)  # needs voice tokens
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(sequence_len=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, value_embeds=True, ve_gate_channels=8,
                        lambdas=True, smear=True, smear_channels=8, smear_keys=True))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    gpt.save(tmp_path / "nano")
    vcfg = replace(cfg, lm=str(tmp_path / "nano"), voice_tokens=2, voice_at_answer=True)
    model = build_model(vcfg, cache.n_states, cache.d_model, torch.device("cpu")).model.eval()
    tok = model.tokenizer
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)[:6]
    row_of = {Path(r["audio"]).resolve(): i for i, r in enumerate(rows)}

    conv = question_conversation(qs[0]) + [("assistant", ["female"])]
    seq, turn = encode(conv, tok, voice_at_answer=True)
    (clip,) = [s for s in seq if isinstance(s, Path)]
    at = seq.index(Voice(clip))
    assert tok.decode(seq[at + 1 : at + 1 + len(tok.encode("Assistant:"))]) == "Assistant:" and turn[at] == -1
    states = {clip: cache.load_states([row_of[clip]])[0]}
    idx, embeds, _, n_tok = assemble(model, [seq], states)
    start = seq.index(clip)  # one item per token before the clip
    voice = embeds[0, start : start + 2]  # the clip's tokens begin with its voice tokens
    pos = at - 1 + n_tok[clip]  # the Voice item, past the clip's tokens
    assert n_tok[Voice(clip)] == 2 and torch.equal(embeds[0, pos : pos + 2], voice) and bool((idx[0, pos : pos + 2] < 0).all())
    _, _, targets, _ = conversation_batch(model, [conv], states)
    assert bool((targets[0, pos - 1 : pos + 2] < 0).all())  # nothing predicts the voice

    def forward_answer(conv: list, states: dict, n: int = 4) -> str:
        seq, new = prompt(conv, tok, voice_at_answer=True), []
        for _ in range(n):
            idx, embeds, _, _ = assemble(model, [seq + new], states)
            with torch.no_grad():
                new.append(model.gpt(idx, embeds=embeds)[0, -1].argmax().item())
            if new[-1] == tok.eos_id:
                new.pop()
                break
        return tok.decode(new).strip()

    want = [forward_answer(question_conversation(q), {c: cache.load_states([row_of[c]])[0] for c in question_conversation(q)[0][1]
                                                        if isinstance(c, Path)}) for q in qs]
    assert answerer(model, cache, max_new_tokens=4)(qs) == want and len(set(want)) > 1

    session = Session(model, SimpleNamespace(source=""), recipe="tuning")
    for q in qs[:3]:
        c = Path(q["audios"][0]).resolve()
        states = {c: cache.load_states([row_of[c]])[0]}
        hidden, frames = collate_states([states[c].float()])
        clip = Clip("x.wav", 1.0, torch.zeros(1, 0, 32), 0.0, tokens=model.audio_tokens(hidden, frames)[0])
        clip.head, clip.head_ids = session.head(clip)
        text = "Is the voice male or female?"
        events = list(run_alone(session.answer(session.check(text, clip, 4), clip, sampling(max_new_tokens=4), 0.0), session.step))
        assert events[-1]["text"].strip() == forward_answer([("user", [c, text])], states)


def test_a_question_written_audio_last_is_asked_audio_last(setup):
    """Layout drift: load_questions keeps the user turn's order ("segments"), the answerer asks it so,
    and shuffled audio swaps the clip in place."""
    root, rows, cache, cfg = setup
    qs = load_questions(root / "instr" / "test.jsonl", check_audio=False)
    last = [q for q in qs if isinstance(q["segments"][0], str)]
    first = [q for q in qs if isinstance(q["segments"][0], int)]
    assert last and first
    raw = {json.loads(line)["conversations"][0]["value"] for line in (root / "instr" / "test.jsonl").read_text().splitlines()}
    tok = build_model(cfg, cache.n_states, cache.d_model, torch.device("cpu")).model.tokenizer
    for q in last[:3]:
        assert any(v.startswith(q["segments"][0]) and v.endswith("</audio>") for v in raw)
        conv = question_conversation(q)
        assert [type(s) for s in conv[0][1]] == [str] + [type(Path())] * len(q["audios"])
        seq = prompt(conv, tok)  # the clips come after the question's words, right before "\nAssistant:"
        p = next(i for i, t in enumerate(seq) if isinstance(t, Path))
        assert p > 5 and tok.decode([t for t in seq[p:] if isinstance(t, int)]) == "\nAssistant:"
        moved = question_conversation(shuffled_questions([q] + first[:5], seed=0)[0])
        assert isinstance(moved[0][1][0], str) and moved[0][1][-1] != conv[0][1][-1]


def test_tuning_watches_held_out_voices_at_every_evaluation(setup):
    """Validation: every evaluation logs the val loss (per conversation), the val loss of the texture
    questions alone and what the watcher measures: per task, accuracy with the right and with shuffled
    audio on held-out voices."""
    from omni.experiments.instruct import watcher

    root, rows, cache, cfg = setup

    class Recorder:
        def __init__(self):
            self.logged = []

        def log_metrics(self, m, step=None):
            self.logged.append((step, dict(m)))

        def flush(self):
            pass

    qs = [q for q in load_questions(root / "instr" / "test.jsonl", check_audio=False) if q["task"] in ("gender", "style")][:8]
    rec = Recorder()
    res = tune(replace(cfg, steps=4, eval_every=2), cache=cache, tracker=rec, watch=watcher(cache, qs, seed=0))
    assert [e["step"] for e in res.history.evals] == [1, 3]
    keys = {"val_loss", "val_texture_loss", "watch_texture", "watch_shuffled_texture", "watch_gender", "watch_shuffled_gender"}
    assert all(keys <= set(e) for e in res.history.evals)
    assert [s for s, m in rec.logged if "watch_gender" in m] == [1, 3]


def test_tuning_starts_from_an_alignment_run(tiny_alignment, tmp_path, capsys):
    """The projector's starting point: `run` names an alignment run; its audio path (weights, layer
    choice, k, projector kind) is where tuning starts, whatever the config's own shape says."""
    from safetensors.torch import load_file

    from omni.data.instructions import write_instructions

    write_instructions(InstructionConfig(corpus=str(tiny_alignment.corpus), out=str(tmp_path / "instr"), tasks=("gender",), chains=0))
    cfg = TuningConfig(instructions=str(tmp_path / "instr"), lm=str(tiny_alignment.lm), run=str(tiny_alignment.run),
                       layer="last", k=2, device="cpu")
    model = build_model(cfg, tiny_alignment.cache.n_states, tiny_alignment.cache.d_model, torch.device("cpu")).model
    aligned = tiny_alignment.result.model.config
    assert (model.config.layer, model.config.k, model.config.projector) == (aligned.layer, aligned.k, aligned.projector)
    assert "the audio path starts from it" in capsys.readouterr().out
    saved = load_file(tiny_alignment.run / "model" / "audio_path.safetensors")
    now = {f"projector.{k}": v for k, v in model.projector.state_dict().items()} | {f"select.{k}": v for k, v in model.select.state_dict().items()}
    assert set(saved) == set(now) and all(torch.equal(saved[k], now[k]) for k in saved)


@pytest.mark.parametrize("trainable", ["projector+lora", "projector+lm"])
def test_a_tuned_run_is_read_like_any_run_by_transcribe_and_chat(tiny_alignment, tmp_path, capsys, trainable):
    """One save and one load: a tuned run, started from an alignment run, says in audio_path.json what
    an alignment run says (encoder, mode, LM, what it saved), and `omni transcribe` and `omni chat --cli`
    read it with no special case."""
    from omni.cli import main
    from omni.data.instructions import write_instructions

    write_instructions(InstructionConfig(corpus=str(tiny_alignment.corpus), out=str(tmp_path / "instr"), tasks=("gender",), chains=0))
    out = tmp_path / "tuned"
    cfg = TuningConfig(instructions=str(tmp_path / "instr"), run=str(tiny_alignment.run), trainable=trainable, steps=2, batch_size=4,
                       eval_every=0, features=str(tiny_alignment.cache.path), device="cpu", out=str(out))
    tune(cfg, cache=tiny_alignment.cache)
    meta = json.loads((out / "audio_path.json").read_text())
    aligned = json.loads((tiny_alignment.run / "model" / "audio_path.json").read_text())
    assert meta["recipe"] == "tuning" and aligned["recipe"] == "alignment"
    for key in ("encoder", "encoder_mode", "load_in", "speech_lm", "n_states", "d_whisper", "layout"):
        assert meta[key] == aligned[key], key
    assert meta["saved"] == (["audio_path", "lora"] if trainable == "projector+lora" else ["audio_path", "lm"])
    clip = str(tiny_alignment.corpus / json.loads((tiny_alignment.corpus / "test.jsonl").read_text().splitlines()[0])["audio"])
    capsys.readouterr()
    assert main(["transcribe", "--run", str(out), clip]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(clip + "\t")
    assert main(["chat", "--run", str(out), "--cli", clip, "--max-new-tokens", "5", "--question", "Is the voice male or female?"]) == 0
    assert capsys.readouterr().out.startswith(f"{clip}: ")
    # the chat asks a tuned run in the conversation format it was trained on, its clip where the tag would stand
    from omni.serve.session import Session, load_model

    session = Session(*load_model(str(out)))
    assert session.tuned
    c = next(session.encode(audio.load(clip), "x.wav"))
    idx = session.check("Is the voice male or female?", c, 5)
    tok = session.tokenizer
    ids = c.head_ids  # what the clip's cache holds: [BOS]User: and the audio tokens; the question comes after
    audio_at = [i for i, t in enumerate(ids) if t < 0]
    assert len(audio_at) == c.tokens.size(1) and audio_at == list(range(audio_at[0], len(ids)))
    assert ids[0] == tok.bos_id and tok.decode(ids[1 : audio_at[0]]) == "User:"
    assert tok.decode(idx[0].tolist()) == " Is the voice male or female?\nAssistant:"
    assert c.head.pos == len(ids)  # read once, on upload


def test_perception_first_trains_on_voice_captions_before_any_question(setup, monkeypatch):
    import omni.experiments.tuning as tuning

    root, rows, cache, cfg = setup
    sets = build_instructions(rows, InstructionConfig(seed=0, tasks=TASKS + ("describe",), chains=0))
    write_manifest(root / "captions" / "train.jsonl", sets["train"])
    seen = []
    real = tuning.conversation_loss
    monkeypatch.setattr(tuning, "conversation_loss", lambda m, convs, st: seen.append(convs) or real(m, convs, st))
    tune(replace(cfg, instructions=str(root / "captions"), trainable="projector", steps=4, perception_steps=2, eval_every=0), cache=cache)
    answers = [[turn[1][0] for turn in conv if turn[0] in ("assistant", "gpt")] for step in seen for conv in step]
    per_step = [answers[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(4)]
    captions = {q["answer"] for q in sets["train"] if q["task"] == "describe"}
    assert all(a[0] in captions for a in per_step[0] + per_step[1])  # the first two steps: captions only
    assert any(a[0] not in captions for a in per_step[2] + per_step[3])  # then the task mix
    with pytest.raises(ValueError, match="no voice captions"):
        tune(replace(cfg, trainable="projector", steps=2, perception_steps=1), cache=cache)


def test_defaults_are_a_budget_that_can_listen(tmp_path, monkeypatch):
    """Budget: the default run draws about 500 conversations per texture task (150 x 8 with every task
    alike drew about 100), evaluates while it trains, benchmarks 150 questions per task and watches
    held-out clips; the LM is the committed models/lm, and a missing one is an error saying how to make one."""
    from omni.experiments.instruct import InstructConfig
    from omni.experiments.audio_run import require_lm

    cfg = InstructConfig()
    per_task = cfg.steps * cfg.batch_size * cfg.texture_share / len(TEXTURE_TASKS)
    assert per_task >= 500 and cfg.eval_every and cfg.steps // cfg.eval_every >= 4
    assert cfg.bench_per_task >= 150 and cfg.watch_clips > 0 and cfg.balance_answers and cfg.lm == "models/lm"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"parameter `lm` = 'models/lm': no LM there.*pretrain_lm.yaml"):
        require_lm("models/lm")


def test_the_ladder_finds_the_voice_in_the_states_and_reads_every_rung(setup):
    """omni.experiments.ladder on the fake cache, whose state 1 encodes gender and accent: the probe on the
    states the projector reads finds gender, every rung and control is measured, attention shares are shares."""
    from omni.experiments.ladder import RUNGS, run_ladder

    root, rows, cache, cfg = setup
    model = build_model(cfg, cache.n_states, cache.d_model, torch.device("cpu")).model
    train_q = load_questions(root / "instr" / "train.jsonl", check_audio=False)
    test_q = load_questions(root / "instr" / "test.jsonl", check_audio=False)
    silence = torch.zeros(cache.n_states, 5, cache.d_model, dtype=torch.float16)
    ladder = run_ladder(model, cache, train_q, test_q, silence=silence, per_task=40, seed=0)
    assert ladder.tasks == ["gender", "style"]  # the required tasks this instruction set asks (accent, rate, pitch: not in TASKS here)
    assert ladder.accuracy["whisper"]["gender"] >= 0.9  # the voice is in the states
    assert all(0 <= ladder.accuracy[r][t] <= 1 for r in RUNGS for t in ladder.tasks)
    assert set(ladder.margin) == set(ladder.answer_accuracy) == {"own", "shuffled", "silence"}
    assert all(0 < ladder.attention[t] <= 1 for t in ladder.tasks) and ladder.n_test["gender"] > 0
    rows_out = ladder.table()
    assert [r["task"] for r in rows_out] == ["gender", "style"] and "answer, silence" in rows_out[0]
    assert ladder.where_lost() and "ladder.whisper.gender" in ladder.metrics()
    assert ladder.voice == {} and "voice_tokens" not in rows_out[0] and ladder.chance["gender"] == 0.5 and 0.25 <= ladder.chance["style"] <= 0.5
    # with voice tokens: a probe on them alone, beside the audio tokens (which no longer count them)
    vmodel = build_model(replace(cfg, voice_tokens=2), cache.n_states, cache.d_model, torch.device("cpu")).model
    vladder = run_ladder(vmodel, cache, train_q, test_q, per_task=40, seed=0)
    assert set(vladder.voice) == {"gender", "style"} and vladder.voice["gender"] >= 0.8  # the pool reads every state, state 1 among them
    assert "voice_tokens" in vladder.table()[0] and "ladder.voice_tokens.gender" in vladder.metrics()
    better = "voice_tokens" if vladder.voice["gender"] > vladder.accuracy["audio_tokens"]["gender"] else "audio_tokens"
    assert f"{better} {max(vladder.voice['gender'], vladder.accuracy['audio_tokens']['gender']):.2f}" in vladder.where_lost()[0]
    fig = plots.ladder(vladder.table())
    assert len(fig.axes[0].get_xticklabels()) == 5  # four rungs and the shuffled control (no silence asked here)
