"""Routing: which expert labels which box, and what each expert is (checkpoint, dataset_index, schema)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from raypose.config.spec import PoseSpec
from raypose.errors import SpecError
from raypose.imaging.keypoint_schemas import EXPERT_INDEX, EXPERT_SCHEMA, SCHEMAS
from raypose.models.vitpose import HeadSource, ModelInfo, inspect_model

# The ViTPose++ dataset (expert) whose head emits each schema, and its dataset_index.
SCHEMA_DATASET = {schema: expert for expert, schema in EXPERT_SCHEMA.items()}
SCHEMA_INDEX = {schema: EXPERT_INDEX[expert] for schema, expert in SCHEMA_DATASET.items()}


@dataclass(frozen=True)
class Expert:
    """A resolved expert: everything the crop and pose stages need to serve it."""

    name: str
    model: ModelInfo
    dataset_index: int | None  # None for dense (non-MoE) checkpoints
    keypoint_schema: str
    folded: bool = False  # pose.fold_expert: the MoE checkpoint is loaded with this expert folded in

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size


@dataclass(frozen=True)
class Routing:
    """Category -> expert, with a default for categories no rule names."""

    experts: dict[str, Expert]
    rules: dict[str, str]
    default: str
    decode: str = "transformers"  # pose.decode

    def expert_for(self, category: str | None) -> str:
        """The expert that labels a box of this category."""
        return self.rules.get(category, self.default) if category is not None else self.default

    def input_size(self, expert: str) -> tuple[int, int] | None:
        """The (width, height) an expert's crops are cut at; None for a name the routing does not serve."""
        known = self.experts.get(expert)
        return known.input_size if known is not None else None


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
    if pose.fold_expert:
        experts = _fold(experts)
    return Routing(experts=experts, rules=dict(pose.routing), default=pose.expert, decode=pose.decode)


def _fold(experts: dict[str, Expert]) -> dict[str, Expert]:
    """pose.fold_expert: each MoE checkpoint is folded for its one expert (dense checkpoints are left as they are)."""
    by_model: dict[tuple[str, str], list[Expert]] = {}
    for expert in experts.values():
        if expert.model.num_experts > 1:
            by_model.setdefault((expert.model.model_id, expert.model.revision), []).append(expert)
    for (model_id, _), users in by_model.items():
        if len({e.dataset_index for e in users}) > 1:
            served = ", ".join(f"{e.name} (dataset_index {e.dataset_index})" for e in users)
            raise SpecError(
                f"pose.fold_expert: {model_id!r} serves experts {served}; a folded checkpoint serves one "
                "dataset_index: give all but one of them their own converted checkpoint "
                "(`raypose convert vitpose-plus`), or set pose.fold_expert: false"
            )
    return {name: replace(e, folded=e.model.num_experts > 1) for name, e in experts.items()}


def _resolve_expert(name: str, spec, info: ModelInfo, field: str) -> Expert:
    recorded = info.head_schema if info.head_schema_source is HeadSource.RECORDED else None
    schema_name = (spec.keypoint_schema if spec else None) or EXPERT_SCHEMA.get(name) or recorded
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
    head, head_source = _head(name, spec, info)
    if head is not None and head != schema_name:
        raise SpecError(
            f"{field}: expert {name!r} emits {schema_name} keypoints, but the head of {info.model_id!r} is "
            f"{head} ({_source_text(head_source, name)}): its heatmaps would be read with the wrong keypoint names. "
            + _head_fix(name, schema_name)
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
        head_index = SCHEMA_INDEX.get(head) if head_source is not HeadSource.SET else None
        if head_index is not None and index != head_index:
            # The head was trained on its own expert's features; another expert's are decoded wrongly.
            raise SpecError(
                f"{field}.dataset_index: {index} selects another ViTPose++ expert than the one the head of "
                f"{info.model_id!r} belongs to ({head}, dataset_index {head_index}; {_source_text(head_source, name)}). Fix: use "
                f"dataset_index {head_index}, or set pose.experts.{name}.head_schema if you know the head is expert {index}'s"
            )
    else:
        if given is not None:
            raise SpecError(
                f"{field}.dataset_index: {info.model_id!r} is not a ViTPose++ (MoE) checkpoint; remove dataset_index"
            )
        index = None
    return Expert(name=name, model=info, dataset_index=index, keypoint_schema=schema_name)


def _head(name: str, spec, info: ModelInfo) -> tuple[str | None, HeadSource]:
    """The schema the checkpoint's head emits for this expert, and how that is known."""
    given = spec.head_schema if spec else None
    if given is None:
        return info.head_schema, info.head_schema_source
    if given not in SCHEMAS:
        raise SpecError(
            f"pose.experts.{name}.head_schema: unknown schema {given!r}; expected one of: {', '.join(SCHEMAS)}"
        )
    return given, HeadSource.SET


def _source_text(source: HeadSource, name: str) -> str:
    return f"set by pose.experts.{name}.head_schema" if source is HeadSource.SET else source.value


def _head_fix(name: str, schema_name: str) -> str:
    dataset = SCHEMA_DATASET.get(schema_name)
    convert = (
        f"convert the original ViTPose++ checkpoint (with all six heads) with `raypose convert vitpose-plus "
        f"ORIGINAL.pth --dataset {dataset} --out DIR` and set pose.experts.{name}.model: DIR, or "
        if dataset else "use a checkpoint whose head emits it, or "
    )
    return f"Fix: {convert}set pose.experts.{name}.head_schema: {schema_name} if you know its head emits {schema_name}"
