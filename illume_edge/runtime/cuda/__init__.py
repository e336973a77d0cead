"""CUDA sampling kernel for the GPU path (see docs/gpu.md).

Importing this package needs only numpy: the CUDA bindings (pycuda, else cuda-python) and NVRTC are
imported when a kernel is loaded, and a missing piece is named in the error raised then.
"""
from .build import ARCHS, BLOCK, KMAX, KernelBuildError, PtxasStats, compile_cubins, nvrtc_compile, parse_ptxas
from .kernel import (CudaUnavailableError, GpuSampler, KernelChoice, LaunchArgs, choose_kernel_source,
                     load_kernel, pack_launch, shared_memory_bytes, workspace_bytes)

__all__ = ["ARCHS", "BLOCK", "KMAX", "KernelBuildError", "PtxasStats", "compile_cubins", "nvrtc_compile",
           "parse_ptxas", "CudaUnavailableError", "GpuSampler", "KernelChoice", "LaunchArgs",
           "choose_kernel_source", "load_kernel", "pack_launch", "shared_memory_bytes", "workspace_bytes"]
