"""The transformer encoder: its config, a checked Hugging Face folder, the tokenizer, and the model itself.

    config.py     EncoderConfig, read from a Hugging Face config.json
    folder.py     load and check a model folder (every tensor's name, shape and dtype)
    tokenizer.py  tokenizers' WordPiece, with minislm's own truncation and padding
    pooling.py    masked mean and CLS pooling of hidden states
    model.py      BERT and MPNet as pure layer functions over the kernels (float32 or int8 linears)
    quantize.py   an int8 copy of an encoder, its tensors for a file, and its per-layer cosine to float32
    flops.py      the encoder's analytic FLOPs, summed from the kernels' own formulas
"""
from minislm.encoder.config import EncoderConfig
from minislm.encoder.folder import load_folder
from minislm.encoder.model import Encoder
from minislm.encoder.tokenizer import Tokenizer

__all__ = ["Encoder", "EncoderConfig", "Tokenizer", "load_folder"]
