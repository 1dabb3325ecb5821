"""Benchmark results → a markdown table with the targets checked, and a stacked-bar plot of the split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hyft.tools.bench.timing import CATEGORIES


def _memory(row: dict[str, Any]) -> float | None:
    mem = row.get("memory")
    if not mem:
        return None
    return mem.get("cuda_peak_mb", mem["peak_rss_mb"])


def step_seconds(row: dict[str, Any]) -> float:
    """The step time targets use: unobserved where the split's syncs slowed the step (a device), else the total."""
    return row.get("unobserved", row["seconds"]["total"])


def targets(results: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(what, measured ratio, limit, met) for each target whose rows were measured."""
    rows = results["rows"]
    t = {name: step_seconds(r) for name, r in rows.items()}
    out = []
    if "forward" in t:
        fwd = t["forward"]
        for name, limit in (("zo-full", 1.3), ("zo-full-rademacher", 1.3), ("mezo", 1.3), ("zo-lowrank", 1.10)):
            if name in t:
                out.append((f"{name} step / two no-grad forwards", t[name] / (2 * fwd), limit))
        if "fo-peft" in t:
            # the fused two-sided step is one fo-peft step + one forward + the direction work (issue #11)
            for name, limit in (("hybrid-one-sided", 1.3), ("hybrid-two-sided", 1.2),
                                ("hybrid-two-sided-gaussian", 1.2), ("hybrid-two-sided-separate", 2.3),
                                ("hybrid-sparse", 1.2), ("hybrid-lowrank", 1.05)):
                if name in t:
                    out.append((f"({name} − fo-peft) / one forward", (t[name] - t["fo-peft"]) / fwd, limit))
    mem = {name: _memory(r) for name, r in rows.items()}
    for name, base, limit in (("zo-full", "forward", 1.10), ("zo-full-rademacher", "forward", 1.10),
                              ("mezo", "forward", 1.10), ("hybrid-one-sided", "fo-peft", 1.10),
                              ("hybrid-two-sided", "fo-peft", 1.10), ("hybrid-two-sided-separate", "fo-peft", 1.10),
                              ("hybrid-sparse", "fo-peft", 1.10), ("zo-lowrank", "forward", 1.02),
                              ("hybrid-lowrank", "fo-peft", 1.05)):
        if mem.get(name) and mem.get(base):
            out.append((f"{name} peak memory / {base}", mem[name] / mem[base], limit))  # type: ignore[operator]
    return [(what, ratio, limit, ratio <= limit) for what, ratio, limit in out]


def _sweeps(results: dict[str, Any]) -> list[str]:
    sw = results.get("sweeps")
    if not sw:
        return []
    sec = sw["seconds"]
    floor = sec["read + write of the weights (bandwidth floor)"]
    lines = ["", f"One RNG sweep of {sw['numel']:,} numbers (made piece by piece, as the engine does):", "",
             "| generator | s | × bandwidth floor |", "|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {t / floor:.1f} |" for name, t in sec.items()]
    return lines


def _launches(results: dict[str, Any]) -> list[str]:
    la = results.get("launches")
    if not la:
        return []
    return ["", f"Kernel launches of the engine on an accelerator, counted on meta tensors ({la['model']}, "
            f"{la['tensors']} tensors, {la['numel']:,} weights, {la['dtype']}, {la['tokens']} looked-up tokens):",
            "", "| what | launches |", "|---|---|",
            f"| update sweep ({la['pieces_per_sweep']} pieces) | {la['update_sweep']:,} |",
            f"| perturbed forward ({la['streamed_modules']} streamed modules) | {la['perturbed_forward']:,} |",
            f"| two-sided step (2 forwards + update) | {la['two_sided_step']:,} |",
            f"| previous scheme: chunks per sweep (each ≥ 2 launches) | {la['previous_scheme_chunks_per_sweep']:,} |",
            *_fused_launches(la), *_lowrank_launches(la.get("lowrank"))]


def _fused_launches(la: dict[str, Any]) -> list[str]:
    fused, mezo = la.get("fused"), la.get("mezo_sweep")
    if not fused:
        return []
    return [f"| fused device kernels: update sweep | {fused['update_sweep']:,} |",
            f"| fused device kernels: perturbed forward | {fused['perturbed_forward']:,} |",
            f"| fused device kernels: two-sided step | {fused['two_sided_step']:,} |",
            *([f"| MeZO reference: one sweep (torch.normal + add_ per tensor; 4 a step) | {mezo:,} |"] if mezo else [])]


LOWRANK_LAUNCH_TARGET = 2300  # MeZO's per-tensor torch.normal on the same model: roughly 2.3 k per step


def _lowrank_launches(lr: dict[str, Any] | None) -> list[str]:
    if not lr:
        return []
    met = "met" if lr["two_sided_step_amortised"] <= LOWRANK_LAUNCH_TARGET else "missed"
    return [f"| low-rank (rank {lr['rank']}, V held {lr['lazy']}): two-sided step, updates pending "
            f"({lr['matrices']} matrices, {lr['vectors']} vectors) | {lr['two_sided_step']:,} |",
            f"| low-rank: fold (every {lr['lazy']} steps) | {lr['fold']:,} |",
            f"| low-rank: two-sided step, fold amortised (target ≤ {LOWRANK_LAUNCH_TARGET:,}: {met}) | "
            f"{lr['two_sided_step_amortised']:,} |"]


def markdown(results: dict[str, Any]) -> str:
    s, m = results["setup"], results["machine"]
    rows = results["rows"]
    fwd = rows.get("forward", {}).get("seconds", {}).get("total")
    inf_mem = _memory(rows["forward"]) if "forward" in rows else None
    where = m.get("gpu") or m["cpu"]
    unobserved = all("unobserved" in r for r in rows.values()) and bool(rows)
    lines = [
        f"{s['model']}, batch {s['batch_size']} × sequence {s['seq_len']}, {s['dtype']}"
        + (f" with {s['autocast']} autocast" if s.get("autocast", "none") != "none" else "") + f", on {m['device']} "
        f"({where}; {m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}. "
        f"Medians of {s['repeats']} interleaved repeats after {s['warmup']} warm-up."
        + (" *step s* is the step timed without the split's synchronisations, which the device needs for the "
           "split columns; *observed* is the step with them, the split's total." if unobserved else ""),
        "",
        "| row | step s | × fwd | " + ("observed | " if unobserved else "") + "forward | backward | perturb | update "
        "| other | RNG sweeps | peak MB | × inference | largest temporary |",
        "|---|---|---|" + ("---|" if unobserved else "") + "---|---|---|---|---|---|---|---|---|",
    ]
    if fwd is not None and "forward" in rows:
        fwd = step_seconds(rows["forward"])
    for r in rows.values():
        sec, mem, step = r["seconds"], _memory(r), step_seconds(r)
        cells = [r["label"], f"{step:.3f}", f"{step / fwd:.2f}" if fwd else "–",
                 *([f"{sec['total']:.3f}"] if unobserved else []),
                 *(f"{sec[c]:.3f}" for c in CATEGORIES), f"{r['rng_sweeps']:.2f}",
                 f"{mem:,.0f}" if mem else "–", f"{mem / inf_mem:.2f}" if mem and inf_mem else "–",
                 f"{r.get('peak_temporary', 0):,}" if r.get("peak_temporary") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    checked = targets(results)
    if checked:
        lines += ["", "| target | measured | limit | |", "|---|---|---|---|"]
        lines += [f"| {what} | {ratio:.2f} | ≤ {limit:.2f} | {'met' if ok else 'missed'} |"
                  for what, ratio, limit, ok in checked]
    lines += _sweeps(results) + _launches(results)
    lines += ["", f"Command: `{s['command']}`", ""]
    return "\n".join(lines)


def plot_split(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"].values())
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    labels = [r["label"] for r in rows]
    for c in CATEGORIES:
        widths = [r["seconds"][c] for r in rows]
        ax.barh(labels, widths, left=left, label=c)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    s = results["setup"]
    observed = any("unobserved" in r for r in rows)  # on a device the split needs a sync at every boundary
    ax.set_xlabel("seconds per step (median)" + (", observed: synced at every timed boundary" if observed else ""))
    ax.set_title(f"{s['model']}, batch {s['batch_size']} × seq {s['seq_len']} on {results['machine']['device']}")
    ax.invert_yaxis()
    ax.legend(loc="upper right", fontsize=8)  # the top row (the forward) is short
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
