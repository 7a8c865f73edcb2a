"""Chat demo latency through the HTTP API: time to the first token and tokens/s for a 5 s
clip, 1 conversation vs 4 at once, measured side by side (alternating) in one run.

    python benchmarks/bench_chat.py [--run RUN] [--repeats 5] [--new 64] [--work /tmp/omni-bench-chat]

A real uvicorn serves omni.serve.chat's app on a free local port in this process; clients are threads
of another process speaking HTTP to it (http.client, streamed reads): as browsers would be, they do
not share the server's interpreter lock, so what is measured is the server's cost alone. Each conversation: POST a conversation, POST the
clip (the server decodes it and runs encoder + layer choice + projector: "upload"), then POST the
question and read the server-sent events: "first token" is from sending the question to receiving
the first token event (prefill, one step, waiting in the worker's queue); tokens/s per conversation is
over the tokens after the first; "aggregate" is all tokens of the round over its wall time.
With 4 conversations the 4 uploads go together, then (after a barrier) the 4 questions. Two kinds of
round: a burst (each conversation asks one question; the round ends with its longest answer, so short
answers of different lengths leave the batch part-empty at the end) and sustained (each conversation
asks --questions questions, the next as soon as its answer ends, as people chatting would: the
throughput of four conversations at once).

Sampling: temperature 1, top-k 50, a fixed seed per conversation, so answers run to --new tokens
rather than stopping at an early BOS; the count actually generated is printed.

Without --run a quick smoke-size model is trained into --work (reused next time): a 24-sentence
synthesized corpus, omni.experiments.pretrain_lm's default LM (depth 4, BPE 4096) for 20 steps, a 20-step
alignment. Timing does not depend on how well it is trained, only on its shape: `--depth 12` puts an
untrained LM of the user's nanochat d12 shape behind it (where batching pays: at 7.3M parameters
the weights stay in the CPU's cache and a step of four costs 1.5x a step of one; at d12 a step
reads its weights from memory, once for the whole batch).
Prints absolute ms and ratios; asserts nothing about timing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank this morning."


def quick_run(work: Path, depth: int = 0) -> Path:
    """A smoke-size alignment run folder under `work` (built once). depth > 0: its LM is an untrained
    GPT of that depth (omni.experiments.pretrain_lm's shape for it, the committed LM's tokenizer):
    only the shape sets the speed, and an untrained LM's near-uniform answers run to --new tokens
    (a few pretraining steps teach it the end-of-text token first, and its answers stop at once)."""
    from omni.experiments import alignment
    from omni.experiments.alignment import AlignConfig, prepare_cache
    from omni.experiments import pretrain_lm
    from omni.experiments.pretrain_lm import PretrainConfig
    from omni.model.gpt import GPT

    work = work / f"d{depth}" if depth else work
    run = work / "run"
    if (run / "model" / "audio_path.json").exists():
        return run
    lm = work / "lm"
    if not (lm / "model.safetensors").exists():
        if depth:
            committed = Path(__file__).resolve().parents[1] / "models" / "lm"
            vocab = json.loads((committed / "config.json").read_text())["vocab_size"]
            gpt = GPT(pretrain_lm.gpt_config(PretrainConfig(depth=depth), vocab_size=vocab))
            gpt.init_weights()
            gpt.save(lm)
            shutil.copy(committed / "tokenizer.json", lm / "tokenizer.json")
        else:
            pretrain_lm.run(PretrainConfig(out=str(lm), steps=20, eval_every=20, eval_tokens=4096, device="cpu"))
    cfg = AlignConfig(corpus=str(work / "corpus"), sentences=24, features=str(work / "features"), lm=str(lm), steps=20,
                      eval_every=20, eval_clips=4, batch_size=8, max_new_tokens=20, whisper_baseline=False, device="cpu",
                      out=str(run / "model"))
    alignment.run(cfg, cache=prepare_cache(cfg))
    return run


def clip_bytes(seconds: float) -> bytes:
    import io

    import soundfile as sf

    from omni.data import audio, tts

    wave = tts.synthesize(SENTENCE).numpy()
    n = int(seconds * audio.SAMPLE_RATE)
    wave = np.pad(wave[:n], (0, max(0, n - len(wave))))
    buf = io.BytesIO()
    sf.write(buf, wave, audio.SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def start_server(session, threads: int = 0) -> tuple[int, object]:
    import uvicorn

    from omni.serve.chat import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(session, threads), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return port, srv


def request(port: int, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    out = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{method} {path}: {r.status} {out}")
    return out


def ask(port: int, cid: str, clip_id: str, new: int, seed: int) -> dict:
    """One question about the clip; its answer read as server-sent events, timed."""
    body = json.dumps({"clip": clip_id, "text": "", "max_new_tokens": new, "temperature": 1.0, "top_k": 50, "seed": seed}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t_send = time.perf_counter()
    conn.request("POST", f"/api/conversations/{cid}/messages", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    # read in chunks and parse once at the end: a browser is another machine, and a client that parsed
    # every event here would take the server's CPU on a small box (first/last token: the chunk they came in)
    t_first = t_last = None
    body = b""
    while chunk := r.read1(65536):
        if b'"token"' in chunk:
            t_last = time.perf_counter()
            t_first = t_first or t_last
        body += chunk
    t_end = time.perf_counter()
    conn.close()
    events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    if errors := [e["message"] for e in events if e["event"] == "error"]:
        raise RuntimeError(errors[0])
    done = next(e for e in events if e["event"] == "done")
    n = done["tokens"]
    return {"first_ms": ((t_first or t_end) - t_send) * 1000, "server_first_ms": done["first_token_ms"], "tokens": n,
            "t_send": t_send, "t_end": t_end,
            "tps": (n - 1) / (t_last - t_first) if n > 1 and t_last and t_last > t_first else float("nan")}


def conversation(port: int, wav: bytes, new: int, seed: int, questions: int, barrier: threading.Barrier, out: list) -> None:
    """Upload the clip, wait for the other conversations, then ask `questions` questions one after another."""
    cid = request(port, "POST", "/api/conversations")["id"]
    t0 = time.perf_counter()
    clip = request(port, "POST", f"/api/conversations/{cid}/clips?name=bench.wav", wav, "audio/wav")
    upload_ms = (time.perf_counter() - t0) * 1000
    barrier.wait()
    for q in range(questions):
        out.append(ask(port, cid, clip["id"], new, seed + 1000 * q) | {"upload_ms": upload_ms, "encode_ms": clip["encode_ms"]})


def round_(port: int, wav: bytes, k: int, new: int, seed: int, questions: int = 1) -> dict:
    """k conversations at once, each asking `questions` questions; aggregate = all their tokens over the
    round's wall time (first question sent to last answer ended)."""
    out: list[dict] = []
    barrier = threading.Barrier(k)
    threads = [threading.Thread(target=conversation, args=(port, wav, new, seed + i, questions, barrier, out)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(out) != k * questions:
        raise RuntimeError(f"{k * questions - len(out)} of {k * questions} answers failed (see above)")
    wall = max(o["t_end"] for o in out) - min(o["t_send"] for o in out)
    return {"convs": out, "aggregate_tps": sum(o["tokens"] for o in out) / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="", help="trained run folder or MLflow run id; default: train a smoke-size one into --work")
    ap.add_argument("--work", default="/tmp/omni-bench-chat")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of each (1 and 4 conversations), alternating")
    ap.add_argument("--new", type=int, default=64, help="max tokens per answer")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="the model's torch threads, as `omni chat --threads` (0 = every core but one)")
    ap.add_argument("--depth", type=int, default=0, help="without --run: an untrained LM of this depth (12 = the user's nanochat d12 shape) instead of a smoke-size trained one")
    ap.add_argument("--questions", type=int, default=8, help="sustained rounds: questions each conversation asks, one after another")
    args = ap.parse_args()

    from omni.serve.chat import model_threads
    from omni.serve.session import Session, load_model

    run = args.run or str(quick_run(Path(args.work), args.depth))
    session = Session(*load_model(run, args.device))
    gpt = session.model.gpt
    print(f"torch {torch.__version__}, {args.threads or model_threads()} threads for the model, {os.cpu_count()} CPUs, device {session.model.gpt_device}, "
          f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"run {run}: GPT {gpt.num_params() / 1e6:.1f}M params ({gpt.config.n_layer} layers x {gpt.config.n_embd}, vocab "
          f"{gpt.config.vocab_size}); {session.description}")
    port, srv = start_server(session, args.threads)
    wav = clip_bytes(args.seconds)
    rounds: dict[int, list[dict]] = {1: [], 4: []}
    sustained: dict[int, list[dict]] = {1: [], 4: []}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        clients.submit(round_, port, wav, 1, args.new, 0).result()  # warm-up: first calls allocate
        for r in range(args.repeats):
            for k in (1, 4):
                rounds[k].append(clients.submit(round_, port, wav, k, args.new, 100 * r).result())
                sustained[k].append(clients.submit(round_, port, wav, k, args.new, 100 * r + 50, args.questions).result())
    srv.should_exit = True

    def med(k: int, key: str) -> float:
        return statistics.median(c[key] for rd in rounds[k] for c in rd["convs"])

    print(f"\n{args.seconds:.1f} s clip, up to {args.new} new tokens, {args.repeats} rounds each, medians over conversations")
    print(f"{'':34s}{'1 conv':>12s}{'4 convs':>12s}{'ratio 4/1':>11s}")
    rows = [("upload (decode+encoder+proj) ms", "upload_ms"), ("  of which encoder+projector ms", "encode_ms"),
            ("question -> first token ms", "first_ms"), ("  server-measured ms", "server_first_ms"),
            ("tokens/s per conversation", "tps"), ("tokens per answer", "tokens")]
    for label, key in rows:
        a, b = med(1, key), med(4, key)
        print(f"{label:34s}{a:12.1f}{b:12.1f}{b / a:11.2f}")
    agg = {k: statistics.median(rd["aggregate_tps"] for rd in rounds[k]) for k in (1, 4)}
    print(f"{'aggregate tokens/s (all convs)':34s}{agg[1]:12.1f}{agg[4]:12.1f}{agg[4] / agg[1]:11.2f}")
    held = {k: statistics.median(rd["aggregate_tps"] for rd in sustained[k]) for k in (1, 4)}
    print(f"{'  sustained (' + str(args.questions) + ' questions each)':34s}{held[1]:12.1f}{held[4]:12.1f}{held[4] / held[1]:11.2f}")
    print("aggregate: one question per conversation, all sent at once; the round lasts as long as its longest answer.\n"
          f"sustained: each conversation asks its next question as soon as its answer ends, {args.questions} in all.")
    e2e = med(1, "upload_ms") + med(1, "first_ms")
    print(f"\n1 conversation, upload + question -> first token: {e2e:.0f} ms; the encoder+projector is "
          f"{med(1, 'encode_ms') / e2e:.0%} of it and runs at upload, before the question is sent.")


if __name__ == "__main__":
    main()
