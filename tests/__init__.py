"""The project's tests (a package, so that `tests.conftest` is this folder's even where another
distribution installs a top-level `tests` package, as the robustbench wheel does)."""
