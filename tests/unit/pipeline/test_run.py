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


def test_a_write_tasks_storage_error_is_the_documented_output_line(tmp_path, monkeypatch):
    import errno
    import traceback

    import pyarrow as pa
    import ray.exceptions

    from raypose.config.spec import OutputSpec
    from raypose.errors import JobFailed
    from raypose.output.writer import OutputStore
    from raypose.pipeline.run import pipeline_failure

    store = OutputStore(OutputSpec(path=str(tmp_path / "out")), {})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.fs, "open", disk_full)
    try:  # what a write task raises, wrapped as Ray Data and Ray hand it to the driver
        try:
            store.write_parquet(pa.table({"a": [1]}), store.path("keypoints", "shard-00000.parquet"), pa.schema([("a", pa.int64())]))
        except JobFailed as exc:
            raise ray.exceptions.UserCodeException("UDF failed to process a data block.") from exc
    except ray.exceptions.UserCodeException as exc:
        failed = ray.exceptions.RayTaskError("MapBatches(write_parts)", traceback.format_exc(), exc).as_instanceof_cause()
    assert str(pipeline_failure(failed, retries=3)) == (
        f"output.path: cannot write keypoints/shard-00000.parquet to {tmp_path / 'out'}: OSError: [Errno 28] No space "
        "left on device; the job stopped (committed shards are kept: rerun with --resume when the output is writable)")


def test_the_flip_columns_join_the_result_key_only_when_on_so_older_outputs_still_resume():
    import pytest
    from helpers import routing_for

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
