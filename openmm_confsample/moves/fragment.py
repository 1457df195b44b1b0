"""Fragment-local torsion moves for peptides: one residue's torsions resampled, accepted on the whole system.

A :class:`FragmentProposal` holds a list of elementary moves built from a peptide's fragments
(:func:`~openmm_confsample.models.fragments.peptide_fragments`) and a fragment density (a trained
:class:`~openmm_confsample.models.fragments.FragmentTorsionModel`, or an untrained uniform / von Mises one):

* ``fragment``: all movable torsions of one residue (phi, psi, chi1..) drawn from the density given the
  residue's type and neighbours, set by rigid rotation of the shorter side of each bond;
* ``backbone``: the residue's phi and psi alone, its side chain kept as it is (where the model knows the
  backbone better than the side chain, e.g. a residue type it never saw);
* ``sidechain``: the residue's chi angles alone, given its current phi/psi: local (only side-chain atoms
  move), for residues in the middle of a chain where a backbone change swings half the molecule;
* ``crankshaft``: psi_i and phi_{i+1} together on the line psi_i + phi_{i+1} = const. In a trans peptide the
  two bonds are nearly parallel, so this turns the peptide plane between the residues while the chain on
  either side keeps most of its relative orientation (the benchmark measures how much the far chain moves).

Each step picks one elementary move by a rule that does not look at the state: ``scan='random'`` (with
probabilities proportional to ``weights`` of the move kinds) or ``scan='systematic'`` (in order).

Why it is exact
---------------
Let x be the state, f the picked move's torsions and r everything else. A ``fragment``, ``backbone`` or
``sidechain`` move draws f' from q(f' | c, g), where c is the residue's context (types: fixed by the
topology) and g its torsions the move keeps (phi/psi for ``sidechain``), and sets f' by rigid rotations, which change no
other torsion, bond or angle. In bond-angle-torsion coordinates the Jacobian of the Cartesian volume does
not depend on torsions, so this is an independence proposal on f with r and g held: the Metropolis-Hastings
ratio is pi(x') q(f | c, g) / (pi(x) q(f' | c, g)), and since c and g are the same before and after the
move, the conditional density of the fragment given the rest is the whole Hastings term (``log_correction =
log q(f | c, g) - log q(f' | c, g)``). The density's values may depend on anything the move does not change.
A ``crankshaft`` move keeps s = psi_i + phi_{i+1}; given s it draws psi' from a density r_s on the circle and
sets phi' = s - psi'; the map (psi, phi) -> (psi, s) has unit Jacobian, so it is an independence sampler on
the line with ratio r_s(psi) / r_s(psi'). Each elementary move therefore leaves pi invariant; a random scan
is a mixture of them with state-independent weights and a systematic scan a composition, both of which
leave pi invariant too. Tests: tests/test_fragments.py runs every kind, alone, with MD and in both scans on
:func:`~openmm_confsample.testing.coupled_torsion_chain` (chi-square on every marginal and neighbour joint),
and the same chain without the Hastings term fails.

The density is evaluated once per fragment when the proposal is built (tables); a step costs a few table
look-ups and one rigid rotation, so its time is that of the energy evaluation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfSampleError
from ..models.shipped import resolve_model_path
from ..geometry.torsions import TorsionSet
from ..models.fragments.context import Fragment, peptide_fragments
from ..models.fragments.model import FragmentTorsionModel, UniformFragmentDensity, VonMisesFragmentDensity
from ..models.fragments.tables import FragmentConditional, cells, crankshaft_fiber, sample_cells
from ..systems import MolecularSystem, as_molecular_system
from . import model_cache
from .engine import Proposal, ProposalBatch
from .mcmc import LearnedMCMCMove

__all__ = ["FragmentProposal", "FragmentMove", "MOVE_KINDS", "SHIPPED_FRAGMENT_MODEL", "fragment_density"]

MOVE_KINDS = ("fragment", "backbone", "sidechain", "crankshaft")
#: Name of the fragment model the package ships (openmm_confsample/resources/peptide_fragments.pt).
SHIPPED_FRAGMENT_MODEL = "peptide-fragments"


_load = FragmentTorsionModel.load  # the model cache's loader: one load per checkpoint and process


def fragment_density(model):
    """A fragment density from what a user passes: a density, ``'uniform'``, the shipped name or a checkpoint path."""
    if isinstance(model, str) and model == "uniform":
        return UniformFragmentDensity()
    if model is None or isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(SHIPPED_FRAGMENT_MODEL if model is None else model, kind="fragment")
        return model_cache.resolve(path, _load)[0]
    if not hasattr(model, "tables_for"):
        raise ConfSampleError(f"model must be a fragment density, 'uniform', '{SHIPPED_FRAGMENT_MODEL}' or a "
                              f"checkpoint path, got {type(model).__name__}.")
    return model


def _density_config(density) -> dict:
    if isinstance(density, FragmentTorsionModel):
        return {"type": "model", "key": model_cache.resolve(density, _load)[1]}
    return density.get_config()


def _density_from_config(config: dict):
    if config["type"] == "model":
        return model_cache.get_model(config["key"], _load)
    if config["type"] == "uniform":
        return UniformFragmentDensity(config["n_grid"])
    if config["type"] == "von_mises":
        return VonMisesFragmentDensity(config["kappa"], config["mu"], config["n_grid"], config["uniform_weight"])
    raise ConfSampleError(f"unknown fragment density type {config['type']!r} in a stored move.")


@dataclass
class _Move:
    """One elementary move: its kind, fragments, the torsions it sets and those it conditions on."""

    kind: str
    label: str
    fragments: tuple
    torsion_set: TorsionSet
    fixed: TorsionSet | None
    conditional: FragmentConditional | None = None
    tables: tuple = ()
    fixed_present: tuple = ()


class FragmentProposal(Proposal):
    """Fragment-local torsion moves on a peptide (module docstring: what they are and why they are exact).

    Parameters
    ----------
    bonds : (n_bonds, 2) int
    n_atoms : int
    fragments : sequence of Fragment
    density : fragment density
        ``FragmentTorsionModel``, ``UniformFragmentDensity`` or ``VonMisesFragmentDensity``.
    moves : sequence of {'fragment', 'backbone', 'sidechain', 'crankshaft'}
        The kinds of elementary move to build (those that do not apply to a fragment are skipped).
    weights : dict kind -> float, optional
        Random-scan probability of each kind (shared among its moves); default equal per move.
    scan : {'random', 'systematic'}
    uniform_weight : float, optional
        Overrides the density's uniform floor for these tables.
    strict : bool
        Refuse residues the model never saw (instead of the documented fallbacks).

    Statistics: :meth:`fragment_statistics` gives acceptance per residue, per move kind, per residue type
    and per elementary move.
    """

    cartesian = False

    def __init__(self, bonds, n_atoms: int, fragments, density, moves=MOVE_KINDS, weights=None,
                 scan: str = "random", uniform_weight=None, strict: bool = False):
        self.fragments = [f if isinstance(f, Fragment) else Fragment.from_config(f) for f in fragments]
        if not self.fragments:
            raise ConfSampleError("no fragments to move: the system has no residue with a movable phi, psi or chi.")
        unknown = [m for m in moves if m not in MOVE_KINDS]
        if unknown or not moves:
            raise ConfSampleError(f"moves must be a non-empty subset of {MOVE_KINDS}, got {list(moves)}.")
        if scan not in ("random", "systematic"):
            raise ConfSampleError(f"scan must be 'random' or 'systematic', got {scan!r}.")
        self.bonds, self.n_atoms = np.asarray(bonds, dtype=int).reshape(-1, 2), int(n_atoms)
        self.density = fragment_density(density)
        self.move_kinds, self.scan, self.strict = tuple(moves), scan, bool(strict)
        self.uniform_weight = uniform_weight
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in self.move_kinds}
        if any(not math.isfinite(w) or w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ConfSampleError(f"weights must be non-negative with a positive sum, got {self.weights}.")
        self.tables = self.density.tables_for(self.fragments, strict=self.strict, uniform_weight=uniform_weight)
        self.moves = self._build_moves()
        if not self.moves:
            raise ConfSampleError(f"none of the move kinds {list(self.move_kinds)} applies to these fragments.")
        per_move = np.array([self.weights[m.kind] for m in self.moves])
        self.probabilities = per_move / per_move.sum()
        self._cdf = np.cumsum(self.probabilities)
        self.counter = 0
        self.counts = np.zeros((len(self.moves), 2), dtype=np.int64)  # proposed, accepted
        self._pending = None

    # -- construction ------------------------------------------------------------------------------------
    def _torsion_set(self, quads, names) -> TorsionSet:
        return TorsionSet(self.bonds, self.n_atoms, quads, names=names)

    def _build_moves(self) -> list[_Move]:
        moves = []
        for f, (fragment, table) in enumerate(zip(self.fragments, self.tables)):
            present = fragment.kinds
            backbone = tuple(k for k in present if k in ("phi", "psi"))
            for kind, moved in (("fragment", present), ("backbone", backbone), ("sidechain", fragment.chi_kinds)):
                if kind not in self.move_kinds or not moved or (kind != "fragment" and moved == present):
                    continue  # nothing to move, or the same as the fragment move
                fixed = tuple(k for k in present if k not in moved)
                moves.append(_Move(kind, f"{kind}:{fragment.name}", (f,),
                                   self._torsion_set(fragment.quads(moved), fragment.torsion_names(moved)),
                                   self._torsion_set(fragment.quads(fixed), fragment.torsion_names(fixed)) if fixed
                                   else None, FragmentConditional(table, moved, present)))
        if "crankshaft" in self.move_kinds:
            for f in range(len(self.fragments) - 1):
                a, b = self.fragments[f], self.fragments[f + 1]
                if "psi" not in a.torsions or "phi" not in b.torsions:
                    continue
                psi, phi = a.torsions["psi"][1], b.torsions["phi"][1]
                if tuple(psi[2:]) != tuple(phi[:2]):  # not the same peptide bond C_i-N_{i+1}
                    continue
                fixed_present = ("phi" in a.torsions, "psi" in b.torsions)
                fixed = [t.torsions[k] for t, k in ((a, "phi"), (b, "psi")) if k in t.torsions]
                moves.append(_Move("crankshaft", f"crankshaft:{a.name}-{b.name}", (f, f + 1),
                                   self._torsion_set([psi, phi], [a.torsions["psi"][0], b.torsions["phi"][0]]),
                                   self._torsion_set([q for _, q in fixed], [n for n, _ in fixed]) if fixed else None,
                                   None,
                                   (self.tables[f], self.tables[f + 1]), fixed_present))
        return moves

    @classmethod
    def for_system(cls, molecular_system: MolecularSystem, model=None, **options) -> "FragmentProposal":
        """Fragments from the system's topology (``peptide_fragments``) and ``model`` (default: the shipped one)."""
        fragments = peptide_fragments(molecular_system.topology)
        return cls(molecular_system.bonds, molecular_system.n_atoms, fragments, model, **options)

    # -- proposing -----------------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Count the last batch as fully tried (no candidate of it was accepted)."""
        if self._pending is not None:
            start, chosen = self._pending
            np.add.at(self.counts[:, 0], chosen, 1)
            if self.scan == "systematic":
                self.counter = (start + len(chosen)) % len(self.moves)
            self._pending = None

    def _choose(self, n: int, rng) -> np.ndarray:
        if self.scan == "systematic":
            return (self.counter + np.arange(n)) % len(self.moves)
        if n == 1:  # the common case, in scalar arithmetic (the same draw)
            return np.array([min(int(self._cdf.searchsorted(rng.random(), side="right")), len(self.moves) - 1)])
        return np.minimum(np.searchsorted(self._cdf, rng.random(n), side="right"), len(self.moves) - 1)

    def _one(self, move: _Move, positions_nm, rng):
        """(new torsion values, log q(old) - log q(new)) of one elementary move."""
        old = move.torsion_set.values(positions_nm)
        fixed = move.fixed.values(positions_nm) if move.fixed is not None else np.zeros(0)
        if move.conditional is not None:
            new, log_q_new = move.conditional.sample_one(fixed, rng)
            return new, move.conditional.log_prob_one(fixed, old) - log_q_new
        # crankshaft: psi_i + phi_{i+1} = total is kept; psi' from the fiber density r_total
        values = iter(fixed)
        phi_i = next(values) if move.fixed_present[0] else None
        psi_j = next(values) if move.fixed_present[1] else None
        total = float(old[0] + old[1])
        fiber = crankshaft_fiber(move.tables[0], phi_i, move.tables[1], psi_j, total)
        cell = int(sample_cells(fiber, 1, rng)[0])
        width = move.tables[0].width
        psi_new = -math.pi + (cell + rng.random()) * width
        log_correction = math.log(fiber[int(cells(old[0], len(fiber)))]) - math.log(fiber[cell])
        return np.array([psi_new, total - psi_new]), log_correction

    def propose(self, positions_nm, n_proposals, rng):
        self._settle()
        chosen = self._choose(n_proposals, rng)
        positions = np.empty((n_proposals,) + positions_nm.shape)
        log_correction = np.empty(n_proposals)
        for s, m in enumerate(chosen):
            move = self.moves[m]
            new, log_correction[s] = self._one(move, positions_nm, rng)
            positions[s] = move.torsion_set.set_values(positions_nm, new)
        self._pending = (self.counter, chosen)
        return ProposalBatch(positions, log_correction, info={"moves": chosen})

    def accepted(self, batch, index):
        start, chosen = self._pending
        np.add.at(self.counts[:, 0], chosen[:index + 1], 1)
        self.counts[chosen[index], 1] += 1
        if self.scan == "systematic":
            self.counter = (start + index + 1) % len(self.moves)
        self._pending = None

    # -- statistics ----------------------------------------------------------------------------------------
    def fragment_statistics(self) -> dict:
        """Acceptance by residue, move kind, residue type and elementary move (plain dicts of plain numbers).

        A crankshaft move counts for both of its residues.
        """
        self._settle()
        groups = {"per_residue": {}, "per_kind": {}, "per_residue_type": {}, "per_move": {}}
        for move, (proposed, accepted) in zip(self.moves, self.counts.tolist()):
            keys = [("per_kind", move.kind), ("per_move", move.label)]
            for f in move.fragments:
                keys += [("per_residue", self.fragments[f].name), ("per_residue_type", self.fragments[f].residue)]
            for group, key in keys:
                entry = groups[group].setdefault(key, {"n_proposed": 0, "n_accepted": 0})
                entry["n_proposed"] += proposed
                entry["n_accepted"] += accepted
        for group in groups.values():
            for entry in group.values():
                entry["acceptance_rate"] = entry["n_accepted"] / entry["n_proposed"] if entry["n_proposed"] else 0.0
        return groups

    @property
    def torsion_set(self) -> TorsionSet:
        """Every torsion the proposal can turn, in fragment order (what reports and the command line record)."""
        if getattr(self, "_all_torsions", None) is None:
            pairs = [(n, q) for f in self.fragments for n, q in (f.torsions[k] for k in f.kinds)]
            self._all_torsions = self._torsion_set([q for _, q in pairs], [n for n, _ in pairs])
        return self._all_torsions

    def describe(self) -> dict:
        """What the proposal moves: fragments, the table each uses, and its elementary moves."""
        return {"fragments": [f.name for f in self.fragments], "tables": [t.label for t in self.tables],
                "moves": [m.label for m in self.moves], "scan": self.scan}

    # -- serialization (openmmtools storage, deep copies) --------------------------------------------------
    def get_config(self) -> dict:
        self._settle()
        return {"bonds": self.bonds.tolist(), "n_atoms": self.n_atoms,
                "fragments": [f.to_config() for f in self.fragments], "density": _density_config(self.density),
                "moves": list(self.move_kinds), "weights": dict(self.weights), "scan": self.scan,
                "uniform_weight": self.uniform_weight, "strict": self.strict, "counter": int(self.counter),
                "counts": self.counts.tolist()}

    @classmethod
    def from_config(cls, config: dict) -> "FragmentProposal":
        proposal = cls(config["bonds"], config["n_atoms"], [Fragment.from_config(f) for f in config["fragments"]],
                       _density_from_config(config["density"]), config["moves"], config["weights"], config["scan"],
                       config["uniform_weight"], config["strict"])
        proposal.counter = int(config.get("counter", 0))
        counts = np.asarray(config.get("counts", proposal.counts), dtype=np.int64)
        if counts.shape == proposal.counts.shape:
            proposal.counts = counts
        return proposal


class FragmentMove(LearnedMCMCMove):
    """openmmtools MCMC move of fragment-local torsion moves on a peptide (exact MH).

    Parameters
    ----------
    model : str, path, fragment density or None
        ``None`` or ``'peptide-fragments'``: the shipped model; a checkpoint path; ``'uniform'``; or a density.
    system : openmm.app.Simulation or MolecularSystem
    moves, weights, scan, uniform_weight, strict :
        As for :class:`FragmentProposal`.
    n_proposals, n_attempts, seed :
        As for :class:`~openmm_confsample.moves.mcmc.LearnedMCMCMove`.
    temperature : float K or Quantity, optional
        Only for a Simulation whose integrator has no temperature.

    Examples
    --------
    >>> from openmmtools import mcmc
    >>> from openmm_confsample.systems import get_system
    >>> peptide = get_system("pentapeptide-AAAAA")  # doctest: +SKIP
    >>> move = FragmentMove("peptide-fragments", peptide, seed=1)  # doctest: +SKIP
    >>> sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=50), move])  # doctest: +SKIP
    >>> move.proposal.fragment_statistics()["per_residue"]  # doctest: +SKIP
    """

    def __init__(self, model, system, moves=MOVE_KINDS, weights=None, scan: str = "random", uniform_weight=None,
                 strict: bool = False, n_proposals: int = 1, n_attempts: int = 1, seed=None, temperature=None):
        molecular_system = as_molecular_system(system, temperature)
        proposal = FragmentProposal.for_system(molecular_system, model, moves=moves, weights=weights, scan=scan,
                                               uniform_weight=uniform_weight, strict=strict)
        super().__init__(proposal, n_proposals=n_proposals, n_attempts=n_attempts, seed=seed)
