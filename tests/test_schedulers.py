"""Numpy schedulers vs diffusers 0.42: timesteps, sigmas, init sigma and whole denoising loops."""
import subprocess
import sys
import warnings

import diffusers  # the reference (export extra)
import numpy as np
import pytest
import torch

from illume_edge.config import SDXL_SCHEDULER, ConfigError
from illume_edge.runtime import schedulers as S

EULER, DPM = "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"
STEPS = (1, 2, 4, 10, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
# Sigmas agree to float32 rounding. torch's float32 sqrt is not correctly rounded on every build (+-1 ulp;
# the numpy side uses the exact root), and zero-terminal-SNR rescaling amplifies that by cancellation
# (1 - alpha_bar ratios near 1), so its noise levels near t = 0 agree only to ~1e-3.
SIGMA_RTOL = 1e-6
ZERO_SNR_RTOL = 2e-3
VARIANTS = {
    "sdxl": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "karras": {"use_karras_sigmas": True},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine_zero_snr": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True,
                        "prediction_type": "v_prediction"},
    "sigma_min_final": {"final_sigmas_type": "sigma_min"},
    "sample_prediction": {"prediction_type": "sample"},
}
DPM_VARIANTS = {"2m": {}, "heun": {"solver_type": "heun"}, "no_lower_final": {"lower_order_final": False},
                "order1": {"solver_order": 1}, "euler_at_final": {"euler_at_final": True}}


def _config(cls, spacing, variant, dpm_variant="2m"):
    d = dict(SDXL_SCHEDULER, _class_name=cls, timestep_spacing=spacing, **VARIANTS[variant])
    if cls == DPM:
        d.update(DPM_VARIANTS[dpm_variant])
    return d


def _reference(config, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, config["_class_name"]).from_config(config)
        ref.set_timesteps(steps)
    return ref


def _fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: a smooth function of the input and the timestep."""
    return (np.sin(x * np.float32(0.7) + np.float32(t / 1000.0)) * np.float32(0.5)
            + np.float32(0.1) * x).astype(np.float32)


def _assert_schedule_matches(sched: S.Schedule, ref, exact_timesteps=True, rtol=SIGMA_RTOL):
    ts = ref.timesteps.numpy().astype(np.float32)
    assert sched.timesteps.dtype == np.float32 and sched.timesteps.shape == ts.shape
    if exact_timesteps:
        assert np.array_equal(sched.timesteps, ts)
    else:
        np.testing.assert_allclose(sched.timesteps, ts, rtol=1e-5, atol=1e-3)
    ref_sigmas = ref.sigmas.numpy()
    assert sched.sigmas.dtype == np.float32 and sched.sigmas.shape == ref_sigmas.shape
    np.testing.assert_allclose(sched.sigmas, ref_sigmas, rtol=rtol, atol=0)
    np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=rtol)


@pytest.mark.parametrize("cls", [EULER, DPM])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timesteps_and_sigmas_match_diffusers(cls, spacing, variant):
    config = _config(cls, spacing, variant)
    for steps in STEPS:
        ref = _reference(config, steps)
        sched = S.make_schedule(config, steps)
        # Karras timesteps come from interpolating sigmas: equal up to float rounding (DPM rounds them)
        _assert_schedule_matches(sched, ref, exact_timesteps=variant != "karras" or cls == DPM,
                                 rtol=ZERO_SNR_RTOL if variant == "cosine_zero_snr" else SIGMA_RTOL)


def _run_both(config, steps, shape=(1, 4, 6, 5), seed=0):
    ref = _reference(config, steps)
    sched = S.make_schedule(config, steps)
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    x = noise * sched.init_noise_sigma
    state = S.new_state(sched)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        model_in_ref = ref.scale_model_input(x_ref, t)
        model_in = S.scale_model_input(sched, x, i)
        scale = max(1.0, float(np.abs(model_in_ref.numpy()).max()))
        worst = max(worst, float(np.abs(model_in - model_in_ref.numpy()).max()) / scale)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x_ref = ref.step(torch.from_numpy(_fake_model(model_in_ref.numpy(), float(t))), t, x_ref,
                             return_dict=False)[0]
        x = S.step(sched, state, i, _fake_model(model_in, float(sched.timesteps[i])), x)
        assert x.dtype == np.float32 and x.shape == shape
        scale = max(1.0, float(np.abs(x_ref.numpy()).max()))
        worst = max(worst, float(np.abs(x - x_ref.numpy()).max()) / scale)
    return worst


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant", ["sdxl", "v_prediction", "karras", "linear_betas", "sample_prediction"])
def test_euler_loop_matches_diffusers(spacing, variant):
    for steps in (1, 4, 25):
        assert _run_both(_config(EULER, spacing, variant), steps) <= 1e-5


@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_loop_zero_snr_matches_diffusers(spacing):
    """Zero terminal SNR starts at sigma 4096: the table's 1e-3 rounding differences (above) show up here."""
    for steps in (1, 4, 25):
        assert _run_both(_config(EULER, spacing, "cosine_zero_snr"), steps) <= 1e-3


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant", ["sdxl", "v_prediction", "karras", "sigma_min_final", "cosine_zero_snr"])
@pytest.mark.parametrize("dpm_variant", list(DPM_VARIANTS))
def test_dpmpp_loop_matches_diffusers(spacing, variant, dpm_variant):
    # 14 and 15 steps straddle diffusers' "lower_order_final only below 15 steps" rule
    for steps in (1, 2, 5, 14, 15, 25):
        assert _run_both(_config(DPM, spacing, variant, dpm_variant), steps) <= 1e-5


def test_class_name_override_runs_dpm_from_the_euler_config():
    """The release ships an Euler config; DPM-Solver++ 2M from it = diffusers' DPM `from_config(euler)`."""
    euler = dict(SDXL_SCHEDULER)
    sched = S.make_schedule(euler, 20, class_name=DPM)
    assert sched.class_name == DPM and sched.solver_order == 2
    _assert_schedule_matches(sched, _reference(dict(euler, _class_name=DPM), 20))


def test_schedule_contract():
    sched = S.make_schedule(dict(SDXL_SCHEDULER), 25)
    assert sched.num_steps == 25
    assert sched.timesteps[0] == 961.0 and sched.timesteps[-1] == 1.0  # SDXL "leading" + steps_offset 1
    assert sched.sigmas[-1] == 0.0 and np.all(np.diff(sched.sigmas) < 0)
    assert sched.init_noise_sigma > sched.sigmas[0]  # leading spacing: sqrt(sigma_max^2 + 1)
    x = np.ones((1, 4, 2, 2), np.float32)
    assert S.scale_model_input(S.make_schedule(dict(SDXL_SCHEDULER), 4, class_name=DPM), x, 0) is x


@pytest.mark.parametrize("config,match", [
    (dict(SDXL_SCHEDULER, _class_name="DDIMScheduler"), r"'DDIMScheduler'.*EulerDiscreteScheduler.*DPMSolver"),
    ({k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"}, r"None is not supported"),
    (dict(SDXL_SCHEDULER, beta_schedule="cosine"), r"beta_schedule='cosine'.*scaled_linear"),
    (dict(SDXL_SCHEDULER, timestep_spacing="even"), r"timestep_spacing='even'"),
    (dict(SDXL_SCHEDULER, prediction_type="flow_prediction"), r"prediction_type"),
    (dict(SDXL_SCHEDULER, interpolation_type="log_linear"), r"interpolation_type='log_linear'"),
    (dict(SDXL_SCHEDULER, use_exponential_sigmas=True), r"use_exponential_sigmas"),
    (dict(SDXL_SCHEDULER, _class_name=DPM, thresholding=True), r"thresholding=True"),
    (dict(SDXL_SCHEDULER, _class_name=DPM, algorithm_type="sde-dpmsolver++"), r"algorithm_type"),
    (dict(SDXL_SCHEDULER, _class_name=DPM, solver_order=3), r"solver_order=3"),
    (dict(SDXL_SCHEDULER, trained_betas=[0.1] * 10), r"trained_betas has 10 values.*1000"),
    (dict(SDXL_SCHEDULER, num_train_timesteps="1000"), r"num_train_timesteps must be"),
    (dict(SDXL_SCHEDULER, beta_start="0.1"), r"beta_start must be a number"),
    ("EulerDiscreteScheduler", r"expected a dict"),
])
def test_bad_configs_fail_clearly(config, match):
    with pytest.raises(ConfigError, match=match):
        S.make_schedule(config, 10)


def test_bad_steps_fail_clearly():
    with pytest.raises(ConfigError, match="num_steps must be a positive integer"):
        S.make_schedule(dict(SDXL_SCHEDULER), 0)
    with pytest.raises(ConfigError, match="exceeds num_train_timesteps"):
        S.make_schedule(dict(SDXL_SCHEDULER), 1001)
    sched = S.make_schedule(dict(SDXL_SCHEDULER), 4, class_name=DPM)
    state = S.new_state(sched)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="in order from 0; expected step 0, got 1"):
        S.step(sched, state, 1, x, x)
    with pytest.raises(ValueError, match="model_output shape"):
        S.step(sched, state, 0, np.zeros((1, 4, 2, 3), np.float32), x)
    with pytest.raises(IndexError, match=r"step index 4 outside \[0, 4\)"):
        S.scale_model_input(sched, x, 4)
    with pytest.raises(TypeError, match="float array"):
        S.euler_step(S.make_schedule(dict(SDXL_SCHEDULER), 4), 0, np.zeros((1, 4, 2, 2), np.int64), x)


def test_runtime_module_never_imports_torch():
    code = ("import sys, numpy as np; from illume_edge.runtime import schedulers as S; "
            "from illume_edge.config import SDXL_SCHEDULER; s = S.make_schedule(dict(SDXL_SCHEDULER), 5); "
            "x = np.ones((1, 4, 2, 2), np.float32); S.step(s, S.new_state(s), 0, x, x); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
