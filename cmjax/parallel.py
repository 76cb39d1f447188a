"""Devices, meshes and shardings: one place for how cmjax spreads work over accelerators and hosts.

cmjax uses ``jax.jit`` over a ``Mesh`` with ``NamedSharding`` (the current form of what ``pmap``
did). The default mesh is 1-D over every device of every host, axis ``"data"``: batches are split
along it, params are replicated (or, for training with FSDP, split along it too).
"""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

T = TypeVar("T")

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Start multi-host JAX if this is a multi-host run; a no-op for a single process.

    With explicit arguments they are used as given (e.g. two CPU processes on 127.0.0.1). Without,
    ``jax.distributed.initialize()`` auto-detects TPU pods, SLURM and similar clusters; on a plain
    single machine (no cluster environment found) nothing happens.
    """
    if jax.distributed.is_initialized():
        return
    if coordinator_address is not None or num_processes is not None:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return
    if _in_cluster_environment():
        jax.distributed.initialize()


def _in_cluster_environment() -> bool:
    markers = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")
    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return multi_slurm or any(m in os.environ for m in markers[1:])


def make_mesh(devices: Any = None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (axis,))


def data_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
    """Split the leading (batch) axis over ``axis``; the rest replicated."""
    return NamedSharding(mesh, P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (params at decode time)."""
    return NamedSharding(mesh, P())


def shapes_with(tree: Any, sharding: Any) -> Any:
    """``tree``'s leaves as ``jax.ShapeDtypeStruct``s laid out with ``sharding`` (None: no layout):
    what to compile for, or restore into, without allocating."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree (e.g. params) fully replicated on ``mesh``; works on every host."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda idx: np.asarray(x)[idx]), tree)


def global_batch(local: np.ndarray, mesh: Mesh, axis: str = DATA_AXIS) -> jax.Array:
    """This host's rows of a batch -> the global batch ``jax.Array`` split over ``axis``.

    Every host passes its own equal-sized share, in process order.
    """
    return jax.make_array_from_process_local_data(data_sharding(mesh, axis), local)


def local_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a data-sharded global array, in order, as NumPy."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows, axis=0)


def process_rows(mesh: Mesh, num_rows: int, axis: str = DATA_AXIS) -> np.ndarray:
    """Indices of the rows of a (num_rows, ...) array split over ``axis`` that this process holds.

    In the order ``global_batch`` takes them: this host's share of a global batch is
    ``batch[process_rows(mesh, len(batch))]``. ``num_rows`` must divide evenly over the axis.
    """
    if num_rows % mesh.shape[axis]:
        raise ValueError(f"{num_rows} rows do not split evenly over {mesh.shape[axis]} devices")
    index_map = data_sharding(mesh, axis).addressable_devices_indices_map((num_rows,))
    spans = sorted({(s[0].start or 0, num_rows if s[0].stop is None else s[0].stop) for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in spans])


def lead_first(fetch: Callable[[bool], T]) -> T:
    """``fetch(lead)`` on process 0 first, then on the others, which then find its download or
    conversion in the shared cache instead of racing it; the plain call on a single host.
    ``lead`` is True on process 0 (e.g. to show a progress bar there only)."""
    lead = jax.process_index() == 0
    if jax.process_count() > 1:
        if lead:
            fetch(True)
        multihost_utils.sync_global_devices("cmjax lead_first")
    return fetch(lead)
