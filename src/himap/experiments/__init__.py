"""Applications that run a model over a question file, on one source / run-folder / resume stack:

- :mod:`~himap.experiments.source`: the model, questions (checked, limited, chunked), prompt settings, signature;
- :mod:`~himap.experiments.run`: the run folder, its stored signature and the resume rules;
- :mod:`~himap.experiments.eval`, :mod:`~himap.experiments.predict`, :mod:`~himap.experiments.results`: the
  ScienceQA evaluation (``himap eval``, ``merge``, ``table``);
- :mod:`~himap.experiments.saliency`, :mod:`~himap.experiments.disrupt`: the information-flow analyses
  (``himap saliency``, ``himap disrupt``), one question at a time on :mod:`~himap.experiments.items`.

The core (:mod:`himap.engine`, :mod:`himap.policies`, :mod:`himap.analysis` ...) never imports this package.
"""
