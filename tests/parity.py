"""Helpers shared by the torch-vs-ONNX parity tests."""
import numpy as np
import torch


def tol(ref) -> float:
    """fp32 parity bound: 1e-4 relative to the output scale (absolute below 1)."""
    return 1e-4 * max(1.0, float(np.abs(np.asarray(ref)).max()))


def randomize(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Weights at a scale that keeps activations O(1) (norm scales near 1, small biases, fan-in scaled
    matrices times `gain`; > 1 keeps attention far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(gain * torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module.eval()
