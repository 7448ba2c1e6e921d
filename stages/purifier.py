"""Stage `purifier`: fit CARSO's conditional VAE on Ray Train (TorchTrainer, DDP; gloo on CPU, NCCL on GPU).

Each worker reads its own attack shards (and, with ``purifier.activations_source: cache``, the matching Zarr
rows of only the configured layers), composes adversarially-balanced batches (pipeline/balanced.py), and
trains with RAdam + Lookahead under the per-epoch LR and beta schedules. Every epoch rank 0 writes a
checkpoint into the store (model, optimizer, history and every worker's random state) and reports the
epoch's metrics to Ray Train; a run restarted by Ray Train (lost worker) or re-run after being killed resumes
from the store's latest checkpoint, bit-identical to an uninterrupted run with the same worker count.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.balanced import BalancedBatches, steps_per_epoch, worker_kinds
from pipeline.kinds import N_KINDS
from pipeline.cluster import cluster_gpus, cpus_per_node, prepare_worker
from pipeline.context import Context, classifier_identity, conditioning_layers
from pipeline.errors import UserError, find_user_error
from pipeline.log import Follow
from pipeline.models import classifier_payload
from pipeline.models.purifier import PurifierSpec
from pipeline.purifier_train import TrainJob, build_optimizer, epoch_record, slow_state_dict, train_epoch
from pipeline.sizing import layer_shapes
from pipeline.store import (Output, StoreError, atomic_torch_save, atomic_write_bytes, atomic_write_json, file_record,
                            require_intact)

CKPT_DIR = "checkpoints"


# Code version of this stage, part of its store key (pipeline.context.Context.key): bump it whenever a change
# alters what the stage writes.
# 2: the encoder reads the (possibly perturbed) input, not the clean target; purifier.pt holds Lookahead's
#    slow weights; metrics carry the per-dimension KL.
# 3: a worker's shuffle buffer holds at most BUFFER_BYTES of cached activations (``buffer_examples``). The bytes
#    are unchanged where that cap does not bind (the default's 0.2 MB per example: 2,500 examples, 0.55 GB); it
#    binds for the WRN (1.9 MB per example), whose older code could not finish on 24 GB, and the bump keeps an
#    older output of such a config (trained with a larger buffer elsewhere) from being served under this code.
VERSION = 3
# Per worker: the shuffle buffer's cached activations (beside it, up to one loaded shard and the next one loading).
BUFFER_BYTES = 1024 ** 3
UPSTREAM = ("classifier", "attacks", "activations")


def upstream(cfg) -> tuple[str, ...]:
    """With ``activations_source: recompute`` nothing reads the cached activations (for WRN-28-10 they would be
    terabytes), so that stage is not needed."""
    return UPSTREAM if cfg.purifier.activations_source == "cache" else ("classifier", "attacks")


_OWN = ("fc_repr", "f_joint", "encoder_convs", "layers", "activations_source", "epochs", "warmup_epochs",
        "plateau_epochs", "anneal_epochs", "initial_lr", "plateau_lr", "final_lr", "beta_start_epoch", "beta_end_epoch",
        "beta_max", "batch_size", "adv_fraction", "radam_betas", "radam_eps", "lookahead_alpha", "lookahead_k",
        "workers", "seed", "precision")
_RECOMPUTE = ("activations.layers", "activations.dtype", "activations.precision")
# The spec (pipeline/spec.py): every setting of its section, ``workers`` included (each worker's shards and batch
# stream follow its rank and the count, pipeline/balanced.py, and DDP sums gradients in a different order, so 1
# and 2 workers train different bytes; which is also why ``--workers``, the count of byte-invariant model workers,
# does not apply here); the conditioning layers resolved (null and the equivalent explicit list are one spec);
# the shards and the classifier (inputs); and the cached activations (inputs) or, recomputed on the fly, how the
# classifier's forward makes them.
READS = (*(f"purifier.{f}" for f in _OWN), *_RECOMPUTE)
RESOLVED = {"purifier.layers": "layers", "activations.layers": "layers"}


def reads(cfg) -> tuple[str, ...]:
    """Recomputed activations: how the forward makes them, and the hooked layers when ``purifier.layers`` is null."""
    if cfg.purifier.activations_source != "recompute":
        return READS[:-len(_RECOMPUTE)]
    return READS if cfg.purifier.layers is None else tuple(f for f in READS if f != "activations.layers")


def inputs(ctx: Context) -> dict:
    cache = ctx.cfg.purifier.activations_source == "cache"
    return {"attacks": ctx.upstream("attacks").key, "weights_sha256": classifier_identity(ctx)["weights_sha256"],
            "layers": conditioning_layers(ctx), **({"activations": ctx.upstream("activations").key} if cache else {})}


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint whose write finished: a checkpoint is renamed into place before its receipt
    (``_units/epoch-N.json``) is written, so one without a receipt was interrupted and is skipped."""
    found = [p for p in sorted((out_dir / CKPT_DIR).glob("epoch-*.pt")) if (out_dir / "_units" / f"{p.stem}.json").is_file()]
    return found[-1] if found else None


def read_checkpoint(out_dir: Path, path: Path) -> dict:
    """A checkpoint, checked against the size and sha256 recorded when it was written (``_units/epoch-N.json``),
    then read with ``weights_only=True``, memory-mapped (a reader touches only the tensors it uses: the driver's
    final step reads the slow weights, not the optimizer's state)."""
    out = Output(out_dir, "purifier", "")
    receipt = out.unit_receipt(path.stem)
    if not receipt.is_file():
        raise StoreError(f"{path}: no record of its size and sha256 ({receipt} is missing); delete the checkpoint "
                         f"to restart training from the previous one, or rebuild with --rebuild")
    require_intact(out, json.loads(receipt.read_text())["files"][0])
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# --------------------------------------------------------------------------------------------------
# The per-worker training loop (runs inside Ray Train workers)
# --------------------------------------------------------------------------------------------------
WORKER_ERROR = ".worker-error.json"


def train_loop(config: dict) -> None:
    """Ray Train's entry point on every worker (``config["job"]``: the ``TrainJob``). A user error (a corrupt shard,
    a bad store file) is written to ``<out>/.worker-error.json`` for the driver to print as one line. Met while
    loading a batch (the usual place), every worker agrees to stop at that step and returns (``_AgreedBatches``):
    the run ends without a retry. Met anywhere else, it is raised; Ray Train retries a failed worker group (a
    killed worker, a lost node), and a retry finding a recorded error raises it at once instead of loading
    anything, since it would fail the same way."""
    job: TrainJob = config["job"]
    recorded = Path(job.out_dir) / WORKER_ERROR
    if recorded.is_file():
        raise UserError.from_record(json.loads(recorded.read_text()))
    try:
        _train(job)
    except Exception as exc:
        err = find_user_error(exc)
        if err is not None:
            _record_worker_error(Path(job.out_dir), err)
        raise


def _record_worker_error(out_dir: Path, err: UserError) -> None:
    atomic_write_bytes(out_dir / WORKER_ERROR, json.dumps(err.record()).encode())


class _AgreedBatches:
    """An epoch's batches, each step agreed by every worker: before each batch the workers all-reduce whether any
    of them met a user error while loading it (a corrupt shard, a bad store file). The one that did records it
    (``WORKER_ERROR``) and every worker stops at that same step (``failed``), so ``train_loop`` returns, the run
    ends at once and the driver prints the error: no worker group restarts for an error a restart would meet
    again, and no worker waits in a collective for one that left. One tiny all-reduce per step."""

    def __init__(self, batches, out_dir: Path, device):
        self.batches, self.out_dir, self.device, self.failed = batches, out_dir, device, False

    def __iter__(self):
        return self

    def __next__(self):
        err = None
        try:
            batch = next(self.batches, None)
        except Exception as exc:  # noqa: BLE001 - a user error is recorded and agreed on; anything else is raised
            err = find_user_error(exc)
            if err is None:
                raise
            _record_worker_error(self.out_dir, err)
            batch = None
        flag = torch.tensor([int(err is not None)], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.failed = True
            raise StopIteration
        if batch is None:
            raise StopIteration
        return batch


def _raise_worker_error(out_dir: Path) -> None:
    """Re-raise, as one UserError line, the user error a Ray Train worker recorded (see ``train_loop``)."""
    path = out_dir / WORKER_ERROR
    if path.is_file():
        rec = json.loads(path.read_text())
        path.unlink(missing_ok=True)
        raise UserError.from_record(rec)


def _train(job: TrainJob) -> None:
    import ray.train
    import ray.train.torch
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p, out_dir = job.purifier, Path(job.out_dir)
    prepare_worker(job.threads)
    torch.manual_seed(p.seed + rank)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(job.model.build().to(device))
    opt = build_optimizer(model, p)
    start, history = 0, []
    # Resume from the newest checkpoint in the store, the one the driver named (rank 0 writes it before reporting
    # to Ray Train, so it is never older than Ray Train's): after a driver re-run and after a Ray Train restart
    # alike. With every random state restored, the result is bit-identical to an uninterrupted run.
    path = latest_checkpoint(out_dir)
    if path is not None:
        state = read_checkpoint(out_dir, path)
        (model.module if hasattr(model, "module") else model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"] + 1, state["history"]
        restore_rng(state.get("rng"), rank, world)
    classifier = job.classifier.build(str(device)) if job.source == "recompute" else None
    batches = BalancedBatches(job.shard_loader(), len(job.examples_per_shard), batch_size=p.batch_size,
                              adv_fraction=p.adv_fraction, workers=world, rank=rank, steps=job.steps,
                              buffer_examples=job.buffer_examples, seed=p.seed)
    for epoch in range(start, p.epochs):
        t0 = time.perf_counter()
        agreed = _AgreedBatches(batches.epoch(epoch), out_dir, device)
        sums = train_epoch(model, opt, agreed, epoch, p, device, layers=job.layers,
                           dtype=job.dtype, classifier=classifier, act_precision=job.act_precision)
        if agreed.failed:  # recorded; every worker stops here, before this epoch's checkpoint
            return
        if dist.is_available() and dist.is_initialized():
            for t in sums.values():
                dist.all_reduce(t)
        history.append(epoch_record(sums, epoch, p, time.perf_counter() - t0, world))
        rng = gather_rng(world)
        if rank == 0:  # the checkpoint lives in the store only: every restart resumes from there (above)
            state = {"model": (model.module if hasattr(model, "module") else model).state_dict(),
                     "slow_model": slow_state_dict(model, opt), "optimizer": opt.state_dict(), "epoch": epoch,
                     "history": history, "rng": rng}
            _store_checkpoint(out_dir, epoch, state, history)
        ray.train.report({k: v for k, v in history[-1].items() if k != "kl_per_dim"})


def gather_rng(world: int) -> list[dict]:
    """Every worker's torch random state (CPU, and CUDA where used), gathered to all ranks. Batch order needs none:
    it is a function of (seed, epoch, rank) (pipeline/balanced.py)."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every: list = [None] * world
    dist.all_gather_object(every, mine)  # between this job's own workers
    return every


def restore_rng(rng: list[dict] | None, rank: int, world: int) -> None:
    """Set this worker's random state from a checkpoint written with the same number of workers (otherwise the
    seeds of the run's start stay: a resume on another worker count is valid but not bit-identical)."""
    if not rng or len(rng) != world:
        return
    torch.set_rng_state(rng[rank]["cpu"])
    if "cuda" in rng[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[rank]["cuda"])


def _store_checkpoint(out_dir: Path, epoch: int, state: dict, history: list[dict]) -> None:
    """Rank 0: the epoch's checkpoint into the store (streamed and hashed on the way, atomically, then its
    receipt), metrics.jsonl rewritten from the checkpoint's history (so a kill between the two writes never leaves
    a gap), old checkpoints pruned."""
    d = out_dir / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"epoch-{epoch:04d}.pt"
    written = atomic_torch_save(path, state)
    out = Output(out_dir, "purifier", "")
    out.write_receipt(path.stem, [path], hashes={path: written["sha256"]})  # checked before it is read back
    for old in sorted(d.glob("epoch-*.pt"))[:-2]:
        old.unlink(missing_ok=True)
        out.unit_receipt(old.stem).unlink(missing_ok=True)
    write_metrics(out_dir, history)


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def model_spec(ctx: Context, layers: list[str]) -> PurifierSpec:
    """The purifier the config asks for, conditioned on ``layers`` of the stored classifier."""
    up = ctx.upstream("classifier").manifest()
    shapes = layer_shapes(up["arch"], ctx.cfg.data.dataset, up["activation"], layers)
    return PurifierSpec.for_config(ctx.cfg, shapes, layers)


def example_bytes(ctx: Context, layers: list[str]) -> int:
    """Cached activations of one training example (its rows of every kind) as stored."""
    up = ctx.upstream("classifier").manifest()
    shapes = layer_shapes(up["arch"], ctx.cfg.data.dataset, up["activation"], layers)
    row = sum(math.prod(s) for s in shapes.values()) * np.dtype(ctx.cfg.activations.dtype).itemsize
    return N_KINDS * row


def buffer_examples(per_worker_batch: int, shard_size: int, worker_examples: int, per_example: int) -> int:
    """The shuffle buffer of one worker: four shards or half its examples, at least one batch, and at most
    ``BUFFER_BYTES`` of cached activations (``per_example`` bytes each; 0 when they are recomputed)."""
    n = min(4 * shard_size, worker_examples // 2)
    if per_example:
        n = min(n, BUFFER_BYTES // per_example)
    return max(per_worker_batch, n)


def run(ctx: Context, out: Output) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, p = ctx.cfg, ctx.cfg.purifier
    t0 = time.perf_counter()
    layers = conditioning_layers(ctx)
    attacks = ctx.upstream("attacks")
    units = attacks.manifest()["units"]
    examples = [u["stop"] - u["start"] for u in units]
    ctx.ray()
    workers = p.workers
    if ctx.workers and ctx.workers != workers:
        ctx.log(f"[purifier] --workers {ctx.workers} does not apply to the purifier (its worker count changes the "
                f"trained weights, so it is part of the key): purifier.workers = {workers}; --set "
                f"purifier.workers=N changes it")
    gpus = cluster_gpus()
    worker_kinds(p.batch_size, p.adv_fraction, workers, 0)  # validates divisibility before launching
    steps = steps_per_epoch(examples, p.batch_size, workers)
    if steps == 0:
        raise StoreError(f"purifier.batch_size={p.batch_size}: not one full batch per worker from {sum(examples)} "
                         f"examples on {workers} worker(s)")
    threads = 1 if gpus else max(1, cpus_per_node() // workers)
    cache = p.activations_source == "cache"
    job = TrainJob(purifier=p, model=model_spec(ctx, layers), source=p.activations_source,
                   attacks_dir=str(attacks.dir.resolve()), out_dir=str(out.dir.resolve()),
                   examples_per_shard=tuple(examples), steps=steps, threads=threads,
                   buffer_examples=buffer_examples(p.batch_size // workers, cfg.attack.shard_size, sum(examples) // workers,
                                                   example_bytes(ctx, layers) if cache else 0),
                   cache_bytes=1024 ** 3, dtype=cfg.activations.dtype, act_precision=cfg.activations.precision,
                   activations_dir=str(ctx.upstream("activations").dir.resolve()) if cache else None,
                   classifier=None if cache else classifier_payload(ctx.upstream("classifier"), cfg.data.dataset))
    latest = latest_checkpoint(out.dir)
    if latest is not None:  # the workers resume from this same file (train_loop)
        ctx.log(f"[purifier] resuming from {latest.name}")
    ctx.log(f"[purifier] {workers} worker(s) ({'GPU' if gpus else f'CPU x{threads} threads'}), global batch "
            f"{p.batch_size} ({p.batch_size // workers}/worker, adversarial fraction {p.adv_fraction}), "
            f"{steps} steps/epoch, {p.epochs} epochs, layers: {', '.join(layers)}")
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus),
                                               resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=f"purifier-{out.key}", storage_path=str((out.dir / "ray_train").resolve()),
                                       failure_config=ray.train.FailureConfig(max_failures=2),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    (out.dir / WORKER_ERROR).unlink(missing_ok=True)
    with Follow(out.dir / "metrics.jsonl", ctx.log, fmt=lambda line: epoch_line(json.loads(line), p)):
        try:
            trainer.fit()
            _raise_worker_error(out.dir)  # the workers agreed to stop on a recorded user error (_AgreedBatches)
        except BaseException:
            if latest_checkpoint(out.dir) is None:  # nothing to resume from: leave no Ray Train bookkeeping
                shutil.rmtree(out.dir / "ray_train", ignore_errors=True)
            _raise_worker_error(out.dir)  # a user error inside a worker: one line, not Ray Train's traceback
            raise
    _finalize(ctx, out, job, time.perf_counter() - t0)


def epoch_line(rec: dict, p) -> str:
    return (f"[purifier] epoch {rec['epoch']}/{p.epochs}: loss {rec['loss']:.2f} (reconstruction "
            f"{rec['reconstruction']:.2f}, KL {rec['kl']:.2f}, beta {rec['beta']:.2f}), active latent units "
            f"{rec['active_units']}/{p.f_joint}, lr {rec['lr']:.3g}, {rec['examples_per_s']:.0f} examples/s, waited "
            f"{rec['data_wait_s']:.1f} s of {rec['seconds']:.1f} s on data")


def parameter_count(spec: PurifierSpec) -> int:
    """The purifier's parameters, counted on the meta device (no weights allocated or initialised: 106 M for the
    full-size CIFAR-10 purifier)."""
    with torch.device("meta"):
        return sum(q.numel() for q in spec.build().parameters())


def _finalize(ctx: Context, out: Output, job: TrainJob, seconds: float) -> None:
    state = read_checkpoint(out.dir, latest_checkpoint(out.dir))
    if state["epoch"] + 1 != ctx.cfg.purifier.epochs:
        raise RuntimeError(f"[purifier] training stopped at epoch {state['epoch'] + 1} of {ctx.cfg.purifier.epochs}")
    write_metrics(out.dir, state["history"])  # exactly the finished epochs, whatever a kill interrupted
    # Lookahead's slow weights (pipeline/purifier_train.py)
    written = atomic_torch_save(out.dir / "purifier.pt", state["slow_model"])
    atomic_write_json(out.dir / "purifier.json", job.model.to_json())
    files = [file_record(out.dir, out.dir / n, written["sha256"] if n == "purifier.pt" else None)
             for n in ("purifier.pt", "purifier.json", "metrics.jsonl")]
    hist = state["history"]
    out.finalize(inputs={"layers": job.layers, "source": job.source} | inputs(ctx),
                 files=files, counts={"epochs": len(hist), "steps_per_epoch": job.steps,
                                      "parameters": parameter_count(job.model)},
                 timings={"total_s": seconds, "epoch_s": [h["seconds"] for h in hist]},
                 extra={"final_metrics": hist[-1], "model": job.model.to_json()})
    ctx.log(f"[purifier] final epoch: loss {hist[-1]['loss']:.2f}, reconstruction {hist[-1]['reconstruction']:.2f}, "
            f"KL {hist[-1]['kl']:.2f} nats, active latent units {hist[-1]['active_units']}/{ctx.cfg.purifier.f_joint} "
            f"(average KL > 0.01 nats)")
