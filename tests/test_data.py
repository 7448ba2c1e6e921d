import os
import pickle

import numpy as np
import pytest

from pipeline.data import DataError, load_split, to_float
from tests.conftest import make_cifar10, make_cifar100, make_fmnist, make_tinyimagenet


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_idx(tmp_path, gz):
    root = make_fmnist(tmp_path, n_train=20, n_test=10, gz=gz)
    x, y = load_split("fmnist", "train", str(root))
    assert x.shape == (20, 1, 28, 28) and x.dtype.is_floating_point is False and y.shape == (20,)
    xt, _ = load_split("fmnist", "test", str(root), subset=4)
    assert xt.shape[0] == 4
    f = to_float(x)
    assert 0.0 <= f.min() and f.max() <= 1.0


def test_fmnist_truncated_idx_names_file(tmp_path):
    root = make_fmnist(tmp_path, gz=False)
    p = root / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_split("fmnist", "train", str(root))


def test_fmnist_missing_says_how_to_get(tmp_path):
    with pytest.raises(DataError) as e:
        load_split("fmnist", "train", str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value) and "dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian dataset not installed")
def test_real_fmnist_default_dir():
    x, y = load_split("fmnist", "test")
    assert x.shape == (10000, 1, 28, 28) and int(y.max()) == 9


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10(tmp_path, archive):
    make_cifar10(tmp_path, n=8, archive=archive)
    x, y = load_split("cifar10", "train", str(tmp_path))
    assert x.shape == (40, 3, 32, 32) and y.max() < 10
    xt, _ = load_split("cifar10", "test", str(tmp_path))
    assert xt.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("archive", [False, True])
def test_cifar100(tmp_path, archive):
    make_cifar100(tmp_path, n=6, archive=archive)
    x, y = load_split("cifar100", "train", str(tmp_path))
    assert x.shape == (6, 3, 32, 32) and y.max() < 100


def test_cifar_pixel_layout(tmp_path):
    make_cifar10(tmp_path, n=2)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    x, _ = load_split("cifar10", "test", str(tmp_path))
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, row-major.
    assert np.array_equal(x[1, 2].numpy().ravel(), raw[b"data"][1, 2048:])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_hostile_pickle(tmp_path):
    make_cifar10(tmp_path, n=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="test_batch.*refusing to load posix.system|test_batch.*refusing"):
        load_split("cifar10", "test", str(tmp_path))


def test_cifar_missing_says_how_to_get(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_split("cifar10", "train", str(tmp_path))


def test_tinyimagenet(tmp_path):
    make_tinyimagenet(tmp_path, per_class=3)
    x, y = load_split("tinyimagenet", "train", str(tmp_path))
    assert x.shape == (6, 3, 64, 64) and sorted(set(y.tolist())) == [0, 1]
    xt, yt = load_split("tinyimagenet", "test", str(tmp_path))
    assert xt.shape == (2, 3, 64, 64) and yt.tolist() == [0, 1]


def test_tinyimagenet_bad_annotation_line(tmp_path):
    make_tinyimagenet(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn99999999\n")
    with pytest.raises(DataError, match="val_annotations.txt: line 1"):
        load_split("tinyimagenet", "test", str(tmp_path))
