"""What the team does inside, drawn from the results files and a checkpoint (the `plot` extra):

    python -m minislm.experiments.figures [--model weights/ag_news]   ->  notebooks/results/team_internals.png

    left    exit shares per tier of each protocol's checkpoint cascade (first seed, test rows)
    middle  the router's choices in gated mode: the share of test texts each expert was run for
    right   the layer mix of the checkpoint: softmax weights over each encoder's L + 1 pooled layers (layer 0 =
            the embeddings), for the expert's own stage-1 head and inside the full fusion
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from minislm.collab import layermix
from minislm.experiments.guide import RESULTS, load_results
from minislm.team import Team
from minislm.team.team import LEXICAL, short


def exit_shares(results_dir):
    """-> {protocol: (tier names, exit share per tier)} of every checkpoint row found."""
    out = {}
    for p, result in load_results(results_dir).items():
        row = next((r for r in result["rows"] if r.get("checkpoint")), None)
        if row and "exit_share" in row:
            experts = result.get("composition_by_seed", [{}])[0].get("single_accuracy", {})
            names = [short(e) for e in experts] or [f"tier {k}" for k in range(len(row["exit_share"]))]
            out[p] = (names, row["exit_share"])
    return out


def router_shares(results_dir):
    """-> {protocol: {expert: share of test texts the router ran it for}}."""
    out = {}
    for p, result in load_results(results_dir).items():
        row = next((r for r in result["rows"] if "run_share" in r), None)
        if row:
            out[p] = row["run_share"]
    return out


def layer_mixes(team):
    """-> {label: softmax weights [L+1]} for each encoder's own head and its mix inside the full fusion."""
    out = {}
    for e in team.cfg.encoders:
        out[f"{short(e)} alone"] = layermix.weights(team.singles[e][1]["mix"][e])
        if team.tiers and team.tiers[-1] is not None and e in team.tiers[-1][1]["mix"]:
            out[f"{short(e)} in the fusion"] = layermix.weights(team.tiers[-1][1]["mix"][e])
    return out


def draw(results_dir, team, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minislm.atomic import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    shares = exit_shares(results_dir)
    for i, (p, (names, s)) in enumerate(shares.items()):
        bottom = 0.0
        for k, (name, v) in enumerate(zip(names, s)):
            ax.bar(i, 100 * v, bottom=bottom, color=f"C{k}", label=name if i == 0 else None)
            bottom += 100 * v
    ax.set_xticks(range(len(shares)), list(shares), rotation=20, fontsize=8)
    ax.set_ylabel("% of test texts answered")
    ax.set_title("checkpoint cascade: where texts exit")
    ax.legend(fontsize=8)

    ax = axes[1]
    routed = router_shares(results_dir)
    experts = sorted({e for s in routed.values() for e in s}, key=lambda e: (e != LEXICAL, e))
    width = 0.8 / max(1, len(experts))
    for j, e in enumerate(experts):
        ax.bar(np.arange(len(routed)) + j * width, [100 * s.get(e, 0.0) for s in routed.values()], width, label=e)
    ax.set_xticks(np.arange(len(routed)) + 0.4 - width / 2, list(routed), rotation=20, fontsize=8)
    ax.set_ylabel("% of test texts the expert ran for")
    ax.set_title("gated mode: the top-2 router's choices")
    ax.legend(fontsize=8)

    ax = axes[2]
    for label, w in layer_mixes(team).items():
        ax.plot(range(len(w)), w, marker="o", label=label, linestyle="-" if "alone" in label else "--")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("softmax weight")
    ax.set_title(f"layer mix of the checkpoint ({team.cfg.dataset})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=62, format="png")
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minislm.experiments.figures", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(RESULTS).parent.parent / "weights" / "ag_news"))
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    print(draw(out, Team.load(args.model), out / "team_internals.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
