"""Building blocks of the model: the frozen Whisper encoder and its weights, the projector, the LMs
(omni's GPT, nanochat checkpoints, Hugging Face causal LMs) and SpeechLM, which joins them.
Imports nothing above itself: no data, no evaluation, no experiment."""
