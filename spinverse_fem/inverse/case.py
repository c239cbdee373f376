"""One run's pipeline, assembled in one place: configuration -> phantom (grid, ground truth,
kappa) -> forward model -> targets -> misfit -> model. Every entry point (the `simulate`,
`objective`, `taylor` and `invert` commands, the experiments, the tests) builds a `Case`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinverse_fem.config import Config
from spinverse_fem.config.schema import BASES
from spinverse_fem.errors import InputError
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.forward.synthetic import simulate_targets
from spinverse_fem.geometry.phantom import build_phantom
from spinverse_fem.inverse.curriculum import stages
from spinverse_fem.inverse.frozen_basis import FrozenBasisMisfit
from spinverse_fem.inverse.misfit import FullOrderMisfit, ReducedMisfit, SignalMisfit
from spinverse_fem.inverse.model import Model, PriorWeights
from spinverse_fem.inverse.parameters import ParameterMap, TissueParameters
from spinverse_fem.inverse.priors import GeometricPriors
from spinverse_fem.io.targets import load_targets

MISFIT_MODELS = ("reduced", "full")


@dataclass(frozen=True)
class Targets:
    """signals: per config sequence (n_k,) complex S/S0; s0: the reference b = 0 signal of each
    sequence (um^3) or None (measured data); source: where they came from (for logs)."""

    signals: list
    s0: list | None
    source: str


def simulated_targets(comm, cfg: Config) -> Targets:
    """The [target] section's synthetic targets: the forward model on the ground truth,
    optionally on a refined grid and with Rician noise."""
    tcfg = cfg.target
    refine = tcfg.grid_refinement if tcfg and tcfg.grid_refinement else 1
    snr = tcfg.noise_snr if tcfg else None
    signals, s0, _ = simulate_targets(comm, cfg, refine, snr, tcfg.seed if tcfg else 0)
    return Targets(signals, s0, f"simulated ground truth ({cfg.geometry.kind}), grid "
                   f"refinement {refine}" + (f", Rician noise SNR {snr:g}" if snr else
                                             ", noiseless"))


class Case:
    """comm; cfg: Config; target_file: a signal table (default: [target] file, else simulated
    from the ground truth); targets: given Targets (overrides both).

    phantom: grid, faces, ground truth, kappa; forward: the ForwardModel on that grid;
    params: the ParameterMap of [inversion]; priors: GeometricPriors; stages: the curriculum.
    Targets are loaded or simulated on first use.
    """

    def __init__(self, comm, cfg: Config, *, target_file=None, targets: Targets | None = None):
        self.comm = comm
        self.cfg = cfg
        self.phantom = build_phantom(cfg)
        self.forward = ForwardModel(comm, self.phantom, cfg.physics, cfg.eigen)
        tcfg = cfg.target
        self.target_file = (str(target_file) if target_file else
                            (str(tcfg.file) if tcfg and tcfg.file else None))
        self._targets = targets
        inv = cfg.inversion
        active = self.phantom.active
        self.params = ParameterMap(active=active, lower=float(np.log10(inv.kappa_min_um_per_ms)),
                                   upper=float(np.log10(inv.kappa_max_um_per_ms)),
                                   fixed_kappa=np.full(self.phantom.faces.num_faces,
                                                       float(inv.kappa_max_um_per_ms)),
                                   tissue=self._tissue_parameters())
        self.priors = GeometricPriors(self.phantom.faces.faces, active=active,
                                      threshold_um_per_ms=inv.threshold_um_per_ms)
        self.stages = stages(cfg)
        self._owned = []   # full-order models to destroy

    def _tissue_parameters(self) -> TissueParameters | None:
        """The fitted compartment parameters ([inversion] fit_compartments), from their start
        values; None when nothing but kappa is fitted."""
        fit = self.cfg.inversion.fit_compartments
        if not fit:
            return None
        comps = self.cfg.compartments
        D = np.array([c.diffusivity_start_um2_per_ms or c.diffusivity_um2_per_ms
                      for c in comps])
        T2 = (None if any(c.t2_ms is None for c in comps) else
              np.array([c.t2_start_ms or c.t2_ms for c in comps]))
        return TissueParameters(compartment=self.phantom.compartment, diffusivity=D,
                                t2_ms=T2, fit=fit)

    def tissue_values(self, x: np.ndarray) -> dict:
        """{compartment name: {"diffusivity_um2_per_ms", "t2_ms"}} at x ({} without a
        compartment fit)."""
        t = self.params.tissue
        if t is None:
            return {}
        D, T2 = t.values(self.params.tissue_part(x))
        return {c.name: dict(diffusivity_um2_per_ms=float(D[i]),
                             t2_ms=None if T2 is None else float(T2[i]))
                for i, c in enumerate(self.cfg.compartments)}

    # -- data ------------------------------------------------------------------------------
    @property
    def targets(self) -> Targets:
        if self._targets is None:
            if self.target_file:
                signals, s0 = load_targets(self.target_file, self.cfg)
                self._targets = Targets(signals, s0, f"file {self.target_file}")
            else:
                self._targets = simulated_targets(self.comm, self.cfg)
            if self.cfg.inversion.normalisation == "reference" and self._targets.s0 is None:
                raise InputError(self.target_file or self.cfg.source, "s0_um3",
                                 "missing: inversion.normalisation = \"reference\" needs the "
                                 "reference b = 0 signal of every sequence (written by "
                                 "`spinverse simulate`); or use normalisation = \"own\"")
        return self._targets

    @property
    def truth(self) -> np.ndarray | None:
        """(F,) bool ground-truth membrane, or None when the config has no geometry."""
        return self.phantom.membrane if self.cfg.geometry.kind != "none" else None

    def start_x(self) -> np.ndarray:
        """x0: inversion.start_um_per_ms on every active face (then the compartment
        parameters' start values, when they are fitted)."""
        x = np.full(self.params.num_faces, np.log10(self.cfg.inversion.start_um_per_ms))
        t = self.params.tissue
        return x if t is None else np.concatenate([x, t.initial()])

    def start_kappa(self) -> np.ndarray:
        return np.full(self.phantom.faces.num_faces, float(self.cfg.inversion.start_um_per_ms))

    def num_modes_at(self, kappa: np.ndarray) -> int:
        """K by the [eigen] rule at kappa (one eigen-solve)."""
        return int(self.forward.eigenbasis(kappa).num_modes)

    # -- the functional ----------------------------------------------------------------------
    def misfit(self, sequences=None, *, model: str = "reduced", num_modes: int | None = None,
               adjoint_rtol: float = 1e-8, taylor_tol: float = 2.0**-53,
               basis: str = "eigen") -> SignalMisfit:
        """The configured misfit (weight, normalisation) over the given sequence indices
        (default: all), with the reduced or the full-order forward model; the reduced one on
        the eigenbasis of every kappa (basis "eigen") or on a frozen basis ("frozen",
        `inverse.frozen_basis`)."""
        idx = list(range(len(self.cfg.sequences))) if sequences is None else list(sequences)
        inv = self.cfg.inversion
        tg = self.targets
        common = dict(weight=inv.misfit_weight, normalisation=inv.normalisation,
                      s0_reference=None if tg.s0 is None else [tg.s0[i] for i in idx],
                      noise_sigma=None if inv.noise_snr is None else 1.0 / inv.noise_snr)
        seqs = [self.cfg.sequences[i] for i in idx]
        signals = [tg.signals[i] for i in idx]
        if model == "full":
            from spinverse_fem.forward.full_order import FullOrderModel

            full = FullOrderModel(self.forward.ops, self.cfg.full_order.time_step_ms)
            self._owned.append(full)
            return FullOrderMisfit(full, seqs, signals, **common)
        if model != "reduced":
            raise ValueError(f"model must be one of {MISFIT_MODELS}, got {model!r}")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        cls = FrozenBasisMisfit if basis == "frozen" else ReducedMisfit
        return cls(self.forward, seqs, signals, num_modes=num_modes,
                   adjoint_rtol=adjoint_rtol, taylor_tol=taylor_tol, **common)

    def model(self, misfit: SignalMisfit, weights: PriorWeights,
              reference_x: np.ndarray) -> Model:
        """The inverse problem's model: misfit + priors on x = log10 kappa."""
        if self.params.tissue is not None and not hasattr(misfit, "tissue_gradient"):
            raise InputError(self.cfg.source, "inversion.fit_compartments",
                             "fitting compartment parameters needs the reduced model")
        return Model(self.params, misfit, self.priors, weights, reference_x)

    def stage_model(self, stage_index: int, num_modes: int, reference_x: np.ndarray,
                    **misfit_options) -> Model:
        """The model a curriculum stage optimises: its sequences, a fixed mode count, its
        continuity weight; the manifold weight starts at 0 (the driver ramps it)."""
        st = self.stages[stage_index]
        misfit = self.misfit(st.sequences, num_modes=num_modes,
                             basis=self.cfg.inversion.basis, **misfit_options)
        return self.model(misfit, PriorWeights(st.continuity_weight, 0.0), reference_x)

    def destroy(self) -> None:
        for m in self._owned:
            m.destroy()
        self._owned = []
