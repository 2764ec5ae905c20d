"""Evaluation library: tasks (held-out sets and public benchmarks from local files), scorers and a
harness that runs them through a model's generate / log-likelihood callables."""
from hrmtext.evals.harness import evaluate, format_table, scalar_metrics
from hrmtext.evals.loaders import (BENCHMARKS, heldout_tasks, load_arc, load_benchmark, load_boolq,
                                   load_drop, load_gsm8k, load_hellaswag, load_math, load_mmlu,
                                   load_winogrande)
from hrmtext.evals.tasks import Example, GenerationTask, MultipleChoiceTask, Task
