"""Cross-check of the project's randomised-AutoAttack figure from outside its evaluation code (issue 12).

Loads the stored classifier and purifier of a config (files checked against their manifests), rebuilds CARSO
with its own forward pass (hooks, N latent draws, the robust aggregation written from the paper's formula in
float64: P_i proportional to prod_a exp(exp(l_i^a))), and runs the official AutoAttack code (PyPI's
`pyautoattack`, version='rand': APGD-CE + APGD-DLR with EOT) on the same test points, with the same steps and
EOT as the evaluation it is compared to. Nothing from pipeline/evaluation.py or pipeline/defense.py is used.

    python bench/crosscheck_randaa.py --config configs/fmnist_carso.yaml --first 0 --n 200 --steps 20 --eot 4 \
        --compare runs/fmnist/evaluate/<key>/results.json

Prints one JSON object: the settings, the independent robust accuracy (AutoAttack's own count, and one fresh
re-scoring of its points), and the project's figures from --compare.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn


class IndependentCarso(nn.Module):
    def __init__(self, classifier: nn.Module, purifier: nn.Module, layers: list[str], samples: int):
        super().__init__()
        self.classifier, self.purifier, self.layers, self.samples = classifier.eval(), purifier.eval(), layers, samples
        modules = dict(self.classifier.named_modules())
        self._acts: dict[str, torch.Tensor] = {}
        for name in layers:
            modules[name].register_forward_hook(lambda m, i, o, name=name: self._acts.__setitem__(name, o))
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._acts.clear()
        self.classifier(x)
        cond = self.purifier.encode_condition([self._acts[n] for n in self.layers])
        b = x.shape[0]
        cond = cond.repeat(self.samples, 1)
        z = torch.randn(cond.shape[0], self.purifier.f_joint, device=x.device)
        rec = self.purifier.decode(z, cond)
        logits = self.classifier(rec).view(self.samples, b, -1).double()
        s = torch.exp(logits).sum(0)                  # S_i = sum_a exp(l_i^a), float64
        return torch.log_softmax(s, dim=1).float()    # log P_i = S_i - logsumexp_j S_j


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--store", default="./runs")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eot", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", default=None, help="the project's results.json of the same points and settings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pyautoattack import AutoAttack

    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.data import load_split, to_float
    from pipeline.models import load_stored
    from pipeline.models.purifier import PurifierSpec
    from pipeline.store import require_intact

    cfg = load_config(args.config)
    ctx = runner.Context(cfg=cfg, store=runner.store_root(Path(args.store)), log=lambda m: None)
    classifier, _ = load_stored(ctx.upstream("classifier"), cfg.data.dataset)
    pur_out = ctx.upstream("purifier")
    manifest = pur_out.manifest()
    require_intact(pur_out, next(r for r in manifest["files"] if r["name"] == "purifier.pt"))
    purifier = PurifierSpec.from_json(manifest["model"]).build()
    purifier.load_state_dict(torch.load(pur_out.dir / "purifier.pt", map_location="cpu", weights_only=True))
    model = IndependentCarso(classifier, purifier, manifest["model"]["layers"], cfg.eval.samples)

    x, y = load_split(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.test_subset)
    x, y = to_float(x[args.first:args.first + args.n]), y[args.first:args.first + args.n]
    torch.manual_seed(args.seed)
    aa = AutoAttack(model, norm="Linf", eps=cfg.eval.eps, version="rand", seed=args.seed, device="cpu")
    aa.apgd.n_iter, aa.apgd.eot_iter = args.steps, args.eot
    t0 = time.perf_counter()
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=args.batch)
    seconds = time.perf_counter() - t0
    # AutoAttack's own count (its labels on its adversarial points), and one fresh re-scoring by this script.
    with torch.no_grad():
        torch.manual_seed(args.seed + 1)
        clean_ok = model(x).argmax(1) == y
        torch.manual_seed(args.seed + 2)
        adv_ok = model(x_adv).argmax(1) == y
    out = {"config": args.config, "points": [args.first, args.first + len(y)], "eps": cfg.eval.eps,
           "attack": f"official AutoAttack 'rand' (pyautoattack): APGD-CE + APGD-DLR, {args.steps} steps x EOT "
                     f"{args.eot}", "samples": cfg.eval.samples, "aggregation": "robust (float64, this script)",
           "clean_accuracy": round(100 * clean_ok.float().mean().item(), 2),
           "robust_accuracy_autoattack": round(100 * (y_adv.cpu() == y).float().mean().item(), 2),
           "robust_accuracy_one_fresh_draw": round(100 * (clean_ok & adv_ok).float().mean().item(), 2),
           "seconds": round(seconds, 1)}
    if args.compare:
        res = json.loads(Path(args.compare).read_text())
        out["project"] = {"C/randAA": res["summary"].get("C/randAA"), "C/randAA (fresh mean)":
                          res["summary"].get("C/randAA fresh mean"), "C/Cl": res["summary"].get("C/Cl"),
                          "settings": res["carso_randaa"].get("settings")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
