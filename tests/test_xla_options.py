"""softgrpo_jax.xla_options: which compile options model computations get, and that they reach XLA:CPU."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from softgrpo_jax import xla_options
from softgrpo_jax.ops.tuning import Tuning, tuning, use_tuning
from softgrpo_jax.xla_options import YNN_OPTION, compiler_options, option_supported

from helpers import expect_ynn

AVX2 = frozenset({"avx2", "fma"})
AMX = frozenset({"avx2", "avx512f", "amx_bf16"})


def test_choice_by_backend_cpu_and_mode():
    assert tuning().ynn_dots == "auto"
    off = {YNN_OPTION: ""} if option_supported(YNN_OPTION, "") else {}
    assert compiler_options("cpu", flags=AVX2) == off  # auto: no bf16 units -> no YNNPACK dot fusions
    assert compiler_options("cpu", flags=AMX) == {}  # auto: the AMX machine keeps XLA's default
    assert compiler_options("cpu", flags=AMX, mode="off") == off
    assert compiler_options("cpu", flags=AVX2, mode="on") == {}
    assert compiler_options("gpu", flags=AVX2, mode="off") == {}  # a CPU option only
    # the tuning's knob (default from the environment variable) is what mode=None follows
    assert Tuning.from_env({xla_options.YNN_DOTS_ENV: " OFF "}).ynn_dots == "off"
    with use_tuning(Tuning.from_env({xla_options.YNN_DOTS_ENV: " OFF "})):
        assert compiler_options("cpu", flags=AMX) == off
    with pytest.raises(ValueError, match="SOFTGRPO_YNN_DOTS='yes'.*auto, on, off"):
        Tuning.from_env({xla_options.YNN_DOTS_ENV: "yes"})
    with pytest.raises(ValueError, match="ynn_dots='yes'"):
        Tuning(ynn_dots="yes")


def test_option_this_jaxlib_lacks_is_left_out(monkeypatch):
    """An option the compiler does not know is probed once and dropped (XLA_FLAGS would abort the process)."""
    assert not option_supported("xla_cpu_no_such_option_softgrpo", "")
    monkeypatch.setattr(xla_options, "YNN_OPTION", "xla_cpu_no_such_option_softgrpo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiler_options("cpu", flags=AVX2, mode="auto") == {}  # silent under auto
    with pytest.warns(UserWarning, match="no compile option xla_cpu_no_such_option_softgrpo"):
        assert compiler_options("cpu", flags=AVX2, mode="off") == {}


def test_lazy_jit_and_engine_compile_without_ynn(tmp_path):
    """xla_options.jit resolves the options at each use (a changed tuning is never silently ignored); with them the
    dots leave YNNPACK and the result holds."""
    from softgrpo_jax.sampling import engine

    if option_supported(YNN_OPTION, ""):  # jax 0.10.x: the checks below tell the two settings apart
        assert expect_ynn("on") and not expect_ynn("off")
    rng = np.random.RandomState(0)
    a, b = (jnp.asarray(rng.randn(96, 80).astype(np.float32)), jnp.asarray(rng.randn(80, 64).astype(np.float32)))
    f = xla_options.jit(lambda x, y: jnp.tanh(x @ y))
    with use_tuning(ynn_dots="off"):
        text = f.lower(a, b).compile().as_text()
        assert ("ynn_fusion" in text) == expect_ynn("off") and (expect_ynn("off") or " dot(" in text)
        np.testing.assert_allclose(np.asarray(f(a, b)),
                                   np.tanh(np.asarray(a, np.float64) @ np.asarray(b, np.float64)), rtol=1e-5, atol=1e-5)
    with use_tuning(ynn_dots="on"):  # the same function, now under the other setting
        assert ("ynn_fusion" in f.lower(a, b).compile().as_text()) == expect_ynn("on")
    # the engine's prefill and decode loop are such functions: a first use compiles with the environment's setting
    from softgrpo_jax import load_pretrained
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    from helpers import make_hf_model

    make_hf_model(str(tmp_path), "llama", seed=1, vocab_size=64)
    model = load_pretrained(str(tmp_path))
    eng = RolloutEngine(model, SamplingConfig(mode="gumbel", max_new_tokens=4), pad_id=0)
    mcfg, params = eng.decode_params(model)
    toks, mask = eng.prepare_prompts([[3, 5, 7], [9, 11]])
    logits = {}
    for mode in ("off", "on"):
        with use_tuning(ynn_dots=mode):
            text = engine.prefill.lower(mcfg, params, toks, mask, cache_len=toks.shape[1] + 4).compile().as_text()
            assert ("ynn_fusion" in text) == expect_ynn(mode), mode
            logits[mode] = np.asarray(engine.prefill(mcfg, params, toks, mask, cache_len=toks.shape[1] + 4)[0])
    np.testing.assert_allclose(logits["off"], logits["on"], rtol=1e-5, atol=1e-5)
    assert np.abs(logits["on"]).max() > 0.1
