"""Stage `probes`: what each hooked layer of the frozen classifier knows under attack (pipeline/probes.py).

For every probed layer (``probes.layers``, or every cached layer), two linear readouts (multinomial logistic
regression on the flattened activation):

- a *transfer probe*, fitted on the activations stage's stored training rows (clean and the four attacks);
- a *robust probe*, adversarially trained (PGD through the frozen layers up to that one, at ``probes.eps``).

Each is scored on the test points ``[probes.first_example, + probes.n_examples)``: clean, under PGD crafted
against the classifier alone (transfer) and under PGD crafted against the probe itself through the frozen layers
(adaptive), beside the classifier's own clean and PGD accuracy.

Units (each with a receipt, so a killed run resumes): ``classifier`` (the classifier's scores and the transfer
points, ``transfer_x.npy``), then one ``layer-NN`` per probed layer (``layers/NN.json`` and the probes' weights
``layers/NN.pt``), each a Ray task (one per core or GPU). A layer's seed comes from ``probes.seed`` and its name,
so its numbers do not depend on which other layers are probed. Outputs: ``probes.json``, ``report.md``,
``probes.png``.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import probe_report
from pipeline import probes as P
from pipeline.cluster import default_workers, device_for, prepare_worker, worker_resources
from pipeline.config import ProbesConfig
from pipeline.context import Context, cached_subset, classifier_identity, data_identity
from pipeline.data import info, load_split, to_float
from pipeline.log import Progress
from pipeline.models import classifier_payload
from pipeline.store import Output, atomic_file, atomic_write_json, file_record
from pipeline.zarr_store import ActivationReader
from stages import _pool
from stages._pool import unbox

# Code version of this stage, part of its store key (pipeline.context.Context.key): bump it whenever a change
# alters what the stage writes.
VERSION = 1
CLASSIFIER_UNIT = "classifier"


def upstream(cfg) -> tuple[str, ...]:
    """Transfer probes read the cached activations; robust probes need only the classifier (and the data)."""
    return ("classifier", "attacks", "activations") if cfg.probes.transfer else ("classifier",)


def resolved_eps(cfg) -> float:
    return cfg.probes.eps if cfg.probes.eps is not None else cfg.eval.eps


def probed_layers(ctx: Context) -> list[str]:
    """``probes.layers`` or every cached layer; a layer that is not cached is a one-line error."""
    return cached_subset(ctx, "probes.layers", ctx.cfg.probes.layers)


_TRANSFER = ("epochs",)
_ROBUST = ("robust_examples", "robust_epochs", "robust_pgd_steps", "robust_pgd_step_size")
# The spec (pipeline/spec.py): only what the enabled probe kinds read (the transfer probes' epochs and the robust
# probes' training settings, and the training data, leave it when that kind is off); the layers and eps resolved
# (eps: probes.eps or eval.eps); the classifier and the cached activations (inputs).
READS = ("data.dataset", "data.test_subset", "probes.layers", "probes.first_example", "probes.n_examples",
         "probes.eps", "eval.eps", "probes.pgd_steps", "probes.pgd_step_size", "probes.transfer", "probes.robust",
         "probes.lr", "probes.weight_decay", "probes.batch_size", "probes.seed",
         *(f"probes.{f}" for f in _TRANSFER), "data.train_subset", *(f"probes.{f}" for f in _ROBUST))
RESOLVED = {"probes.layers": "layers", "probes.eps": "eps", "eval.eps": "eps"}


def reads(cfg) -> tuple[str, ...]:
    p = cfg.probes
    skip = {"eval.eps"} if p.eps is not None else set()
    if not p.transfer:
        skip |= {f"probes.{f}" for f in _TRANSFER}
    if not p.robust:
        skip |= {f"probes.{f}" for f in _ROBUST} | {"data.train_subset"}
    return tuple(f for f in READS if f not in skip)


def inputs(ctx: Context) -> dict:
    cfg = ctx.cfg
    return {"classifier": classifier_identity(ctx), "layers": probed_layers(ctx), "eps": resolved_eps(cfg),
            **({"activations": ctx.upstream("activations").key} if cfg.probes.transfer else {})}


def layer_seed(seed: int, layer: str) -> int:
    return (seed * 1_000_003 + int(hashlib.sha256(layer.encode()).hexdigest()[:8], 16)) % (2 ** 31)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def classifier_task(clf_box, test_box, out_dir: str, p: ProbesConfig, eps: float, device: str, threads: int) -> dict:
    """The classifier's own clean and PGD accuracy on the scored points, and those PGD points (the transfer
    inputs of every probe)."""
    prepare_worker(threads)
    torch.set_grad_enabled(True)
    model = unbox(clf_box).build(device)
    x, y = unbox(test_box)
    t0 = time.perf_counter()
    scores, x_adv = P.classifier_scores(model, to_float(x).to(device), y.to(device), eps=eps, steps=p.pgd_steps,
                                        step_size=p.pgd_step_size, seed=p.seed, batch_size=p.batch_size)
    out = Output(Path(out_dir), "probes", "")
    path = out.dir / "transfer_x.npy"
    _save_npy(path, x_adv.detach().cpu().numpy().astype(np.float32))
    res = out.dir / "classifier.json"
    atomic_write_json(res, {**scores, "seconds": time.perf_counter() - t0})
    out.write_receipt(CLASSIFIER_UNIT, [path, res])
    return scores


def layer_task(clf_box, test_box, train_box, out_dir: str, acts_dir: str | None, i: int, layer: str,
               p: ProbesConfig, eps: float, num_classes: int, device: str, threads: int) -> dict:
    """One layer's probes, fitted and scored; writes ``layers/NN.json``, ``layers/NN.pt`` and the unit's receipt."""
    prepare_worker(threads)
    torch.set_grad_enabled(True)
    model = unbox(clf_box).build(device)
    x, y = unbox(test_box)
    x, y = to_float(x).to(device), y.to(device)
    out = Output(Path(out_dir), "probes", "")
    x_tr = torch.from_numpy(np.load(out.dir / "transfer_x.npy", allow_pickle=False)).to(device)
    seed = layer_seed(p.seed, layer)
    t0 = time.perf_counter()
    row: dict = {"layer": layer, "index": i, "seed": seed}
    weights = {}
    score = dict(eps=eps, steps=p.pgd_steps, step_size=p.pgd_step_size, batch_size=p.batch_size)
    if p.transfer:
        reader = ActivationReader(Output(Path(acts_dir), "activations", ""), [layer])
        data = reader.read(0, reader.n_rows)
        feats, labels = torch.from_numpy(data[layer]), torch.from_numpy(data["label"]).long()
        row["shape"] = list(feats.shape[1:])
        probe = P.fit_linear_probe(feats, labels, num_classes, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                                   weight_decay=p.weight_decay, seed=seed).to(device)
        del feats, data
        row["transfer_probe"] = {**P.score_probe(model, layer, probe, x, y, x_tr, seed=seed + 1, **score),
                                 "train_rows": int(len(labels))}
        weights["transfer"] = {k: v.cpu() for k, v in probe.state_dict().items()}
    if p.robust:
        xr, yr = unbox(train_box)
        probe = P.fit_robust_probe(model, layer, to_float(xr).to(device), yr.to(device), num_classes, eps=eps,
                                   steps=p.robust_pgd_steps, step_size=p.robust_pgd_step_size, epochs=p.robust_epochs,
                                   batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=seed + 2)
        row["robust_probe"] = {**P.score_probe(model, layer, probe, x, y, x_tr, seed=seed + 3, **score),
                               "train_images": int(len(yr))}
        weights["robust"] = {k: v.cpu() for k, v in probe.state_dict().items()}
    if "shape" not in row:
        with torch.no_grad():
            row["shape"] = list(P.layer_features(model, layer, x[:1], 1).shape[1:])
    row["dim"] = int(np.prod(row["shape"]))
    row["seconds"] = time.perf_counter() - t0
    res, pt = out.dir / "layers" / f"{i:02d}.json", out.dir / "layers" / f"{i:02d}.pt"
    res.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(weights, buf)
    with atomic_file(pt) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    atomic_write_json(res, row)
    out.write_receipt(f"layer-{i:02d}", [res, pt])
    return {"layer": layer}


def settings(cfg) -> dict:
    p = cfg.probes
    return {"eps": resolved_eps(cfg), "norm": "Linf", "points": [p.first_example, p.first_example + p.n_examples],
            "scoring_attack": {"name": "PGD", "steps": p.pgd_steps, "step_size": p.pgd_step_size, "loss": "CE",
                               "random_start": True},
            "transfer": "PGD crafted against the classifier alone (its logits), scored by the probe",
            "adaptive": "PGD crafted against the probe itself, through the frozen classifier layers up to its layer",
            "transfer_probe": {"fitted_on": "the cached training activations (clean + FGSM eps/2, eps + PGD eps/2, eps)",
                               "epochs": p.epochs} if p.transfer else None,
            "robust_probe": {"fitted_on": f"the first {p.robust_examples} training images, Madry adversarial training",
                             "epochs": p.robust_epochs, "pgd_steps": p.robust_pgd_steps,
                             "pgd_step_size": p.robust_pgd_step_size} if p.robust else None,
            "optimiser": {"lr": p.lr, "weight_decay": p.weight_decay, "batch_size": p.batch_size, "seed": p.seed}}


def run(ctx: Context, out: Output) -> None:
    import ray

    cfg, p = ctx.cfg, ctx.cfg.probes
    t0 = time.perf_counter()
    layers, eps, meta = probed_layers(ctx), resolved_eps(cfg), info(cfg.data.dataset)
    x, y = load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)
    x, y = x[p.first_example:p.first_example + p.n_examples], y[p.first_example:p.first_example + p.n_examples]
    train = None
    if p.robust:
        xt, yt = load_split(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.train_subset)
        train = (xt[:p.robust_examples], yt[:p.robust_examples])
    acts_dir = str(ctx.upstream("activations").dir) if p.transfer else None
    done = out.done_units()
    todo = [(i, name) for i, name in enumerate(layers) if f"layer-{i:02d}" not in done]
    ctx.ray()
    workers = max(1, min(ctx.workers or default_workers(), max(1, len(todo))))
    res = worker_resources(workers)
    dev, threads = device_for(res), int(res["num_cpus"])
    ctx.log(f"[probes] {len(layers)} layer(s) x ({'transfer' if p.transfer else ''}"
            f"{' + ' if p.transfer and p.robust else ''}{'robust' if p.robust else ''}) probes on test points "
            f"{p.first_example}-{p.first_example + len(y) - 1}, PGD {p.pgd_steps} x {p.pgd_step_size:g} at eps "
            f"{eps:g}; {workers} worker(s) ({dev})")
    clf_box = _pool.ref_box(classifier_payload(ctx.upstream("classifier"), cfg.data.dataset))
    test_box, train_box = _pool.ref_box((x, y)), _pool.ref_box(train)
    opts = dict(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=1)
    if CLASSIFIER_UNIT not in done:
        ray.get(ray.remote(classifier_task).options(**opts).remote(clf_box, test_box, str(out.dir), p, eps, dev,
                                                                   threads))
    task = ray.remote(layer_task).options(**opts)
    progress = Progress("probes", len(layers), "layers", every=0, log=ctx.log, done=len(layers) - len(todo))
    pending = [task.remote(clf_box, test_box, train_box, str(out.dir), acts_dir, i, name, p, eps, meta.num_classes,
                           dev, threads) for i, name in todo]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        progress.update(1)
        ctx.log(f"[probes] {ray.get(ready[0])['layer']} done")

    rows = [json.loads((out.dir / "layers" / f"{i:02d}.json").read_text()) for i in range(len(layers))]
    clf = json.loads((out.dir / "classifier.json").read_text())
    result = {"dataset": cfg.data.dataset, "arch": classifier_identity(ctx)["arch"], "layers": rows,
              "classifier": {k: clf[k] for k in ("clean", "pgd", "n")}, "settings": settings(cfg),
              "timings": {"total_s": time.perf_counter() - t0}}
    atomic_write_json(out.dir / "probes.json", result)
    (out.dir / "report.md").write_text(probe_report.markdown(result))
    names = ["probes.json", "report.md"]
    if probe_report.figure(result, out.dir / "probes.png"):
        names.append("probes.png")
    files = [f for r in out.receipts() for f in r["files"]] + [file_record(out.dir, out.dir / n) for n in names]
    out.finalize(inputs={"weights_sha256": classifier_identity(ctx)["weights_sha256"],
                                                        "test": data_identity(cfg, "test"),
                                                        **({"activations": ctx.upstream("activations").key}
                                                           if p.transfer else {})},
                 files=files, counts={"layers": len(layers), "points": int(len(y))}, timings=result["timings"],
                 extra={"layers": layers})
    for line in probe_report.markdown(result).splitlines():
        if line.startswith("|") and "---" not in line:
            ctx.log(f"[probes] {line}")
