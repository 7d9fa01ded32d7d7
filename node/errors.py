"""Errors that cross process and package boundaries; each message is one line naming the fix."""

from __future__ import annotations

# How an admin adds missing weights, offline; every message (worker, web page) about missing weights ends with it.
INSTALL_FIX = ("run `paraspinal-node weights install --from <folder of release zips>` "
               "(`paraspinal-node weights urls` lists the zips to fetch); see README 'Weights'")


class InputError(Exception):
    """A CT or segmentation the node refuses; the message is one line for the user."""
