"""Peptides built by the package's own code: capped dipeptides Ac-X-NMe, capped oligopeptides, trpzip2.

Every structure starts from a file that openmmtools ships and ends minimised in amber99sbildn + OBC
implicit solvent (``amber99sbildn.xml``, ``amber99_obc.xml``):

* :func:`dipeptide` (``dipeptide-VAL``, ...): openmmtools' alanine dipeptide with residue 2 mutated by
  PDBFixer (``applyMutations``), heavy atoms completed, hydrogens added at pH 7 (Lys+, Arg+, Asp-, Glu-,
  neutral His as HIE/HID by PDBFixer's choice), then minimised.
* :func:`capped_peptide` (``pentapeptide-AAAAA``, ...): Ac-X1..Xn-NMe, the backbone heavy atoms placed
  from ideal geometry (Engh & Huber bond lengths and angles, trans peptides, polyproline-II phi/psi of
  (-75, 145) degrees), side chains and hydrogens added by PDBFixer, then minimised.
* :func:`trpzip2_implicit` (``trpzip2-implicit``): the first NMR model of 1LE1 (SWTWENGKWTWK, charged
  termini) from openmmtools' ``trpzip2-explicit`` data, waters and ions removed, re-parametrised with the
  force field above and minimised. openmmtools ships that system as an old-format (pre-2003) Amber
  prmtop, which OpenMM cannot read; the atom names, residues and coordinates are read from it here.

Builds are cached: the minimised PDB and a JSON record (force field, source, energy, named torsions,
builder version) go to ``$CONFSAMPLE_CACHE`` or ``$XDG_CACHE_HOME/openmm-confsample`` (default
``~/.cache/openmm-confsample``), under ``systems/``, each written through a temporary file and a rename;
the JSON is written last and names the builder version, so a half-written or outdated entry is rebuilt.

Named torsions are those of :func:`~openmm_confsample.geometry.rotatable.detect_rotatable_torsions` with
side chains (``"phi:VAL2"``, ``"psi:VAL2"``, ``"chi1:VAL2"``, ...; ring torsions such as proline's phi are
left out, they cannot be turned rigidly).
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ..errors import ConfSampleError
from .builders import system_from_pdb
from .molecular import MolecularSystem

__all__ = ["STANDARD_RESIDUES", "ONE_LETTER", "FORCEFIELD_FILES", "DIPEPTIDE_RESIDUES", "cache_dir",
           "peptide_torsions", "dipeptide", "capped_peptide", "trpzip2_implicit", "PEPTIDE_SYSTEMS"]

#: The 20 standard amino acids, three-letter codes.
STANDARD_RESIDUES = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET",
                     "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")
ONE_LETTER = dict(zip("ARNDCQEGHILKMFPSTWYV", STANDARD_RESIDUES))
FORCEFIELD_FILES = ("amber99sbildn.xml", "amber99_obc.xml")
#: The dipeptides in the registry: all 20 standard residues (Gly, Pro, charged Lys, Arg, Asp, Glu, aromatic Phe,
#: Trp, Tyr, His (HD1, as PDBFixer places it), beta-branched Val, Thr, Ile, and Ala, Ser, Cys, Leu, Met, Asn, Gln).
DIPEPTIDE_RESIDUES = ("ALA", "GLY", "PRO", "VAL", "THR", "ILE", "LEU", "MET", "PHE", "TRP", "SER", "ASN", "LYS",
                      "ASP", "GLU", "GLN", "ARG", "CYS", "HIS", "TYR")
#: Bumped whenever a builder's output changes: cached entries of other versions are rebuilt.
BUILDER_VERSION = 2
_TEMPERATURE_K = 300.0


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------

def cache_dir() -> str:
    """Folder of built systems: ``$CONFSAMPLE_CACHE/systems``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)."""
    root = os.environ.get("CONFSAMPLE_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "openmm-confsample")
    return os.path.join(root, "systems")


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.partial"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _cached_pdb(key: str, build, source: str) -> tuple[str, dict]:
    """``(pdb_path, record)`` of the cached build ``key``; ``build()`` -> (topology, positions nm) when absent."""
    folder = cache_dir()
    pdb_path, json_path = os.path.join(folder, f"{key}.pdb"), os.path.join(folder, f"{key}.json")
    wanted = {"builder_version": BUILDER_VERSION, "forcefield": list(FORCEFIELD_FILES), "source": source}
    if os.path.isfile(json_path) and os.path.isfile(pdb_path):
        try:
            with open(json_path) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            record = {}
        if all(record.get(k) == v for k, v in wanted.items()):
            return pdb_path, record
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ConfSampleError(f"cannot create the system cache folder '{folder}' ({exc}); set CONFSAMPLE_CACHE "
                              "to a writable folder.") from exc
    topology, positions_nm, energy_kJ = _minimised(*build())
    buffer = io.StringIO()
    app.PDBFile.writeFile(topology, positions_nm * 10.0 * unit.angstrom, buffer, keepIds=True)
    _write_atomically(pdb_path, buffer.getvalue())
    record = {**wanted, "name": key, "minimised_energy_kJ_per_mol": energy_kJ,
              "residues": [r.name for r in topology.residues()], "n_atoms": topology.getNumAtoms()}
    _write_atomically(json_path, json.dumps(record, indent=2, sort_keys=True))  # last: it marks the entry done
    return pdb_path, record


def _minimised(topology: app.Topology, positions_nm: np.ndarray) -> tuple[app.Topology, np.ndarray, float]:
    """Minimise in amber99sbildn + OBC (Reference platform: deterministic); returns positions nm, energy kJ/mol."""
    forcefield = app.ForceField(*FORCEFIELD_FILES)
    try:
        system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=None)
    except ValueError as exc:
        raise ConfSampleError(f"the force field {list(FORCEFIELD_FILES)} cannot parametrize the built peptide "
                              f"({str(exc).strip().splitlines()[0]}).") from exc
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_nm)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 5000)
    state = context.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(energy):
        raise ConfSampleError("minimising the built peptide gave a non-finite energy.")
    return topology, state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), float(energy)


def _from_cache(name: str, key: str, build, source: str, description: str) -> MolecularSystem:
    pdb_path, record = _cached_pdb(key, build, source)
    molsys = system_from_pdb(pdb_path, FORCEFIELD_FILES, _TEMPERATURE_K, name=name, torsions={})
    molsys.torsions = peptide_torsions(molsys.topology)
    molsys.description = f"{description} with {', '.join(FORCEFIELD_FILES)}; cached at {pdb_path}"
    molsys.build_record = record
    return molsys


def peptide_torsions(topology) -> dict[str, tuple[int, int, int, int]]:
    """phi, psi and chi1..chi4 of every residue, named like ``"phi:VAL2"`` (ring torsions left out)."""
    from ..geometry.rotatable import detect_rotatable_torsions

    return dict(detect_rotatable_torsions(topology, include_chi=True))


def _residue_code(residue: str) -> str:
    code = str(residue).upper()
    code = ONE_LETTER.get(code, code) if len(code) == 1 else code
    if code not in STANDARD_RESIDUES:
        raise ConfSampleError(f"residue '{residue}' is not one of the 20 standard amino acids "
                              f"({', '.join(STANDARD_RESIDUES)} or their one-letter codes).")
    return code


def _openmmtools_data(*parts: str) -> str:
    import openmmtools

    path = os.path.join(os.path.dirname(openmmtools.__file__), "data", *parts)
    if not os.path.exists(path):
        raise ConfSampleError(f"openmmtools' data file {path} is missing; reinstall openmmtools.")
    return path


def _complete_with_pdbfixer(pdb_text: str, mutations=()) -> tuple[app.Topology, np.ndarray]:
    """PDBFixer on a PDB text: mutations, missing heavy atoms, hydrogens at pH 7 (no missing residues)."""
    from pdbfixer import PDBFixer

    fixer = PDBFixer(pdbfile=io.StringIO(pdb_text))
    if mutations:
        fixer.applyMutations(list(mutations), next(iter(fixer.topology.chains())).id)
    fixer.findMissingResidues()
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    return fixer.topology, np.array(fixer.positions.value_in_unit(unit.nanometer))


# ------------------------------------------------------------------------------------------------
# capped dipeptides by mutation
# ------------------------------------------------------------------------------------------------

def dipeptide(residue: str) -> MolecularSystem:
    """Ac-X-NMe for a standard residue X (three- or one-letter code), named ``dipeptide-X``."""
    code = _residue_code(residue)

    def build():
        pdb = app.PDBFile(_openmmtools_data("alanine-dipeptide-explicit", "alanine-dipeptide.pdb"))
        modeller = app.Modeller(pdb.topology, pdb.positions)
        modeller.delete([r for r in modeller.topology.residues() if r.name == "HOH"])
        buffer = io.StringIO()
        app.PDBFile.writeFile(modeller.topology, modeller.positions, buffer)
        return _complete_with_pdbfixer(buffer.getvalue(), [] if code == "ALA" else [f"ALA-2-{code}"])

    return _from_cache(f"dipeptide-{code}", f"dipeptide-{code}", build,
                       f"openmmtools alanine-dipeptide-explicit, ALA2->{code} (PDBFixer)", f"Ac-{code}-NMe")


# ------------------------------------------------------------------------------------------------
# capped peptides from ideal geometry
# ------------------------------------------------------------------------------------------------

#: Ideal backbone geometry (Engh & Huber 1991), Angstrom and degrees.
_BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329, "C-O": 1.231, "CH3-C": 1.52, "N-CH3": 1.458}
_ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7, "N-C-O": 122.7, "N-CA-CB": 110.5}
_BOND["CA-CB"] = 1.53
#: Torsion C-N-CA-CB of an L amino acid, degrees (-120 in openmmtools' alanine dipeptide).
_CB_TORSION = -122.5


def _place(a, b, c, bond: float, angle_deg: float, torsion_deg: float) -> np.ndarray:
    """Atom d with |cd| = bond, angle b-c-d and torsion a-b-c-d (NeRF)."""
    angle, torsion = math.radians(angle_deg), math.radians(torsion_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d_local = bond * np.array([-math.cos(angle), math.sin(angle) * math.cos(torsion), math.sin(angle) * math.sin(torsion)])
    return c + d_local[0] * bc + d_local[1] * m + d_local[2] * n


def _backbone_pdb(codes, phi_deg: float = -75.0, psi_deg: float = 145.0) -> str:
    """PDB text of the heavy backbone atoms (and CB) of Ac-codes-NMe (trans peptides, one phi/psi for every residue)."""
    chain = [np.array([0.0, 0.0, 0.0]), np.array([_BOND["CH3-C"], 0.0, 0.0])]  # ACE CH3, C
    chain.append(_place(np.array([0.0, 1.0, 0.0]), chain[0], chain[1], _BOND["C-N"], _ANGLE["CA-C-N"], 180.0))
    atoms = [("ACE", "CH3", chain[0]), ("ACE", "C", chain[1])]
    for index, code in enumerate(codes):
        n = chain[-1]
        ca = _place(chain[-3], chain[-2], n, _BOND["N-CA"], _ANGLE["C-N-CA"], 180.0)  # omega
        c = _place(chain[-2], n, ca, _BOND["CA-C"], _ANGLE["N-CA-C"], phi_deg)
        chain += [ca, c]
        next_n = _place(n, ca, c, _BOND["C-N"], _ANGLE["CA-C-N"], psi_deg)
        atoms += [(code, "N", n), (code, "CA", ca), (code, "C", c)]
        if code != "GLY":  # CB on the L side: PDBFixer alone put some on the D side (Val before Pro)
            atoms.append((code, "CB", _place(c, n, ca, _BOND["CA-CB"], _ANGLE["N-CA-CB"], _CB_TORSION)))
        chain.append(next_n)
    methyl = _place(chain[-3], chain[-2], chain[-1], _BOND["N-CH3"], _ANGLE["C-N-CA"], 180.0)
    atoms += [("NME", "N", chain[-1]), ("NME", "C", methyl)]
    # carbonyl O of ACE and of every residue: in the peptide plane, cis to the next CA (trans peptide)
    by_residue = [[]]
    for resname, name, xyz in atoms:
        if name in ("N", "CH3") and by_residue[-1]:
            by_residue.append([])
        by_residue[-1].append((resname, name, xyz))
    for r in range(len(by_residue) - 1):
        own = {name: xyz for _, name, xyz in by_residue[r]}
        after = {name: xyz for _, name, xyz in by_residue[r + 1]}
        after_ca = after.get("CA", after.get("C"))
        by_residue[r].append((by_residue[r][0][0], "O",
                              _place(after_ca, after["N"], own["C"], _BOND["C-O"], _ANGLE["N-C-O"], 0.0)))
    lines, serial = [], 1
    for r, residue in enumerate(by_residue):
        for resname, name, xyz in residue:
            element = name[0]
            lines.append(f"ATOM  {serial:5d} {name:<4s} {resname:>3s} A{r + 1:4d}    "
                         f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00  0.00          {element:>2s}")
            serial += 1
    return "\n".join(lines + ["TER", "END"]) + "\n"


def capped_peptide(sequence, name: str | None = None) -> MolecularSystem:
    """Ac-X1..Xn-NMe from a sequence of standard residues (``"AAAAA"``, ``"KVPFE"`` or three-letter codes).

    Named ``name`` or ``peptide-<one-letter sequence>``; built once and cached (module docstring).
    """
    if isinstance(sequence, str):
        items = [sequence] if sequence.upper() in STANDARD_RESIDUES else list(sequence)
    else:
        items = list(sequence)
    if not items:
        raise ConfSampleError("sequence is empty; give at least one standard residue, e.g. 'AAAAA'.")
    codes = [_residue_code(item) for item in items]
    letters = "".join({v: k for k, v in ONE_LETTER.items()}[code] for code in codes)
    key = f"peptide-{letters}"
    return _from_cache(name or key, key, lambda: _complete_with_pdbfixer(_backbone_pdb(codes)),
                       f"ideal backbone (phi, psi) = (-75, 145), {letters} (PDBFixer side chains)",
                       f"Ac-{'-'.join(codes)}-NMe")


# ------------------------------------------------------------------------------------------------
# trpzip2 from openmmtools' old-format Amber files
# ------------------------------------------------------------------------------------------------

def _old_prmtop_sections(path: str):
    """Atom names, residue labels and first atoms of an old-format (no %FLAG) Amber prmtop."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    if any(line.startswith("%FLAG") for line in lines[:5]):
        raise ConfSampleError(f"{path} is a new-format prmtop; read it with openmm.app.AmberPrmtopFile.")
    pointers = "".join(line.ljust(72)[:72] for line in lines[1:4])
    values = [int(pointers[i:i + 6]) for i in range(0, 6 * 30, 6)]
    n_atoms, n_types, n_residues = values[0], values[1], values[11]
    cursor = 4

    def take(count, per_line, width):
        nonlocal cursor
        n_lines = math.ceil(count / per_line)
        text = "".join(line.ljust(per_line * width)[:per_line * width] for line in lines[cursor:cursor + n_lines])
        cursor += n_lines
        return [text[i * width:(i + 1) * width] for i in range(count)]

    names = [s.strip() for s in take(n_atoms, 20, 4)]
    for count, per_line, width in ((n_atoms, 5, 16), (n_atoms, 5, 16), (n_atoms, 12, 6), (n_atoms, 12, 6),
                                   (n_types * n_types, 12, 6)):  # charges, masses, types, exclusions, nb index
        take(count, per_line, width)
    labels = [s.strip() for s in take(n_residues, 20, 4)]
    first_atoms = [int(s) - 1 for s in take(n_residues, 12, 6)]
    return names, labels, first_atoms


def _trpzip2_pdb() -> str:
    names, labels, first_atoms = _old_prmtop_sections(_openmmtools_data("trpzip2-explicit", "trpzip2.prmtop"))
    with open(_openmmtools_data("trpzip2-explicit", "trpzip2.crd")) as handle:
        crd = handle.read().split("\n")
    n_atoms = int(crd[1].split()[0])
    numbers = "".join(line.ljust(72)[:72] for line in crd[2:2 + math.ceil(3 * n_atoms / 6)])
    xyz = np.array([float(numbers[i * 12:(i + 1) * 12]) for i in range(3 * n_atoms)]).reshape(n_atoms, 3)
    protein = [r for r, label in enumerate(labels) if label in STANDARD_RESIDUES]
    lines, serial = [], 1
    for number, r in enumerate(protein, start=1):
        stop = first_atoms[r + 1] if r + 1 < len(first_atoms) else n_atoms
        for a in range(first_atoms[r], stop):
            x, y, z = xyz[a]
            lines.append(f"ATOM  {serial:5d} {names[a]:<4s} {labels[r]:>3s} A{number:4d}    "
                         f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {names[a][0]:>2s}")
            serial += 1
    return "\n".join(lines + ["TER", "END"]) + "\n"


def trpzip2_implicit() -> MolecularSystem:
    """trpzip2 (SWTWENGKWTWK, 1LE1 model 1) without waters and ions, amber99sbildn + OBC, minimised."""

    def build():
        pdb = app.PDBFile(io.StringIO(_trpzip2_pdb()))
        return pdb.topology, np.array(pdb.positions.value_in_unit(unit.nanometer))

    return _from_cache("trpzip2-implicit", "trpzip2-implicit", build,
                       "openmmtools trpzip2-explicit (1LE1 model 1), waters and ions removed",
                       "trpzip2 SWTWENGKWTWK")


def _registry() -> dict:
    systems = {f"dipeptide-{code}": (lambda code=code: dipeptide(code)) for code in DIPEPTIDE_RESIDUES}
    systems["pentapeptide-AAAAA"] = lambda: capped_peptide("AAAAA", name="pentapeptide-AAAAA")
    systems["pentapeptide-KVPFE"] = lambda: capped_peptide("KVPFE", name="pentapeptide-KVPFE")
    systems["trpzip2-implicit"] = trpzip2_implicit
    return systems


#: name -> factory of the peptide systems the registry lists.
PEPTIDE_SYSTEMS = _registry()
