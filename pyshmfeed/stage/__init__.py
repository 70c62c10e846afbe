"""The consumer thread that stages batches ahead of the training loop (NOTE [stage lifecycle] in core.py).

``core``: the thread, the target interface and numpy views, framework-free.
``torch_targets``: torch CPU and CUDA targets, which import torch on first
use. This package re-exports both, so ``from pyshmfeed.stage import ...``
imports no framework.
"""

from .core import (
    FeedStaging,
    NumpyTarget,
    Stage,
    StageCore,
    Staged,
    StagedFeed,
    StageStats,
    Target,
    numpy_target,
)
from .torch_targets import (
    CudaTarget,
    HostRegistration,
    TorchCPUTarget,
    check_cuda_device,
    cuda_target,
    staged_epoch,
    torch_cpu_target,
)

_Staged = Staged  # the name tests/test_stage.py and bench/gpu_check.py import

__all__ = ["Stage", "StageStats", "HostRegistration", "NumpyTarget", "TorchCPUTarget", "CudaTarget",
           "numpy_target", "torch_cpu_target", "cuda_target", "check_cuda_device", "staged_epoch",
           "Target", "Staged", "StageCore", "StagedFeed", "FeedStaging"]
