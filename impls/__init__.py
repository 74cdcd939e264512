"""What genbench measures: the implementations, and the shared model and training code."""

import os

# Triton 3.9 warns at every compile unless this is set, and 3.10 turns the default
# to off: keep floating-point contraction (fused multiply-adds) on, as every Triton
# kernel here was checked and timed with, unless the user chose otherwise.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
