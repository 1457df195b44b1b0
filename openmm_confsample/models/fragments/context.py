"""Fragments of a peptide and what a fragment model is conditioned on.

A **fragment** is one residue's torsions that rigid rotations can turn: phi, psi and chi1..chi4 (proline's
phi and chi, which turn ring bonds, are not among them). Its **context** is its residue type and its
neighbours' types; one model serves every peptide whose residue types it has seen (module
:mod:`.model`).

The context vector (what the model's network reads) is, for the residue itself, a one-hot over the 20
standard amino acids and twelve hand-chosen features (Gly, Pro, beta-branched, aromatic, positive,
negative, neutral polar, number of chi angles / 4, and for chi1..chi4 whether that torsion turns a bond
between two tetrahedral atoms: a staggered, three-fold torsion, rather than one ending on a planar group or
absent), so that a residue type never seen in training can still be placed by its features (zero-shot); for
each neighbour, a one-hot over the 20 types plus ACE/NME caps and a chain end, with the same features.
(The chi-bond features were added when a model without them, trained without Leu, proposed Leu's chi2 at
+-60-90 degrees, where the planar-ended chi2 of Phe, Trp, Asn and Asp lie, instead of the trans of the
tetrahedral chi2 it shares with Ile, Met, Lys and Glu: side-chain acceptance 6 %.) A type the model never saw
gets an all-zero one-hot (training drops the one-hot at random so that this means "predict from the features").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import ConfSampleError

__all__ = ["KINDS", "BLOCKS", "STANDARD_RESIDUES", "NEIGHBOUR_TOKENS", "Fragment", "peptide_fragments",
           "fragments_from_names", "residue_features", "N_FEATURES"]

#: Torsion kinds of a fragment, in order.
KINDS = ("phi", "psi", "chi1", "chi2", "chi3", "chi4")
#: The kinds as pairs: each pair is one two-dimensional table of the fragment density.
BLOCKS = (("phi", "psi"), ("chi1", "chi2"), ("chi3", "chi4"))
STANDARD_RESIDUES = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET",
                     "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")
#: What a neighbour can be besides a standard residue: a cap, or nothing (chain end).
NEIGHBOUR_TOKENS = STANDARD_RESIDUES + ("ACE", "NME", "END")
#: Residue names that mean a standard residue (protonation states, disulphide Cys).
_ALIASES = {"HIE": "HIS", "HID": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "CYX": "CYS",
            "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS", "NMA": "NME"}
_N_CHI = {"ALA": 0, "GLY": 0, "PRO": 0, "CYS": 1, "SER": 1, "THR": 1, "VAL": 1, "ASN": 2, "ASP": 2, "HIS": 2,
          "ILE": 2, "LEU": 2, "PHE": 2, "TRP": 2, "TYR": 2, "GLN": 3, "GLU": 3, "MET": 3, "ARG": 4, "LYS": 4}
_GROUPS = {"beta_branched": "VIT", "aromatic": "FWYH", "positive": "KR", "negative": "DE", "polar": "STNQCY"}
#: Per residue, chi1..chi4: 1 where the torsion turns a bond between two tetrahedral (sp3) atoms.
_TETRAHEDRAL_CHI = {"CYS": (1,), "SER": (1,), "THR": (1,), "VAL": (1,), "ASN": (1, 0), "ASP": (1, 0), "HIS": (1, 0),
                    "PHE": (1, 0), "TRP": (1, 0), "TYR": (1, 0), "ILE": (1, 1), "LEU": (1, 1), "GLN": (1, 1, 0),
                    "GLU": (1, 1, 0), "MET": (1, 1, 1), "ARG": (1, 1, 1, 0), "LYS": (1, 1, 1, 1)}
_ONE = dict(zip("ARNDCQEGHILKMFPSTWYV", STANDARD_RESIDUES))
N_FEATURES = 12


def canonical_residue(name: str) -> str:
    """The standard name of a residue name (HIE -> HIS, ...); other names unchanged."""
    return _ALIASES.get(str(name).upper(), str(name).upper())


def residue_features(name: str) -> np.ndarray:
    """(12,) float: Gly, Pro, beta-branched, aromatic, positive, negative, neutral polar, n_chi / 4, and for chi1..4
    1 where it turns a bond between two tetrahedral atoms (all 0 if unknown)."""
    name = canonical_residue(name)
    if name not in STANDARD_RESIDUES:
        return np.zeros(N_FEATURES)
    letter = {v: k for k, v in _ONE.items()}[name]
    groups = [float(letter in _GROUPS[g]) for g in ("beta_branched", "aromatic", "positive", "negative", "polar")]
    tetrahedral = list(_TETRAHEDRAL_CHI.get(name, ())) + [0] * (4 - len(_TETRAHEDRAL_CHI.get(name, ())))
    return np.array([float(name == "GLY"), float(name == "PRO"), *groups, _N_CHI[name] / 4.0, *map(float, tetrahedral)])


@dataclass(frozen=True)
class Fragment:
    """One residue's movable torsions and its neighbours.

    Attributes
    ----------
    name : str
        E.g. ``"VAL2"`` (residue name and number).
    residue : str
        Residue name as in the topology (``"VAL"``, ``"HIE"``, ``"NLE"``, ...).
    torsions : dict kind -> (torsion name, (i, j, k, l))
        The fragment's movable torsions by kind (``"phi"``, ``"psi"``, ``"chi1"``, ...), 0-based atoms.
    previous, next : str
        Neighbour residue names (``"ACE"``, ``"ALA"``, ...) or ``"END"`` at a chain end.
    """

    name: str
    residue: str
    torsions: dict = field(default_factory=dict)
    previous: str = "END"
    next: str = "END"

    @property
    def kinds(self) -> tuple:
        return tuple(k for k in KINDS if k in self.torsions)

    @property
    def chi_kinds(self) -> tuple:
        return tuple(k for k in self.kinds if k.startswith("chi"))

    @property
    def standard(self) -> bool:
        return canonical_residue(self.residue) in STANDARD_RESIDUES

    def quads(self, kinds) -> np.ndarray:
        return np.array([self.torsions[k][1] for k in kinds], dtype=int).reshape(-1, 4)

    def torsion_names(self, kinds) -> list:
        return [self.torsions[k][0] for k in kinds]

    def to_config(self) -> dict:
        return {"name": self.name, "residue": self.residue, "previous": self.previous, "next": self.next,
                "torsions": {k: [n, list(map(int, q))] for k, (n, q) in self.torsions.items()}}

    @classmethod
    def from_config(cls, config: dict) -> "Fragment":
        torsions = {k: (str(v[0]), tuple(int(a) for a in v[1])) for k, v in config["torsions"].items()}
        return cls(config["name"], config["residue"], torsions, config.get("previous", "END"), config.get("next", "END"))


def peptide_fragments(topology, include_rings: bool = False) -> list[Fragment]:
    """The fragments of every peptide residue with at least one movable torsion, in chain order.

    Parameters
    ----------
    topology : openmm.app.Topology (or anything :func:`detect_rotatable_torsions` takes)
    include_rings : bool
        Refused when True: a ring torsion (proline phi) cannot be turned by a rigid rotation, so it is never
        part of a fragment; the argument exists to say so in one sentence.

    Torsions come from :func:`~openmm_confsample.geometry.rotatable.detect_rotatable_torsions` with side
    chains (``"phi:VAL2"``, ...). Residues of non-peptide molecules (ligands) get no fragment.
    """
    if include_rings:
        raise ConfSampleError("ring torsions (e.g. proline phi) cannot be part of a fragment: a rigid rotation "
                              "cannot turn a bond inside a ring; fragments keep them fixed.")
    import mdtraj

    from ...geometry.rotatable import detect_rotatable_torsions

    md_topology = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
    atoms = list(md_topology.atoms)
    by_residue: dict[int, dict] = {}
    for name, quad in detect_rotatable_torsions(md_topology, include_chi=True):
        kind = name.split(":", 1)[0]
        if kind in KINDS:
            by_residue.setdefault(atoms[quad[1]].residue.index, {})[kind] = (name, quad)  # j: N, CA or CB of the residue
    fragments = []
    for index in sorted(by_residue):
        residue = md_topology.residue(index)
        fragments.append(Fragment(f"{residue.name}{residue.resSeq}", residue.name, by_residue[index],
                                  _neighbour(md_topology, residue, -1), _neighbour(md_topology, residue, +1)))
    return fragments


def _neighbour(md_topology, residue, step: int) -> str:
    """The bonded residue before (``step=-1``) or after (``+1``) ``residue`` in its chain, or 'END'."""
    position = residue.index + step
    if not 0 <= position < md_topology.n_residues:
        return "END"
    other = md_topology.residue(position)
    if other.chain.index != residue.chain.index:
        return "END"
    ours, theirs = ("N", "C") if step < 0 else ("C", "N")
    mine = [a for a in residue.atoms if a.name == ours]
    partner = [a for a in other.atoms if a.name == theirs]
    if not mine or not partner:
        return "END"
    bonded = any({b[0].index, b[1].index} == {mine[0].index, partner[0].index} for b in md_topology.bonds)
    return other.name if bonded else "END"


def fragments_from_names(torsions: dict, groups) -> list[Fragment]:
    """Fragments from a system's named torsions: ``groups`` is ``[(name, residue, {kind: torsion name}), ...]``.

    For systems that are not peptides (e.g. :func:`~openmm_confsample.testing.coupled_torsion_chain`):
    ``fragments_from_names(chain.torsions, [("R1", "UNK", {"phi": "t1", "psi": "t2"}), ...])``. Neighbours
    are the previous and next group's residue names.
    """
    groups = list(groups)
    fragments = []
    for g, (name, residue, kinds) in enumerate(groups):
        unknown = [k for k in kinds if k not in KINDS]
        missing = [t for t in kinds.values() if t not in torsions]
        if unknown or missing:
            raise ConfSampleError(f"fragment '{name}': kinds must be among {KINDS} and torsions among the system's "
                                  f"{list(torsions)}; got kinds {unknown} and torsions {missing}.")
        fragments.append(Fragment(name, residue, {k: (t, tuple(torsions[t])) for k, t in kinds.items()},
                                  groups[g - 1][1] if g > 0 else "END",
                                  groups[g + 1][1] if g + 1 < len(groups) else "END"))
    return fragments
