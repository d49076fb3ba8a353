"""Whether a row runs, and what became of it: the time budget (--budget-s), free device memory, and the
ledger of rows, skipped rows (with the reason) and failed rows (with the error). A row that raises is
recorded as failed and the benchmark goes on."""
from __future__ import annotations

import dataclasses
import time

import torch

from report import log
from timing import GiB, free_memory


def one_line(e: BaseException, limit: int) -> str:
    """An exception as 'Type: first line of its message', at most `limit` characters."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"[:limit]


@dataclasses.dataclass
class Run:
    budget_s: float
    dev: torch.device
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    rows: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget_ok(self, what: str, need_s: float = 0.0) -> bool:
        """True when at least need_s seconds of the budget are left; else the row is skipped."""
        left = self.budget_s - self.elapsed()
        if left < need_s or left <= 0:
            self.skip(what, f"time budget: {max(left, 0):.0f} s of --budget-s {self.budget_s:.0f} left, "
                            f"the row needs ~{need_s:.0f} s")
            return False
        return True

    def memory_ok(self, what: str, need: int, purpose: str = "") -> bool:
        """True when `need` bytes are free on the device (always off CUDA); else the row is skipped."""
        if self.dev.type != "cuda" or need < torch.cuda.mem_get_info(self.dev)[0]:
            return True
        self.skip(what, f"needs ~{need / GiB:.1f} GiB free{purpose}")
        return False

    def skip(self, what: str, why: str):
        self.skipped.append(dict(what=what, why=why))
        log(f"skipped {what}: {why}")

    def fail(self, what: str, e: BaseException, limit: int = 300):
        self.failed.append(dict(what=what, error=one_line(e, limit)))
        log(f"FAILED {what}: {self.failed[-1]['error']}")

    def build(self, what: str, fn):
        """fn() (an optional model: full mode, a peer), or None when it raises (recorded as failed). The model
        under test is built outside this: when it cannot be built the run ends (decode_latency.ahn_mode_rows)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - e.g. a transformers version without this architecture
            self.fail(what, e)
            free_memory(self.dev)
            return None

    def attempt(self, what: str, fn):
        """Run one row; an exception becomes a 'failed' entry instead of ending the benchmark."""
        t = time.perf_counter()
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - report any failure of a row and go on
            self.fail(what, e)
            free_memory(self.dev)
            return None
        row["wall_s"] = time.perf_counter() - t
        self.rows.append(row)
        log(f"{what}: " + (f"{row['ms']:.3f} ms/step" if "ms" in row else
                           f"{row['s']:.3f} s" if "s" in row else f"{row['us']:.1f} us"))
        return row
