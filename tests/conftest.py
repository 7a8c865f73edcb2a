import os
import tempfile
from pathlib import Path

import pytest

# MLflow writes go to a throwaway store, never the user's mlflow.db; umap's numba cache somewhere writable.
_TMP = Path(tempfile.mkdtemp(prefix="omni-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ.setdefault("NUMBA_CACHE_DIR", str(_TMP / "numba"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO
