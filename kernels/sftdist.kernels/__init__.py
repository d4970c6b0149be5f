"""Custom kernels (installed as ``sftdist.kernels``), each with a pure-torch reference and a test
comparing the two. Nothing here may need a GPU, triton or flash-attn to import."""
