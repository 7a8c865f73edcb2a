"""The chat demo (omni.serve.chat): GPT.stream, the HTTP API through FastAPI's TestClient and a real uvicorn
server, bad input, concurrent conversations, the terminal mode, and one real-browser test (Debian's
Chromium driven by Playwright; skipped only where no Chromium is installed).

The model is the `tiny_alignment` run of conftest.py: a random 1-layer LM whose output depends on the
audio, so answers to different clips differ and a mix-up between conversations would show."""

import asyncio
import dataclasses
import io
import json
import select
import socket
import threading
import time
from contextlib import contextmanager
from copy import copy
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM
from omni.cli import main
from omni.data import audio
from omni.model.encoder import collate_states
from omni.serve.chat import MAX_UPLOAD_BYTES, create_app
from omni.serve.session import Session, load_model
from omni.serve.chat_worker import Step, Worker



@pytest.fixture(scope="module")
def session(tiny_alignment):
    return Session(*load_model(str(tiny_alignment.run)))


@pytest.fixture(scope="module")
def client(session):
    from fastapi.testclient import TestClient

    with TestClient(create_app(session)) as c:
        yield c


@pytest.fixture(scope="module")
def clips(tiny_alignment):
    """Two different test clips of the corpus: (path, bytes)."""
    rows = [json.loads(x) for x in (tiny_alignment.corpus / "test.jsonl").read_text().splitlines() if x.strip()]
    paths = [Path(r["audio"]) if Path(r["audio"]).is_absolute() else tiny_alignment.corpus / r["audio"] for r in rows[:2]]
    return [(p, p.read_bytes()) for p in paths]


@contextmanager
def serving(session):
    """A real uvicorn on a free local port, in a thread: base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(session), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(session):
    with serving(session) as url:
        yield url


def expected(session, wave: torch.Tensor, prompt: str | None = None, max_new_tokens: int = 40) -> str:
    """What the library's own transcribe gives for this clip; with `prompt`, the run's config gets that
    prompt after the audio (SpeechLM's prompt_position="after" layout, the chat's layout for a question)."""
    model = session.model
    if prompt is not None:
        model = copy(model)
        model.config = dataclasses.replace(model.config, prompt=prompt, prompt_position="after")
    hidden, lengths = collate_states(session.encoder.encode([wave], mode=session.mode))
    return model.transcribe(hidden, lengths, max_new_tokens=max_new_tokens)[0]


def sse(lines) -> list[dict]:
    return [json.loads(x[len("data: "):]) for x in lines if x.startswith("data: ")]


def ask(client, cid, **body) -> list[dict]:
    with client.stream("POST", f"/api/conversations/{cid}/messages", json=body) as r:
        assert r.status_code == 200, r.read()
        return sse(r.iter_lines())


def upload(client, cid, data: bytes, name="a.wav"):
    return client.post(f"/api/conversations/{cid}/clips", params={"name": name}, content=data)


# --- GPT.stream -------------------------------------------------------------------------------
def test_stream_yields_generate_step_by_step():
    from omni.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=64, vocab_size=37, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    with torch.no_grad():
        gpt.lm_head.weight.normal_(0, 1.0)
    idx, aud = torch.randint(0, 37, (2, 3)), torch.randn(2, 4, 32)
    for kw in (dict(), dict(temperature=0.9, top_k=5, seed=3), dict(use_cache=False)):
        steps = list(gpt.stream(idx, audio=aud, max_new_tokens=9, **kw))
        assert len(steps) == 9 and all(s.shape == (2,) for s in steps)
        assert torch.equal(torch.stack(steps, 1), gpt.generate(idx, audio=aud, max_new_tokens=9, **kw))
    first = int(gpt.generate(idx[:1], max_new_tokens=1)[0, 0])  # stop on the greedy first token: one step
    assert [s.tolist() for s in gpt.stream(idx[:1], max_new_tokens=9, stop_token=first)] == [[first]]


# --- the page and the API ---------------------------------------------------------------------
def test_page_assets_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/assets/chat.js">' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
    for name in ("chat.js", "chat.css"):
        r = client.get(f"/assets/{name}")
        assert r.status_code == 200 and len(r.text) > 500 and "https://" not in r.text
    info = client.get("/api/info").json()
    assert "transcriber" in info["model"] and "1-layer GPT" in info["model"]
    # the tiny LM holds 256 positions: 12.5 audio tokens per second leave room for ~19 s, under Whisper's 30
    assert info["limits"]["sequence_len"] == 256 and 15 < info["limits"]["clip_seconds"] < 20
    assert info["limits"]["upload_bytes"] == MAX_UPLOAD_BYTES


def test_upload_then_answer_streams_the_transcript(client, session, clips):
    path, data = clips[0]
    cid = client.post("/api/conversations").json()["id"]
    r = upload(client, cid, data, "first.wav")
    assert r.status_code == 200, r.json()
    clip = r.json()
    assert clip["name"] == "first.wav" and clip["audio_tokens"] > 5 and clip["seconds"] > 0.5
    events = ask(client, cid, clip=clip["id"], max_new_tokens=40)
    tokens, done = [e for e in events if e["event"] == "token"], events[-1]
    assert done["event"] == "done" and len(tokens) > 3  # streamed piece by piece, not in one go
    assert "".join(e["text"] for e in tokens) == done["text"] == expected(session, audio.load(path))
    assert done["first_token_ms"] > 0 and done["tokens"] >= len(tokens)
    # a question goes after the audio, exactly where SpeechLM puts an "after" prompt
    q = ask(client, cid, clip=clip["id"], text="Who is speaking?", max_new_tokens=40)[-1]
    assert q["text"] == expected(session, audio.load(path), prompt="Who is speaking?")
    # a turn without a clip is text only: the LM continues the text
    t = ask(client, cid, text="The cat", max_new_tokens=5)[-1]
    ids = torch.tensor([[session.bos] + session.tokenizer.encode("The cat")])
    out = session.model.gpt.generate(ids, max_new_tokens=5, stop_token=session.bos)[0].tolist()
    assert t["text"] == session.tokenizer.decode(out[: out.index(session.bos)] if session.bos in out else out)
    history = client.get(f"/api/conversations/{cid}").json()["history"]
    assert [h["question"] for h in history] == ["", "Who is speaking?", "The cat"]
    assert history[0]["answer"] == done["text"] and history[0]["clip"] == "first.wav"


def test_flac_and_ogg_uploads_work(client, clips):
    wave = audio.load(clips[0][0]).numpy()
    cid = client.post("/api/conversations").json()["id"]
    for fmt in ("FLAC", "OGG"):
        buf = io.BytesIO()
        sf.write(buf, wave, audio.SAMPLE_RATE, format=fmt)
        r = upload(client, cid, buf.getvalue(), f"clip.{fmt.lower()}")
        assert r.status_code == 200, r.json()
        assert abs(r.json()["seconds"] - len(wave) / audio.SAMPLE_RATE) < 0.05


def test_bad_input_is_refused_clearly_and_the_server_keeps_serving(client, session, clips):
    cid = client.post("/api/conversations").json()["id"]
    data = clips[0][1]

    def refused(r, status, *words):
        assert r.status_code == status, (r.status_code, r.text)
        message = r.json()["error"]
        assert all(w in message for w in words), message

    refused(upload(client, cid, b"just some text, not audio", "notes.txt"), 415, "notes.txt", "not an audio file")
    refused(upload(client, cid, b"", "empty.wav"), 422, "empty.wav", "empty upload")
    refused(upload(client, cid, b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)), "corrupt.wav"), 415, "corrupt.wav")
    refused(upload(client, cid, b"\x1a\x45\xdf\xa3" + b"\x00" * 100, "rec.webm"), 415, "rec.webm", "WebM")
    refused(upload(client, cid, data[:44 + 200], "tiny.wav"), 422, "tiny.wav", "too short")
    long = np.random.default_rng(0).uniform(-0.3, 0.3, int((session.max_seconds + 1) * audio.SAMPLE_RATE)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, long, audio.SAMPLE_RATE, format="WAV", subtype="PCM_16")
    refused(upload(client, cid, buf.getvalue(), "long.wav"), 422, "long.wav", "longer than", f"{session.max_seconds:.1f} s")
    refused(client.post("/api/conversations/nope/clips", content=data), 404, "nope")

    msg = f"/api/conversations/{cid}/messages"
    refused(client.post(msg, json={"text": "x" * 2001}), 422, "text", "2000")
    refused(client.post(msg, json={"text": "hi", "temperature": 5}), 422, "temperature", "less than or equal to 2")
    refused(client.post(msg, json={"text": "hi", "temperature": -1}), 422, "temperature")
    refused(client.post(msg, json={"text": "hi", "top_p": 0}), 422, "top_p", "greater than 0")
    refused(client.post(msg, json={"text": "hi", "top_k": -3}), 422, "top_k")
    refused(client.post(msg, json={"text": "hi", "max_new_tokens": 0}), 422, "max_new_tokens")
    refused(client.post(msg, json={"text": "hi", "max_new_tokens": 1000}), 422, "max_new_tokens", "at most", "sequence_len 256")
    refused(client.post(msg, json={"text": "hi", "max_tokens": 1000}), 422, "max_new_tokens", "at most")  # the old name, read until the next release
    refused(client.post(msg, json={"text": ""}), 422, "type a question or attach a clip")
    refused(client.post(msg, json={"text": "hi", "clip": "nope"}), 404, "clip", "nope")
    refused(client.post(msg, content=b"{not json", headers={"content-type": "application/json"}), 422)
    refused(client.post("/api/conversations/nope/messages", json={"text": "hi"}), 404, "not found")
    # still serving: a good upload and answer after all of that
    clip = upload(client, cid, data).json()
    assert ask(client, cid, clip=clip["id"], max_new_tokens=5)[-1]["event"] == "done"


def test_upload_over_the_size_limit_is_refused_before_the_body_is_read(server):
    host, port = server.removeprefix("http://").split(":")
    cid = json.loads(_http(server, "POST", "/api/conversations")[1])["id"]
    head = f"POST /api/conversations/{cid}/clips?name=big.wav HTTP/1.1\r\nHost: {host}\r\n"
    # a declared 200 MB: the answer comes before a single body byte is sent
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall((head + f"Content-Length: {200 * 2**20}\r\n\r\n").encode())
        reply = _reply(s)
    assert reply.startswith("HTTP/1.1 413") and "200.0 MB" in reply and "limit is 20 MB" in reply
    # no Content-Length (chunked): the server stops reading at the limit, not at 200 MB
    chunk = b"%x\r\n" % 2**20 + b"\0" * 2**20 + b"\r\n"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        while sent < 200 and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        reply = _reply(s)
    assert reply.startswith("HTTP/1.1 413") and "over the 20 MB limit" in reply, reply[:200]
    assert sent < 40, f"the client could send {sent} MB"
    assert _http(server, "GET", "/api/info")[0] == 200  # and it still serves


def _reply(s: socket.socket) -> str:
    """An HTTP response read off a raw socket: headers, then content-length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        next((h.split(b":")[1] for h in data.split(b"\r\n") if h.lower().startswith(b"content-length:")), b"0")
    ):
        more = s.recv(65536)
        if not more:
            break
        data += more
    return data.decode(errors="replace")


def _http(base: str, method: str, path: str, body: dict | None = None):
    import urllib.request

    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read().decode()


# --- several conversations at once ------------------------------------------------------------
def test_two_concurrent_conversations_do_not_mix(server, session, clips):
    import urllib.request

    want = [expected(session, audio.load(p), max_new_tokens=60) for p, _ in clips]
    assert want[0] != want[1]  # otherwise a mix-up could not show
    results: dict[int, tuple] = {}

    def converse(i: int):
        cid = json.loads(_http(server, "POST", "/api/conversations")[1])["id"]
        req = urllib.request.Request(f"{server}/api/conversations/{cid}/clips?name=clip{i}.wav", data=clips[i][1], method="POST")
        clip = json.loads(urllib.request.urlopen(req, timeout=60).read())
        _, body = _http(server, "POST", f"/api/conversations/{cid}/messages", {"clip": clip["id"], "max_new_tokens": 60})
        results[i] = (cid, sse(body.splitlines()))

    threads = [threading.Thread(target=converse, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in (0, 1):
        cid, events = results[i]
        assert "".join(e["text"] for e in events if e["event"] == "token") == events[-1]["text"] == want[i]
        history = json.loads(_http(server, "GET", f"/api/conversations/{cid}")[1])["history"]
        assert [(h["clip"], h["answer"]) for h in history] == [(f"clip{i}.wav", want[i])]


def test_worker_interleaves_jobs_one_step_at_a_time():
    worker, order, b_submitted = Worker(), [], threading.Event()

    def job(name: str, n: int):
        for i in range(n):
            if name == "a" and i == 0:
                b_submitted.wait(5)  # b arrives while a is running
            order.append(name)
            yield {"event": "token", "text": f"{name}{i}"}

    async def collect(name, n, out):
        out[name] = [e["text"] async for e in worker.run(job(name, n))]

    async def both():
        out = {}
        a = asyncio.create_task(collect("a", 10, out))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(collect("b", 3, out))
        await asyncio.sleep(0)  # let b submit
        b_submitted.set()
        await asyncio.gather(a, b)
        return out

    out = asyncio.run(both())
    assert out == {"a": [f"a{i}" for i in range(10)], "b": ["b0", "b1", "b2"]}
    assert order.index("b") < 4 and "".join(order).rstrip("a").count("b") == 3  # b finished while a still ran
    assert order[-1] == "a"


def test_worker_batches_the_steps_of_concurrent_answers():
    """Jobs asking for decoding steps at the same time get them in one step_many call; each job gets its
    own row of logits back (the row encodes the job and its step, so a mix-up would show)."""
    calls = []

    def step_many(tokens, caches):
        calls.append(len(caches))
        return torch.stack([torch.tensor([float(c), float(t)]) for c, t in zip(caches, tokens)])

    worker = Worker(step_many)

    def job(name: int, n: int):
        for i in range(n):
            logits = yield Step(torch.tensor([i]), name)
            assert logits.tolist() == [[float(name), float(i)]], (name, i, logits)
            yield {"event": "token", "text": f"{name}:{i}"}

    async def all_three():
        async def collect(name, n):
            return [e["text"] async for e in worker.run(job(name, n))]
        return await asyncio.gather(collect(1, 6), collect(2, 6), collect(3, 3))

    out = asyncio.run(all_three())
    assert out == [[f"{k}:{i}" for i in range(n)] for k, n in ((1, 6), (2, 6), (3, 3))]
    assert sum(calls) == 15 and max(calls) == 3 and len(calls) <= 8  # batched: far fewer calls than 15 steps


def test_worker_reports_a_failing_job_and_keeps_going():
    worker = Worker()

    def bad():
        yield {"event": "token", "text": "x"}
        raise ValueError("max_new_tokens: too many")

    async def run(steps):
        return [e async for e in worker.run(steps)]

    assert asyncio.run(run(bad())) == [{"event": "token", "text": "x"}, {"event": "error", "message": "max_new_tokens: too many"}]
    assert asyncio.run(run(iter([{"event": "done"}]))) == [{"event": "done"}]


# --- the command ------------------------------------------------------------------------------
def test_cli_streams_answers_and_refuses_a_run_that_is_not_a_model(tiny_alignment, session, clips, tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert main(["chat", "--run", str(tmp_path / "notarun")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omni: error: --run") and "\n" not in err
    (tmp_path / "half" / "model").mkdir(parents=True)  # a run folder whose metadata is incomplete
    (tmp_path / "half" / "model" / "audio_path.json").write_text("{}")
    assert main(["chat", "--run", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omni: error: --run") and "not a trained model" in err and "\n" not in err
    assert main(["chat", "--run", str(tiny_alignment.run), "--cli", str(clips[0][0]), "--temperature", "9"]) == 2
    assert "temperature" in capsys.readouterr().err
    path = str(clips[0][0])
    assert main(["chat", "--run", str(tiny_alignment.run), "--cli", path, "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: {expected(session, audio.load(path))}\n"
    assert "first token" in err and "tokens/s" in err


def test_a_port_in_use_is_one_clear_line_before_the_model_loads(tiny_alignment, capsys, monkeypatch):
    import omni.serve.session

    monkeypatch.setattr(omni.serve.session, "load_model", lambda *a, **k: pytest.fail("the model loaded before the port was checked"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["chat", "--run", str(tiny_alignment.run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"omni: error: --port {port}: already in use on 127.0.0.1 (another omni chat?); choose another with --port"


# --- one real browser -------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_browser_uploads_a_clip_asks_and_sees_the_answer_stream(session, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from omni.data import tts

    def slowly(events):  # 20 ms per piece, so the browser gets them in separate reads and shows each
        reply = None
        while True:
            try:
                e = events.send(reply)
            except StopIteration:
                return
            if isinstance(e, Step):  # the decoding steps go on to the worker, their logits back in
                reply = yield e
                continue
            reply = None
            time.sleep(0.02)
            yield e

    slow = copy(session)
    slow.answer = lambda *a: slowly(session.answer(*a))
    wav = tmp_path / "hello.wav"
    audio.save(wav, tts.synthesize("Hello, can you hear me?"))
    want = expected(session, audio.load(wav), prompt="What did you hear?", max_new_tokens=30)
    with serving(slow) as url, sync_playwright() as p:
        # a fake microphone (a beep) and no permission prompt: the Record button can be tested too
        fake_mic = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + fake_mic)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("transcriber", timeout=15000)
            page.set_input_files("#file", str(wav))
            expect(page.locator("#clip-label")).to_contain_text("audio tokens", timeout=20000)
            # record every text the answer bubble shows, to see it grow piece by piece
            page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
                const b = document.querySelector('.bot .bubble'); if (b) window.seen.push(b.textContent);
              }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
            page.fill("#max_new_tokens", "30")
            page.fill("#text", "What did you hear?")
            page.click("#send")
            expect(page.locator(".bot .stats")).to_contain_text("first token", timeout=20000)
            assert page.locator(".bot .bubble").text_content() == want
            partial = {s for s in page.evaluate("window.seen") if s and s != want}
            assert len(partial) >= 3, partial  # the answer appeared piece by piece, not at once
            assert page.locator(".user .bubble audio").count() == 1
            # record ~1 s from the microphone: the page converts Chromium's WebM to WAV and uploads it
            page.click("#record")
            expect(page.locator("#record")).to_contain_text("Stop")
            page.wait_for_timeout(1200)
            page.click("#record")
            expect(page.locator("#clip-label")).to_contain_text("recording.wav", timeout=20000)
            expect(page.locator("#clip-label")).to_contain_text("audio tokens")
            assert page.locator("#error").is_hidden()
        finally:
            browser.close()


SPOKEN = "I found her more interesting than her little problem."  # spoken by a voice no model here trained on (en-us+f4)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_speech_into_the_microphone_is_heard_by_the_hearing_model(tmp_path):
    """A user speaking into the microphone: Chromium's fake capture plays a wav of speech
    (--use-file-for-fake-audio-capture) as the microphone; the page records it, converts it to WAV,
    uploads it; asked "What did you hear?", the committed hearing model (models/hear, joint decoding)
    answers with the spoken words."""
    from playwright.sync_api import expect, sync_playwright

    from omni.cli import HEAR
    from omni.data import tts
    from omni.eval import metrics

    session = Session(*load_model(HEAR))
    spoken = SPOKEN
    wav = tmp_path / "speech.wav"
    audio.save(wav, torch.cat([torch.zeros(8000), tts.synthesize(spoken, voice="en-us+f4", rate=150), torch.zeros(16000)]))
    seconds = audio.load(wav).numel() / 16000
    mic = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop"]
    with serving(session) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + mic)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("joint CTC/LM", timeout=15000)
            page.click("#record")
            expect(page.locator("#record")).to_contain_text("Stop")
            page.wait_for_timeout(int(1000 * seconds) + 500)  # the whole utterance, as a speaker would
            page.click("#record")
            expect(page.locator("#clip-label")).to_contain_text("recording.wav", timeout=20000)
            expect(page.locator("#clip-label")).to_contain_text("audio tokens", timeout=20000)  # uploaded and encoded, not "Uploading ..."
            page.fill("#max_new_tokens", "40")
            page.fill("#text", "What did you hear?")
            page.click("#send")
            expect(page.locator(".bot .stats")).to_contain_text("first token", timeout=30000)
            heard = page.locator(".bot .bubble").text_content()
            assert page.locator("#error").is_hidden()
        finally:
            browser.close()
    said = metrics.normalize_text(spoken).split()
    got = set(metrics.normalize_text(heard).split())
    assert sum(w in got for w in said) >= 0.75 * len(said), (spoken, heard)
