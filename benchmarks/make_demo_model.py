"""Remake the torsion diffusion model shipped at openmm_confsample/resources/alanine_dipeptide_diffusion.pt.

    python benchmarks/make_demo_model.py --out PATH        # a new model, wherever you like
    python benchmarks/make_demo_model.py --into-package    # replaces the package's shipped model

Generates training data with the package's own samplers (MD + basin torsion moves at 300 K on
alanine-dipeptide-implicit), trains a small TorsionDiffusionModel within a time budget and saves it with
its metadata (torsions, topology fingerprint, data source, temperature, settings and timings); the settings
are ``openmm_confsample.bench.alanine.SHIPPED_MODEL_SETTINGS``. Takes about four minutes on two cores. Training is
budgeted by wall clock, so a remade model differs slightly from the shipped one.
"""

import argparse
import os
import sys

from openmm_confsample.bench.alanine import SHIPPED_MODEL, SHIPPED_MODEL_SETTINGS, make_shipped_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", default=None, help="checkpoint path")
    target.add_argument("--into-package", action="store_true", help=f"replace the shipped model {SHIPPED_MODEL}")
    args = parser.parse_args(argv)
    result = make_shipped_model(args.out, into_package=args.into_package)
    size_kb = os.path.getsize(result.path) / 1024
    print(f"wrote {result.path} ({size_kb:.0f} KB): data {result.data_seconds:.0f} s, training "
          f"{result.train_seconds:.0f} s, {result.n_train} frames, settings {SHIPPED_MODEL_SETTINGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
