"""Turn a torch.onnx export of a BERT encoder back into Hugging Face safetensors weights.

The export keeps names for embeddings, layer norms and biases (after a prefix like `model.0.auto_model.`),
but the six weight matrices of each layer become anonymous MatMul initializers stored as W^T [in, out].
Each is named by following the graph: MatMul -> the Add that adds its bias -> that bias's name, with
`.bias` replaced by `.weight`; the matrix is transposed back to torch's Linear layout [out, in].
Needs the `onnx` package (conversion time only).
"""
from pathlib import Path

import numpy as np

from minislm.atomic import save_safetensors


class ConversionError(ValueError):
    """An ONNX file that does not look like a BERT encoder export."""


def _common_prefix(names):
    """The prefix ending in `embeddings.` 's parent, e.g. 'model.0.auto_model.'."""
    for n in names:
        i = n.find("embeddings.word_embeddings.weight")
        if i >= 0:
            return n[:i]
    raise ConversionError("no initializer named '*embeddings.word_embeddings.weight': not a BERT encoder export")


def read_initializers(onnx_path):
    """ONNX file -> (graph, name -> array) of its initializers, Identity aliases resolved."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # an Identity over an initializer is the same tensor under a new name
        if node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    return model.graph, arrays


def onnx_to_params(onnx_path):
    """ONNX export -> (Hugging Face name -> float32 array, names of initializers that were not weights)."""
    graph, arrays = read_initializers(onnx_path)
    prefix = _common_prefix(arrays)
    params = {n[len(prefix):]: a for n, a in arrays.items() if n.startswith(prefix)}
    consumers = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(prefix):
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        bias = [i for a in adds for i in a.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(bias) != 1:
            raise ConversionError(f"{onnx_path}: cannot name MatMul weight {node.input[1]!r}: no single named "
                                  f".bias is added to its output (found {bias})")
        name = bias[0][len(prefix):-len(".bias")] + ".weight"
        params[name] = np.ascontiguousarray(arrays[node.input[1]].T)  # [in, out] -> torch Linear [out, in]
    used = {prefix + n for n in params}
    ignored = sorted(n for n in arrays if n not in used and not n.startswith("onnx::MatMul"))
    return {n: a.astype(np.float32) for n, a in params.items()}, ignored


def bert_config_from_params(params, n_heads, layer_norm_eps):
    """Weights -> the Hugging Face BertConfig dict they imply (sizes read from the tensor shapes)."""
    V, H = params["embeddings.word_embeddings.weight"].shape
    n_layers = 1 + max(int(n.split(".")[2]) for n in params if n.startswith("encoder.layer."))
    return {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "vocab_size": int(V), "hidden_size": int(H), "num_hidden_layers": n_layers,
        "num_attention_heads": int(n_heads),
        "intermediate_size": int(params["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(params["embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(params["embeddings.token_type_embeddings.weight"].shape[0]),
        "layer_norm_eps": layer_norm_eps, "pad_token_id": 0,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
    }


def convert(onnx_path, out_file, n_heads, layer_norm_eps=1e-12):
    """ONNX export -> model.safetensors at out_file; returns (config dict, ignored initializer names).

    The head count is not in the graph's initializers, so the caller states it.
    """
    params, ignored = onnx_to_params(onnx_path)
    config = bert_config_from_params(params, n_heads, layer_norm_eps)
    save_safetensors(Path(out_file), params)
    return config, ignored
