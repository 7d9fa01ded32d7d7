"""Backfill: earlier studies pulled from the PACS (C-FIND, then C-MOVE or C-GET), throttled and resumable."""
