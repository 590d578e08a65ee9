"""The OpenAI-compatible HTTP server (`mtnlg serve`) over the inference engine."""
