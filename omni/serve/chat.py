"""The chat demo (`omni chat`): a local web page (or a terminal) that sends audio and a question to
a trained model and streams the answer back token by token. The model side (a clip read on upload, a
question's prompt, an answer as a job) is omni.serve.session.

    omni chat --run RUN [--host 127.0.0.1] [--port 8000]      web app; the page is omni/serve/assets/chat.*
    omni chat --run RUN --cli AUDIO... [--question TEXT]      the same in a terminal

Design choices:
- One model in memory, one worker thread for every model call (omni.serve.chat_worker.Worker): requests
  never run the model at the same time, and each answer has its own KV cache, so conversations
  cannot mix. The decoding steps of concurrent answers run as one batch (GPT.step_many), and a
  question joins that batch from its first token, so a second tab costs little and waits for one
  step, not for a whole answer.
- A conversation keeps its clips (encoded on upload) and its history, for the page; each turn stands
  alone for the model.
- Uploads are the raw file as the request body (not a form), so the size limit is checked on the
  Content-Length header and while reading, before 200 MB could reach memory.
- Audio is decoded by soundfile from memory (WAV, FLAC, OGG Vorbis/Opus, MP3). Chromium records WebM,
  which libsndfile cannot read: the page decodes its own recordings and uploads them as WAV.
- Every refusal is a 4xx JSON {"error": "..."} naming the parameter or file; the server keeps serving.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from omni.data import audio
from omni.serve.chat_worker import Worker, run_alone
from omni.serve.session import MAX_NEW_TOKENS, Clip, Sampling, Session, one_line

ASSETS = Path(__file__).parent / "assets"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload over this is refused before its body is read
MAX_MESSAGE_CHARS = 2000  # a typed question over this is refused
MIN_SECONDS = 0.1  # shorter clips give no encoder frame worth a token
MAX_CONVERSATIONS = 64  # the least recently used conversation is forgotten beyond this
MAX_CLIPS = 8  # clips kept per conversation (oldest dropped)


class Message(Sampling):
    text: str = Field("", max_length=MAX_MESSAGE_CHARS)  # the question; "" = the run's own prompt
    clip: str | None = Field(None, max_length=64)  # a clip id from this conversation's uploads


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
class Conversation:
    id: str
    history: list[dict] = field(default_factory=list)  # turns: question, clip name, answer, stats
    clips: OrderedDict[str, Clip] = field(default_factory=OrderedDict)


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
        rate = f"{event['tokens_per_s']:.1f} tokens/s" if event["tokens_per_s"] is not None else "found whole by the joint beam search"
        print(f"  (encoder {clip.encode_ms:.0f} ms, first token {event['first_token_ms']:.0f} ms, {rate}, "
              f"{event['tokens']} tokens)", file=sys.stderr, flush=True)
