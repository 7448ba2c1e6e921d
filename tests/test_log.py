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
