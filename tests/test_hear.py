"""The committed hearing model (models/hear): it loads the way every run loads, it names the LM it sits on
by path and hash, and `omni transcribe` with no --run turns speech of the repository's own voices into the
right words. Its corpus-level figures (WER on the held-out clear clips, the trainable axis it was chosen
from) are in models/hear/provenance.json; this test guards that the committed files still do what those
figures say, on one fixed clip of a held-out voice and a held-out sentence."""

import json
from pathlib import Path

import torch

from omni.data import audio
from omni.cli import HEAR, main
from omni.data import tts
from omni.eval import metrics
from omni.experiments.audio_run import load_run, run_lm, run_meta, weights_sha256

REPO = Path(__file__).resolve().parents[1]
# a sentence of the corpus's test split (never trained on), spoken by a voice no audio model here trained on
# (omni.data.synth's heldout_variants); one the committed model gets right, so that a regression shows
SENTENCE = "You will leave that question in my hands."
VOICE = "en-us+f4"


def test_the_committed_hearing_model_is_whole_and_named():
    path, meta = run_meta(HEAR)
    assert path == Path(HEAR)
    provenance = json.loads((path / "provenance.json").read_text())
    assert provenance["reproduce"].endswith(".yaml") and (REPO / provenance["measured_by"]).is_file()
    lm = Path(run_lm(path, meta))
    assert weights_sha256(lm) == meta["lm_sha256"]  # the LM it sits on is the one it was trained on
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    scores = provenance["scores"]
    assert scores["clear_joint_wer"] < scores["clear_whisper_wer"] and scores["clear_joint_wer"] < scores["clear_ctc_wer"]
    assert meta["config"]["ctc_weight"] > 0 and meta["decoding"]["decode"] == "joint"  # trained to spell, decoded tied to that spelling
    model, _ = load_run(HEAR)
    assert not model.training


def test_transcribe_without_a_run_hears_the_words(tmp_path, capsys):
    wav = tmp_path / "clip.wav"
    audio.save(wav, torch.cat([torch.zeros(4000), tts.synthesize(SENTENCE, voice=VOICE, rate=150), torch.zeros(8000)]))
    assert main(["transcribe", str(wav)]) == 0
    out = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert len(out) == 1 and out[0][0] == str(wav)
    assert metrics.normalize_text(out[0][1]) == metrics.normalize_text(SENTENCE), out[0][1]


def test_chat_without_a_run_answers_with_the_words_and_no_rate_for_a_joint_transcript(tmp_path, capsys):
    """`omni chat --cli` on the committed model: the joint beam search's transcript, found whole and then
    sent at once, so no tokens/s is claimed for it."""
    wav = tmp_path / "clip.wav"
    audio.save(wav, torch.cat([torch.zeros(4000), tts.synthesize(SENTENCE, voice=VOICE, rate=150), torch.zeros(8000)]))
    assert main(["chat", "--cli", str(wav)]) == 0
    out, err = capsys.readouterr()
    assert metrics.normalize_text(out.split(": ", 1)[1]) == metrics.normalize_text(SENTENCE), out
    assert "found whole by the joint beam search" in err and "tokens/s" not in err
