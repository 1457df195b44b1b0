"""One process per MPI rank: who it is, which random streams it draws from, which device and how many threads.

A script launched with ``mpiexec -n N python script.py`` (or ``srun``) runs once per rank. openmmtools'
multistate samplers split their replicas over the ranks through ``mpiplus``; :func:`get_comm` returns the
same communicator (``None`` without a launcher, so every script also runs as one plain process).

:func:`configure_rank`, called once at the top of such a script on every rank, sets up the process:

* **Threads.** N ranks on N cores oversubscribe unless each rank keeps to its share: every library sizes
  its pool to the whole machine (OpenMM's CPU platform, torch, OpenBLAS/MKL). The share is the cores this
  rank may run on (``os.sched_getaffinity``) if the launcher bound each rank to its own cores, otherwise the
  node's cores divided by the ranks on the node. It goes to OpenMM's CPU ``Threads`` default (so every
  Context created afterwards, also by openmmtools' ContextCache, uses it), ``torch.set_num_threads`` and
  BLAS through threadpoolctl.
* **Devices.** Where GPUs are present (OpenMM's CUDA or OpenCL platform), rank ``local_rank`` uses GPU
  ``local_rank % n_gpus``: OpenMM's ``DeviceIndex`` default and the torch device ``cuda:<index>``. Under
  Slurm with ``--gpus-per-task=1`` each rank sees one GPU, index 0, and the rule gives the same answer.
* **Seeds.** One user seed gives every rank (and every walker) its own stream through
  ``numpy.random.SeedSequence.spawn``: streams are independent, reproducible and do not depend on how
  many ranks share the work. A seed of ``None`` is drawn once on rank 0 and broadcast, so the ranks still
  agree on it and it can be recorded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field

import mpiplus
import numpy as np
import openmm
import threadpoolctl

from ..checks import positive_int
from ..errors import ConfSampleError

#: Environment variables through which MPI launchers tell each process how many ranks it has (not
#: SLURM_NTASKS: a batch script that runs python without srun is one process in an N-task allocation).
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_GPU_PLATFORMS = ("CUDA", "OpenCL")
_CONFIG = None  # this process's RankConfig, once configure_rank has run


def get_comm():
    """The MPI communicator when launched by mpiexec/srun (the one openmmtools uses), else None.

    Refuses, in one sentence, a launch with several ranks where mpi4py is missing: every rank would run
    the whole job alone and they would overwrite each other's files.
    """
    comm = mpiplus.get_mpicomm()  # imports mpi4py (and so starts MPI) only under a launcher
    if comm is None:
        launched = [name for name in LAUNCHER_SIZE_VARIABLES if os.environ.get(name, "").isdigit()
                    and int(os.environ[name]) > 1]
        if launched:
            raise ConfSampleError(
                f"this process was started by an MPI launcher ({launched[0]}={os.environ[launched[0]]}) but "
                "mpi4py is not importable; install the extra (pip install 'openmm-confsample[mpi]')."
            )
    return comm


def rank_and_size(comm=None) -> tuple[int, int]:
    """(rank, number of ranks) of this process; (0, 1) without MPI."""
    comm = get_comm() if comm is None else comm
    return (0, 1) if comm is None else (int(comm.rank), int(comm.size))


def shared_seed(seed, comm=None) -> int:
    """``seed`` as an int every rank agrees on: None is drawn once on rank 0 (OS entropy) and broadcast."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
            raise ConfSampleError(f"seed must be a non-negative integer or None, got {seed!r}.")
        return int(seed)
    entropy = int(np.random.SeedSequence().entropy)
    comm = get_comm() if comm is None else comm
    return entropy if comm is None else int(comm.bcast(entropy, root=0))


def spawn_seeds(seed, n_streams: int) -> list[np.random.SeedSequence]:
    """``n_streams`` independent seed sequences from one int ``seed``: stream i is the same whatever n_streams.

    Examples
    --------
    >>> first = np.random.default_rng(spawn_seeds(7, 2)[1]).random()
    >>> bool(first == np.random.default_rng(spawn_seeds(7, 5)[1]).random())
    True
    """
    n_streams = positive_int(n_streams, "n_streams")
    return np.random.SeedSequence(int(seed)).spawn(n_streams)


@dataclass
class RankConfig:
    """How this rank was set up by :func:`configure_rank` (plain values; ``as_dict()`` for metadata)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    n_threads: int
    seed: int
    platform_name: str | None = None
    device_index: int | None = None
    n_gpus: int = 0
    torch_device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def generator(self) -> np.random.Generator:
        """This rank's own random stream (stream ``rank`` of ``spawn_seeds(seed, size)``)."""
        return np.random.default_rng(spawn_seeds(self.seed, self.size)[self.rank])

    def platform(self, default: str = "Reference") -> openmm.Platform:
        """The OpenMM platform to use: the rank's GPU platform, else ``default`` (Reference is fastest for
        a few dozen atoms; CPU for larger systems)."""
        return openmm.Platform.getPlatformByName(self.platform_name or default)

    def context_cache(self, default: str = "Reference"):
        """An openmmtools ContextCache on :meth:`platform` (its Contexts get the rank's device and threads)."""
        from openmmtools import cache  # deferred: openmmtools is only needed by scripts that ask for it

        return cache.ContextCache(platform=self.platform(default))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def configure_rank(seed=None, platform: str | None = None, n_threads: int | None = None, comm=None) -> RankConfig:
    """Set up this process for its rank: threads, device, seed (module docstring). Call it on every rank.

    Collective on first call (ranks on one node compare their cores); later calls return the same
    configuration without communicating. Without MPI it configures the one process (all cores).

    Parameters
    ----------
    seed : int, optional
        The one seed of the whole job; None draws one on rank 0 (recorded in the result).
    platform : str, optional
        OpenMM platform name. Default: CUDA or OpenCL where a GPU is present, otherwise None (the caller's
        usual choice, see :meth:`RankConfig.platform`).
    n_threads : int, optional
        CPU threads for this rank; default: its share of the node's cores.

    Examples
    --------
    At the top of a script run with ``mpiexec -n 4 python script.py``:

    >>> config = configure_rank(seed=1)  # doctest: +SKIP
    >>> sampler.energy_context_cache = config.context_cache()  # doctest: +SKIP
    """
    global _CONFIG
    if _CONFIG is not None:
        asked = {"seed": seed, "platform_name": platform, "n_threads": n_threads}
        differ = [f"{name}={value!r}" for name, value in asked.items()
                  if value is not None and value != getattr(_CONFIG, name)]
        if differ:
            raise ConfSampleError(
                f"this rank is already configured ({', '.join(f'{k}={getattr(_CONFIG, k)!r}' for k in asked)}); "
                f"configure_rank cannot change it to {', '.join(differ)}."
            )
        return _CONFIG
    comm = get_comm() if comm is None else comm
    rank, size = rank_and_size(comm)
    local_rank, local_size, threads = _local_share(comm)
    n_threads = threads if n_threads is None else positive_int(n_threads, "n_threads")
    limit_threads(n_threads)
    config = RankConfig(rank, size, local_rank, local_size, n_threads, shared_seed(seed, comm))
    _choose_device(config, platform)
    _CONFIG = config
    return config


def rank_config() -> RankConfig | None:
    """This process's configuration, if :func:`configure_rank` has run."""
    return _CONFIG


def limit_threads(n_threads: int) -> None:
    """Keep this process to ``n_threads`` CPU threads: OpenMM CPU platform, torch, BLAS (threadpoolctl)."""
    n_threads = positive_int(n_threads, "n_threads")
    # Libraries loaded later read these; those already loaded are limited below.
    for name in ("OPENMM_CPU_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(n_threads)
    openmm.Platform.getPlatformByName("CPU").setPropertyDefaultValue("Threads", str(n_threads))
    import torch  # deferred: seconds to import, and only needed once a rank is configured

    threadpoolctl.threadpool_limits(limits=n_threads)
    torch.set_num_threads(n_threads)


def _local_share(comm) -> tuple[int, int, int]:
    """(local rank, ranks on this node, threads for this rank)."""
    own = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if comm is None:
        return 0, 1, max(1, len(own))
    from mpi4py import MPI  # present: get_comm returned a communicator

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        local_rank, local_size = int(local.rank), int(local.size)
        cores = local.allgather(own)
    finally:
        local.Free()
    union = set().union(*map(set, cores))
    bound = sum(len(c) for c in cores) == len(union)  # disjoint sets: the launcher bound each rank
    threads = len(own) if bound else len(union) // local_size
    return local_rank, local_size, max(1, threads)


def _gpu_count() -> int:
    """GPUs this process can see: torch's count, else CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``; 0 if none found."""
    import torch  # deferred (see limit_threads)

    if torch.cuda.is_available():
        return int(torch.cuda.device_count())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _available_platforms() -> list[str]:
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def _choose_device(config: RankConfig, platform: str | None) -> None:
    """Fill the config's platform, device index and torch device; set OpenMM's DeviceIndex default."""
    available = _available_platforms()
    if platform is not None and platform not in available:
        raise ConfSampleError(f"OpenMM platform '{platform}' is not available here "
                              f"(available: {', '.join(available)}).")
    gpu_platforms = [name for name in _GPU_PLATFORMS if name in available]
    n_gpus = _gpu_count() if gpu_platforms else 0
    if platform is None and n_gpus:  # OpenCL alone may be a CPU implementation: a GPU must be seen
        platform = gpu_platforms[0]
    config.platform_name = platform
    if platform not in _GPU_PLATFORMS:
        return
    config.n_gpus = n_gpus
    if not n_gpus:
        config.notes.append(f"{platform} asked for but no GPU count found; OpenMM chooses the device.")
        return
    index = config.local_rank % n_gpus
    if config.local_size > n_gpus:
        note = (f"{config.local_size} ranks share {n_gpus} GPU(s) on this node; "
                f"one rank per GPU is the usual layout.")
        config.notes.append(note)
        if config.local_rank == 0:
            warnings.warn(note, stacklevel=3)
    config.device_index = index
    openmm.Platform.getPlatformByName(platform).setPropertyDefaultValue("DeviceIndex", str(index))
    import torch  # deferred (see limit_threads)

    if torch.cuda.is_available():
        torch.cuda.set_device(index)
        config.torch_device = f"cuda:{index}"
