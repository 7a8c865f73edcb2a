"""Make a trained alignment run the committed hearing model, `models/hear`.

    python experiments/commit_hear.py RUN [--axis GRID_REPORT] [--out models/hear]
    python experiments/commit_hear.py --add-axis ARM,ARM... [--out models/hear]

RUN is the run to commit (a run folder, its report folder or an MLflow run id: omni.experiments.audio_run);
--axis the report folder of the trainable-axis grid it won (`omni run experiments/hearing.yaml`), whose
table goes into the provenance. --add-axis puts the rows of arms measured later (their run folders, on
the same recipe and budget) into the committed model's provenance, replacing rows of the same arm, and
touches nothing else. What it writes:

    models/hear/audio_path.safetensors  the audio path, float16
    models/hear/audio_path.json         as the run saved it, with `lm` relative to the folder: "lm" (its own
                                        copy, float16) or "../lm" (the committed LM it sits on, by path and hash)
    models/hear/lora.*                  the adapters, if it trained some
    models/hear/provenance.json         the commit that trained it, every parameter, its scores, the trainable
                                        axis it was chosen from, and how to reproduce it

Why float16: the folder is committed (at most 25 MB); tests/test_hear.py checks the committed model still
transcribes a clip of the repository's own voices to the right words.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omni.experiments.audio_run import run_lm, run_meta, weights_sha256  # noqa: E402
from omni.experiments.hearing import ARMS  # noqa: E402
from omni.model.gpt import GPT  # noqa: E402
from omni.model.lm import load_lm, save_lm  # noqa: E402


def half(src: Path, dst: Path) -> None:
    """A safetensors file with every floating-point tensor stored as float16."""
    state = load_file(str(src))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(dst))


def axis_rows(axis: str) -> list[dict]:
    """The trainable-axis table as rows: from a hearing grid's report (its trainable_axis.csv), or from
    run folders, comma-separated (each arm's saved scores; omni.experiments.hearing.run_rows)."""
    import pandas as pd

    from omni.experiments.hearing import run_rows

    folders = [a.strip() for a in axis.split(",") if a.strip()]
    if len(folders) == 1 and (Path(folders[0]) / "trainable_axis.csv").is_file():
        table = pd.read_csv(Path(folders[0]) / "trainable_axis.csv")
    else:
        table = run_rows(folders).reset_index()
    return json.loads(table.to_json(orient="records"))


def add_axis(out: Path, arms: str) -> None:
    """The arms' rows into out/provenance.json's trainable axis (a row of the same arm is replaced)."""
    f = out / "provenance.json"
    provenance = json.loads(f.read_text())
    new = axis_rows(arms)
    kept = [r for r in provenance.get("trainable_axis", []) if r["system"] not in {n["system"] for n in new}]
    order = list(ARMS.values())  # the axis in its own order: projector only, + LoRA, + the whole LM
    provenance["trainable_axis"] = sorted(kept + new, key=lambda r: order.index(r["system"]) if r["system"] in order else len(order))
    f.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    print(f"{f}: trainable axis = {', '.join(r['system'] for r in provenance['trainable_axis'])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="", help="the trained run to commit")
    p.add_argument("--add-axis", default="", help="only add these arms' rows (run folders, comma-separated) to the committed model's trainable axis")
    p.add_argument("--axis", default="", help="the trainable axis the run was chosen from: a hearing grid's report folder, "
                   "or the arms' run folders, comma-separated")
    p.add_argument("--out", default=str(REPO / "models" / "hear"), help="where the committed model goes")
    p.add_argument("--recipe", default="experiments/hear.yaml", help="the one command that reproduces it")
    p.add_argument("--decode", default="joint", help="how it transcribes by default (greedy | joint)")
    p.add_argument("--ctc-decode-weight", type=float, default=-1.0, help="joint decoding's CTC weight (default: the run's own), "
                   "e.g. the one an evaluation chose on the val split (ctc_decode_weights)")
    args = p.parse_args()
    if args.add_axis:
        add_axis(Path(args.out), args.add_axis)
        return
    if not args.run:
        p.error("RUN is required (unless --add-axis)")
    path, meta = run_meta(args.run)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    half(path / "audio_path.safetensors", out / "audio_path.safetensors")
    lm = Path(run_lm(path, meta))
    if "lm" in meta.get("saved", []):  # the run's own LM: committed with it, in float16
        gpt, tok = load_lm(lm)
        gpt.save(out / "lm", dtype=__import__("torch").float16) if isinstance(gpt, GPT) else save_lm(gpt, tok, out / "lm")
        if (lm / "tokenizer.json").exists():
            shutil.copy(lm / "tokenizer.json", out / "lm" / "tokenizer.json")
        lm_ref = "lm"
    else:  # an LM of the repository (models/lm): named relative to the folder, and by hash
        lm_ref = str(Path("..") / lm.resolve().relative_to(REPO / "models")) if lm.resolve().is_relative_to(REPO / "models") else str(lm)
    for name in ("lora.safetensors", "lora.json"):
        if (path / name).exists():
            shutil.copy(path / name, out / name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    decoding = meta.get("decoding", {}) | {"decode": args.decode}
    if args.ctc_decode_weight >= 0:
        decoding["ctc_decode_weight"] = args.ctc_decode_weight
    meta |= {"decoding": decoding, "lm": lm_ref, "lm_sha256": weights_sha256(out / lm_ref if lm_ref == "lm" else lm), "features": "", "manifest": "",
             "started_from": ""}
    (out / "audio_path.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    provenance = {
        "commit": commit, "measured_by": args.recipe, "reproduce": f".venv/bin/omni run {args.recipe}",
        "trained_from": str(path), "config": meta.get("config", {}), "scores": meta.get("scores", {}),
        "base_lm": {"path": "models/lm", "sha256": weights_sha256(REPO / "models" / "lm")},
        "trainable_axis": axis_rows(args.axis) if args.axis else [],
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MB; lm = {lm_ref}")


if __name__ == "__main__":
    main()
