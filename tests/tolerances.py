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
