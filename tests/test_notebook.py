"""Executes notebooks/soft_thinking_walkthrough.ipynb at smoke settings (nbclient, a fresh python3 kernel)."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "soft_thinking_walkthrough.ipynb")
# what CI runs: smaller than the notebook's defaults (papermill-style: a cell injected after the "parameters" cell)
SMOKE_PARAMETERS = """\
MAX_NEW_TOKENS = 32
HEATMAP_STEPS = 16
TRAIN_STEPS = 2
TRAIN_OVERRIDES = ["data.eval_limit=2"]
"""


def _kernel_name(tmp_path, monkeypatch) -> str:
    """The venv's python3 kernelspec; installed into a temporary data dir when the environment has none."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        install(prefix=str(tmp_path / "jupyter"))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    return "python3"


def _inject_parameters(nb):
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    cell = nbformat.v4.new_code_cell(SMOKE_PARAMETERS)
    cell.metadata["tags"] = ["injected-parameters"]
    cell["id"] = "injected-parameters"  # nbformat 4.5 cells carry ids (a missing one warns, later an error)
    nb.cells.insert(tagged[0] + 1, cell)


def test_notebook_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, "strip the notebook's outputs before committing"


@pytest.mark.slow
def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _inject_parameters(nb)
    # the kernel is a separate process: one CPU device (conftest gives this process 8 simulated ones)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, kernel_name=_kernel_name(tmp_path, monkeypatch), timeout=600,
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # show the failing cell's traceback in the test report
        pytest.fail(f"notebook cell failed:\n{e}")
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept for inspection on failure

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count is not None for c in code)

    def outputs_of(marker):
        cells = [c for c in code if marker in c.source]
        assert cells, marker
        return [o for c in cells for o in c.outputs]

    def pngs(outs):
        return [o for o in outs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]

    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    line = next(ln for ln in text.splitlines() if ln.startswith("ANSWERS_JSON "))
    answers = json.loads(line[len("ANSWERS_JSON "):])
    assert set(answers) == {"discrete", "soft", "gumbel"}
    for mode, a in answers.items():
        assert a["completion"].strip(), f"{mode} sample is empty"
    assert len(pngs(outputs_of("plot_topk_heatmap("))) >= 1, "no heat map"
    assert len(pngs(outputs_of("kl_token"))) >= 1, "no metrics plot"
    assert "log pi_old(step)" in text and "PPO ratio" in text
    assert "2 steps in" in text
    # the notebook removes its training run's checkpoints (about 2.4 GB per execution otherwise left in /tmp)
    removed = [ln for ln in text.splitlines() if ln.startswith("removed ") and "softgrpo_walkthrough_" in ln]
    assert removed and removed[-1].endswith(": True"), removed
    assert not os.path.exists(removed[-1][len("removed "):-len(": True")])
