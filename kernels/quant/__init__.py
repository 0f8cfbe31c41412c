"""Weight-only quantized linears: the formats (``formats``: what the numbers mean) and the kernels that run them."""
