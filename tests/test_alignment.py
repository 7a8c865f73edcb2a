"""omni.experiments.alignment on a tiny synthesized corpus (4 held-out clips), its feature cache and a random 1-layer LM
(the `tiny_alignment` fixture in conftest.py): what a run reports, that a saved run transcribes raw
audio as the run decoded its cached states, prompts on either side of the audio, fail-fast parameter
errors, and Whisper's own transcripts cached next to the features."""

import json
import math
from dataclasses import replace

import pytest
import torch

from omni.data import audio
from omni.data.features import FeatureCache
from omni.eval import metrics
from omni.eval.yardstick import whisper_hyps
from omni.experiments import alignment
from omni.experiments.alignment import AlignConfig, decode
from omni.experiments.audio_run import load_run, run_encoder, transcribe_waves
from omni.model.encoder import collate_states


def load_with_encoder(run):
    """(model, the run's Whisper encoder, its mode): what `omni transcribe --run` loads."""
    model, meta = load_run(run)
    return (model, *run_encoder(meta, model.gpt_device))


def test_run_reports_scores_curves_and_layer_weights(tiny_alignment):
    res, cache, cfg = tiny_alignment.result, tiny_alignment.cache, tiny_alignment.cfg
    s = res.metrics()
    for key in ("wer", "cer", "control_wer", "test_loss", "wer_seen_voice", "train_seconds", "load_seconds",
                "decode_seconds_per_clip", "tokens_per_s", "step_seconds", "skipped_steps", "best_eval_step", "seconds_to_best"):
        assert math.isfinite(s[key]), key
    assert (s["n_train"], s["n_test"]) == (len(cache.select(split="train")), len(cache.select(split="test"))) == (11, 4)
    assert s["skipped_steps"] == 0 and s["best_eval_step"] in (5, 10) and "whisper_wer" not in s
    assert len(res.history.loss) == 10 and all(math.isfinite(v) for v in res.history.loss)
    refs = [cache.rows[r]["text"] for r in cache.select(split="test")]
    assert res.test.refs == refs and len(res.test.hyps) == len(res.test.control_hyps) == 4
    assert s["wer"] == metrics.wer(refs, res.test.hyps) and s["control_wer"] == metrics.wer(refs, res.test.control_hyps)
    # the yardstick: guarded by default, the greedy pass kept, medians, clear speech apart, a table per label
    assert s["unguarded_wer"] == metrics.wer(refs, res.test.systems["unguarded"]) and s["median_wer"] == metrics.median_wer(refs, res.test.hyps)
    assert 0 <= s["fallback_fraction"] <= 1 and s["control_median_wer"] == metrics.median_wer(refs, res.test.control_hyps)
    labels = [r["labels"] for r in res.test.rows]
    clear = [i for i, r in enumerate(labels) if r["style"] == "normal"]
    assert s["n_clear"] == len(clear) and res.test.clear_variants == sorted({labels[i]["variant"] for i in clear})
    if clear:
        assert s["clear_wer"] == metrics.wer([refs[i] for i in clear], [res.test.hyps[i] for i in clear])
    table = {(r["by"], r["group"], r["system"]): r for r in res.test.table}
    assert table[("all", "all", "ours")]["wer"] == s["wer"] and table[("all", "all", "control")]["n"] == 4
    assert {r["by"] for r in res.test.table} >= {"style", "variant", "rate_bucket", "pitch_bucket"}
    # the WER-vs-steps curve and the learned layer mix, at each evaluation (every 5 steps)
    assert [step for step, _ in res.wer_curve] == [5, 10] and all(w >= 0 for _, w in res.wer_curve)
    assert [e["step"] + 1 for e in res.history.evals] == [5, 10]
    assert len(res.layer_weights_history) == 2
    for w in res.layer_weights_history:
        assert len(w) == cache.n_states and sum(w) == pytest.approx(1.0, abs=1e-5)
    assert max(abs(x - 1 / cache.n_states) for x in res.layer_weights_history[-1]) > 0  # the mix trained
    assert res.history.evals[-1][f"layer_weight.{cache.n_states - 1}"] == res.layer_weights_history[-1][-1]
    # the run folder: the audio path's weights, where they came from, and the resume state
    model_dir = tiny_alignment.run / "model"
    meta = json.loads((model_dir / "audio_path.json").read_text())
    assert meta["speech_lm"]["layer"] == "weighted" and meta["n_states"] == cache.n_states
    assert meta["encoder"] == "tiny.en" and meta["encoder_mode"] == "var" and meta["config"]["steps"] == cfg.steps and meta["recipe"] == "alignment"
    assert (model_dir / "audio_path.safetensors").is_file() and (model_dir / "resume" / "train_state.json").is_file()


def test_saved_run_transcribes_raw_audio_like_the_run_decoded_its_cache(tiny_alignment):
    res, cache = tiny_alignment.result, tiny_alignment.cache
    model, encoder, mode = load_with_encoder(tiny_alignment.run)  # a report folder holding model/
    assert mode == "var" and not model.training
    for a, b in zip(res.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    rows = cache.select(split="test")
    waves = [audio.load(cache.rows[r]["audio"]) for r in rows]
    hyps = transcribe_waves(model, encoder, waves, mode=mode, batch_size=3, max_new_tokens=tiny_alignment.cfg.max_new_tokens)

    # The run decoded float16 cached states; transcribe_waves runs the float32 encoder on the wavs.
    # Their audio prefixes differ by float16 rounding only, far less than two clips' prefixes differ;
    # a greedy step whose top two logits are that close could still flip, so "most", not "all".
    cached, lengths = collate_states([s.float() for s in cache.load_states(rows)])
    fresh, fresh_lengths = collate_states(encoder.encode(waves))
    assert torch.equal(lengths, fresh_lengths)
    with torch.no_grad():
        p_cached, mask = model.prefix(cached, lengths)
        p_fresh, _ = model.prefix(fresh, fresh_lengths)
        idx = torch.full((len(rows), 1), model.tokenizer.bos_id)
        logits_cached = model.gpt(idx, audio=p_cached, audio_mask=mask)[:, -1]
        logits_fresh = model.gpt(idx, audio=p_fresh, audio_mask=mask)[:, -1]
    rounding = (logits_cached - logits_fresh).abs().max().item()
    between_clips = (logits_cached - logits_cached.roll(1, dims=0)).abs().max().item()
    print(f"logits: float16 cache vs float32 encoder differ by {rounding:.2e}, two clips by {between_clips:.2e}")
    assert rounding < 1e-2 and between_clips > 100 * rounding, (rounding, between_clips)
    same = sum(a == b for a, b in zip(hyps, res.test.systems["unguarded"]))  # transcribe_waves decodes greedily by default
    assert same >= len(hyps) - 1, list(zip(hyps, res.test.systems["unguarded"]))


def test_shuffled_control_gives_every_clip_another_clips_audio():
    class Echo:  # a stand-in model: "transcribes" a clip as the id written into its states
        gpt_device = torch.device("cpu")

        def eval(self):
            return self

        def hypotheses(self, hidden, lengths, max_new_tokens, guard, decoding):
            return [str(int(h[0, 0, 0])) for h in hidden]

    states = [torch.full((1, 2 + i % 3, 1), float(i)) for i in range(7)]
    rows = list(range(7))
    assert decode(Echo(), None, rows, states, 3, 1) == [str(i) for i in rows]
    for seed in range(20):
        heard = [int(h) for h in decode(Echo(), None, rows, states, 3, 1, shuffle_seed=seed)]
        assert sorted(heard) == rows and all(h != i for i, h in enumerate(heard)), (seed, heard)
        assert heard == [int(h) for h in decode(Echo(), None, rows, states, 2, 1, shuffle_seed=seed)]


@pytest.mark.parametrize("position", ["before", "after"])
def test_prompt_before_or_after_the_audio(tiny_alignment, tmp_path, position):
    cache = tiny_alignment.cache
    cfg = replace(tiny_alignment.cfg, layer="last", prompt="Transcribe:", prompt_position=position, steps=2,
                  eval_every=0, eval_clips=2, max_new_tokens=6, out=str(tmp_path / "model"))
    res = alignment.run(cfg, cache=cache)
    assert math.isfinite(res.scores["test_loss"]) and len(res.test.hyps) == 4
    model, encoder, mode = load_with_encoder(tmp_path / "model")
    assert (model.config.prompt, model.config.prompt_position) == ("Transcribe:", position)
    rows = cache.select(split="test")[:2]
    hidden, lengths = collate_states([s.float() for s in cache.load_states(rows)])
    prefix, _ = model.prefix(hidden, lengths)
    idx, targets = model.text_batch(["a b"], "cpu")
    n_prompt = len(model.tokenizer.encode("Transcribe:"))
    n_audio = int(model.projector.token_lengths(lengths).max())
    if position == "before":  # inside the soft prefix, as embeddings of its tokens
        assert prefix.size(1) == n_audio + n_prompt and idx.size(1) == 1 + 3
    else:  # after the audio: ordinary tokens whose targets are ignored
        assert prefix.size(1) == n_audio and idx.size(1) == n_prompt + 1 + 3
        assert (targets[0, :n_prompt] == -1).all()
    waves = [audio.load(cache.rows[r]["audio"]) for r in rows]
    hyps = transcribe_waves(model, encoder, waves, mode=mode, max_new_tokens=6)
    assert sum(a == b for a, b in zip(hyps, res.test.systems["unguarded"][:2])) >= 1


def test_bad_parameters_fail_before_any_work(tiny_alignment, tmp_path, monkeypatch):
    import omni.experiments.audio_run

    def no_lm(*a, **k):
        raise AssertionError("a bad parameter must be reported before an LM is loaded")

    monkeypatch.setattr(omni.experiments.audio_run, "load_lm", no_lm)
    missing = dict(corpus=str(tmp_path / "no-corpus"), lm=str(tmp_path / "no-lm"), device="cpu")
    with pytest.raises(ValueError, match="parameter `layer` = 'lats'"):  # when the config is built, before any work
        alignment.run(AlignConfig(layer="lats", **missing))
    with pytest.raises(ValueError, match="parameter `projector`"):
        alignment.run(AlignConfig(projector="mlp", **missing))
    with pytest.raises(ValueError, match="parameter `prompt_position`"):
        alignment.run(AlignConfig(prompt_position="middle", **missing))
    with pytest.raises(ValueError, match="parameter `trainable`"):
        alignment.run(AlignConfig(trainable="lm", **missing))
    # the range of an index: known for the embedded encoder when the config is built ...
    with pytest.raises(ValueError, match=r"parameter `layer` = '9': must be a state index of tiny.en: 0..4"):
        replace(tiny_alignment.cfg, layer="9")
    # ... and for any other encoder once its cache is open, before the LM
    with pytest.raises(ValueError, match="layer='9' is out of range"):
        alignment.run(replace(tiny_alignment.cfg, encoder="some/other-whisper", layer="9", lm=str(tmp_path / "no-lm")), cache=tiny_alignment.cache)


def test_projector_plus_lm_trains_the_lm_and_the_run_carries_it(tiny_alignment, tmp_path):
    from omni.model.lm import load_lm

    cfg = replace(tiny_alignment.cfg, trainable="projector+lm", layer="last", steps=4, eval_every=4, out=str(tmp_path / "model"))
    res = alignment.run(cfg, cache=tiny_alignment.cache)
    original, _ = load_lm(cfg.lm, torch.device("cpu"))
    changed = [n for n, p in res.model.gpt.named_parameters() if not torch.equal(p.detach(), original.state_dict()[n])]
    assert changed, "the LM did not train"
    meta = json.loads((tmp_path / "model" / "audio_path.json").read_text())
    assert meta["lm"] == "lm" and meta["saved"] == ["audio_path", "lm"]  # its own copy (relative to the run), not the frozen original
    model, _, _ = load_with_encoder(tmp_path / "model")
    for n, p in model.gpt.named_parameters():
        assert torch.equal(p, res.model.gpt.state_dict()[n])
    # the default leaves the LM exactly as pretrained
    frozen = tiny_alignment.result.model.gpt
    assert all(torch.equal(p, original.state_dict()[n]) for n, p in frozen.named_parameters())


def test_whisper_baseline_is_cached_next_to_the_features(tiny_alignment, tmp_path, monkeypatch):
    import omni.eval.yardstick
    from omni.model.speech_lm import LoopGuard

    cache = tiny_alignment.cache
    calls = []
    real = omni.eval.yardstick.whisper_transcribe

    def counting(model, processor, waves, **kw):
        calls.append((len(waves), "temperature" in kw))
        return real(model, processor, waves, **kw)

    monkeypatch.setattr(omni.eval.yardstick, "whisper_transcribe", counting)
    rows = cache.select(split="test")
    refs = [cache.rows[r]["text"] for r in rows]
    first = whisper_hyps(cache, rows[:3], "tiny.en")
    stored = json.loads((cache.path / "whisper_hyps.tiny.en.greedy.json").read_text())
    assert calls == [(3, False)] and stored == {cache.rows[r]["audio"]: h for r, h in zip(rows[:3], first)}
    # no quality bar: tiny.en on 1-2 s clips of held-out espeak-ng voices is often far off
    assert all(isinstance(h, str) and h for h in first)

    # the alignment's (unguarded) baseline decodes only the clip not cached yet ...
    res = alignment.run(replace(tiny_alignment.cfg, whisper_baseline=True, guard=False, steps=1, eval_clips=1, out=""), cache=cache)
    whisper = res.test.systems["whisper"]
    assert calls == [(3, False), (1, False)] and whisper[:3] == first
    assert res.scores["whisper_wer"] == metrics.wer(refs, whisper)
    assert res.scores["whisper_cer"] == metrics.cer(refs, whisper)
    assert res.scores["whisper_median_wer"] == metrics.median_wer(refs, whisper)

    # ... other decoding settings are another cache file: the guard decodes again, with the fallback
    guarded = whisper_hyps(cache, rows[:2], "tiny.en", LoopGuard())
    assert calls[2:] == [(2, True)] and len(guarded) == 2
    assert len(list(cache.path.glob("whisper_hyps.tiny.en.guard-*.json"))) == 1

    # ... and a later call runs no Whisper at all, even through a view that numbers the rows differently
    monkeypatch.setattr(omni.eval.yardstick, "load_whisper_model", lambda *a: pytest.fail("Whisper loaded again"))
    assert whisper_hyps(cache, rows, "tiny.en") == whisper and len(calls) == 3
    view = FeatureCache(cache.path, dict(cache.index, rows=[cache.rows[r] for r in reversed(rows)]))
    assert whisper_hyps(view, [0, 1, 2, 3], "tiny.en") == whisper[::-1]
    assert whisper_hyps(view, [3, 2], "tiny.en", LoopGuard()) == guarded


def test_interrupted_alignment_resumes_bit_identical(tiny_alignment, tmp_path, monkeypatch):
    """A run that dies after its step-2 checkpoint and is rerun in the same folder ends with the same
    audio path as a run that never stopped: batches are a function of the step, not of history."""
    from dataclasses import replace

    import omni.experiments.alignment as align
    from safetensors.torch import load_file

    real_train = align.train

    def dies_then_reruns(params, loss_fn, cfg, *args, **kwargs):
        def dying(step):
            if step == 3:
                raise KeyboardInterrupt  # killed after the checkpoint of step 2 (next step 2)
            return loss_fn(step)

        with pytest.raises(KeyboardInterrupt):
            real_train(params, dying, cfg, *args, **kwargs)
        return real_train(params, loss_fn, cfg, *args, **kwargs)  # the rerun: resumes from the checkpoint

    base = replace(tiny_alignment.cfg, steps=6, eval_every=2, eval_clips=1, layer="weighted")
    align.run(replace(base, out=str(tmp_path / "straight")), cache=tiny_alignment.cache)
    monkeypatch.setattr(align, "train", dies_then_reruns)
    align.run(replace(base, out=str(tmp_path / "resumed")), cache=tiny_alignment.cache)
    a = load_file(tmp_path / "straight" / "audio_path.safetensors")
    b = load_file(tmp_path / "resumed" / "audio_path.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# --- the yardstick: the loop guard, scores per group, Whisper under the same guard ----------------


def _tiny_speech_lm(tmp_path):
    from conftest import tiny_lm

    from omni.model.gpt import GPT
    from omni.model.speech_lm import SpeechLM, SpeechLMConfig
    from omni.model.tokenizer import ByteTokenizer

    gpt = GPT.load(tiny_lm(tmp_path / "lm"))
    torch.manual_seed(0)
    model = SpeechLM(gpt, ByteTokenizer(), n_states=2, d_whisper=8, config=SpeechLMConfig(k=2)).eval()
    hidden = torch.randn(2, 2, 10, 8)
    return model, hidden, torch.tensor([10, 6])


def test_guard_re_decodes_a_looping_clip_and_not_a_clean_one(tmp_path, monkeypatch):
    from omni.model.speech_lm import LoopGuard, compression_ratio

    model, hidden, lengths = _tiny_speech_lm(tmp_path)
    tok, bos = model.tokenizer, model.tokenizer.bos_id
    loop, clean, sampled = "the more " * 8, "a clean sentence", "the more of it"
    calls = []

    def fake_generate(idx, audio, audio_mask, max_new_tokens, stop_token, temperature, seed):
        calls.append((temperature, idx.size(0), seed))
        texts = [loop, clean] if temperature == 0 else [sampled] * idx.size(0)
        width = max(len(t) for t in texts) + 1
        return torch.tensor([(tok.encode(t) + [bos] * width)[:width] for t in texts])

    monkeypatch.setattr(model.gpt, "generate", fake_generate)
    guard = LoopGuard(logprob_threshold=-math.inf, seed=5)  # the repetition test alone
    hyps = model.hypotheses(hidden, lengths, max_new_tokens=80, guard=guard)
    assert calls == [(0.0, 2, None), (0.2, 1, 6)]  # only the looping clip, seeded sampling at the next temperature
    assert [h.text for h in hyps] == [sampled, clean]
    assert (hyps[0].greedy, hyps[0].temperature, hyps[0].attempts) == (loop, 0.2, 2)
    assert hyps[0].compression_ratio == compression_ratio(sampled) and hyps[0].compression_ratio <= 2.4
    assert (hyps[1].greedy, hyps[1].temperature, hyps[1].attempts) == (clean, 0.0, 1)
    # no guard: one greedy pass, the loop stays
    calls.clear()
    assert model.transcribe(hidden, lengths, max_new_tokens=80) == [loop, clean] and calls == [(0.0, 2, None)]


def test_guard_on_low_log_probability_tries_every_temperature_and_is_deterministic(tmp_path):
    from omni.model.speech_lm import LoopGuard

    model, hidden, lengths = _tiny_speech_lm(tmp_path)
    # a random byte LM is never confident (mean log-prob near -ln 257): every temperature is tried
    guard = LoopGuard(compression_ratio_threshold=math.inf, logprob_threshold=-1.0)
    hyps = model.hypotheses(hidden, lengths, max_new_tokens=12, guard=guard)
    assert [h.attempts for h in hyps] == [6, 6] and all(h.avg_logprob < -1 for h in hyps)
    again = model.hypotheses(hidden, lengths, max_new_tokens=12, guard=guard)
    assert again == hyps  # seeded sampling: the same transcripts every run
    greedy = model.hypotheses(hidden, lengths, max_new_tokens=12)
    assert [h.greedy for h in hyps] == [h.text for h in greedy] and all(h.attempts == 1 for h in greedy)
    # when every temperature fails, the kept hypothesis is the likeliest of the six (no loop among them)
    lenient = LoopGuard(compression_ratio_threshold=math.inf, logprob_threshold=-math.inf)
    assert all(lenient.rank(h) >= lenient.rank(g) for h, g in zip(hyps, greedy))
    # a threshold every hypothesis passes: nothing is re-decoded
    assert [h.attempts for h in model.hypotheses(hidden, lengths, max_new_tokens=12, guard=lenient)] == [1, 1]


def test_mean_logprobs_match_the_training_loss(tmp_path):
    model, hidden, lengths = _tiny_speech_lm(tmp_path)
    prefix, mask = model.prefix(hidden, lengths)
    tok = model.tokenizer
    ids = [(tok.encode("ab c"), True), (tok.encode("xyz12"), False)]
    got = model.mean_logprobs(prefix, mask, ids)
    assert [n for _, n in got] == [5, 5]  # 4 bytes + the closing BOS; 5 bytes, not closed
    for i, (row, closed) in enumerate(ids):  # each row alone, through the loss the projector trains on
        idx = torch.tensor([[tok.bos_id] + row])
        targets = torch.tensor([row + ([tok.bos_id] if closed else [-1])])
        loss = model.gpt(idx, targets=targets, audio=prefix[i : i + 1], audio_mask=mask[i : i + 1])
        assert got[i][0] == pytest.approx(-loss.item(), abs=1e-5)


def test_score_table_and_content_scores_hand_computed():
    from omni.eval.yardstick import clear_rows, content_scores, score_table

    rows = [{"style": "normal", "variant": "f4"}, {"style": "whisper", "variant": "whisperf"}, {"style": "normal", "variant": "m4"}]
    refs = ["a b c d", "a b", "a b c"]
    systems = {"": ["a b c d", "", "a x x"], "whisper": ["a b c x", "a b", "a b c"]}
    assert clear_rows(rows) == [0, 2]
    s = content_scores(refs, systems, rows)
    assert s["n_clear"] == 2 and s["wer"] == pytest.approx(4 / 9) and s["whisper_wer"] == pytest.approx(1 / 9)
    assert s["median_wer"] == pytest.approx(2 / 3) and s["whisper_median_wer"] == 0.0
    assert s["clear_wer"] == pytest.approx(2 / 7) and s["clear_median_wer"] == pytest.approx(1 / 3)
    assert s["clear_whisper_wer"] == pytest.approx(1 / 7) and s["clear_whisper_median_wer"] == pytest.approx(1 / 8)
    table = score_table(refs, {"aligned": systems[""], "whisper": systems["whisper"]}, rows)
    assert {r["by"] for r in table} == {"all", "style", "variant"}  # labels the rows lack are skipped
    cell = {(r["by"], r["group"], r["system"]): r for r in table}
    assert cell[("style", "whisper", "aligned")]["wer"] == 1.0 and cell[("style", "whisper", "whisper")]["wer"] == 0.0
    assert cell[("variant", "m4", "aligned")]["wer"] == pytest.approx(2 / 3) and cell[("all", "all", "whisper")]["n"] == 3


def test_ctc_lever_pulls_audio_tokens_onto_the_words_embeddings(tmp_path):
    from omni.model.losses import ctc_embedding_loss

    model, hidden, lengths = _tiny_speech_lm(tmp_path)
    model.gpt.requires_grad_(False)  # frozen, as alignment.run leaves it
    texts = ["ab", "c"]
    loss = ctc_embedding_loss(model, hidden, lengths, texts)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()  # the gradient reaches the projector, not the frozen LM's table
    assert model.projector.fc2.weight.grad.abs().sum() > 0 and model.gpt.transformer.wte.weight.grad is None
    # audio tokens that ARE the words' embeddings, blanks between: a far lower loss than random ones
    tok, bos = model.tokenizer, model.tokenizer.bos_id
    emb = lambda ids: model.gpt.embed(torch.tensor([ids]))[0]
    A = int(model.projector.token_lengths(lengths).max())
    exact = []
    for t in texts:
        ids = [x for c in tok.encode(t) for x in (c, bos)]
        exact.append(torch.cat([emb(ids), emb([bos] * (A - len(ids)))]))
    # (the projector's output, from which SpeechLM.frames reads both the tokens and their logits)
    model.projector.forward = lambda x, n: (torch.stack(exact) * 4, model.projector.token_lengths(n))
    assert ctc_embedding_loss(model, hidden, lengths, texts).item() < 0.5 * loss.item()


def test_ctc_readout_spells_audio_tokens_that_are_word_embeddings(tmp_path):
    from omni.model.losses import ctc_readout

    model, hidden, lengths = _tiny_speech_lm(tmp_path)
    tok, bos = model.tokenizer, model.tokenizer.bos_id
    emb = lambda ids: model.gpt.embed(torch.tensor([ids]))[0]
    A = int(model.projector.token_lengths(lengths).max())
    texts = ["ab", "c"]
    rows = []
    for ids in ([tok.encode("a")[0], bos, tok.encode("b")[0], tok.encode("b")[0]], tok.encode("c") * 2 + [bos]):  # repeats collapse
        rows.append(torch.cat([emb(ids), emb([bos] * (A - len(ids)))]))
    model.projector.forward = lambda x, n: (torch.stack(rows[: x.size(0)]) * 4, model.projector.token_lengths(n))
    states = [hidden[i, :, : int(lengths[i])] for i in range(2)]
    assert ctc_readout(model, states, batch_size=2) == texts
    # random audio tokens spell something else
    del model.projector.forward
    assert ctc_readout(model, states, batch_size=2) != texts


def test_distill_loss_is_zero_when_the_audio_tokens_are_the_words_and_trains_the_projector(tmp_path):
    from omni.model.losses import distill_loss

    model, hidden, lengths = _tiny_speech_lm(tmp_path)
    model.gpt.requires_grad_(False)
    texts = ["ab", "c"]
    loss = distill_loss(model, hidden, lengths, texts)
    assert loss.item() > 1e-4
    loss.backward()
    assert model.projector.fc2.weight.grad.abs().sum() > 0 and model.gpt.transformer.wte.weight.grad is None
    # audio tokens that ARE the transcript's embeddings: the student is the teacher
    tok = model.tokenizer
    emb = lambda ids: model.gpt.embed(torch.tensor([ids]))[0]
    model.audio_tokens = lambda h, n: (torch.nn.utils.rnn.pad_sequence([emb(tok.encode(t)) for t in texts], batch_first=True),
                                       torch.tensor([len(tok.encode(t)) for t in texts]))
    assert distill_loss(model, hidden, lengths, texts).item() == pytest.approx(0.0, abs=1e-5)


def test_shipped_whisper_transcripts_spare_the_decode(tiny_alignment, tmp_path, monkeypatch):
    """A clip whose bytes match a shipped transcript (omni/eval/baselines, keyed by SHA-1) is not decoded;
    any other clip is, and a changed clip (other bytes) is not matched."""
    import shutil

    import omni.eval.yardstick as Y

    monkeypatch.setattr(Y, "BASELINES", tmp_path / "baselines")
    cache = tiny_alignment.cache
    rows = cache.select(split="test")[:3]
    monkeypatch.setattr(Y, "whisper_decode", lambda model, processor, waves, guard=None, batch_size=8: [f"w{len(w)}" for w in waves])
    monkeypatch.setattr(Y, "load_whisper_model", lambda *a: (None, None))
    shipped = Y.ship_hyps(cache, rows[:2], "tiny.en")
    assert sorted(json.loads(shipped.read_text())) == sorted(Y.audio_sha1(cache.rows[r]["audio"]) for r in rows[:2])

    fresh = FeatureCache(tmp_path / "fresh", dict(cache.index))  # another machine: same clips, empty cache folder
    (tmp_path / "fresh").mkdir()
    decoded = []
    monkeypatch.setattr(Y, "whisper_decode", lambda model, processor, waves, guard=None, batch_size=8: decoded.extend(waves) or ["new"] * len(waves))
    hyps = Y.whisper_hyps(fresh, rows, "tiny.en")
    assert len(decoded) == 1 and hyps[2] == "new" and hyps[:2] == [json.loads(shipped.read_text())[Y.audio_sha1(cache.rows[r]["audio"])] for r in rows[:2]]

    changed = tmp_path / "changed.wav"  # other bytes under the same name: not the shipped clip
    shutil.copy(cache.rows[rows[0]]["audio"], changed)
    changed.write_bytes(changed.read_bytes()[:-2] + b"\x01\x02")
    other = FeatureCache(tmp_path / "other", dict(cache.index, rows=[dict(cache.rows[rows[0]], audio=str(changed))]))
    (tmp_path / "other").mkdir()
    assert Y.whisper_hyps(other, [0], "tiny.en") == ["new"]


def test_headline_table_leads_with_ours_the_control_and_whisper_on_the_same_clips(tiny_alignment):
    res = tiny_alignment.result  # whisper_baseline=False, no CTC head: greedy only
    rows = alignment.headline(res)
    s = res.scores
    assert [r["system"].split(",")[0].split(":")[0] for r in rows] == ["ours", "ours", f"Whisper {res.config.encoder}'s own decoder",
                                                                     "what the audio adds to ours (greedy"]
    assert rows[0]["WER"] == s["clear_wer"] == s["clear_greedy_wer"] and rows[1]["median WER"] == s["clear_control_median_wer"]
    assert rows[0]["CER"] == s["clear_greedy_cer"] and "shuffled" in rows[1]["system"]
    assert "not run" in rows[2]["system"] and math.isnan(rows[2]["WER"])  # skipped, and said so
    assert rows[3]["WER"] == pytest.approx(s["clear_control_wer"] - s["clear_wer"])
    # with Whisper's figures present, its row carries them
    with_whisper = replace(res, scores=s | {"clear_whisper_wer": 0.4, "clear_whisper_median_wer": 0.3, "whisper_wer": 0.5, "clear_whisper_cer": 0.2})
    assert alignment.headline(with_whisper)[2] == {"system": f"Whisper {res.config.encoder}'s own decoder (loop guard)", "WER": 0.4,
                                                   "CER": 0.2, "median WER": 0.3, "WER, all styles": 0.5}


def test_joint_decoding_with_a_ctc_head_is_scored_and_its_weight_chosen_on_val(tiny_alignment, tmp_path):
    """A run with a CTC head is decoded greedy and joint, each beside its control; with ctc_decode_weights
    the weight is chosen on the val split (never the test clips), used on the test clips, and saved."""
    cfg = replace(tiny_alignment.cfg, ctc_weight=1.0, decode="joint", ctc_decode_weights="0.2,0.9", tune_clips=2, steps=2,
                  eval_every=2, out=str(tmp_path / "model"))
    res = alignment.run(cfg, cache=tiny_alignment.cache)
    s = res.scores
    tried = {0.2: s["val_joint_wer.ctc0.2"], 0.9: s["val_joint_wer.ctc0.9"]}
    assert s["ctc_decode_weight_chosen"] == min(tried, key=lambda w: (tried[w], w))
    refs = res.test.refs
    for name in ("greedy", "joint", "greedy_control", "joint_control", "ctc"):
        assert s[f"{name}_wer"] == metrics.wer(refs, res.test.systems[name]), name
    assert res.test.hyps == res.test.systems["joint"] and s["wer"] == s["joint_wer"]  # decode=joint: ours is the joint search
    meta = json.loads((tmp_path / "model" / "audio_path.json").read_text())
    assert meta["ctc_head"] and meta["decoding"]["decode"] == "joint"
    assert meta["decoding"]["ctc_decode_weight"] == s["ctc_decode_weight_chosen"]
    with pytest.raises(ValueError, match="parameter `ctc_decode_weights`"):
        replace(cfg, ctc_decode_weights="0.5,1.5")


def test_clear_only_decodes_the_clear_held_out_clips_alone(tiny_alignment, tmp_path):
    """clear_only (the tour's budget): the final figures are the clear held-out clips' (style normal), the
    same numbers as the clear_ columns of a full evaluation; no seen-voice decoding."""
    cfg = replace(tiny_alignment.cfg, steps=2, eval_every=2, out=str(tmp_path / "full"))
    full = alignment.run(cfg, cache=tiny_alignment.cache)
    clear = alignment.run(replace(cfg, clear_only=True, out=str(tmp_path / "clear")), cache=tiny_alignment.cache)
    styles = [r["labels"].get("style", "normal") for r in full.test.rows]
    assert "normal" in styles and set(styles) != {"normal"}, styles  # the corpus has other styles to leave out
    assert clear.scores["n_test"] == styles.count("normal") == len(clear.test.refs)
    assert {r["labels"].get("style", "normal") for r in clear.test.rows} == {"normal"}
    assert clear.scores["wer"] == clear.scores["clear_wer"] == full.scores["clear_wer"]
    assert "wer_seen_voice" in full.scores and "wer_seen_voice" not in clear.scores
