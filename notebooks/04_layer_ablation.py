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
#     config: omni.experiments.layer_ablation.AblationConfig
#     derived:
#     - out
#     - whisper_baseline
#     experiment: layer_ablation
# ---

# %% [markdown]
# # 04 · Ablation, one grid point: what does this Whisper layer choice (or audio path) carry?
# **Texture**: probes for voice identity, gender, accent, rate, pitch and style, fit on the train
# split, scored on held-out sentences by seen voices (`test_seen_voice`) and, except identity, by
# unseen voices (`test`), with the majority-class chance beside each. For `weighted` / `weighted_ln`
# the linear probe learns the softmax layer weights jointly with the classifier. **Content**:
# projector-only alignment into the frozen LM at a fixed budget: held-out WER, CER and loss.
# Everything reads the feature cache: Whisper does not run here. The grid's comparison is
# notebook 05, in the parent run. The parameters are `omni.experiments.layer_ablation.AblationConfig`'s fields:
# the alignment's own (omni.experiments.alignment.AlignConfig) plus the probes'.

# %% tags=["parameters"]
# generated from omni.experiments.layer_ablation.AblationConfig by `python -m omni.params`: edit the dataclass, not this cell
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
steps: int = 150  # alignment steps of the content arm, 0 for no content measurement
batch_size: int = 16  # clips per alignment step
lr: float = 0.002  # AdamW peak learning rate
warmup: int = 20  # linear lr warmup steps
eval_every: int = 0  # alignment evaluations every this many steps, 0 for only at the end
seed: int = 0  # fixes the initialisation, the batches and every shuffle
device: str = 'cpu'  # cpu | cuda | auto
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
eval_clips: int = 8  # clips decoded per intermediate evaluation: only the curves use them
max_new_tokens: int = 60  # decoding budget per clip, in LM tokens
clear_only: bool = False  # decode only the clear held-out clips (style normal: the trainable-axis table's) and not the seen-voice sentences: the tour's budget; whispered and other styles then go unscored
guard: bool = True  # greedy decodes (ours, control, Whisper) under the loop guard (LoopGuard); the unguarded figures kept as *unguarded*
guard_logprob: float = 0.0  # our decoder's guard: re-decode below this mean token log-prob; 0 takes minus the LM's own validation nats per token (pretrain.json's first_nats: a transcript the LM is less sure of than of prose it reads unaided has failed), or the compression ratio alone where the LM has no such figure. Whisper keeps openai-whisper's -1
weights_every: int = 20  # eval_every for weighted choices: each evaluation records the content layer weights
test_clips: int = 100  # held-out clips (split test, unseen voices) decoded at the end of the content arm
seen_clips: int = 0  # ... and of split test_seen_voice
probes: str = 'linear,attention'  # texture probes to run, comma-separated; "" for none
probe_seeds: int = 1  # probes run for seeds below this (the linear probes are deterministic)
attributes: str = 'voice,gender,accent,rate,pitch,style'  # what the probes predict (omni.eval.layer_probes.ATTRIBUTES)
attn_stride: int = 4  # the attention probe reads frames averaged in runs of this many (4: 12.5 per second)
attn_steps: int = 200  # Adam steps of the attention probe
weighted_steps: int = 100  # L-BFGS iterations of the joint texture probe: layer weights and classifier
threads: int = 1  # torch threads: 1 is fastest on a shared 2-core box
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/layer_ablation/adhoc"  # folder this run writes its files into

# %%
from IPython.display import display

from omni import params, track
from omni.experiments import layer_ablation, plots

cfg = params.from_params(layer_ablation.AblationConfig, globals(), out="", whisper_baseline=False)  # a grid point never runs Whisper
tracker = track.open_run("layer_ablation", mlflow_run_id, cfg, {"out_dir": out_dir})
res = layer_ablation.run(cfg, tracker, run_id=mlflow_run_id)

# %% [markdown]
# `last` and `middle` name a state that the grid usually also holds by its index: when that run
# (same seed, same settings) has finished, its metrics are this run's, copied rather than recomputed.
# ## Texture probes

# %%
if res.alias_of:
    print(f"metrics copied from run {res.alias_of}")
if res.probes is not None:
    m = res.probes.metrics()
    print("seconds per probe: " + ", ".join(f"{p} {m[f'time.probe.{p}']:.2f}" for p in ("linear", "attention") if f"time.probe.{p}" in m))
    display(res.probes.table().style.format(precision=3))
if res.probes is not None and res.probes.history:
    fig = plots.weight_histories(res.probes.history, f"{layer}: texture-objective layer weights vs probe step")
    plots.show(tracker, fig, "texture_weights.png")

# %% [markdown]
# ## Content: projector-only alignment at a fixed budget

# %%
if res.content is not None:
    s = res.content.scores
    seen = f"; seen voices WER {s['wer_seen_voice']:.3f}" if "wer_seen_voice" in s else ""
    print(f"held-out (unseen voices): WER {s['wer']:.3f}, CER {s['cer']:.3f}, loss {s['test_loss']:.3f}{seen}; "
          f"shuffled-audio control WER {s['control_wer']:.3f}")
    print(f"{s['audio_tokens_per_s']:.1f} audio tokens per second of speech; training {s['tokens_per_s']:.0f} tokens/s, "
          f"{s['step_seconds']:.3f} s/step")
    assert len(res.content.history.loss) == steps, "alignment did not run its budget"
if hist := layer_ablation.weight_histories(res):
    fig = plots.weight_histories(hist, f"{layer}: layer weights vs training step, by objective")
    plots.show(tracker, fig, "layer_weights.png")
print(f"grid point: {res.seconds['total']:.1f} s in all")
tracker.finish()
