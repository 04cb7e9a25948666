"""Progress bars for the CLI: tqdm on stderr, silent when stderr is not a terminal or asked."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def on_terminal() -> bool:
    """Progress shows only when stderr is a terminal (logs and pipes get the results, not the progress), and
    not under ``-q``."""
    from lora_tools.cli._options import is_quiet

    return sys.stderr.isatty() and not is_quiet()


@contextmanager
def byte_progress(total: int, desc: str, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(nbytes)`` callback driving a tqdm bar on stderr."""
    from tqdm import tqdm

    show = enabled and on_terminal()
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
              file=sys.stderr, leave=False) as bar:
        yield bar.update
