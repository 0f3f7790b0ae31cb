"""DeepSpeed checkpoints with the trainer's client state, keep-last-K, and what resume needs.

A checkpoint is one DeepSpeed tag `step_<global step>` under `RUN/checkpoints/`; DeepSpeed
writes the module, optimizer, scheduler and the `latest` pointer itself. The client state
(`TrainerState`) adds what DeepSpeed cannot know: the run config, the greedy stage, the
step, every rank's RNG states and the data position. Resume has to know the stage before
it can build that stage's engine, so `read_trainer_state` reads the client state straight
from the checkpoint file that DeepSpeed wrote.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

CLIENT_KEY = "catneuron"
_TAG = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where a run is: enough to continue it exactly."""

    config: dict[str, Any]
    stage: int
    stage_step: int
    global_step: int
    epoch: int
    samples: int
    """Samples this rank consumed in `epoch` (the same on every rank)."""
    rng: list[dict[str, Any]] = field(default_factory=list)
    """One entry per rank: torch, numpy and python RNG states."""


def tag_for(step: int) -> str:
    return f"step_{step}"


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if not match:
        raise ValueError(f"'{tag}' is not a catneuron checkpoint tag")
    return int(match.group(1))


def latest_tag(checkpoint_dir: Path) -> str | None:
    pointer = checkpoint_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def list_tags(checkpoint_dir: Path) -> list[str]:
    """Checkpoint tags on disk, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=step_of)


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: call it on all ranks)."""
    local = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


def restore_rng_state(states: list[dict[str, Any]], rank: int) -> None:
    """Put back this rank's RNG states; a run resumed on another world size keeps its own seeds."""
    if rank >= len(states):
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a reader sees the old tag or the new one, never half."""
    tmp = checkpoint_dir / f".latest.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint_dir / "latest")


def save(engine: Any, checkpoint_dir: Path, state: TrainerState, keep_last: int) -> str:
    """Save on every rank (DeepSpeed collects shards with collectives), then move `latest`.

    DeepSpeed writes under a temporary tag (`.partial-step_N`, outside the tag namespace);
    once every rank has closed its files (a barrier) the directory is renamed to `step_N`
    and only then `latest` moves, so that nothing half-written ever carries a final name:
    a stop or a crash in the middle leaves the previous checkpoint as the resume point.
    """
    tag = tag_for(state.global_step)
    partial = f".partial-{tag}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # every node, in case its disk is its own
        # a partial save of an interrupted run, or a final one that `latest` never named
        shutil.rmtree(checkpoint_dir / partial, ignore_errors=True)
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(
        str(checkpoint_dir),
        tag=partial,
        client_state={CLIENT_KEY: asdict(state)},
        save_latest=False,
    )
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _publish(checkpoint_dir, partial, tag)
    dist.barrier()
    if dist.get_rank() == 0:
        write_latest(checkpoint_dir, tag)
        for old in list_tags(checkpoint_dir)[:-keep_last]:
            if old != tag:
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def _publish(checkpoint_dir: Path, partial: str, tag: str) -> None:
    """Rename a complete checkpoint to its final tag (a node sharing the disk may have done it)."""
    with contextlib.suppress(FileNotFoundError):  # another node sharing the disk renamed it first
        (checkpoint_dir / partial).rename(checkpoint_dir / tag)


def load(engine: Any, checkpoint_dir: Path, tag: str) -> TrainerState:
    """Load module, optimizer and scheduler states into `engine` and return the trainer state."""
    path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{checkpoint_dir / tag}: DeepSpeed could not load this checkpoint")
    return TrainerState(**client_state[CLIENT_KEY])


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read; the message names the file and the problem."""


def _check_archive(path: Path) -> None:
    """A torch.save file is a zip archive: check its directory and every member's CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint file ({e})") from None
    if bad is not None:
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint file (member {bad} is damaged)")


def verify(checkpoint_dir: Path, tag: str) -> TrainerState:
    """The trainer state of a checkpoint whose every file reads back whole, or UnreadableCheckpoint."""
    files = sorted((checkpoint_dir / tag).glob("*.pt"))
    if not files:
        raise UnreadableCheckpoint(f"{checkpoint_dir / tag}: no checkpoint files")
    for path in files:
        _check_archive(path)
    try:
        saved = torch.load(
            _model_states_file(checkpoint_dir, tag), map_location="cpu", weights_only=False
        )
        return TrainerState(**saved[CLIENT_KEY])
    except FileNotFoundError as e:
        raise UnreadableCheckpoint(str(e)) from None
    except Exception as e:  # a damaged pickle inside an intact archive; the message names it
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableCheckpoint(
            f"{_model_states_file(checkpoint_dir, tag)}: unreadable checkpoint file ({first})"
        ) from None


def find_resumable(checkpoint_dir: Path, say=print) -> tuple[str, TrainerState, list[str]] | None:
    """The newest checkpoint at or before `latest` that reads back whole.

    Returns (tag, state, unreadable tags skipped) or None when there is nothing to
    resume from. Each skipped checkpoint is reported in one line through `say`.
    """
    latest = latest_tag(checkpoint_dir)
    if latest is None:
        return None
    limit = step_of(latest) if _TAG.match(latest) else None
    candidates = [
        t for t in reversed(list_tags(checkpoint_dir)) if limit is None or step_of(t) <= limit
    ]
    skipped: list[str] = []
    for tag in candidates:
        try:
            state = verify(checkpoint_dir, tag)
        except UnreadableCheckpoint as e:
            say(f"catneuron train: {e}; trying the previous checkpoint")
            skipped.append(tag)
            continue
        if skipped:
            say(f"catneuron train: resuming from {tag}, the newest checkpoint that loads")
        return tag, state, skipped
    if skipped:
        say(f"catneuron train: no checkpoint in {checkpoint_dir} loads; starting from scratch")
    return None


def set_aside(checkpoint_dir: Path, tags: list[str]) -> None:
    """Rename unreadable checkpoints out of the tag namespace, keeping them for inspection."""
    for tag in tags:
        source = checkpoint_dir / tag
        if source.is_dir():
            source.rename(checkpoint_dir / f"{tag}.unreadable")


def _model_states_file(checkpoint_dir: Path, tag: str) -> Path:
    files = sorted((checkpoint_dir / tag).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir / tag}: no DeepSpeed model states file")
    return files[0]


def read_checkpoint(checkpoint_dir: Path, tag: str) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """The trainer state and the full model state dict of a checkpoint, without an engine.

    The model states file is DeepSpeed's own torch.save output (it holds numpy RNG state,
    hence `weights_only=False`); it is trusted as this run's own file. Its `module` entry
    is the whole module, which wraps the model as `model.`, in the engine's dtype; under
    ZeRO the optimizer's fp32 master weights replace the parameters they cover, so a bf16
    run exports what it optimized.
    """
    saved = torch.load(
        _model_states_file(checkpoint_dir, tag), map_location="cpu", weights_only=False
    )
    weights = dict(saved["module"])
    if any((checkpoint_dir / tag).glob("zero_pp_rank_*_optim_states.pt")):
        weights.update(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))
    model_state = {k.removeprefix("model."): v for k, v in weights.items()}
    return TrainerState(**saved[CLIENT_KEY]), model_state


def full_precision_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with trainable parameters taken from DeepSpeed's fp32 masters.

    Under ZeRO 1/2 (and so in every bf16 run) the masters are sharded across ranks and
    gathered by an all-reduce per parameter: every rank must call this.
    """
    weights = dict(model.state_dict())
    for name, param in model.named_parameters():
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is not None:
            weights[name] = master
    return weights
