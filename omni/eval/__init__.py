"""Measuring: WER and friends, the Whisper yardstick, probes, embedding statistics, the texture
benchmark's scoring, and the ablation grid's comparison and findings. Reads models and data;
never trains one."""
