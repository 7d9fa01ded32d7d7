"""Change over time: earlier results of the same patient found (lookup, pacs, inbox) and compared (change)."""
