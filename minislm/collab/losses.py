"""Losses with their gradients: cross-entropy with label smoothing, and distillation (KL to a soft teacher)."""
import numpy as np

from minislm.kernels.activations import log_softmax_np


def log_softmax(logits, temperature=1.0):
    """[B, C] -> [B, C] log-probabilities at temperature T."""
    return log_softmax_np(logits / temperature)


def softmax(logits, temperature=1.0):
    """[B, C] -> [B, C] probabilities at temperature T."""
    return np.exp(log_softmax(logits, temperature))


def cross_entropy(logits, labels, smoothing=0.0):
    """logits [B, C], labels [B] -> (mean loss, dlogits [B, C]).

    Label smoothing mixes the one-hot target with the uniform distribution: q = (1 - s) onehot + s / C
    (as torch's cross_entropy(label_smoothing=s)).
    """
    B, C = logits.shape
    logp = log_softmax(logits)
    q = np.full((B, C), smoothing / C, dtype=logits.dtype)
    q[np.arange(B), labels] += 1.0 - smoothing
    loss = -(q * logp).sum() / B
    return float(loss), (np.exp(logp) - q) / B


def distillation(student_logits, teacher_probs, temperature=2.0):
    """KL(teacher_T || student_T) * T^2, mean over rows -> (loss, dstudent_logits [B, C]).

    teacher_probs [B, C] are the teacher's probabilities at temperature T (softened already); the T^2
    factor keeps the gradient's size independent of T (Hinton et al. 2015).
    """
    B = student_logits.shape[0]
    logq = log_softmax(student_logits, temperature)
    p = teacher_probs
    kl = (p * (np.log(np.maximum(p, 1e-30)) - logq)).sum() / B
    dlogits = (np.exp(logq) - p) * temperature / B          # d/dz of T^2 KL: T^2 * (q - p) / T
    return float(kl * temperature ** 2), dlogits
