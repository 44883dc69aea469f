"""The questions of the vLLM benchmarks (vllm_ttft, vllm_parity): a short shop report
(~120 tokens) and a question about it, different numbers per index, so that every request
brings new shared text."""
from __future__ import annotations

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lea", "Mo", "Nia",
         "Oto", "Pia", "Quin", "Rui", "Sol", "Tia"]
ITEMS = ["apples", "books", "chairs", "pens", "boxes", "cups", "lamps", "maps"]


def question(i: int) -> str:
    """A short report (~120 tokens) and a question about it; different numbers per i."""
    n = NAMES[i % len(NAMES)]
    a, b, c = 10 + 7 * i % 40, 3 + 5 * i % 17, 2 + i % 6
    it = ITEMS[i % len(ITEMS)]
    return (f"{n} runs a small shop in the old town. On Monday the shop had {a} {it} on the shelves. "
            f"During the week {n} sold {b} {it} to regular customers and gave {c} {it} to a school. "
            f"The shop is open from nine to five, and {n} keeps a notebook with every sale. "
            f"A supplier visits every Friday, but this week the delivery was late and arrived on Monday. "
            f"Question: how many {it} were left on the shelves at the end of the week?")


def shop(i: int) -> str:
    """One shop's paragraph of a market report (~90 tokens), numbers by i."""
    n, it = NAMES[i % len(NAMES)], ITEMS[(i // len(NAMES)) % len(ITEMS)]
    a, b, c = 10 + 7 * i % 40, 3 + 5 * i % 17, 2 + i % 6
    return (f"{n}'s shop sells {it}. On Monday it had {a} {it} on the shelves; during the week {n} sold {b} "
            f"{it} to regular customers and gave {c} {it} to a school. The shop is open from nine to five and "
            f"a supplier visits on Fridays.")


def report(i: int, shops: int) -> str:
    """A market report of `shops` shops (~90 tokens each) and a question about one of them;
    every i gives other shops and numbers."""
    first = i * shops
    paragraphs = [shop(first + j) for j in range(shops)]
    asked = first + (i % shops)
    return ("Market report.\n" + "\n".join(paragraphs) + f"\nQuestion: how many {ITEMS[(asked // len(NAMES)) % len(ITEMS)]} "
            f"were left on the shelves of {NAMES[asked % len(NAMES)]}'s shop at the end of the week?")
