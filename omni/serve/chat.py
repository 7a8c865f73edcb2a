"""The chat demo (`omni chat`): a local web page (or a terminal) that sends audio and a question to
a trained model and streams the answer back token by token.

    omni chat --run RUN [--host 127.0.0.1] [--port 8000]      web app; the page is omni/serve/assets/chat.*
    omni chat --run RUN --cli AUDIO... [--question TEXT]      the same in a terminal

Design choices:
- One model in memory, one worker thread for every model call (omni.serve.chat_worker.Worker): requests
  never run the model at the same time, and each answer has its own KV cache, so conversations
  cannot mix. The decoding steps of concurrent answers run as one batch (GPT.step_many), and a
  question joins that batch from its first token, so a second tab costs little and waits for one
  step, not for a whole answer.
- Runs decode as they were trained to (`Decoding`): a run with a CTC head answers a greedy request by
  joint CTC/LM beam search, whose transcript is found whole and then sent token by token.
- A clip is encoded (Whisper -> layer choice -> projector) and read into the LM's KV cache when it is
  uploaded, while the user types, and kept with its conversation: a question then reads only its own
  tokens (on a copy of the clip's cache), and a second question about the clip does not read it again.
- Prompt layout = SpeechLM's with prompt_position="after": [audio soft tokens][question][BOS] and the
  answer follows (an empty question uses the run's own prompt, as in training). Without audio the
  turn is [BOS][question]: the LM continues the text. Each turn stands alone: the trained models are
  alignment models (transcribers), which never saw a dialogue; the history is kept for the page.
- Uploads are the raw file as the request body (not a form), so the size limit is checked on the
  Content-Length header and while reading, before 200 MB could reach memory.
- Audio is decoded by soundfile from memory (WAV, FLAC, OGG Vorbis/Opus, MP3). Chromium records WebM,
  which libsndfile cannot read: the page decodes its own recordings and uploads them as WAV.
- Every refusal is a 4xx JSON {"error": "..."} naming the parameter or file; the server keeps serving.
- The model is loaded through `load_model` (omni.experiments.audio_run.load_run underneath), which turns a half-built run into one line.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AliasChoices, BaseModel, Field, ValidationError

from omni.data import audio
from omni.experiments.audio_run import load_run, run_decoding, run_encoder
from omni.experiments.tuning import prompt as tuning_prompt
from omni.model.beam import joint_beam_search
from omni.model.speech_lm import Decoding
from omni.model import mel
from omni.model.sampling import sample_next
from omni.serve.chat_worker import Step, Worker, run_alone

ASSETS = Path(__file__).parent / "assets"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload over this is refused before its body is read
MAX_MESSAGE_CHARS = 2000  # a typed question over this is refused
MIN_SECONDS = 0.1  # shorter clips give no encoder frame worth a token
MAX_CONVERSATIONS = 64  # the least recently used conversation is forgotten beyond this
MAX_CLIPS = 8  # clips kept per conversation (oldest dropped)
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


class Message(Sampling):
    text: str = Field("", max_length=MAX_MESSAGE_CHARS)  # the question; "" = the run's own prompt
    clip: str | None = Field(None, max_length=64)  # a clip id from this conversation's uploads


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


def decode_upload(data: bytes, name: str, max_seconds: float) -> torch.Tensor:
    """Uploaded file bytes -> 16 kHz mono float32, or an AudioError naming `name` and what is wrong."""
    if not data:
        raise audio.AudioError(f"{name}: empty upload (0 bytes)")
    if data[:4] == b"\x1a\x45\xdf\xa3" or data[4:8] == b"ftyp":
        raise Undecodable(
            f"{name}: WebM/MP4 audio cannot be decoded here (libsndfile reads WAV, FLAC, OGG, MP3); convert it, "
            "or record on the page, which sends WAV"
        )
    try:
        info = sf.info(io.BytesIO(data))
        if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise audio.AudioError(f"{name}: {info.frames / info.samplerate:.1f} s is longer than this model's limit of {max_seconds:.1f} s")
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except audio.AudioError:
        raise
    except Exception as e:  # libsndfile: unknown format, corrupt header, truncated data
        raise Undecodable(f"{name}: not an audio file this server can decode (WAV, FLAC, OGG, MP3): {getattr(e, 'error_string', e)}") from e
    if samples.size == 0:
        raise audio.AudioError(f"{name}: no audio samples in the file")
    if samples.shape[0] / sr < MIN_SECONDS:
        raise audio.AudioError(f"{name}: {samples.shape[0] / sr:.3f} s is too short (at least {MIN_SECONDS} s)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    wave = audio.resample(np.ascontiguousarray(mono), sr, audio.SAMPLE_RATE)
    return audio.validate(wave, name, max_seconds)


class Undecodable(audio.AudioError):
    """The upload is not in a format this server can decode (HTTP 415)."""


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


@dataclass
class Conversation:
    id: str
    history: list[dict] = field(default_factory=list)  # turns: question, clip name, answer, stats
    clips: OrderedDict[str, Clip] = field(default_factory=OrderedDict)


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
            embeds = torch.cat([gpt.embed(before), clip.tokens.to(gpt.embed(before).dtype)], dim=1)
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
        `[BOS]User:<audio> question\nAssistant:` (omni.experiments.tuning's format)."""
        if not self.tuned:
            items = self.prompt(text, clip)
        else:
            items = tuning_prompt([("user", ([CLIP] if clip else []) + ([text] if text else []))], self.tokenizer)
            items = items[items.index(CLIP) + 1 :] if clip else items
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
        the steps after the first."""
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
            "tokens_per_s": round((n - 1) / (t_end - t_first), 1) if n > 1 and t_end > t_first else None,
        }

    def tokens(self, idx: torch.Tensor, clip: Clip | None, s: Sampling):
        """The answer's tokens (ints, EOS last unless the budget ends first), each after a `Step` (the
        caller sends back that step's logits): the first step reads the prompt's last token, so a new
        question joins the batch of answers under way. Joint decoding when the run
        decodes so and the answer is greedy: the whole beam search first (no steps to batch), then its tokens."""
        if clip is not None and clip.ctc_logp is not None and s.temperature == 0 and not self.tuned:
            yield from self.joint(idx, clip, s.max_new_tokens)
            return
        gen = torch.Generator(device=idx.device).manual_seed(s.seed) if s.seed is not None else None
        gpt, room = self.model.gpt, idx.size(1) + s.max_new_tokens
        with torch.no_grad():
            cache = clip.head.copy(len(clip.head_ids) + room) if clip is not None else gpt.new_cache(1, room)
            if idx.size(1) > 1:
                gpt.extend(cache, idx[:, :-1])
        logits = yield Step(idx[0, -1:], cache)
        for step in range(s.max_new_tokens):
            nxt = sample_next(logits, s.temperature, s.top_k or None, s.top_p, gen)  # the rule of every decoder (omni.model.sampling)
            yield int(nxt[0])
            if int(nxt[0]) == self.eos or step == s.max_new_tokens - 1:
                return
            logits = yield Step(nxt, cache)

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


def sampling(**kw) -> Sampling:
    """Sampling values checked against the API's ranges; a bad one is a one-line ValueError."""
    try:
        return Sampling(**kw)
    except ValidationError as e:
        raise ValueError(one_line(e.errors())) from None


def model_threads() -> int:
    """The chat's torch threads when not told: every core but one (kept for the HTTP loop), at least 1."""
    return max(1, (os.cpu_count() or 1) - 1)


def create_app(session: Session, threads: int = 0):
    """The FastAPI app: the page, its assets, and a small JSON + server-sent-events API. threads: torch
    threads of the model calls (0 = model_threads())."""
    app = FastAPI(title="omni chat", docs_url=None, redoc_url=None)
    app.mount("/assets", StaticFiles(directory=ASSETS), name="assets")
    worker = Worker(session.step_many, threads=threads or model_threads())
    conversations: OrderedDict[str, Conversation] = OrderedDict()
    app.state.session, app.state.worker, app.state.conversations = session, worker, conversations

    class Refused(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(Refused)
    async def _refused(_: Request, e: Refused):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return JSONResponse({"error": one_line(e.errors())}, status_code=422)

    def conversation(cid: str) -> Conversation:
        if cid not in conversations:
            raise Refused(404, f"conversation {cid!r} not found (the server forgets the least recent beyond {MAX_CONVERSATIONS}); start a new one")
        conversations.move_to_end(cid)
        return conversations[cid]

    @app.get("/")
    async def page():
        return FileResponse(ASSETS / "chat.html")

    @app.get("/api/info")
    async def info():
        return {
            "model": session.description,
            "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "message_chars": MAX_MESSAGE_CHARS, "clip_seconds": round(session.max_seconds, 1),
                       "sequence_len": session.sequence_len, "max_new_tokens": MAX_NEW_TOKENS},
            "defaults": Sampling().model_dump(),
        }

    @app.post("/api/conversations")
    async def new_conversation():
        conv = Conversation(uuid.uuid4().hex[:12])
        conversations[conv.id] = conv
        while len(conversations) > MAX_CONVERSATIONS:
            conversations.popitem(last=False)
        return {"id": conv.id}

    @app.get("/api/conversations/{cid}")
    async def get_conversation(cid: str):
        conv = conversation(cid)
        return {"id": conv.id, "history": conv.history, "clips": [{"id": k, "name": c.name, "seconds": c.seconds} for k, c in conv.clips.items()]}

    @app.post("/api/conversations/{cid}/clips")
    async def upload(cid: str, request: Request, name: str = "clip"):
        conv = conversation(cid)
        limit_mb = MAX_UPLOAD_BYTES / 2**20
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            raise Refused(413, f"{name}: upload is {int(declared) / 2**20:.1f} MB; the limit is {limit_mb:.0f} MB")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:  # no (or a false) Content-Length: stop reading at the limit
                raise Refused(413, f"{name}: upload is over the {limit_mb:.0f} MB limit")
        try:
            wave = await run_in_threadpool(decode_upload, bytes(data), name, session.max_seconds)
        except audio.AudioError as e:
            raise Refused(415 if isinstance(e, Undecodable) else 422, str(e)) from None
        clip = None
        async for event in worker.run(session.encode(wave, name)):
            clip = event
        if not isinstance(clip, Clip):
            raise Refused(500, f"{name}: encoding failed: {clip.get('message') if clip else 'no result'}")
        clip_id = uuid.uuid4().hex[:12]
        conv.clips[clip_id] = clip
        while len(conv.clips) > MAX_CLIPS:
            conv.clips.popitem(last=False)
        return {"id": clip_id, "name": name, "seconds": round(clip.seconds, 2), "audio_tokens": clip.prefix.size(1), "encode_ms": round(clip.encode_ms, 1)}

    @app.post("/api/conversations/{cid}/messages")
    async def message(cid: str, msg: Message):
        t_request = time.perf_counter()
        conv = conversation(cid)
        clip = None
        if msg.clip is not None:
            if msg.clip not in conv.clips:
                raise Refused(404, f"clip: {msg.clip!r} is not a clip of this conversation (upload it first)")
            clip = conv.clips[msg.clip]
        try:
            inputs = session.check(msg.text, clip, msg.max_new_tokens)
        except ValueError as e:
            raise Refused(422, str(e)) from None
        s = Sampling(**msg.model_dump(exclude={"text", "clip"}))

        async def events():
            import json

            async for event in worker.run(session.answer(inputs, clip, s, t_request)):
                if event.get("event") == "done":
                    conv.history.append({"question": msg.text, "clip": clip.name if clip else None, "answer": event["text"],
                                         "first_token_ms": event["first_token_ms"], "tokens_per_s": event["tokens_per_s"]})
                yield f"data: {json.dumps(event)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app



def serve(session: Session, host: str = "127.0.0.1", port: int = 8000, threads: int = 0) -> None:
    """Serve the app with uvicorn until Ctrl-C; prints the address first."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"omni chat: listening on {host}: anyone who can reach this machine can use the model")
    print(f"omni chat: {session.description}")
    print(f"omni chat: open http://{'localhost' if host == '127.0.0.1' else host}:{port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(session, threads), host=host, port=port, log_level="warning")


def chat_cli(session: Session, paths: list[str], question: str, s: Sampling, out=None) -> None:
    """Answer each file in the terminal: the answer streams to `out` (stdout), timings to stderr."""
    import sys

    out = out or sys.stdout
    waves = [audio.load(p, max_seconds=session.max_seconds) for p in paths]  # every file checked before any work
    for path, wave in zip(paths, waves):
        t0 = time.perf_counter()
        clip = next(session.encode(wave, path))
        inputs = session.check(question, clip, s.max_new_tokens)
        print(f"{path}: ", end="", file=out, flush=True)
        for event in run_alone(session.answer(inputs, clip, s, t0), session.step):
            if event["event"] == "token":
                print(event["text"], end="", file=out, flush=True)
        print(file=out, flush=True)
        print(f"  (encoder {clip.encode_ms:.0f} ms, first token {event['first_token_ms']:.0f} ms, "
              f"{event['tokens_per_s'] or 0:.1f} tokens/s, {event['tokens']} tokens)", file=sys.stderr, flush=True)
