"""Step traces (azu.network.steptrace, ``AZU_STEP_TRACE``): off by default; on, a worker notes each point of a
hop its steps pass, and the traces of two workers give the legs of a step around the ring."""

from __future__ import annotations

from pathlib import Path

import pytest

from azu.config import Settings
from azu.network import jobs, steptrace
from azu.registry import status as models
from tests.support.network import InlineNetwork


def test_off_by_default_and_from_the_environment(tmp_path: Path) -> None:
    assert Settings.from_env({}).worker.step_trace is None
    assert Settings.from_env({"AZU_STEP_TRACE": str(tmp_path)}).worker.step_trace == str(tmp_path)
    off = steptrace.StepTrace.in_folder(None, "w")
    off.mark("taken")
    off.flush()
    assert off.path is None and not list(tmp_path.iterdir())


def test_marks_are_written_at_flush_and_read_back_merged(tmp_path: Path) -> None:
    a = steptrace.StepTrace.in_folder(tmp_path, "a")
    b = steptrace.StepTrace.in_folder(tmp_path, "b")
    a.mark("taken")
    b.mark("taken")
    a.mark("sent")
    assert not list(tmp_path.iterdir())  # nothing written on a step's path
    a.flush()
    b.flush()
    a.flush()  # nothing new: nothing written twice
    marks = steptrace.read(tmp_path)
    assert [m.label for m in marks] == ["a taken", "b taken", "a sent"]
    assert [m.ns for m in marks] == sorted(m.ns for m in marks)
    assert [m.label for m in steptrace.read(tmp_path, since_ns=marks[1].ns)] == ["b taken", "a sent"]
    assert [m.label for m in steptrace.read(tmp_path, until_ns=marks[0].ns)] == ["a taken"]


def test_a_trace_that_cannot_be_written_stops_without_failing(tmp_path: Path, caplog) -> None:
    (tmp_path / "not-a-folder").write_text("")
    trace = steptrace.StepTrace.in_folder(tmp_path / "not-a-folder", "w")
    trace.mark("taken")
    trace.flush()  # logs, does not raise: a step's session calls it
    assert "cannot be written" in caplog.text
    trace.mark("sent")
    trace.flush()
    assert trace._marks is None  # no longer noting


def test_step_path_follows_the_ring_and_its_legs_add_up() -> None:
    def mark(ns: int, label: str) -> steptrace.Mark:
        worker, point = label.split()
        return steptrace.Mark(ns, worker, point)

    # Three steps around a ring of two workers; in the second, b takes the bundle before a's send returns.
    marks = []
    for t in (0, 100, 200):
        sent = t + 45 if t == 100 else t + 30
        marks += [mark(t, "a taken"), mark(t + 10, "a forward"), mark(sent, "a sent"),
                  mark(t + 40, "b taken"), mark(t + 60, "b forward"), mark(t + 90, "b sent")]
    marks.append(mark(300, "a taken"))
    marks.sort(key=lambda m: m.ns)
    legs = steptrace.step_path(marks, "a taken")
    assert [leg.start for leg in legs] == ["a taken", "a forward", "a sent", "b taken", "b forward", "b sent"]
    assert legs[-1].end == "a taken"
    assert sum(leg.median_ms for leg in legs) == pytest.approx(100 / 1e6)  # one step's time, in ms
    assert legs[2].share == pytest.approx(2 / 3)  # "a sent" came before "b taken" in two steps of three
    assert steptrace.step_path(marks, "c taken") == []


@pytest.mark.network
def test_a_traced_job_marks_every_point_of_its_hops(r, shard, reference, tmp_path: Path) -> None:
    model_id = shard("tiny-traced")
    folder = models.shard_dir(model_id)
    net = InlineNetwork(r)
    nodes = [net.add("trace-a", folder, model_id, 0, 2, 4, step_trace=tmp_path),
             net.add("trace-b", folder, model_id, 2, 4, 4, step_trace=tmp_path)]
    prompt, n = [1, 40, 50, 60], 6
    jobs.submit_job(r, jobs.JobRequest(job_id="jt-1", user_id="u", model_id=model_id, prompt_ids=prompt,
                                       max_tokens=n), dispatch=net)
    net.run()
    view = jobs.get_job(r, "jt-1")
    assert view is not None and view.token_ids == reference(prompt, n)  # traced, the same tokens
    for node in nodes:
        node.stop()  # writes what is held
    marks = steptrace.read(tmp_path)
    for worker in ("trace-a", "trace-b"):
        points = [m.point for m in marks if m.worker == worker]
        assert set(points) == set(steptrace.POINTS), worker
        # One step's points in order: the first hop's step 1 (a decode step) from its take.
        first = points.index("taken", points.index("taken") + 1)
        assert points[first:first + len(steptrace.POINTS)] == list(steptrace.POINTS), worker
    legs = steptrace.step_path(marks, "trace-a taken")
    assert legs and legs[-1].end == "trace-a taken"
    assert {"trace-a forward", "trace-b forward"} <= {leg.start for leg in legs}
