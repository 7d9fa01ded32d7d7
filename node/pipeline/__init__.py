"""Runs in a worker process (and the model child): load → segment → measure → report. Never imported by `serve`."""
