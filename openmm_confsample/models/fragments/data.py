"""Training data for a fragment model: fragment torsions from MD of many peptides, pooled over temperatures.

:func:`sample_fragment_md` runs Langevin MD of each system at each temperature (300 K and a hot one by
default: the hot runs cross into rare basins such as alpha_L, which 300 K MD of a few hundred ps never
visits; pooled as sampled, they broaden the proposal, and the MH test at the target temperature keeps the
move exact whatever the data) and records every fragment's torsions. :class:`FragmentData` holds them as
one (N, 6) array per context (residue type, previous and next neighbour), NaN where a kind is absent.

For speed the MD runs on a copy of each System with bonds to hydrogen constrained and a 2 fs step (the
angles of the heavy-atom torsions are what is recorded; their distribution barely changes). Side-chain
rotamers hardly change in 100 ps of MD (Val chi1 at 300 K: one rotamer), so the data can be made with exact
MH moves between samples (``proposal``, e.g. uniform fragment moves), which sample every rotamer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import openmm
from openmm import unit

from ...checks import positive_float, positive_int
from ...errors import ConfSampleError
from ...geometry.torsions import dihedral_angles
from ...progress import progress_bar
from .context import KINDS, canonical_residue, peptide_fragments

__all__ = ["FragmentData", "fragment_angles", "sample_fragment_md"]


@dataclass
class FragmentData:
    """Fragment torsions grouped by context.

    Attributes
    ----------
    contexts : list of (residue, previous, next)
    angles : list of (N_c, 6) float, radians
        Columns in :data:`~.context.KINDS` order; NaN where the fragment has no such torsion.
    sources : list of dict
        One per MD run: system, temperature_K, length_ps, frames, wall_seconds.
    """

    contexts: list = field(default_factory=list)
    angles: list = field(default_factory=list)
    sources: list = field(default_factory=list)

    def add(self, context, angles: np.ndarray) -> None:
        context = tuple(canonical_residue(c) for c in context)
        angles = np.asarray(angles, dtype=float).reshape(-1, len(KINDS))
        if context in self.contexts:
            i = self.contexts.index(context)
            self.angles[i] = np.concatenate([self.angles[i], angles])
        else:
            self.contexts.append(context)
            self.angles.append(angles)

    def extend(self, other: "FragmentData") -> "FragmentData":
        for context, angles in zip(other.contexts, other.angles):
            self.add(context, angles)
        self.sources += other.sources
        return self

    def without(self, residues) -> "FragmentData":
        """A copy without the contexts of the given residue types (e.g. the one left out for the zero-shot check)."""
        drop = {canonical_residue(r) for r in residues}
        out = FragmentData()
        for context, angles in zip(self.contexts, self.angles):
            if context[0] not in drop:
                out.add(context, angles)
        out.sources = [s for s in self.sources]
        return out

    @property
    def residues(self) -> list:
        return sorted({c[0] for c in self.contexts})

    @property
    def n_frames(self) -> int:
        return int(sum(len(a) for a in self.angles))

    def save(self, path: str) -> None:
        """An .npz of plain arrays (no pickles), written to a temporary file and renamed into place, so a killed
        save leaves an earlier file at ``path`` as it was."""
        import json
        import os
        import uuid

        tmp = f"{path}.{uuid.uuid4().hex[:12]}.partial"
        try:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, contexts=np.array(self.contexts, dtype=str).reshape(-1, 3),
                                    counts=np.array([len(a) for a in self.angles]),
                                    angles=np.concatenate(self.angles) if self.angles else np.zeros((0, len(KINDS))),
                                    sources=np.array(json.dumps(self.sources)))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "FragmentData":
        """Read what :meth:`save` wrote; a missing, truncated or foreign file is refused in one sentence."""
        import json
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as data:
                out = cls()
                start = 0
                for context, count in zip(data["contexts"].tolist(), data["counts"].tolist()):
                    out.add(tuple(context), data["angles"][start:start + count])
                    start += count
                out.sources = json.loads(str(data["sources"]))
        except FileNotFoundError:
            raise ConfSampleError(f"fragment data file '{path}' does not exist.") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ConfSampleError(f"'{path}' is not a complete fragment data file (.npz with contexts, counts, angles "
                                  f"and sources; truncated or another kind of file?): {error}") from None
        return out


def fragment_angles(fragments, positions_nm) -> np.ndarray:
    """(B, n_fragments, 6) radians of ``fragments``' torsions at (B, n_atoms, 3) positions; NaN where absent."""
    x = np.asarray(positions_nm, dtype=float).reshape(-1, np.shape(positions_nm)[-2], 3)
    out = np.full((len(x), len(fragments), len(KINDS)), np.nan)
    for f, fragment in enumerate(fragments):
        kinds = fragment.kinds
        if kinds:
            columns = [KINDS.index(k) for k in kinds]
            out[:, f, columns] = dihedral_angles(x, fragment.quads(kinds))
    return out


def _constrained_copy(system: openmm.System) -> openmm.System:
    """A copy of ``system`` with every harmonic bond to a hydrogen also a constraint (for 2 fs steps)."""
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    hydrogen = [copy.getParticleMass(i).value_in_unit(unit.dalton) < 1.5 for i in range(copy.getNumParticles())]
    constrained = {tuple(sorted(copy.getConstraintParameters(c)[:2])) for c in range(copy.getNumConstraints())}
    for force in copy.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for b in range(force.getNumBonds()):
                i, j, length, _ = force.getBondParameters(b)
                if (hydrogen[i] or hydrogen[j]) and tuple(sorted((i, j))) not in constrained:
                    copy.addConstraint(i, j, length)
    return copy


def sample_fragment_md(systems, temperatures_K=(300.0, 500.0), length_ps: float = 100.0, sample_every_ps: float = 0.2,
                       timestep_fs: float = 2.0, friction_per_ps: float = 1.0, equilibration_ps: float = 5.0,
                       seed: int = 0, platform: str = "Reference", progress: bool = True, proposal=None,
                       moves_per_sample: int = 4) -> FragmentData:
    """MD of every system at every temperature; the fragments' torsions every ``sample_every_ps``.

    Parameters
    ----------
    systems : sequence of MolecularSystem
        Peptides (fragments from :func:`~.context.peptide_fragments`).
    temperatures_K : sequence of float, K
    length_ps, sample_every_ps, timestep_fs, friction_per_ps, equilibration_ps : float
    seed : int
        Run r of system s uses seed ``seed + 100 s + r``.
    proposal : callable ``molecular_system -> Proposal``, optional
        Exact MH moves made between samples (``moves_per_sample`` engine steps, with the runner's velocity
        correction), e.g. uniform fragment moves (``lambda m: FragmentProposal.for_system(m, "uniform")``):
        100 ps of MD visit one or two side-chain rotamers; with such moves every rotamer is sampled at its
        Boltzmann weight.

    Returns
    -------
    FragmentData, with one ``sources`` entry (system, temperature, ps, frames, wall seconds) per run.
    """
    from ...runner import as_engine, langevin_context, run_engine_steps
    from ...systems import MolecularSystem
    from ...units import kT_kJ_per_mol

    length_ps, sample_every_ps = positive_float(length_ps, "length_ps"), positive_float(sample_every_ps, "sample_every_ps")
    steps_per_sample = positive_int(round(sample_every_ps * 1000.0 / timestep_fs), "steps per sample")
    n_samples = positive_int(round(length_ps / sample_every_ps), "samples per run")
    systems = list(systems)
    data = FragmentData()
    runs = [(s, t) for s in range(len(systems)) for t in range(len(temperatures_K))]
    for s, t in progress_bar(runs, enabled=progress, desc="fragment MD", unit="run"):
        molsys = systems[s]
        if not isinstance(molsys, MolecularSystem):
            raise ConfSampleError(f"systems must be MolecularSystems, got {type(molsys).__name__}.")
        fragments = peptide_fragments(molsys.topology)
        constrained = MolecularSystem(molsys.name, _constrained_copy(molsys.system), molsys.topology,
                                      molsys.positions_nm, molsys.temperature_K, {})
        start = time.perf_counter()
        context = langevin_context(constrained, temperatures_K[t], friction_per_ps, timestep_fs, seed + 100 * s + t,
                                   platform, equilibration_steps=round(equilibration_ps * 1000.0 / timestep_fs))
        engine = None if proposal is None else as_engine(proposal(molsys), seed=[seed, s, t])
        kT = kT_kJ_per_mol(temperatures_K[t])
        frames = np.empty((n_samples,) + molsys.positions_nm.shape)
        for i in range(n_samples):
            context.getIntegrator().step(steps_per_sample)
            if engine is not None:
                run_engine_steps(context, engine, kT, moves_per_sample)
            frames[i] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        angles = fragment_angles(fragments, frames)
        for f, fragment in enumerate(fragments):
            data.add((fragment.residue, fragment.previous, fragment.next), angles[:, f])
        data.sources.append({"system": molsys.name, "temperature_K": float(temperatures_K[t]), "length_ps": length_ps,
                             "frames": n_samples, "wall_seconds": time.perf_counter() - start,
                             "moves": None if engine is None else type(engine.proposal).__name__,
                             "move_acceptance": None if engine is None else engine.statistics["acceptance_rate"]})
    return data
