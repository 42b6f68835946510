"""The task registry: names, options, metadata and loaders."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain

from effseq.data import base, idx
from effseq.data.lra import image, listops, pathfinder, retrieval, text
from effseq.data.synthetic import copying, mqar


@dataclasses.dataclass(frozen=True)
class _Task:
    defaults: Mapping[str, Any]
    info: Callable[..., base.TaskInfo]  # (**options) -> TaskInfo, validating the options
    load: Callable[..., grain.MapDataset]  # (split, data_dir, **options) -> MapDataset


_TASKS: dict[str, _Task] = {
    listops.NAME: _Task(listops.DEFAULTS, listops.info, listops.load),
    text.NAME: _Task(text.DEFAULTS, text.info, text.load),
    retrieval.NAME: _Task(retrieval.DEFAULTS, retrieval.info, retrieval.load),
    image.NAME: _Task(image.DEFAULTS, image.info, image.load),
    **{
        name: _Task(
            pathfinder.DEFAULTS,
            functools.partial(pathfinder.info, name),
            functools.partial(pathfinder.load, name),
        )
        for name in pathfinder.RESOLUTIONS
    },
    mqar.NAME: _Task(mqar.DEFAULTS, mqar.info, mqar.load),
    copying.COPY_NAME: _Task(copying.COPY_DEFAULTS, copying.copy_info, copying.copy_load),
    copying.INDUCTION_NAME: _Task(
        copying.INDUCTION_DEFAULTS, copying.induction_info, copying.induction_load
    ),
    **{
        name: _Task(
            idx.DEFAULTS, functools.partial(idx.info, name), functools.partial(idx.load, name)
        )
        for name in idx.FOLDERS
    },
}


def list_tasks() -> tuple[str, ...]:
    """The names ``load_task`` and ``task_info`` accept, sorted."""
    return tuple(sorted(_TASKS))


def _task(name: str) -> _Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


def task_defaults(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, with their defaults."""
    return dict(_task(name).defaults)


def task_info(name: str, **options) -> base.TaskInfo:
    """Metadata of task ``name`` under ``options``, to build a model before reading any data.

    Raises ValueError for an unknown task (listing the known ones), an unknown option (naming
    it) or an invalid option value.
    """
    task = _task(name)
    return task.info(**base.resolve_options(name, task.defaults, options))


def load_task(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, **options
) -> grain.MapDataset:
    """Task ``name``'s ``split`` ("train", "val" or "test") as a random-access dataset.

    Each element is a dict of numpy arrays whose shapes are fixed by the task and options
    (``effseq.data.base`` describes the format; ``task_info`` gives the shapes). File-backed
    tasks read from ``data_dir``, default ``$EFFSEQ_DATA_DIR``, laid out as the official
    releases; missing files raise ``MissingDataError`` listing the expected paths and how to
    obtain them, and a malformed row raises ValueError naming the file and line.
    """
    task = _task(name)
    resolved = base.resolve_options(name, task.defaults, options)
    task.info(**resolved)  # validates the option values before touching any file
    base.check_split(name, split)
    return task.load(split, data_dir, **resolved)
