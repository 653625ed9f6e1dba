"""The former home of the result files' code, now :mod:`himap.experiments.results`; these names stay
importable from here."""

from .experiments.results import (
                                  RECORD_FIELDS,
                                  error_record,
                                  format_table,
                                  merge,
                                  option_letters,
                                  parse_answer,
                                  read_summary,
                                  score,
                                  summarize,
)

__all__ = ["RECORD_FIELDS", "error_record", "format_table", "merge", "option_letters", "parse_answer",
           "read_summary", "score", "summarize"]
