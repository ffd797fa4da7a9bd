"""`python -m minislm.embed "text" ...`: sentence embeddings from each pretrained expert, and how alike they are.

Prints, per expert, the cosine similarity of every pair of texts (masked-mean embeddings of the last layer)
and the time the encoder took. `--json` prints the vectors instead.
"""
import argparse
import json
import sys
import time

import numpy as np

DEFAULT_TEXTS = [
    "Stocks rallied after the central bank held interest rates steady.",
    "Shares rose on Wall Street as the Fed kept rates unchanged.",
    "The striker scored twice in the second half to win the cup final.",
]


def cosine_matrix(v):
    """[B, H] -> [B, B] cosine similarities."""
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return u @ u.T


def main(argv=None):
    from minislm.experts import load_expert, registry

    ap = argparse.ArgumentParser(prog="python -m minislm.embed", description=__doc__.splitlines()[0])
    ap.add_argument("texts", nargs="*", help="texts to embed (default: three example sentences)")
    ap.add_argument("--experts", nargs="+", default=list(registry.EXPERTS),
                    help="expert names or model folders (default: the three pretrained experts)")
    ap.add_argument("--json", action="store_true", help="print the vectors as JSON")
    args = ap.parse_args(argv)
    texts = args.texts or DEFAULT_TEXTS
    out = {}
    for name in args.experts:
        try:
            expert = load_expert(name)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        vecs = expert.embed(texts)
        ms = 1000 * (time.perf_counter() - t0)
        out[name] = vecs
        if not args.json:
            print(f"\n{name}  ({expert.config.n_layers} layers, H={expert.config.hidden}, {ms:.0f} ms)")
            sims = cosine_matrix(vecs)
            for i, t in enumerate(texts):
                row = " ".join(f"{s:5.2f}" for s in sims[i])
                print(f"  [{i}] {row}  {t[:60]}")
    if args.json:
        print(json.dumps({name: v.round(6).tolist() for name, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
