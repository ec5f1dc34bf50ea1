"""Raw Triton kernels for the GPU path (installed as ``alignkit.kernels``).

No autograd here; launchers and autograd live in ``alignkit.ops``. The kernels themselves are the
subject of the Triton issue: until they land, ``backend="triton"`` raises a clear error.
"""
