"""minislm: small pretrained encoders collaborating on text classification, in NumPy and Numba.

Shape letters, used in every signature and shape comment of the package:
    B batch, T tokens, H hidden width, N attention heads, D head dim (or a common width),
    L layers, E experts, C classes, V vocabulary, F feed-forward width, M rows of a matmul.

Layers, from bottom to top (nothing imports upward):
    kernels/      Numba kernels, each beside its plain NumPy reference
    encoder.py    BERT and MPNet encoders built on the kernels
    weights.py    fetch, verify, convert and load the pretrained experts
"""
import os

# Numba's on-disk cache must live somewhere writable even when the package is installed read-only.
os.environ.setdefault(
    "NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "minislm", "numba")
)

__version__ = "0.1.0"
