"""The evaluation's attacks as objects (pipeline/evaluation.py), plain PyTorch on tiny models: each one the
attack its settings name, the list in the order the evaluation runs it."""
import torch

from pipeline.attacks import pgd_eot
from pipeline.config import EvalConfig
from pipeline.defense import Carso
from pipeline.evaluation import AutoAttackRun, PGDEOTRun, carso_attacks
from pipeline.models.cnn import SmallCNN
from pipeline.models.purifier import Purifier


def _carso(aggregation="robust"):
    torch.manual_seed(0)
    clf = SmallCNN().eval()
    pur = Purifier(image_shape=(1, 28, 28), layer_shapes={"conv3": (64, 7, 7)}, fc_repr=16, f_joint=4,
                   encoder_convs=3, mean=(0.286,), std=(0.353,)).eval()
    return Carso(clf, pur, ["conv3"], samples=2, aggregation=aggregation)


def _points(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10


def test_attack_list_order_names_and_settings():
    ev = EvalConfig(eps=0.1, aa_steps=7, aa_eot=3, pgd_eot_steps=5, pgd_eot_iters=2, obfuscation_eps=0.9,
                    pgd_eot_logit_surrogate=True)
    attacks = carso_attacks(ev, seed=11, device="cpu")
    assert [a.name for a in attacks] == ["carso_randaa", "carso_pgd_eot", "carso_pgd_eot_logit", "obfuscation"]
    randaa, pgd_, logit, obf = attacks
    assert isinstance(randaa, AutoAttackRun) and (randaa.version, randaa.eps, randaa.steps, randaa.eot) == ("rand", 0.1, 7, 3)
    assert randaa.check_gradient_at_start and not obf.check_gradient_at_start
    assert (obf.version, obf.eps, obf.seed) == ("rand", 0.9, 11)
    assert isinstance(pgd_, PGDEOTRun) and (pgd_.steps, pgd_.eot, pgd_.step_size, pgd_.seed) == (5, 2, 0.007, 13)
    assert logit.gradient_through == "logit" and logit.seed == 15
    assert [a.name for a in carso_attacks(EvalConfig(), 0, "cpu")] == ["carso_randaa", "carso_pgd_eot", "obfuscation"]


def test_pgd_eot_run_is_table_12_pgd_eot_with_its_seeds():
    carso, (x, y) = _carso(), _points()
    run = PGDEOTRun(name="p", eps=0.1, steps=3, step_size=0.007, eot=2, seed=5, global_seed=9)
    adv = run.run(carso, x, y)
    torch.manual_seed(9)
    ref = pgd_eot(carso, x, y, eps=0.1, steps=3, step_size=0.007, eot=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(adv.x, ref) and adv.runner is None and adv.warnings is None
    assert adv.settings == {"attack": "PGD+EOT", "norm": "Linf", "eps": 0.1, "steps": 3, "step_size": 0.007, "eot": 2,
                            "random_start": True, "loss": "CE", "seed": 5}
    assert (adv.x - x).abs().max() <= 0.1 + 1e-6


def test_surrogate_attacks_the_logit_aggregation_not_the_defence():
    carso, (x, y) = _carso("robust"), _points()
    run = PGDEOTRun(name="p", eps=0.1, steps=3, step_size=0.01, eot=1, seed=5, global_seed=9, gradient_through="logit")
    logit = _carso("logit")  # the same weights, aggregated by logit averaging
    adv = run.run(carso, x, y)
    torch.manual_seed(9)
    ref = pgd_eot(logit, x, y, eps=0.1, steps=3, step_size=0.01, eot=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(adv.x, ref) and adv.settings["gradient_through"] == "logit aggregation"
    torch.manual_seed(9)
    direct = pgd_eot(carso, x, y, eps=0.1, steps=3, step_size=0.01, eot=1, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(adv.x, direct)  # the robust aggregation's gradient leads elsewhere
    assert carso.aggregation == "robust"  # the defence itself is unchanged


def test_autoattack_run_reports_the_library_settings_and_verdict():
    torch.manual_seed(0)
    clf = SmallCNN().eval()
    x, y = _points(4)
    adv = AutoAttackRun(name="a", version="rand", eps=0.05, seed=3, batch_size=4, device="cpu", steps=2,
                        eot=1).run(clf, x, y)
    assert adv.settings["library"] == "pyautoattack" and adv.settings["attacks"] == ["apgd-ce", "apgd-dlr"]
    assert (adv.settings["steps"], adv.settings["eot"], adv.settings["restarts"]) == (2, 1, 1)
    assert adv.runner.shape == y.shape and isinstance(adv.warnings, list)
    assert (adv.x - x).abs().max() <= 0.05 + 1e-6
    with torch.no_grad():  # the runner's verdict is the classifier's prediction on the returned points
        assert torch.equal(adv.runner, clf(adv.x).argmax(1))


def test_an_attack_added_to_the_registry_reaches_results_report_running_line_and_sweep(tmp_path, monkeypatch):
    """One entry in CARSO_ATTACKS is all an attack needs: it runs in every chunk and reaches results.json, the
    summary, report.md, the console lines, the sweep's columns and plan's gradient count."""
    import json

    from pipeline import evaluation, report, sweep
    from pipeline.config import RunConfig
    from pipeline.evaluation import Adversarial, CarsoAttack, carso_passes, evaluate_chunk
    from pipeline.store import Output, atomic_write_json

    class Noise:  # uniform noise in the eps-ball: a real, weak attack
        name, check_gradient_at_start = "carso_noise", False

        def __init__(self, eps, seed):
            self.eps, self.seed = eps, seed

        def run(self, model, x, y):
            g = torch.Generator().manual_seed(self.seed)
            x_adv = (x + self.eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
            return Adversarial(x_adv, {"attack": "uniform noise", "eps": self.eps, "seed": self.seed})

    noise = CarsoAttack("carso_noise", label="noise", make=lambda ev, s, device: Noise(ev.eps, s["pgd_eot"]),
                        describe=lambda e, r: f"- noise: fresh mean {100 * e['fresh']['mean']:.2f}%.",
                        passes=lambda ev: 0)
    monkeypatch.setattr(evaluation, "CARSO_ATTACKS", [*evaluation.CARSO_ATTACKS, noise])
    monkeypatch.setattr(report, "CARSO_ATTACKS", evaluation.CARSO_ATTACKS)
    monkeypatch.setattr(sweep, "CARSO_ATTACKS", evaluation.CARSO_ATTACKS)
    ev = EvalConfig(eps=0.1, aa_steps=1, aa_eot=1, pgd_eot_steps=1, pgd_eot_iters=1, fresh_draws=2, samples=2,
                    batch_size=4)
    cfg = RunConfig(eval=ev)
    (x, y), carso = _points(3), _carso()
    assert carso_passes(ev) == 2 * 1 + 1 + 2 * 1  # randAA, PGD+EOT, the obfuscation check; the noise needs none
    rec = evaluate_chunk(carso.classifier, carso, x, y, ev, seed=0, device="cpu")
    assert list(rec)[-1] == "carso_noise" and rec["carso_noise"]["settings"]["attack"] == "uniform noise"
    out = Output(tmp_path, "evaluate", "k")
    rec.update({"chunk": 0, "range": [0, 3]})
    path = tmp_path / "chunks" / "chunk-0000.json"
    path.parent.mkdir()
    atomic_write_json(path, rec)
    out.write_receipt("chunk-0000", [path], n=3)
    r = json.loads(json.dumps(report.merge(out, cfg, [(0, 0, 3)])))  # as results.json holds it
    assert r["carso_noise"]["fresh"]["draws"] == 2 and 0 <= r["summary"]["noise fresh mean"] <= 1
    assert f"- noise: fresh mean {100 * r['summary']['noise fresh mean']:.2f}%." in report.markdown(r)
    assert "noise" in report.running_line(r) and any("| noise " in line for line in report.summary_lines(r))
    rows = [{"summary": r["summary"]}]
    assert sweep.columns(rows)[-1] == "noise fresh mean"
