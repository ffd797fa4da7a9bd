"""One collaboration of experts: layer mix -> projection -> gate + fusion -> head, forward and backward.

    per expert e:  X_e [B, L_e+1, K_e] standardised pooled features (the lexical expert: its bag, L+1 = 1)
                   m_e = layermix_e(X_e)                     [B, K_e]
                   z_e = proj_e(m_e)                         [B, D]   (no projection when D = 0: z_e = m_e)
    Z = stack(z_e) [B, E, D];  g = gate(concat z_e) [B, E] (when the fusion or the balance loss needs it)
    fused = fusion(Z, g) [B, D_out];  logits = head(fused) [B, C]

A single expert's own model (stage 1) is the same thing with E = 1, fusion "concat" and no projection.
"""
from dataclasses import asdict, dataclass

import numpy as np

from minislm.collab import fusion as fusion_lib
from minislm.collab import gate, heads, layermix, linear


@dataclass
class CollabConfig:
    experts: list              # E expert names, in tier order
    in_layers: list            # L_e + 1 per expert (1 for the lexical expert)
    in_dims: list              # K_e per expert
    n_classes: int             # C
    fusion: str = "concat"     # a name in minislm.collab.fusion.FUSIONS
    proj_dim: int = 256        # D; 0 = no projection (only with one expert or concat)
    head_hidden: int = 256     # hidden width of the MLP head; 0 = linear head
    dropout: float = 0.1       # on the head's hidden layer, train time only
    gate: str = "softmax"      # "softmax" or "noisy_topk" (used by the gated fusion / the balance loss)
    top_k: int = 2             # experts kept by the noisy top-k gate
    balance: float = 0.0       # weight of the load-balancing loss (switch loss for softmax, importance+load for top-k)
    gate_input: str = ""       # "" = the gate reads every expert's vector; an expert name = only that one's
                               # (a router fed by a cheap expert can choose which costly experts to run)

    def to_dict(self):
        return asdict(self)


def gate_only(cfg, p, feats):
    """The gate's weights [B, E] from the gate-input expert's features alone (evaluation mode): which experts
    a router would run. Needs cfg.gate_input."""
    name = cfg.gate_input
    m, _ = layermix.forward(p["mix"][name], feats[name])
    if cfg.proj_dim:
        m, _ = linear.forward(p["proj"][name], m)
    if cfg.gate == "noisy_topk":
        return gate.noisy_topk_forward(p["gate"], m, cfg.top_k, None)[0]
    return gate.softmax_forward(p["gate"], m)[0]


def _dims(cfg):
    z = [cfg.proj_dim or k for k in cfg.in_dims]
    if len(set(z)) != 1 and cfg.fusion != "concat":
        raise ValueError(f"fusion {cfg.fusion!r} needs one common width; set proj_dim > 0 (widths: {z})")
    return z


def init(cfg, rng, dtype=np.float32):
    fusion_lib.get(cfg.fusion)
    z = _dims(cfg)
    E = len(cfg.experts)
    p = {"mix": {n: layermix.init(rng, L, dtype) for n, L in zip(cfg.experts, cfg.in_layers)}}
    if cfg.proj_dim:
        p["proj"] = {n: linear.init(rng, k, cfg.proj_dim, dtype) for n, k in zip(cfg.experts, cfg.in_dims)}
    p["fusion"] = fusion_lib.get(cfg.fusion).init(rng, E, z[0], dtype)
    if uses_gate(cfg):
        g_in = z[cfg.experts.index(cfg.gate_input)] if cfg.gate_input else sum(z)
        p["gate"] = gate.init(rng, g_in, E, noisy=cfg.gate == "noisy_topk", dtype=dtype)
    p["head"] = heads.init(rng, fused_width(cfg), cfg.n_classes, cfg.head_hidden, dtype)
    return p


def fused_width(cfg):
    """Width of the fused vector the head reads."""
    z = _dims(cfg)
    return sum(z) if cfg.fusion == "concat" else fusion_lib.get(cfg.fusion).out_dim(len(z), z[0])


def flops(cfg):
    """FLOPs per row of this collaboration's own part: layer mixes, projections, fusion and head (the
    gate and the fusion's small products are counted approximately by the head's formula)."""
    total = sum(2 * L * K for L, K in zip(cfg.in_layers, cfg.in_dims))       # the layer mixes' weighted sums
    if cfg.proj_dim:
        total += sum(heads.flops([k, cfg.proj_dim], activation=False) for k in cfg.in_dims)
    hidden = [cfg.head_hidden] if cfg.head_hidden else []
    return total + heads.flops([fused_width(cfg), *hidden, cfg.n_classes])


def uses_gate(cfg):
    return fusion_lib.get(cfg.fusion).uses_gate or cfg.balance > 0


def forward(cfg, p, feats, rng=None):
    """feats: name -> X_e [B, L_e+1, K_e]. rng None = evaluation. -> logits [B, C], cache."""
    cache = {"mix": {}, "proj": {}}
    zs = []
    for n in cfg.experts:
        m, cache["mix"][n] = layermix.forward(p["mix"][n], feats[n])
        if cfg.proj_dim:
            m, cache["proj"][n] = linear.forward(p["proj"][n], m)
        zs.append(m)
    g = None
    if uses_gate(cfg):
        gx = zs[cfg.experts.index(cfg.gate_input)] if cfg.gate_input else np.concatenate(zs, axis=1)
        if cfg.gate == "noisy_topk":
            eps = None if rng is None else rng.standard_normal((gx.shape[0], len(zs))).astype(gx.dtype)
            g, cache["gate"] = gate.noisy_topk_forward(p["gate"], gx, cfg.top_k, eps)
        else:
            g, cache["gate"] = gate.softmax_forward(p["gate"], gx)
    cache["g"] = g
    Z = zs if cfg.fusion == "concat" else np.stack(zs, axis=1)  # concat: widths may differ
    fused, cache["fusion"] = fusion_lib.get(cfg.fusion).forward(p["fusion"], Z, g)
    logits, cache["head"] = heads.forward(p["head"], fused, cfg.dropout, rng)
    return logits, cache


def balance_loss(cfg, cache):
    """-> (loss, dg [B, E] or None, dh_extra or None): the load-balancing term, weighted by cfg.balance."""
    if cfg.balance <= 0 or cache.get("g") is None:
        return 0.0, None, None
    g = cache["g"]
    if cfg.gate == "noisy_topk":
        imp, dimp = gate.importance_loss(g)
        if cache["gate"]["eps"] is None:
            return cfg.balance * imp, cfg.balance * dimp, None
        load, dh = gate.load_loss(cache["gate"])
        return cfg.balance * (imp + load), cfg.balance * dimp, {k: cfg.balance * v for k, v in dh.items()}
    sw, dsw = gate.switch_loss(g)
    return cfg.balance * sw, cfg.balance * dsw, None


def backward(cfg, p, cache, dlogits, dg_extra=None, dh_extra=None):
    """dlogits [B, C] (+ the balance loss's gradients) -> grads with the structure of p."""
    grads = {"mix": {}}
    dfused, grads["head"] = heads.backward(p["head"], cache["head"], dlogits)
    dZ, dg, grads["fusion"] = fusion_lib.get(cfg.fusion).backward(p["fusion"], cache["fusion"], dfused)
    dzs = dZ if cfg.fusion == "concat" else [dZ[:, i] for i in range(dZ.shape[1])]
    if uses_gate(cfg):
        dg = (np.zeros_like(cache["g"]) if dg is None else dg) + (0 if dg_extra is None else dg_extra)
        if cfg.gate == "noisy_topk":
            dgx, grads["gate"] = gate.noisy_topk_backward(p["gate"], cache["gate"], dg, dh_extra)
        else:
            dgx, grads["gate"] = gate.softmax_backward(p["gate"], cache["gate"], dg)
        if cfg.gate_input:
            i = cfg.experts.index(cfg.gate_input)
            dzs[i] = dzs[i] + dgx
        else:
            dzs = [a + b for a, b in zip(dzs, np.split(dgx, np.cumsum([z.shape[1] for z in dzs])[:-1], axis=1))]
    if cfg.proj_dim:
        grads["proj"] = {}
    for n, dz in zip(cfg.experts, dzs):
        if cfg.proj_dim:
            dz, grads["proj"][n] = linear.backward(p["proj"][n], cache["proj"][n], dz)
        _, grads["mix"][n] = layermix.backward(p["mix"][n], cache["mix"][n], dz)
    return grads


def explain(cfg, p, cache):
    """What the fused model leaned on, per row: gate weights and fusion attention (when present)."""
    out = {"layer_weights": {n: layermix.weights(p["mix"][n]).tolist() for n in cfg.experts}}
    if cache.get("g") is not None:
        out["gate"] = cache["g"]
    if cfg.fusion == "attention":
        out["attention"] = cache["fusion"]["weights"]
    if cfg.fusion == "static":
        out["static_weights"] = cache["fusion"]["w"]
    return out
