"""A segmenter file loaded for use outside training: its network, identity (sha256) and description.

Evaluation judges reconstructions with one (``eval.segmenter``); with ``data.label_source=decoder`` the
decoder derives codec-SE's label map from the decoded image with another (``data.segmenter``), and the
compressed file records that one's sha256. :func:`open_segmenter` loads each file once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.model.export import weights_sha256
from pipeline.segment.base import Segmenter, load_segmenter, read_spec


@dataclass(frozen=True)
class LoadedSegmenter:
    """A segmenter file's network (eval mode, CPU) and what names it."""

    path: Path
    model: Segmenter
    sha256: str
    architecture: str

    @property
    def name(self) -> str:
        """``<architecture> <file name>#<sha256[:12]>``: what tables and logs say judged or predicted."""
        return f"{self.architecture} {self.path.name}#{self.sha256[:12]}"

    def train_ids(self, rgb: np.ndarray) -> np.ndarray:
        """Train ids (``uint8`` ``H x W``, :mod:`pipeline.segment.labels`) of one RGB ``uint8`` image."""
        return self.model.predict(rgb)

    def label_ids(self, rgb: np.ndarray) -> np.ndarray:
        """Cityscapes label ids of one RGB image: the label map a generator takes."""
        return self.model.predict_label_ids(rgb)


@lru_cache(maxsize=4)
def _load(path: Path, sha256: str) -> LoadedSegmenter:
    return LoadedSegmenter(path, load_segmenter(path), sha256, read_spec(path)["architecture"])


def open_segmenter(path: str | Path) -> LoadedSegmenter:
    """The segmenter in ``path`` (19 Cityscapes train classes; refused in one line otherwise), loaded once
    per content: the same file changed on disk is loaded again."""
    path = Path(path).resolve()
    return _load(path, weights_sha256(path) if path.is_file() else "")
