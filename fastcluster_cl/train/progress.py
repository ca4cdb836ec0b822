"""Training progress for people: a tqdm bar on a terminal, plain lines when stdout is a file or
a pipe (nohup, SLURM, CI), where a bar would print nothing readable until the end."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LineProgress:
    """One line on stdout at most every `interval` seconds (and at the last step): epoch, step,
    loss, images/s over the interval and the ETA."""

    def __init__(
        self,
        total_steps: int,
        epochs: int,
        start_step: int,
        interval: float = 30.0,
        stream=None,
        clock=time.monotonic,
    ):
        self.total_steps, self.epochs, self.interval = total_steps, epochs, interval
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self._last_time, self._last_step, self._images = clock(), start_step, 0
        self._printed = False

    def update(self, epoch: int, step: int, loss: float, images: int) -> None:
        """After each step: `images` trained in it (all ranks)."""
        self._images += images
        now = self.clock()
        due = not self._printed or now - self._last_time >= self.interval
        if not (due or step == self.total_steps):
            return
        elapsed = max(now - self._last_time, 1e-9)
        rate = self._images / elapsed
        eta = (self.total_steps - step) * elapsed / max(step - self._last_step, 1)
        print(
            f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.total_steps}  "
            f"loss {loss:.4f}  {rate:.0f} img/s  ETA {_duration(eta)}",
            file=self.stream,
            flush=True,
        )
        self._last_time, self._last_step, self._images = now, step, 0
        self._printed = True

    def close(self) -> None:
        pass


def make_progress(
    enabled: bool, total_steps: int, epochs: int, start_step: int, images_per_step: int
):
    """A tqdm bar on a terminal (stderr), LineProgress when stdout is not one, else None.
    Both take `update(epoch, step, loss, images)` and `close()`."""
    if not enabled:
        return None
    if sys.stderr.isatty() and sys.stdout.isatty():
        return _Bar(total_steps, start_step, images_per_step)
    if not sys.stdout.isatty():
        return LineProgress(total_steps, epochs, start_step)
    return None


class _Bar:
    def __init__(self, total_steps: int, start_step: int, images_per_step: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps * images_per_step,
            initial=start_step * images_per_step,
            unit="img",
            unit_scale=True,
            dynamic_ncols=True,
        )

    def update(self, epoch: int, step: int, loss: float, images: int) -> None:
        self.bar.update(images)
        self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")

    def close(self) -> None:
        self.bar.close()
