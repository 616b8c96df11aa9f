"""The `dsc` op set: custom ops that optimized graphs are made of.

Each op has a reference implementation (its definition), a fake implementation for export and,
where it pays, a Triton kernel used on CUDA. Nothing here imports the rest of the project.
"""

from dscompile.runtime.ops import latent_attention, moe  # noqa: F401  (registers the ops)
