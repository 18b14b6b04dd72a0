"""edgec orchestration: model sources, export, recipes, pass runner, reports, CLI (`python -m pipeline`)."""
