"""`Core`: the server core's API (tinyserve.core.api.CoreAPI) over the model manager
(tinyserve.core.models.Models) and the request path (tinyserve.core.requests.Requests).

`Core` is the one door every front end (tcp, http, grpc) uses, so they never touch the core's
internals.  The composition root (tinyserve.server) builds the two and hands them in, with the
server-wide wire limits, token and body memory (the core imports no front end and not the
composition root).  Everything runs on the loop thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tinyserve import __version__, errors
from tinyserve.core.api import IndexEntry, ModelMetadata, TensorMeta

__all__ = ["Core", "EXTENSIONS"]

# what the core offers whatever the wire (a front end adds its own, e.g. binary tensor data)
EXTENSIONS = ("model_repository", "statistics")


def _meta(spec) -> TensorMeta:
    return TensorMeta(spec.name, spec.dtype, tuple(int(d) for d in spec.shape))


class Core:
    """The wire-free API of one server (see tinyserve.core.api for the contract)."""

    def __init__(self, models: Any, requests: Any = None, *, limits=None, token: bytes | None = None,
                 body_memory=None) -> None:
        if requests is None:  # Core(server): over a composed server's model manager and request path
            server = models
            models, requests = server.models, server.requests
            limits, token, body_memory = server._limits, server._token, server._frame_memory
        self._s = models  # the model manager
        self._r = requests  # the request path
        self._limits = limits
        self._token = token
        self._body_memory = body_memory

    # --- the server ----------------------------------------------------------------------------------
    @property
    def limits(self):
        return self._limits

    @property
    def body_memory(self):
        return self._body_memory

    @property
    def token(self) -> bytes | None:
        return self._token

    @property
    def loop(self):
        return self._s._loop

    @property
    def draining(self) -> bool:
        return self._s._draining

    def add_flush(self, flush) -> None:
        self._r.add_flush(flush)

    def read_done(self) -> None:
        self._r._read_done()

    def count_op(self, code: str | None = None) -> None:
        self._r.count_op(code)

    def count_refused(self, model, version, code: str, message: str) -> None:
        self._r.count_refused(model, version, code, message)

    def live(self) -> bool:
        return not self._s._stopping

    def ready(self) -> bool:
        return bool(self._s.ready)

    def server_metadata(self) -> dict:
        return {"name": "tinyserve", "version": __version__, "extensions": list(EXTENSIONS)}

    def health(self, repository: bool = False) -> dict:
        return self._s.health_dict(repository)

    def stats_report(self, name: str | None = None) -> dict:
        return self._s.stats_report(name)

    def models_report(self) -> list:
        return self._s.models_report()

    # --- models ---------------------------------------------------------------------------------------
    def _instance(self, name: str, version: int | None):
        s = self._s
        return s._routes.get(name) if version is None else s._instances.get((name, version))

    def model_ready(self, name: str, version: int | None = None) -> bool:
        inst = self._instance(name, version)
        if inst is not None:
            return inst.state == "READY"
        self._s._resolve(name, version)  # NOT_FOUND for an unknown model or version
        return False

    async def model_metadata(self, name: str, version: int | None = None) -> ModelMetadata:
        s = self._s
        inst = self._instance(name, version)
        if inst is not None and inst.config is not None:
            cfg, version = inst.config, inst.version
        else:
            path = s._resolve(name, version if version is not None else s.metadata_version(name))
            version = int(path.name)
            if s._remote:  # read from storage off the loop
                cfg = await s._io(s.repo.read_config, name, version)
            else:
                cfg = s._cached(("config", name, version), s.repo.read_config, name, version)
        try:
            versions = tuple(s._cached(("versions", name), s._index.versions, name))
        except errors.ModelNotFoundError:  # loaded, then removed from the repository
            versions = (version,)
        request_inputs = getattr(cfg, "request_inputs", None)  # what a preprocess hook takes, if declared
        inputs = request_inputs if request_inputs else cfg.inputs
        request_outputs = getattr(cfg, "request_outputs", None)
        outputs = request_outputs if request_outputs else cfg.outputs
        batching = cfg.batching
        return ModelMetadata(name=name, version=version, versions=versions, platform=cfg.platform,
                             inputs=tuple(_meta(t) for t in inputs), outputs=tuple(_meta(t) for t in outputs),
                             max_batch_size=0 if batching is None else int(batching.max_batch_size))

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        s = self._s
        names = set(s._cached(("models",), s._index.models)) | {n for n, _ in s._instances}
        with s._policy_lock:
            failed = s._failed_versions()
        out = []
        for name in sorted(names):
            try:
                versions = set(s._cached(("versions", name), s._index.versions, name))
            except errors.ModelNotFoundError:
                versions = set()
            versions |= {v for (n, v) in s._instances if n == name} | {v for (n, v) in failed if n == name}
            if not versions:
                if not ready_only:
                    out.append(IndexEntry(name, None, "UNLOADED", "the repository holds no version"))
                continue
            for v in sorted(versions):
                inst = s._instances.get((name, v))
                if inst is not None:
                    entry = IndexEntry(name, v, str(inst.state), inst.reason or "")
                elif (name, v) in failed:
                    entry = IndexEntry(name, v, "FAILED", failed[(name, v)])
                else:
                    entry = IndexEntry(name, v, "UNLOADED", "")
                if not ready_only or entry.state == "READY":
                    out.append(entry)
        return out

    def metadata_config(self, name: str, version: int | None = None):
        return self._s.metadata_config(name, version)

    def read_config(self, name: str, version: int):
        return self._s.read_config(name, version)

    def start_load(self, name: str, version: int | None = None):
        return self._s._load(name, version)

    def start_unload(self, name: str, version: int | None = None):
        return self._s.start_unload(name, version)

    async def load(self, name: str, version: int | None = None) -> int:
        inst = await self._s.load(name, version)
        return inst.version

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        s = self._s
        targets = s._unload_targets(name, version)
        if not targets:
            s._resolve(name, version)  # NOT_FOUND for an unknown model or version
            return []
        return await s.unload(name, version)

    def statistics(self, name: str | None = None, version: int | None = None) -> list[dict]:
        s = self._s
        if name is not None:
            known = any(ms.name == name for ms in s.metrics.models())
            if not known:
                s._resolve(name, version)  # NOT_FOUND for a model the server never heard of
        out = []
        for ms in s.metrics.models():
            if (name is not None and ms.name != name) or (version is not None and ms.version != version):
                continue
            snap = ms.snapshot()
            entry = {"name": ms.name, "version": ms.version, **snap.to_dict(),
                     "success_count": snap.successes, "total_sum_ns": snap.total.total,
                     "queue_sum_ns": snap.queue.total, "compute_sum_ns": snap.compute.total,
                     "batches": dict(sorted(snap.batch.items()))}
            out.append(entry)
        out.sort(key=lambda e: (e["name"], e["version"]))
        return out

    # --- requests -------------------------------------------------------------------------------------
    def infer(self, name: str, version: int | None, inputs: Mapping[str, tuple], *,
              outputs: Sequence[str] | None = None, timeout_s: float | None = None, priority: int = 0,
              responder, tag) -> None:
        self._r.submit_infer(name, version, inputs if callable(inputs) else dict(inputs), outputs=outputs, timeout_s=timeout_s,
                             priority=priority, responder=responder, tag=tag)
