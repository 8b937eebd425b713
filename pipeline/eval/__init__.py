"""Evaluation: image-quality metrics (PSNR, MS-SSIM, NIQE, LPIPS, FID), BD-rate, and the R-PD
evaluation of a codec against codec-SE."""
