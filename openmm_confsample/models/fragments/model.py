"""Fragment densities: untrained (uniform, von Mises per torsion kind) and learned (one model, many residues).

Every density here has one call, ``tables_for(fragments) -> list[FragmentTable]``: the exact,
piecewise-constant density of each fragment (:mod:`.tables`), computed once when a move is built.

:class:`FragmentTorsionModel` is the learned one. A small network reads a fragment's context (residue
one-hot and features, neighbours' one-hots and features: :mod:`.context`) and returns, per block of two
torsion kinds, the coefficients of a two-dimensional Fourier series of order K; the series, evaluated at
the centres of an ``n_grid x n_grid`` grid and normalised by a softmax over the cells, *is* the block's
table. What is trained is therefore exactly what the move samples and evaluates: no tabulation error, no
separate density estimate. (The torus score model of the torsion-diffusion work was the alternative; on a
fragment of 2-6 torsions this direct maximum-likelihood density is exact by construction, costs one
table look-up per move, and is compared with it on alanine dipeptide in ``benchmarks/fragment_benchmark.py``.)

Fallbacks, said once per model and residue in a warning (bad input the move accepts):

* a standard residue type the model never saw: its one-hot is left empty and the network predicts from its
  features and neighbours (zero-shot; training drops one-hots at random so that this is what it learned);
* a residue the model has no features for (non-standard, e.g. NLE, or a system that is not a peptide): the
  uniform table (every torsion of that fragment proposed uniformly);
* ``strict=True`` turns both into one ConfSampleError naming the residues.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from ...errors import ConfSampleError
from ..checkpoint import load_checkpoint, save_checkpoint
from .context import BLOCKS, KINDS, N_FEATURES, NEIGHBOUR_TOKENS, STANDARD_RESIDUES, canonical_residue, residue_features
from .tables import FragmentTable

__all__ = ["UniformFragmentDensity", "VonMisesFragmentDensity", "FragmentNetwork", "FragmentTorsionModel",
           "context_vector", "CONTEXT_SIZE", "fourier_basis"]

_KIND = "fragment_torsion"
#: Length of the context vector: residue one-hot + features, then previous and next neighbour.
CONTEXT_SIZE = (len(STANDARD_RESIDUES) + N_FEATURES) + 2 * (len(NEIGHBOUR_TOKENS) + N_FEATURES)


def _one_hot(token: str, vocabulary) -> np.ndarray:
    out = np.zeros(len(vocabulary))
    if token in vocabulary:
        out[vocabulary.index(token)] = 1.0
    return out


def context_vector(residue: str, previous: str, following: str, seen_residues=STANDARD_RESIDUES,
                   seen_neighbours=NEIGHBOUR_TOKENS, residue_one_hot: bool = True,
                   neighbours: bool = True) -> np.ndarray:
    """(CONTEXT_SIZE,) float context of a fragment.

    The residue's one-hot is empty when it is not in ``seen_residues`` (or ``residue_one_hot`` is False); a
    neighbour's one-hot and features are empty when it is not in ``seen_neighbours`` (or ``neighbours`` is
    False): "unknown", which training taught the network to mean "averaged over what was seen".
    """
    name = canonical_residue(residue)
    own = np.concatenate([_one_hot(name, STANDARD_RESIDUES) * float(residue_one_hot and name in seen_residues),
                          residue_features(name)])
    parts = [own]
    for token in (canonical_residue(previous), canonical_residue(following)):
        known = neighbours and token in seen_neighbours
        parts.append(np.concatenate([_one_hot(token, NEIGHBOUR_TOKENS), residue_features(token)]) * float(known))
    return np.concatenate(parts)


def fourier_basis(n_grid: int, order: int) -> torch.Tensor:
    """(n_grid, 2 order + 1) float32: 1, cos(k x), sin(k x) for k = 1..order at the grid's cell centres.

    A block's log-density is F C F^T for its (2 order + 1)^2 coefficients C: separable, so a table costs two
    small matrix products instead of one with n_grid^2 rows.
    """
    centres = -math.pi + (np.arange(n_grid) + 0.5) * (2.0 * math.pi / n_grid)
    columns = [np.ones(n_grid)]
    for k in range(1, order + 1):
        columns += [np.cos(k * centres), np.sin(k * centres)]
    return torch.tensor(np.stack(columns, axis=1), dtype=torch.float32)


def _frequency_squared(order: int) -> torch.Tensor:
    """(2 order + 1)^2: k^2 + l^2 of each basis function (the smoothness penalty's weights)."""
    one = np.array([0] + [k for k in range(1, order + 1) for _ in range(2)], dtype=float)
    return torch.tensor((one[:, None] ** 2 + one[None, :] ** 2).ravel(), dtype=torch.float32)


class FragmentNetwork(nn.Module):
    """Context (B, CONTEXT_SIZE) -> log-probabilities (B, 3, n_grid, n_grid) of the three blocks' cells."""

    def __init__(self, n_grid: int = 72, order: int = 6, hidden: int = 128):
        super().__init__()
        self.n_grid, self.order, self.hidden = int(n_grid), int(order), int(hidden)
        n_basis = (2 * self.order + 1) ** 2
        self.body = nn.Sequential(nn.Linear(CONTEXT_SIZE, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, len(BLOCKS) * n_basis))
        self.register_buffer("basis", fourier_basis(self.n_grid, self.order), persistent=False)
        self.register_buffer("frequency_squared", _frequency_squared(self.order), persistent=False)

    def coefficients(self, context: torch.Tensor) -> torch.Tensor:
        return self.body(context).reshape(len(context), len(BLOCKS), -1)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        m = 2 * self.order + 1
        coefficients = self.coefficients(context).reshape(len(context), len(BLOCKS), m, m)
        logits = torch.einsum("ia,nbac,jc->nbij", self.basis, coefficients, self.basis)
        log_p = torch.log_softmax(logits.reshape(len(context), len(BLOCKS), -1), dim=-1)
        return log_p.reshape(len(context), len(BLOCKS), self.n_grid, self.n_grid)

    def config(self) -> dict:
        return {"n_grid": self.n_grid, "order": self.order, "hidden": self.hidden}


class UniformFragmentDensity:
    """Every fragment torsion uniform on [-pi, pi): the untrained baseline."""

    def __init__(self, n_grid: int = 72):
        self.n_grid = int(n_grid)

    def tables_for(self, fragments, strict: bool = False, uniform_weight=None) -> list[FragmentTable]:
        return [FragmentTable.uniform(self.n_grid) for _ in fragments]

    def get_config(self) -> dict:
        return {"type": "uniform", "n_grid": self.n_grid}


class VonMisesFragmentDensity:
    """Independent von Mises per torsion kind, tabulated: an untrained density with a shape.

    Parameters
    ----------
    kappa : float or dict kind -> float
    mu : float or dict kind -> float, radians
    n_grid : int
    uniform_weight : float in [0, 1)
    """

    def __init__(self, kappa=1.0, mu=0.0, n_grid: int = 72, uniform_weight: float = 0.0):
        self.kappa = {k: float(kappa[k] if isinstance(kappa, dict) else kappa) for k in KINDS}
        self.mu = {k: float(mu[k] if isinstance(mu, dict) else mu) for k in KINDS}
        if any(not math.isfinite(v) or v < 0 for v in self.kappa.values()):
            raise ConfSampleError(f"kappa must be finite and non-negative, got {self.kappa}.")
        self.n_grid, self.uniform_weight = int(n_grid), float(uniform_weight)
        centres = -math.pi + (np.arange(self.n_grid) + 0.5) * (2.0 * math.pi / self.n_grid)
        axis = {k: np.exp(self.kappa[k] * (np.cos(centres - self.mu[k]) - 1.0)) for k in KINDS}
        self._table = FragmentTable(np.stack([np.outer(axis[a], axis[b]) for a, b in BLOCKS]), self.uniform_weight,
                                    "von Mises")

    def tables_for(self, fragments, strict: bool = False, uniform_weight=None) -> list[FragmentTable]:
        return [self._table for _ in fragments]

    def get_config(self) -> dict:
        return {"type": "von_mises", "kappa": self.kappa, "mu": self.mu, "n_grid": self.n_grid,
                "uniform_weight": self.uniform_weight}


class FragmentTorsionModel:
    """One learned torsion density for the fragments of many peptides (see the module docstring).

    Parameters
    ----------
    network : FragmentNetwork
    seen_residues : sequence of str
        Residue types in the training data (others are zero-shot).
    seen_neighbours : sequence of str
        Neighbour tokens in the training data (others count as unknown).
    uniform_weight : float in [0, 1)
        Weight of the uniform table mixed into every block (a plain attribute; change it at any time).
    history, metadata : dict, optional
        Training record and provenance (data, temperatures, training time).

    Examples
    --------
    >>> from openmm_confsample.models.fragments import FragmentNetwork, FragmentTorsionModel, Fragment
    >>> model = FragmentTorsionModel(FragmentNetwork(n_grid=24, order=2, hidden=8), ["ALA"], ["ACE", "NME"])
    >>> table = model.tables_for([Fragment("ALA2", "ALA", {}, "ACE", "NME")])[0]
    >>> table.probabilities.shape
    (3, 24, 24)
    """

    kind = _KIND

    def __init__(self, network: FragmentNetwork, seen_residues, seen_neighbours, uniform_weight: float = 0.05,
                 history: dict | None = None, metadata: dict | None = None):
        if not isinstance(network, FragmentNetwork):
            raise ConfSampleError(f"network must be a FragmentNetwork, got {type(network).__name__}.")
        self.network = network.eval()
        self.seen_residues = tuple(canonical_residue(r) for r in seen_residues)
        self.seen_neighbours = tuple(canonical_residue(r) for r in seen_neighbours)
        self.uniform_weight = float(uniform_weight)
        self.history = dict(history or {})
        self.metadata = dict(metadata or {})
        self._warned: set = set()

    @property
    def n_grid(self) -> int:
        return self.network.n_grid

    def coverage(self, fragments) -> dict:
        """Residue names of ``fragments`` by how the model handles them: 'seen', 'zero_shot', 'uniform'."""
        out = {"seen": [], "zero_shot": [], "uniform": []}
        for fragment in fragments:
            name = canonical_residue(fragment.residue)
            key = "seen" if name in self.seen_residues else "zero_shot" if name in STANDARD_RESIDUES else "uniform"
            out[key].append(fragment.name)
        return out

    def tables_for(self, fragments, strict: bool = False, uniform_weight=None) -> list[FragmentTable]:
        """The table of each fragment (residue type and neighbours as context); fallbacks as in the module docstring.

        ``uniform_weight`` overrides the model's own for these tables.
        """
        fragments = list(fragments)
        weight = self.uniform_weight if uniform_weight is None else float(uniform_weight)
        coverage = self.coverage(fragments)
        if strict and (coverage["zero_shot"] or coverage["uniform"]):
            raise ConfSampleError(
                f"the fragment model was trained on {', '.join(self.seen_residues)}; residues "
                f"{', '.join(coverage['zero_shot'] + coverage['uniform'])} are not among them (strict=True).")
        self._warn(coverage)
        learned = [f for f in fragments if f.standard]
        tables = {}
        if learned:
            contexts = np.stack([context_vector(f.residue, f.previous, f.next, self.seen_residues,
                                                self.seen_neighbours) for f in learned])
            with torch.no_grad():
                log_p = self.network(torch.tensor(contexts, dtype=torch.float32)).double()
            probabilities = torch.softmax(log_p.reshape(len(learned), len(BLOCKS), -1), dim=-1).numpy()
            for f, p in zip(learned, probabilities):
                seen = canonical_residue(f.residue) in self.seen_residues
                tables[f.name] = FragmentTable(p.reshape(len(BLOCKS), self.n_grid, self.n_grid), weight,
                                               f"model: {f.residue}{'' if seen else ', zero-shot'}")
        return [tables.get(f.name) or FragmentTable.uniform(self.n_grid, f"uniform: {f.residue} not a standard "
                                                            "residue") for f in fragments]

    def _warn(self, coverage: dict) -> None:
        for key, sentence in (("zero_shot", "the fragment model never saw residue(s) {}; their torsions are proposed "
                                            "zero-shot from residue features and neighbours"),
                              ("uniform", "residue(s) {} are not standard amino acids; the fragment model proposes "
                                          "their torsions uniformly")):
            new = [name for name in coverage[key] if (key, name) not in self._warned]
            if new:
                warnings.warn(sentence.format(", ".join(new)) + ".", stacklevel=3)
                self._warned.update((key, name) for name in new)

    # -- persistence (models.checkpoint: weights_only, no code from files) ---------------------------------
    def save(self, path) -> str:
        save_checkpoint(path, _KIND, {**self.network.config(), "uniform_weight": self.uniform_weight,
                                      "seen_residues": list(self.seen_residues),
                                      "seen_neighbours": list(self.seen_neighbours)},
                        self.network.state_dict(), {**self.metadata, "history": self.history})
        self.checkpoint_path = str(path)
        return str(path)

    @classmethod
    def load(cls, path) -> "FragmentTorsionModel":
        payload = load_checkpoint(path, kind=_KIND)
        config = payload["config"]
        network = FragmentNetwork(config["n_grid"], config["order"], config["hidden"])
        first = payload["state_dict"].get("body.0.weight")
        if first is not None and tuple(first.shape)[1:] != (CONTEXT_SIZE,):
            raise ConfSampleError(
                f"fragment model {str(path)!r} reads contexts of {tuple(first.shape)[1:]} values, this package's "
                f"residue features make {CONTEXT_SIZE} (it was trained with another version's features); retrain it "
                f"with this version (python benchmarks/make_fragment_model.py --out PATH).")
        try:
            network.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise ConfSampleError(f"checkpoint {str(path)!r} does not match its fragment network's shape.") from exc
        metadata = dict(payload["metadata"])
        model = cls(network, config["seen_residues"], config["seen_neighbours"], config["uniform_weight"],
                    metadata.pop("history", {}), metadata)
        model.checkpoint_path = str(path)
        return model
