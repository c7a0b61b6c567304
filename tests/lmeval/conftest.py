"""lm-evaluation-harness tests: collected only where ``lm_eval`` is installed (``.ci/lmeval.sh`` builds its venv)."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("lm_eval") else ["test_*.py"]
