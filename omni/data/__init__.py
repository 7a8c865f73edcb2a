"""Data: audio files and their checks, speech synthesis, manifests, text sources, the synthesized
corpora, instruction sets and the Whisper feature cache. May use the model (the cache runs the
encoder); never evaluation or experiments."""
