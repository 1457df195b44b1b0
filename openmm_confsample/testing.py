"""Exactness harness: small OpenMM systems whose marginals are known in closed form.

A move is useful only if it samples the Boltzmann distribution exactly, whatever the quality of its
proposal. This module provides

* :func:`four_atom_torsion_system` -- a 4-atom chain with harmonic bonds and angles and a
  PeriodicTorsionForce. The bond-angle-torsion Jacobian does not depend on the torsion, so the torsion
  marginal is exactly proportional to exp(-V(phi)/kT);
* :func:`double_well_system` -- one particle in a tilted 1D double well (CustomExternalForce) with
  harmonic confinement in y and z; the x marginal is proportional to exp(-U(x)/kT);
* :func:`run_chain` -- a chain of moves, alone or alternating with Langevin dynamics, on a real Context,
  recording an observable;
* :func:`chi_square_test` -- a chi-square test of the samples against exact bin probabilities after
  thinning by the integrated autocorrelation time;
* :class:`WithoutHastings` -- wraps a proposal and drops its Hastings term: the negative control
  that proves a test can fail.

The model issues reuse these to test learned proposals, untrained and trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openmm
import openmm.app as app
from openmm import unit
from scipy import integrate, stats

from .analysis.statistics import integrated_autocorrelation_time
from .moves.engine import MetropolisHastingsEngine, Proposal, ProposalBatch
from .runner import langevin_context, run_engine_steps
from .systems import MolecularSystem
from .units import kT_kJ_per_mol

#: Torsion terms (force constant kJ/mol, periodicity, phase rad) of the four-atom chain: three unequal wells.
DEFAULT_TORSION_TERMS = ((3.0, 1, 0.0), (4.0, 3, 0.0))


def _chain_positions(bond_nm: float, angle_rad: float, torsion_rad: float) -> np.ndarray:
    """Four points with the given bond length, bond angles and torsion."""
    p0 = np.array([bond_nm, 0.0, 0.0])
    p1 = np.zeros(3)
    p2 = np.array([bond_nm * np.cos(np.pi - angle_rad), bond_nm * np.sin(np.pi - angle_rad), 0.0])
    # place p3 from p1-p2 axis with the chosen torsion
    b = (p2 - p1) / np.linalg.norm(p2 - p1)
    n = np.cross(p1 - p0, b)
    n /= np.linalg.norm(n)
    m = np.cross(n, b)
    local = np.array([-bond_nm * np.cos(angle_rad), bond_nm * np.sin(angle_rad) * np.cos(torsion_rad),
                      bond_nm * np.sin(angle_rad) * np.sin(torsion_rad)])
    p3 = p2 + local[0] * b + local[1] * m + local[2] * n
    return np.array([p0, p1, p2, p3])


def _carbon_topology(n_atoms: int, bonds) -> app.Topology:
    topology = app.Topology()
    chain = topology.addChain()
    residue = topology.addResidue("MOL", chain)
    atoms = [topology.addAtom(f"C{i + 1}", app.element.carbon, residue) for i in range(n_atoms)]
    for i, j in bonds:
        topology.addBond(atoms[i], atoms[j])
    return topology


def four_atom_torsion_system(torsion_terms=DEFAULT_TORSION_TERMS, temperature_K: float = 300.0,
                             bond_nm: float = 0.153, angle_rad: float = np.deg2rad(111.0),
                             constrain_bonds: bool = False, mass_amu: float = 12.0) -> MolecularSystem:
    """A 4-atom chain C1-C2-C3-C4 whose torsion marginal is exp(-V(phi)/kT) / Z exactly.

    Parameters
    ----------
    torsion_terms : sequence of (k kJ/mol, periodicity, phase rad)
        V(phi) = sum k (1 + cos(n phi - phase)).
    constrain_bonds : bool
        Replace the harmonic bonds by constraints (to test that Cartesian proposals are refused).
    mass_amu : float
        Mass of each atom, amu. The marginal does not depend on it; lighter atoms cross barriers more
        often per ps of MD (4 amu: about ten times as often as 12 amu, still stable at 1 fs).
    """
    system = openmm.System()
    for _ in range(4):
        system.addParticle(float(mass_amu))
    bonds = [(0, 1), (1, 2), (2, 3)]
    if constrain_bonds:
        for i, j in bonds:
            system.addConstraint(i, j, bond_nm)
    else:
        bond_force = openmm.HarmonicBondForce()
        for i, j in bonds:
            bond_force.addBond(i, j, bond_nm, 2.0e5)
        system.addForce(bond_force)
    angle_force = openmm.HarmonicAngleForce()
    angle_force.addAngle(0, 1, 2, angle_rad, 400.0)
    angle_force.addAngle(1, 2, 3, angle_rad, 400.0)
    system.addForce(angle_force)
    torsion_force = openmm.PeriodicTorsionForce()
    for k, n, phase in torsion_terms:
        torsion_force.addTorsion(0, 1, 2, 3, int(n), float(phase), float(k))
    system.addForce(torsion_force)
    positions = _chain_positions(bond_nm, angle_rad, np.pi)
    molsys = MolecularSystem("four-atom-torsion", system, _carbon_topology(4, bonds), positions, temperature_K,
                             {"phi": (0, 1, 2, 3)}, description="4-atom chain with PeriodicTorsionForce")
    molsys.torsion_terms = tuple(torsion_terms)
    return molsys


def torsion_potential(phi, torsion_terms=DEFAULT_TORSION_TERMS):
    """V(phi) in kJ/mol of the four-atom chain's PeriodicTorsionForce."""
    phi = np.asarray(phi, dtype=float)
    return sum(k * (1.0 + np.cos(n * phi - phase)) for k, n, phase in torsion_terms)


def torsion_bin_probabilities(edges, torsion_terms=DEFAULT_TORSION_TERMS, temperature_K: float = 300.0):
    """Exact probability of each torsion bin [edges[i], edges[i+1]) under exp(-V/kT)."""
    kT = kT_kJ_per_mol(temperature_K)
    density = lambda phi: np.exp(-torsion_potential(phi, torsion_terms) / kT)  # noqa: E731
    mass = np.array([integrate.quad(density, a, b)[0] for a, b in zip(edges[:-1], edges[1:])])
    return mass / integrate.quad(density, -np.pi, np.pi)[0]


#: Double well U(x) = a (x^2 - b^2)^2 + tilt x + 0.5 k_perp (y^2 + z^2), kJ/mol and nm.
DEFAULT_DOUBLE_WELL = {"a": 5.0e4, "b": 0.1, "tilt": 10.0, "k_perp": 1000.0}


def double_well_system(params=None, temperature_K: float = 300.0) -> MolecularSystem:
    """One particle in a tilted double well along x; the x marginal is exp(-U(x)/kT) / Z exactly."""
    params = dict(DEFAULT_DOUBLE_WELL, **(params or {}))
    system = openmm.System()
    system.addParticle(12.0)
    force = openmm.CustomExternalForce("a*(x^2 - b^2)^2 + tilt*x + 0.5*k_perp*(y^2 + z^2)")
    for name in ("a", "b", "tilt", "k_perp"):
        force.addGlobalParameter(name, params[name])
    force.addParticle(0, [])
    system.addForce(force)
    molsys = MolecularSystem("double-well", system, _carbon_topology(1, []), np.array([[-params["b"], 0.0, 0.0]]),
                             temperature_K, {}, description="1D tilted double well")
    molsys.double_well = params
    return molsys


def double_well_potential(x, params=None):
    params = dict(DEFAULT_DOUBLE_WELL, **(params or {}))
    x = np.asarray(x, dtype=float)
    return params["a"] * (x**2 - params["b"] ** 2) ** 2 + params["tilt"] * x


def double_well_bin_probabilities(edges, params=None, temperature_K: float = 300.0):
    """Exact probability of each x bin (the outer bins absorb the tails to +-infinity)."""
    kT = kT_kJ_per_mol(temperature_K)
    density = lambda x: np.exp(-double_well_potential(x, params) / kT)  # noqa: E731
    limits = np.array(edges, dtype=float)
    limits[0], limits[-1] = -np.inf, np.inf
    mass = np.array([integrate.quad(density, a, b)[0] for a, b in zip(limits[:-1], limits[1:])])
    return mass / mass.sum()


class WithoutHastings(Proposal):
    """The wrapped proposal with its Hastings term set to zero: a deliberately wrong sampler (negative control)."""

    def __init__(self, proposal: Proposal):
        self.proposal = proposal
        self.cartesian = proposal.cartesian

    def propose(self, positions_nm, n_proposals, rng):
        batch = self.proposal.propose(positions_nm, n_proposals, rng)
        return ProposalBatch(batch.positions, np.zeros(len(batch)), batch.valid, batch.info)

    def accepted(self, batch, index):
        self.proposal.accepted(batch, index)


@dataclass
class ChainResult:
    observable: np.ndarray
    statistics: dict


def run_chain(molsys: MolecularSystem, move, n_iterations: int, observable, md_steps: int = 0,
              timestep_fs: float = 1.0, friction_per_ps: float = 5.0, seed: int = 0,
              platform: str = "Reference") -> ChainResult:
    """Alternate ``md_steps`` of Langevin dynamics (0: none) with one move, recording ``observable(positions_nm)``.

    ``move`` is a MetropolisHastingsEngine (or anything with ``.engine``); ``None`` runs MD alone.
    """
    context = langevin_context(molsys, friction_per_ps=friction_per_ps, timestep_fs=timestep_fs, seed=seed,
                               platform=platform, minimize=False)
    integrator = context.getIntegrator()
    engine = None if move is None else (move if isinstance(move, MetropolisHastingsEngine) else move.engine)
    kT = molsys.kT
    values = []
    for _ in range(int(n_iterations)):
        if md_steps:
            integrator.step(md_steps)
        if engine is not None:
            run_engine_steps(context, engine, kT)
        positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        values.append(observable(positions))
    return ChainResult(np.asarray(values), engine.statistics if engine is not None else {})


@dataclass
class ChiSquareResult:
    statistic: float
    p_value: float
    n_effective: int
    thinning: int
    observed: np.ndarray
    expected: np.ndarray


def chi_square_test(samples, edges, probabilities) -> ChiSquareResult:
    """Chi-square goodness of fit of correlated ``samples`` to exact bin ``probabilities``.

    Samples are thinned by ceil(2 * tau_int), with tau_int the largest integrated autocorrelation time of
    the bin-indicator series, so the kept samples are close to independent.
    """
    samples = np.asarray(samples, dtype=float)
    probabilities = np.asarray(probabilities, dtype=float)
    bins = np.clip(np.digitize(samples, edges[1:-1]), 0, len(probabilities) - 1)
    tau = max(integrated_autocorrelation_time((bins == b).astype(float)) for b in range(len(probabilities))
              if 0 < np.mean(bins == b) < 1)
    thinning = int(np.ceil(2.0 * tau))
    kept = bins[::thinning]
    observed = np.bincount(kept, minlength=len(probabilities)).astype(float)
    expected = probabilities * len(kept)
    statistic, p_value = stats.chisquare(observed, expected)
    return ChiSquareResult(float(statistic), float(p_value), len(kept), thinning, observed, expected)
