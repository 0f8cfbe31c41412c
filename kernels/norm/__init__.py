"""Normalization kernels: RMSNorm in C for float32 rows (``rms``)."""
