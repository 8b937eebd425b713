"""JPD-SE: semantic-aware enhancement of any image codec, trained at scale.

Modules, one concern each: ``config`` (typed job config), ``codecs`` (image codecs and
the lossless label-map coder), ``sources`` (Cityscapes, ADE20K, folder datasets),
``shards`` (WebDataset shard builder), ``loader`` (shard -> tensor pipeline),
``models`` and ``losses`` (pix2pixHD-style networks and objectives), ``export``
(portable generator files), ``engine`` (DeepSpeed set-up and checkpoints),
``trainer`` (the three phases), ``tracking`` (MLflow and its registry), ``metrics``,
``bdrate`` and ``evaluate`` (R-PD evaluation), ``tune`` (Ray Tune), ``job`` (the
end-to-end main job) and ``cli``.
"""

__version__ = "0.1.0"
