"""openmm-confsample: learned generative models as exact Monte-Carlo moves for OpenMM."""

import logging as _logging

__version__ = "0.1.0"

# pymbar (imported by openmmtools) logs a JAX banner and a timeseries warning at import time.
_logging.getLogger("pymbar").setLevel(_logging.ERROR)
