"""Console progress lines: slow stages report every finished unit, with a readable rate."""
from pipeline.log import Progress, human_rate


def test_rate_units():
    assert human_rate(61.54, "examples") == "61.5 examples/s"
    assert human_rate(0.05, "points") == "3.0 points/min"
    assert human_rate(0.0105, "points") == "37.8 points/h"
    assert human_rate(0.0001, "points") == "0.4 points/h"
    assert human_rate(0.0, "points") == "0.0 points/s"


def test_every_finished_unit_is_reported_when_every_is_zero():
    lines = []
    p = Progress("evaluate", 20, "points", every=0, log=lines.append)
    for _ in range(4):
        p.update(5)
    assert [line.split(" (")[0] for line in lines] == [f"[evaluate] {k}/20 points" for k in (5, 10, 15, 20)]
    throttled = []
    q = Progress("attacks", 20, "examples", every=3600, log=throttled.append)
    for _ in range(4):
        q.update(5)
    assert len(throttled) == 1 and throttled[0].startswith("[attacks] 20/20")


def test_a_resumed_run_counts_finished_items_but_rates_only_its_own():
    lines = []
    p = Progress("evaluate", 200, "points", every=0, log=lines.append, done=190)
    p.t0 -= 3600.0  # this run has worked an hour
    p.update(5)
    assert lines[0].startswith("[evaluate] 195/200 points (98%) | 5.0 points/h | ETA 1h")
