"""Tiny randomly initialised BERT and MPNet folders for tests: no download, saved the way transformers saves."""
import json

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

TINY = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
            max_position_embeddings=72, hidden_act="gelu", initializer_range=0.3)


def tiny_tokenizer(family):
    """A word-level tokenizer over a 120-word vocabulary with [CLS]/[SEP] (BERT) or <s>/</s> (MPNet)."""
    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(120 - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    unk = specials[1] if family == "bert" else specials[3]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    first, last = (specials[2], specials[3]) if family == "bert" else (specials[0], specials[2])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", special_tokens=[(first, vocab[first]), (last, vocab[last])])
    return tok


def make_tiny_folder(path, family, seed=0):
    """Write config.json, model.safetensors and tokenizer.json of a random tiny `family` model; return the
    transformers model (eval, float32, eager attention) for reference."""
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

    torch.manual_seed(seed)
    if family == "bert":
        cfg = BertConfig(**TINY, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12)
        model = BertModel(cfg, add_pooling_layer=True)
    else:
        cfg = MPNetConfig(**TINY, pad_token_id=1, layer_norm_eps=1e-5, relative_attention_num_buckets=32)
        model = MPNetModel(cfg, add_pooling_layer=True)
    with torch.no_grad():  # random layer-norm parameters too, so a swapped gamma/beta cannot pass
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(family).save(str(path / "tokenizer.json"))
    cfg_file = path / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()), indent=1))
    return reference_model(path, family)


def reference_model(path, family):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def reference_hidden_states(model, ids, mask):
    """transformers' L+1 hidden states for ids [B, T], mask [B, T] -> [L+1, B, T, H] float32."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(mask, dtype=np.int64)), output_hidden_states=True)
    return np.stack([h.numpy() for h in out.hidden_states])
