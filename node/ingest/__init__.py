"""Runs in `serve`: receives images (DICOM C-STORE, watch folder), spools them durably, decides when a series is complete. Never imports the pipeline."""
