"""minislm: small pretrained encoders collaborating on text classification, in NumPy and Numba.

Shape letters, used in every signature and shape comment of the package:
    B batch, T tokens, H hidden width, N attention heads, D head dim (or a common width),
    L layers, E experts, C classes, V vocabulary, F feed-forward width, M rows of a matmul.

Layers, from bottom to top:
    kernels/      Numba kernels, each beside its plain NumPy reference
    encoder.py    BERT and MPNet encoders built on the kernels; experts.py loads them with their tokenizer
    weights.py    fetch, verify, convert and place the pretrained experts
    lexical.py    the hashed n-gram expert; features.py caches the encoders' pooled layers
    collab/       layer mix, gates, fusions, heads, losses, optimiser: forward + hand-written backward
    team.py       staged training and cascade inference of the whole team; checkpoint.py saves it
    train.py, classify.py, experiments.py, bench.py, weights.py, embed.py: the command-line tools

    from minislm import Team
    team = Team.load("weights/ag_news")
    team.predict(["Stocks rallied on Wall Street"])   # -> ["Business"]
"""
from minislm import numba_setup

numba_setup.prefer_512_bit_vectors()  # before any @njit function exists (see numba_setup)

__version__ = "0.1.0"

from minislm.experts import load_expert  # noqa: E402
from minislm.team import Team  # noqa: E402

__all__ = ["Team", "load_expert"]
