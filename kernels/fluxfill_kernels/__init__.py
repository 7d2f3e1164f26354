"""fluxfill's kernels: torch custom ops in the ``fluxfill`` namespace, one file per op.

Each op file holds ``<op>_ref`` (pure torch, the definition), ``<op>_triton`` (the Triton launcher,
which also runs on CPU tensors under ``TRITON_INTERPRET=1``) and the registration of
``torch.ops.fluxfill.<op>`` (CUDA: Triton; CPU: the native library when built, else the reference).
"""
