"""Plots for the report, returned as PNG data URLs so the HTML stays one file."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _data_url(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def training_curves(history: list[dict]) -> str:
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [r["train_clean_accuracy"] for r in history], label="train clean")
    left.plot(epochs, [r["val_clean_accuracy"] for r in history], label="val clean")
    left.plot(epochs, [r["val_robust_accuracy"] for r in history], label="val robust (PGD)")
    left.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy per epoch")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(epochs, [r["loss"] for r in history], color="tab:red")
    right.set(xlabel="epoch", ylabel="training loss", title="Training objective")
    right.grid(alpha=0.3)
    return _data_url(fig)


def accuracy_bars(entries: list[tuple[str, float, list[float]]]) -> str:
    """One bar per figure with its 95% interval drawn as an error bar."""
    labels = [e[0] for e in entries]
    values = [e[1] for e in entries]
    errors = [[v - e[2][0] for v, e in zip(values, entries)], [e[2][1] - v for v, e in zip(values, entries)]]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(entries)))
    ax.barh(labels, values, xerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.set(xlim=(0, 1), xlabel="accuracy on the test split (bar: estimate, whisker: 95% Clopper-Pearson)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return _data_url(fig)


def adversarial_gallery(x, x_adv, labels, clean_pred, adv_pred, count: int = 6) -> str:
    """Rows of clean image, amplified perturbation and adversarial image with the predictions."""
    count = min(count, len(x))
    fig, axes = plt.subplots(count, 3, figsize=(5.4, 1.6 * count), squeeze=False)
    for row in range(count):
        clean, adv = x[row], x_adv[row]
        delta = adv - clean
        scale = max(float(abs(delta).max()), 1e-12)
        panels = [
            (clean, f"clean: label {labels[row]}, pred {clean_pred[row]}", "gray", (0, 1)),
            (delta, f"perturbation (±{scale:.3g})", "coolwarm", (-scale, scale)),
            (adv, f"adversarial: pred {adv_pred[row]}", "gray", (0, 1)),
        ]
        for ax, (image, title, cmap, (vmin, vmax)) in zip(axes[row], panels):
            ax.imshow(image.mean(axis=0) if image.ndim == 3 else image, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _data_url(fig)


def epsilon_curve(points: list[dict], epsilon: float, xlabel: str, title: str) -> str:
    """Accuracy against ε (or radius) with its 95% band and the evaluated ε marked."""
    xs = [p["epsilon"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(xs, [p["robust_accuracy"] for p in points], marker="o", label="estimate")
    ax.fill_between(xs, [p["ci_low"] for p in points], [p["ci_high"] for p in points], alpha=0.25,
                    label="95% Clopper-Pearson")
    ax.axvline(epsilon, color="gray", linestyle="--", label=f"evaluated ε = {epsilon:g}")
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _data_url(fig)


def _axis_values(points: list[list[float]], axis: int) -> list[float]:
    return sorted({round(p[axis], 6) for p in points})


def condition_heat_map(heat_map: dict, title: str) -> str:
    """Accuracy over a grid of one parameter (a curve) or two (a heat map with the values written in)."""
    axes, points, accuracy = heat_map["axes"], heat_map["points"], heat_map["accuracy"]
    if len(axes) == 1:
        fig, ax = plt.subplots(figsize=(6, 3))
        order = sorted(range(len(points)), key=lambda i: points[i][0])
        ax.plot([points[i][0] for i in order], [accuracy[i] for i in order], marker="o")
        ax.set(xlabel=axes[0], ylabel="accuracy at this value", ylim=(0, 1.02), title=title)
        ax.grid(alpha=0.3)
        return _data_url(fig)
    rows, cols = _axis_values(points, 1), _axis_values(points, 0)
    grid = [[float("nan")] * len(cols) for _ in rows]
    for point, value in zip(points, accuracy):
        grid[rows.index(round(point[1], 6))][cols.index(round(point[0], 6))] = value
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols), 1.0 + 0.45 * len(rows)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", origin="lower", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{v:g}" for v in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows], fontsize=7)
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            if value == value:
                ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=6)
    ax.set(xlabel=axes[0], ylabel=axes[1], title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="accuracy")
    return _data_url(fig)


def condition_gallery(x, x_condition, labels, predictions, params: list[list[float]], axes: list[str]) -> str:
    """Each failure: the clean input and the input under the condition's worst parameters found."""
    count = len(x)
    fig, grid = plt.subplots(count, 2, figsize=(3.8, 1.6 * count), squeeze=False)
    for row in range(count):
        setting = ", ".join(f"{a} {v:.3g}" for a, v in zip(axes, params[row]))
        for ax, (image, title) in zip(grid[row], [(x[row], f"clean: label {labels[row]}"),
                                                  (x_condition[row], f"{setting}: pred {predictions[row]}")]):
            ax.imshow(image.mean(axis=0) if image.ndim == 3 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _data_url(fig)


def reliability_diagram(bins: list[dict], ece: float, ece_ci: tuple[float, float]) -> str:
    """Accuracy against mean confidence per confidence bin (the diagonal is perfect calibration),
    with the number of cases per bin underneath."""
    filled = [b for b in bins if b["n"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    top.bar([(b["lower"] + b["upper"]) / 2 for b in filled], [b["accuracy"] for b in filled],
            width=[b["upper"] - b["lower"] for b in filled], edgecolor="black", alpha=0.7, label="accuracy in the bin")
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", color="tab:red",
             linestyle="none", label="(mean confidence, accuracy)")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
            title=f"Reliability diagram (ECE {ece:.3f}, 95% [{ece_ci[0]:.3f}, {ece_ci[1]:.3f}])")
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar([(b["lower"] + b["upper"]) / 2 for b in bins], [b["n"] for b in bins],
               width=[b["upper"] - b["lower"] for b in bins], color="tab:blue", alpha=0.6, edgecolor="black")
    bottom.set(xlabel="confidence (top-label probability)", ylabel="cases")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return _data_url(fig)


def coverage_risk(points: list[dict]) -> str:
    """Selective prediction: the error among answered cases against the share answered, one point
    per confidence threshold (labelled), from abstaining on everything to answering everything."""
    answered = [p for p in points if p["risk"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([p["coverage"] for p in answered], [p["risk"] for p in answered], marker="o", drawstyle="default")
    for p in answered:
        ax.annotate(f"≥{p['threshold']:g}", (p["coverage"], p["risk"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    top = max([p["risk"] for p in answered] + [0.05])
    ax.set(xlabel="coverage (share of cases answered)", ylabel="risk (error among answered)", xlim=(0, 1.02),
           ylim=(0, 1.1 * top), title="Selective prediction: coverage against risk")
    ax.grid(alpha=0.3)
    return _data_url(fig)


def clinical_plots(clinical: dict) -> dict[str, str]:
    """The clinical stage's two plots (metrics/clinical.json): `reliability` and `coverage_risk`;
    none when the stage did not apply."""
    if clinical.get("status") != "ok" or not clinical.get("calibration"):
        return {}
    calibration = clinical["calibration"]
    plots = {"reliability": reliability_diagram(calibration["bins"], calibration["ece"], calibration["ece_ci"])}
    if any(p["risk"] is not None for p in clinical.get("selective") or []):
        plots["coverage_risk"] = coverage_risk(clinical["selective"])
    return plots
