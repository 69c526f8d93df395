"""Routing: which expert labels which box, and what each expert is (checkpoint, dataset_index, schema)."""

from __future__ import annotations

from dataclasses import dataclass

from raypose.errors import SpecError
from raypose.keypoint_schemas import EXPERT_INDEX, EXPERT_SCHEMA, SCHEMAS
from raypose.pose import ModelInfo, inspect_model
from raypose.spec import PoseSpec


@dataclass(frozen=True)
class Expert:
    """A resolved expert: everything the crop and pose stages need to serve it."""

    name: str
    model: ModelInfo
    dataset_index: int | None  # None for dense (non-MoE) checkpoints
    keypoint_schema: str

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size


@dataclass(frozen=True)
class Routing:
    """Category -> expert, with a default for categories no rule names."""

    experts: dict[str, Expert]
    rules: dict[str, str]
    default: str

    def expert_for(self, category: str | None) -> str:
        """The expert that labels a box of this category."""
        return self.rules.get(category, self.default) if category is not None else self.default


def resolve_routing(pose: PoseSpec) -> Routing:
    """Check every used expert against its checkpoint's config; fail with the field to fix."""
    used = sorted({pose.expert, *pose.routing.values()})
    models: dict[tuple[str, str | None], ModelInfo] = {}
    experts = {}
    for name in used:
        spec = pose.experts.get(name)
        field = f"pose.experts.{name}" if spec is not None else "pose.expert"
        own = spec is not None and spec.model is not None
        key = (spec.model, spec.revision) if own else (pose.model, pose.revision)
        if key not in models:
            models[key] = inspect_model(*key, field=f"{field}.model" if own else "pose.model")
        experts[name] = _resolve_expert(name, spec, models[key], field)
    return Routing(experts=experts, rules=dict(pose.routing), default=pose.expert)


def _resolve_expert(name: str, spec, info: ModelInfo, field: str) -> Expert:
    schema_name = (spec.keypoint_schema if spec else None) or EXPERT_SCHEMA.get(name)
    if schema_name is None:
        raise SpecError(
            f"{field}.keypoint_schema: required for expert {name!r} (known schemas: {', '.join(SCHEMAS)})"
        )
    if schema_name not in SCHEMAS:
        raise SpecError(f"{field}.keypoint_schema: unknown schema {schema_name!r}; expected one of: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[schema_name]
    if schema.num_keypoints != info.num_keypoints:
        raise SpecError(
            f"{field}: expert {name!r} means {schema.num_keypoints} keypoints ({schema_name}) but "
            f"{info.model_id!r} outputs {info.num_keypoints} heatmaps"
        )
    given = spec.dataset_index if spec else None
    if info.num_experts > 1:
        index = given if given is not None else EXPERT_INDEX.get(name)
        if index is None:
            raise SpecError(
                f"{field}.dataset_index: required: {info.model_id!r} is a ViTPose++ (MoE) checkpoint "
                f"with {info.num_experts} experts"
            )
        if index >= info.num_experts:
            raise SpecError(
                f"{field}.dataset_index: {index} is out of range: {info.model_id!r} has {info.num_experts} experts"
            )
    else:
        if given is not None:
            raise SpecError(
                f"{field}.dataset_index: {info.model_id!r} is not a ViTPose++ (MoE) checkpoint; remove dataset_index"
            )
        index = None
    return Expert(name=name, model=info, dataset_index=index, keypoint_schema=schema_name)
