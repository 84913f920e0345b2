"""lm-eval task YAML files of this project (local tasks that run offline), always on the path of
``launch/evaluate.py``; with lm-eval's own command pass ``--include_path`` to this folder."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
