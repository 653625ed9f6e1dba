"""The former home of the evaluation, now :mod:`himap.experiments.eval` (and ``predict``, ``results``); these
names stay importable from here."""

from .configs import image_tokens_for as image_token_count  # noqa: F401
from .experiments.eval import EvalConfig, evaluate, write_vanilla_correct  # noqa: F401
from .experiments.predict import generate_batch, iter_batches, predict  # noqa: F401
from .experiments.results import RECORD_FIELDS, format_table, merge, parse_answer, score  # noqa: F401
from .experiments.source import chunk, read_questions  # noqa: F401
