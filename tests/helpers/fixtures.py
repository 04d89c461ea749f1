"""Where the shared, read-only fixtures are: `shared/` beside the checkout (as CI lays it out),
else the developers' /work/shared."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = next(
    (p for p in (_ROOT.parent / "shared" / "fixtures", Path("/work/shared/fixtures")) if p.is_dir()),
    _ROOT.parent / "shared" / "fixtures",
)
NVML_TRACE = FIXTURES / "h200-nvml-trace"
TRAINING_TRACE = FIXTURES / "h200-training-trace"
