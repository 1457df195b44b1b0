"""Exactness harness: small OpenMM systems whose marginals are known in closed form.

A move is useful only if it samples the Boltzmann distribution exactly, whatever the quality of its
proposal. This module provides

* :func:`four_atom_torsion_system` -- a 4-atom chain with harmonic bonds and angles and a
  PeriodicTorsionForce. The bond-angle-torsion Jacobian does not depend on the torsion, so the torsion
  marginal is exactly proportional to exp(-V(phi)/kT);
* :func:`coupled_torsion_system` -- the same chain with an environment: particles held near
  c (cos phi, sin phi, 0) by springs, whose integrals do not depend on phi, so the torsion marginal is
  still exp(-V(phi)/kT) / Z while an instantaneous jump in phi is almost always refused (as in water);
  the springs' global parameter ``coupling_scale`` is what an NCMC protocol softens;
* :func:`double_well_system` -- one particle in a tilted 1D double well (CustomExternalForce) with
  harmonic confinement in y and z; the x marginal is proportional to exp(-U(x)/kT);
* :func:`coupled_torsion_chain` -- a linear chain with six (or more) coupled torsions, joint density
  exactly exp(-V/kT); :func:`chain_bin_probabilities` gives its marginals and neighbour joints and
  :func:`chain_chi_square_tests` tests samples against all of them;
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


def _chain_positions(bond_nm: float, angle_rad: float, torsion_rad: float, first_three=None) -> np.ndarray:
    """Four points with the given bond length, bond angles and torsion (the first three given or placed)."""
    if first_three is None:
        p0 = np.array([bond_nm, 0.0, 0.0])
        p1 = np.zeros(3)
        p2 = np.array([bond_nm * np.cos(np.pi - angle_rad), bond_nm * np.sin(np.pi - angle_rad), 0.0])
    else:
        p0, p1, p2 = (np.asarray(p, dtype=float) for p in first_three)
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


def coupled_torsion_system(n_environment: int = 1, coupling_kJ_per_nm2: float = 5.0e4, tether_kJ_per_nm2: float = 5.0e4,
                           offset_nm: float = 0.1, environment_mass_amu: float = 1.0,
                           torsion_terms=DEFAULT_TORSION_TERMS, temperature_K: float = 300.0,
                           mass_amu: float = 12.0) -> MolecularSystem:
    """The four-atom chain plus environment particles coupled to its torsion; phi marginal exp(-V(phi)/kT) / Z.

    Each environment particle i is held at the origin by a tether and pulled towards c u(phi),
    u = (cos phi, sin phi, 0), by a coupling spring:

        U = U_chain + sum_i [coupling_scale * k/2 |r_i - c u|^2 + k0/2 |r_i|^2]

    k = ``coupling_kJ_per_nm2``, k0 = ``tether_kJ_per_nm2``, c = ``offset_nm``. The integral of each r_i over
    space is a Gaussian factor times exp(-k_eff c^2 |u|^2 / 2kT) with |u| = 1: the same for every phi, so the
    torsion marginal is that of :func:`four_atom_torsion_system` for any parameters. As in water, the
    environment refuses instantaneous jumps (k_eff = k k0 / (k + k0); k_eff c^2 = 100 kT by default, so a
    jump between wells costs more than 100 kT) while it stays bound when the coupling is switched off (the tether:
    without it a decoupled particle would wander off and cost work without bound on its way back).
    ``coupling_scale`` (a global parameter, 1 here) is what an NCMC protocol softens. Atoms 0-3: the chain
    (residue MOL); 4...: the environment (residue SOL).
    """
    chain = four_atom_torsion_system(torsion_terms, temperature_K, mass_amu=mass_amu)
    system, topology = chain.system, chain.topology
    spring = openmm.CustomCompoundBondForce(5, "0.5*coupling_scale*k_env*((x5 - c_env*cos(phi))^2 + "
                                               "(y5 - c_env*sin(phi))^2 + z5^2) + 0.5*k_tether*(x5^2 + y5^2 + z5^2); "
                                               "phi = dihedral(p1, p2, p3, p4)")
    spring.addGlobalParameter("coupling_scale", 1.0)
    for name in ("k_env", "k_tether", "c_env"):
        spring.addPerBondParameter(name)
    environment = topology.addResidue("SOL", topology.addChain())
    k, k0 = float(coupling_kJ_per_nm2), float(tether_kJ_per_nm2)
    start = k * offset_nm / (k + k0) * np.array([np.cos(np.pi), np.sin(np.pi), 0.0])  # the minimum at phi = pi
    positions = [chain.positions_nm]
    for _ in range(int(n_environment)):
        index = system.addParticle(float(environment_mass_amu))
        topology.addAtom("E", app.element.helium, environment)
        spring.addBond([0, 1, 2, 3, index], [k, k0, float(offset_nm)])
        positions.append(start[None])
    system.addForce(spring)
    molsys = MolecularSystem("coupled-torsion", system, topology, np.vstack(positions), temperature_K,
                             {"phi": (0, 1, 2, 3)}, description="4-atom chain coupled to environment particles")
    molsys.torsion_terms = tuple(torsion_terms)
    molsys.environment = {"k": k, "k0": k0, "c": float(offset_nm)}
    return molsys


def environment_projection(positions_nm) -> float:
    """r_E . u(phi), nm: the first environment particle of :func:`coupled_torsion_system` along u(phi).

    Exactly Gaussian with :func:`environment_projection_moments` (the spring's integral, also given phi).
    """
    from .geometry.torsions import dihedral_angles

    phi = float(dihedral_angles(positions_nm, np.array([[0, 1, 2, 3]]))[0])
    return float(positions_nm[4, 0] * np.cos(phi) + positions_nm[4, 1] * np.sin(phi))


def environment_projection_moments(molsys: MolecularSystem) -> tuple[float, float]:
    """Mean and standard deviation (nm) of :func:`environment_projection`: k c / (k + k0), sqrt(kT / (k + k0))."""
    env = molsys.environment
    return env["k"] * env["c"] / (env["k"] + env["k0"]), float(np.sqrt(molsys.kT / (env["k"] + env["k0"])))


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


#: Per-torsion terms (k kJ/mol, periodicity, phase rad) of the coupled chain, cycled over its torsions: unequal
#: wells, so each marginal differs from its neighbours'.
DEFAULT_CHAIN_TERMS = (((2.0, 1, 0.0), (3.0, 3, 0.0)), ((2.5, 2, 1.0),), ((1.5, 1, 2.0), (2.0, 3, 0.5)))
#: Coupling c (kJ/mol) of neighbouring torsions, V_c = c cos(t_i - t_{i+1}): negative favours equal neighbours.
DEFAULT_CHAIN_COUPLING = -3.0


def coupled_torsion_chain(n_torsions: int = 6, terms=DEFAULT_CHAIN_TERMS, coupling: float = DEFAULT_CHAIN_COUPLING,
                          temperature_K: float = 300.0, bond_nm: float = 0.153,
                          angle_rad: float = np.deg2rad(111.0), mass_amu: float = 12.0) -> MolecularSystem:
    """A linear chain of ``n_torsions + 3`` atoms whose joint torsion density is exp(-V(t)/kT) / Z exactly.

    V(t) = sum_i V_i(t_i) + c sum_i cos(t_i - t_{i+1}) with V_i(t) = sum k (1 + cos(n t - phase)) from ``terms``
    (cycled); a PeriodicTorsionForce holds the V_i and a CustomCompoundBondForce over five consecutive atoms
    the couplings. Harmonic bonds and angles are the only other terms, and the bond-angle-torsion Jacobian
    (prod r^2 sin theta) does not depend on the torsions, so the torsions' joint density is exp(-V/kT) / Z
    exactly; :func:`chain_bin_probabilities` gives its marginals and neighbour joints by transfer matrices.
    Torsions are named ``t1`` .. ``tn`` (``t_i`` = atoms i-1, i, i+1, i+2).
    """
    n_torsions = int(n_torsions)
    n_atoms = n_torsions + 3
    system = openmm.System()
    for _ in range(n_atoms):
        system.addParticle(float(mass_amu))
    bonds = [(i, i + 1) for i in range(n_atoms - 1)]
    bond_force, angle_force = openmm.HarmonicBondForce(), openmm.HarmonicAngleForce()
    for i, j in bonds:
        bond_force.addBond(i, j, bond_nm, 2.0e5)
    for i in range(n_atoms - 2):
        angle_force.addAngle(i, i + 1, i + 2, angle_rad, 400.0)
    torsion_force = openmm.PeriodicTorsionForce()
    for t in range(n_torsions):
        for k, n, phase in terms[t % len(terms)]:
            torsion_force.addTorsion(t, t + 1, t + 2, t + 3, int(n), float(phase), float(k))
    coupling_force = openmm.CustomCompoundBondForce(5, "c*cos(dihedral(p1,p2,p3,p4) - dihedral(p2,p3,p4,p5))")
    coupling_force.addGlobalParameter("c", float(coupling))
    for t in range(n_torsions - 1):
        coupling_force.addBond(list(range(t, t + 5)), [])
    for force in (bond_force, angle_force, torsion_force, coupling_force):
        system.addForce(force)
    # all torsions trans (no nonbonded terms, so any start is allowed): each atom from the previous three
    positions = list(_chain_positions(bond_nm, angle_rad, np.pi))
    while len(positions) < n_atoms:
        positions.append(_chain_positions(bond_nm, angle_rad, np.pi, positions[-3:])[3])
    positions = np.array(positions)
    torsions = {f"t{t + 1}": (t, t + 1, t + 2, t + 3) for t in range(n_torsions)}
    molsys = MolecularSystem("coupled-torsion-chain", system, _carbon_topology(n_atoms, bonds), positions,
                             temperature_K, torsions, description=f"{n_atoms}-atom chain, {n_torsions} coupled torsions")
    molsys.chain_terms = tuple(tuple(terms[t % len(terms)]) for t in range(n_torsions))
    molsys.chain_coupling = float(coupling)
    return molsys


def chain_bin_probabilities(molsys: MolecularSystem, n_bins: int = 12, n_pair_bins: int = 6, points_per_bin: int = 40):
    """Exact bin probabilities of :func:`coupled_torsion_chain`: every marginal and every neighbour joint.

    Transfer matrices on a grid of ``n_bins * points_per_bin`` points (midpoint rule, spectrally accurate for
    these smooth periodic integrands). Returns ``(marginals, joints)``: ``marginals[i]`` the (n_bins,)
    probabilities of torsion i in equal bins of [-pi, pi), ``joints[i]`` the (n_pair_bins, n_pair_bins)
    probabilities of (t_i, t_{i+1}).
    """
    n_grid = int(np.lcm(n_bins, n_pair_bins)) * int(points_per_bin)
    grid = -np.pi + (np.arange(n_grid) + 0.5) * (2.0 * np.pi / n_grid)
    kT = kT_kJ_per_mol(molsys.temperature_K)
    weights = [np.exp(-torsion_potential(grid, terms) / kT) for terms in molsys.chain_terms]
    kernel = np.exp(-molsys.chain_coupling * np.cos(grid[:, None] - grid[None, :]) / kT)
    n = len(weights)
    forward = [weights[0] / weights[0].sum()]
    for i in range(1, n):
        message = weights[i] * (forward[-1] @ kernel)
        forward.append(message / message.sum())
    backward = [np.ones(n_grid)]
    for i in range(n - 2, -1, -1):
        message = kernel @ (weights[i + 1] * backward[0])
        backward.insert(0, message / message.sum())
    marginals, joints = [], []
    for i in range(n):
        p = forward[i] * backward[i]
        marginals.append((p / p.sum()).reshape(n_bins, -1).sum(axis=1))
    for i in range(n - 1):
        p = forward[i][:, None] * kernel * (weights[i + 1] * backward[i + 1])[None, :]
        p = p.reshape(n_pair_bins, n_grid // n_pair_bins, n_pair_bins, n_grid // n_pair_bins).sum(axis=(1, 3))
        joints.append(p / p.sum())
    return marginals, joints


def chain_chi_square_tests(angles, marginals, joints) -> list:
    """Chi-square tests of sampled chain torsions (N, n) against every marginal and every neighbour joint.

    Returns one :class:`ChiSquareResult` per marginal, then one per neighbour pair (2-D bins flattened).
    """
    angles = np.asarray(angles, dtype=float)
    results = []
    for i, probabilities in enumerate(marginals):
        edges = np.linspace(-np.pi, np.pi, len(probabilities) + 1)
        results.append(chi_square_test(angles[:, i], edges, probabilities))
    for i, probabilities in enumerate(joints):
        nb = len(probabilities)
        cells = [np.clip(((angles[:, j] + np.pi) / (2.0 * np.pi) * nb).astype(int), 0, nb - 1) for j in (i, i + 1)]
        index = (cells[0] * nb + cells[1]).astype(float)
        results.append(chi_square_test(index, np.arange(nb * nb + 1) - 0.5, probabilities.ravel()))
    return results


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
