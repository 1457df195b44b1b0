"""Analysis of samples: ESS, free energies, JSD, TICA/MSM (deeptime); plots live in ``analysis.plots``."""

from . import plots
from .free_energy import (RAMACHANDRAN_REGIONS, basin_free_energy, free_energy_1d, free_energy_surface_2d,
                          region_free_energies, region_populations)
from .kinetics import fit_tica, implied_timescales, tica_project, torsion_features
from .statistics import (autocorrelation, block_average_error, bootstrap_error, effective_sample_size,
                         ess_per_second, integrated_autocorrelation_time, jensen_shannon_divergence)
