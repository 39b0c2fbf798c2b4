"""What pyproject.toml, the Makefile and the docs promise about the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_torch_floor_is_the_oldest_release_the_suite_passed_on():
    """torch 2.12.0 passed the suite; 2.8.0 and 2.10.0 fail tests/distributed/test_fsdp_update.py (FSDP2 frees the
    head's unsharded storage before a backward reads it: "setStorage ... storage of size 0"). The code also calls
    APIs that older releases lack (FSDPModule.set_force_sum_reduction_for_comms, nn.utils.get_total_norm /
    clip_grads_with_norm_, SDPA's enable_gqa). The floor was torch>=2.4."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', text)
    assert floor is not None, "pyproject.toml lost its torch lower bound"
    assert tuple(int(x) for x in floor.group(1).split(".")[:2]) >= (2, 12)


def test_the_readmes_make_targets_exist():
    readme, makefile = (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()
    named = set(re.findall(r"`make ([a-z-]+)", readme)) | set(re.findall(r"^make ([a-z-]+)", readme, re.M))
    assert {"test", "demo"} <= named, "the README lost its two commands"
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    assert named <= targets, f"the README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_the_docs_name_only_files_that_exist():
    """Every benchmarks/, tests/, examples/ and docs/ path the README and docs/ name is in the repository (deleted
    benchmark scripts must not linger in the instructions)."""
    pattern = re.compile(r"\b((?:benchmarks|tests|examples|docs)/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
    missing = sorted({f"{doc.name}: {path}" for doc in DOCS for path in pattern.findall(doc.read_text())
                      if not (ROOT / path).exists()})
    assert missing == [], missing
