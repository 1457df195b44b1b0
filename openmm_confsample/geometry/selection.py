"""Which torsions a model learns and a move turns: the user's choice, by name, kind or "all".

``select_torsions(system, "phi,psi,chi1")`` or ``select_torsions(system, "all")`` returns name -> (i, j, k, l).
The candidates are the system's own named torsions (e.g. ``phi``/``psi`` of a dipeptide) followed by every
rotatable torsion :func:`~openmm_confsample.geometry.rotatable.detect_rotatable_torsions` finds: for
peptides phi, psi and chi1-chi4 per residue from mdtraj's atom-name templates (named ``"chi1:SER2"``), for
other molecules every single, non-ring bond between heavy atoms that is not an amide C-N; rotors whose moving
side is only hydrogens (methyl, -NH3+, -OH, -SH) come only with ``include_methyl``. A detected torsion about
the same bond as one the system already names keeps the system's name, so a dipeptide's backbone stays
``phi``/``psi`` whichever way it is selected.

A token of ``spec`` selects a torsion by its full name (``"chi1:SER2"``) or by its kind, the part before the
colon (``"chi1"`` selects every residue's chi1).
"""

from __future__ import annotations

from ..errors import ConfSampleError
from .rotatable import detect_rotatable_torsions

__all__ = ["candidate_torsions", "select_torsions", "torsion_table"]


def candidate_torsions(molecular_system, include_methyl: bool = False) -> dict[str, tuple[int, int, int, int]]:
    """The system's named torsions, then every rotatable torsion found in its topology (name -> quad)."""
    candidates = {name: tuple(quad) for name, quad in molecular_system.torsions.items()}
    named_bonds = {frozenset(quad[1:3]) for quad in candidates.values()}
    for name, quad in detect_rotatable_torsions(molecular_system.topology, molecular_system.positions_nm,
                                                include_methyl=include_methyl, include_chi=True):
        if frozenset(quad[1:3]) in named_bonds or name in candidates:
            continue
        candidates[name] = tuple(int(a) for a in quad)
    return candidates


def _kind(name: str) -> str:
    return name.split(":", 1)[0]


def select_torsions(molecular_system, spec=None, include_methyl: bool = False) -> dict[str, tuple[int, int, int, int]]:
    """The torsions ``spec`` names, as name -> (i, j, k, l) in candidate order.

    Parameters
    ----------
    molecular_system : MolecularSystem
    spec : None, "all", a comma-separated string ("phi,psi,chi1") or a sequence of names/kinds
        None: the system's named torsions. "all": every candidate (see the module docstring).
    include_methyl : bool
        Also offer hydrogen-only rotors (methyl, hydroxyl, ...).

    Raises
    ------
    ConfSampleError
        A token that matches no candidate (the sentence lists what the system has), or an empty selection.

    Examples
    --------
    >>> from openmm_confsample.systems import get_system
    >>> sorted(select_torsions(get_system("alanine-dipeptide-vacuum"), "all"))
    ['phi', 'psi']
    """
    if spec is None:
        if not molecular_system.torsions:
            raise ConfSampleError(f"system '{molecular_system.name}' names no torsions; select some with "
                                  "torsions='all' or by name (confsample torsions SYSTEM lists them).")
        return dict(molecular_system.torsions)
    candidates = candidate_torsions(molecular_system, include_methyl)
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    tokens = [t for t in tokens if t]
    if tokens == ["all"]:
        selected = candidates
    else:
        wanted = set()
        for token in tokens:
            matches = [name for name in candidates if name == token or _kind(name) == token]
            if not matches:
                raise ConfSampleError(
                    f"system '{molecular_system.name}' has no torsion named or of kind '{token}'; it has "
                    f"{', '.join(candidates) or 'none'} (include_methyl=True adds hydrogen rotors).")
            wanted.update(matches)
        selected = {name: quad for name, quad in candidates.items() if name in wanted}
    if not selected:
        raise ConfSampleError(f"no rotatable torsion found in system '{molecular_system.name}'.")
    return selected


def _atom_label(atom) -> str:
    return f"{atom.residue.name}{atom.residue.id}:{atom.name}"


def torsion_table(molecular_system, spec="all", include_methyl: bool = False) -> list[tuple[str, tuple, str]]:
    """Rows (name, atom indices, atom names such as ``"ACE1:C-ALA2:N-ALA2:CA-ALA2:C"``) of the selection."""
    atoms = list(molecular_system.topology.atoms())
    return [(name, quad, "-".join(_atom_label(atoms[i]) for i in quad))
            for name, quad in select_torsions(molecular_system, spec, include_methyl).items()]
