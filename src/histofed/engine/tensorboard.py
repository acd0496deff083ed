"""Optional TensorBoard mirror of metrics.jsonl (``--tensorboard``; extra ``histofed[tensorboard]``)."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    """Writes each metrics line as scalars ``<split>/<metric>/<client>`` at step = round."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard not installed
            raise ImportError(
                "--tensorboard needs the tensorboard package: pip install 'histofed[tensorboard]'"
            ) from err
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            if "split" not in row:
                continue
            prefix = f"{row['split']}" + (f"-{row['model']}" if row.get("model") else "")
            for key, value in row.items():
                if key not in ("round", "client", "split", "model") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}/{row['client']}", value, row["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
