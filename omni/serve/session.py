"""A loaded model and what talks to it (omni chat's model side): a clip encoded and read into the LM's
cache on upload, a question's prompt, and an answer as a job for the chat worker (omni.serve.chat_worker).

Design choices:
- Runs decode as they were trained to (`Decoding`): a run with a CTC head answers a greedy request by
  joint CTC/LM beam search, whose transcript is found whole and then sent token by token.
- A clip is encoded (Whisper -> layer choice -> projector) and read into the LM's KV cache when it is
  uploaded, while the user types: a question then reads only its own tokens (on a copy of the clip's
  cache), its last one as the first decoding step, so it joins the batch of answers under way; a second
  question about the clip does not read it again.
- Prompt layout = SpeechLM's with prompt_position="after": [audio soft tokens][question][BOS] and the
  answer follows (an empty question uses the run's own prompt, as in training). Without audio the
  turn is [BOS][question]: the LM continues the text. Each turn stands alone: the trained models are
  alignment models (transcribers), which never saw a dialogue. An instruction-tuned run is asked in
  its own conversation format (omni.experiments.tuning).
- The model is loaded through `load_model` (omni.experiments.audio_run.load_run underneath), which turns
  a half-built run into one line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import AliasChoices, BaseModel, Field, ValidationError

from omni.data import audio
from omni.experiments.audio_run import load_run, run_decoding, run_encoder
from omni.experiments.tuning import Voice
from omni.experiments.tuning import prompt as tuning_prompt
from omni.model import mel
from omni.model.beam import joint_beam_search
from omni.model.sampling import sample_next
from omni.model.speech_lm import Decoding
from omni.serve.chat_worker import Step

MIN_ANSWER_TOKENS = 16  # the clip limit leaves at least this much room for an answer
MAX_NEW_TOKENS = 1024  # the most tokens one answer may ask for (the model's sequence_len may allow fewer)
CLIP = Path("<clip>")  # where the clip stands in a tuned run's conversation (tuning.prompt splices audio at a Path)


class Sampling(BaseModel):
    """How one answer is decoded; the ranges are the API's limits (README, "Chat demo")."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0 = greedy
    top_k: int = Field(0, ge=0, le=1000)  # 0 = off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1 = off
    # also bounded by the model's sequence_len; the old name max_tokens is read too, until the next release
    max_new_tokens: int = Field(120, ge=1, le=MAX_NEW_TOKENS, validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    seed: int | None = Field(None, ge=0, le=2**31 - 1)  # fixes sampling when temperature > 0


def sampling(**kw) -> Sampling:
    """Sampling values checked against the API's ranges; a bad one is a one-line ValueError."""
    try:
        return Sampling(**kw)
    except ValidationError as e:
        raise ValueError(one_line(e.errors())) from None


def one_line(errors: list[dict]) -> str:
    """pydantic's (or FastAPI's) error list as one line: `field: message (got value)` joined by '; '."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"] if x not in ("body", "query", "path")) or "request"
        got = "" if isinstance(err.get("input"), dict) else f" (got {repr(err.get('input'))[:40]})"
        parts.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(parts)


def load_model(run: str, device: str = "cpu", decode: str = "", beam: int = 0, ctc_decode_weight: float = -1.0):
    """(SpeechLM, WhisperEncoder, encoder_mode, Decoding, recipe) of a trained run (omni.experiments.audio_run),
    its own decoding unless told otherwise, or one ValueError line."""
    try:
        model, meta = load_run(run, device, name="--run")
        decoding = run_decoding(meta, decode, beam, ctc_decode_weight)
        return (model, *run_encoder(meta, model.gpt_device), decoding, meta.get("recipe", "alignment"))
    except FileNotFoundError:  # already names the run and what is missing
        raise
    except Exception as e:  # half a run: bad JSON, missing keys, tensors that do not fit
        raise ValueError(f"--run {run}: not a trained model ({type(e).__name__}: {e})".replace("\n", " ")) from e


@dataclass
class Clip:
    name: str
    seconds: float
    prefix: torch.Tensor  # (1, P, n_embd): what the GPT sees before the text (an alignment run's layout)
    encode_ms: float
    ctc_logp: torch.Tensor | None = None  # (1, T, vocab): the audio tokens' CTC log-posteriors, for joint decoding
    tokens: torch.Tensor | None = None  # (1, A, n_embd): the bare audio tokens, spliced into a tuned run's conversation
    head: Any = None  # the LM's cache after reading the clip's part of every prompt about it (Session.head)
    head_ids: list[int] = field(default_factory=list)  # that part's token ids, -1 at audio tokens


class Session:
    """A loaded model and everything that talks to it: encoding clips and streaming answers."""

    def __init__(self, model, encoder, mode: str = "var", decoding: Decoding | None = None, recipe: str = "alignment"):
        self.model, self.encoder, self.mode = model, encoder, mode
        self.decoding = decoding or Decoding()
        self.tuned = recipe == "tuning"  # an instruction-tuned run answers in its conversation format
        self.tokenizer = model.tokenizer
        self.bos = model.tokenizer.bos_id
        self.eos = model.tokenizer.eos_id  # what ends an answer: BOS for omni/nanochat LMs, the HF tokenizer's EOS
        self.sequence_len = model.gpt.config.sequence_len
        own = model.config.prompt if model.config.prompt_position == "after" else ""
        self.own_prompt = self.tokenizer.encode(own) if own else []
        before = len(self.tokenizer.encode(model.config.prompt)) if model.config.prompt and not own else 0
        # the longest clip: its audio tokens (+ a prompt before it) + own prompt + BOS + a short answer fit
        room = self.sequence_len - before - len(self.own_prompt) - 1 - MIN_ANSWER_TOKENS
        per_second = mel.SAMPLE_RATE / mel.HOP_LENGTH / 2 / model.config.k  # mel hop, conv stride 2, k frames
        self.max_seconds = max(0.0, min(audio.MAX_SECONDS, room / per_second))
        self.description = describe(model, encoder, self.decoding)

    def encode(self, wave: torch.Tensor, name: str) -> Iterator[Clip]:
        """One step (for the worker): the clip's soft prefix, read into the LM's cache (`head`)."""
        t0 = time.perf_counter()
        device = self.model.gpt_device
        with torch.no_grad():
            states = self.encoder.encode([wave.to(device)], mode=self.mode, batch_size=1)
            hidden = states[0][None].to(device)
            frames = torch.tensor([hidden.size(2)], device=device)
            prefix, _ = self.model.prefix(hidden, frames)
            ctc = self.model.audio_logits(hidden, frames)[0].log_softmax(-1) if self.decoding.decode == "joint" else None
            tokens = self.model.audio_tokens(hidden, frames)[0] if self.tuned else None
            clip = Clip(name, wave.numel() / audio.SAMPLE_RATE, prefix, 0.0, ctc, tokens)
            clip.head, clip.head_ids = self.head(clip)
        clip.encode_ms = (time.perf_counter() - t0) * 1000
        yield clip

    def head(self, clip: Clip) -> tuple[Any, list[int]]:
        """(the LM's cache, token ids with -1 at audio tokens) after the part of every prompt about the clip
        that comes before the question: an alignment run's audio prefix, a tuned run's `[BOS]User:<audio>`.
        Read once, on upload (while the user types): a question then reads only its own tokens, and the
        second question about a clip does not read the audio again."""
        gpt, device = self.model.gpt, self.model.gpt_device
        if not self.tuned:
            embeds, ids = clip.prefix, None
            head_ids = [-1] * clip.prefix.size(1)
        else:
            items = tuning_prompt([("user", [CLIP])], self.tokenizer)
            before = torch.tensor([items[: items.index(CLIP)]], device=device)
            n = clip.tokens.size(1)
            text = gpt.embed(before)
            embeds = torch.cat([text, clip.tokens.to(text.dtype)], dim=1)
            ids = torch.cat([before, torch.full((1, n), -1, dtype=before.dtype, device=device)], dim=1)
            head_ids = ids[0].tolist()
        cache = gpt.new_cache(1, embeds.size(1))
        gpt.extend(cache, torch.zeros(1, 0, dtype=torch.long, device=device), embeds, ids)
        return cache, head_ids

    def prompt(self, text: str, clip: Clip | None) -> list[int]:
        """An alignment run's text after the audio: the question (or the run's own prompt) and BOS."""
        if clip is None:
            return [self.bos] + self.tokenizer.encode(text)  # text only: the LM continues it
        return (self.tokenizer.encode(text) if text else self.own_prompt) + [self.bos]

    def inputs(self, text: str, clip: Clip | None) -> torch.Tensor:
        """idx (1, T): the tokens the LM reads after the clip's `head` (the whole turn without a clip) before
        it answers. An alignment run: [audio][question][BOS]. A tuned run: its conversation,
        `[BOS]User:<audio> question\nAssistant:` (omni.experiments.tuning's format), with -1 where
        the clip's voice tokens stand again before "Assistant:" (SpeechLMConfig.voice_at_answer)."""
        if not self.tuned:
            items = self.prompt(text, clip)
        else:
            items = tuning_prompt([("user", ([CLIP] if clip else []) + ([text] if text else []))], self.tokenizer,
                                  self.model.config.voice_at_answer)
            items = items[items.index(CLIP) + 1 :] if clip else items
            items = [x for s in items for x in ([-1] * self.model.config.voice_tokens if isinstance(s, Voice) else [s])]
        return torch.tensor([items], device=self.model.gpt_device)

    def check(self, text: str, clip: Clip | None, max_new_tokens: int) -> torch.Tensor:
        """The LM's inputs (`inputs`), or a ValueError when question + clip + max_new_tokens exceed sequence_len."""
        if not text and clip is None:
            raise ValueError("text: type a question or attach a clip")
        idx = self.inputs(text, clip)
        room = self.sequence_len - idx.size(1) - (len(clip.head_ids) if clip else 0) + 1
        if room < 1:
            raise ValueError(f"text: the question ({idx.size(1)} tokens) with this clip leaves no room in the model's {self.sequence_len} positions")
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens: {max_new_tokens} does not fit; with this question and clip at most {room} (sequence_len {self.sequence_len})")
        return idx

    def answer(self, idx: torch.Tensor, clip: Clip | None, s: Sampling, t_request: float) -> Iterator[dict | Step]:
        """Events for one answer: {"event": "token", "text"} per decoded piece, then "done" with timings.
        A job for the worker (omni.serve.chat_worker): it continues a copy of the clip's cache with the
        question, then asks for each decoding step (`Step`) and gets that step's logits back, so the
        worker batches the steps of every answer under way; run_alone drives it without the worker.

        Time to first token counts from t_request (queueing in the worker included); tokens/s over
        the steps after the first, None for a joint transcript (found whole, then sent at once)."""
        out: list[int] = []
        sent, t_first, n = "", 0.0, 0
        tokens, logits = self.tokens(idx, clip, s), None
        while True:
            try:
                tok = tokens.send(logits) if logits is not None else next(tokens)
            except StopIteration:
                break
            if isinstance(tok, Step):  # not a token: the next step, asked of the worker; its logits go back in
                logits = yield tok
                continue
            logits = None
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if tok == self.eos:
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest of it
                continue
            yield {"event": "token", "text": text[len(sent):]}
            sent = text
        t_end = time.perf_counter()
        text = self.tokenizer.decode(out)
        if text != sent:  # a held-back piece that never completed (it shows as U+FFFD)
            yield {"event": "token", "text": text[len(sent):]}
        yield {
            "event": "done",
            "text": text,
            "tokens": n,
            "first_token_ms": round((t_first - t_request) * 1000, 1),
            "tokens_per_s": round((n - 1) / (t_end - t_first), 1) if n > 1 and t_end > t_first and not self.joint_for(clip, s) else None,
        }

    def tokens(self, idx: torch.Tensor, clip: Clip | None, s: Sampling):
        """The answer's tokens (ints, EOS last unless the budget ends first), each after a `Step` (the
        caller sends back that step's logits): the first step reads the prompt's last token, so a new
        question joins the batch of answers under way. Joint decoding when the run
        decodes so and the answer is greedy: the whole beam search first (no steps to batch), then its tokens."""
        if self.joint_for(clip, s):
            yield from self.joint(idx, clip, s.max_new_tokens)
            return
        gen = torch.Generator(device=idx.device).manual_seed(s.seed) if s.seed is not None else None
        gpt, room = self.model.gpt, idx.size(1) + s.max_new_tokens
        with torch.no_grad():
            cache = clip.head.copy(len(clip.head_ids) + room) if clip is not None else gpt.new_cache(1, room)
            ids = idx[:, :-1]
            if bool((ids < 0).any()):  # the clip's voice tokens again before "Assistant:" (inputs): text, then [voice][text]
                at, n = int((ids[0] < 0).nonzero()[0]), self.model.config.voice_tokens
                gpt.extend(cache, ids[:, :at])
                gpt.extend(cache, ids[:, at + n :], audio=clip.tokens[:, :n])
            elif ids.size(1):
                gpt.extend(cache, ids)
        logits = yield Step(idx[0, -1:], cache)
        for step in range(s.max_new_tokens):
            nxt = sample_next(logits, s.temperature, s.top_k or None, s.top_p, gen)  # the rule of every decoder (omni.model.sampling)
            yield int(nxt[0])
            if int(nxt[0]) == self.eos or step == s.max_new_tokens - 1:
                return
            logits = yield Step(nxt, cache)

    def joint_for(self, clip: Clip | None, s: Sampling) -> bool:
        """Whether this answer is the joint CTC/LM beam search's transcript: a greedy answer about a clip,
        from an alignment run that decodes jointly (its clip has CTC posteriors)."""
        return clip is not None and clip.ctc_logp is not None and s.temperature == 0 and not self.tuned

    def step_many(self, tokens: torch.Tensor, caches: list) -> torch.Tensor:
        """One decoding step of several answers at once (the worker's batch)."""
        with torch.no_grad():
            return self.model.gpt.step_many(tokens, caches)

    def step(self, token: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step of one answer (run_alone)."""
        with torch.no_grad():
            return self.model.gpt.step(token, cache)

    def joint(self, idx: torch.Tensor, clip: Clip, max_new_tokens: int) -> Iterator[int]:
        """The joint CTC/LM beam search's transcript (omni.model.beam), one token at a time once it is
        found (a beam changes its mind until the end, so nothing streams before), then EOS."""
        d = self.decoding
        T = clip.ctc_logp.size(1)
        with torch.no_grad():
            res = joint_beam_search(self.model.gpt, idx, clip.prefix, None, clip.ctc_logp, torch.tensor([T], device=idx.device),
                                    blank=self.bos, eos=self.eos, beam=d.beam, ctc_weight=d.ctc_decode_weight,
                                    max_new_tokens=max_new_tokens, candidates=d.candidates)
        yield from res.tokens[0] + [self.eos]


def describe(model, encoder, decoding: Decoding | None = None) -> str:
    """One line for the page: what was loaded, so no one takes a transcriber for an assistant."""
    c, g = model.config, model.gpt.config
    prompt = f", prompt {c.prompt!r} {c.prompt_position} the audio" if c.prompt else ""
    how = (f"; decoded by joint CTC/LM beam search (beam {decoding.beam})" if decoding is not None and decoding.decode == "joint" else "")
    return (
        f"Alignment model (a transcriber, not an assistant): Whisper {encoder.source or 'encoder'} -> {c.projector} projector "
        f"(k={c.k}, layer {c.layer}{prompt}) -> {g.n_layer}-layer GPT ({g.sequence_len} positions){how}. "
        "It was trained to write down what it hears; a question is only text after the audio."
    )
