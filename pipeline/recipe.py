"""Recipes are data: a YAML list of passes with keyword options.

    name: prune
    description: cleanup, then channel removal with least-squares recovery
    passes:
      - cleanup
      - name: prune
        options: {target_macs: 0.7, criterion: taylor}

One `fidelity:` block holds the policy that every lossy pass and the compile as a whole obey, measured against the
original model on the validate split (samples no pass fitted to):

    fidelity:
      min_top1_agreement: 0.95   # classifier outputs ([N, C])
      max_accuracy_drop: 1.0     # points of accuracy, when the data has labels
      min_cosine: 0.99           # every output in scope, or {output_name: cosine}
      cosine_scope: dense_models # all | dense_models (cosine only for models with a non-classifier output)
      standard_errors: 1.0       # sampling margin: each figure is moved this many standard errors toward failing
      fit_veto: true             # the thresholds must also hold (plain figures) on the fit samples

Passes carry no copy of these knobs: a pass option of that name in a recipe is an error.
`--set pass.option=value` overrides an option of a pass in the recipe and `--set fidelity.key=value` the policy;
unknown passes, options and keys are errors, checked before anything runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgec.passes.base import get_pass, make_options, options_dict
from edgec.core.errors import EdgecError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"  # edgec.recipes (package_dir maps it)
_TOP_KEYS = {"name", "description", "passes", "fidelity"}
_STEP_KEYS = {"name", "options"}
FIDELITY_KEYS = ("min_top1_agreement", "max_accuracy_drop", "min_cosine", "cosine_scope", "standard_errors",
                 "fit_veto")


@dataclass
class Step:
    name: str
    options: Any  # the pass's frozen options dataclass


@dataclass
class Recipe:
    name: str
    description: str
    steps: list[Step] = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)  # the policy (FIDELITY_KEYS); empty: no policy

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                **({"fidelity": dict(self.fidelity)} if self.fidelity else {}),
                "passes": [{"name": s.name, "options": {k: v for k, v in options_dict(s.options).items()
                                                        if k not in FIDELITY_KEYS}} for s in self.steps]}

    def floor_spec(self, samples: int):
        """The policy as a passes.floor.FloorSpec over `samples` validate samples (None without a policy)."""
        from edgec.passes.floor import FloorSpec

        if not self.fidelity:
            return None
        f = self.fidelity
        return FloorSpec(f.get("min_top1_agreement"), f.get("max_accuracy_drop"), f.get("min_cosine"),
                         f.get("cosine_scope", "dense_models"), max(int(samples), 1),
                         standard_errors=f.get("standard_errors", 0.0), fit_veto=f.get("fit_veto", False))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _read(ref: str) -> tuple[dict, str]:
    ref = ref.strip()
    path = Path(ref)
    if ref in available():
        path = RECIPE_DIR / f"{ref}.yaml"
    elif not (path.suffix in (".yaml", ".yml") and path.is_file()):
        if ":" in ref or "\n" in ref or ref.startswith("{") or ref.startswith("["):
            try:
                data = yaml.safe_load(ref)
            except yaml.YAMLError as e:
                raise EdgecError(f"inline recipe is not valid YAML: {str(e).splitlines()[0]}") from None
            if isinstance(data, list):
                data = {"name": "inline", "passes": data}
            return data, "inline"
        raise EdgecError(f"unknown recipe '{ref}'; shipped recipes: {', '.join(available())}, or a .yaml path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EdgecError(f"recipe {path.name} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data, path.stem


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_recipe(ref: str, overrides: list[str] | None = None) -> Recipe:
    data, default_name = _read(ref)
    if not isinstance(data, dict):
        raise EdgecError("a recipe must be a mapping with a 'passes' list")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise EdgecError(f"unknown recipe key(s): {', '.join(unknown)}; valid: {', '.join(sorted(_TOP_KEYS))}")
    raw_steps = data.get("passes")
    if not isinstance(raw_steps, list):
        raise EdgecError("recipe 'passes' must be a list")
    steps: list[tuple[str, dict]] = []
    for i, s in enumerate(raw_steps):
        if isinstance(s, str):
            steps.append((s, {}))
        elif isinstance(s, dict) and "name" in s:
            bad = sorted(set(s) - _STEP_KEYS)
            if bad:
                raise EdgecError(f"unknown key(s) {', '.join(bad)} in recipe step {i + 1}; valid: name, options")
            opts = s.get("options") or {}
            if not isinstance(opts, dict):
                raise EdgecError(f"options of recipe step '{s['name']}' must be a mapping")
            steps.append((str(s["name"]), copy.deepcopy(opts)))
        elif isinstance(s, dict) and len(s) == 1:
            (n, opts), = s.items()
            steps.append((str(n), dict(opts or {})))
        else:
            raise EdgecError(f"recipe step {i + 1} must be a pass name or a mapping with 'name'")
    fidelity = _fidelity_block(data.get("fidelity"))
    for ov in overrides or []:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise EdgecError(f"--set expects pass.option=value, got '{ov}'")
        key, val = ov.split("=", 1)
        pname, opt = key.split(".", 1)
        if pname == "fidelity":
            fidelity = _fidelity_block({**fidelity, opt: parse_value(val)})
            continue
        matches = [o for n, o in steps if n == pname]
        if not matches:
            raise EdgecError(f"--set {key}: the recipe has no pass '{pname}' (passes: {', '.join(n for n, _ in steps)})")
        for o in matches:
            o[opt] = parse_value(val)
    recipe = Recipe(str(data.get("name") or default_name), str(data.get("description") or ""), fidelity=fidelity)
    for n, o in steps:
        spec = get_pass(n)
        own = sorted(k for k in FIDELITY_KEYS if o.get(k) is not None and not (k == "cosine_scope" and o[k] == "all"))
        if own:
            raise EdgecError(f"pass '{n}' option(s) {', '.join(own)} belong in the recipe's fidelity: block "
                             f"(--set fidelity.{own[0]}=...): every pass obeys one policy")
        recipe.steps.append(Step(n, make_options(spec, o)))
    return recipe


def _fidelity_block(raw) -> dict:
    """Validate the recipe's fidelity policy: known keys, numbers in range (FloorSpec's checks)."""
    from edgec.passes.floor import FloorSpec

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EdgecError("recipe 'fidelity' must be a mapping of " + ", ".join(FIDELITY_KEYS))
    unknown = sorted(set(raw) - set(FIDELITY_KEYS))
    if unknown:
        raise EdgecError(f"unknown fidelity key(s): {', '.join(unknown)}; valid: {', '.join(FIDELITY_KEYS)}")
    out = {k: v for k, v in raw.items() if v is not None}
    try:
        FloorSpec(out.get("min_top1_agreement"), out.get("max_accuracy_drop"), out.get("min_cosine"),
                  out.get("cosine_scope", "dense_models"), standard_errors=out.get("standard_errors", 0.0),
                  fit_veto=out.get("fit_veto", False))
    except ValueError as e:
        raise EdgecError(f"bad fidelity policy: {e}") from None
    return out
