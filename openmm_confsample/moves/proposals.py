"""Simple, model-free proposals: the baselines and the controls of the exactness harness.

* :class:`VonMisesTorsionProposal` -- sets chosen torsions by rigid rotation to von Mises draws, either
  independently of the current state (an independence sampler) or as a jump from it (a random walk,
  optionally with a drift that makes it asymmetric). Keeps bond lengths, so constraints are allowed.
* :class:`GaussianDisplacementProposal` -- Cartesian Gaussian displacement of chosen atoms, optionally with
  a drift (asymmetric). Refused on systems with constraints.

Both report their Hastings term exactly, so they sample the Boltzmann distribution exactly whatever their
parameters; with the Hastings term dropped (``testing.WithoutHastings``) the asymmetric variants do not.
"""

from __future__ import annotations

import numpy as np
from scipy.special import i0e

from ..errors import ConfSampleError
from ..geometry.torsions import TorsionSet
from .engine import Proposal, ProposalBatch


def torsion_set_config(torsion_set: TorsionSet) -> dict:
    """A TorsionSet as plain lists (for openmmtools serialization)."""
    return {
        "bonds": np.asarray(torsion_set.bonds).tolist(),
        "n_atoms": int(torsion_set.n_atoms),
        "torsions": np.asarray(torsion_set.torsions).tolist(),
        "names": list(torsion_set.names),
    }


def torsion_set_from_config(config: dict) -> TorsionSet:
    return TorsionSet(np.array(config["bonds"]), config["n_atoms"], np.array(config["torsions"]),
                      names=config.get("names"))


def wrap_angle(angle):
    """Wrap radians to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi


def von_mises_logpdf(angle, mu, kappa):
    """log density of the von Mises distribution on [-pi, pi), elementwise (stable for large kappa)."""
    kappa = np.asarray(kappa, dtype=float)
    return kappa * (np.cos(angle - mu) - 1.0) - np.log(2.0 * np.pi * i0e(kappa))


class VonMisesTorsionProposal(Proposal):
    """Set torsions to von Mises draws by rigid rotation of the smaller side of each rotatable bond.

    Parameters
    ----------
    torsion_set : TorsionSet
        The torsions to move (see ``TorsionSet.from_topology``).
    kappa : float or (k,) float
        Concentration of each torsion's von Mises (0 gives uniform).
    mu : float or (k,) float, radians, default 0
        Centre (independent mode) or drift of the jump (random-walk mode).
    mode : {'independent', 'random_walk'}
        'independent': tau' ~ VM(mu, kappa), Hastings term log q(tau) - log q(tau').
        'random_walk': tau' = tau + d, d ~ VM(mu, kappa); asymmetric unless mu = 0.

    Examples
    --------
    >>> from openmm_confsample.systems import get_system
    >>> from openmm_confsample.geometry.torsions import TorsionSet
    >>> ala = get_system("alanine-dipeptide-vacuum")
    >>> torsions = TorsionSet(ala.bonds, ala.n_atoms, ala.torsion_array, names=ala.torsion_names)
    >>> proposal = VonMisesTorsionProposal(torsions, kappa=1.0, mode="independent")
    """

    cartesian = False

    def __init__(self, torsion_set: TorsionSet, kappa=1.0, mu=0.0, mode: str = "independent"):
        if mode not in ("independent", "random_walk"):
            raise ConfSampleError(f"mode must be 'independent' or 'random_walk', got '{mode}'.")
        k = len(torsion_set)
        self.torsion_set = torsion_set
        self.kappa = np.broadcast_to(np.asarray(kappa, dtype=float), (k,)).copy()
        self.mu = np.broadcast_to(np.asarray(mu, dtype=float), (k,)).copy()
        if np.any(self.kappa < 0) or not np.all(np.isfinite(self.kappa)):
            raise ConfSampleError(f"kappa must be finite and non-negative, got {self.kappa.tolist()}.")
        self.mode = mode

    def _log_q(self, new, old):
        if self.mode == "independent":
            return von_mises_logpdf(new, self.mu, self.kappa).sum(axis=-1)
        return von_mises_logpdf(wrap_angle(new - old), self.mu, self.kappa).sum(axis=-1)

    def propose(self, positions_nm, n_proposals, rng):
        current = self.torsion_set.values(positions_nm)
        shape = (n_proposals, len(self.kappa))
        draw = rng.vonmises(self.mu, self.kappa, size=shape)
        new = wrap_angle(draw if self.mode == "independent" else current + draw)
        log_correction = self._log_q(current, new) - self._log_q(new, current)
        batch = np.broadcast_to(positions_nm, (n_proposals,) + positions_nm.shape)
        return ProposalBatch(self.torsion_set.set_values(batch, new), log_correction)

    def get_config(self):
        return {**torsion_set_config(self.torsion_set), "kappa": self.kappa.tolist(), "mu": self.mu.tolist(),
                "mode": self.mode}

    @classmethod
    def from_config(cls, config):
        return cls(torsion_set_from_config(config), kappa=config["kappa"], mu=config["mu"], mode=config["mode"])


class GaussianDisplacementProposal(Proposal):
    """Cartesian move: x' = x + drift + sigma * N(0, I) on chosen atoms.

    Parameters
    ----------
    sigma_nm : float, nm
    drift_nm : (3,) float, nm, default 0
        A non-zero drift makes the proposal asymmetric; its Hastings term is exact.
    atoms : sequence of int, optional
        Atoms that move (default: all).
    """

    def __init__(self, sigma_nm: float, drift_nm=(0.0, 0.0, 0.0), atoms=None):
        self.sigma_nm = float(sigma_nm)
        if not np.isfinite(self.sigma_nm) or self.sigma_nm <= 0:
            raise ConfSampleError(f"sigma_nm must be positive, got {sigma_nm}.")
        self.drift_nm = np.asarray(drift_nm, dtype=float).reshape(3)
        self.atoms = None if atoms is None else np.asarray(atoms, dtype=int)

    def propose(self, positions_nm, n_proposals, rng):
        selected = slice(None) if self.atoms is None else self.atoms
        n_moving = len(positions_nm) if self.atoms is None else len(self.atoms)
        displacement = self.drift_nm + self.sigma_nm * rng.standard_normal((n_proposals, n_moving, 3))
        proposed = np.repeat(positions_nm[None], n_proposals, axis=0)
        proposed[:, selected] += displacement
        # log N(-d; drift) - log N(d; drift) = -2 d.drift / sigma^2
        log_correction = -2.0 * np.einsum("sai,i->s", displacement, self.drift_nm) / self.sigma_nm**2
        return ProposalBatch(proposed, log_correction)

    def get_config(self):
        return {"sigma_nm": self.sigma_nm, "drift_nm": self.drift_nm.tolist(),
                "atoms": None if self.atoms is None else self.atoms.tolist()}


class VonMisesMixtureProposal(Proposal):
    """Independence proposal: torsions drawn from a mixture of products of von Mises distributions.

    q(tau) = sum_m w_m prod_i VM(tau_i; mu_mi, kappa_mi). With components on the known basins this is a
    cheap, exact and broad move (the benchmark's cross-check of its reference); it does not scale to many
    torsions, which is what the learned models are for.

    Parameters
    ----------
    torsion_set : TorsionSet
    centers : (m, k) float, radians
    kappas : (m, k) float or float
    weights : (m,) float, optional (default uniform)
    """

    cartesian = False

    def __init__(self, torsion_set: TorsionSet, centers, kappas=4.0, weights=None):
        self.torsion_set = torsion_set
        k = len(torsion_set)
        self.centers = np.asarray(centers, dtype=float).reshape(-1, k)
        m = len(self.centers)
        self.kappas = np.broadcast_to(np.asarray(kappas, dtype=float), (m, k)).copy()
        weights = np.ones(m) if weights is None else np.asarray(weights, dtype=float)
        if weights.shape != (m,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ConfSampleError(f"weights must be {m} non-negative numbers with a positive sum, got {weights}.")
        if np.any(self.kappas < 0) or not np.all(np.isfinite(self.kappas)):
            raise ConfSampleError("kappas must be finite and non-negative.")
        self.weights = weights / weights.sum()

    def log_prob(self, angles):
        """log q of (..., k) torsion angles in radians."""
        angles = np.asarray(angles, dtype=float)[..., None, :]
        per_component = von_mises_logpdf(angles, self.centers, self.kappas).sum(axis=-1) + np.log(self.weights)
        peak = per_component.max(axis=-1, keepdims=True)
        return (peak + np.log(np.exp(per_component - peak).sum(axis=-1, keepdims=True)))[..., 0]

    def sample(self, n, rng):
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        return wrap_angle(rng.vonmises(self.centers[component], self.kappas[component]))

    def sample_torsions(self, n, rng):
        """``n`` draws, (n, k) radians, and their (n,) log q (the torsion-density calls of NCMC's TorsionDrive)."""
        angles = self.sample(n, rng)
        return angles, self.log_prob(angles)

    def log_density(self, angles):
        """log q of (n, k) torsion angles in radians."""
        return np.asarray(self.log_prob(angles), dtype=float).reshape(-1)

    def propose(self, positions_nm, n_proposals, rng):
        current = self.torsion_set.values(positions_nm)
        new = self.sample(n_proposals, rng)
        log_correction = self.log_prob(current) - self.log_prob(new)
        batch = np.broadcast_to(positions_nm, (n_proposals,) + positions_nm.shape)
        return ProposalBatch(self.torsion_set.set_values(batch, new), log_correction)

    def get_config(self):
        return {**torsion_set_config(self.torsion_set), "centers": self.centers.tolist(),
                "kappas": self.kappas.tolist(), "weights": self.weights.tolist()}

    @classmethod
    def from_config(cls, config):
        return cls(torsion_set_from_config(config), config["centers"], config["kappas"], config["weights"])

