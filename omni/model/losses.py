"""What ties audio tokens to the words spoken, beside alignment's cross-entropy.

- `ctc_embedding_loss`: CTC over the LM's vocabulary, each audio token read through the LM's own
  input embeddings (`SpeechLM.audio_logits`), BOS the blank: it asks the projector for what a frozen LM
  can read without learning, its own word embeddings, in order.
- `distill_loss`: KL from the same frozen LM reading the transcript where the audio stands
  (Ultravox's distillation), soft targets where cross-entropy has one hard token.
- `ctc_readout`: what the audio tokens spell with no LM at all; beside the LM's transcript it
  separates what the projector recognised from what the frozen LM copied out of it.
"""

from __future__ import annotations

import torch

from omni.model.encoder import collate_states
from omni.model.speech_lm import SpeechLM


def ctc_embedding_loss(model: SpeechLM, hidden: torch.Tensor, frame_lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """CTC that pulls each audio token onto the LM's embedding of a word spoken in its stretch:
    the token's logits over the LM vocabulary (SpeechLM.audio_logits: its dot products with the LM's
    own input embeddings, or a lego projector's posteriors), BOS is the blank, the transcript's
    tokens the target. It asks the projector for what a frozen LM can read without learning: its own
    word embeddings, in order."""
    logits, lengths = model.audio_logits(hidden, frame_lengths)
    logp = logits.log_softmax(dim=-1)
    targets = [model.tokenizer.encode(t) for t in texts]
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long, device=logits.device)
    # zero_infinity: a clip with fewer audio tokens than text tokens (+ repeats) adds nothing, not inf
    return torch.nn.functional.ctc_loss(logp.transpose(0, 1), flat, lengths, torch.tensor([len(t) for t in targets]),
                                        blank=model.tokenizer.bos_id, zero_infinity=True)


def distill_loss(model: SpeechLM, hidden: torch.Tensor, frame_lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """KL(teacher || student) on the text's next-token distributions. The teacher is the same frozen
    LM with the transcript's own token embeddings standing where the audio tokens stand (in the same
    layout: SpeechLM.wrap); the student sees the audio tokens. Ultravox distils its projector from the LM reading the transcript; here
    the teacher's distributions say how the LM would continue had the audio been the words, soft
    targets where cross-entropy has one hard token."""
    device = hidden.device
    idx, targets = model.text_batch(texts, device)
    prefix, mask = model.prefix(hidden, frame_lengths)
    student = model.gpt(idx, audio=prefix, audio_mask=mask).float().log_softmax(-1)
    with torch.no_grad():
        ids = [model.tokenizer.encode(t) or [model.tokenizer.bos_id] for t in texts]
        padded = torch.full((len(ids), max(map(len, ids))), model.tokenizer.bos_id, dtype=torch.long, device=device)
        for i, row in enumerate(ids):
            padded[i, : len(row)] = torch.tensor(row)
        words, words_mask = model.wrap(model.gpt.embed(padded), torch.tensor([len(r) for r in ids], device=device))
        teacher = model.gpt(idx, audio=words.to(prefix.dtype), audio_mask=words_mask).float().log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl[targets >= 0].mean()


@torch.no_grad()
def ctc_readout(model: SpeechLM, states: list[torch.Tensor], batch_size: int) -> list[str]:
    """What the audio tokens spell with no LM: each read as its most likely LM token (SpeechLM.audio_logits),
    repeats collapsed, blanks (BOS) dropped. Beside the LM's transcript it separates what the
    projector recognised from what the frozen LM copied out of it."""
    device, blank = model.gpt_device, model.tokenizer.bos_id
    out = []
    for i in range(0, len(states), batch_size):
        hidden, frame_lengths = collate_states([s.float() for s in states[i : i + batch_size]])
        logits, lengths = model.audio_logits(hidden.to(device), frame_lengths.to(device))
        best = logits.argmax(-1).tolist()
        for row, n in zip(best, lengths.tolist()):
            ids = [t for j, t in enumerate(row[:n]) if t != blank and (j == 0 or t != row[j - 1])]
            out.append(model.tokenizer.decode(ids).strip())
    return out
