
import pytest

from pipeline.config import ConfigError, RunConfig, build, load_config
from tests.conftest import REPO, cli_here

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem  # each shipped config names its own runs (a copied file that forgot it fails)


def test_base_chain_merges_sections_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nattack:\n  eps: 0.2\n  pgd_steps: 9\npurifier:\n  layers: [x, y]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nattack:\n  pgd_steps: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../b.yaml\npurifier:\n  layers: [z]\n")
    c = load_config(tmp_path / "sub" / "c.yaml")
    assert (c.name, c.attack.eps, c.attack.pgd_steps, c.purifier.layers) == ("b", 0.2, 3, ["z"])
    # The shipped children are what their bases say, but for the lines they change.
    carso, default = load_config(REPO / "configs/fmnist_carso.yaml"), load_config(REPO / "configs/fmnist.yaml")
    assert carso.purifier == default.purifier and carso.attack == default.attack
    assert (carso.eval.n_examples, carso.eval.aa_steps, default.eval.aa_steps) == (200, 100, 20)
    assert len((REPO / "configs/fmnist_carso.yaml").read_text().splitlines()) < 25


@pytest.mark.parametrize("text,message", [
    ("base: nowhere.yaml\n", "nowhere.yaml: base config file not found"),
    ("base: [a]\n", "base: must be the path of another config file"),
    ("base: c.yaml\n", "the base chain is a cycle (c.yaml -> c.yaml)"),
])
def test_bad_base_is_one_line_naming_the_file(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value) and str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_base_cycle_through_two_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")


def test_paper_values_in_scenario_configs():
    a = load_config(REPO / "configs/cifar10.yaml")
    c = load_config(REPO / "configs/tinyimagenet.yaml")
    assert a.attack.eps == pytest.approx(8 / 255) and a.eval.eps == pytest.approx(8 / 255)
    assert (a.attack.pgd_steps, a.attack.pgd_step_size) == (40, 0.01)
    assert (a.eval.pgd_eot_steps, a.eval.pgd_eot_step_size, a.eval.pgd_eot_iters) == (200, 0.007, 20)
    assert (a.purifier.fc_repr, a.purifier.f_joint, c.purifier.fc_repr, c.purifier.f_joint) == (512, 128, 768, 192)
    assert (a.purifier.plateau_lr, c.purifier.plateau_lr, c.purifier.encoder_convs) == (0.064, 0.0128, 4)


def test_every_shipped_config_reports_its_classifier_at_its_own_threat_model():
    """The classifier stage's test PGD (also of a loaded classifier) is at classifier.train.eps: in every shipped
    config it is the attacks' and the evaluation's eps (a CIFAR classifier reported at Fashion-MNIST's 0.1 was a
    bug of the scenario configs)."""
    names = sorted((REPO / "configs").glob("*.yaml"))  # run configs (the folders below hold sweep grids)
    assert len(names) >= 6
    for p in names:
        cfg = load_config(p)
        assert cfg.classifier.train.eps == pytest.approx(cfg.attack.eps), p
        assert cfg.eval.eps == pytest.approx(cfg.attack.eps), p


def test_unknown_key_names_full_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("attack:\n  epss: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "attack.epss" in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,key", [("attack.eps=-1", "attack.eps"), ("attack.eps=abc", "attack.eps"),
                                          ("classifier.train.epochs=0", "classifier.train.epochs"),
                                          ("data.dataset=mnist", "data.dataset"),
                                          ("attack.pgd_random_start=3", "attack.pgd_random_start"),
                                          ("activations.chunk_rows=7", "activations.chunk_rows"),
                                          ("classifier.activation=swish", "classifier.activation")])
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/fmnist.yaml", [override])
    assert str(e.value).split(": ")[1] == key


def test_override_applies_with_widening():
    cfg = load_config(REPO / "configs/fmnist.yaml", ["attack.eps=1", "eval.n_examples=7"])
    assert cfg.attack.eps == 1.0 and isinstance(cfg.attack.eps, float) and cfg.eval.n_examples == 7


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="classifier.path"):
        build(RunConfig, {"classifier": {"source": "file"}})
    with pytest.raises(ConfigError, match="purifier.anneal_epochs"):
        build(RunConfig, {"purifier": {"epochs": 10}})


@pytest.mark.parametrize("extra,needle", [(["--set", "attack.eps=-1"], "attack.eps"),
                                          (["--set", "attack.bogus=1"], "attack.bogus"),
                                          (["--set", "attack.pgd_step_size=.inf"], "attack.pgd_step_size: must be a finite"),
                                          (["--set", "eval.eps=.nan"], "eval.eps: must be a finite")])
def test_cli_config_errors_exit_2_one_line(tmp_path, extra, needle):
    r = cli_here("run", "--config", "configs/fmnist.yaml", "--stage", "classifier", "--store", str(tmp_path / "s"), *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "configs/fmnist.yaml" in lines[0]
    assert not (tmp_path / "s").exists()  # nothing written


def test_cli_missing_config_exit_2(tmp_path):
    r = cli_here("run", "--config", str(tmp_path / "nope.yaml"), "--stage", "classifier")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope.yaml" in r.stderr


def test_cli_help_lists_stages():
    r = cli_here("--help")
    assert r.returncode == 0
    for stage in ("classifier", "attacks", "activations", "purifier", "evaluate", "all"):
        assert stage in r.stdout
    r = cli_here("run", "--help")
    for opt in ("--config", "--stage", "--set", "--ray-address", "--store"):
        assert opt in r.stdout


def test_verify_on_a_missing_store_is_an_error(tmp_path):
    r = cli_here("verify", "--store", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nowhere" in r.stderr
    assert not (tmp_path / "nowhere").exists()
