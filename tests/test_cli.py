"""The `omni` command: transcription with a saved alignment run (the `tiny_alignment` fixture in
conftest.py), and bad input ending in exit code 2 with one line that names the culprit."""

import argparse
import json
import re

import numpy as np
import pytest
import torch

from conftest import mixed_manifest
from omni.cli import main
from omni.data import audio
from omni.eval import metrics


def _tone(path, seconds=1.0):
    t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    audio.save(path, torch.from_numpy((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)))
    return path


def _scores(lines, name):
    m = next(re.fullmatch(rf"{name}: WER (\S+)  CER (\S+)  median WER (\S+)", line) for line in lines if line.startswith(f"{name}: "))
    return float(m[1]), float(m[2]), float(m[3])


def test_transcribe_a_manifest_prints_hypotheses_and_scores(tiny_alignment, capsys):
    from omni.cli import breakdown_labels

    manifest = tiny_alignment.corpus / "test.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    refs = [r["text"] for r in rows]
    assert main(["transcribe", "--run", str(tiny_alignment.run), "--manifest", str(manifest)]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = [line.split("\t") for line in lines if "\t" in line]
    assert len(out) == len(refs) == 4
    hyps = [h for _, h, _ in out]
    assert [r for _, _, r in out] == [f"(ref: {t})" for t in refs]
    assert all(p.endswith(".wav") for p, _, _ in out)
    assert re.fullmatch(r"4 clips, \S+ s, greedy, loop guard", lines[4]), lines[4]
    assert _scores(lines, "aligned") == (round(metrics.wer(refs, hyps), 3), round(metrics.cer(refs, hyps), 3), round(metrics.median_wer(refs, hyps), 3))
    # per-label breakdowns: the labels with a few values (style, variant, ...), not ids or paths
    labels = breakdown_labels([{k: v for k, v in r.items() if k not in ("audio", "text")} for r in rows])
    assert "variant" in labels and "clip_id" not in labels and "split" not in labels  # one value per row / one in all
    for label in labels:
        assert f"by {label}:" in lines
    keys = [r["variant"] for r in rows]
    for group, sc in metrics.grouped_wer(refs, hyps, keys).items():
        assert f"  {group} ({int(sc['n'])} clips): aligned WER {sc['wer']:.3f} (median {sc['median_wer']:.3f}) CER {sc['cer']:.3f}" in lines


def test_transcribe_beside_whisper_on_the_same_clips(tiny_alignment, tmp_path, capsys):
    src = tiny_alignment.corpus / "test.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()][:3]  # Whisper is slow: three clips
    for r in rows:
        r["audio"] = str(tiny_alignment.corpus / r["audio"])
    manifest = tmp_path / "three.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = [r["text"] for r in rows]
    assert main(["transcribe", "--run", str(tiny_alignment.run), "--manifest", str(manifest), "--whisper-baseline"]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = [line.split("\t") for line in lines if "\t" in line]
    assert len(out) == 3 and all(len(r) == 4 for r in out)  # path, ours, Whisper's, reference
    ours, whisper = [r[1] for r in out], [r[2] for r in out]
    assert all(whisper)  # no quality bar: tiny.en on 1-2 s clips of held-out espeak-ng voices is often far off
    assert _scores(lines, "aligned")[0] == round(metrics.wer(refs, ours), 3)
    assert _scores(lines, "whisper tiny.en") == (round(metrics.wer(refs, whisper), 3), round(metrics.cer(refs, whisper), 3),
                                                 round(metrics.median_wer(refs, whisper), 3))
    from omni.cli import breakdown_labels

    labels = breakdown_labels([{k: v for k, v in r.items() if k not in ("audio", "text")} for r in rows])
    by = [line for line in lines if line.startswith("  ") and "clips): aligned WER" in line]
    assert labels and all(f"by {label}:" in lines for label in labels)
    assert by and all("; whisper tiny.en WER" in line for line in by)


def test_transcribe_audio_files(tiny_alignment, tmp_path, capsys):
    wavs = [str(_tone(tmp_path / "a.wav")), str(_tone(tmp_path / "b.wav", 2.0))]
    model_dir = tiny_alignment.run / "model"  # the model folder itself also works
    assert main(["transcribe", "--run", str(model_dir), *wavs]) == 0
    out = capsys.readouterr().out
    assert [line.split("\t")[0] for line in out.splitlines() if "\t" in line] == wavs
    assert "WER" not in out  # no references, no scores


def test_transcribe_by_mlflow_run_id(tiny_alignment, tmp_path, capsys):
    from dataclasses import replace

    from omni import track
    from omni.experiments import alignment

    # conftest.py points MLflow at a throwaway store; artifacts go to tmp, not ./mlruns of the repo
    track.client().create_experiment("test-cli-alignment", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = track.start_run("test-cli-alignment", "tiny")
    cfg = replace(tiny_alignment.cfg, steps=1, eval_clips=1, out=str(tmp_path / "model"))
    res = alignment.run(cfg, track.Tracker(run_id), cache=tiny_alignment.cache)
    track.end_run(run_id)
    logged = track.run_metrics(run_id)  # the final scores reach MLflow (the tracker buffers)
    assert logged["wer"] == res.scores["wer"] and logged["control_wer"] == res.scores["control_wer"]
    wav = str(_tone(tmp_path / "a.wav"))
    assert main(["transcribe", "--run", run_id, wav]) == 0  # the `model` artifact is fetched from MLflow
    assert capsys.readouterr().out.startswith(f"{wav}\t")


def test_transcribe_bad_input_names_file_and_line(tiny_alignment, tmp_path, capsys):
    good = json.dumps({"audio": str(_tone(tmp_path / "a.wav")), "text": "a tone"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + '{"audio": "a.wav", "text": \n')
    assert main(["transcribe", "--run", str(tiny_alignment.run), "--manifest", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omni: error: ") and f"{bad}:2: invalid JSON" in err

    missing = tmp_path / "missing.jsonl"
    missing.write_text(good + "\n\n" + json.dumps({"audio": "nope.wav", "text": "x"}) + "\n")
    assert main(["transcribe", "--run", str(tiny_alignment.run), "--manifest", str(missing)]) == 2
    assert f"{missing}:3: {tmp_path / 'nope.wav'}: audio file not found" in capsys.readouterr().err

    # both a manifest and audio files, or neither
    assert main(["transcribe", "--run", str(tiny_alignment.run)]) == 2
    assert "either --manifest" in capsys.readouterr().err


def test_transcribe_unknown_run_is_named(tmp_path, capsys):
    wav = str(_tone(tmp_path / "a.wav"))
    assert main(["transcribe", "--run", str(tmp_path / "no-run"), wav]) == 2
    assert f"--run {tmp_path / 'no-run'}" in capsys.readouterr().err


def test_every_problem_is_named_at_once(tmp_path, capsys):
    """An unknown run and a missing file: one error names both (fixing one would only reveal the other)."""
    missing = tmp_path / "x.wav"
    assert main(["transcribe", "--run", "nosuch", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omni: error: 2 problems, nothing done:")
    assert "--run nosuch: neither a trained run folder" in err and f"{missing}: audio file not found" in err
    assert main(["chat", "--run", "nosuch", "--port", "0", "--cli", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "--port 0" in err and "--run nosuch" in err and f"{missing}: file not found" in err
    unknown = "0123456789abcdef0123456789abcdef"  # looks like an MLflow run id; the store has no such run
    assert main(["transcribe", "--run", unknown, str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--run {unknown}: an MLflow run id, but its `model` artifact could not be fetched" in err and "x.wav" in err


def test_a_run_that_keeps_no_model_is_named_for_what_it_is(tmp_path, capsys):
    """A smoke run's report folder given to transcribe or chat: the error says it is a smoke run."""
    smoke = tmp_path / "reports" / "smoke" / "20261205-120000"
    smoke.mkdir(parents=True)
    (smoke / "summary.json").write_text(json.dumps({"experiment": "smoke", "status": "FINISHED"}))
    wav = str(_tone(tmp_path / "a.wav"))
    for args in (["transcribe", "--run", str(smoke), wav], ["chat", "--run", str(smoke), "--cli", wav]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"--run {smoke}: a smoke run" in err and "give an alignment or instruct run" in err, err


def test_every_option_has_a_help_line():
    from omni.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield f"{path} {'/'.join(action.option_strings) or action.dest}", action.help

    missing = [name for name, help_ in walk(build_parser(), "omni") if not help_]
    assert not missing, f"options without a help line: {missing}"


def test_a_near_miss_parameter_name_gets_a_suggestion(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    assert main(["run", "experiments/smoke.yaml", "-p", "stepz=3"]) == 2
    assert "unknown parameter 'stepz' (did you mean `steps`?)" in capsys.readouterr().err
    from omni import params
    from omni.experiments.smoke import SmokeConfig

    with pytest.raises(params.ParamError, match=r"unknown parameter 'seeds' \(did you mean `seed`\?\)"):
        params.check(SmokeConfig, {"seeds": 1})
    assert params.did_you_mean("zzz", ["steps"]) == ""


def test_features_unknown_encoder_is_named(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": str(_tone(tmp_path / "a.wav")), "text": "a tone"}) + "\n")
    code = main(["features", "--manifest", str(manifest), "--encoder", "no-such-encoder", "--features", str(tmp_path / "cache")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("omni: error: ") and "no-such-encoder" in err
    assert not (tmp_path / "cache").exists()


def test_run_unknown_experiment_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--reports", str(tmp_path / "reports")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: no such experiment file" in capsys.readouterr().err


def test_transcribe_bad_clips_all_named_or_skipped_and_listed(tiny_alignment, tmp_path, capsys):
    good = [{"audio": str(_tone(tmp_path / f"g{i}.wav", 1.0 + i)), "text": f"tone {i}"} for i in range(2)]
    man, expected = mixed_manifest(tmp_path / "m.jsonl", good)
    assert main(["transcribe", "--run", str(tiny_alignment.run), "--manifest", str(man)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("omni: error: ") and len(err) == 1 + len(expected)  # every bad row, one line each
    assert all(e.strip().startswith(f"{man}:{line}: ") and reason in e for (line, reason), e in zip(sorted(expected.items()), err[1:]))

    assert main(["transcribe", "--run", str(tiny_alignment.run), "--manifest", str(man), "--skip-bad"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{man}: {len(good) + len(expected)} rows, 2 ok, skipped {len(expected)} bad rows"
    assert all(f"{man}:{line}: " in o and reason in o for (line, reason), o in zip(sorted(expected.items()), out[1:]))
    assert [o.split("\t")[0] for o in out if "\t" in o] == [g["audio"] for g in good]

    # audio files named on the command line: the same checks, named by file
    silent, short = tmp_path / "bad" / "silent.wav", tmp_path / "bad" / "short.wav"
    args = ["transcribe", "--run", str(tiny_alignment.run), good[0]["audio"], str(silent), str(short)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{silent}: silent audio" in err and f"{short}: too short" in err
    assert main([*args, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad audio file(s) of 3" in out and out.count("\t") == 1


def test_features_bad_clips_exit_2_naming_all_or_skip(tmp_path, capsys):
    good = [{"audio": str(_tone(tmp_path / "g.wav")), "text": "a tone"}]
    man, expected = mixed_manifest(tmp_path / "m.jsonl", good)
    cache = tmp_path / "cache"
    assert main(["features", "--manifest", str(man), "--features", str(cache)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 + len(expected) and all(f"{man}:{line}: " in e for line, e in zip(sorted(expected), err[1:]))
    assert not cache.exists()
    # --out and --mode, the flags' old names, still work until the next release, with a note
    assert main(["features", "--manifest", str(man), "--out", str(cache), "--mode=var", "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    assert "`--out` is now `--features`" in err and "`--mode` is now `--encoder-mode`" in err
    out = out.splitlines()
    assert out[0].endswith(f"skipped {len(expected)} bad rows") and len(out) == 2 + len(expected)
    assert out[-1].startswith("1 clips") and len(list(cache.iterdir())) == 1
