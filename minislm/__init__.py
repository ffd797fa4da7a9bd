"""minislm: small pretrained encoders collaborating on text classification, in NumPy and Numba.

Shape letters, used in every signature and shape comment of the package:
    B batch, T tokens, H hidden width, N attention heads, D head dim (or a common width),
    L layers, E experts, C classes, V vocabulary, F feed-forward width, M rows of a matmul, K contraction.

Layers, from bottom to top (nothing imports upward; tests/test_architecture.py checks it):
    numba_setup.py, atomic.py, flops.py, data.py   set-up, atomic files, the FLOP ledger, datasets
    kernels/      Numba kernels, each beside its plain NumPy reference, each owning its FLOP formula
    encoder/      config, checked Hugging Face folder, tokenizer, pooling, BERT and MPNet on the kernels
    experts/      registry and integrity of the pretrained experts, fetch + conversion, loading, features,
                  the lexical expert
    collab/       layer mix, gates, fusions, heads, losses, optimiser: forward + hand-written backward
    team/         config, staged training, cascade inference, checkpoint format
    train.py, classify.py, experiments.py, bench.py, resources.py, weights.py, embed.py: the command-line tools

    from minislm import Team
    team = Team.load("weights/ag_news")
    team.predict(["Stocks rallied on Wall Street"])   # -> ["Business"]
"""
from minislm import numba_setup

numba_setup.prefer_512_bit_vectors()  # before any @njit function exists (see numba_setup)

__version__ = "0.1.0"

from minislm.experts import load_expert  # noqa: E402
from minislm.team import Team, TeamConfig, train_team  # noqa: E402

__all__ = ["Team", "TeamConfig", "load_expert", "train_team"]
