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


def test_adversarial_training_and_its_pgd_test_report_progress_inside_an_epoch(monkeypatch):
    """A WRN epoch on CPU takes a quarter of an hour: the classifier stage prints progress lines inside it (here
    after every step, with the interval set to zero), and none at all between steps when the interval is long."""
    import torch

    from pipeline import adv_train
    from pipeline.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("cnn", "fmnist", "relu")
    x, y = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (48,))
    kw = dict(epochs=1, batch_size=16, lr=0.01, momentum=0.9, weight_decay=0.0, eps=0.1, pgd_steps=1,
              pgd_step_size=0.1, seed=0)
    monkeypatch.setattr(adv_train, "PROGRESS_EVERY_S", 0.0)
    lines: list[str] = []
    adv_train.adversarial_train(model, x, y, log=lines.append, **kw)
    adv_train.accuracy_under_pgd(model, x, y, eps=0.1, steps=1, step_size=0.1, batch_size=16, log=lines.append)
    assert [line.split(" |")[0] for line in lines[:2]] == ["[classifier] epoch 1/1: 16/48 examples",
                                                          "[classifier] epoch 1/1: 32/48 examples"]
    assert lines[2].startswith("[classifier] epoch 1/1: adversarial loss")
    assert [line.split(" |")[0] for line in lines[3:]] == ["[classifier] PGD-1 test accuracy: 16/48 examples",
                                                          "[classifier] PGD-1 test accuracy: 32/48 examples"]
    monkeypatch.setattr(adv_train, "PROGRESS_EVERY_S", 3600.0)
    quiet: list[str] = []
    adv_train.adversarial_train(model, x, y, log=quiet.append, **kw)
    assert len(quiet) == 1 and quiet[0].startswith("[classifier] epoch 1/1: adversarial loss")
