"""SpeechLM: the trainable path from cached Whisper hidden states to text.

    hidden (B, S, T, d_whisper) --LayerSelect--> (B, T, d) --Projector--> audio tokens (B, A, n_embd)
    GPT input: [left pad][prompt?][audio tokens][prompt?][BOS text] -> loss on the text (and the closing BOS)

Design choices:
- The encoder is NOT part of this module: it is frozen and its states are cached, so every
  experiment that changes the layer choice, the projector or the LM starts from hidden states.
- The soft prefix is left-padded: every sample's text starts right after its last audio token, and
  the GPT masks the padding as keys, so a batch gives the same result as each clip alone.
- The LM is any backbone of omni.model.lm (omni's GPT, a nanochat checkpoint, a Hugging Face causal LM):
  only embed / forward(idx, targets, audio, audio_mask) / generate are used. `gpt` is its attribute
  name for history's sake.
- A text starts with the tokenizer's BOS and ends with its EOS (omni's and nanochat's tokenizers:
  BOS doubles as end-of-text, nanochat's document delimiter); generation stops on EOS.
- The layer choice and projector run in fp32 with autocast off, whatever the LM's dtype: their
  output is cast to the LM's dtype only where it enters the LM.
- A text prompt ("Transcribe:") can sit before the audio (inside the soft prefix, as embeddings of
  its tokens) or after it (ordinary tokens with ignored targets).
- Decoding is greedy, optionally under openai-whisper's loop guard (`LoopGuard`): a hypothesis that
  compresses too well (gzip ratio > 2.4: a repetition loop) or that the model finds unlikely (mean
  token log-prob < -1) is re-decoded by seeded sampling at rising temperatures. One sample per
  temperature (Whisper samples best_of=5): cheaper, and the guard's job is to break loops.
  Log-probabilities come from one forward pass over each hypothesis, so gpt.generate stays as is.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from omni.model.beam import joint_beam_search
from omni.model.encoder import LayerSelect
from omni.model.lm import LoraSpec, add_lora
from omni.model.projector import Projector, ProjectorConfig, VoicePool

PROMPT_POSITIONS = ("before", "after")
# what trains beside the audio path (layer choice + projector): none of the LM (frozen, the research
# setting), LoRA adapters on it (its base weights frozen), or all of it
TRAINABLE = ("projector", "projector+lora", "projector+lm")


def lm_parameters(lm: nn.Module, trainable: str, lora: LoraSpec) -> dict[str, nn.Parameter]:
    """The LM's parameters that train under `trainable` (one of TRAINABLE), by name; every other LM
    weight is frozen. New LoRA adapters draw their init from torch's global RNG: seed it first."""
    train_lm = trainable == "projector+lm"
    for p in lm.parameters():
        p.requires_grad_(train_lm)
    if trainable == "projector+lora":
        return add_lora(lm, lora)
    return dict(lm.named_parameters()) if train_lm else {}



DECODES = ("greedy", "joint")  # the LM alone (greedy, under the loop guard where one is given) | joint CTC/LM beam search (omni.model.beam)


@dataclass(frozen=True)
class Decoding:
    """How audio tokens become a transcript."""

    decode: str = "greedy"  # greedy | joint (needs a CTC head: audio tokens trained to spell the LM vocabulary)
    beam: int = 8  # joint: hypotheses kept per clip
    ctc_decode_weight: float = 0.3  # joint: weight of the CTC prefix log-probability; the LM's is 1 minus it
    candidates: int = 128  # joint: tokens scored per step, those the clip's CTC posteriors rank highest at their best frame (0 = all)


@dataclass
class SpeechLMConfig:
    layer: str = "last"  # Whisper state(s) fed to the projector: last | middle | <index> | weighted | weighted_ln
    k: int = 4  # frames stacked per audio token
    projector: str = "stack"  # stack | conv | avg | lego
    projector_hidden: int = 0  # the projector MLP's hidden width; 0 = the LM's width
    prompt: str = ""  # optional text prompt, e.g. "Transcribe:"
    prompt_position: str = "after"  # before | after the audio
    collapse: bool = False  # one audio token per CTC segment (runs of the same most likely LM token, blanks dropped): the layout the frozen LM copies from
    audio_bos: bool = False  # BOS's embedding before the audio tokens, as a document starts in pretraining
    voice_tokens: int = 0  # soft tokens pooled from the whole clip (VoicePool: the voice, not the words) before the audio tokens; 0 = none
    voice_at_answer: bool = False  # a tuned run's conversation repeats the clip's voice tokens just before each "Assistant:", next to where the answer is read (omni.experiments.tuning)


def compression_ratio(text: str) -> float:
    """UTF-8 bytes / zlib-compressed bytes: openai-whisper's repetition test (a hypothesis above
    2.4 is treated as a loop). An empty text gives 0.0."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


@dataclass(frozen=True)
class LoopGuard:
    """openai-whisper's guard against repetition loops and low-confidence output, for any decoder:
    a hypothesis fails when it compresses too well (a loop repeats itself) or the model itself
    finds it unlikely; a failed clip is decoded again at the next temperature."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Whisper's schedule; 0 = greedy; (0.0,) = no fallback
    compression_ratio_threshold: float = 2.4  # fail above this zlib ratio (compression_ratio)
    logprob_threshold: float = -1.0  # fail below this mean token log-probability (end token included)
    seed: int = 0  # sampling at temperature i uses seed + i: the same clips decode the same way every run

    def fails(self, h: "Hypothesis") -> bool:
        return h.compression_ratio > self.compression_ratio_threshold or h.avg_logprob < self.logprob_threshold

    def rank(self, h: "Hypothesis") -> tuple[bool, float]:
        """When every temperature fails, the attempt kept: no loop first, then the likeliest (a
        loop is likely by construction). openai-whisper and transformers keep the last attempt
        (temperature 1.0) instead; ranking by Whisper's own criterion keeps a sample at 1.0 from
        replacing a better earlier one. It only matters for clips that fail at every temperature."""
        return (h.compression_ratio <= self.compression_ratio_threshold, h.avg_logprob)


@dataclass(frozen=True)
class Hypothesis:
    text: str
    temperature: float  # the temperature that produced `text`
    compression_ratio: float
    avg_logprob: float
    n_tokens: int  # tokens the mean log-probability averages over
    greedy: str  # the first (greedy) pass: the unguarded transcript, kept for comparison
    attempts: int  # temperatures tried for this clip


def left_pad(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, A, D) -> left-padded (B, A, D) and a mask (B, A), True on real tokens."""
    B, A, _ = x.shape
    pos = torch.arange(A, device=x.device)[None, :]
    shift = (A - lengths)[:, None]
    src = (pos - shift).clamp(min=0)
    mask = pos >= shift
    out = torch.gather(x, 1, src[..., None].expand(-1, -1, x.size(-1))) * mask[..., None].to(x.dtype)
    return out, mask


def ctc_collapse(tokens: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per CTC segment: the mean of each run of consecutive tokens whose most likely LM token
    (`ids`, B x A) is the same, runs of the blank dropped; right-padded (B, A', n_embd) and the new
    lengths (a clip with no segment keeps the mean of all its tokens, so it still has one).

    Why: the frozen LM copies a passage from its context laid out as text (0.61 nats/token for the
    committed LM), but not the same passage spelled as CTC frames, each token repeated 1-3 times with
    up to 2 blanks between (4.19 nats/token, no better than not seeing it). The segment mean keeps the
    gradient to every frame of the segment; the segmentation itself is the CTC argmax, not trained."""
    rows = []
    for b in range(tokens.size(0)):
        n = int(lengths[b])
        x, r = tokens[b, :n], ids[b, :n]
        if n == 0:
            rows.append(tokens[b, :1] * 0)
            continue
        start = torch.ones(n, dtype=torch.bool, device=r.device)
        start[1:] = r[1:] != r[:-1]
        seg = start.cumsum(0) - 1  # segment index of every token
        n_seg = int(seg[-1]) + 1
        sums = torch.zeros(n_seg, x.size(1), dtype=x.dtype, device=x.device).index_add(0, seg, x)
        counts = torch.zeros(n_seg, dtype=x.dtype, device=x.device).index_add(0, seg, torch.ones_like(seg, dtype=x.dtype))
        keep = r[start] != blank
        rows.append((sums / counts[:, None])[keep] if keep.any() else x.mean(0, keepdim=True))
    new = torch.tensor([len(r) for r in rows], dtype=lengths.dtype, device=lengths.device)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), new


class SpeechLM(nn.Module):
    def __init__(self, gpt: nn.Module, tokenizer, n_states: int, d_whisper: int, config: SpeechLMConfig):
        super().__init__()
        if config.prompt_position not in PROMPT_POSITIONS:
            raise ValueError(
                f"prompt_position {config.prompt_position!r} is not one of {PROMPT_POSITIONS} (parameter `prompt_position`)"
            )
        self.config = config
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.select = LayerSelect(config.layer, n_states)
        self.projector = Projector(
            ProjectorConfig(d_in=d_whisper, d_out=gpt.config.n_embd, k=config.k, kind=config.projector,
                            hidden=config.projector_hidden or gpt.config.n_embd, vocab=gpt.config.vocab_size if config.projector == "lego" else 0)
        )
        self.voice = VoicePool(n_states, d_whisper, gpt.config.n_embd, config.voice_tokens) if config.voice_tokens else None
        self.match_text_scale()

    @torch.no_grad()
    def match_text_scale(self) -> float:
        """Set the projector's output RMS to the RMS of the LM's text embeddings (re-run after loading an LM)."""
        ids = torch.arange(self.gpt.config.vocab_size, device=self.gpt_device)[None, :]
        rms = self.gpt.embed(ids).float().pow(2).mean().sqrt().item()
        self.projector.set_target_rms(rms)
        if self.voice is not None:
            self.voice.target_rms.fill_(rms)
        return rms

    def audio_path_to(self, device: torch.device | str) -> "SpeechLM":
        """Move the trainable audio path (layer choice, projector, voice pool) to `device`, leaving the LM
        where its loader placed it (a k-bit LM cannot be moved with .to)."""
        for m in (self.select, self.projector, self.voice):
            if m is not None:
                m.to(device)
        return self

    def states_read(self) -> list[int] | None:
        """The Whisper states the audio path reads ([i] or None for all): what a caller need load."""
        return None if self.voice is not None else self.select.states_read()

    @property
    def gpt_device(self) -> torch.device:
        return next(self.gpt.parameters()).device

    def _prompt_ids(self) -> list[int]:
        return self.tokenizer.encode(self.config.prompt) if self.config.prompt else []

    def embedding_table(self) -> torch.Tensor:
        """The LM's input embeddings of its whole vocabulary, as it sees them: (vocab, n_embd) fp32."""
        return self.gpt.embed(torch.arange(self.gpt.config.vocab_size, device=self.gpt_device)[None])[0].float()

    def _project(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projector's raw output (right-padded (B, A, n_embd), or a `lego` projector's logits over
        the LM vocabulary) and its lengths. Callers keep autocast off: the audio path stays fp32."""
        return self.projector(self.select(hidden.float()), frame_lengths)

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """The projector's output read as LM tokens (B, A, vocab): a `lego` projector's own logits;
        otherwise each token's dot product with the LM's (normed) input embedding of every vocabulary
        entry / sqrt(n_embd): a token equal to a word's embedding scores sqrt(n_embd), an unrelated one about 0."""
        if self.config.projector == "lego":
            return out
        table = self.embedding_table()
        return out @ table.T / table.size(1) ** 0.5

    def audio_logits(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each audio token (before any collapse) read as LM tokens: logits (B, A, vocab) and the lengths."""
        with torch.autocast(hidden.device.type, enabled=False):
            out, lengths = self._project(hidden, frame_lengths)
            return self._logits(out), lengths

    def audio_tokens(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded audio tokens (B, A, n_embd) and their lengths, before any prompt or padding:
        the projector's (a `lego` projector's posteriors times the LM's embeddings), or with `collapse`
        one per CTC segment (`ctc_collapse`). Logits over the vocabulary are computed only for the collapse."""
        with torch.autocast(hidden.device.type, enabled=False):  # the audio path stays fp32 under bf16 autocast
            out, lengths = self._project(hidden, frame_lengths)
            tokens = out.softmax(-1) @ self.embedding_table() if self.config.projector == "lego" else out
            if self.config.collapse:
                tokens, lengths = ctc_collapse(tokens, self._logits(out).argmax(-1), lengths, self.tokenizer.bos_id)
            if self.voice is not None:  # the voice first, then the words: [voice tokens][audio tokens], still right-padded
                tokens = torch.cat([self.voice(hidden.float(), frame_lengths).to(tokens.dtype), tokens], dim=1)
                lengths = lengths + self.config.voice_tokens
            return tokens, lengths

    def prefix(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The soft prefix the GPT sees before the text: left-padded (B, P, n_embd) and its mask."""
        return self.wrap(*self.audio_tokens(hidden, frame_lengths))

    def wrap(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded tokens (audio tokens, or a transcript's embeddings standing in for them) laid
        out as the prefix: [BOS if audio_bos][prompt if before][tokens], left-padded, and its mask."""
        prompt = self._prompt_ids() if self.config.prompt_position == "before" else []
        prompt = ([self.tokenizer.bos_id] if self.config.audio_bos else []) + prompt
        if prompt:
            ids = torch.tensor([prompt], device=tokens.device)
            emb = self.gpt.embed(ids).to(tokens.dtype).expand(tokens.size(0), -1, -1)
            # [BOS] and prompt first, then the real tokens, then the right padding; left_pad moves the padding
            tokens = torch.cat([emb, tokens], dim=1)
            lengths = lengths + len(prompt)
        return left_pad(tokens, lengths)

    def text_batch(self, texts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """idx = [prompt?][BOS][text], targets = [-1 ...][text][EOS]; right-padded, pad targets -1."""
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        after = self._prompt_ids() if self.config.prompt_position == "after" else []
        rows = [after + [bos] + self.tokenizer.encode(t) for t in texts]
        T = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r)
            targets[i, len(after) : len(r)] = torch.tensor(r[len(after) + 1 :] + [eos])  # text + closing EOS
        return idx.to(device), targets.to(device)

    def forward(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
        prefix, mask = self.prefix(hidden, frame_lengths)
        idx, targets = self.text_batch(texts, hidden.device)
        return self.gpt(idx, targets=targets, audio=prefix, audio_mask=mask)

    @torch.no_grad()
    def transcribe(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, max_new_tokens: int = 200, guard: LoopGuard | None = None,
                   decoding: Decoding | None = None) -> list[str]:
        """Transcripts of a batch (`hypotheses`)."""
        return [h.text for h in self.hypotheses(hidden, frame_lengths, max_new_tokens, guard, decoding)]

    @torch.no_grad()
    def hypotheses(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, max_new_tokens: int = 200, guard: LoopGuard | None = None,
                   decoding: Decoding | None = None) -> list[Hypothesis]:
        """Transcripts of a batch with their scores: `decoding` joint (joint_hypotheses; the guard is not
        needed there: the CTC term ends every hypothesis where the audio ends), else greedy (under `guard`)."""
        if decoding is not None and decoding.decode == "joint":
            return self.joint_hypotheses(hidden, frame_lengths, max_new_tokens, decoding)
        return self.greedy_hypotheses(hidden, frame_lengths, max_new_tokens, guard)

    @torch.no_grad()
    def joint_hypotheses(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, max_new_tokens: int, decoding: Decoding) -> list[Hypothesis]:
        """Joint CTC/LM beam search (omni.model.beam): the LM reads the audio tokens as in greedy
        decoding, the CTC posteriors of the same tokens (audio_logits, blank = BOS) keep it on the audio."""
        prefix, mask = self.prefix(hidden, frame_lengths)
        logits, lengths = self.audio_logits(hidden, frame_lengths)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        after = self._prompt_ids() if self.config.prompt_position == "after" else []
        idx = torch.tensor([after + [bos]] * prefix.size(0), device=prefix.device)
        budget = min(max_new_tokens, self.gpt.config.sequence_len - prefix.size(1) - idx.size(1))
        res = joint_beam_search(self.gpt, idx, prefix, mask, logits.log_softmax(-1), lengths, blank=bos, eos=eos, beam=decoding.beam,
                                ctc_weight=decoding.ctc_decode_weight, max_new_tokens=max(budget, 1), candidates=decoding.candidates)
        out = []
        for ids, lm_lp in zip(res.tokens, res.lm_logprob):
            text = self.tokenizer.decode(ids)
            out.append(Hypothesis(text, 0.0, compression_ratio(text), lm_lp / (len(ids) + 1), len(ids) + 1, text, 1))
        return out

    @torch.no_grad()
    def greedy_hypotheses(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, max_new_tokens: int = 200, guard: LoopGuard | None = None) -> list[Hypothesis]:
        """Decode each clip at guard.temperatures[0]; a clip whose hypothesis fails the guard
        (`LoopGuard.fails`) is decoded again, alone with the other failures, by seeded sampling at
        the next temperature, until it passes or the temperatures run out. Kept per clip: the
        first hypothesis that passes; if none does, the best by `LoopGuard.rank`.
        guard=None: one greedy pass, nothing re-decoded."""
        guard = guard or LoopGuard(temperatures=(0.0,))
        prefix, mask = self.prefix(hidden, frame_lengths)
        best: list[Hypothesis | None] = [None] * hidden.size(0)
        todo = list(range(hidden.size(0)))
        for i, t in enumerate(guard.temperatures):
            if not todo:
                break
            sub = torch.tensor(todo, device=prefix.device)
            ids = self._generate(prefix[sub], mask[sub], max_new_tokens, t, guard.seed + i)
            logprobs = self.mean_logprobs(prefix[sub], mask[sub], ids)
            failed = []
            for b, row, (lp, n) in zip(todo, ids, logprobs):
                text = self.tokenizer.decode(row[0])
                h = Hypothesis(text, t, compression_ratio(text), lp, n, best[b].greedy if best[b] else text, i + 1)
                if guard.fails(h):
                    failed.append(b)
                    if best[b] is None or guard.rank(h) > guard.rank(best[b]):
                        best[b] = h
                    else:
                        best[b] = replace(best[b], attempts=i + 1)
                else:
                    best[b] = h
            todo = failed
        return best  # type: ignore[return-value]

    def _generate(self, prefix: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float, seed: int) -> list[tuple[list[int], bool]]:
        """(text token ids without the closing EOS, whether EOS closed them) per row."""
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        after = self._prompt_ids() if self.config.prompt_position == "after" else []
        idx = torch.tensor([after + [bos]] * prefix.size(0), device=prefix.device)
        out = self.gpt.generate(idx, audio=prefix, audio_mask=mask, max_new_tokens=max_new_tokens, stop_token=eos,
                                temperature=temperature, seed=seed if temperature > 0 else None)
        return [(row[: row.index(eos)], True) if eos in row else (row, False) for row in out.tolist()]

    @torch.no_grad()
    def mean_logprobs(self, prefix: torch.Tensor, mask: torch.Tensor, ids: list[tuple[list[int], bool]]) -> list[tuple[float, int]]:
        """(mean log-probability, count) of each row's tokens under the model at temperature 1,
        the closing EOS included when it was generated (openai-whisper counts the end token too):
        one forward pass over the hypotheses, not the sampler's (temperature-scaled) scores."""
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        after = self._prompt_ids() if self.config.prompt_position == "after" else []
        targets_list = [row + ([eos] if closed else []) for row, closed in ids]
        idx = torch.zeros(len(ids), len(after) + 1 + max(len(row) for row, _ in ids), dtype=torch.long)
        targets = torch.full_like(idx, -1)
        for i, ((row, _), tgt) in enumerate(zip(ids, targets_list)):
            seq = after + [bos] + row
            idx[i, : len(seq)] = torch.tensor(seq)
            targets[i, len(after) : len(after) + len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        idx, targets = idx.to(prefix.device), targets.to(prefix.device)
        logp = self.gpt(idx, audio=prefix, audio_mask=mask).log_softmax(dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets >= 0)
        counts = (targets >= 0).sum(dim=1)
        return [(float(s) / max(int(n), 1), int(n)) for s, n in zip(picked.sum(dim=1), counts)]

    # -- checkpoints: the trainable audio path only (the GPT saves itself); safetensors + JSON, no pickles
    def save_audio_path(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {f"select.{k}": v for k, v in self.select.state_dict().items()}
        state |= {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        if self.voice is not None:
            state |= {f"voice.{k}": v for k, v in self.voice.state_dict().items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, d / "audio_path.safetensors")
        meta = {"speech_lm": asdict(self.config), "n_states": self.select.n_states, "d_whisper": self.projector.config.d_in}
        (d / "audio_path.json").write_text(json.dumps(meta, indent=2))

    def load_audio_path(self, directory: str | Path) -> None:
        state = load_file(Path(directory) / "audio_path.safetensors")
        self.select.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("select.")})
        self.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
        voice = {k[6:]: v for k, v in state.items() if k.startswith("voice.")}
        if self.voice is not None and voice:  # a run saved without voice tokens starts them fresh
            self.voice.load_state_dict(voice)
