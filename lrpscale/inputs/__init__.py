"""Inputs: the four input kinds (folders, manifests, Parquet with image bytes, WebDataset tar
shards), listed once with stable image ids, then read, decoded and preprocessed in CPU tasks.

Rule: pyarrow, pandas, PIL, numpy, ``lrpscale.config`` and ``lrpscale.locations``; no torch
(decoding runs in Ray's CPU tasks, which must start fast).
"""
