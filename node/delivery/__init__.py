"""Runs in `serve`: sends results to their destinations until acknowledged."""
