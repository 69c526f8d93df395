"""The stages as data: their order, arguments and resources come from the plan and the layout; each runs without Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest
from helpers import job_dict

from raypose.config.spec import parse_job_spec
from raypose.pipeline.layout import ClusterShape, resolve_layout
from raypose.pipeline.plan import plan_job
from raypose.pipeline.stages import Stage, job_stages


def run_locally(stages: list[Stage], batch: pa.Table) -> pa.Table:
    """What the Dataset does with one block, without Ray: each stage's callable in turn."""
    for stage in stages:
        if stage.pool is not None:
            batch = stage.fn(**stage.fn_args)(batch)
        else:
            out = stage.fn(batch, **stage.fn_args)  # a table, or tables part by part (a generator)
            batch = out if isinstance(out, pa.Table) else pa.concat_tables(list(out))
    return batch


@pytest.fixture
def plan(tiny_checkpoint, coco_folder, tmp_path):
    spec = parse_job_spec(job_dict(coco_folder / "images", coco_folder / "boxes.json", tiny_checkpoint, tmp_path / "out"))
    plan = plan_job(spec, run=True)  # writes its plan files: the tasks are read back from them
    yield plan
    plan.close()


def test_each_placement_gives_its_stages_and_the_same_rows(plan):
    results = {}
    for crop_in, names in [("tasks", ["make_crops_in_parts", "pose"]), ("pose_actor", ["pose"]),
                           ("pose_device", ["plan_crops", "pose"])]:
        spec = plan.spec.model_copy(update={"resources": plan.spec.resources.model_copy(update={"crop_in": crop_in})})
        layout = resolve_layout(spec, plan.routing, ClusterShape(node_cpus=2), plan.images)
        stages = job_stages(plan, layout)
        assert [s.name for s in stages] == names
        pose = stages[-1]
        assert pose.pool == layout.pose_pool and pose.map_args["num_gpus"] == 0
        assert pose.map_args["batch_size"] == layout.crops.rows_per_call
        assert pose.map_args["max_restarts"] == spec.limits.max_retries
        results[crop_in] = run_locally(stages, plan.read_tasks()).sort_by([("image_key", "ascending"),
                                                                   ("instance_index", "ascending")])
    assert results["tasks"].num_rows == 6 and results["tasks"].column("error_stage").null_count == 6
    # Where the crops are made does not change a row.
    assert results["pose_actor"].equals(results["tasks"]) and results["pose_device"].equals(results["tasks"])


def test_a_stage_can_be_wrapped_without_touching_the_others(plan):
    layout = resolve_layout(plan.spec, plan.routing, ClusterShape(node_cpus=2), plan.images)
    stages = job_stages(plan, layout)
    calls = []

    class Traced(stages[-1].fn):
        def __call__(self, batch):
            calls.append(batch.num_rows)
            return super().__call__(batch)

    wrapped = [stage.with_fn(Traced) if stage.name == "pose" else stage for stage in stages]
    assert wrapped[-1].fn_args is stages[-1].fn_args and wrapped[-1].map_args == stages[-1].map_args
    assert run_locally(wrapped, plan.read_tasks()).num_rows == 6 and calls == [3]


def test_actor_pools_are_fixed_or_autoscale_from_min_to_max():
    from raypose.pipeline.layout import ActorPool
    from raypose.pipeline.stages import _actor_pool

    fixed = _actor_pool(ActorPool.sized(3, cpus=1, gpus=1))
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    scaling = _actor_pool(ActorPool.sized((1, 8), cpus=1, gpus=1, calls=2))
    assert (scaling.min_size, scaling.max_size, scaling.max_concurrent_calls_per_actor) == (1, 8, 2)
