"""Data: image codecs and the label-map coder, dataset sources, held-out splits, the WebDataset shard
builder and its manifest, and the loader that reads shards back as training tensors."""
