from tests.evaluation.conftest import _one_thread  # noqa: F401  (the same autouse fixture here)
