"""Errors that cross process and package boundaries; each message is one line naming the fix."""

from __future__ import annotations


class InputError(Exception):
    """A CT or segmentation the node refuses; the message is one line for the user."""
