"""The semantic-aware codec as a tool: the ``.jse`` container (:mod:`~pipeline.compress.container`), tiled
enhancement of large frames (:mod:`~pipeline.compress.tiling`) and the ``compress`` / ``decompress``
commands (:mod:`~pipeline.compress.commands`)."""
