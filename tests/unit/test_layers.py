"""The layers of docs/architecture.md, checked by parsing every import (module-level and
inside functions) of longalign_rl/, rewards/ and shapesworld/:

    foundations   config, types, registry, hub, encoding, families, noise, models, vae, lora, prompts, data,
                  outputs, summary, hooks, direction, console, trackers, validation, arguments,
                  uncertainty, scoring, typed_yaml, config_docs
    maths         sampling.ddim, sampling.stochastic, sampling.flow, sampling.sampler, algorithms
    inference     pipeline, generate, evaluate, reference_import   (no ray: they run where Ray is not installed)
    distributed   actor_pool, sampling.group, reward_actors, training   (the only ones that import ray/deepspeed)
    entry         train (and its preflight, resume, launch), cli, smoke

A module imports only from its own layer or those below; the framework and its rewards
never import a world (shapesworld) nor name it in code; a world imports nothing from the
distributed or entry layers; module-level imports have no cycle.
"""

import ast
from pathlib import Path

import pytest

from tests import REPO

LAYERS = {
    "foundations": ["config", "types", "registry", "hub", "encoding", "families", "noise", "models", "vae", "lora",
                    "prompts", "data",
                    "outputs", "summary", "hooks", "direction", "console", "trackers", "validation", "arguments",
                    "uncertainty", "scoring", "typed_yaml", "config_docs", "guard"],
    "maths": ["sampling.ddim", "sampling.stochastic", "sampling.flow", "sampling.sampler", "algorithms"],
    "inference": ["pipeline", "generate", "evaluate", "reference_import"],
    "distributed": ["actor_pool", "sampling.group", "reward_actors", "training"],
    "entry": ["train", "preflight", "resume", "launch", "cli", "smoke"],
}
ORDER = list(LAYERS)


def modules(package: str) -> dict[str, Path]:
    root = REPO / package
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(root.rglob("*.py"))}


def imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def layer_of(module: str) -> str | None:
    """The layer of a longalign_rl module (the longest matching prefix), None for others."""
    if not module.startswith("longalign_rl."):
        return None
    name, best = module.removeprefix("longalign_rl."), None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    return best[0] if best else None


FRAMEWORK = {**modules("longalign_rl"), **modules("rewards")}


def test_every_framework_module_has_a_layer():
    unplaced = [m for m in modules("longalign_rl") if m != "longalign_rl" and layer_of(m) is None
                and m not in ("longalign_rl.sampling", "longalign_rl.training", "longalign_rl.algorithms")]
    assert unplaced == [], f"add these to LAYERS (and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in modules("longalign_rl") if layer_of(m)))
def test_no_import_runs_up_the_layers(module):
    here = ORDER.index(layer_of(module))
    upward = sorted(name for name in imports(FRAMEWORK[module], module)
                    if layer_of(name) and ORDER.index(layer_of(name)) > here)
    assert upward == [], f"{module} ({ORDER[here]}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(FRAMEWORK))
def test_only_the_distributed_shells_import_ray_or_deepspeed(module):
    layer = layer_of(module)
    if layer in ("distributed", "entry"):
        return
    heavy = sorted(n for n in imports(FRAMEWORK[module], module) if n.split(".")[0] in ("ray", "deepspeed"))
    assert heavy == [], f"{module} ({layer or 'rewards'}) imports {heavy}"


def _code_strings(tree: ast.AST) -> list[str]:
    """String constants that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("module", sorted(FRAMEWORK))
def test_the_framework_neither_imports_nor_names_a_world(module):
    path = FRAMEWORK[module]
    worlds = sorted(n for n in imports(path, module) if n.split(".")[0] == "shapesworld")
    assert worlds == [], f"{module} imports {worlds}"
    named = [s for s in _code_strings(ast.parse(path.read_text())) if "shapesworld" in s.lower()]
    assert named == [], f"{module} names ShapesWorld in code: {named}"


@pytest.mark.parametrize("module", sorted(modules("shapesworld")))
def test_a_world_uses_only_the_public_pure_layers(module):
    """ShapesWorld is a user of the framework: what it imports from longalign_rl is what a
    third-party world could use without a cluster."""
    path = modules("shapesworld")[module]
    deep = sorted(n for n in imports(path, module) if layer_of(n) in ("distributed", "entry"))
    assert deep == [], f"{module} imports {deep}"


def test_module_level_imports_have_no_cycle():
    everything = {**FRAMEWORK, **modules("shapesworld")}
    graph = {m: {n for n in imports(p, m, top_level_only=True) if n in everything and n != m}
             for m, p in everything.items()}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The parser sees imports inside functions, relative imports, and names in strings."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""ShapesWorld in a docstring is fine."""\n'
                   "def f():\n    from shapesworld import plugin\n    from ..training import worker\n"
                   "    return 'shapesworld.plugin:captions'\n")
    found = imports(bad, "longalign_rl.sampling.bad")
    assert "shapesworld.plugin" in found and "longalign_rl.training.worker" in found
    assert layer_of("longalign_rl.training.worker") == "distributed"
    assert layer_of("longalign_rl.sampling.bad") is None and layer_of("longalign_rl.sampling.sampler") == "maths"
    assert _code_strings(ast.parse(bad.read_text())) == ["shapesworld.plugin:captions"]


# An algorithm's own modules: its record and pure loss (algorithms/) and its body (training/).
ALGORITHM_MODULES = {"longalign_rl.algorithms.reward_backprop", "longalign_rl.algorithms.policy_gradient",
                     "longalign_rl.training.reward_backprop", "longalign_rl.training.policy_gradient"}
ALGORITHM_WORDS = ("reward_backprop", "grpo", "ddpo", "policy_gradient")


def _names_an_algorithm(tree: ast.AST) -> list[str]:
    """Code (not comments or docstrings) that names a particular algorithm: a string, an
    identifier or attribute, or an import of another algorithm's module."""
    found = [s for s in _code_strings(tree) if any(w in s.lower() for w in ALGORITHM_WORDS)]
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name and any(w in name.lower() for w in ALGORITHM_WORDS):
            found.append(name)
    return found


@pytest.mark.parametrize("module", sorted(m for m in FRAMEWORK if m not in ALGORITHM_MODULES))
def test_no_code_outside_an_algorithm_names_one(module):
    """Algorithms are registry.Algorithm records found by name (entry points), never branched
    on: outside their own modules (and the algorithms' entry points in setup.cfg) no code
    names grpo, ddpo, reward backpropagation or policy gradients, nor imports their modules.
    What is allowed: the default of algorithm.name."""
    allowed = {("longalign_rl.config", "reward_backprop")}  # AlgorithmConfig.name's default
    tree = ast.parse(FRAMEWORK[module].read_text())
    named = [n for n in _names_an_algorithm(tree) if (module, n) not in allowed]
    imported = sorted(n for n in imports(FRAMEWORK[module], module) if n in ALGORITHM_MODULES
                      and (module, n.rpartition(".")[2]) not in allowed)
    assert named == [] and imported == [], f"{module} names an algorithm: {named + imported}"


def test_the_algorithm_check_catches_what_it_is_for():
    tree = ast.parse('"""grpo in a docstring is fine."""\n# and ddpo in a comment\n'
                     "def f(cfg):\n    return cfg.policy_gradient or cfg.algorithm.name == 'grpo'\n")
    assert sorted(_names_an_algorithm(tree)) == ["grpo", "policy_gradient"]
