"""Scale-out: the population sharded over every device of every process, bit-identical to one device.

JAX's own machinery only: a 1-D :class:`jax.sharding.Mesh` over all devices
(axis ``"pop"``), :func:`jax.shard_map` around ``eggroll.population_votes``,
and :func:`jax.distributed.initialize` for several processes (hosts).

Per step, device ``i`` of ``D`` holds

* the weights, replicated;
* members ``[i N/D, (i+1) N/D)`` of the population: their recurrent states
  (``states`` (L, N, D) sharded on axis 1) and the rows they read (``tokens``
  (N/g, T+1) sharded on axis 0);

and computes their votes with ``pair_offset = i * N/(2D)``. The noise is a
function of the global pair id only, so every member sees exactly the
perturbation it sees on one device. Only integers cross devices: the exact
vote partial sums (``psum``) and the N int32 scores (gathered by a ``psum`` of
disjoint slices, for logging). The update is then computed replicated, identically everywhere.

Exactness of the vote sum. Each device returns its sum as ``(hi, lo)`` with
``Z_i = hi_i * 2^20 + lo_i`` and ``0 <= lo_i < 2^20`` (``eggroll.accumulate``).
``psum`` adds the ``hi`` and the ``lo`` separately: ``sum lo_i < D * 2^20``,
which fits int32 for ``D <= 2047`` devices (:data:`MAX_DEVICES`, checked), and
the pair is renormalised to ``lo in [0, 2^20)``. That representation of
``Z = sum Z_i`` is unique, so the result is bit-identical to the one-device
``(hi, lo)`` whatever the number of devices (and chunks) it was summed over.

Processes. :func:`initialize` joins a multi-process run from ``dist.*`` config
keys, else from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, else from SLURM (``srun`` with more than one task: JAX
detects the coordinator, process count and id itself). Each process reads
only the rows of its own devices (``BatchStream(row_range=...)``) and builds
the global arrays with ``jax.make_array_from_process_local_data``. Logging,
TensorBoard, metadata and history files come from process 0 only. Checkpoints
are written once: every process gathers the (small, int8) state to the host
and joins orbax's collective save, in which only process 0 writes the arrays
(orbax's primary host); other processes use a follower,
``Checkpointer(..., writes_files=False)``, which writes no files of its own.
The run directory must be on a filesystem all processes share. Every process
restores the full checkpoint and keeps its own share; a checkpoint from N
processes restores on one and vice versa.

With one device in total nothing here is used: the trainer keeps its plain
``jax.jit`` path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from int_lm import checkpoint, eggroll
from int_lm.errors import UserError

AXIS = "pop"
# sum of D low parts, each < 2^CARRY_BITS, must stay below 2^31
MAX_DEVICES = (2 ** 31 - 1) >> eggroll.CARRY_BITS


class DistributedError(UserError):
    """A multi-device or multi-process set-up that cannot work; the message says what to change."""


# ---------------------------------------------------------------------------
# Joining a multi-process run
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """How to call ``jax.distributed.initialize``; ``source`` says where the values came from."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str             # "config", "env" or "slurm" (JAX detects the values itself)


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedError(f"{name}={environ[name]!r} is not an integer") from None


def process_settings(dist, environ: Mapping[str, str] | None = None) -> ProcessSettings | None:
    """Multi-process settings from ``dist.*`` keys, else JAX_* variables, else SLURM; None: one process.

    ``dist`` counts as set when ``dist.coordinator_address`` is given or
    ``dist.num_processes > 1``; it then wins over the environment.
    """
    environ = os.environ if environ is None else environ
    if dist.coordinator_address or dist.num_processes > 1:
        if not dist.coordinator_address:
            raise DistributedError(f"dist.num_processes={dist.num_processes} needs dist.coordinator_address "
                                   f"(HOST:PORT of process 0, reachable from every process)")
        if dist.num_processes < 2:
            return None          # an address alone with one process: nothing to join
        if not 0 <= dist.process_id < dist.num_processes:
            raise DistributedError(f"dist.process_id must be in [0, {dist.num_processes}), got {dist.process_id}")
        return ProcessSettings(dist.coordinator_address, dist.num_processes, dist.process_id, "config")
    if "JAX_NUM_PROCESSES" in environ:
        n = _int_env(environ, "JAX_NUM_PROCESSES")
        if n > 1:
            missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if not environ.get(k)]
            if missing:
                raise DistributedError(f"JAX_NUM_PROCESSES={n} needs {' and '.join(missing)} as well")
            pid = _int_env(environ, "JAX_PROCESS_ID")
            if not 0 <= pid < n:
                raise DistributedError(f"JAX_PROCESS_ID must be in [0, {n}), got {pid}")
            return ProcessSettings(environ["JAX_COORDINATOR_ADDRESS"], n, pid, "env")
        return None
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in environ for k in slurm) and _int_env(environ, "SLURM_NTASKS") > 1:
        return ProcessSettings(None, None, None, "slurm")
    return None


def initialize(dist, environ: Mapping[str, str] | None = None, log=print) -> bool:
    """Join a multi-process run if one is configured (see :func:`process_settings`); idempotent.

    Must run before anything initialises a JAX backend. Returns True when this
    process is part of a multi-process run.
    """
    settings = process_settings(dist, environ)
    if settings is None:
        return jax.process_count() > 1 if jax.distributed.is_initialized() else False
    if jax.distributed.is_initialized():
        return True
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise DistributedError("a multi-process run must be joined before JAX starts: call "
                               "int_lm.distributed.initialize (or train) before any other JAX call")
    # CPU devices talk through gloo (no-op for GPUs/TPUs, which have their own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id)
    except Exception as err:  # bad address, unreachable coordinator, timeout
        where = settings.coordinator_address or "the SLURM-derived coordinator"
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise DistributedError(f"could not join the multi-process run at {where} ({type(err).__name__}: "
                               f"{first}); check that every process got the same coordinator address and "
                               f"process count, and distinct process ids") from None
    return True


def is_main() -> bool:
    """Process 0 logs, writes TensorBoard, metadata and history."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------
# The population over a mesh
# ---------------------------------------------------------------------------

def combine_votes(acc: dict, axis_name: str = AXIS) -> dict:
    """Exact sum over ``axis_name`` of per-device ``(hi, lo)`` votes, renormalised to lo in [0, 2^20)."""
    mask = (1 << eggroll.CARRY_BITS) - 1
    out = {}
    for path, (hi, lo) in acc.items():
        hi, lo = lax.psum(hi, axis_name), lax.psum(lo, axis_name)   # sum lo < D * 2^20 < 2^31
        out[path] = (hi + (lo >> eggroll.CARRY_BITS), lo & mask)
    return out


def check_split(population: int, group_size: int, chunk_size: int, devices: int) -> int:
    """Members per device; raise naming the keys if the population does not split evenly."""
    if devices > MAX_DEVICES:
        raise DistributedError(f"{devices} devices: the exact int32 vote sum supports at most {MAX_DEVICES}")
    unit = max(2, group_size)
    if population % (devices * unit):
        good = devices * unit
        raise DistributedError(
            f"es.population={population} does not split over {devices} devices in whole antithetic pairs and "
            f"groups of es.group_size={group_size}; use a multiple of {good} (e.g. "
            f"{max(good, (population // good) * good)} or {(population // good + 1) * good})")
    local = population // devices
    if chunk_size and chunk_size < local and local % chunk_size:
        raise DistributedError(f"es.chunk_size={chunk_size} does not divide the {local} members per device "
                               f"({population} over {devices} devices); use a divisor of {local} or 0")
    return local


@dataclasses.dataclass
class Layout:
    """Where the population lives: the mesh, this process's rows, and how to place arrays.

    ``mesh`` is None with a single device: then every method is the identity
    and :meth:`votes_fn` is the trainer's plain jitted ``population_votes``.
    """
    spec: eggroll.EggrollSpec
    mesh: Mesh | None
    rows: int                       # rows of the whole batch (population / group_size)
    row_range: tuple[int, int]      # this process's rows [lo, hi)

    @classmethod
    def create(cls, spec: eggroll.EggrollSpec, devices=None) -> "Layout":
        devices = list(jax.devices() if devices is None else devices)
        rows = spec.population // spec.group_size
        if len(devices) == 1:
            return cls(spec, None, rows, (0, rows))
        # Each process's devices form one contiguous block, in process order, so
        # its rows are contiguous and gathers in process order are in row order.
        devices.sort(key=lambda d: (d.process_index, d.id))
        local = check_split(spec.population, spec.group_size, spec.chunk_size, len(devices))
        mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
        per_dev = local // spec.group_size
        return cls(spec, Mesh(np.array(devices), (AXIS,)), rows, (mine[0] * per_dev, (mine[-1] + 1) * per_dev))

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def multiprocess(self) -> bool:
        return jax.process_count() > 1

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # -- placement -----------------------------------------------------------
    def put_params(self, params):
        """Host or device params -> replicated on every device."""
        if self.mesh is None:
            return jax.tree_util.tree_map(jnp.asarray, params)
        rep = self._sharding(P())
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_callback(np.shape(a), rep, lambda idx, a=np.asarray(a): a[idx]), params)

    def put_states(self, states):
        """The full (L, N, D) states (host, same on every process) -> sharded on the member axis."""
        if self.mesh is None:
            return jnp.asarray(states)
        a = np.asarray(states)
        return jax.make_array_from_callback(a.shape, self._sharding(P(None, AXIS, None)), lambda idx: a[idx])

    def put_tokens(self, tokens_local: np.ndarray):
        """This process's rows (row_range) -> the global (rows, T+1) batch, sharded on rows."""
        if self.mesh is None:
            return jnp.asarray(tokens_local)
        shape = (self.rows,) + tokens_local.shape[1:]
        return jax.make_array_from_process_local_data(self._sharding(P(AXIS, None)), tokens_local, shape)

    def all_rows(self, tokens_local: np.ndarray) -> np.ndarray:
        """Every process's rows, in row order, on every process (host; for metrics)."""
        if not self.multiprocess:
            return tokens_local
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(tokens_local, tiled=True))

    def to_host(self, x) -> np.ndarray:
        """A full host copy of a (possibly sharded, multi-process) array; collective across processes."""
        if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def place(self, state):
        """The train state with params and optimiser state replicated, member states sharded over the mesh."""
        if self.mesh is None:
            return state
        return dataclasses.replace(state, params=self.put_params(state.params),
                                   states=self.put_states(state.states),
                                   opt_state=self.put_params(state.opt_state))

    def local(self, tree):
        """Replicated arrays -> this process's first copy (single-device arrays: local work, no collectives)."""
        if self.mesh is None:
            return tree
        return jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)

    def agree_stop(self, stop: bool) -> bool:
        """Stop when any process was asked to (Ctrl-C), so all leave the loop after the same step."""
        if not self.multiprocess:
            return stop
        from jax.experimental import multihost_utils
        return bool(np.asarray(multihost_utils.process_allgather(np.int32(stop))).any())

    def host_state(self, state):
        """The train state with host copies of its arrays (for checkpoints), on every process."""
        if not self.multiprocess:
            return state
        return dataclasses.replace(state, params=jax.tree_util.tree_map(self.to_host, state.params),
                                   states=self.to_host(state.states),
                                   opt_state=jax.tree_util.tree_map(self.to_host, state.opt_state))

    # -- the step --------------------------------------------------------------
    def votes_fn(self):
        """jit of (params, states, tokens, seed, epoch) -> (votes, scores, states); states donated.

        Votes and scores come back replicated on every device, states sharded.
        """
        spec = self.spec
        if self.mesh is None:
            return jax.jit(lambda p, s, t, seed, epoch: eggroll.population_votes(spec, p, s, t, seed, epoch),
                           donate_argnums=(1,))

        def local(params, states, tokens, seed, epoch):
            members = states.shape[1]
            first = lax.axis_index(AXIS) * members

            def gather(scores):
                """Every device's scores in place, on every device (a psum of disjoint int32 slices: exact)."""
                placed = lax.dynamic_update_slice(jnp.zeros((spec.population,), scores.dtype), scores, (first,))
                return lax.psum(placed, AXIS)

            acc, scores, states = eggroll.population_votes(spec, params, states, tokens, seed, epoch,
                                                           pair_offset=first // 2, gather_scores=gather)
            return combine_votes(acc), gather(scores), states

        # check_vma=False: population_votes' chunk loop starts from device-invariant zeros and is not
        # written for shard_map's varying-value types; the psum'd outputs are replicated by construction.
        sharded = jax.shard_map(local, mesh=self.mesh,
                                in_specs=(P(), P(None, AXIS, None), P(AXIS, None), P(), P()),
                                out_specs=(P(), P(), P(None, AXIS, None)), check_vma=False)
        return jax.jit(sharded, donate_argnums=(1,))

    def describe(self) -> str:
        if self.mesh is None:
            return "1 device"
        local = self.spec.population // self.devices
        return (f"{self.devices} devices over {jax.process_count()} process(es), {local} members per device; "
                f"this process: rows {self.row_range[0]}..{self.row_range[1] - 1}")


# ---------------------------------------------------------------------------
# Checkpoints and resume from several processes
# ---------------------------------------------------------------------------

def checkpointer(run_dir, keep: int, *, resume_step=None, log=print):
    """The checkpointer for this process: the writer on process 0, a follower (no files of its own) elsewhere."""
    return checkpoint.Checkpointer(run_dir, keep, resume_step=resume_step, log=log, writes_files=is_main())


def resume(plan, run_dir, tokenizer, corpus, log=print):
    """Every process restores the checkpoint; only process 0 moves newer ones aside and logs the resume."""
    if is_main():
        restored = checkpoint.resume(plan, run_dir, tokenizer, corpus, log=log)
    else:
        restored = checkpoint.restore(run_dir, plan.step)
        checkpoint.check_compatible(restored.metadata, tokenizer, corpus, f"checkpoint step {plan.step} in {run_dir}")
    barrier("int_lm-resume")
    return restored

