"""experiments/quickstart.ipynb runs from top to bottom, headless, so it cannot rot."""

from pathlib import Path

import pytest

from pjlm_testing import require

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes_and_dpo_moves_the_reward(tmp_path):
    nbformat, nbclient = require("nbformat", "nbclient")
    require("ipykernel", "matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "SFT: reward" in outputs and "DPO: reward" in outputs
    assert any("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for o in cell.outputs), "the last cell draws the reward–KL plot"
    assert (tmp_path / "runs" / "quickstart" / "dpo" / "checkpoints").is_dir()
