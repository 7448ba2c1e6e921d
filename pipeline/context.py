"""What a stage sees of the run: the config, the store, Ray on first use, and the outputs of other stages.

This module sits below the stages: stages import it (never ``pipeline.runner``), and it never imports a stage.
The stage graph itself (``stages.GRAPH``: name -> module) is handed to the Context by whoever builds it
(``pipeline.runner.Context`` does), which is how a key can be computed for any stage without an import loop.

What one stage needs to know of another's output is a public function here (``classifier_identity``,
``cached_layers``), never a private name of the other stage's module.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

from .cluster import connect, save_logs, session_dir, stop_local
from .config import RunConfig
from .errors import UserError
from .log import echo
from .models import build_classifier
from .models.hooks import check_layers
from .spec import Spec, allowed_fields, build_spec, restricted
from .store import Output, Store, StoreError


class UpstreamMissing(UserError):
    """A stage's key depends on an upstream output that does not exist yet."""


@dataclass
class Context:
    cfg: RunConfig
    store: Store
    # The stage graph: name -> module exposing VERSION, UPSTREAM, key(ctx) and run(ctx, out), in pipeline order.
    graph: Mapping[str, ModuleType] = field(default_factory=dict, repr=False)
    ray_address: str | None = None
    # Model workers per stage (runtime only, never part of a key); None = each stage's default (one per GPU; on CPU
    # one actor on every core for attacks/activations, purifier.workers, one evaluation task per core).
    workers: int | None = None
    log: Callable[[str], None] = echo
    # Ray's own output on the console too (otherwise it goes to Ray's log files, copied into <store>/logs/).
    verbose: bool = False
    # True once Ray is connected: by ``ray()`` on first use, or by a caller (a test, a notebook) that connected it.
    ray_ready: bool = field(default=False, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)
    _started_local_ray: bool = field(default=False, repr=False)
    saved_logs: str | None = field(default=None, repr=False)  # where stop_local_ray copied Ray's logs

    def ray(self) -> None:
        """Connect to Ray on first use (cache hits never start Ray)."""
        if not self.ray_ready:
            import ray

            started = not ray.is_initialized() and self.ray_address in (None, "", "local")
            connect(self.ray_address, log=self.log, verbose=self.verbose)
            self.ray_ready, self._started_local_ray = True, started

    def stop_local_ray(self, logs_to: Path | None = None) -> bool:
        """Stop the local Ray instance this run started (first copying Ray's logs into ``logs_to``, if given),
        waiting until its workers have exited (``cluster.stop_local``); False when there is none (a cluster's
        tasks end with the driver; an instance a caller connected is theirs)."""
        if not self._started_local_ray:
            return False
        session = session_dir()
        stop_local()  # first: the driver's Ray connection is closed while the GCS and raylet still run (a SIGTERM
        #               to the driver's process group does not reach them: cluster.connect)
        self.ray_ready = self._started_local_ray = False
        if logs_to is not None and session is not None:
            self.saved_logs = save_logs(logs_to, session)  # Ray leaves its session folder after shutdown
        return True

    def spec(self, stage: str) -> Spec:
        """The spec of a stage (``pipeline.spec``): everything in the config and upstream that determines its
        output, with the module's code ``VERSION`` (bumped whenever a code change alters what the stage writes, so
        an output of older code is never served as a cache hit). Built once per run (``forget_keys`` after a stage
        wrote something)."""
        if stage not in self._keys:
            self._keys[stage] = build_spec(self, stage)
        return self._keys[stage]

    def key(self, stage: str) -> str:
        """The store key of a stage: the hash of its spec."""
        return self.spec(stage).key

    @contextmanager
    def running(self, stage: str):
        """While ``stage`` runs, its config is restricted to its spec (and its upstream stages' and the key-free
        fields): reading any other field raises (``pipeline.spec.NotInSpec``)."""
        full = self.cfg
        self.cfg = restricted(full, allowed_fields(self.graph, stage, full), stage)
        try:
            yield
        finally:
            self.cfg = full

    def forget_keys(self) -> None:
        self._keys.clear()

    def output(self, stage: str, create: bool = False) -> Output:
        spec = self.spec(stage)
        out = self.store.output(self.cfg.data.dataset, stage, spec.key, create=create)
        out.code_version, out.spec = spec.version, spec.as_dict()
        return out

    def output_or_none(self, stage: str, complete: bool = False) -> Output | None:
        """The output of ``stage``, or None when its key cannot be known yet (an upstream output is missing) or,
        with ``complete``, when it is not finished."""
        try:
            out = self.output(stage)
        except UpstreamMissing:
            return None
        return out if (out.is_complete() or not complete) else None

    def upstream(self, stage: str) -> Output:
        """The complete output of an upstream stage, or UpstreamMissing."""
        out = self.output(stage)
        if not out.is_complete():
            raise UpstreamMissing(f"{stage} output {out.dir} is not complete; run `--stage {stage}` first")
        return out


def data_identity(cfg: RunConfig, split: str) -> dict:
    """What identifies the data a stage reads (the recorded data sha256 lives in each manifest)."""
    subset = cfg.data.train_subset if split == "train" else cfg.data.test_subset
    return {"dataset": cfg.data.dataset, "split": split, "subset": subset}


def classifier_identity(ctx: Context) -> dict:
    """The classifier every downstream stage depends on: arch, activation and the sha256 of its weights, read
    once per run from the classifier's manifest."""
    up = ctx.upstream("classifier").manifest()
    return {"arch": up["arch"], "activation": up["activation"], "weights_sha256": up["weights_sha256"]}


def cached_layers(ctx: Context) -> list[str]:
    """The classifier layers the activations stage hooks (``activations.layers``, or the architecture's default
    list), checked against the architecture."""
    ident = classifier_identity(ctx)
    model = build_classifier(ident["arch"], ctx.cfg.data.dataset, ident["activation"])
    layers = ctx.cfg.activations.layers or model.default_layers()
    check_layers(model, layers)
    return list(layers)


def cached_subset(ctx: Context, key: str, wanted: list[str] | None) -> list[str]:
    """``wanted`` (the setting ``key``) or every cached layer; a layer that is not cached is a one-line error."""
    cached = cached_layers(ctx)
    wanted = wanted or cached
    missing = [name for name in wanted if name not in cached]
    if missing:
        raise StoreError(f"{key}: {', '.join(missing)} not among the cached layers ({', '.join(cached)})")
    return list(wanted)


def conditioning_layers(ctx: Context) -> list[str]:
    """The layers the purifier conditions on: ``purifier.layers`` or every cached layer."""
    return cached_subset(ctx, "purifier.layers", ctx.cfg.purifier.layers)
