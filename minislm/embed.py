"""`python -m minislm.embed "text" ...`: sentence embeddings from each pretrained expert, and how alike they are.

With --file docs.parquet --out emb.parquet --experts NAME the embedding of every row is written by Ray Data
actors (`minislm.distributed.extract_ray`; --ray-address for a cluster).

Prints, per expert, the cosine similarity of every pair of texts (masked-mean embeddings of the last layer)
and the time the encoder took. `--json` prints the vectors instead. Every expert is loaded (and checked)
before any text is embedded, so a wrong name costs nothing; a closed pipe (`| head -1`) ends quietly, a full
disk or a closed stdout is one error line.
Exit codes: 0 ok, 2 usage or input errors (one line on stderr), 130 interrupted.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from minislm.cli import Parser, drop_stdout, error, printable, reserve_standard_fds, say

DEFAULT_TEXTS = [
    "Stocks rallied after the central bank held interest rates steady.",
    "Shares rose on Wall Street as the Fed kept rates unchanged.",
    "The striker scored twice in the second half to win the cup final.",
]


def cosine_matrix(v):
    """[B, H] -> [B, B] cosine similarities."""
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return u @ u.T


def embed_corpus(args):
    """--file + --out: the masked-mean embedding of every row, by Ray actors (minislm.distributed)."""
    if not (args.file and args.out) or len(args.experts) != 1:
        error("--file and --out go together, with one --experts name; e.g. --file docs.parquet --out "
              "emb.parquet --experts all-MiniLM-L6-v2")
        return 2
    if Path(args.out).exists() and not args.overwrite:
        error(f"--out {args.out} already exists; pass --overwrite to replace it, or name a new file (nothing was "
              f"changed)")
        return 2
    from minislm import distributed

    try:
        distributed.extract_ray(args.file, args.out, args.experts[0], text_column=args.column,
                                id_column=args.id_column, address=args.ray_address, workers=args.workers)
    except (ValueError, OSError) as e:
        error(e)
        return 2
    say(f"wrote {args.out}")
    return 0


def main(argv=None):
    from minislm.experts import load_expert, registry

    closed = reserve_standard_fds()
    ap = Parser(prog="python -m minislm.embed", description=__doc__.splitlines()[0])
    ap.add_argument("texts", nargs="*", help="texts to embed (default: three example sentences)")
    ap.add_argument("--experts", nargs="+", default=list(registry.EXPERTS),
                    help="expert names or model folders (default: the three pretrained experts)")
    ap.add_argument("--json", action="store_true", help="print the vectors as JSON")
    big = ap.add_argument_group("corpus scale: a Parquet column's embeddings on Ray Data actors (distributed extra)")
    big.add_argument("--file", help="a Parquet file whose --column is embedded (with --out)")
    big.add_argument("--column", default="text")
    big.add_argument("--id-column", help="a column carried into every output row")
    big.add_argument("--out", help="the Parquet file of embeddings to write")
    big.add_argument("--overwrite", action="store_true", help="replace an existing --out (else refused)")
    big.add_argument("--workers", type=int, default=1, help="Ray actors, one expert each")
    big.add_argument("--ray-address", help="a Ray cluster to connect to (default: a local instance)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.file or args.out:
        return embed_corpus(args)
    if "stdout" in closed or sys.stdout is None:
        error("standard output is closed (>&-), so no embedding could be shown; redirect it to a file "
              "(> embeddings.txt)")
        return 2
    texts = args.texts or DEFAULT_TEXTS
    experts = {}
    for name in args.experts:  # all loaded before any work: a wrong name must not cost the others' time
        try:
            experts[name] = load_expert(name)
        except (FileNotFoundError, ValueError, TypeError) as e:
            taken_for_text = name not in registry.EXPERTS and not args.texts and str(name).strip()
            hint = (" (--experts takes every word after it: put the texts first, `embed \"some text\" --experts "
                    "NAME`, or end the names with --)") if taken_for_text else ""
            error(f"{e}{hint}")
            return 2
    try:
        out = {}
        for name, expert in experts.items():
            t0 = time.perf_counter()
            vecs = expert.embed(texts)
            ms = 1000 * (time.perf_counter() - t0)
            out[name] = vecs
            if not args.json:
                lines = [f"\n{printable(name)}  ({expert.config.n_layers} layers, H={expert.config.hidden}, "
                         f"{ms:.0f} ms)"]
                sims = cosine_matrix(vecs)
                for i, t in enumerate(texts):
                    row = " ".join(f"{s:5.2f}" for s in sims[i])
                    lines.append(f"  [{i}] {row}  {printable(t[:60])}")
                _emit("\n".join(lines) + "\n")
        if args.json:
            _emit(json.dumps({name: v.round(6).tolist() for name, v in out.items()}) + "\n")
    except BrokenPipeError:
        drop_stdout()
        return 0  # the reader has what it wanted (`| head -1`)
    except OSError as e:
        drop_stdout()
        error(f"cannot write the embeddings ({e.strerror or e}); free some space or write them elsewhere")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (ValueError, TypeError) as e:
        error(e)
        return 2
    return 0


def _emit(text):
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
