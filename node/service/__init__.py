"""Process wiring: `serve`, the worker process, the worker supervisor, housekeeping."""
