"""Instruction data about the voice, made from the synthesized corpus's own labels.

Every clip of the corpus (omni.data.synth) becomes a handful of one-question conversations in the
manifest format omni already reads (`<audio>path</audio>` tags in a user turn, see
omni.data.manifest):

    {"conversations": [{"from": "user", "value": "<audio>clips/x.wav</audio> Is the voice male or female?"},
                       {"from": "assistant", "value": "female"}],
     "task": "gender", "label": "gender", "format": "open", "answer": "female",
     "options": ["female", "male"], "chance": 0.5, "clip_ids": ["..."], "split": "test", ...}

Tasks (TASKS): transcription; gender; accent; rate and pitch as a bucket (slow/medium/fast,
low/mid/high) and as a comparison ("faster or slower than usual?"); style; same speaker as a
second clip (two tags in one turn); the last word; does the speaker mention a word; and a caption of
the voice ("describe": "female, fast, high, whispered"), the factors in a fixed order, which a
perception-first curriculum trains before any question (omni.experiments.tuning's perception_steps).

Design choices:
- One split of instructions per corpus split, each made only from that split's clips: the pair of
  a same-speaker question and the distractor word of a mention question come from the same split,
  so the test set (the corpus's `test`: unseen voices AND unseen sentences) never names a train
  clip or sentence, and no test voice or sentence reaches train.
- Everything is a pure function of (corpus rows, config): each (clip, task) draws its phrasing,
  format, options and partner from a Random seeded by (seed, clip_id, task), so adding a task or a
  clip never changes the questions of another.
- Answers are short and closed where the label allows: one word, a letter for multiple choice
  (lettered options, chance = 1 / options), yes / no. `chance` is stored on every row so a scorer
  does not need to know the tasks; open answers with no closed set (transcript, last word) get 0.
- Multiple-choice options come from the label's values across the whole corpus (all splits), so a
  test question can offer a value the test split lacks, and the option set never leaks the split.
  A separate test corpus (omni.data.synth's test_hard) takes them from the training corpus
  (`options_from`), so its questions offer the same options, at the same chance, as the test set's.
- Comparative rate/pitch questions are asked only for the outer buckets (the middle third is
  neither "faster" nor "slower" than usual); yes/no questions are balanced per clip by a coin flip,
  so always saying "yes" scores about 0.5, not more. Gender is asked only of voices that have one
  (espeak's klatt variants declare none: label "other").
- Most questions put the audio before the question, a share (`audio_last`) after it; train and val
  also get multi-turn conversations (`chains` per clip: 2-3 of the clip's questions, the audio in
  the first turn only), so training meets audio in the middle of a sequence and follow-up turns.
  Test sets stay single-turn: one scored question per row.
- Style names are what a listener would say (STYLE_NAMES): whisper -> whispered, croak -> creaky,
  klatt -> synthetic-sounding, elderly, normal.
"""

from __future__ import annotations

import collections
import random
import re
from dataclasses import dataclass
from pathlib import Path

from omni.data.manifest import AUDIO_TAG, read_manifest, write_manifest
from omni.data.synth import SPLITS

TASKS = ("transcribe", "gender", "accent", "rate", "rate_compare", "pitch", "pitch_compare", "style",
         "same_speaker", "last_word", "mention", "describe")
TEXTURE_TASKS = ("gender", "accent", "rate", "rate_compare", "pitch", "pitch_compare", "style", "same_speaker")
STYLE_NAMES = {"whisper": "whispered", "croak": "creaky", "klatt": "synthetic-sounding", "elderly": "elderly",
               "normal": "normal"}
ACCENT_NAMES = {"en-us": "American", "en-gb": "British", "en-gb-scotland": "Scottish",
                "en-gb-x-rp": "Received Pronunciation", "en-029": "Caribbean", "en-us-nyc": "New York",
                "en-gb-x-gbclan": "Lancashire", "en-gb-x-gbcwmd": "West Midlands"}  # else the espeak code
LETTERS = "ABCDEFGH"

# phrasings per task; {options} is filled with the answer set ("female or male") where shown
PHRASINGS: dict[str, tuple[str, ...]] = {
    "transcribe": ("Transcribe the audio.", "What does the speaker say?", "Write down the words you hear.",
                   "Repeat exactly what was said."),
    "gender": ("Is the voice male or female?", "Is this a male or a female speaker?",
               "What is the speaker's gender, male or female?"),
    "accent": ("Which accent does the speaker have?", "Where does this accent come from?",
               "What accent is this?"),
    "rate": ("How fast does the speaker talk: {options}?", "Is the speaking rate {options}?",
             "Describe the speaking speed as {options}."),
    "rate_compare": ("Is the speaker talking faster or slower than usual?", "Is this speech faster or slower than normal?",
                     "Compared with an ordinary pace, is this faster or slower?"),
    "pitch": ("How high is the voice: {options}?", "Is the pitch of the voice {options}?",
              "Describe the voice's pitch as {options}."),
    "pitch_compare": ("Is the voice higher or lower than usual for this speaker?",
                      "Is the speaker's pitch raised or lowered? Answer higher or lower.",
                      "Does this voice sound higher or lower than its normal pitch?"),
    "style": ("How does the voice sound?", "Which describes the voice best?", "What is the speaking style?"),
    "same_speaker": ("Are these two clips spoken by the same speaker?", "Is the second voice the same person as the first?",
                     "Same speaker in both clips? Answer yes or no."),
    "describe": ("Describe the voice.", "What does the voice sound like?", "Describe the speaker's voice: gender, speed, pitch and style."),
    "last_word": ("What is the last word?", "Which word does the speaker say last?", "What is the final word spoken?"),
    "mention": ("Does the speaker mention the word '{word}'?", "Is the word '{word}' said?",
                "Do you hear the word '{word}'? Answer yes or no."),
}
OPEN_ONLY = ("transcribe", "last_word", "same_speaker", "mention", "rate_compare", "pitch_compare", "describe")
# task -> corpus label it asks about (what a linear probe would predict); None: not a clip label
TASK_LABEL = {"gender": "gender", "accent": "accent", "rate": "rate_bucket", "rate_compare": "rate_bucket",
              "pitch": "pitch_bucket", "pitch_compare": "pitch_bucket", "style": "style", "same_speaker": None,
              "transcribe": None, "last_word": None, "mention": None, "describe": None}


@dataclass
class InstructionConfig:
    corpus: str = "data/synth"  # a folder written by omni.data.synth.build_corpus (manifest.jsonl)
    out: str = "data/instructions"  # one conversation manifest per split: train.jsonl, val.jsonl, ...
    seed: int = 0  # decides phrasings, formats, options, partners and distractor words
    tasks: tuple[str, ...] = TASKS  # which tasks to ask
    mc_fraction: float = 0.5  # share of closed-label questions asked as lettered multiple choice
    max_options: int = 4  # options shown in a multiple-choice question (fewer if the label has fewer)
    audio_last: float = 0.25  # share of questions whose audio tag comes after the question text
    chains: int = 1  # per clip of every split but test*: multi-turn conversations of 2-3 of its questions
    options_from: str = ""  # corpus whose label values make the answer sets (the training corpus, for a separate test corpus such as test_hard); "" = this corpus


def words(text: str) -> list[str]:
    """Lower-case words of a transcript, punctuation dropped (apostrophes inside words kept)."""
    return re.findall(r"[a-z]+(?:'[a-z]+)*", text.lower())


def style_name(style: str) -> str:
    return STYLE_NAMES.get(style, style)


def accent_name(accent: str) -> str:
    return ACCENT_NAMES.get(accent, accent)


def _check(cfg: InstructionConfig) -> None:
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown or not cfg.tasks:
        raise ValueError(f"InstructionConfig.tasks: unknown {unknown} (choose from {TASKS})" if unknown
                         else "InstructionConfig.tasks is empty")
    if not 0.0 <= cfg.mc_fraction <= 1.0:
        raise ValueError(f"InstructionConfig.mc_fraction must be in [0, 1], got {cfg.mc_fraction}")
    if not 0.0 <= cfg.audio_last <= 1.0:
        raise ValueError(f"InstructionConfig.audio_last must be in [0, 1], got {cfg.audio_last}")
    if cfg.chains < 0:
        raise ValueError(f"InstructionConfig.chains must be >= 0, got {cfg.chains}")
    if not 2 <= cfg.max_options <= len(LETTERS):
        raise ValueError(f"InstructionConfig.max_options must be in 2..{len(LETTERS)}, got {cfg.max_options}")


def load_corpus_rows(corpus: str | Path) -> list[dict]:
    """The corpus's clips as flat dicts (labels + text + absolute audio path), manifest order."""
    path = Path(corpus) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no corpus manifest; build the corpus with `omni data synth --out {corpus}`")
    rows = []
    for e in read_manifest(path, check_audio=False):
        missing = [k for k in ("split", "clip_id", "voice", "gender", "accent", "style", "rate_bucket", "pitch_bucket") if k not in e.labels]
        if missing:
            raise ValueError(f"{path}:{e.line}: not a synth corpus row, missing labels {missing}")
        rows.append(dict(e.labels, text=e.text, audio=str(e.audio.resolve())))
    return rows


def _answer_set(task: str, rows: list[dict]) -> list[str]:
    """The closed set of answers of a task over the whole corpus (sorted), [] for open tasks."""
    if task == "gender":
        return sorted({r["gender"] for r in rows} & {"female", "male"})
    if task == "accent":
        return sorted({accent_name(r["accent"]) for r in rows})
    if task == "style":
        return sorted({style_name(r["style"]) for r in rows})
    if task == "rate":
        return ["slow", "medium", "fast"]
    if task == "pitch":
        return ["low", "mid", "high"]
    if task == "rate_compare":
        return ["faster", "slower"]
    if task == "pitch_compare":
        return ["higher", "lower"]
    if task in ("same_speaker", "mention"):
        return ["yes", "no"]
    return []


def label_answer(task: str, value: str) -> str | None:
    """The answer that a clip's label value (TASK_LABEL[task]) gives to a single-clip closed task;
    None: the task does not apply to that value (a voice without gender, a middle-third rate)."""
    if task == "gender":
        return value if value in ("female", "male") else None
    if task == "accent":
        return accent_name(value)
    if task == "style":
        return style_name(value)
    if task in ("rate", "pitch"):
        return value
    if task == "rate_compare":
        return {"fast": "faster", "slow": "slower"}.get(value)
    if task == "pitch_compare":
        return {"high": "higher", "low": "lower"}.get(value)
    raise KeyError(f"task {task!r} is not answered by one clip label")


def answer_value(row: dict) -> str:
    """The answer in words: a multiple-choice row's option text behind its letter, else the answer.
    What balancing and stratifying by answer count (the letter's position is already shuffled)."""
    if row.get("format") == "mc":
        return row["options"][LETTERS.index(row["answer"])]
    return row["answer"]


def _tag(r: dict) -> str:
    return f"<audio>{r['audio']}</audio>"


def _question(cfg: InstructionConfig, task: str, r: dict, split_rows: list[dict], answer_sets: dict) -> dict | None:
    """One conversation row for (clip, task), or None when the task does not apply to this clip."""
    rng = random.Random(f"{cfg.seed}:{r['clip_id']}:{task}")
    phrasing = rng.choice(PHRASINGS[task])
    audios, clip_ids = [r], [r["clip_id"]]
    options = answer_sets[task]
    fmt = "open"
    if task == "transcribe":
        answer = r["text"]
    elif task == "describe":  # a caption of the voice's factors, in a fixed order: perception before questions
        gender = [r["gender"]] if r["gender"] in ("female", "male") else []
        answer = ", ".join(gender + [r["rate_bucket"], r["pitch_bucket"], style_name(r["style"])])
    elif task == "last_word":
        ws = words(r["text"])
        if not ws:
            return None
        answer = ws[-1]
    elif task == "mention":
        own = set(words(r["text"]))
        others = sorted({w for o in split_rows if o["sentence_id"] != r["sentence_id"] for w in words(o["text"])} - own)
        yes = rng.random() < 0.5
        if not own or (not yes and not others):
            return None
        word = rng.choice(sorted(own)) if yes else rng.choice(others)
        phrasing = phrasing.format(word=word)
        answer = "yes" if yes else "no"
    elif task == "same_speaker":
        same = [o for o in split_rows if o["voice"] == r["voice"] and o["sentence_id"] != r["sentence_id"]]
        other = [o for o in split_rows if o["voice"] != r["voice"]]
        if not same or not other:
            return None  # both answers must be possible, or "yes" / "no" would be given away by the split
        yes = rng.random() < 0.5
        if not yes:  # a hard negative where there is one: another voice of the same gender
            hard = [o for o in other if o["gender"] == r["gender"]]
            other = hard or other
        partner = rng.choice(same if yes else other)
        audios, clip_ids = [r, partner], [r["clip_id"], partner["clip_id"]]
        answer = "yes" if yes else "no"
    else:
        answer = label_answer(task, r[TASK_LABEL[task]])
        if answer is None or len(options) < 2:
            return None
        if answer not in options:  # only with options_from: a value the option corpus never has
            raise ValueError(f"clip {r['clip_id']}: the {task} answer {answer!r} is not among the answer set {options} "
                             f"(InstructionConfig.options_from names a corpus without it)")
        phrasing = phrasing.format(options=", ".join(options[:-1]) + " or " + options[-1])
        if task not in OPEN_ONLY and rng.random() < cfg.mc_fraction:
            fmt = "mc"
            distractors = [o for o in options if o != answer]
            shown = [answer] + rng.sample(distractors, min(cfg.max_options - 1, len(distractors)))
            rng.shuffle(shown)
            options = shown
            lines = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(shown))
            phrasing = f"{phrasing}\n{lines}\nAnswer with the letter."
            answer = LETTERS[shown.index(answer)]
        elif task == "accent" or task == "style":  # an open question names the answer set
            phrasing = f"{phrasing} Answer with one of: {', '.join(options)}."
    tags = " ".join(_tag(a) for a in audios)
    # mostly the audio first; sometimes after the question, so the model meets audio mid-sequence too
    user = f"{phrasing} {tags}" if rng.random() < cfg.audio_last else f"{tags} {phrasing}"
    label = TASK_LABEL[task]
    return {
        "conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": answer}],
        "task": task,
        "label": label,
        "label_value": r[label] if label else None,
        "format": fmt,
        "answer": answer,
        "options": options,
        "chance": 1.0 / len(options) if options else 0.0,
        "clip_ids": clip_ids,
        "texts": [a["text"] for a in audios],
        "voices": [a["voice"] for a in audios],
        "split": r["split"],
    }


def build_instructions(rows: list[dict], cfg: InstructionConfig, option_rows: list[dict] | None = None) -> dict[str, list[dict]]:
    """{split: conversation rows} for every corpus split present, each from that split's clips only.
    option_rows: the rows whose label values make the answer sets (default `rows`)."""
    _check(cfg)
    answer_sets = {t: _answer_set(t, option_rows or rows) for t in cfg.tasks}
    out: dict[str, list[dict]] = {}
    by_split = collections.defaultdict(list)
    for r in rows:
        by_split[r["split"]].append(r)
    for split in [s for s in SPLITS if s in by_split] + sorted(set(by_split) - set(SPLITS)):
        split_rows = by_split[split]
        out[split] = []
        for r in split_rows:
            qs = [q for t in cfg.tasks if (q := _question(cfg, t, r, split_rows, answer_sets)) is not None]
            out[split] += qs
            if not split.startswith("test"):  # test sets stay one question per row: the benchmark's unit
                out[split] += _chains(cfg, r, [q for q in qs if len(q["clip_ids"]) == 1])
    return out


def _chains(cfg: InstructionConfig, r: dict, qs: list[dict]) -> list[dict]:
    """Multi-turn conversations about one clip: its audio in the first user turn only, the later
    questions answered from what was heard before (task "multi_turn", the last answer's row)."""
    rng = random.Random(f"{cfg.seed}:{r['clip_id']}:chains")
    out = []
    for _ in range(cfg.chains if len(qs) >= 2 else 0):
        picked = rng.sample(qs, min(len(qs), rng.choice((2, 3))))
        turns = []
        for i, q in enumerate(picked):
            user, bot = q["conversations"]
            text = user["value"] if i == 0 else AUDIO_TAG.sub("", user["value"]).strip()
            turns += [{"from": "user", "value": text}, dict(bot)]
        out.append({"conversations": turns, "task": "multi_turn", "label": None, "label_value": None, "format": "open",
                    "answer": picked[-1]["answer"], "options": [], "chance": 0.0, "clip_ids": [r["clip_id"]],
                    "texts": [r["text"]], "voices": [r["voice"]], "split": r["split"]})
    return out


def write_instructions(cfg: InstructionConfig) -> dict[str, Path]:
    """Read the corpus, build every split's questions and write OUT/<split>.jsonl; returns the paths."""
    _check(cfg)
    rows = load_corpus_rows(cfg.corpus)
    option_rows = load_corpus_rows(cfg.options_from) if cfg.options_from else None
    sets = build_instructions(rows, cfg, option_rows)
    out = Path(cfg.out)
    return {split: write_manifest(out / f"{split}.jsonl", qs) for split, qs in sets.items()}


def task_counts(path: str | Path) -> dict[str, int]:
    """Questions per task in a written instruction manifest (for the CLI's summary)."""
    return dict(collections.Counter(e.labels["task"] for e in read_manifest(path, check_audio=False)))
