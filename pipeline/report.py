"""Reports: report.json (versioned schema), report.md (readable tables), manifest.json (hashes, versions, command).

report.json embeds the recipe, so any result can be reproduced from its report alone.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgec.core.onnx_io import atomic_write
from edgec.core.provenance import EDGEC_VERSION, sha256_file, tool_versions  # noqa: F401  (re-exported for the report)

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")


def validate(report: dict) -> None:
    import jsonschema

    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))


def write_json(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mb(b):
    return f"{b / 1e6:.2f} MB" if b is not None else "-"


def render_markdown(r: dict) -> str:
    L = [f"# edgec report: {r['model']['name']} -> {r['target']} ({r['recipe']['name']})", ""]
    L += [f"- source: {r['model']['source']}", f"- input: {r['model']['inputs']}",
          f"- data: fit {r['data']['calib_samples']} / validate {r['data'].get('validate_samples', '-')} / eval "
          f"{r['data']['eval_samples']} samples, disjoint ({(r['data'].get('disjointness') or {}).get('checked', '-')})",
          f"  - fit: {r['data']['description']}", f"  - validate: {r['data'].get('validate_description', '-')}",
          f"  - eval: {r['data'].get('eval_description', '-')}",
          f"- preprocessing assumed (also in model.onnx metadata_props): {_pre(r.get('preprocess'))}",
          f"- seed: {r['seed']}", ""]
    c0, c1 = r["costs"]["original"], r["costs"]["final"]
    L += ["## Compute and size", "", "| | original | final | ratio |", "|---|---|---|---|"]
    L += [f"| MACs | {c0['macs']:,} | {c1['macs']:,} | {c1['macs'] / max(c0['macs'], 1):.3f} |",
          f"| params | {c0['params']:,} | {c1['params']:,} | {c1['params'] / max(c0['params'], 1):.3f} |",
          f"| model bytes | {c0['model_bytes']:,} | {c1['model_bytes']:,} | {c1['model_bytes'] / max(c0['model_bytes'], 1):.3f} |", ""]
    b = r.get("bench") or {}
    if b.get("latency"):
        L += ["## Latency (batch 1, interleaved, ms)", "",
              "| threads | model | median | p90 | p99 | mean | speedup vs original |", "|---|---|---|---|---|---|---|"]
        for t, d in b["latency"].items():
            for k in ("original", "compiled"):
                if k in d:
                    x = d[k]
                    L.append(f"| {t} | {k} | {x['median_ms']:.3f} | {x['p90_ms']:.3f} | {x['p99_ms']:.3f} | {x['mean_ms']:.3f} | {x.get('speedup_vs_original', 1.0):.2f}x |")
        L.append(f"\n{b.get('latency_protocol', '')}\n")
        if b.get("plot"):
            L.append(f"![latency CDF]({b['plot']})\n")
    if b.get("memory"):
        L += ["## Memory", "", "| model | peak RSS | minus empty process | model bytes |", "|---|---|---|---|"]
        for k, m in b["memory"].items():
            L.append(f"| {k} | {_mb(m['peak_rss_bytes'])} | {_mb(m['peak_rss_delta_bytes'])} | {m['model_bytes']:,} |")
        L.append("")
    if b.get("skipped"):
        L += [f"Benchmark: {b['skipped']}", ""]
    L += _policy_section(r)
    f = r.get("fidelity") or {}
    if f:
        s = f.get("summary", {})
        L += ["## Fidelity vs original FP32 (held-out eval split)", ""]
        L += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v, 4)} |" for k, v in s.items()] + [""]
        per = f.get("per_output", {})
        if len(per) > 0:
            L += ["| output | cosine | rel L2 | max abs | top-1 agr. |", "|---|---|---|---|---|"]
            for n, p in per.items():
                L.append(f"| {n} | {p['cosine']:.5f} | {p['rel_l2']:.2e} | {p['max_abs']:.3e} | {_fmt(p.get('top1_agreement'))} |")
            L.append("")
    L += ["## Passes", "", "| pass | exact | seconds | err vs prev | MACs | nodes |", "|---|---|---|---|---|---|"]
    for s in r["passes"]:
        L.append(f"| {s['name']} | {s['exact']} | {s['seconds']:.2f} | {s['error_vs_previous']:.2e} | "
                 f"{s['costs']['macs']:,} | {s['nodes']} |")
    L += _floors_section(r)
    posts = [(s["name"], s["stats"]["postprocess"]) for s in r["passes"] if (s.get("stats") or {}).get("postprocess")]
    if posts:
        L += ["", "### Decode / post-processing region (left in float, never pruned)", ""]
        for name, p in posts:
            ops = ", ".join(f"{k} x{v}" for k, v in p.get("ops", {}).items())
            extra = (f"; layers kept fp32: {', '.join(p['layers_fp32'])}" if p.get("layers_fp32") else "") + \
                (f"; channel groups closed: {len(p['groups_closed'])}" if p.get("groups_closed") else "")
            L.append(f"- {name}: {p['nodes']} nodes from {', '.join(p['seeds'])} ({ops}){extra}")
    for s in r["passes"]:
        for k, v in (s.get("stats") or {}).items():
            if k.endswith("_png") and isinstance(v, str):
                L += ["", f"![{s['name']} {k[:-4]}]({v})"]
    kern = (r.get("target_build") or {}).get("kernels") or {}
    if kern:
        from collections import Counter

        cnt = Counter(f"{v['claimed']} -> {v['effective']}" for v in kern.values())
        L += ["", "## Effective layer precision after ORT optimization", "", "| claimed -> runs as | layers |", "|---|---|"]
        L += [f"| {k} | {n} |" for k, n in sorted(cnt.items())]
    L += ["", "## Recipe (reproduce with `--recipe report.recipe.yaml`)", "", "```yaml", r["recipe"]["yaml"].rstrip(), "```", ""]
    L += ["## Command", "", "```", r["command"], "```", ""]
    return "\n".join(L)


def _pre(p: dict | None) -> str:
    if not p:
        return "-"
    if not p.get("applies"):
        return p.get("note", "not an image input")
    return (f"mean {p['mean']}, std {p['std']}, scale {p['scale']:.6g}, {p['layout']}, values in "
            f"[{p['value_range'][0]:.3f}, {p['value_range'][1]:.3f}]" + (f" ({p['note']})" if p.get("note") else ""))


def _floors_section(r: dict) -> list[str]:
    """The floor each lossy pass held: threshold, the split and sample count it was measured on, the result."""
    L: list[str] = []
    floors = [(s["name"], s["stats"]["floor"]) for s in r["passes"] if isinstance((s.get("stats") or {}).get("floor"), dict)]
    if floors:
        L += ["", "### Fidelity floors held by each pass (vs the original)", "",
              "| pass | floor | measured on | measured | met | note |", "|---|---|---|---|---|---|"]
        for name, fl in floors:
            spec = ", ".join(f"{k} {v}" for k, v in fl.items()
                             if k in ("min_top1_agreement", "max_accuracy_drop", "min_cosine", "cosine_scope",
                                      "standard_errors") and v is not None)
            meas = fl.get("measured") or (fl.get("history") or [{}])[-1]
            got = ", ".join([f"top-1 {meas['top1_agreement']:.3f}"] if "top1_agreement" in meas else []) + \
                (f" (bound {meas['top1_agreement_bound']:.3f})" if "top1_agreement_bound" in meas else "") + \
                "".join(f"; cos({o}) {c:.4f}" for o, c in (meas.get("cosine") or {}).items()) + \
                "".join(f"; decode input cos({o}) {c:.4f} (reported)" for o, c in
                        (meas.get("decode_inputs_cosine") or {}).items())
            on = f"{fl.get('measured_on', 'calibration samples')} ({fl.get('samples', '-')})"
            note = fl.get("note") or ("" if fl.get("met") else "nothing holds it: the pass returned its input unchanged")
            L.append(f"| {name} | {spec} | {on} | {got.lstrip('; ')} | {fl.get('met')} | {note} |")
    return L


def _policy_section(r: dict) -> list[str]:
    """Fidelity of the emitted model on fit / validate / eval side by side, and the policy it was held to."""
    L = []
    pol = r.get("fidelity_policy") or {}
    if pol:
        thr = ", ".join(f"{k} {v}" for k, v in (pol.get("policy") or {}).items()) or "none"
        L += ["## Fidelity policy (the recipe's `fidelity:` block, gated on the validate split)", "",
              f"- policy: {thr}; met: {pol.get('met', '-')}; returned: output of pass '{pol.get('returned', '-')}'"]
        if pol.get("note"):
            L.append(f"- **{pol['note']}**")
        g = pol.get("speed_guard") or {}
        if g.get("checked"):
            lat = ", ".join(f"{k} {v:.3f} ms" for k, v in g["latency_ms"].items())
            L.append(f"- speed guard (stage outputs timed on the target, interleaved medians): {lat}; returned "
                     f"'{g['returned']}'" + (f". **{g['note']}**" if g.get("note") else ""))
        elif g:
            L.append(f"- speed guard not run: {g.get('note', '')}")
        L.append("")
    sp = r.get("fidelity_splits") or {}
    if sp:
        keys = [k for k in ("top1_agreement", "top5_agreement", "cosine_min", "accuracy", "reference_accuracy")
                if any(k in (v.get("summary") or {}) for v in sp.values())]
        L += ["## Fidelity vs original FP32 by split", "", "| split | samples | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
        role = {"fit": "fit (passes fitted to it)", "validate": "validate (decisions gated on it)",
                "eval": "eval (held out)"}
        for k, v in sp.items():
            L.append(f"| {role.get(k, k)} | {v['samples']} | " +
                     " | ".join(_fmt((v.get("summary") or {}).get(m), 4) for m in keys) + " |")
        L.append("")
    return L


def summary_table(r: dict) -> str:
    """The compact table `make` prints."""
    c0, c1 = r["costs"]["original"], r["costs"]["final"]
    rows = [("model", r["model"]["name"]), ("target / recipe", f"{r['target']} / {r['recipe']['name']}"),
            ("MACs", f"{c1['macs'] / 1e6:.1f} M (x{c1['macs'] / max(c0['macs'], 1):.3f})"),
            ("params", f"{c1['params'] / 1e6:.3f} M (x{c1['params'] / max(c0['params'], 1):.3f})"),
            ("model bytes", f"{c1['model_bytes']:,} (x{c1['model_bytes'] / max(c0['model_bytes'], 1):.3f})")]
    b = r.get("bench") or {}
    for t, d in (b.get("latency") or {}).items():
        o, c = d["original"], d["compiled"]
        rows.append((f"latency {t} thr (ms)", f"median {c['median_ms']:.2f}  p90 {c['p90_ms']:.2f}  p99 {c['p99_ms']:.2f}  "
                     f"| original {o['median_ms']:.2f}  -> speedup x{c['speedup_vs_original']:.2f}"))
    for k, m in (b.get("memory") or {}).items():
        rows.append((f"peak RSS {k}", f"{m['peak_rss_bytes'] / 1e6:.1f} MB (model adds {m['peak_rss_delta_bytes'] / 1e6:.1f} MB)"))
    if b.get("skipped"):
        rows.append(("benchmark", b["skipped"]))
    s = (r.get("fidelity") or {}).get("summary", {})
    n_eval = (r.get("data") or {}).get("eval_samples")
    val = ((r.get("fidelity_splits") or {}).get("validate") or {})
    for k in ("top1_agreement", "top5_agreement", "cosine_min", "accuracy"):
        if k in s:
            v = (val.get("summary") or {}).get(k)
            rows.append((k, f"{s[k]:.4f} on eval ({n_eval} held out)" +
                         (f"; {v:.4f} on validate ({val['samples']})" if v is not None else "")))
    pol = r.get("fidelity_policy") or {}
    if pol.get("policy"):
        rows.append(("fidelity policy", ", ".join(f"{k} {v}" for k, v in pol["policy"].items()) +
                     f" on validate: {'met' if pol.get('met') else 'NOT met'}" +
                     (f" (returned pass '{pol['returned']}')" if pol.get("note") or
                      (pol.get("speed_guard") or {}).get("note") else "")))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)
