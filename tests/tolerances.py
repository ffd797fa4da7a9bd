"""Every numerical tolerance of the test suite, in one place, chosen per kind of check."""

# float32 kernels against their float64-accurate NumPy references and against torch.
KERNEL_ATOL = 1e-5
KERNEL_RTOL = 1e-5
# Matmuls accumulate K products in float32: the error grows with K, so the bound is relative to |x||w|.
MATMUL_RTOL = 1e-5
MATMUL_ATOL = 2e-5
# int8 linear (7-bit weights per channel, 8-bit activations per row) against float32 linear: relative
# Frobenius error on Gaussian data of the encoder's shapes (measured 1.6-1.8%).
INT8_REL_ERR = 0.025
# A whole encoder (every layer's hidden state) against transformers, float32 on both sides.
ENCODER_ATOL = 1e-4
# Hand-written gradients against torch.autograd in float64.
GRAD_ATOL = 1e-8
GRAD_RTOL = 1e-6
# Central finite differences in float64 (step FD_EPS) against hand-written gradients.
FD_EPS = 1e-6
FD_ATOL = 1e-6
FD_RTOL = 1e-4
# Converted ONNX weights run by transformers vs onnxruntime on the original file.
CONVERT_ATOL = 1e-5
# float32 backward kernels against their NumPy references run in float64 (the GEMMs of linear_backward use
# MATMUL_ATOL / MATMUL_RTOL, relative to |dy| |w| and |dy|^T |x|, as the forward does).
BACKWARD_KERNEL_ATOL = 1e-5
BACKWARD_KERNEL_RTOL = 1e-5
# Attention's gradients sum T products of float32 scores and probabilities twice over: atol is this times the
# largest gradient of the array, rtol this (worst seen 3.5e-7 at T <= 64).
ATTENTION_BACKWARD_RTOL = 5e-6
# The whole encoder's float32 gradients against transformers' float64 autograd: |diff| <= ENCODER_GRAD_ATOL times
# the largest gradient of any tensor + ENCODER_GRAD_RTOL |want| (worst seen 6e-6 of the largest on tiny models;
# a key bias's true gradient is 0, softmax ignoring a shift, so only the atol bounds its float32 noise).
ENCODER_GRAD_ATOL = 5e-5
ENCODER_GRAD_RTOL = 1e-4
# A training run's loss against torch's on the same weights, data and AdamW settings (float32 on both sides).
TRAJECTORY_RTOL = 1e-3
# Top-k trained on a float16 disk cache of the frozen layers' output vs on the float32 forward: the difference of
# the final weights, as a fraction of how far training moved them (norms over all trained tensors).
FLOAT16_CACHE_RTOL = 0.05
# The int8 encoder against the same int8 arithmetic with NumPy's float32 attention, layer norm and GELU, on tiny
# models: lowest token cosine. Those ops round differently in their last bits, and where that moves an activation
# across a rounding boundary its code changes by one (worst seen 1 - 3e-4; around the kernels: exact).
INT8_REFERENCE_COSINE = 1 - 2e-3
# int8 hidden states against float32 ones on the real experts, token by token (L3 and L6, real sentences).
INT8_COSINE_MEAN = 0.995
INT8_COSINE_MIN = 0.98
