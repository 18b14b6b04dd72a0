"""Recipes are data: a YAML list of passes with keyword options.

    name: prune
    description: cleanup, then channel removal with least-squares recovery
    passes:
      - cleanup
      - name: prune
        options: {target_macs: 0.7, criterion: taylor}

`--set pass.option=value` overrides an option of a pass in the recipe; unknown passes and options are errors,
checked against each pass's options dataclass before anything runs.
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
_TOP_KEYS = {"name", "description", "passes"}
_STEP_KEYS = {"name", "options"}


@dataclass
class Step:
    name: str
    options: Any  # the pass's frozen options dataclass


@dataclass
class Recipe:
    name: str
    description: str
    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "passes": [{"name": s.name, "options": options_dict(s.options)} for s in self.steps]}

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
    for ov in overrides or []:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise EdgecError(f"--set expects pass.option=value, got '{ov}'")
        key, val = ov.split("=", 1)
        pname, opt = key.split(".", 1)
        matches = [o for n, o in steps if n == pname]
        if not matches:
            raise EdgecError(f"--set {key}: the recipe has no pass '{pname}' (passes: {', '.join(n for n, _ in steps)})")
        for o in matches:
            o[opt] = parse_value(val)
    recipe = Recipe(str(data.get("name") or default_name), str(data.get("description") or ""))
    for n, o in steps:
        spec = get_pass(n)
        recipe.steps.append(Step(n, make_options(spec, o)))
    return recipe
