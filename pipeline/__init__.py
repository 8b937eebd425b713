"""JPD-SE: semantic-aware enhancement of any image codec, trained at scale.

One sub-package a concept (docs/ARCHITECTURE.md draws the tree): ``data`` (codecs, datasets, WebDataset
shards and their loader), ``model`` (the pix2pixHD-style networks, their losses and exported files),
``train`` (the three phases under DeepSpeed, checkpoints, validation, and ``train.tune``, the Ray Tune
sweep), ``eval`` (R-PD evaluation: PSNR, MS-SSIM, NIQE, LPIPS, FID, BD-rate), ``tracking`` (MLflow runs
and the model registry), ``segment`` (the decoder-side segmenter), ``compress`` (the ``.jse`` file
commands); beside them ``config`` (the one typed job config), ``job`` (the end-to-end main job), ``cli``
and small process helpers (``atomic``, ``lock``, ``rank_exit``, ``ray_session``).
"""

__version__ = "0.1.0"
