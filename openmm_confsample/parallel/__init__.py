"""Scale-out with MPI: rank set-up (threads, devices, seeds), independent walkers, summaries across chains.

``mpi`` configures one process per rank; ``walkers`` runs N independent chains over the ranks;
``diagnostics`` pools them (ESS, R-hat); ``replica`` holds openmmtools' replica-exchange samplers with
per-rank random streams for learned moves (import it explicitly: it imports openmmtools.multistate).
How to run on a cluster: docs/mpi.md.
"""

from .diagnostics import chain_summary, split_r_hat, sum_statistics
from .mpi import RankConfig, configure_rank, get_comm, rank_and_size, rank_config, shared_seed, spawn_seeds
from .walkers import WalkersResult, default_indicators, run_walkers

__all__ = ["chain_summary", "split_r_hat", "sum_statistics", "RankConfig", "configure_rank", "get_comm",
           "rank_and_size", "rank_config", "shared_seed", "spawn_seeds", "WalkersResult", "default_indicators",
           "run_walkers"]
