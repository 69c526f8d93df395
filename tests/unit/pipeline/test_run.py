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
