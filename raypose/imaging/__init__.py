"""Pure image and keypoint math: decode, crop geometry, CPU and torch crops, heatmaps, keypoint schemas.

Only numpy, torch and Pillow: nothing here imports pyarrow, ray or the job spec.
"""
