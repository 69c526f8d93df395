"""raypose: label images with human and animal keypoints at dataset scale, on Ray.

    import raypose
    result = raypose.Job.from_yaml("jobs/quickstart.yaml").run()      # a YAML job, as `raypose submit`
    table = raypose.read_keypoints(result.output_path)                   # its keypoints, names in the metadata
    labelled = raypose.annotate(ds, model="usyd-community/vitpose-base-simple")  # a Ray Dataset, lazily

Every error raypose raises on purpose is a RayposeError (SpecError, JobFailed, ...). The heavy parts (Ray,
torch, transformers) are imported when first used, not by `import raypose`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from raypose.errors import (
    ClusterError,
    ConvertError,
    ImageError,
    JobFailed,
    LeaseHeld,
    OutputError,
    RayposeError,
    SpecError,
)

if TYPE_CHECKING:
    from raypose.config.spec import JobSpec
    from raypose.job import ExpertCheck, Job, JobCheck
    from raypose.pipeline.annotate import annotate
    from raypose.pipeline.run import JobResult
    from raypose.review.reading import keypoint_names, read_keypoints

__version__ = "0.1.0"

__all__ = [
    "ClusterError",
    "ConvertError",
    "ExpertCheck",
    "ImageError",
    "Job",
    "JobCheck",
    "JobFailed",
    "JobResult",
    "JobSpec",
    "LeaseHeld",
    "OutputError",
    "RayposeError",
    "SpecError",
    "__version__",
    "annotate",
    "keypoint_names",
    "read_keypoints",
]

# Where each lazily imported public name lives.
_LAZY = {
    "Job": "raypose.job",
    "JobCheck": "raypose.job",
    "ExpertCheck": "raypose.job",
    "JobResult": "raypose.pipeline.run",
    "JobSpec": "raypose.config.spec",
    "annotate": "raypose.pipeline.annotate",
    "read_keypoints": "raypose.review.reading",
    "keypoint_names": "raypose.review.reading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raypose' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
