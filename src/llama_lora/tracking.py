"""Trackers: accelerate's TensorBoard (default) and Weights & Biases trackers, logging the same scalars.

Only the main process holds trackers; train.py logs through `log` and closes them with `finish`.
"""

from __future__ import annotations

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from llama_lora.artifacts import RunDir
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError


def start(cfg: Config, run_dir: RunDir, purge_step: int) -> list[GeneralTracker]:
    """The trackers training.report_to names, started, writing into the run directory."""
    trackers: list[GeneralTracker] = []
    if "tensorboard" in cfg.training.report_to:
        # purge_step drops events a crashed run logged after its last checkpoint, so a resumed curve
        # continues instead of doubling back.
        trackers.append(TensorBoardTracker("tensorboard", run_dir.path, purge_step=purge_step))
    if "wandb" in cfg.training.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise LlamaLoraError("training.report_to includes wandb but it is not installed: "
                                 "pip install 'llama-lora[wandb]'.") from e
        trackers.append(WandBTracker(cfg.training.wandb_project, name=run_dir.path.name, id=run_dir.path.name,
                                     dir=str(run_dir.path), resume="allow", config=cfg.model_dump(mode="json")))
    for tracker in trackers:
        tracker.start()
    return trackers


def log(trackers: list[GeneralTracker], scalars: dict[str, float], step: int) -> None:
    for tracker in trackers:
        tracker.log(scalars, step=step)


def finish(trackers: list[GeneralTracker]) -> None:
    for tracker in trackers:
        tracker.finish()
    trackers.clear()
