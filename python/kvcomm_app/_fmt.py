"""Cell formatting shared by the tables the CLI and benchmarks print ("-" for missing)."""
from __future__ import annotations


def ms(v) -> str:
    """Milliseconds, one decimal."""
    return "-" if v is None else f"{v:.1f}"


def x(v) -> str:
    """A speedup ratio: '3.21x'."""
    return "-" if v is None else f"{v:.2f}x"


def pct(v, digits: int = 0) -> str:
    """A fraction as a percentage: pct(0.8125) == '81%', pct(0.8125, 1) == '81.2%'."""
    return "-" if v is None else f"{100 * v:.{digits}f}%"
