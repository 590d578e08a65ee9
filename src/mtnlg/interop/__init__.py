"""Bridges between mtnlg checkpoints and other frameworks' formats (Hugging Face: interop.hf)."""
