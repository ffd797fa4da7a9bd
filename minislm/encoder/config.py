"""The shape of an encoder, read from a Hugging Face `config.json`.

Two families are supported: BERT (absolute positions, token types) and MPNet (positions counted over real
tokens from pad + 1, one relative-position bias shared by every layer).
"""
from dataclasses import dataclass

SUPPORTED_FAMILIES = ("bert", "mpnet")


@dataclass(frozen=True)
class EncoderConfig:
    family: str                  # "bert" or "mpnet"
    vocab_size: int              # V, rows of the word embedding
    hidden: int                  # H, width of every hidden state
    n_layers: int                # L, transformer layers (hidden states returned: L + 1)
    n_heads: int                 # N, attention heads (head dim D = H / N)
    ffn: int                     # F, width of the feed-forward layer
    max_positions: int           # rows of the position embedding
    type_vocab_size: int         # token-type rows (BERT); 0 for MPNet
    layer_norm_eps: float        # epsilon of every layer norm
    pad_id: int                  # id of the padding token (MPNet positions start at pad_id + 1)
    relative_buckets: int = 0    # MPNet: buckets of the shared relative-position bias; 0 for BERT
    relative_max_distance: int = 128  # MPNet: distance at which the log-spaced buckets saturate

    @property
    def head_dim(self):
        return self.hidden // self.n_heads

    @property
    def max_tokens(self):
        """Longest input the position table allows (MPNet's positions start at pad_id + 1)."""
        if self.family == "mpnet":
            return self.max_positions - self.pad_id - 1
        return self.max_positions


class ConfigError(ValueError):
    """A config.json that minislm cannot turn into an encoder."""


def from_hf_dict(cfg, source="config.json"):
    """A parsed Hugging Face config.json -> EncoderConfig, with errors that name the file and the field."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"{source}: unknown model_type {family!r}; minislm loads only "
                          f"{' and '.join(SUPPORTED_FAMILIES)} encoders (model_type 'bert' or 'mpnet')")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported; minislm implements exact-erf "
                          f"'gelu' only")

    def need(key):
        if key not in cfg:
            raise ConfigError(f"{source}: missing field {key!r} needed to build a {family} encoder")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    mpnet = family == "mpnet"
    return EncoderConfig(
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden=hidden,
        n_layers=int(need("num_hidden_layers")),
        n_heads=heads,
        ffn=int(need("intermediate_size")),
        max_positions=int(need("max_position_embeddings")),
        type_vocab_size=0 if mpnet else int(cfg.get("type_vocab_size", 2)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        pad_id=int(cfg.get("pad_token_id", 1 if mpnet else 0)),
        relative_buckets=int(cfg.get("relative_attention_num_buckets", 32)) if mpnet else 0,
        relative_max_distance=128,
    )
