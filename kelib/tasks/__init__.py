"""lm-evaluation-harness tasks that kelib ships, one folder per group (``rect``, ``prune``, ``d4s``...).

Every ``*.yaml`` below this folder whose config has a ``task:`` key is a task; its group is the name of
the top-level folder it sits in (``kelib.evaluation`` discovers them, so adding a folder is enough).
A folder holds its YAMLs, a ``utils.py`` that lm-eval imports by path (``!function utils.load``) and a
``data/`` folder of gzipped JSONL subsets; :mod:`kelib.tasks.common` has the helpers they share.
``PROVENANCE.md`` says where every bundled example comes from; ``_build.py`` rebuilds the subsets.
"""
