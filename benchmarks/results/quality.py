"""``RESULTS.md``'s section of the quality study (``quality.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from benchmarks.formatting import fmt, fmt_g, link, script_state, table


def by(rows, **keys):
  """The rows whose ``keys`` have the given values."""
  return [r for r in rows if all(r.get(k) == v for k, v in keys.items())]


def one(rows, **keys):
  """The first of :func:`by`'s rows, or ``None``."""
  found = by(rows, **keys)
  return found[0] if found else None


def quality_section(q, md: Path, plots: List[Path]) -> List[str]:
  """The section's lines: setup, headline, ρ tables, curvature, checks, the
  compute study and the trained preconditioners; ``plots`` linked from ``md``."""
  meta, rows = q["meta"], q["rows"]
  methods = q["methods"]
  order = [m for m in methods if any(r["method"] == m for r in rows)]
  llqr = [m for m in order if m.startswith("llqr_")]
  out = ["## Approximation quality ρ against the exact step",
         "",
         f"Command: `{meta['command']}` (git `{meta['git']}`; `{meta['script']}` "
         f"{script_state(meta.get('script_git_status'))} in it, sha256 "
         f"`{meta.get('script_sha256', '?')[:12]}`; wall time "
         f"{fmt(meta['wall_seconds'], 0)} s, per model "
         + ", ".join(f"{k} {fmt(v, 0)} s" for k, v in meta["seconds_per_model"].items())
         + (f"; load average {fmt(meta['load_average_start'][0], 1)} at the start, "
            f"{fmt(meta['load_average_end'][0], 1)} at the end"
            if meta.get("load_average_start") else "") + ").",
         "",
         "ρ(U) = (gᵀUg)² / ((Ug)ᵀA(Ug) · gᵀA⁻¹g) on a fresh batch, with A = C + λI "
         "its damped curvature and g its gradient: the fraction of the exact damped "
         "step's quadratic-model decrease that the best-scaled step −α*·Ug "
         "achieves (1: the exact step). The mean over the fresh batches is shown.",
         ""]
  setup = [
      ("dataset", meta["dataset"]),
      ("loss", meta["loss"]),
      ("seed", meta["seed"]),
      ("batch (fit and fresh)", meta["batch"]),
      ("refits on distinct earlier batches", meta["refits"]),
      ("fresh batches ρ is averaged over", meta["fresh_batches"]),
      ("chunks per refit", meta["num_chunks"]),
      ("inner solver steps (table)", f"CG, {meta['inner_steps']}"),
      ("EMA of the fitted structures", meta["ema"]),
      ("dampings λ", ", ".join(fmt_g(d) for d in meta["dampings"])),
      ("Rényi α", meta["renyi_alpha"]),
      ("exact row: library cg_step tolerance", fmt_g(meta["exact_cg_tol"])),
  ]
  out += [table(["setting", "value"], setup), ""]
  out += [table(["model", "parameters", "architecture", "Adam steps", "Adam lr",
                 "batch loss, first step", "batch loss, mean of last 10"],
                [[m["name"], m["num_params"], m["architecture"], m["adam_steps"],
                  fmt_g(m["adam_lr"]), fmt(m["adam_first_loss"]),
                  fmt(m["adam_last10_loss"])] for m in q["models"]]), ""]
  out += ["Methods:", ""]
  out += [f"- `{m}`: {methods[m]}" for m in order]
  out += [""]

  # Headline.
  ok = [r for r in rows if r["status"] == "ok"]
  model_order = [m["name"] for m in q["models"]]
  settings = sorted({(r["model"], r["damping"], r["geometry"]) for r in ok},
                    key=lambda s: (model_order.index(s[0]), -s[1],
                                   meta["geometries"].index(s[2])))
  head_rows, wins_ideal, wins_kfac, wins_block = [], 0, 0, 0
  sizes = {m["name"]: m["num_params"] for m in q["models"]}
  for model, damping, geometry in settings:
    sel = by(ok, model=model, damping=damping, geometry=geometry)
    cands = [r for r in sel if r["method"] in llqr]
    if not cands:
      continue
    best = max(cands, key=lambda r: r["rho"])
    ideal = one(sel, method="kfac_ideal_layer")
    kfac = one(sel, method="kfac")
    stale = one(sel, method="stale_exact")
    block = one(sel, method="blockdiag_layer_fit")
    if block and best["rho"] > block["rho"]:
      wins_block += 1
    if ideal and best["rho"] > ideal["rho"]:
      wins_ideal += 1
    if kfac and best["rho"] > kfac["rho"]:
      wins_kfac += 1
    per_refit = best["curvature_products"] / best["refits"]
    head_rows.append([
        model, fmt_g(damping), geometry, best["method"].replace("llqr_", ""),
        fmt(best["rho"]), fmt(ideal and ideal["rho"]), fmt(kfac and kfac["rho"]),
        fmt(block and block["rho"]), fmt(stale and stale["rho"]),
        fmt(best["rho"] / ideal["rho"], 2) if ideal else "–",
        f"{best['curvature_products']} ({fmt(per_refit, 0)}/refit)",
        sizes[model]])
  out += ["### Headline: llqr's best structure against K-FAC", ""]
  n = len(head_rows)
  out += [f"Of the {n} (model, λ, geometry) settings with a positive definite A, "
          f"llqr's best structure (fitted on earlier batches) has a higher ρ than "
          f"the ideal K-FAC (`kfac_ideal_layer`: the exact per-layer block-diagonal "
          f"inverse of the fresh batch's own A) in {wins_ideal} of {n}; than the "
          f"same block-diagonal inverse taken from the fit batches "
          f"(`blockdiag_layer_fit`) in {wins_block} of {n}; and than K-FAC's "
          f"Kronecker factors estimated on the fit batches (`kfac`) in {wins_kfac} "
          f"of {n}. Refit cost is in curvature products (one per gradient sample), "
          f"summed over the refits; forming A densely costs one product per "
          f"parameter.", ""]
  out += [table(["model", "λ", "geometry", "best llqr", "ρ llqr", "ρ ideal K-FAC",
                 "ρ K-FAC", "ρ block-diag (fit)", "ρ stale exact", "llqr / ideal",
                 "llqr refit products", "products to form A"], head_rows), ""]

  # Full tables.
  out += ["### ρ for every method and geometry", ""]
  for model in [m["name"] for m in q["models"]]:
    for damping in meta["dampings"]:
      geoms = [g for g in meta["geometries"]
               if by(rows, model=model, damping=damping, geometry=g)]
      if not geoms:
        continue
      body = []
      for m in order:
        cells = []
        for g in geoms:
          r = one(rows, model=model, damping=damping, geometry=g, method=m)
          cells.append("–" if r is None else
                       (fmt(r["rho"]) if r["status"] == "ok" else r["status"]))
        body.append([f"`{m}`"] + cells)
      out += [f"**{model}, λ = {fmt_g(damping)}**", "",
              table(["method"] + geoms, body), ""]
  for p in plots:
    if p.name == "quality_rho.png":
      out += [link(md, p, "ρ per method and geometry"), ""]

  # Curvature facts.
  curv = q["curvature"]
  crow = []
  for c in curv:
    eig = c.get("min_eig_curvature_fresh")
    crow.append([c["model"], c["geometry"], fmt_g(c["damping"]), c["status"],
                 "–" if not eig else ", ".join(fmt_g(e, 3) for e in eig),
                 ", ".join(fmt_g(t, 3) for t in c["trace_over_p_fresh"])])
  out += ["### Curvature of the fresh batches", "",
          "`indefinite`: A = C + λI has a non-positive eigenvalue on a fresh batch, "
          "so the exact step is not a minimiser and ρ is not reported.", "",
          table(["model", "geometry", "λ", "A on fresh batches",
                 "smallest eigenvalue of C (Newton)", "tr(C)/P per fresh batch"], crow),
          ""]

  checks = q.get("checks") or []
  if checks:
    out += ["### Check: dense-product fits against `fitting.build_problem`", "",
            "The table's llqr fits use `fitting.refit` on problems whose curvature "
            "product is the dense C of each fit batch (one compilation for every "
            "geometry). Redone through the library's own `fitting.build_problem` "
            "(jvp/vjp products):", "",
            table(["model", "geometry", "λ", "structure", "ρ build_problem",
                   "ρ dense products", "absolute difference"],
                  [[c["model"], c["geometry"], fmt_g(c["damping"]), c["structure"],
                    fmt(c["rho_build_problem"], 4), fmt(c["rho_dense_products"], 4),
                    fmt_g(c["abs_difference"], 2)] for c in checks]), ""]

  comp = q.get("compute") or []
  if comp:
    groups = sorted({(r["model"], r["damping"], r["structure"]) for r in comp},
                    key=str)
    cg_wins, compared = 0, 0
    for model, damping, structure in groups:
      sel = by(comp, model=model, damping=damping, structure=structure)
      sgd = [r for r in sel if r["solver"] == "sgd"]
      if not sgd:
        continue
      top = max(sgd, key=lambda r: r["curvature_products"])
      cg = [r for r in sel if r["solver"] == "cg"
            and r["curvature_products"] <= top["curvature_products"]]
      if cg:
        compared += 1
        cg_wins += max(r["rho"] for r in cg) > top["rho"]
    out += [f"### ρ against refit compute ({meta['compute_geometry']})", "",
            f"Inner steps per block and refit: CG "
            f"{', '.join(str(s) for s in meta['cg_steps'])}; the authors' momentum "
            f"SGD {', '.join(str(s) for s in meta['sgd_steps']) or '(none)'}. "
            f"Curvature products over the {meta['refits']} refits."
            + (f" In {cg_wins} of {compared} (model, λ, structure) groups, CG with "
               f"at most as many products as SGD's largest setting reaches a higher ρ "
               f"than it." if compared else ""), ""]
    for model in [m["name"] for m in q["models"]]:
      for damping in meta["dampings"]:
        sel = by(comp, model=model, damping=damping)
        if not sel:
          continue
        body = [[r["structure"], r["solver"], r["inner_steps"],
                 r["curvature_products"], fmt(r["rho"])] for r in sel]
        out += [f"**{model}, λ = {fmt_g(damping)}**", "",
                table(["structure", "solver", "inner steps", "curvature products",
                       "ρ"], body), ""]
    for p in plots:
      if p.name == "quality_compute.png":
        out += [link(md, p, "ρ against refit compute"), ""]

  trained = q.get("trained") or []
  if trained:
    methods_t = list(dict.fromkeys(r["method"] for r in trained))
    configs = list(dict.fromkeys(r["config"] for r in trained))
    body = []
    for model in dict.fromkeys(r["model"] for r in trained):
      for config in configs:
        for damping in meta["dampings"]:
          sel = by(trained, model=model, config=config, damping=damping)
          if not sel:
            continue
          vals = {r["method"]: r["rho"] for r in sel}
          ident = vals.get("identity")
          ratio = (vals["llqr_trained"] / ident) if ident else None
          body.append([model, f"`{config}`", fmt_g(damping),
                       *[fmt(vals.get(m)) for m in methods_t],
                       fmt(ratio, 2)])
    out += ["### ρ of the preconditioner that training holds", "",
            f"`chain(llqr(**config), adam({fmt_g(meta.get('adam_lr', 0.01))}))` "
            "trained from the same initialisation on the same batches as the Adam "
            "run above; at the parameters it reached, its preconditioner "
            "(`llqr_optax.precondition(state, g)`) is scored on the fresh batches "
            "under the damped GGN, beside the identity, the chain's own Adam "
            "diagonal, K-FAC's factors from the fit batches, the exact "
            "block-diagonal inverse per layer of the fit batches' curvature, and "
            "that of the fresh batch's own (the ideal K-FAC).", "",
            table(["model", "config", "λ", *methods_t, "llqr / identity"], body), ""]
  return out
