"""Linears run by a kernel that holds the weight in its own form: dense float weights (``cpu.py`` packs them
for oneDNN) and weight-only quantized ones (``formats``: what the numbers mean)."""
