"""Transcription latency: time to the first token for one 5 s clip, warm, by stage; and
greedy decoding tokens/s with vs without the KV cache.

    python benchmarks/bench_transcribe.py [--run RUN_DIR] [--repeats 20] [--new 64]

With --run, the model is an alignment run's (omni.experiments.audio_run.load_run: its LM, audio path, encoder
and encoder mode). Without, a SpeechLM with a random projector on a random GPT of omni.experiments.pretrain_lm's
default size (depth and BPE vocabulary from PretrainConfig; sequence_len as pretrain builds it) and
the embedded tiny.en encoder: latency does not depend on the weights' values.

First token = log-mel + encoder (all hidden states) + layer choice + projector (+ left pad) +
prefill of [audio tokens][BOS] into a KV cache + argmax. Also one more decoding step (the second
token), and the same first-token path through the library call (transcribe_waves with
max_new_tokens=1) as a cross-check. Medians over --repeats after 3 warm-up runs. The clip is
espeak speech cut or zero-padded to exactly 5.0 s. Target: well under 0.2 s on this CPU.
Decoding: GPT.generate from the same prefix, --new tokens, no stop token, use_cache True vs False
(prefill included in both). Prints figures and ratios; asserts nothing about timing.
OMP_WAIT_POLICY defaults to PASSIVE (set before torch loads); torch threads: default unless --threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from omni.data import audio, tts  # noqa: E402
from omni.model.kvcache import KVCache  # noqa: E402
from omni.model.mel import log_mel  # noqa: E402
from omni.model.speech_lm import left_pad  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank this morning."


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class IdTokenizer:
    """Stands in for the pretrained BPE (same vocabulary size): a random LM's tokens mean nothing,
    so decode just spells the ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.bos_id = vocab_size, 0

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [1 + b for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def random_model(device: str):
    from omni.experiments.pretrain_lm import PretrainConfig
    from omni.model.encoder import WhisperEncoder
    from omni.model.gpt import GPT, GPTConfig
    from omni.model.speech_lm import SpeechLM, SpeechLMConfig

    pc = PretrainConfig()
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_depth(pc.depth, vocab_size=pc.vocab_size, sequence_len=max(1024, pc.sequence_len)))  # as pretrain builds it
    encoder = WhisperEncoder.from_source("tiny.en", device=device)
    model = SpeechLM(gpt.to(device), IdTokenizer(pc.vocab_size), encoder.n_states, encoder.d_model, SpeechLMConfig()).to(device).eval()
    return model, encoder, "var", f"random GPT depth {pc.depth}, vocab {pc.vocab_size} (omni.experiments.pretrain_lm defaults)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="", help="alignment run folder (or MLflow run id); default: random weights")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--new", type=int, default=64, help="tokens generated for the tokens/s comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.run:
        from omni.experiments.audio_run import load_run, run_encoder

        model, meta = load_run(args.run, args.device)
        encoder, mode = run_encoder(meta, model.gpt_device)
        what = f"alignment run {args.run}"
    else:
        model, encoder, mode, what = random_model(args.device)
    gpt, dev = model.gpt, model.gpt_device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    wave = tts.synthesize(SENTENCE, "en-us")
    n = 5 * audio.SAMPLE_RATE
    wave = F.pad(wave[:n], (0, max(0, n - wave.numel())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, device {dev}, load average {load()}")
    print(f"model: {what}; GPT {gpt.num_params() / 1e6:.1f}M params (n_embd {gpt.config.n_embd}, {gpt.config.n_layer} layers); "
          f"encoder {encoder.n_states - 1} layers x {encoder.d_model}, mode {mode}; layer {model.config.layer}, k {model.config.k}, "
          f"projector {model.config.projector}; clip {wave.numel() / audio.SAMPLE_RATE:.1f} s")

    bos = model.tokenizer.bos_id
    after = model._prompt_ids() if model.config.prompt_position == "after" else []

    @torch.no_grad()
    def first_token() -> dict[str, float]:
        t = {}
        t0 = time.perf_counter()
        mel, lengths = log_mel([wave], n_mels=encoder.n_mels, pad30=mode == "pad30")
        mel = mel.to(dev)
        sync()
        t["log-mel"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hidden, frames = encoder(mel, lengths, mode=mode)
        sync()
        t["encoder (all states)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = model.select(hidden)
        sync()
        t["layer choice"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if model.config.prompt and model.config.prompt_position == "before":
            prefix, mask = model.prefix(hidden, frames)  # the prompt's embeddings join the prefix
        else:
            tokens, tl = model.projector(x, frames.to(dev))
            prefix, mask = left_pad(tokens, tl)
        sync()
        t["projector + pad"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx = torch.tensor([after + [bos]], device=dev)
        cache = KVCache(1, prefix.size(1) + idx.size(1) + 2)
        tok = gpt(idx, audio=prefix, audio_mask=mask, kv_cache=cache)[:, -1].argmax(-1)
        sync()
        t["prefill + argmax (token 1)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gpt(tok[:, None], kv_cache=cache)[:, -1].argmax(-1)
        sync()
        t["one decode step (token 2)"] = time.perf_counter() - t0
        t["audio tokens"] = prefix.size(1)
        return t

    from omni.experiments.audio_run import transcribe_waves

    def library() -> float:
        t0 = time.perf_counter()
        transcribe_waves(model, encoder, [wave], mode=mode, max_new_tokens=1)
        sync()
        return time.perf_counter() - t0

    for _ in range(3):
        first_token(), library()
    runs, lib = [], []
    for _ in range(args.repeats):  # interleaved: both see the same load
        runs.append(first_token())
        lib.append(library())
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    n_audio = int(med.pop("audio tokens"))
    stages = [k for k in med if k != "one decode step (token 2)"]
    first = statistics.median(sum(r[k] for k in stages) for r in runs)
    print(f"\nfirst-token latency, 5 s clip ({n_audio} audio tokens), median of {args.repeats} warm runs:")
    for k in stages:
        print(f"  {k:28s} {med[k] * 1e3:8.1f} ms  {100 * med[k] / first:5.1f}%")
    print(f"  {'= first token':28s} {first * 1e3:8.1f} ms   (target well under 200 ms: {200 / (first * 1e3):.1f}x margin)")
    k = "one decode step (token 2)"
    print(f"  {k:28s} {med[k] * 1e3:8.1f} ms   (second token at {(first + med[k]) * 1e3:.1f} ms)")
    print(f"  library call transcribe_waves(max_new_tokens=1): {statistics.median(lib) * 1e3:.1f} ms "
          f"(min {min(lib) * 1e3:.1f}, max {max(lib) * 1e3:.1f})   [{load()}]")

    # greedy tokens/s with vs without the KV cache, from the same prefix
    with torch.no_grad():
        mel, lengths = log_mel([wave], n_mels=encoder.n_mels, pad30=mode == "pad30")
        hidden, frames = encoder(mel.to(dev), lengths, mode=mode)
        prefix, mask = model.prefix(hidden, frames.to(dev))
        idx = torch.tensor([after + [bos]], device=dev)
        rates = {}
        for use_cache in (True, False):
            gpt.generate(idx, audio=prefix, audio_mask=mask, max_new_tokens=4, use_cache=use_cache)  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = gpt.generate(idx, audio=prefix, audio_mask=mask, max_new_tokens=args.new, use_cache=use_cache)
                sync()
                times.append(time.perf_counter() - t0)
            assert out.size(1) == args.new
            rates[use_cache] = args.new / statistics.median(times)
    print(f"\ngreedy decoding, batch 1, {n_audio} audio tokens + {idx.size(1)} prompt, {args.new} new tokens (median of 3, prefill included):")
    print(f"  with KV cache   : {rates[True]:7.1f} tokens/s ({1e3 / rates[True]:.1f} ms/token)")
    print(f"  without KV cache: {rates[False]:7.1f} tokens/s ({1e3 / rates[False]:.1f} ms/token)")
    print(f"  KV cache speedup: {rates[True] / rates[False]:.1f}x   [{load()}]")


if __name__ == "__main__":
    main()
