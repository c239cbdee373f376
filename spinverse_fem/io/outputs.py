"""Files an inversion leaves behind: result.h5, interface.xdmf (+ interface.h5), interface.ply,
metrics.json, history.png (and fit.png, `io.plots.plot_fit`), rank 0 only, each written
atomically (`io.atomic`: a temporary file renamed onto the target, with the mode the user's
umask gives). Contents and units: docs/file_formats.md, docs/units_and_files.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spinverse_fem.io.atomic import (
    atomic_h5,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)
from spinverse_fem.io.ply import write_ply


def write_result(path: Path, problem, state, final_kappa, interface, config_text, attrs,
                 fit: dict | None = None) -> None:
    """result.h5: the final kappa (a kappa file: kappa_um_per_ms, faces, vertices), the masks,
    each stage's kappa, the history and, with `fit`, the signals at the final kappa:

        fit/<k>/predicted_real, predicted_imag   (n_k,) S/S0 of the final kappa
        fit/<k>/target_real, target_imag         (n_k,) the targets
        fit/<k>/b_s_per_mm2 (n_k,), direction (n_k, 3)
        fit/<k> attribute name; fit attributes sequence_names (JSON), modes, iteration,
        normalisation

    for every configured sequence k (0-based, configuration order). fit: dict of names, b,
    directions, target, predicted (lists over the sequences), modes, iteration, normalisation.
    """
    with atomic_h5(path) as f:
        f["kappa_um_per_ms"] = final_kappa
        f["faces"] = problem.faces.faces
        f["vertices"] = problem.grid.points
        f["active"] = problem.active.astype(np.int8)
        f["interface"] = interface.astype(np.int8)
        f["membrane_truth"] = problem.membrane.astype(np.int8)
        for i, k in enumerate(state.stage_kappa):
            f[f"stages/{i}/kappa_um_per_ms"] = k
            f[f"stages/{i}"].attrs["modes"] = state.modes[i]
        for k, v in state.history.items():
            f[f"history/{k}"] = np.asarray(v, dtype=float)
        f.attrs["config"] = config_text
        f.attrs["units"] = "kappa: um/ms; vertices: um; CD-L2: um^2; seconds: wall clock"
        for k, v in attrs.items():
            f.attrs[k] = v
        if fit is not None:
            _write_fit(f, fit)


def _write_fit(f, fit: dict) -> None:
    g = f.create_group("fit")
    g.attrs["sequence_names"] = json.dumps(list(fit["names"]))
    for key in ("modes", "iteration", "normalisation"):
        g.attrs[key] = fit[key]
    g.attrs["units"] = "signals: S/S0 (dimensionless); b: s/mm^2; direction: unit vectors"
    for k, name in enumerate(fit["names"]):
        s = g.create_group(str(k))
        s.attrs["name"] = name
        pred = np.asarray(fit["predicted"][k], dtype=complex)
        target = np.asarray(fit["target"][k], dtype=complex)
        s["predicted_real"], s["predicted_imag"] = pred.real, pred.imag
        s["target_real"], s["target_imag"] = target.real, target.imag
        s["b_s_per_mm2"] = np.asarray(fit["b"][k], dtype=float)
        s["direction"] = np.asarray(fit["directions"][k], dtype=float)


def write_interface_xdmf(path: Path, problem, kappa, interface) -> None:
    """XDMF 3 triangle grid of all faces with cell attributes (heavy data in <stem>.h5)."""
    h5 = path.with_suffix(".h5")
    faces = problem.faces.faces
    pts = problem.grid.points
    with atomic_h5(h5) as f:
        f["geometry"] = pts
        f["topology"] = faces.astype(np.int64)
        f["interface"] = interface.astype(np.int32)
        f["truth"] = problem.membrane.astype(np.int32)
        f["log10_kappa"] = np.log10(kappa)
    nf, nv = faces.shape[0], pts.shape[0]

    def attr(name, kind, dtype, prec):
        return (f'      <Attribute Name="{name}" AttributeType="Scalar" Center="Cell">\n'
                f'        <DataItem Dimensions="{nf}" NumberType="{dtype}" Precision="{prec}" '
                f'Format="HDF">{h5.name}:/{kind}</DataItem>\n      </Attribute>\n')

    xml = ('<?xml version="1.0"?>\n<Xdmf Version="3.0">\n  <Domain>\n'
           '    <Grid Name="faces" GridType="Uniform">\n'
           f'      <Topology TopologyType="Triangle" NumberOfElements="{nf}">\n'
           f'        <DataItem Dimensions="{nf} 3" NumberType="Int" Precision="8" Format="HDF">'
           f'{h5.name}:/topology</DataItem>\n      </Topology>\n'
           '      <Geometry GeometryType="XYZ">\n'
           f'        <DataItem Dimensions="{nv} 3" NumberType="Float" Precision="8" Format="HDF">'
           f'{h5.name}:/geometry</DataItem>\n      </Geometry>\n'
           + attr("interface", "interface", "Int", 4) + attr("truth", "truth", "Int", 4)
           + attr("log10_kappa_um_per_ms", "log10_kappa", "Float", 8)
           + '    </Grid>\n  </Domain>\n</Xdmf>\n')
    write_text_atomic(path, xml)


def write_interface_ply(path: Path, problem, interface) -> None:
    write_ply(path, problem.grid.points, problem.faces.faces[interface])


def write_metrics(path: Path, metrics: dict) -> None:
    """metrics.json; a non-finite metric is written as null (JSON has no NaN)."""
    write_json_atomic(path, metrics)


def plot_history(path: Path, history: dict, stage_names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.asarray(history["iteration"])
    fig, ax = plt.subplots(2, 1, figsize=(7.0, 6.0), sharex=True)
    ax[0].semilogy(it, history["misfit"], label="misfit (x weight)")
    ax[0].semilogy(it, np.maximum(history["total"], 1e-300), label="total objective", alpha=0.7)
    ax[0].set_ylabel("objective")
    ax[0].legend()
    cd = np.asarray(history["cd_l2"])
    if np.any(np.isfinite(cd)):
        ax[1].plot(it, cd, color="C3")
    ax[1].set_ylabel("CD-L2 (um$^2$)")
    ax[1].set_xlabel("iteration")
    stage = np.asarray(history["stage"])
    for a in ax:
        a.grid(True, alpha=0.3)
        for j in np.flatnonzero(np.diff(stage)) + 1:
            a.axvline(it[j] - 0.5, color="k", ls="--", lw=0.8)
    for s, name in enumerate(stage_names):
        sel = it[stage == s]
        if sel.size:
            ax[0].text(sel[0], ax[0].get_ylim()[1], f" stage {s + 1}: {name}", va="top",
                       fontsize=8)
    fig.suptitle("Inversion history")
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=110)
    finally:
        plt.close(fig)
