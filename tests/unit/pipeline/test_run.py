"""The run's own logic without Ray: a pipeline that stopped becomes one line."""

from __future__ import annotations


def test_a_pipeline_that_stopped_is_one_line_naming_the_stage_and_the_cause():
    import ray.exceptions

    from raypose.pipeline.run import pipeline_failure

    died = ray.exceptions.ActorDiedError()
    died.error_msg = ("The actor died unexpectedly before finishing this task.\n\tclass_name: "
                      "MapWorker(MapBatches(PoseStage))\n\tactor_id: ab\nThe actor is dead because its worker process "
                      "has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits. "
                      "Some common causes include: (1) the process was killed by the OOM killer")
    message = str(pipeline_failure(died, retries=3))
    assert message.startswith("pose stage: actor died 4 times: its worker process has died. Worker exit type: "
                              "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits")
    assert "\n" not in message and "OOM" not in message and message.endswith("rerun with --resume")
    other = str(pipeline_failure(RuntimeError("Failed to apply MapBatches(make_crops): boom. And more."), retries=1))
    assert other.startswith("crop stage: RuntimeError: Failed to apply MapBatches(make_crops): boom")


def test_the_flip_columns_join_the_result_key_only_when_on_so_older_outputs_still_resume():
    import pytest
    from conftest import routing_for

    from raypose.config.spec import parse_job_spec
    from raypose.errors import SpecError
    from raypose.output.resume import check_resumable
    from raypose.pipeline.layout import ClusterShape, resolve_layout
    from raypose.pipeline.run import resolved_settings

    def settings(**pose):
        spec = parse_job_spec({"images": {"path": "/data"}, "boxes": {"path": "/b.json"},
                               "pose": {"model": "/model", **pose}, "output": {"path": "/out"}})
        return resolved_settings(resolve_layout(spec, routing_for({"coco": (192, 256)}), ClusterShape(node_cpus=2), 8))

    older = {"result_key": {f"layout.{name}": value for name, value in settings().items()}}
    check_resumable(older, {f"layout.{name}": value for name, value in settings(flip_test=False).items()}, "/out")
    with pytest.raises(SpecError, match=r"layout\.flip_uncertainty: \(none\) -> true"):
        check_resumable(older, {f"layout.{n}": v for n, v in settings(uncertainty="flip").items()}, "/out")
