"""Evaluation library: tasks (held-out sets and public benchmarks from local files), scorers and a
harness that runs them through a model's generate / log-likelihood callables."""
from hrmtext.evals.harness import (evaluate, format_paper_table, format_table, paper_table,
                                   scalar_metrics)
from hrmtext.evals.loaders import (BENCHMARKS, FEW_SHOT, PAPER_TABLE, heldout_tasks, load_aime,
                                   load_arc, load_benchmark, load_boolq, load_drop, load_gsm8k,
                                   load_hellaswag, load_math, load_mmlu, load_winogrande)
from hrmtext.evals.tasks import Example, GenerationTask, MultipleChoiceTask, SampledTask, Task
