"""omni: teach a small GPT to hear.

A frozen Whisper encoder turns a clip into hidden states, a trained projector maps them into
the GPT's embedding space, and they are prepended to the text embeddings as soft tokens.
"""

__version__ = "0.1.0"
