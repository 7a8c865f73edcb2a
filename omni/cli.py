"""The `omni` command. Each subcommand is a thin shell over one library function.

    omni run EXPERIMENT.yaml [-p NAME=VALUE ...] [--workers N]   papermill -> reports/ + MLflow
    omni run --resume REPORT_DIR|RUN_ID                          continue an interrupted run or grid
    omni index                                                   rebuild reports/index.html
    omni data smoke                                              (re)write the smoke wavs
    omni data synth --out data/synth --sentences 3000            synthesized multi-voice corpus
    omni data instructions --corpus data/synth --out data/instructions   questions about the voice
    omni data librispeech ROOT/train-clean-100 --out M.jsonl     manifest from LibriSpeech
    omni features --manifest M.jsonl --encoder tiny.en --features cache/features [--encoder-mode var]
    omni transcribe --run RUN_DIR --manifest M.jsonl [--whisper-baseline] | AUDIO ...
    omni texture --run RUN [--out reports/bench] [--ladder-per-task 150]   texture benchmark + baselines (+ the listening ladder) of a tuned run
    omni chat --run RUN [--host H --port P] | --cli AUDIO ... [--question Q]   chat demo (web page or terminal)

Imports happen inside the handlers: `omni --help` should not pay for torch or mlflow.
Bad input ends with one line `omni: error: ...` naming the file, line or parameter, exit code 2.
A flag has the name of the config field it sets (`--encoder-mode` is `encoder_mode`); the old names
in RENAMED still work until the next release, with a note.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

# old names, kept until the next release: {command: {old: new}}; a command renamed is under ""
HEAR = str(Path(__file__).resolve().parents[1] / "models" / "hear")  # the committed hearing model: what transcribe and chat use without --run

RENAMED = {
    "": {"bench": "texture"},
    "features": {"--out": "--features", "--mode": "--encoder-mode"},
    "transcribe": {"--whisper": "--whisper-baseline"},
    "chat": {"--max-tokens": "--max-new-tokens"},
    "texture": {"--max-per-task": "--bench-per-task"},
}


def cmd_run(args: argparse.Namespace) -> int:
    from omni.run.experiment import parse_overrides
    from omni.run.runner import resume_experiment, run_experiment

    if args.resume:
        if args.param or args.experiment:
            raise ValueError("--resume reruns a run as it was: give no experiment file and no -p")
        results = resume_experiment(args.resume, reports=args.reports, workers=args.workers)
    elif not args.experiment:
        raise ValueError("give an experiment file (omni run experiments/NAME.yaml) or --resume RUN")
    else:
        results = run_experiment(args.experiment, parse_overrides(args.param), reports=args.reports, workers=args.workers)
    failed = [r for r in results if r.status != "FINISHED"]
    for r in results:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()) if "/" not in k)
        print(f"{r.status:8s} {r.name}  {r.report_dir / 'report.html'}")
        if r.error:
            print(f"         error: {r.error}")
        elif metrics:
            print(f"         {metrics[:400]}")
    print(f"\nreports: {Path(args.reports).resolve() / 'index.html'}")
    print(f"runs:    {_ui()}")
    return 1 if failed else 0


def _ui() -> str:
    from omni.track import ui_command, ui_url

    command = ui_command()
    return f"{command}, then {ui_url()}" if command else ui_url()


def cmd_index(args: argparse.Namespace) -> int:
    from omni.run.index import mark_dead_runs, write_index

    for d in mark_dead_runs(args.reports):
        print(f"marked KILLED (its process is gone): {d}")
    print(write_index(args.reports))
    return 0


def cmd_data_smoke(args: argparse.Namespace) -> int:
    from omni.data.smoke import ensure_clips

    for p in ensure_clips(args.manifest):
        print(p)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from omni.data.synth import SynthConfig, build_corpus, datasheet

    cfg = SynthConfig(out=args.out, sentences=args.sentences, seed=args.seed, workers=args.workers, hard_clips=args.hard_clips,
                      only=("test_hard",) if args.hard_only else ())
    out = build_corpus(cfg)
    print(f"corpus: {out / 'manifest.jsonl'}")
    print(f"datasheet: {datasheet(out, args.reports)}")
    return 0


def cmd_data_instructions(args: argparse.Namespace) -> int:
    from omni.data.instructions import InstructionConfig, task_counts, write_instructions

    paths = write_instructions(InstructionConfig(corpus=args.corpus, out=args.out, seed=args.seed, options_from=args.options_from))
    for split, path in paths.items():
        counts = task_counts(path)
        print(f"{split}: {sum(counts.values())} questions -> {path}  ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    return 0


def cmd_texture(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from omni.experiments.instruct import benchmark_run

    if args.ladder_per_task < 0:
        raise ValueError(f"--ladder-per-task must be >= 0 (0 = no ladder), got {args.ladder_per_task}")
    results = benchmark_run(args.run, args.out, args.questions, args.transcripts, args.device, args.bench_per_task, args.seed, args.features)
    tasks = sorted({t for r in results.values() for t in r}, key=lambda t: (t == "texture", t))
    print(f"{'task':14s} {'chance':>7s} " + " ".join(f"{k[:22]:>22s}" for k in results))
    for t in tasks:
        cells = [f"{r[t].accuracy:.2f} [{r[t].lo:.2f},{r[t].hi:.2f}]" if t in r else "-" for r in results.values()]
        chance = next(r[t].chance for r in results.values() if t in r)
        print(f"{t:14s} {chance:7.2f} " + " ".join(f"{c:>22s}" for c in cells))
    print(f"-> {Path(args.out) / 'scores.json'}, {Path(args.out) / 'bench.png'}")
    if args.ladder_per_task:
        from omni.experiments.instruct import ladder_run

        lad = ladder_run(args.run, args.out, args.ladder_per_task, args.seed, args.device)
        for line in lad.where_lost():
            print(line)
        print(f"-> {Path(args.out) / 'ladder.json'}, {Path(args.out) / 'ladder.png'}")
    return 0


def cmd_data_librispeech(args: argparse.Namespace) -> int:
    from omni.data.librispeech import librispeech_manifest

    n = librispeech_manifest(args.root, args.out, skip_bad=args.skip_bad)
    print(f"{n} utterances -> {args.out}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from omni.data.features import FeatureCache, build_features

    path = build_features(args.manifest, args.features, args.encoder, mode=args.encoder_mode, device=args.device, skip_bad=args.skip_bad)
    cache = FeatureCache.open(path)
    print(f"{len(cache)} clips, {cache.n_states} states x {cache.d_model} dims -> {path}")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    import time

    from omni.data import audio
    from omni.data.manifest import read_manifest
    from omni.eval import metrics
    from omni.eval.yardstick import whisper_decode
    from omni.experiments.audio_run import load_run, run_decoding, run_encoder, transcribe_waves
    from omni.model.speech_lm import LoopGuard

    if bool(args.manifest) == bool(args.audio):
        raise ValueError("give either --manifest M.jsonl or audio files, not both or neither")
    # the run and the input first, every clip decoded and checked: all problems are named at once
    # (bad lines or files may be skipped) before seconds go into loading the model
    run, problems = _resolve_run(args.run)
    paths, refs, labels = [], [], []
    if args.manifest:
        try:
            m = read_manifest(args.manifest, skip_bad=args.skip_bad)
        except ValueError as e:  # ManifestError: every bad row, one line each
            problems.append(str(e))
        else:
            if m.problems:
                print(m.report())
            paths, refs, labels = [e.audio for e in m.examples], [e.text for e in m.examples], [e.labels for e in m.examples]
            if not paths:
                problems.append(f"{args.manifest}: no usable rows")
    else:
        bad = {p: r for p in map(Path, args.audio) if (r := audio.check_file(p))}
        listed = "\n".join(f"  {p}: {r}" for p, r in bad.items())
        if bad and not args.skip_bad:
            problems.append(f"{len(bad)} bad audio file(s), nothing done:\n{listed}")
        elif bad:
            print(f"skipped {len(bad)} bad audio file(s) of {len(args.audio)}:\n{listed}")
        paths = [p for p in map(Path, args.audio) if p not in bad]
        if not paths and not problems:
            problems.append("no usable audio files")
    _refuse(problems)
    waves = [audio.load(p) for p in paths]
    guard = LoopGuard() if args.guard else None
    model, meta = load_run(run, args.device, name="--run")
    decoding = run_decoding(meta, args.decode, args.beam, args.ctc_decode_weight)
    encoder, mode = run_encoder(meta, model.gpt_device)
    t0 = time.perf_counter()
    hyps = transcribe_waves(model, encoder, waves, mode=mode, guard=guard, decoding=decoding)
    dt = time.perf_counter() - t0
    systems = {"aligned": hyps}
    if args.whisper_baseline:
        from omni.model.encoder import load_whisper_model

        systems[f"whisper {encoder.source}"] = whisper_decode(*load_whisper_model(encoder.source), waves, guard)
    for i, p in enumerate(paths):  # one line per clip: whitespace inside a hypothesis (tabs, newlines) printed as single spaces
        print("\t".join([str(p), *(" ".join(h[i].split()) for h in systems.values())]) + (f"\t(ref: {refs[i]})" if refs else ""))
    if refs:
        how = f"joint CTC/LM beam search (beam {decoding.beam}, CTC weight {decoding.ctc_decode_weight})" if decoding.decode == "joint" \
            else "greedy" if guard is None else "greedy, loop guard"
        print(f"{len(refs)} clips, {dt:.1f} s, {how}")
        for name, h in systems.items():
            print(f"{name}: WER {metrics.wer(refs, h):.3f}  CER {metrics.cer(refs, h):.3f}  median WER {metrics.median_wer(refs, h):.3f}")
        for label in breakdown_labels(labels):
            keys = [str(row[label]) for row in labels]
            print(f"by {label}:")
            per = {name: metrics.grouped_wer(refs, h, keys) for name, h in systems.items()}
            for group in per["aligned"]:
                cells = [f"{name} WER {g[group]['wer']:.3f} (median {g[group]['median_wer']:.3f}) CER {g[group]['cer']:.3f}" for name, g in per.items()]
                print(f"  {group} ({int(per['aligned'][group]['n'])} clips): " + "; ".join(cells))
    return 0


def _resolve_run(run: str) -> tuple[str, list[str]]:
    """(the run's model folder, []) or (run, [why it is no trained model]): checked with the other
    arguments, before any model loads (an MLflow run's model is fetched once, here)."""
    from omni.experiments.audio_run import model_dir

    try:
        return str(model_dir(run, "--run")), []
    except (FileNotFoundError, ValueError) as e:
        return run, [str(e)]


def _refuse(problems: list[str]) -> None:
    """One error naming every problem found (nothing done), or nothing."""
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems, nothing done:\n" + "\n".join(f"  {p}" for p in problems))


def breakdown_labels(labels: list[dict], max_groups: int = 30) -> list[str]:
    """Manifest labels worth a WER breakdown: text-valued, on every row, with 2..max_groups values
    and fewer values than rows (an id or a path has one value per row)."""
    if not labels:
        return []
    out = []
    for key in labels[0]:
        values = [row.get(key) for row in labels]
        if all(isinstance(v, str) for v in values) and 2 <= len(set(values)) <= min(max_groups, len(values) - 1):
            out.append(key)
    return out


def cmd_chat(args: argparse.Namespace) -> int:
    from omni.serve.chat import chat_cli, serve
    from omni.serve.session import Session, load_model, sampling

    s = sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    problems = [f"--port {args.port}: must be in 1..65535"] if not 1 <= args.port <= 65535 else []
    problems += [f"--threads {args.threads}: must be >= 0 (0 = every core but one)"] if args.threads < 0 else []
    if not problems and not args.cli:
        problems += port_problem(args.host, args.port)
    run, found = _resolve_run(args.run)  # all of them before seconds go into loading the model
    problems += found + [f"{a}: file not found" for a in args.cli or [] if not Path(a).is_file()]
    _refuse(problems)
    session = Session(*load_model(run, args.device, args.decode, args.beam, args.ctc_decode_weight))
    if args.cli:
        chat_cli(session, args.cli, args.question, s)
    else:
        serve(session, args.host, args.port, args.threads)
    return 0


def port_problem(host: str, port: int) -> list[str]:
    """[why the page cannot listen on host:port] or []: checked with the other arguments, before the model loads."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return [f"--port {port}: already in use on {host} (another omni chat?); choose another with --port"]
        return [f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"]
    return []


def note_renamed(argv: list[str], cmd: str) -> None:
    """A note on stderr for every old name used (RENAMED): it still works, until the next release."""
    command = RENAMED[""].get(cmd, cmd)
    old = [(cmd, command)] if cmd != command else []
    old += [(a.split("=")[0], new) for a in argv for o, new in RENAMED.get(command, {}).items() if a == o or a.startswith(o + "=")]
    for name, new in old:
        print(f"omni: note: `{name}` is now `{new}`; the old name goes in the next release", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; every option carries a help line (tests/test_cli.py checks)."""
    p = argparse.ArgumentParser(prog="omni", description="Teach a small GPT to hear.")
    sub = p.add_subparsers(dest="cmd", required=True)
    reports = "folder holding the report folders and index.html"

    r = sub.add_parser("run", help="run an experiment YAML through papermill; reports under reports/")
    r.add_argument("experiment", nargs="?", help="experiments/NAME.yaml")
    r.add_argument("-p", "--param", action="append", nargs="+", default=[], metavar="NAME=VALUE",
                   help="set a notebook parameter: -p NAME=VALUE or -p NAME VALUE (YAML value; a list makes a grid axis)")
    r.add_argument("--resume", metavar="RUN", help="rerun an interrupted run in place (report folder or MLflow run id); for a grid, its unfinished points")
    r.add_argument("--workers", type=int, default=1, help="grid points run in this many parallel kernels")
    r.add_argument("--reports", default="reports", help=reports)
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("index", help="mark runs whose process died KILLED, rebuild reports/index.html")
    i.add_argument("--reports", default="reports", help=reports)
    i.set_defaults(fn=cmd_index)

    d = sub.add_parser("data", help="build data sets and manifests").add_subparsers(dest="what", required=True)
    ds = d.add_parser("smoke", help="write the smoke wavs named by the committed manifest")
    ds.add_argument("--manifest", default="data/audio_smoke/manifest.jsonl", help="the smoke manifest; its five tones are written beside it")
    ds.set_defaults(fn=cmd_data_smoke)
    dy = d.add_parser("synth", help="synthesize the multi-voice texture corpus (espeak-ng, offline)")
    dy.add_argument("--out", default="data/synth", help="corpus folder: clips/, manifest.jsonl and one manifest per split (resumes what is there)")
    dy.add_argument("--sentences", type=int, default=3000, help="distinct sentences, drawn from the offline English text")
    dy.add_argument("--seed", type=int, default=0, help="decides sentences, splits, voice assignment and each clip's rate and pitch")
    dy.add_argument("--workers", type=int, default=2, help="synthesis processes (1: in this process)")
    dy.add_argument("--hard-clips", type=int, default=0, help="clips of split test_hard: held-out voices at rates/pitches outside the training ranges")
    dy.add_argument("--hard-only", action="store_true", help="write only the test_hard clips (a separate hard corpus beside an existing one)")
    dy.add_argument("--reports", default="reports", help="where the corpus datasheet (HTML) goes")
    dy.set_defaults(fn=cmd_data_synth)
    di = d.add_parser("instructions", help="questions about the voice (conversation manifests) from a synth corpus's labels")
    di.add_argument("--corpus", default="data/synth", help="synth corpus whose clips and labels the questions are about")
    di.add_argument("--out", default="data/instructions", help="folder of the manifests, one per split (train.jsonl, test.jsonl, ...)")
    di.add_argument("--seed", type=int, default=0, help="decides phrasings, formats, options, partners and distractor words")
    di.add_argument("--options-from", default="", help="corpus whose label values make the multiple-choice options (the training corpus, for a separate test corpus)")
    di.set_defaults(fn=cmd_data_instructions)
    dl = d.add_parser("librispeech", help="manifest from a LibriSpeech split folder")
    dl.add_argument("root", help="a LibriSpeech split folder, e.g. ~/LibriSpeech/train-clean-100 (every *.trans.txt below it is read)")
    dl.add_argument("--out", required=True, help="manifest to write (JSONL, one utterance a line)")
    dl.add_argument("--skip-bad", action="store_true", help="leave out (and list) bad utterances instead of stopping")
    dl.set_defaults(fn=cmd_data_librispeech)

    f = sub.add_parser("features", help="encode a manifest once with the frozen encoder; keep every hidden state")
    f.add_argument("--manifest", required=True, help="flat or conversation JSONL manifest of the clips to encode")
    f.add_argument("--encoder", default="tiny.en", help="Whisper: tiny.en (embedded), a local folder, or a Hugging Face id")
    f.add_argument("--features", "--out", default="cache/features", help="feature cache root (--out: the old name)")
    f.add_argument("--encoder-mode", "--mode", default="var", help="var (each clip its own length) | pad30 (--mode: the old name)")
    f.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    f.add_argument("--skip-bad", action="store_true", help="skip (and list) bad manifest rows instead of stopping")
    f.set_defaults(fn=cmd_features)

    t = sub.add_parser("transcribe", help="transcribe audio with an aligned model; WER/CER when the manifest has text")
    t.add_argument("--run", default=HEAR, help=f"trained run: its folder, report folder (reports/alignment/<stamp>) or MLflow run id (default: {HEAR}, the committed hearing model)")
    t.add_argument("--manifest", help="flat or conversation JSONL manifest")
    t.add_argument("audio", nargs="*", help="audio files (instead of --manifest)")
    t.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    t.add_argument("--skip-bad", action="store_true", help="skip (and list) bad rows or files instead of stopping")
    t.add_argument("--whisper-baseline", "--whisper", action="store_true",
                   help="also transcribe with Whisper's own decoder (the run's encoder), scored on the same clips (--whisper: the old name)")
    t.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True,
                   help="greedy decoding under the loop guard's temperature fallback; --no-guard: plain greedy decoding")
    add_decoding(t)
    t.set_defaults(fn=cmd_transcribe)

    c = sub.add_parser("chat", help="chat demo: a local web page (or --cli, the terminal) that streams a trained model's answers to audio")
    c.add_argument("--run", default=HEAR, help=f"trained run: its folder, report folder or MLflow run id (default: {HEAR}, the committed hearing model)")
    c.add_argument("--host", default="127.0.0.1", help="address to bind; anything but localhost exposes the model to the network")
    c.add_argument("--port", type=int, default=8000, help="port of the page (1..65535)")
    c.add_argument("--cli", nargs="+", metavar="AUDIO", help="answer these audio files in the terminal instead of serving the page")
    c.add_argument("--question", default="", help="with --cli: text after the audio (default: the run's own prompt)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (0..2)")
    c.add_argument("--top-k", type=int, default=0, help="0 = off")
    c.add_argument("--top-p", type=float, default=1.0, help="1 = off (0 < p <= 1)")
    c.add_argument("--max-new-tokens", "--max-tokens", type=int, default=120, help="decoding budget per answer (--max-tokens: the old name)")
    c.add_argument("--seed", type=int, default=None, help="fixes sampling when temperature > 0 (default: not fixed)")
    c.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    c.add_argument("--threads", type=int, default=0, help="torch threads of the model (0 = every core but one: the page's streams need one)")
    add_decoding(c)
    c.set_defaults(fn=cmd_chat)

    b = sub.add_parser("texture", aliases=["bench"], help="texture benchmark of an instruction-tuned run, with its baselines (bench: the old name)")
    b.add_argument("--run", required=True, help="instruction-tuned run (omni run experiments/instruct.yaml): its report folder, model folder or MLflow run id")
    b.add_argument("--out", default="reports/bench", help="where scores.json and bench.png go")
    b.add_argument("--questions", default="", help="instruction manifest to ask (default: the run's test.jsonl)")
    b.add_argument("--transcripts", default="reference", help="what the transcript-only probe reads: reference | whisper")
    b.add_argument("--bench-per-task", "--max-per-task", type=int, default=0, help="questions per task (a seeded sample stratified by answer); 0 = all (--max-per-task: the old name)")
    b.add_argument("--features", default="", help="feature cache of the questions' clips when not the run's own (e.g. the hard set's)")
    b.add_argument("--seed", type=int, default=0, help="fixes the subsample of questions, the shuffled audio and the probe's fit")
    b.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    b.add_argument("--ladder-per-task", type=int, default=0, help="> 0: also the listening ladder, this many questions per task (the instruct run's: 150) -> ladder.json, ladder.png")
    b.set_defaults(fn=cmd_texture)
    return p


def add_decoding(p: argparse.ArgumentParser) -> None:
    """The decoding options of every command that transcribes (each defaults to the run's own)."""
    p.add_argument("--decode", choices=("greedy", "joint"), default="", help="greedy (the LM alone) | joint (CTC/LM beam search; "
                   "runs with a CTC head); default: the run's own")
    p.add_argument("--beam", type=int, default=0, help="joint decoding: hypotheses kept per clip (default: the run's own)")
    p.add_argument("--ctc-decode-weight", type=float, default=-1.0, help="joint decoding: weight of the CTC term in [0, 1] (default: the run's own)")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    note_renamed(argv, args.cmd)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueErrors that name the culprit
        print(f"omni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
