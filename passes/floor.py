"""Fidelity floors shared by the compression passes: a candidate is accepted only if, on the validate split (samples
no pass fitted to: PassContext.validate_batches) and against the reference (original FP32) model, it keeps

  top-1 agreement >= min_top1_agreement        (the first classifier-shaped output: 2-D [N, C], C >= 2)
  accuracy drop   <= max_accuracy_drop          (points; needs validate labels)
  cosine(output)  >= min_cosine for each output in scope, cosine averaged over samples as in core.fidelity
                     (min_cosine is one number for every output, or {output: number})

Sampling margin: a validate split is a sample, and a search that keeps the most aggressive candidate passing on it
picks candidates whose validate figure is luckier than their held-out one (the winner's curse). With
`standard_errors` z > 0 each clause holds on the estimate moved z standard errors toward failing:
  agreement a over n samples:   a - z sqrt(a (1 - a) / n)
  accuracy drop, paired:        100 ((b - f) + z sqrt(b + f)) / n    (b broken, f fixed predictions: McNemar's counts)
  cosine c:                     mean(c) - z sem(c)
When the validate samples come in groups that are not independent (the bundled split's crops share a handful of
photographs: DataSplit.groups), the agreement and accuracy-drop margins use the larger of the formula above and
the cluster-robust standard error of the per-sample mean, sqrt(G / (G - 1) sum_g (sum_{i in g} (x_i - mean))^2) / n
over the G groups: 128 crops of 6 photographs are closer to 6 samples than to 128 when a model's flips cluster on
one photograph (measured: a random-weight ResNet-18 at 64 px, top-1 agreement 0.977 on validate, 0.922 on eval).
A candidate that changes nothing passes at any z; one that changes k of n predictions needs a little more room
than k / n. z = 0 is the plain estimate.

Fit veto (`fit_veto: true`): the thresholds must also hold, as plain estimates, on the first `FIT_VETO_SAMPLES` fit
samples. The passes fitted to those samples, so their figures are optimistic and can never pass a candidate that
validate fails; a candidate that misses the floor even there is refused. It catches what a validate split of a
handful of photographs can hide (measured: a random-weight ResNet-18 at 64 px, top-1 agreement 0.977 on validate,
0.906 on fit, 0.922 on eval).

The thresholds come from the recipe's `fidelity:` policy (PassContext.fidelity) when there is one: every lossy pass
obeys the same policy and no pass carries its own copy. A pass's own floor options apply only without a policy
(library use); without a validate split (library use) the floor is measured on the fit samples and says so.

A decode / post-processing region (passes/regions.py) changes what "output" means: the tensors entering it (raw
head outputs) are always measured. `region_gate: auto` holds the cosine floor on them when NMS / TopK / NonZero make
the outputs data-dependent and on the outputs otherwise (reporting the head tensors next to them); `inputs` always
holds it on the head tensors (stricter: a YOLO output0's cosine is dominated by its anchor grid); `outputs` never.

`cosine_scope` says which outputs the cosine floor holds:
  all           every output;
  dense_models  every output, but only for models with at least one output that is not classifier-shaped
                (detectors, segmenters, encoders, multi-head models); a pure classifier is judged by its decisions
                (agreement / accuracy) alone, so a speed-tuned recipe can trade logit cosine for latency there.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import onnx

from edgec.calib.activations import stream_activations
from edgec.core.graph import node_name
from edgec.passes.regions import find_postprocess, region_inputs, tap_tensors
from edgec.core.errors import EdgecError

COSINE_SCOPES = ("all", "dense_models")
FIT_VETO_SAMPLES = 64
REGION_GATES = ("auto", "inputs", "outputs")


@dataclass(frozen=True)
class FloorSpec:
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    cosine_scope: str = "all"
    samples: int = 64
    region_gate: str = "auto"  # auto | inputs | outputs: where a decode region's cosine floor holds (see above)
    reserve: float = 0.0  # under a policy: the fraction of its allowed loss this pass leaves to later passes
    standard_errors: float = 0.0  # sampling margin z (module docstring)
    fit_veto: bool = False  # also hold the thresholds on the fit samples (point estimates; module docstring)

    def __post_init__(self):
        for nm in ("min_top1_agreement", "min_cosine"):
            v = getattr(self, nm)
            vals = list(v.values()) if nm == "min_cosine" and isinstance(v, dict) else [v]
            for x in vals:
                if x is not None and not (isinstance(x, (int, float)) and -1.0 <= float(x) <= 1.0):
                    raise ValueError(f"{nm} must be a number in [-1, 1]" + (" or {output: number}" if nm ==
                                     "min_cosine" else "") + f", got {v!r}")
        if self.max_accuracy_drop is not None and not (isinstance(self.max_accuracy_drop, (int, float))
                                                       and 0 <= self.max_accuracy_drop <= 100):
            raise ValueError(f"max_accuracy_drop is in points of accuracy (0-100), got {self.max_accuracy_drop!r}")
        if self.cosine_scope not in COSINE_SCOPES:
            raise ValueError(f"cosine_scope must be one of {', '.join(COSINE_SCOPES)}, got {self.cosine_scope!r}")
        if self.region_gate not in REGION_GATES:
            raise ValueError(f"region_gate must be one of {', '.join(REGION_GATES)}, got {self.region_gate!r}")
        if not (isinstance(self.reserve, (int, float)) and 0.0 <= self.reserve < 1.0):
            raise ValueError(f"reserve must be a fraction in [0, 1), got {self.reserve!r}")
        if not (isinstance(self.standard_errors, (int, float)) and 0.0 <= float(self.standard_errors) <= 5.0):
            raise ValueError(f"standard_errors must be a number in [0, 5], got {self.standard_errors!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"floor samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.fit_veto, bool):
            raise ValueError(f"fit_veto must be true or false, got {self.fit_veto!r}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_top1_agreement, self.max_accuracy_drop, self.min_cosine))

    def cosine_floor(self, output: str) -> float | None:
        c = self.min_cosine
        if isinstance(c, dict):
            # an output not named (e.g. a decode-region tap "node:slot") holds the strictest of the given floors
            return c.get(output, min(c.values()) if c else None)
        return c

    def thresholds(self) -> dict:
        d = {k: v for k, v in (("min_top1_agreement", self.min_top1_agreement), ("max_accuracy_drop",
             self.max_accuracy_drop), ("min_cosine", self.min_cosine)) if v is not None}
        if self.standard_errors:
            d["standard_errors"] = self.standard_errors
        if self.fit_veto:
            d["fit_veto"] = True
        return d


def policy_spec(ctx, spec: FloorSpec) -> FloorSpec:
    """The pass's floor under the compile's fidelity policy: thresholds and scope from ctx.fidelity (when set), and
    the policy's sample count (the whole validate split); region_gate stays the pass's. A pass's `reserve` r
    leaves part of the allowed loss to later passes: agreement / cosine floors t become 1 - (1 - t)(1 - r), an
    accuracy-drop ceiling d becomes d (1 - r)."""
    pol = getattr(ctx, "fidelity", None)
    if pol is None:
        return spec
    r = float(spec.reserve)

    def tight(t):
        if t is None:
            return None
        if isinstance(t, dict):
            return {k: tight(v) for k, v in t.items()}
        return 1.0 - (1.0 - float(t)) * (1.0 - r) if t < 1.0 else float(t)

    drop = None if pol.max_accuracy_drop is None else float(pol.max_accuracy_drop) * (1.0 - r)
    return FloorSpec(tight(pol.min_top1_agreement), drop, tight(pol.min_cosine), pol.cosine_scope, pol.samples,
                     spec.region_gate, 0.0, pol.standard_errors, pol.fit_veto)


def _classifier_shaped(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] >= 2


def cluster_se(x, groups) -> float:
    """Cluster-robust standard error of mean(x) with samples grouped by `groups` (CR1: G / (G - 1) small-sample
    factor); 0.0 without groups or with fewer than two groups (the caller then keeps the i.i.d. formula)."""
    if groups is None or len(x) == 0:
        return 0.0
    x, g = np.asarray(x, np.float64), np.asarray(groups)[: len(x)]
    ids = np.unique(g)
    if len(ids) < 2:
        return 0.0
    r = x - x.mean()
    sums = np.array([r[g == k].sum() for k in ids])
    return float(np.sqrt(len(ids) / (len(ids) - 1) * np.sum(sums ** 2)) / len(x))


class OutputFloor:
    """Measures a candidate against the reference outputs (computed once) and says whether the floor holds."""

    def __init__(self, ctx, spec: FloorSpec, model: onnx.ModelProto, always: bool = False):
        """always=True prepares the samples even without a floor (a search that scores every candidate)."""
        spec = policy_spec(ctx, spec)
        self.spec = spec
        self.active = spec.active
        if not self.active and not always:
            return
        self.threads = ctx.threads
        val = getattr(ctx, "validate_batches", None)
        self.measured_on = "validate split" if val is not None else "fit samples (no validate split given)"
        self.feeds = list(itertools.islice((val or ctx.calib_batches)(), spec.samples))
        if not self.feeds:
            raise EdgecError("the fidelity floor needs validate or calibration samples (none were given)")
        all_labels = ctx.validate_labels if val is not None else ctx.calib_labels
        groups = getattr(ctx, "validate_groups", None) if val is not None else None
        self.groups = (np.asarray(groups[: len(self.feeds)]) if groups is not None and len(groups) >= len(self.feeds)
                       else None)
        ref = ctx.reference_model if ctx.reference_model is not None else model
        self.names = [o.name for o in ref.graph.output]
        # a decode / post-processing region (passes/regions.py): the tensors entering it (raw head outputs) are
        # always measured. With selection ops (NMS / TopK / NonZero) the outputs are data-dependent (a detection
        # count, often empty), so the cosine floor holds on those tensors instead of the region's outputs;
        # otherwise the outputs stay gated and the head tensors are reported alongside.
        self.taps, self.region_outputs, self.gate_taps = [], [], False
        post = find_postprocess(model, input_shapes=ctx.input_shapes) if spec.min_cosine is not None else None
        if post is not None and post.nodes:
            taps = region_inputs(model, post)
            ref_t = tap_tensors(ref, taps)
            if taps and ref_t is not None:
                self.taps = taps
                self.gate_taps = {"auto": post.selection, "inputs": True, "outputs": False}[spec.region_gate]
                made = {o for i, n in enumerate(model.graph.node) if node_name(n, i) in post.nodes for o in n.output}
                self.region_outputs = [n for n in self.names if n in made]
        # with the floor on the region's inputs, its data-dependent outputs are not compared (their shapes differ)
        self.out_names = [n for n in self.names if not (self.gate_taps and n in self.region_outputs)]
        self.ref = self._run(ref)
        self.all_names = self.out_names + [f"{k}:{i}" for k, i in self.taps]
        shapes = [np.asarray(o) for o in self.ref[0][: len(self.out_names)]]
        self.cls_index = next((i for i, a in enumerate(shapes) if _classifier_shaped(a)), None)
        dense = any(not _classifier_shaped(a) for a in shapes)
        self.tap_names = self.all_names[len(self.out_names):]
        gated = list(self.all_names) if self.gate_taps else list(self.names)
        self.cosine_outputs = [] if spec.min_cosine is None else \
            (gated if spec.cosine_scope == "all" or dense or self.gate_taps else [])
        self.active = bool(self.cosine_outputs) or spec.min_top1_agreement is not None \
            or spec.max_accuracy_drop is not None
        self.labels = None
        if all_labels is not None and len(all_labels) >= len(self.feeds):
            self.labels = np.asarray(all_labels[: len(self.feeds)])
        policy = getattr(ctx, "fidelity", None) is not None
        if policy and (self.labels is None or self.cls_index is None) and spec.max_accuracy_drop is not None:
            # a policy's accuracy clause applies where there are labels and a classifier output
            self.spec = spec = dataclasses.replace(spec, max_accuracy_drop=None)
        if policy:  # agreement / accuracy clauses hold for classifier outputs, cosine for the outputs in scope
            self.active = bool(self.cosine_outputs) or (self.cls_index is not None and (
                spec.min_top1_agreement is not None or spec.max_accuracy_drop is not None))
        self.fit_feeds, self.fit_ref = [], []
        if spec.fit_veto and val is not None and self.active:
            self.fit_feeds = list(itertools.islice(ctx.calib_batches(), min(spec.samples, FIT_VETO_SAMPLES)))
            self.fit_ref = self._run(ref, self.fit_feeds)
        if spec.max_accuracy_drop is not None and self.labels is None:
            raise EdgecError("max_accuracy_drop needs labelled data (--data with labels)")
        if self.cls_index is None and (spec.min_top1_agreement is not None or spec.max_accuracy_drop is not None) \
                and spec.min_cosine is None and not policy:
            raise EdgecError("min_top1_agreement / max_accuracy_drop need a classifier output ([N, C]); this model has "
                             f"none ({', '.join(self.names)}): use min_cosine")

    def _run(self, model: onnx.ModelProto, feeds: list | None = None) -> list[list[np.ndarray]]:
        """The compared outputs, then the tapped region inputs, per sample (the floor's samples by default)."""
        taps = tap_tensors(model, self.taps) if self.taps else []
        if taps is None:
            raise EdgecError("a pass removed a node of the decode region; the fidelity floor cannot read it")
        want = self.out_names + taps
        feeds = self.feeds if feeds is None else feeds
        return [[d[n] for n in want]
                for d in stream_activations(model, want, feeds, threads=self.threads, optimize=True)]

    def _fit_figures(self, model: onnx.ModelProto) -> dict:
        """Plain top-1 agreement / cosine on the fit-veto samples."""
        from edgec.core.fidelity import Comparator

        comp = Comparator(self.all_names)
        for out, r in zip(self._run(model, self.fit_feeds), self.fit_ref):
            comp.update(out, r, None)
        per = comp.result()["per_output"]
        fit: dict = {"samples": len(self.fit_feeds)}
        if self.cls_index is not None:
            fit["top1_agreement"] = per[self.out_names[self.cls_index]]["top1_agreement"]
        if self.cosine_outputs:
            fit["cosine"] = {n: round(per[n]["cosine"], 6) for n in self.cosine_outputs}
        return fit

    def measure(self, model: onnx.ModelProto) -> dict:
        from edgec.core.fidelity import Comparator

        comp = Comparator(self.all_names)
        agree, drop = [], []  # per sample: prediction kept; broken (1) / fixed (-1) vs the labels
        for i, (out, r) in enumerate(zip(self._run(model), self.ref)):
            lab = None if self.labels is None else np.asarray([self.labels[i]])
            comp.update(out, r, lab)
            if self.cls_index is not None:
                p, q = np.asarray(out[self.cls_index]).argmax(-1), np.asarray(r[self.cls_index]).argmax(-1)
                agree.append(float(np.mean(p == q)))
                if lab is not None:
                    drop.append(float(np.mean((q == lab).astype(float) - (p == lab).astype(float))))
        per = comp.result()["per_output"]
        z = float(self.spec.standard_errors)
        out: dict = {"samples": len(self.feeds)}
        if self.groups is not None:
            out["groups"] = int(len(np.unique(self.groups)))
        if self.cls_index is not None:
            c = per[self.out_names[self.cls_index]]
            a, n = c["top1_agreement"], max(c["samples"], 1)
            out["top1_agreement"] = a
            if z:
                se = max(float(np.sqrt(a * (1 - a) / n)), cluster_se(agree, self.groups))
                out["top1_agreement_bound"] = round(a - z * se, 6)
            if "accuracy" in c:
                out.update(accuracy=100 * c["accuracy"], reference_accuracy=100 * c["reference_accuracy"],
                           accuracy_drop=100 * (c["reference_accuracy"] - c["accuracy"]))
                if z:
                    b, f = c["broken"], c["fixed"]
                    se = max(float(np.sqrt(b + f)) / n, cluster_se(drop, self.groups))
                    out["accuracy_drop_bound"] = round(100 * ((b - f) / n + z * se), 6)
        if self.cosine_outputs:
            out["cosine"] = {n: round(per[n]["cosine"], 6) for n in self.cosine_outputs}
            if z:
                out["cosine_bound"] = {n: round(per[n]["cosine"] - z * per[n]["cosine_sem"], 6)
                                       for n in self.cosine_outputs}
        if self.taps and not self.gate_taps:
            out["decode_inputs_cosine"] = {n: round(per[n]["cosine"], 6) for n in self.tap_names}
        if self.fit_feeds and self.ok(out):  # the veto can only refuse: not measured where validate already does
            out["fit"] = self._fit_figures(model)
        return out

    def ok(self, m: dict) -> bool:
        """Whether measure()'s record holds the floor (on the margin-adjusted figures when standard_errors > 0, and
        on the plain fit figures under the fit veto)."""
        if not self._holds(m.get("top1_agreement_bound", m.get("top1_agreement")),
                           m.get("accuracy_drop_bound", m.get("accuracy_drop")),
                           m.get("cosine_bound", m.get("cosine", {}))):
            return False
        fit = m.get("fit")
        return not fit or self._holds(fit.get("top1_agreement"), None, fit.get("cosine", {}))

    def _holds(self, agree: float | None, drop: float | None, cos: dict) -> bool:
        sp = self.spec
        if sp.min_top1_agreement is not None and agree is not None and agree < sp.min_top1_agreement:
            return False
        if sp.max_accuracy_drop is not None and drop is not None and drop > sp.max_accuracy_drop:
            return False
        return not (sp.min_cosine is not None and any(c < sp.cosine_floor(n) for n, c in cos.items()))

    def describe(self) -> dict:
        sp = self.spec
        d = sp.thresholds()
        d.update(measured_on=self.measured_on, samples=len(self.feeds))
        if self.fit_feeds:
            d["fit_veto_samples"] = len(self.fit_feeds)
        if sp.min_cosine is not None:
            d["cosine_scope"] = sp.cosine_scope
            d["cosine_outputs"] = list(self.cosine_outputs)
        if self.taps:
            d["decode_region"] = {"gated_on": "tensors entering it (node:input slot)", "outputs_not_gated":
                                  list(self.region_outputs)} if self.gate_taps else \
                {"gated_on": "outputs", "reported": "tensors entering it (decode_inputs_cosine)"}
        return d
