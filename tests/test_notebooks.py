"""The notebooks run top to bottom (nbclient, a fresh kernel, cwd = notebooks/) on small inputs.

They hold their own checks (asserts on lookups, budgets, Belady >= online policies, summary vs
records), so a notebook that runs but computes nonsense fails here too."""
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "policy_study.ipynb", "results.ipynb"])
def test_notebook_runs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(o.output_type in ("execute_result", "display_data") for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
