"""Numpy diffusion schedulers for the diffusion decoder: Euler discrete and DPM-Solver++ 2M (multistep).

Torch-free re-implementations of diffusers 0.42's `EulerDiscreteScheduler` and `DPMSolverMultistepScheduler`
(`algorithm_type="dpmsolver++"`), configured from the same `scheduler_config.json` dict. Timesteps equal
diffusers' (Karras timesteps up to float rounding). Sigmas agree to float32 rounding: diffusers builds its
training table with float32 torch ops, emulated here (`torch.linspace` as a fused multiply-add,
`torch.cumprod` with a float64 accumulator), except that torch's float32 `sqrt`/`** 0.5` is not correctly
rounded on every build (+-1 ulp), where this module uses the exact square root. Each step does diffusers'
float32 arithmetic in the same order, so a denoising loop agrees to ~1e-6 relative.

Use:
    schedule = make_schedule(scheduler_config, num_steps)            # or class_name="DPMSolverMultistepScheduler"
    latent = schedule.init_noise_sigma * noise
    state = new_state(schedule)
    for i, t in enumerate(schedule.timesteps):
        model_in = scale_model_input(schedule, latent, i)             # the UNet gets (model_in, t)
        latent = step(schedule, state, i, noise_pred, latent)         # euler_step / dpmpp_step underneath

Like diffusers' `from_config`, keys the scheduler class does not take are ignored (SDXL's config carries
DDIM/PNDM keys); keys it takes with a value this module does not implement are errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError

EULER = "EulerDiscreteScheduler"
DPM_SOLVER = "DPMSolverMultistepScheduler"
SUPPORTED = (EULER, DPM_SOLVER)

_f32 = np.float32

# Arguments of each diffusers class (0.42) with their defaults. `_FIXED` ones are accepted only at the value
# listed (the features behind other values are not implemented here).
_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "use_karras_sigmas": False,
    "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}
_ARGS = {
    EULER: {**_COMMON, "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
            "timestep_type": "discrete", "use_exponential_sigmas": False, "use_beta_sigmas": False},
    DPM_SOLVER: {**_COMMON, "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                 "lower_order_final": True, "euler_at_final": False, "lambda_min_clipped": -math.inf,
                 "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                 "variance_type": None, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                 "use_dynamic_shifting": False, "time_shift_type": "exponential"},
}
_FIXED = {
    EULER: {"interpolation_type": "linear", "timestep_type": "discrete", "use_exponential_sigmas": False,
            "use_beta_sigmas": False},
    DPM_SOLVER: {"thresholding": False, "variance_type": None, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                 "use_dynamic_shifting": False},
}
_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "algorithm_type": ("dpmsolver++", "deis"),  # diffusers maps "deis" to "dpmsolver++"
    "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),  # the last three map to "midpoint"
    "solver_order": (1, 2),
}
# Keys diffusers' from_config keeps on the config even when the class does not take them, and reads for
# Karras sigmas (DPMSolverMultistepScheduler looks them up with hasattr).
_KARRAS_BOUNDS = ("sigma_min", "sigma_max")


@dataclass(frozen=True)
class Schedule:
    """The per-request schedule: what the UNet is fed and the noise levels each step moves between."""
    class_name: str  # EULER | DPM_SOLVER
    timesteps: np.ndarray  # float32 [N]: the UNet's `timestep` input at step i (integers for DPM-Solver)
    sigmas: np.ndarray  # float32 [N + 1]: noise level at step i; sigmas[N] is the final level
    init_noise_sigma: np.float32  # the initial latent is init_noise_sigma * N(0, 1)
    prediction_type: str  # what the model predicts: "epsilon" | "v_prediction" | "sample"
    solver_order: int = 1  # DPM-Solver: 1 or 2 (2M)
    solver_type: str = "midpoint"  # DPM-Solver second-order variant: "midpoint" | "heun"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


@dataclass
class SolverState:
    """Multistep memory (DPM-Solver): the previous steps' x0 predictions, newest last."""
    x0_history: list[np.ndarray] = field(default_factory=list)
    lower_order_nums: int = 0
    next_index: int = 0  # steps must be taken in order


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
def _read_config(config: dict[str, Any], class_name: str | None) -> tuple[str, dict[str, Any]]:
    if not isinstance(config, dict):
        raise ConfigError(f"scheduler config: expected a dict (scheduler_config.json), got {type(config).__name__}")
    name = class_name or config.get("_class_name")
    if name not in SUPPORTED:
        raise ConfigError(f"scheduler config: _class_name {name!r} is not supported; supported schedulers: "
                          f"{list(SUPPORTED)}")
    args = _ARGS[name]
    c = {k: config.get(k, default) for k, default in args.items()}
    for k in _KARRAS_BOUNDS:
        c.setdefault(k, config.get(k))
    for key, want in _FIXED[name].items():
        if c[key] != want and not (want is False and c[key] is None):
            raise ConfigError(f"scheduler config: {key}={c[key]!r} is not supported by the numpy {name}; "
                              f"use {want!r} (or decode with the torch reference)")
    for key, options in _CHOICES.items():
        if key in c and c[key] not in options:
            raise ConfigError(f"scheduler config: {key}={c[key]!r} is not supported by the numpy {name}; "
                              f"choose one of {list(options)}")
    for key in ("beta_start", "beta_end", "lambda_min_clipped", "sigma_min", "sigma_max"):
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"scheduler config: {key} must be a number, got {v!r}")
    for key in ("num_train_timesteps", "steps_offset"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 0:
            raise ConfigError(f"scheduler config: {key} must be a non-negative integer, got {c[key]!r}")
    if c["num_train_timesteps"] < 2:
        raise ConfigError(f"scheduler config: num_train_timesteps must be >= 2, got {c['num_train_timesteps']}")
    if name == DPM_SOLVER:
        c["algorithm_type"] = "dpmsolver++"
        if c["solver_type"] not in ("midpoint", "heun"):
            c["solver_type"] = "midpoint"
    return name, c


# ----------------------------------------------------------------------------------------------------
# Training noise table (float32, as diffusers builds it with torch)
# ----------------------------------------------------------------------------------------------------
def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32): float32 step, first half from start, second from end,
    each value a fused multiply-add (emulated exactly in float64, then rounded once)."""
    a, b = _f32(start), _f32(end)
    if n == 1:
        return np.array([a], dtype=np.float32)
    step = (b - a) / _f32(n - 1)
    i = np.arange(n, dtype=np.float64)
    from_start = np.float64(step) * i + np.float64(a)
    from_end = np.float64(b) - np.float64(step) * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, from_start, from_end).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on a float32 CPU tensor: float64 accumulator, each prefix rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _alpha_bar_cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                    dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    root = np.sqrt(_cumprod_f32(_f32(1.0) - betas))  # sqrt(alpha_bar)
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return _f32(1.0) - alphas


def _alphas_cumprod(c: dict[str, Any]) -> np.ndarray:
    n = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], dtype=np.float32)
        if betas.shape != (n,):
            raise ConfigError(f"scheduler config: trained_betas has {betas.size} values, expected "
                              f"num_train_timesteps={n}")
    elif c["beta_schedule"] == "linear":
        betas = _torch_linspace_f32(c["beta_start"], c["beta_end"], n)
    elif c["beta_schedule"] == "scaled_linear":
        root = _torch_linspace_f32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n)
        betas = root * root
    else:  # squaredcos_cap_v2
        betas = _alpha_bar_cosine_betas(n)
    if c["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod_f32(_f32(1.0) - betas)
    if c["rescale_betas_zero_snr"]:
        alphas_cumprod[-1] = _f32(2.0 ** -24)
    return alphas_cumprod


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a noise level: linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def _karras(in_sigmas: np.ndarray, n: int, c: dict[str, Any]) -> np.ndarray:
    """Karras et al. (2022) rho=7 noise levels between the schedule's extremes (or the config's bounds)."""
    rho = 7.0
    lo = c["sigma_min"] if c["sigma_min"] is not None else in_sigmas[-1].item()
    hi = c["sigma_max"] if c["sigma_max"] is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    lo_inv, hi_inv = lo ** (1 / rho), hi ** (1 / rho)
    return (hi_inv + ramp * (lo_inv - hi_inv)) ** rho


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------
def train_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """alpha-bar_t [num_train_timesteps] (float32) of a scheduler config's training schedule (what a trainer
    noises with; diffusers' `scheduler.alphas_cumprod`)."""
    return _alphas_cumprod(_read_config(config, None)[1])


def make_schedule(config: dict[str, Any], num_steps: int, *, class_name: str | None = None) -> Schedule:
    """diffusers' `set_timesteps(num_steps)` for the scheduler named by `config["_class_name"]` (or by
    `class_name`, to run e.g. DPM-Solver++ 2M from an Euler config as `DPMSolverMultistepScheduler.from_config`
    would)."""
    name, c = _read_config(config, class_name)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ConfigError(f"scheduler: num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > c["num_train_timesteps"]:
        raise ConfigError(f"scheduler: num_steps {num_steps} exceeds num_train_timesteps "
                          f"{c['num_train_timesteps']}")
    alphas_cumprod = _alphas_cumprod(c)
    train_sigmas = np.sqrt((_f32(1.0) - alphas_cumprod) / alphas_cumprod)  # float32 [T]
    if c["final_sigmas_type"] == "sigma_min":
        last_sigma = float(train_sigmas[0])
    else:
        last_sigma = 0.0
    if name == EULER:
        return _euler_schedule(c, int(num_steps), train_sigmas, last_sigma)
    return _dpm_schedule(c, int(num_steps), alphas_cumprod, train_sigmas, last_sigma)


def _euler_schedule(c: dict[str, Any], n: int, train_sigmas: np.ndarray, last_sigma: float) -> Schedule:
    T = c["num_train_timesteps"]
    spacing = c["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ratio = T // n
        timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        timesteps += c["steps_offset"]
    else:  # trailing
        ratio = T / n
        timesteps = np.arange(T, 0, -ratio).round().copy().astype(np.float32)
        timesteps -= 1
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # float64 [N]
    if c["use_karras_sigmas"]:
        sigmas = _karras(sigmas, n, c)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
    top = sigmas.max()
    init = top if spacing in ("linspace", "trailing") else np.sqrt(top * top + _f32(1.0))
    return Schedule(EULER, timesteps.astype(np.float32), sigmas, _f32(init), c["prediction_type"],
                    final_sigmas_type=c["final_sigmas_type"])


def _dpm_schedule(c: dict[str, Any], n: int, alphas_cumprod: np.ndarray, train_sigmas: np.ndarray,
                  last_sigma: float) -> Schedule:
    T = c["num_train_timesteps"]
    last_timestep = T
    if c["lambda_min_clipped"] != -math.inf:
        alpha = np.sqrt(alphas_cumprod).astype(np.float64)
        sigma = np.sqrt(_f32(1.0) - alphas_cumprod).astype(np.float64)
        lambdas = (np.log(alpha) - np.log(sigma)).astype(np.float32)  # log-SNR / 2, float32 as diffusers
        last_timestep = T - int(np.searchsorted(lambdas[::-1], c["lambda_min_clipped"]))
    spacing = c["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += c["steps_offset"]
    else:  # trailing
        ratio = T / n
        timesteps = np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64)
        timesteps -= 1
    if c["use_karras_sigmas"]:
        log_sigmas = np.log(train_sigmas)
        sigmas = _karras(np.flip(train_sigmas).copy(), n, c)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if c["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
    return Schedule(DPM_SOLVER, timesteps.astype(np.float32), sigmas, _f32(1.0), c["prediction_type"],
                    solver_order=c["solver_order"], solver_type=c["solver_type"],
                    lower_order_final=bool(c["lower_order_final"]), euler_at_final=bool(c["euler_at_final"]),
                    final_sigmas_type=c["final_sigmas_type"])


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------
def new_state(schedule: Schedule) -> SolverState:
    return SolverState()


def _check_index(schedule: Schedule, i: int) -> None:
    if not 0 <= i < schedule.num_steps:
        raise IndexError(f"scheduler: step index {i} outside [0, {schedule.num_steps})")


def _as_f32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"scheduler: {what} must be a float array, got {x.dtype}")
        x = x.astype(np.float32)
    return x


def scale_model_input(schedule: Schedule, sample: np.ndarray, i: int) -> np.ndarray:
    """The UNet input at step i: Euler divides by sqrt(sigma^2 + 1); DPM-Solver passes the sample through."""
    _check_index(schedule, i)
    sample = _as_f32(sample, "sample")
    if schedule.class_name == EULER:
        sigma = schedule.sigmas[i]
        return sample / np.sqrt(sigma * sigma + _f32(1.0))
    return sample


def euler_step(schedule: Schedule, i: int, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """One Euler step from sigmas[i] to sigmas[i+1] (deterministic: diffusers' s_churn = 0)."""
    _check_index(schedule, i)
    out, x = _as_f32(model_output, "model_output"), _as_f32(sample, "sample")
    if out.shape != x.shape:
        raise ValueError(f"scheduler: model_output shape {out.shape} != sample shape {x.shape}")
    sigma = schedule.sigmas[i]
    if schedule.prediction_type == "epsilon":
        x0 = x - sigma * out
    elif schedule.prediction_type == "v_prediction":
        x0 = out * (-sigma / np.sqrt(sigma * sigma + _f32(1.0))) + x / (sigma * sigma + _f32(1.0))
    else:  # sample
        x0 = out
    derivative = (x - x0) / sigma
    dt = schedule.sigmas[i + 1] - sigma
    return x + derivative * dt


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the variance-preserving process at noise level sigma (float32)."""
    alpha = _f32(1.0) / np.sqrt(sigma * sigma + _f32(1.0))
    return alpha, sigma * alpha


def _log(x: np.float32) -> np.float32:
    return _f32(-math.inf) if x == 0 else _f32(math.log(float(x)))


def _exp(x: np.float32) -> np.float32:
    return _f32(math.exp(float(x)))


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    """Half log-SNR, log(alpha) - log(sigma) (+inf at sigma 0)."""
    return _log(alpha) - _log(sigma)


def dpmpp_step(schedule: Schedule, state: SolverState, i: int, model_output: np.ndarray,
               sample: np.ndarray) -> np.ndarray:
    """One DPM-Solver++ multistep step (order 2 = "2M", first order at the start and, as diffusers'
    `lower_order_final` / `final_sigmas_type="zero"` decide, at the end)."""
    _check_index(schedule, i)
    if i != state.next_index:
        raise ValueError(f"scheduler: DPM-Solver steps must run in order from 0; expected step "
                         f"{state.next_index}, got {i} (use a fresh new_state() per image)")
    out, x = _as_f32(model_output, "model_output"), _as_f32(sample, "sample")
    if out.shape != x.shape:
        raise ValueError(f"scheduler: model_output shape {out.shape} != sample shape {x.shape}")
    n = schedule.num_steps
    sig = schedule.sigmas
    last = i == n - 1
    lower_final = last and (schedule.euler_at_final or (schedule.lower_order_final and n < 15)
                            or schedule.final_sigmas_type == "zero")

    # the model output as a data (x0) prediction
    alpha_s0, sigma_s0 = _alpha_sigma(sig[i])
    if schedule.prediction_type == "epsilon":
        x0 = (x - sigma_s0 * out) / alpha_s0
    elif schedule.prediction_type == "v_prediction":
        x0 = alpha_s0 * x - sigma_s0 * out
    else:  # sample
        x0 = out
    state.x0_history = (state.x0_history + [x0])[-schedule.solver_order:]

    alpha_t, sigma_t = _alpha_sigma(sig[i + 1])
    h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s0, sigma_s0)
    decay = alpha_t * (_exp(-h) - _f32(1.0))  # alpha_t * (e^-h - 1)
    if schedule.solver_order == 1 or state.lower_order_nums < 1 or lower_final:
        prev = (sigma_t / sigma_s0) * x - decay * x0
    else:  # second order ("2M"; diffusers' lower_order_second only lowers orders above 2)
        alpha_s1, sigma_s1 = _alpha_sigma(sig[i - 1])
        h_0 = _lambda(alpha_s0, sigma_s0) - _lambda(alpha_s1, sigma_s1)
        r0 = h_0 / h
        m0, m1 = state.x0_history[-1], state.x0_history[-2]
        d1 = (_f32(1.0) / r0) * (m0 - m1)
        if schedule.solver_type == "midpoint":
            prev = (sigma_t / sigma_s0) * x - decay * m0 - _f32(0.5) * decay * d1
        else:  # heun
            prev = (sigma_t / sigma_s0) * x - decay * m0 + (alpha_t * ((_exp(-h) - _f32(1.0)) / h + _f32(1.0))) * d1
    state.lower_order_nums = min(state.lower_order_nums + 1, schedule.solver_order)
    state.next_index = i + 1
    return prev


def step(schedule: Schedule, state: SolverState, i: int, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """The sample at step i + 1, by the schedule's family."""
    if schedule.class_name == EULER:
        return euler_step(schedule, i, model_output, sample)
    return dpmpp_step(schedule, state, i, model_output, sample)
