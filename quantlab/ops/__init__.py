"""Quantized-weight ops: compiled kernels where built, PyTorch references everywhere else.

``dequant`` / ``matmul`` dispatch through ``torch.ops.quantlab.groupwise_int_*``; ``backend`` says
which implementation a device gets. Importing this package never initialises CUDA.
"""

from quantlab.ops._extension import extension_error, extension_loaded
from quantlab.ops.groupwise_int import backend, dequant, matmul

__all__ = [
    "backend",
    "dequant",
    "extension_error",
    "extension_loaded",
    "matmul",
]
