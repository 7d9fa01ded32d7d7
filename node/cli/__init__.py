"""Thin commands: parse arguments, call one component, map errors to exit codes."""
