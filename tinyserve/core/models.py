"""The model manager of the server core: one owner of the repository listing and its cache, loads and
`_default_version`, on-demand loads and the wake-up of the requests parked on them, blocked loads and
their retry timer, the placement plan and eviction, OOM shedding, elastic scaling, device faults, the
poll loop and rollouts, `_loaded` / `_unloaded` / the routes, and the reports built from that state
(`models_report`, `stats_report`, `health_report` / `health_dict`, `metadata_config`).

The request path (tinyserve.core.requests.Requests) reads its shared dicts (`_instances`, `_routes`,
`_parked`, `placement`, `policy`) and asks it for on-demand loads; the composition root
(tinyserve.server.Server) builds it, sets `requests`, and drives its lifecycle flags (`_loop`,
`_stopping`, `_draining`, `_ready`).  Front ends reach it only through tinyserve.core.service.Core.
All methods run on the event loop thread unless they say otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePath

from tinyserve import errors, memory, wire
from tinyserve.core.requests import PARK as _PARK
from tinyserve.core.requests import Histogram
from tinyserve.health import DeviceMonitor, EjectionPolicy, ModelInput, assess, log_event
from tinyserve.memory import ElasticController, Footprint
from tinyserve.metrics import Metrics
from tinyserve.remote import Poller, open_repository
from tinyserve.repository import Repository, load_config_dir
from tinyserve.runtime import FAILED, LOADING, READY, UNLOADED, UNLOADING, ModelInstance

__all__ = ["BLOCKED_RETRY_S", "Models"]

log = logging.getLogger("tinyserve.server")
_monotonic = time.monotonic


BLOCKED_RETRY_S = 0.002  # a load blocked on busy models is retried this often (Models._arm_blocked_retry)


class _Blocked(wire.Unavailable):
    """Placement: room for the model frees only once loads under way finish (retried then)."""


def _weights_bytes(version_dir, cfg) -> tuple[int, int]:
    """(bytes decoded into memory, bytes mapped from the file) of a version, from its weights index."""
    from tinyserve.weights import WeightsFile

    decoded = mapped = 0
    with WeightsFile(os.path.join(version_dir, cfg.weights)) as wf:
        for info in wf.tensors.values():
            n = info.data_size if info.encoding == "raw" else _nbytes(info)
            if info.encoding == "raw":
                mapped += n
            else:
                decoded += n
    return decoded, mapped


def _nbytes(info) -> int:
    from tinyserve.weights import DTYPE_TO_TORCH

    n = DTYPE_TO_TORCH[info.dtype].itemsize
    for d in info.shape:
        n *= d
    return n


class _Listing:
    """What the server knows of a remote repository's models and versions (refreshed off the loop,
    at start, after loads and at every poll), with the look-up methods of a local Repository that
    the loop needs: nothing here waits on the network."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.data: dict[str, list[int]] = {}

    def models(self) -> list[str]:
        return sorted(self.data)

    def versions(self, name: str) -> list[int]:
        Repository.validate_name(name)
        versions = self.data.get(name)
        if not versions:
            raise errors.ModelNotFoundError(f"model {name!r} is not in the repository {self.root}")
        return list(versions)

    def resolve(self, name: str, version: int | None = None) -> PurePath:
        """A path whose name is the version (the callers read only that)."""
        versions = self.versions(name)
        if version is None:
            version = max(versions)
        elif version not in versions:
            raise errors.ModelNotFoundError(f"model {name!r} has no version {version} in the repository {self.root} "
                                            f"(versions: {', '.join(map(str, versions))})")
        return PurePath(str(version))


class Models:
    """See the module docstring.  `devices`: the devices in use ("cpu", "cuda:N"); `placement`: the
    memory placement (tinyserve.memory.Placement), or None when it is off."""

    def __init__(self, config, devices: list[str], placement) -> None:
        self.config = config
        self.repo = open_repository(config.repo, cache_dir=config.cache_dir, cache_bytes=config.cache_bytes,
                                    **config.storage)
        # a remote repository is never touched on the loop: look-ups read a listing refreshed in the
        # background, loads resolve (download) in the I/O pool
        self._remote = not isinstance(self.repo, Repository)
        self._index = _Listing(str(config.repo)) if self._remote else self.repo
        self._io_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._poller = (Poller(self.repo, interval_s=config.poll_interval_s, policies=config.version_policies)
                        if config.model_control == "poll" else None)
        self._poll_task: asyncio.Task | None = None
        self._bg_tasks: set[asyncio.Task] = set()  # listing refreshes after remote loads
        self._devices = devices
        self._device = devices[0]
        self.placement = placement
        self._parked: dict[tuple[str, int], list] = {}  # requests waiting for an on-demand load
        self._blocked: set[tuple[str, int]] = set()  # on-demand loads waiting for room (busy models)
        self._blocked_timer = None  # while loads are blocked: a retry every BLOCKED_RETRY_S
        self._blocked_seen = None  # _finished_sum() at the last timed retry
        self._batch_caps: dict[str, int] = {}  # placement key -> the batch size its memory plan allows
        self._elastic: dict[tuple[str, int], ElasticController] = {}
        self._repo_cache: dict = {}  # (what, args) -> (expiry, result or exception)
        self._completions = None  # tinyserve.runtime.Completions, set by the composition root at start
        self._instances: dict[tuple[str, int], ModelInstance] = {}
        self._routes: dict[str, ModelInstance] = {}  # name -> the highest READY version
        self._startup: tuple = config.models
        self.metrics = Metrics()  # per model version (docs/health.md section 2)
        self.policy = EjectionPolicy(config.ejection)  # guarded by _policy_lock (workers record into it)
        self.clock = _monotonic  # the ejection policy's and the health report's clock (tests inject one)
        self._statistics = config.statistics
        self._policy_lock = threading.Lock()
        self.monitor = DeviceMonitor(interval_s=config.device_poll_s, on_reading=self._device_reading)
        self.requests = None  # the request path (tinyserve.core.requests.Requests), set by the composition root
        # the lifecycle, driven by the composition root
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False  # listening
        self._draining = False
        self._stopping = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self.started_at = 0.0

    @property
    def ready(self) -> bool:
        """Listening, not draining, every device healthy, every start-up model serving (not ejected),
        and with require_model at least one model version serving (health_report has the reasons)."""
        return self.health_report().ready

    def _static_models(self) -> tuple:
        """(name, version) of the local repository's models whose latest version's placement.mode is
        static (placed on their devices at start, never evicted), less those already listed."""
        if self._remote:
            return ()
        out = []
        listed = {n for n, _ in self._startup}
        for name in self.repo.models():
            if name in listed:
                continue
            try:
                path = self.repo.resolve(name)
                cfg = load_config_dir(path)
            except (errors.TinyserveError, OSError):  # a broken model: reported when it is asked for
                continue
            if cfg.placement is not None and cfg.placement.mode == "static":
                out.append((name, int(path.name)))
        return tuple(out)

    def _resume_counters(self):
        """The remote storage's resume counters' snapshot function (None for a local repository)."""
        resumes = getattr(getattr(self.repo, "storage", None), "resumes", None) if self._remote else None
        return resumes.snapshot if resumes is not None else None

    async def _static_models_remote(self) -> tuple:
        """The same for a remote repository: each model's default version (its version policy, else
        the latest) whose config says placement.mode static; the configs are read off the loop, in
        parallel (one small GET each for a version not cached)."""
        listed = {n for n, _ in self._startup}

        async def one(name: str):
            try:
                version = self._default_version(name, await self._io(self.repo.versions, name))
                cfg = await self._io(self.repo.read_config, name, version)
            except (errors.TinyserveError, OSError) as exc:  # reported again when it is asked for
                log.warning("tinyserve: reading the config of %s in %s failed (not placed at start if it is "
                            "static): %s", name, self.config.repo, exc)
                return None
            return (name, version) if cfg.placement is not None and cfg.placement.mode == "static" else None

        names = [n for n in await self._io(self.repo.models) if n not in listed]
        found = await asyncio.gather(*(one(n) for n in names))
        return tuple(f for f in found if f is not None)

    def health_report(self):
        """Liveness, readiness and their reasons (tinyserve.health.assess), on the loop thread."""
        models = [ModelInput(i.name, i.version, i.state, i.reason, i.device) for i in self._instances.values()]
        with self._policy_lock:
            for (name, version), reason in self._failed_versions().items():
                models.append(ModelInput(name, version, FAILED, reason))
            return assess(models, self.monitor.latest(), policy=self.policy, now=self.clock(),
                          required=self._startup, listening=self._ready, draining=self._draining,
                          require_model=self.config.require_model)

    def _tick(self) -> None:
        """Once a second: the throughput windows and elastic scaling (blocked loads have their own
        timer, _arm_blocked_retry)."""
        self.metrics.tick()
        if self._elastic:
            self._scale(self.clock())
        if not self._stopping:
            self._tick_handle = self._loop.call_later(1.0, self._tick)

    async def _stop_models(self, timeout: float) -> None:
        self.requests._submit_pending()
        futs = [inst.unload() for inst in list(self._instances.values())]
        self._routes.clear()
        if futs:
            try:
                await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        self._instances.clear()

    async def load(self, name: str, version: int | None = None) -> ModelInstance:
        """Load (and warm up) a model version; the latest in the repository when version is None."""
        return await self._load(name, version)

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        targets = self._unload_targets(name, version)
        if targets:
            await asyncio.gather(*(inst.unload() for inst in targets))
        return [inst.version for inst in targets]

    # --- repository look-ups, cached (they scan directories; requests must not do that every time) ---
    def _cached(self, key: tuple, fn: Callable, *args):
        now = _monotonic()
        hit = self._repo_cache.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], BaseException):
                raise type(hit[1])(*hit[1].args)  # a fresh one (a re-raised one grows its traceback)
            return hit[1]
        if len(self._repo_cache) >= 4096:  # many distinct unknown names: drop the lot
            self._repo_cache.clear()
        try:
            result = fn(*args)
        except errors.ModelNotFoundError as exc:
            self._repo_cache[key] = (now + self.config.repo_cache_s, exc)
            raise
        self._repo_cache[key] = (now + self.config.repo_cache_s, result)
        return result

    def _resolve(self, name: str, version: int | None = None):
        """repo.resolve, cached for `repo_cache_s` (NOT_FOUND answers too)."""
        return self._cached(("resolve", name, version), self._index.resolve, name, version)

    def _repo_changed(self) -> None:
        self._repo_cache.clear()

    # --- remote repositories and polling --------------------------------------------------------------
    def _io(self, fn: Callable, *args) -> asyncio.Future:
        """Run a blocking repository call (network, download) in the I/O pool."""
        if self._io_pool is None:
            self._io_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="tinyserve-repo")
        return self._loop.run_in_executor(self._io_pool, fn, *args)

    def _list_repo(self) -> dict:
        repo = self.repo
        return {name: repo.versions(name) for name in repo.models()}

    async def _refresh_listing(self) -> None:
        self._index.data = await self._io(self._list_repo)
        self._repo_changed()

    def _default_version(self, name: str, versions: list[int], failed: dict[int, str] | None = None) -> int:
        """THE version a load, a start-up model or a request naming no version goes to, in every
        model-control mode (docs/scheduler.md section 4.5): the newest of the repository's
        ``versions`` that the model's version policy selects (``--version-policy``; none given: every
        version), skipping those in ``failed`` (version -> why: its load failed, or the ejection
        policy took it out of service), so that a broken newest version leaves the newest one that
        loads serving.  NOT_FOUND when the model has no version (or the policy selects none of
        them); UNAVAILABLE naming each version and why when every selected version failed."""
        if not versions:
            raise errors.ModelNotFoundError(f"model {name!r} has no version in {self.config.repo}")
        policy = self.config.version_policies.get(name)
        chosen = policy.select(versions) if policy is not None else sorted(versions)
        if not chosen:
            raise errors.ModelNotFoundError(f"model {name!r}: its version policy {policy.to_obj()!r} selects none "
                                            f"of its versions {sorted(versions)}")
        failed = failed or {}
        for v in reversed(chosen):
            if v not in failed:
                return v
        raise wire.Unavailable(f"model {name!r}: no version loads: "
                               + "; ".join(f"version {v}: {failed[v]}" for v in reversed(chosen))
                               + " (load one again to retry)")

    def metadata_version(self, name: str) -> int | None:
        """The version `metadata` naming no version describes when none serves yet: the one a request
        naming no version would load (_default_version: the policy's newest that has not failed),
        else the newest (None: let the repository resolve it, NOT_FOUND for an unknown model)."""
        try:
            versions = list(self._cached(("versions", name), self._index.versions, name))
        except errors.TinyserveError:
            return None
        try:
            return self._default_version(name, versions, self._failed_loads(name))
        except errors.TinyserveError:  # no version selected, or every one failed: the newest
            return max(versions) if versions else None

    def _failed_loads(self, name: str) -> dict[int, str]:
        """version -> why, for the versions of ``name`` that failed to load (kept FAILED until unloaded
        or loaded again) or that the ejection policy took out of service: requests naming no version
        skip them (_default_version)."""
        out = {v: f"FAILED ({i.reason})" if i.reason else "FAILED"
               for (n, v), i in self._instances.items() if n == name and i.state == FAILED}
        with self._policy_lock:
            for k, st in self.policy.states():
                if isinstance(k, tuple) and k[0] == name and st.state == "FAILED" and (
                        k not in self._instances or self._instances[k].state is not READY):
                    # (an instance still UNLOADING after the policy failed it counts as failed too)
                    out[k[1]] = f"taken out of service: {st.reason}"
        return out

    async def _load_remote(self, name: str, version: int | None) -> ModelInstance:
        Repository.validate_name(name)
        try:
            if version is None:
                version = self._default_version(name, await self._io(self.repo.versions, name))
            inst = self._instances.get((name, version))
            if inst is None or inst.state not in (READY, LOADING):
                # the weights decode as they download (checksummed per chunk); a cold load returns a
                # view of the staging directory (docs/remote.md section 5) holding the config and the
                # program files, so the model starts before the cache file is written and committed
                path, weights = await self._io(self.repo.load_weights, name, version)
                view = True
                try:
                    # _placement_plan reads the weights file's index: wait for the deferred write
                    if self.placement is not None and not await self._io(self.repo.wait_written, name, version):
                        self.repo.release_view(name, version, path)  # it failed: no entry will exist; fetch again
                        view = False
                        path, weights = await self._io(self.repo.resolve, name, version), None
                    started = await self._start_when_room(name, version, path, weights)
                except BaseException:
                    if view:
                        self.repo.release_view(name, version, path)
                    raise
                if view:
                    task = self._loop.create_task(self._adopt_commit(name, version, started, path))
                    self._bg_tasks.add(task)
                    task.add_done_callback(self._bg_tasks.discard)
                try:
                    return await started
                except errors.ModelError:
                    if not view or await self._io(self.repo.wait_committed, name, version) is not None:
                        raise
                    # the cache commit failed and removed the staging directory the view showed while
                    # the model was reading it: fetch the version again, once
                    log.warning("tinyserve: %s version %s: the cache commit failed during the load; fetching "
                                "it again", name, version)
                    path = await self._io(self.repo.resolve, name, version)
                    return await (await self._start_when_room(name, version, path, None))
            return await inst.start()
        finally:
            if self._remote and not self._stopping:
                task = self._loop.create_task(self._refresh_quietly())
                self._bg_tasks.add(task)
                task.add_done_callback(self._bg_tasks.discard)

    async def _start_when_room(self, name: str, version: int, path, weights) -> asyncio.Future:
        """_start, waiting while the memory placement is blocked on busy models (they finish their
        work in flight in worker threads: retried every BLOCKED_RETRY_S, once their finished counts
        moved); SHUTTING_DOWN once the server stops."""
        seen = None
        while True:
            if self._stopping:
                raise wire.ShuttingDown(f"the server is stopping; model {name!r} version {version} was not loaded")
            progress = self._finished_sum()
            if progress != seen:
                seen = progress
                try:
                    return self._start(name, version, path, weights=weights)  # (joins a load begun meanwhile)
                except _Blocked:
                    pass
            await asyncio.sleep(BLOCKED_RETRY_S)

    def _finished_sum(self) -> tuple:
        """What a blocked plan depends on that changes without the loop hearing of it: the requests
        each instance's workers finished (and which instances exist)."""
        return tuple((k, i.finished, i.state) for k, i in self._instances.items())

    async def _adopt_commit(self, name: str, version: int, started: asyncio.Future, view) -> None:
        """Off the critical path of a remote load: once the version has loaded from the staging view,
        wait for the cache commit, point the instance at the committed entry (where `models` and a
        reader of `inst.path` find it; a reload after an eviction goes through _load_remote again,
        which fetches a version whose commit failed), then close the view."""
        try:
            try:
                await asyncio.shield(started)
            except BaseException:  # noqa: BLE001 - the load's own caller reports it
                pass
            committed = await self._io(self.repo.wait_committed, name, version)
            inst = self._instances.get((name, version))
            if inst is not None:  # never left on the view: its descriptor closes below
                inst.path = Path(committed) if committed is not None else \
                    self.repo.cache.entry_path(self.repo.space, name, version) / "data"
        finally:
            self.repo.release_view(name, version, view)  # closes its descriptor; does not block

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh_listing()
        except Exception as exc:  # the storage is down: the old listing stays; loaded models keep serving
            log.warning("tinyserve: listing the repository %s failed: %s", self.config.repo, exc)

    async def _poll_loop(self) -> None:
        """model_control=poll: follow the repository.  New versions the policy selects are loaded and
        warmed up (traffic moves to a version once it is READY); versions it no longer selects are
        then drained and unloaded, but never the last READY version of a model (a failed load of its
        successor leaves it serving)."""
        poller = self._poller
        while not self._stopping:
            await asyncio.sleep(poller.seconds_to_next())
            await self.poll_step()

    async def poll_step(self) -> None:
        """One poll of the repository and the loads/unloads it asks for (the start-up one runs before
        the server says it is ready, so a host in poll mode is ready once it serves what the
        repository selects: a balancer sends it nothing earlier)."""
        try:
            changes, listing = await self._io(self._poll_once)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("tinyserve: polling the repository failed: %s", exc)
            return
        if self._remote and listing is not None:
            self._index.data = listing
        self._repo_changed()
        if changes.error:
            log.warning("tinyserve: polling the repository: %s", changes.error)
        for name, versions in sorted(changes.load.items()):
            for v in sorted(versions):
                if self._stopping:
                    return
                try:
                    await self._load(name, v)
                except Exception as exc:  # logged as load_failed; the old versions keep serving
                    log.warning("tinyserve: poll: loading %s version %s failed: %s", name, v, exc)
        for name, versions in sorted(changes.unload.items()):
            keep = [i for (n, v), i in self._instances.items() if n == name and i.state == READY
                    and v not in versions]
            if not keep:
                log.warning("tinyserve: poll: %s: keeping versions %s (no newer version is ready)", name, versions)
                continue
            targets = [t for v in versions for t in self._unload_targets(name, v)]
            if targets:
                await asyncio.gather(*(t.unload() for t in targets), return_exceptions=True)

    def _poll_once(self):
        changes = self._poller.poll()
        return changes, (self._list_repo() if self._remote else None)

    def _load(self, name: str, version: int | None, fresh: bool = True) -> asyncio.Future:
        """A future resolving to the READY instance (ModelError / NOT_FOUND / UNAVAILABLE on failure).
        ``fresh``: look at the repository afresh (not for the retries of a blocked load)."""
        if fresh:
            self._repo_changed()
        if self._remote:
            return asyncio.ensure_future(self._load_remote(name, version))
        if version is None:  # the version policy's default (NOT_FOUND, or BAD_REQUEST for an invalid name)
            version = self._default_version(name, self.repo.versions(name))
        path = self.repo.resolve(name, version)
        return self._start(name, version, path)

    def _on_demand(self, name: str, version: int):
        """Placement mode: start loading (name, version) for a request (sharing a load under way);
        when room frees only once loads under way finish, the load waits for that (_retry_blocked)."""
        try:
            fut = self._load(name, version)
        except _Blocked:
            self._blocked.add((name, version))
            self._arm_blocked_retry()
            return _PARK
        fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())  # retrieved: parked requests report it
        return _PARK

    def _arm_blocked_retry(self) -> None:
        """Busy models finish their work in flight in worker threads, which tell the loop nothing: while
        a load is blocked on them, retry it every BLOCKED_RETRY_S (a plan costs microseconds)."""
        if self._blocked_timer is None and self._blocked and not self._stopping:
            self._blocked_timer = self._loop.call_later(BLOCKED_RETRY_S, self._blocked_retry_due)

    def _blocked_retry_due(self) -> None:
        self._blocked_timer = None
        if self._blocked and not self._stopping:
            progress = self._finished_sum()
            if progress != self._blocked_seen:  # a busy model finished something: plan again
                self._blocked_seen = progress
                self._retry_blocked()
        self._arm_blocked_retry()

    def _retry_blocked(self) -> None:
        """A load finished or an instance stopped: try the on-demand loads that were waiting for room."""
        if self._stopping:
            return
        for name, version in sorted(self._blocked):
            self._blocked.discard((name, version))
            try:
                fut = self._load(name, version, fresh=False)
            except _Blocked:
                self._blocked.add((name, version))
                continue
            except errors.TinyserveError as exc:
                self._fail_parked(name, version, exc)
                continue
            fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())

    def _fail_parked(self, name: str, version: int, exc: errors.TinyserveError) -> None:
        """Answer the requests parked for (name, version), and for name's default, with ``exc``."""
        for key in ((name, version), (name, None)):
            for conn, rid, h, _redo in self._parked.pop(key, ()):
                if conn.closed:
                    conn.discard(rid)
                else:
                    self.requests._fail(conn, rid, wire.wire_code(exc), str(exc), h)
        self.requests._flush()

    def _unpark(self, inst: ModelInstance, fut: asyncio.Future) -> None:
        """A load finished: the requests parked for it run now (or get its error)."""
        exc = None if fut.cancelled() else fut.exception()
        for key in [(inst.name, inst.version), (inst.name, None)]:
            parked = self._parked.pop(key, None)
            if not parked:
                continue
            for conn, rid, h, redo in parked:
                if conn.closed:
                    conn.discard(rid)
                elif exc is not None and key[1] is not None:
                    self.requests._fail(conn, rid, wire.wire_code(exc), str(exc), h)
                else:  # dispatch again: it routes to the READY version (or reports why not)
                    redo()
        self.requests._submit_pending()
        self.requests._flush()

    def _candidates(self, name: str, cfg) -> tuple[list[str], int | None]:
        """The devices a version may occupy and how many of them (None: all, a static placement):
        placement.devices (auto: every device in use), and one per worker up to that many."""
        place = cfg.placement if cfg is not None else None
        devs = place.devices if place is not None else ("auto",)
        if devs == ("auto",):
            cands = list(self._devices)
        else:
            missing = [d for d in devs if d not in self._devices]
            if missing:
                raise errors.ConfigError(f"model {name!r}: placement.devices names {', '.join(missing)}, which this "
                                         f"server does not use (--device: {', '.join(self._devices)})")
            cands = list(devs)
        if place is not None and place.mode == "static":
            return cands, None
        return cands, place.min_instances if place is not None else self.config.instances

    def _placement_plan(self, name: str, version: int, path, cfg) -> tuple[str, list, list]:
        """Reserve room for (name, version): returns its placement key, the instances to evict first
        and the devices it goes on (RESOURCE_EXHAUSTED when it cannot fit, UNAVAILABLE when room
        frees only later)."""
        pl = self.placement
        key = f"{name}:{version}"
        if not pl.registered(key):
            cands, count = self._candidates(name, cfg)
            decoded, mapped = _weights_bytes(path, cfg)
            place = cfg.placement
            pinned = ((name, None) in self.config.pinned or (name, version) in self.config.pinned
                      or (place is not None and (place.pinned or place.mode == "static")))
            max_batch = cfg.batching.max_batch_size if cfg.batching is not None else 1
            pl.register(key, Footprint(weight_bytes=decoded, mapped={str(path): mapped} if mapped else {}),
                        cands, pinned=pinned, max_batch=max_batch, count=count)
        now = _monotonic()
        self._sync_in_flight()
        plan = pl.request(key, now)  # ResourceExhausted
        if plan.action == "blocked":
            raise _Blocked(plan.reason)
        victims = []
        for victim in plan.evict:
            n, _, v = victim.rpartition(":")
            inst = self._instances.get((n, int(v)))
            if inst is not None and inst.state in (READY, LOADING):
                log_event("evict", model=n, version=int(v), reason=f"making room for {name}:{version}",
                          bytes=inst.decoded_bytes)
                inst.evicted = True
                victims.append(inst)
        for inst in victims:  # (the requests read this turn went to their instances in _sync_in_flight)
            inst.unload()
            self._update_route(inst.name)  # new requests for it wait for the eviction, then reload it
        self._batch_caps[key] = plan.max_batch
        return key, victims, plan.devices

    def _sync_in_flight(self) -> None:
        """Tell the placement each version's last use and work in flight (requests submitted and not
        yet finished by its workers: queued, batched or running), which is never evicted."""
        self.requests._submit_pending()  # the requests read this turn count as work in flight of their instance
        pl = self.placement
        for (n, v), i in self._instances.items():
            k = f"{n}:{v}"
            pl.touch(k, i.last_used)
            pl.set_in_flight(k, i.submitted - i.finished)

    def _start(self, name: str, version: int, path, weights: dict | None = None) -> asyncio.Future:
        key = (name, version)
        inst = self._instances.get(key)
        if inst is not None:
            if inst.state in (READY, LOADING):
                return inst.start()
            if inst.state == UNLOADING:
                raise wire.Unavailable(f"model {name!r} version {version} is unloading; load it again "
                                       "once the unload has finished")
        try:  # the config, read once here for the memory plan and the worker count
            cfg = load_config_dir(path)
        except (errors.TinyserveError, OSError):  # the worker's load reports it
            cfg = None
        if self.placement is not None and cfg is not None:
            pkey, victims, devices = self._placement_plan(name, version, path, cfg)
        else:  # no placement: the CPU only
            cands, count = self._candidates(name, cfg) if cfg is not None else ([self._device], 1)
            pkey, victims, devices = None, [], cands if count is None else cands[:count]
        place = cfg.placement if cfg is not None else None
        inst = ModelInstance(name, version, path, loop=self._loop, completions=self._completions,
                             finish=self.requests._finish, respond=self.requests._respond if self.config.direct_replies else None,
                             torch_threads=self.config.torch_threads, verify=self.config.verify,
                             device=devices[0], devices=devices, weights=weights,
                             workers=place.min_instances if place is not None else self.config.instances)
        inst.metrics = self.metrics.model(name, version)
        inst.loop_rec = inst.metrics.recorder()  # this (the loop's) thread's recorder
        inst.on_oom = self._oom
        inst.key = key
        inst.recording = self._statistics
        inst.inline_max_ns = self.config.inline_max_us * 1000
        inst.placement_key = pkey
        if pkey is not None:
            inst.max_batch_override = self._batch_caps.get(pkey) or None  # the workspace fits the budget
        self._instances[key] = inst
        with self._policy_lock:  # loading a version (again) clears what the policy held against it
            self.policy.reset(key)
            self.policy.pin(key, (name, None) in self.config.pinned or key in self.config.pinned)
        if victims:  # their memory is returned (workers ended) before this load takes its own
            async def start_after(victims=victims, inst=inst):
                await asyncio.gather(*(v.stopped for v in victims), return_exceptions=True)
                return await inst.start()

            fut = asyncio.ensure_future(start_after())
        else:
            fut = inst.start()
        fut.add_done_callback(lambda f, inst=inst: self._loaded(inst, f))
        inst.stopped.add_done_callback(lambda f, inst=inst: self._unloaded(inst))
        return fut

    def _oom(self, inst: ModelInstance) -> bool:
        """From a worker whose model ran out of memory: evict the other idle versions (memory placement
        only; never pinned ones, never one with requests queued or running), wait until their workers
        have ended, and say whether anything was freed.  The worker then retries once."""
        if self.placement is None or self._loop is None:
            return False
        fut = asyncio.run_coroutine_threadsafe(self._shed_for_oom(inst), self._loop)
        return fut.result(60)

    async def _shed_for_oom(self, inst: ModelInstance) -> bool:
        victims = []
        models = self.placement.to_dict()["models"]
        for key, other in list(self._instances.items()):
            pkey = other.placement_key
            m = models.get(pkey, {}) if pkey is not None else {}
            if (other is inst or other.state is not READY or pkey is None
                    or other.submitted != other.finished or m.get("pinned")  # queued, running, pinned: left alone
                    or not set(other.devices) & set(inst.devices)):  # frees nothing where inst runs
                continue
            victims.append(other)
        victims.sort(key=lambda i: i.last_used)
        if not victims:
            return False
        self.requests._submit_pending()
        for other in victims:
            log_event("evict", model=other.name, version=other.version,
                      reason=f"model {inst.name!r} version {inst.version} ran out of memory", bytes=other.decoded_bytes)
            other.evicted = True
            self.placement.set_in_flight(other.placement_key, 0)  # idle (checked above with live counters)
            self.placement.unload(other.placement_key)
            other.unload()
            self._update_route(other.name)
        await asyncio.gather(*(o.stopped for o in victims), return_exceptions=True)
        return True

    def _scale(self, now: float) -> None:
        """Elastic models (placement.mode elastic): one worker more while the queue stays deep, one
        fewer after an idle spell (memory.ElasticController; the tick calls this each second)."""
        for key, ctl in list(self._elastic.items()):
            inst = self._instances.get(key)
            if inst is None or inst.state is not READY:
                continue
            d = ctl.decide(now, max(0, inst.submitted - inst.taken), inst.workers)
            if d > 0 and inst.add_worker():
                log_event("scale_up", model=key[0], version=key[1], instances=inst.workers)
            elif d < 0 and inst.remove_worker():
                log_event("scale_down", model=key[0], version=key[1], instances=inst.workers - 1)

    def _loaded(self, inst: ModelInstance, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        place = inst.config.placement if exc is None and inst.config is not None else None
        if place is not None and place.mode == "elastic":
            self._elastic[inst.key] = ElasticController.from_config(place)
        pkey = inst.placement_key
        if pkey is not None:
            if exc is None:
                # decoded bytes and workspace measured (the largest copy's workspace); the raw tensors
                # as estimated from the index: page cache on the CPU, device memory on a GPU
                self.placement.measured(pkey, Footprint(weight_bytes=inst.decoded_bytes,
                                                        workspace={1: inst.workspace_bytes},
                                                        mapped=self.placement.footprint(pkey).mapped))
                if self.placement.state(pkey) == "loading":
                    self.placement.loaded(pkey, _monotonic())
                # the measured footprint may exceed the estimate the load was planned with
                self._sync_in_flight()
                for victim in [v for d in self.placement.devices_of(pkey) for v in self.placement.shed(d, keep=pkey)]:
                    n, _, v = victim.rpartition(":")
                    other = self._instances.get((n, int(v)))
                    if other is not None and other.state in (READY, LOADING):
                        log_event("evict", model=n, version=int(v), reason="the budget after a measured footprint",
                                  bytes=other.decoded_bytes)
                        other.evicted = True
                        self.requests._submit_pending()
                        other.unload()
                        self._update_route(other.name)
            else:
                self.placement.load_failed(pkey)
        ms = inst.metrics
        ms.record_load(inst.load_s, ok=exc is None)
        if exc is None:
            ms.set_resident(inst.nbytes)
            log_event("load", model=inst.name, version=inst.version, seconds=round(inst.load_s, 6),
                      bytes=inst.nbytes, device=inst.device, devices=inst.devices)
        else:
            log_event("load_failed", model=inst.name, version=inst.version, reason=str(exc))
        self._update_route(inst.name)
        if self._parked:
            self._unpark(inst, fut)
        if self._blocked:
            self._retry_blocked()

    def _unloaded(self, inst: ModelInstance, force: bool = False) -> None:
        """The instance's worker ended: forget it (a FAILED one stays listed, with its reason, until
        it is unloaded or loaded again)."""
        key = (inst.name, inst.version)
        if self._instances.get(key) is inst and (inst.state != FAILED or force):
            del self._instances[key]
        if inst.metrics is not None:
            inst.metrics.set_resident(0)
        pkey = inst.placement_key
        if pkey is not None and self.placement.state(pkey) == "resident":
            self.placement.set_in_flight(pkey, 0)  # stopped: nothing in flight (the last plan's count is stale)
            self.placement.unload(pkey)  # an explicit unload (an eviction released it when planned)
        if self._blocked and not self._stopping:
            self._retry_blocked()
        if self._remote and hasattr(self.repo, "release") and not self._stopping:
            self._io(self.repo.release, inst.name, inst.version)
        if inst.state == UNLOADED:
            log_event("unload", model=inst.name, version=inst.version)
        if self._instances.get(inst.key) is None:
            self._elastic.pop(inst.key, None)
        if self._parked and inst.evicted and not self._stopping:
            # requests that arrived while it was being evicted: dispatched again, they load it anew
            done = self._loop.create_future()
            done.set_result(None)
            self._unpark(inst, done)
        self._update_route(inst.name)

    def _update_route(self, name: str) -> None:
        """Requests naming no version go to the newest READY version the version policy selects
        (of the READY ones; none of them selected: the newest READY one, which an operator loaded)."""
        ready = {v: inst for (n, v), inst in self._instances.items() if n == name and inst.state == READY}
        if not ready:
            self._routes.pop(name, None)
            return
        policy = self.config.version_policies.get(name)
        chosen = policy.select(ready) if policy is not None else ()
        self._routes[name] = ready[max(chosen or ready)]

    def _unload_targets(self, name: str, version: int | None) -> list[ModelInstance]:
        # requests already read and routed go to their instance first (an unloading instance still
        # runs what is queued): the hand-off to the workers is deferred to the end of the loop turn
        self.requests._submit_pending()
        self._repo_changed()
        targets = [inst for (n, v), inst in self._instances.items()
                   if n == name and (version is None or v == version) and inst.state != UNLOADED]
        for inst in targets:
            inst.unload()
            if inst.state == FAILED:
                self._unloaded(inst, force=True)
        self._update_route(name)
        return targets

    # --- the ejection policy and device faults ---------------------------------------------------------
    def _transition(self, t) -> None:
        """On the loop: the ejection policy changed a model version's state."""
        name, version = t.key
        log_event(t.kind, model=name, version=version, state=t.state, reason=t.reason, until=t.until,
                  ejections=t.ejections)
        if t.kind == "fail":  # unloaded until an operator loads it again (an older READY version serves)
            inst = self._instances.get(t.key)
            if inst is not None and inst.state == READY:
                inst.reason = f"failed by the ejection policy: {t.reason}"
                self._unload_targets(name, version)

    def _device_reading(self, readings: tuple) -> None:
        """From the device monitor's thread: hand the readings to the loop."""
        loop = self._loop
        if loop is not None and any(not r.healthy for r in readings):
            try:
                loop.call_soon_threadsafe(self._devices_changed, readings)
            except RuntimeError:
                pass

    def _devices_changed(self, readings: tuple) -> None:
        """On the loop: a device is not healthy: its models stop being scheduled (marked failed)."""
        bad = {r.device: r.reason for r in readings if not r.healthy}
        now = self.clock()
        for key, inst in list(self._instances.items()):
            if inst.state != READY:
                continue
            live = [(d["device"], memory.health_name(d["device"])) for d in inst.device_stats() if d["state"] == "SERVING"]
            hit = [(d, h) for d, h in live if h in bad]
            if not hit:
                continue
            if len(hit) < len(live):  # a version on several devices: the others keep serving
                refused = []
                for d, h in hit:
                    if inst.stop_device(d, f"device {h}: {bad[h]}"):
                        log_event("device_fault", device=h, model=inst.name, version=inst.version, reason=bad[h],
                                  action="stopped the workers of that device; the others serve")
                        if inst.placement_key is not None:
                            self.placement.drop_device(inst.placement_key, d)
                    else:  # no other copy with workers would be left: the whole version fails
                        refused.append((d, h))
                if not refused:
                    continue
                hit = refused
            dev = hit[0][1]
            reason = bad[dev]
            with self._policy_lock:
                already = self.policy.state(key) == "FAILED"
                t = None if already else self.policy.mark_failed(key, f"device {dev}: {reason}", now)
            if t is not None:
                log_event("device_fault", device=dev, model=inst.name, version=inst.version, reason=reason)
                self._transition(t)

    # --- reports (the TCP front end's models / health / stats ops, through the core) --------------------
    def _failed_versions(self) -> dict:
        """(name, version) -> reason of the versions the ejection policy failed and unloaded: reported
        as FAILED until an operator loads them again (an older READY version serves meanwhile)."""
        return {key: st.reason for key, st in self.policy.states()
                if st.state == "FAILED" and key not in self._instances and isinstance(key, tuple)}

    def models_report(self) -> list:
        """The `models` op's list (docs/protocol.md): every repository model and loaded version."""
        names = set(self._cached(("models",), self._index.models)) | {n for n, _ in self._instances}
        with self._policy_lock:
            failed = self._failed_versions()
        out = []
        for name in sorted(names):
            loaded = [self._loaded_entry(v, inst) for (n, v), inst in sorted(self._instances.items()) if n == name]
            loaded += [{"version": v, "state": FAILED, "reason": reason, "bytes": 0, "instances": 0}
                       for (n, v), reason in sorted(failed.items()) if n == name]
            loaded.sort(key=lambda e: e["version"])
            try:
                versions = self._cached(("versions", name), self._index.versions, name)
            except errors.ModelNotFoundError:  # loaded, then removed from the repository
                versions = []
            out.append({"name": name, "versions": versions,
                        "loaded": loaded})
        return out

    def _loaded_entry(self, version: int, inst: ModelInstance) -> dict:
        out = {"version": version, "state": inst.state, "bytes": inst.nbytes, "instances": inst.workers}
        if inst.placement_key is not None:  # memory placement: what it holds against the budget
            m = self.placement.to_dict()["models"].get(inst.placement_key, {})
            out.update(device=m.get("device", "cpu"), reserved=m.get("reserved", 0), loads=m.get("loads", 0),
                       evictions=m.get("evictions", 0), max_batch=m.get("max_batch", 0),
                       reserved_by_device=m.get("reserved_by_device", {}))
        if inst.placement_key is not None or len(inst.devices) > 1:
            out.update(devices=list(inst.devices), per_device=inst.device_stats())
        return out

    def _add_devices(self, models: dict) -> None:
        """stats: each loaded version on several devices, or under placement, gets `per_device`."""
        for (n, v), inst in list(self._instances.items()):
            if inst.placement_key is None and len(inst.devices) < 2:
                continue
            for entry in models.get(n, {}).get("versions", ()):
                if entry.get("version") == v:
                    entry["per_device"] = inst.device_stats()

    def metadata_config(self, name: str, version: int | None):
        """(version, config) that `metadata` describes; config None: a remote repository's version
        that is not loaded, whose config must be read from storage (read_config)."""
        inst = self._routes.get(name) if version is None else self._instances.get((name, version))
        if inst is not None and inst.config is not None:
            return inst.version, inst.config
        path = self._resolve(name, version if version is not None else self.metadata_version(name))
        version = int(path.name)
        if self._remote:
            return version, None
        return version, self._cached(("config", name, version), self.repo.read_config, name, version)

    def read_config(self, name: str, version: int) -> asyncio.Future:
        """A version's config read from storage off the loop."""
        return self._io(self.repo.read_config, name, version)

    def health_dict(self, repository: bool = False) -> dict:
        """The health report; `repository`: its `models` also lists the repository's models that have
        no loaded or failed version (state UNLOADED, `version` the newest in the repository listing)."""
        report = self.health_report().to_dict()
        if not repository:
            return report
        models = report["models"]
        try:
            names = self._cached(("models",), self._index.models)
        except errors.TinyserveError:  # an unreachable repository: the loaded models are still reported
            names = ()
        for name in names:
            if name not in models:
                try:
                    versions = self._cached(("versions", name), self._index.versions, name)
                except errors.TinyserveError:
                    versions = []
                models[name] = {"state": UNLOADED, "reason": "not loaded", "version": max(versions, default=None),
                                "device": None, "serving": False, "versions": []}
        if len(models) > 1:
            report["models"] = dict(sorted(models.items()))
        return report

    def stats_report(self, name: str | None = None) -> dict:
        """The `stats` op's reply (docs/health.md section 2) less the front ends' own figures: server-wide
        figures at the top level (every model plus what no model counts: other ops, protocol errors,
        requests for unknown models); per model version under `models`.  Workers record while this
        reads: a request may be missing from one snapshot, never counted twice."""
        if name is not None:
            one = self.metrics.model_dict(name)
            if one is None:
                self._resolve(name)  # NOT_FOUND for a model the server never heard of
                one = {"requests": 0, "errors": {}, "latency_us": Histogram().percentiles()}
            reply = dict(one)
            reply["models"] = {name: one}
            self._add_devices(reply["models"])
            return reply  # that model's fields only: no server-wide ones
        models = self.metrics.to_dict()["models"]
        self._add_devices(models)
        st = self.requests.stats
        errs = dict(st.errors)
        requests = st.requests
        for m in models.values():
            requests += m["requests"]
            for code, n in m["errors"].items():
                errs[code] = errs.get(code, 0) + n
        total = None
        for ms in self.metrics.models():
            snap = ms.snapshot()
            total = snap.total if total is None else total.merge(snap.total)
        reply = {"requests": requests, "errors": dict(sorted(errs.items())),
                 "latency_us": total.percentiles() if total is not None else Histogram().percentiles(),
                 "models": models}
        if self.placement is not None:
            reply["placement"] = self.placement.to_dict()
        counters = self._resume_counters()
        if counters is not None:
            reply["storage"] = counters()  # the remote repository's resumed reads
        reply["uptime_s"] = round(time.time() - self.started_at, 3)
        return reply

    def start_unload(self, name: str, version: int | None):
        """Begin unloading one version or (None) every loaded one: (versions, a future resolving once
        they stopped, or None when nothing was loaded).  NOT_FOUND for an unknown model or version."""
        self.requests._submit_pending()  # requests read before this unload still go to the model
        targets = self._unload_targets(name, version)
        if not targets:
            self._resolve(name, version)  # NOT_FOUND for an unknown model or version
            return [], None
        versions = sorted(inst.version for inst in targets)
        return versions, asyncio.gather(*(inst.unload() for inst in targets), return_exceptions=True)
