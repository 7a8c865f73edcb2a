# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: omni,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   omni:
#     config: omni.experiments.alignment.AlignConfig
#     derived:
#     - out
#     experiment: alignment
# ---

# %% [markdown]
# # 03 · Alignment: the LM hears through a projector (and what else must move)
# Whisper is **frozen**; the layer choice and the projector train on cached Whisper states of the
# synthesized corpus, and, as `trainable` says, nothing of the LM (the research setting), LoRA
# adapters on it, or all of it. With `steps=0` and `run=...` a trained run (the committed hearing
# model `models/hear`) is evaluated as it is. The held-out split has sentences *and* voices never seen
# in training. Whisper's own decoder on the same clips is the yardstick (when `whisper_baseline` is
# on); the control decodes each clip with another clip's audio. A run whose audio tokens were trained
# to spell the LM vocabulary (a CTC head) is decoded twice: greedy (the LM alone) and joint (a CTC/LM
# beam search that keeps the LM on the audio).

# %% tags=["parameters"]
# generated from omni.experiments.alignment.AlignConfig by `python -m omni.params`: edit the dataclass, not this cell
corpus: str = 'data/synth'  # the synthesized speech corpus the clips come from (omni.data.synth)
features: str = 'cache/features'  # feature cache: a cache folder (index.json), or the root the corpus's cache is built under
encoder: str = 'tiny.en'  # Whisper source of the features (omni.model.whisper_weights)
encoder_mode: str = 'var'  # var (each clip its own length) | pad30 (Whisper's 30 s window)
lm: str = 'models/lm'  # the LM: an omni LM folder (models/lm: the committed copying LM), a nanochat checkpoint folder, or a Hugging Face model folder or hub id
load_in: str = ''  # "" | 8bit | 4bit: k-bit weights for a Hugging Face LM (bitsandbytes, CUDA only)
run: str = ''  # a trained run to start from (its audio path and shape, its LM as it left it): run folder, report folder or MLflow run id; "" : fresh
layer: str = 'last'  # Whisper state(s) the projector reads: last | middle | <index> | weighted | weighted_ln
k: int = 4  # Whisper frames per audio token (50 frames/s / k tokens per second)
projector: str = 'stack'  # stack | conv | avg | lego (posteriors over the LM vocabulary mixing its token embeddings, LegoSLM)
projector_hidden: int = 0  # the projector MLP's hidden width; 0 : the LM's width (n_embd)
voice_tokens: int = 0  # soft tokens pooled from the whole clip (the voice: omni.model.projector.VoicePool) before the audio tokens; 0 : none
trainable: str = 'projector'  # projector (frozen LM) | projector+lora (peft adapters on the LM) | projector+lm (the whole LM)
lora_rank: int = 16  # LoRA rank r (trainable:projector+lora)
lora_alpha: float = 32.0  # LoRA scale alpha / r
lora_dropout: float = 0.0  # dropout on the adapters' input
lora_targets: str = ''  # comma-separated module names; "" : attention + MLP projections of the backbone
lora_grad_clip: float = 0.0  # > 0: LoRA gradients clipped to this norm on their own (0 : with the rest)
lm_lr: float = 0.0  # > 0: the LM's own parameters (adapters or weights) at this peak learning rate instead of `lr`
max_bad_steps: int = 10  # stop with an error after this many non-finite steps in a row (0 : never)
early_lr_factor: float = 1.0  # lr multiplier for the first early_steps steps
early_steps: int = 0  # steps at early_lr_factor * lr (on top of the warmup)
freeze_projector_steps: int = 0  # the projector stays still for this many steps (the layer mix, LoRA or LM adapt first)
steps: int = 600  # optimiser steps
batch_size: int = 32  # clips (alignment) or conversations (tuning) per step
lr: float = 0.002  # AdamW peak learning rate
warmup: int = 50  # linear warm-up steps
eval_every: int = 150  # steps between evaluations; 0 : only at the end
seed: int = 0  # fixes the initialisation, the batches and every shuffle
device: str = 'auto'  # auto | cpu | cuda
dtype: str = 'bfloat16'  # autocast dtype on CUDA; the CPU runs float32
sentences: int = 3000  # corpus size when it has to be built
clips_per_sentence: int = 1  # train/val renditions of each sentence by distinct seen voices when the corpus is built (the held-out clips are the same for any value)
prompt: str = ''  # e.g. "Transcribe:"
prompt_position: str = 'after'  # before | after the audio
collapse: bool = False  # one audio token per CTC segment of the projector's tokens read as LM tokens (blanks dropped): the text-like layout a frozen LM copies from; needs ctc_weight > 0 to mean anything
audio_bos: bool = False  # BOS's embedding before the audio tokens, as every pretraining document starts
time_mask: float = 0.0  # share of each training clip's Whisper frames hidden (zeroed) in spans of `mask_span` frames (SpecAugment's time masking); 0 : off
mask_span: int = 10  # frames per hidden span (time_mask)
ctc_weight: float = 0.0  # + this x CTC of the audio tokens read as LM tokens (ctc_embedding_loss): a CTC head over the LM vocabulary, which joint decoding reads; 0 means plain cross-entropy
kl_weight: float = 0.0  # + this x KL from the same LM reading the transcript where the audio stands (distill_loss); 0 means off
decode: str = 'greedy'  # how ours is decoded in the final evaluation and by default afterwards: greedy (the LM alone, under the loop guard) | joint (CTC/LM beam search; needs a CTC head). A run with a CTC head is scored both ways
beam: int = 8  # joint decoding: hypotheses kept per clip
ctc_decode_weight: float = -1.0  # joint decoding: weight of the CTC prefix log-probability (the LM's: 1 minus it); -1 : the started run's own (`run`), else 0.3
ctc_decode_weights: str = ''  # e.g. "0.3,0.5,0.7,0.9": joint decoding's CTC weight chosen on the val split (sentences and clips never in training nor test), the best used on the held-out clips and saved with the run; "" : ctc_decode_weight as given
tune_clips: int = 100  # val clips the CTC weight is chosen on (ctc_decode_weights)
eval_clips: int = 100  # held-out clips decoded at each intermediate evaluation
max_new_tokens: int = 80  # decoding budget per clip, in LM tokens
clear_only: bool = False  # decode only the clear held-out clips (style normal: the trainable-axis table's) and not the seen-voice sentences: the tour's budget; whispered and other styles then go unscored
whisper_baseline: bool = True  # also decode the held-out clips with Whisper's own decoder (shipped transcripts are used where the clips match)
guard: bool = True  # greedy decodes (ours, control, Whisper) under the loop guard (LoopGuard); the unguarded figures kept as *unguarded*
guard_logprob: float = 0.0  # our decoder's guard: re-decode below this mean token log-prob; 0 takes minus the LM's own validation nats per token (pretrain.json's first_nats: a transcript the LM is less sure of than of prose it reads unaided has failed), or the compression ratio alone where the LM has no such figure. Whisper keeps openai-whisper's -1
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/alignment/adhoc"  # folder this run writes its files into

# %%
import time

import pandas as pd
from IPython.display import Markdown, display

from omni import params, track
from omni.eval import metrics
from omni.experiments import alignment, hearing, plots

t_start = time.perf_counter()
cfg = params.from_params(alignment.AlignConfig, globals(), out=f"{out_dir}/model")  # the trained audio path; resume checkpoints under it
tracker = track.open_run("alignment", mlflow_run_id, cfg, {"out_dir": out_dir})
res = alignment.run(cfg, tracker)
s = res.scores

# %% [markdown]
# ## The answer: how well does this model transcribe unseen voices?
# Clear held-out speech (style "normal": voices and sentences never seen in training), every system on
# the same clips. WER counts substituted, deleted and *inserted* words per reference word, so a
# transcript that runs on past the sentence can score above 1. The control is our model given another
# clip's audio: what it gets right comes from the LM's prior, not from listening; the last row is what
# listening adds.

# %%
print(f"{s['n_clear']:.0f} clear held-out clips (variants {', '.join(res.test.clear_variants)}) of {s['n_test']:.0f}; "
      f"this report took {(time.perf_counter() - t_start) / 60:.1f} min (corpus and cache when missing, training, decoding)")
plots.table(pd.DataFrame(alignment.headline(res)).set_index("system"))
print(alignment.verdict(res))

# %% [markdown]
# ## Where this sits: the trainable axis
# How much of the LM must move before the model hears, as measured for the committed hearing model
# (`models/hear/provenance.json`, by `omni run experiments/hearing.yaml`): the same clips, each arm decoded
# greedy and joint beside its shuffled-audio control, the CTC readout and Whisper's own decoder.

# %%
axis = hearing.provenance_rows("models/hear")
if len(axis):
    display(plots.table(axis))  # inside a block nothing is shown unless displayed
else:
    print("no committed trainable-axis table (models/hear/provenance.json) in this checkout")

# %% [markdown]
# ## Held-out results, every style
# CER is the WER of characters.

# %%
if not cfg.whisper_baseline:
    display(Markdown(f"**Whisper's own decoder was skipped in this run** (`whisper_baseline=False`): the tables below "
                     f"hold ours and the control only. Whisper {encoder}'s figures on the default corpus are in RESULTS.md."))
rows = [("ours", s["wer"], s["cer"])]
if "whisper_wer" in s:
    rows.append((f"Whisper {encoder} decoder", s["whisper_wer"], s["whisper_cer"]))
rows.append(("control: shuffled audio", s["control_wer"], s["control_cer"]))
table = pd.DataFrame(rows, columns=["system", "WER", "CER"]).set_index("system")
seen = f"{s['wer_seen_voice']:.3f}" if "wer_seen_voice" in s else "not measured"
print(f"held-out clips: {s['n_test']:.0f}, test loss {s['test_loss']:.3f}, WER on test sentences with seen voices: {seen}")
plots.table(table)

# %% [markdown]
# ## Content on clear speech: every system on the same clips
# Clear speech is the held-out clips of style "normal" (not whispered, creaky, klatt or elderly).
# Greedy decodes (ours and Whisper's) run under the same loop guard (Whisper's temperature fallback
# when a hypothesis compresses too well or is unlikely); the unguarded figures stay beside them, and
# the median per-clip WER beside the corpus WER, since a few runaway loops can decide a corpus WER alone.
# Joint decoding needs no guard: its CTC term ends every hypothesis where the audio ends.

# %%
systems = [("ours, greedy", "greedy_"), ("ours, greedy, shuffled audio", "greedy_control_"), ("ours, joint CTC/LM", "joint_"),
           ("ours, joint, shuffled audio", "joint_control_"), (f"Whisper {encoder} decoder", "whisper_"),
           ("audio tokens read as their nearest LM tokens, no LM (CTC readout)", "ctc_"),
           ("ours, greedy (no guard)", "unguarded_"), (f"Whisper {encoder} (no guard)", "whisper_unguarded_")]
clear_table = pd.DataFrame(
    [(name, s.get(f"clear_{p}wer", float("nan")), s.get(f"clear_{p}median_wer", float("nan")), s[f"{p}wer"], s[f"{p}median_wer"])
     for name, p in systems if f"{p}wer" in s],
    columns=["system", "clear WER", "clear median WER", "all WER", "all median WER"],
).set_index("system")
print(f"clear speech: {s['n_clear']:.0f} of {s['n_test']} held-out clips, variants {', '.join(res.test.clear_variants)}; "
      f"{100 * s['fallback_fraction']:.0f}% of our clips fell back to sampling")
plots.table(clear_table, missing="no clear-speech figure for this system")

# %% [markdown]
# ## WER by style and variant, every system on the same clips

# %%
by_label = pd.DataFrame(res.test.table)
by_label = by_label[by_label["by"].isin(["style", "variant"])]
by_label = by_label.pivot_table(index=["by", "group", "n"], columns="system", values=["wer", "median_wer"])
plots.table(by_label)

# %% [markdown]
# ## Training curves
# The held-out curve is greedy decoding (no loop guard) of the first `eval_clips` held-out clips at each
# evaluation. If it rises while the training loss falls, the projector fits the training sentences and
# voices better without carrying more words to unseen ones (the held-out loss, `eval_loss` in MLflow,
# says whether the fit itself got worse), or greedy decoding runs away on more clips (the figures above
# are under the loop guard; this curve is not).

# %%
if res.history.loss:
    fig = plots.loss_curves({"train loss": res.history.loss}, title=f"alignment: layer {layer}, k={k}, {projector}, {trainable}")
    plots.show(tracker, fig, "loss.png")
else:
    print(f"no training in this run (steps=0): {run} evaluated as it is")

# %%
if res.wer_curve:
    fig = plots.curve([st for st, _ in res.wer_curve], [w for _, w in res.wer_curve], xlabel="step", ylabel="held-out WER",
                      title=f"WER on {eval_clips} held-out clips vs training steps",
                      hline=s.get("whisper_wer"), hline_label=f"Whisper {encoder}")
    plots.show(tracker, fig, "wer_curve.png")
    print(plots.trend(res.wer_curve, f"held-out WER (greedy, {min(eval_clips, s['n_test']):.0f} clips)"))

# %% [markdown]
# ## Where it fails: WER by voice, rate and pitch

# %%
per = metrics.per_utterance_wer(res.test.refs, res.test.hyps)
labels = pd.DataFrame([r["labels"] for r in res.test.rows])
labels["wer"] = per
fig = plots.bars_by(labels, ["variant", "accent", "rate_bucket", "pitch_bucket", "style"], "wer", title="held-out WER by label")
plots.show(tracker, fig, "wer_by_label.png")

# %% [markdown]
# ## Examples

# %%
shown = {"ours": res.test.hyps} | {name: res.test.systems[key] for name, key in
                                  (("greedy", "greedy"), ("ctc", "ctc"), ("whisper", "whisper")) if key in res.test.systems and key != decode}
for i in range(min(8, len(res.test.refs))):
    print(f"ref:     {res.test.refs[i]}")
    for name, hyps in shown.items():
        print(f"{name + ':':9s}{hyps[i]}")
    print(f"control: {res.test.control_hyps[i]}\n")

# %%
print(f"train {s['train_seconds']:.0f} s ({s['step_seconds']:.3f} s/step, {s['tokens_per_s']:.0f} tokens/s), "
      f"decode ({decode}) {1000 * s['decode_seconds_per_clip']:.0f} ms/clip, skipped steps {s['skipped_steps']:.0f}")
assert s["control_wer"] > s["wer"], "the model does no better with the right audio than with shuffled audio"
tracker.finish()
