"""Data pipelines on grain: Long Range Arena in its official formats, synthetic recall tasks,
sequential images, offline generators, and the batching the trainer uses.

Never imports effseq.models or effseq.train.
"""

from effseq.data.base import MissingDataError, TaskInfo, validate
from effseq.data.pipeline import batches
from effseq.data.tasks import list_tasks, load_task, task_defaults, task_info

__all__ = [
    "MissingDataError",
    "TaskInfo",
    "batches",
    "list_tasks",
    "load_task",
    "task_defaults",
    "task_info",
    "validate",
]
