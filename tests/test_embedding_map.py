"""omni.experiments.embedding_viz, alignment_stats, embedding_page, runs: readout and statistics on inputs whose answer
is known; the report end to end
through `omni run` on a tiny synthesized corpus, a tiny random LM and two 5-step alignment runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omni.data import tts
from omni.eval import embedding_stats as stats
from omni.experiments import embedding_page
from omni.experiments import embedding_viz
from omni.experiments import audio_run

# Runs the interactive page's script under node against a minimal DOM stub, hovers the first audio
# token that has a word, pins its clip, cycles the colourings and searches that word; prints what it saw.
HARNESS = r"""
const fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const data = page.match(/<script type="application\/json" id="data">([\s\S]*?)<\/script>/)[1];
const code = page.match(/<script>([\s\S]*?)<\/script>/)[1];
const calls = {arc: 0, stroke: 0, found: 0};
const ctx = new Proxy({}, {get: (t, k) => k in t ? t[k] : k === "arc" ? (x, y, r) => { calls.arc++; if (r === 4) calls.found++; }
                             : k === "stroke" ? () => { calls.stroke++; } : () => {},
                           set: (t, k, v) => { t[k] = v; return true; }});
const els = {};
function el(id) {
  if (!els[id]) els[id] = {id, value: "", innerHTML: "", textContent: id === "data" ? data : "", style: {}, options: [],
    listeners: {}, width: 980, height: 640, clientWidth: 980,
    add(o) { this.options.push(o); if (this.options.length === 1) this.value = o.value; },
    getContext: () => ctx, addEventListener(k, f) { this.listeners[k] = f; },
    getBoundingClientRect: () => ({left: 0, top: 0, width: 980, height: 640})};
  return els[id];
}
el("show").value = "after";
global.document = {getElementById: el};
global.Option = function (text, value) { this.text = text; this.value = String(value); };
eval(code + "\n;globalThis.T = {get R() { return R; }, get P() { return P; }, get pinned() { return pinned; }, label};");
const T = globalThis.T, cv = el("cv"), i = T.R.kind.findIndex((k, j) => k === 2 && T.label(j, "word")), P = T.P;
cv.listeners.mousemove({clientX: P[i][0], clientY: P[i][1]});
const tip = el("tip").innerHTML, display = el("tip").style.display;
cv.listeners.click({clientX: P[i][0], clientY: P[i][1]});
for (const c of ["voice", "rate", "word", "position", "stage"]) { el("colour").value = c; el("colour").onchange(); }
const word = T.label(i, "word");
calls.found = 0; el("find").value = word; el("find").oninput();
const found = calls.found;
console.log(JSON.stringify({tip, display, word, found, arcs: calls.arc, strokes: calls.stroke, pinned: T.pinned,
                            stats: el("stats").innerHTML.length}));
"""


# --- statistics and readout on constructed inputs ----------------------------------------------


class _Tok:
    bos_id = 99

    def encode(self, text):  # one token per word, ids from the word's first letter
        return [ord(w.strip()[0]) - ord("a") for w in text.split()]


def _clips(texts, spt=0.1):
    tok = _Tok()
    out = []
    for i, t in enumerate(texts):
        words = t.split()
        spans = [(j * spt, (j + 1) * spt) for j in range(len(words))]  # one audio token per word
        out.append(stats.Clip(i, t, {}, words, spans, "chars", tts.token_words(spans, len(words), spt),
                            tok.encode(t), stats.word_token_ids(tok, words)))
    return out


def test_alignment_stats_known_answers():
    g = np.random.default_rng(0)
    table = g.standard_normal((26, 6))
    table -= table.mean(0)
    table /= np.sqrt((table**2).mean(1, keepdims=True))  # 26 tokens in 6-d, each at RMS 1 like GPT.embed
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = [" ".join(g.choice(list(letters), size=g.integers(3, 7))) for _ in range(40)]  # ~180 tokens >> 6 dims
    clips = _clips(texts)
    perfect = [table[c.text_ids] for c in clips]  # each audio token IS its word's embedding
    s = stats.alignment_stats(perfect, clips, table, k=1, candidates=4)
    assert s["cos_clip"] == pytest.approx(1.0) and s["cos_clip_control"] < 0.5
    assert s["retrieval_a2t"] == s["retrieval_t2a"] == 1.0 and s["retrieval_chance"] == 0.25
    assert s["cka_word"] == pytest.approx(1.0) and s["cka_word_control"] < 0.2
    assert s["word_hit@1"] == 1.0 and s["word_hit@1_control"] < 0.2
    assert s["transcript_hit@1"] == 1.0 and s["nn_cos"] == pytest.approx(1.0)
    assert s["rms_audio"] == pytest.approx(s["rms_text"]) == pytest.approx(1.0)
    noise = [g.standard_normal(p.shape) for p in perfect]  # audio that carries nothing
    n = stats.alignment_stats(noise, clips, table, k=1, candidates=4)
    assert n["word_hit@1"] < 0.2 and n["cka_word"] < 0.2 and n["retrieval_a2t"] < 0.6


def test_readout_names_the_nearest_tokens_under_the_transcript():
    table = np.eye(4, dtype=np.float32)
    audio = np.array([[0.1, 0.9, 0.0, 0.2], [0.1, 0.0, -1.0, 0.5]], dtype=np.float32)
    ids, sims = stats.readout(audio, table, k=2)
    assert ids.tolist() == [[1, 3], [3, 0]]
    assert sims[0, 0] == pytest.approx(0.9 / np.linalg.norm(audio[0]), rel=1e-5)
    # "b <d>": token 1 is the word under audio token 0, token 3 the word under audio token 1
    clip = stats.Clip(0, "b <d>", {"voice": "v"}, ["b", "<d>"], [(0, 0.1), (0.1, 0.2)], "chars", np.array([0, 1]), [1, 3], [[1], [3]])
    rv = embedding_viz.RunViz("r", Path("."), {}, [clip], {"before": [audio], "after": [audio]}, {}, {s: [(ids, sims)] for s in embedding_viz.STAGES},
                    ["a", "b", "c", "<d>"], embedding_viz.MapData(np.zeros(0), np.zeros(0), np.zeros(0)), {}, 0.1)
    page = embedding_page.readout_html(rv, [0], k=2)
    assert "“b &lt;d&gt;”" in page and page.count('class="hit"') == 4  # top-1 of both tokens, both stages
    assert '<td class="w" colspan="1">b</td>' in page and "after #2" in page and "before #1" in page


def test_token_strings_are_readable():
    from omni.model.tokenizer import ByteTokenizer

    s = stats.token_strings(ByteTokenizer(), 257)
    assert s[ord("a")] == "a" and s[ord(" ")] == "·"
    assert s[256] == "<bos>" and s[0xE2] == "<0xe2>" and s[10] == "\\n"


def test_map_sample_is_seeded_and_within_budget():
    clips = _clips(["a b c", "d e f g", "h i"])
    tokens = {s: [np.zeros((len(c.words), 8)) for c in clips] for s in embedding_viz.STAGES}
    a = embedding_viz.map_sample(tokens, clips, vocab_size=1000, text_points=20, audio_points=5, seed=3)
    b = embedding_viz.map_sample(tokens, clips, vocab_size=1000, text_points=20, audio_points=5, seed=3)
    text_ids, m, pairs = a
    assert np.array_equal(text_ids, b[0]) and np.array_equal(pairs, b[2])
    assert len(text_ids) == 20 and set(range(9)) <= set(text_ids.tolist())  # transcript tokens first
    assert (m.kind == 1).sum() == (m.kind == 2).sum() == 5
    assert np.array_equal(m.pos[m.kind == 1], m.pos[m.kind == 2])  # the same audio tokens in both stages


def test_pca_is_deterministic():
    X = np.random.default_rng(0).standard_normal((80, 16)).astype(np.float32)
    xy = embedding_viz.project(X, "pca")
    assert xy.shape == (80, 2) and np.array_equal(xy, embedding_viz.project(X, "pca"))


UMAP_CHECK = """
import numpy as np
from omni.experiments import embedding_viz
X = np.random.default_rng(0).standard_normal((80, 16)).astype(np.float32)
a, b = embedding_viz.project(X, "umap", seed=1), embedding_viz.project(X, "umap", seed=1)
print(a.shape == (80, 2) and bool(np.array_equal(a, b)))
"""


@pytest.mark.slow  # numba compiles umap-learn on first use: 25-70 s on 2 busy cores, ~5 s once cached
def test_umap_is_deterministic_given_a_seed():
    # In a subprocess with the runner's numba cache (omni.run.runner: ~/.cache/omni/numba), not conftest's
    # fresh one: umap-learn is then compiled once per machine instead of once per test session.
    env = os.environ | {"NUMBA_CACHE_DIR": str(Path.home() / ".cache" / "omni" / "numba")}
    out = subprocess.run([sys.executable, "-c", UMAP_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="-p run="):
        audio_run.run_dirs("")
    with pytest.raises(FileNotFoundError, match="nope"):
        audio_run.run_dirs("nope")
    with pytest.raises(FileNotFoundError, match="working directory"):  # a relative corpus seen from elsewhere
        audio_run.run_cache({"config": {"corpus": str(tmp_path / "data" / "synth")}})


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """A tiny synthesized corpus, a random tiny LM, and two 5-step alignment runs on it: one whose
    projector is frozen for all 5 steps (its trained weights are its initial weights; lr=0 is refused)
    and one with the weighted layer choice."""
    from omni.data.synth import SynthConfig, build_corpus
    from omni.experiments import alignment
    from omni.experiments.alignment import AlignConfig
    from omni.model.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("viz")
    build_corpus(SynthConfig(out=str(tmp / "corpus"), sentences=16, min_words=3, max_words=6, test_fraction=0.25, workers=1))
    torch.manual_seed(0)
    GPT(GPTConfig(sequence_len=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)).save(tmp / "lm")
    common = dict(corpus=str(tmp / "corpus"), features=str(tmp / "features"), lm=str(tmp / "lm"), steps=5, eval_every=5,
                  eval_clips=4, batch_size=8, whisper_baseline=False, device="cpu", max_new_tokens=8)
    alignment.run(AlignConfig(**common, freeze_projector_steps=5, seed=3, out=str(tmp / "frozen" / "model")))
    alignment.run(AlignConfig(**common, layer="weighted", out=str(tmp / "weighted" / "model")))
    return tmp


def test_before_is_the_runs_own_initialisation(runs):
    after, meta = audio_run.load_run(runs / "frozen")  # a report folder holding model/
    before = audio_run.initial_model(after, meta)
    assert meta["config"]["seed"] == 3
    for (n, a), (_, b) in zip(after.projector.state_dict().items(), before.projector.state_dict().items()):
        assert torch.equal(a, b), n  # frozen: the trained weights never moved from the init we rebuild
    after, meta = audio_run.load_run(runs / "weighted" / "model")
    before = audio_run.initial_model(after, meta)
    assert not torch.equal(after.projector.fc1.weight, before.projector.fc1.weight)


def test_a_grid_folder_means_all_its_runs(runs):
    assert audio_run.run_dirs(str(runs)) == [runs / "frozen" / "model", runs / "weighted" / "model"]
    assert audio_run.run_dirs(f"{runs / 'weighted'}, {runs / 'frozen' / 'model'}") == [runs / "weighted" / "model", runs / "frozen" / "model"]


def test_run_is_deterministic_given_a_seed(runs):
    cfg = embedding_viz.EmbeddingVizConfig(run=str(runs / "weighted"), split="test,test_seen_voice", clips=6, candidates=3, text_points=50,
                        audio_points=20, validate_clips=0, umap=False, seed=5)
    a, b = (embedding_viz.run(cfg, log=lambda *_: None)[0] for _ in range(2))
    assert [c.row for c in a.clips] == [c.row for c in b.clips] and a.stats == b.stats
    assert np.array_equal(a.map.xy["pca"], b.map.xy["pca"]) and np.array_equal(a.map.pos, b.map.pos)
    c = embedding_viz.run(dataclasses.replace(cfg, seed=6), log=lambda *_: None)[0]
    assert [x.row for x in c.clips] != [x.row for x in a.clips]


def test_report_end_to_end(runs):
    """Notebook 06 under papermill's own CLI on both runs: its own MLflow run ends FINISHED with the statistics."""
    from conftest import only_run, papermill, papermill_env

    out_dir = runs / "report"
    res = papermill("06_embedding_viz.ipynb", runs / "06.ipynb", papermill_env(runs / "mlflow.db"), out_dir=out_dir,
                    run=f"{runs / 'frozen'},{runs / 'weighted'}", split="test,test_seen_voice", clips=8, candidates=4,
                    text_points=120, audio_points=60, validate_clips=4, readout_clips=1,
                    umap=False)  # UMAP: test_umap_is_deterministic_given_a_seed (slow); the notebook loops over whatever maps exist
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run(runs / "mlflow.db", "embedding_viz")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["after_retrieval_chance"] == 0.25
    assert metrics["before_cos_clip"] == pytest.approx(metrics["after_cos_clip"])  # the frozen run
    assert "layer_weighted_k_4_stack/after_cka_word" in metrics
    page = (out_dir / "embedding_map.html").read_text()
    assert embedding_page.remote_references(page) == []
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    assert [x["name"] for x in data["runs"]] == ["layer=last k=4 stack", "layer=weighted k=4 stack"]
    assert set(data["runs"][0]["xy"]) == {"pca"} and len(data["runs"][0]["kind"]) == 120 + 2 * 60
    assert all(c["timing"] == "espeak" for c in data["runs"][0]["clips"])
    report = (runs / "06.ipynb").read_text()
    assert "What the LM reads" in report and "before #1" in report
    if shutil.which("node"):  # the page's script runs and a hover describes the clip under the mouse
        harness = runs / "harness.js"
        harness.write_text(HARNESS)
        out = subprocess.run(["node", str(harness), str(out_dir / "embedding_map.html")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["display"] == "block" and "audio token after training" in res["tip"] and "nearest LM tokens" in res["tip"]
        assert res["pinned"] >= 0 and res["strokes"] > 0 and res["stats"] > 0
        assert res["word"] and res["found"] >= 1  # searching the hovered token's word highlights it


def test_page_is_offline_and_escapes_text():
    assert embedding_page.remote_references('<script src="https://cdn.x/plotly.js"></script>') != []
    assert embedding_page.remote_references('<link rel="stylesheet" href="//fonts.x/css">') != []
    assert embedding_page.remote_references('<script type="application/json" id="data">{"t": "see https://x.org"}</script>') == []
