"""int8 encoders: a float32 encoder's linears quantized, stored as named tensors, and how close it stays.

    quantize_encoder(enc)    the four linears of every layer -> Int8Weight (kernels/int8.py: 7-bit weights per
                             output channel; activations quantized per row on every call); embeddings, layer
                             norms, biases and attention stay float32 and are shared, not copied
    int8_tensors(enc)        -> the tensors of a safetensors file: Hugging Face names for the float32 ones, and
                             for each Linear `<module>.weight_codes` int8 [out, in] + `<module>.weight_scales` [out]
    read_int8_weights(f)     that file back, every tensor's name, shape and dtype checked (folder.py's rules)
    hidden_cosines(a, b, m)  per hidden state, the cosine of each real token's vector in b to a's: mean and min
    layer_fidelity(...)      both encoders on one batch -> those cosines and the largest difference, per layer

q, k and v are quantized and stored apart, as the checkpoint names them; per-output-channel scales make that
the same as quantizing the stacked [3H, H] matrix, so the encoder stacks their codes on load.
The linear weights take 1 byte + 4 / K per weight instead of 4 (about 4x smaller); the word embeddings,
the bulk of a small encoder's file, stay float32.
"""
import hashlib

import numpy as np
from safetensors import SafetensorError, safe_open

from minislm.encoder.backward import embedding_param_names, encoder_params, layer_param_names
from minislm.encoder.folder import WeightsError, expected_shapes
from minislm.encoder.model import Encoder, LayerWeights, embedding_weights
from minislm.kernels.int8 import Int8Weight, quantize_weight

LINEAR_FIELDS = ("qkv_w", "attn_out_w", "ffn_in_w", "ffn_out_w")  # the LayerWeights an int8 encoder quantizes
CODES, SCALES = ".weight_codes", ".weight_scales"                   # suffixes replacing a Linear's ".weight"
# The arithmetic quantize_weight does, named: an int8 encoder's identity is this and its float32 source's
# sha256 (quantizing is deterministic); a change to that arithmetic must change this string.
SCHEME = "minislm-int8/1: weights symmetric per output channel in [-63, 63]; activations uint8 per row, dynamic"


def int8_identity(source_sha256):
    """sha256 of the float32 weights -> the int8 encoder's identity (the weights_sha256 caches key on)."""
    return hashlib.sha256(f"{SCHEME}\n{source_sha256}".encode()).hexdigest()


def quantize_encoder(encoder):
    """float32 Encoder -> int8 Encoder: every layer's four linears quantized (the same config and backend)."""
    if encoder.precision == "int8":
        return encoder
    layers = [LayerWeights(**{f: quantize_weight(getattr(lw, f).unpack()) if f in LINEAR_FIELDS else getattr(lw, f)
                              for f in LayerWeights.__dataclass_fields__}) for lw in encoder.layers]
    return Encoder(encoder.config, encoder.embeddings, layers, encoder.matmul_backend)


def linear_names(cfg):
    """-> [(layer i, LayerWeights field, the Hugging Face ".weight" names it stacks)] of every quantized linear."""
    return [(i, f, layer_param_names(cfg, i)[f]) for i in range(cfg.n_layers) for f in LINEAR_FIELDS]


def expected_int8_shapes(cfg):
    """Tensor name -> (shape, safetensors dtype) of an int8 encoder's file."""
    quantized = {n for _, _, names in linear_names(cfg) for n in names}
    want = {n: (s, "F32") for n, s in expected_shapes(cfg).items() if n not in quantized}
    for name in quantized:
        N, K = expected_shapes(cfg)[name]
        stem = name[:-len(".weight")]
        want[stem + CODES], want[stem + SCALES] = ((N, K), "I8"), ((N,), "F32")
    return want


def int8_tensors(encoder):
    """int8 Encoder -> {name: array} (copies) for a safetensors file (see the module doc)."""
    if encoder.precision != "int8":
        raise ValueError("int8_tensors needs an int8 encoder; quantize it first with quantize_encoder")
    cfg = encoder.config
    quantized = {n for _, _, names in linear_names(cfg) for n in names}
    out = encoder_params(encoder, [n for n in expected_shapes(cfg) if n not in quantized])
    for i, field, names in linear_names(cfg):
        w8 = getattr(encoder.layers[i], field)
        for name, codes, scales in zip(names, np.split(w8.codes(), len(names)), np.split(w8.scales, len(names))):
            stem = name[:-len(".weight")]
            out[stem + CODES], out[stem + SCALES] = np.ascontiguousarray(codes), np.ascontiguousarray(scales)
    return out


def read_int8_weights(file, cfg):
    """An int8 encoder's safetensors file -> {name: array}, or a WeightsError naming the tensor and the remedy."""
    want = expected_int8_shapes(cfg)
    tensors = {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                if name not in want:
                    raise WeightsError(f"{file}: unexpected tensor {name!r}; the file is not an int8 {cfg.family} "
                                       f"encoder matching config.json: quantize the expert again")
                meta = f.get_slice(name)
                shape, dtype = tuple(meta.get_shape()), meta.get_dtype()
                if (shape, dtype) != want[name]:
                    raise WeightsError(f"{file}: tensor {name!r} is {dtype} {shape}, expected {want[name][1]} "
                                       f"{want[name][0]}; the file does not match config.json: quantize the expert again")
                tensors[name] = np.ascontiguousarray(f.get_tensor(name))
    except SafetensorError as e:
        raise WeightsError(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                           f"delete its folder and quantize the expert again") from e
    missing = [n for n in want if n not in tensors]
    if missing:
        raise WeightsError(f"{file}: missing tensor {missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
                           f"; the file is not a complete int8 encoder: quantize the expert again")
    return tensors


def encoder_from_int8_tensors(cfg, tensors):
    """{name: array} as read_int8_weights returns -> int8 Encoder (q, k, v codes and scales stacked)."""
    layers = []
    for i in range(cfg.n_layers):
        fields = {}
        for f, names in layer_param_names(cfg, i).items():
            if f in LINEAR_FIELDS:
                stems = [n[:-len(".weight")] for n in names]
                fields[f] = Int8Weight(_stacked(tensors, [s + CODES for s in stems]),
                                       _stacked(tensors, [s + SCALES for s in stems]))
            else:
                fields[f] = _stacked(tensors, names)
        layers.append(LayerWeights(**fields))
    ew = embedding_weights(cfg, {n: tensors[n] for n in embedding_param_names(cfg).values()})
    return Encoder(cfg, ew, layers)


def _stacked(tensors, names):
    return tensors[names[0]] if len(names) == 1 else np.ascontiguousarray(np.concatenate([tensors[n] for n in names]))


def linear_bytes(encoder):
    """Bytes the layers' linear weights take in memory: 4 N K float32, or N K int8 codes + 4 N scales."""
    total = 0
    for lw in encoder.layers:
        for f in LINEAR_FIELDS:
            w = getattr(lw, f)
            N, K = w.shape
            total += N * K + 4 * N if isinstance(w, Int8Weight) else 4 * N * K
    return total


def hidden_cosines(reference, hidden, mask):
    """reference, hidden [L+1, B, T, H], mask [B, T] -> (mean [L+1], min [L+1]): per layer, the cosine of each
    real token's vector in `hidden` to the same token's in `reference`, averaged and at its lowest."""
    a, b = reference[:, mask], hidden[:, mask]                         # [L+1, real tokens, H]
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(-1) / np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-30)
    return cos.mean(axis=1), cos.min(axis=1)


def layer_fidelity(fp32_encoder, int8_encoder, ids, mask):
    """Both encoders on ids [B, T], mask [B, T] -> one dict per hidden state (0 = embeddings, then each layer):
    mean and min token cosine of int8 to float32, and the largest absolute difference."""
    ref, got = fp32_encoder.forward(ids, mask), int8_encoder.forward(ids, mask)
    mean, low = hidden_cosines(ref, got, np.asarray(mask, dtype=bool))
    diff = np.abs(ref - got)[:, np.asarray(mask, dtype=bool)].max(axis=(1, 2)) if mask.any() else np.zeros(len(ref))
    return [{"layer": i, "cosine_mean": float(m), "cosine_min": float(lo), "max_abs_diff": float(d)}
            for i, (m, lo, d) in enumerate(zip(mean, low, diff))]
