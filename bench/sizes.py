"""The benchmarks' frame-size arguments: ``WIDTHxHEIGHT`` in pixels."""

from __future__ import annotations

import argparse


def frame_size(text: str) -> tuple[int, int]:
    """``(width, height)`` for ``WxH`` (e.g. ``1024x512``); an argparse error for anything else."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 1024x512), got {text!r}")
    return int(width), int(height)
