"""Inference: sampling and text generation."""
