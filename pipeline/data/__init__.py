"""Data: image codecs and the label-map coder (``codecs``), dataset sources, held-out splits, the WebDataset
shard builder, the typed manifest of a shard folder, and the loader that reads shards back as tensors."""
