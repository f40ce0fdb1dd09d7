"""Stand-in models for scheduler parity tests that need samples to stay near unit scale."""

import numpy as np


def denoiser(x: np.ndarray, t: float) -> np.ndarray:
    """Predicts roughly the noise a pure-noise sample holds, as a trained epsilon UNet does.

    The harness's default model drives PNDM/DDPM/LCM samples to |x| ~ 20-70 over many steps. There, one-ulp
    differences (torch's float32 sqrt is not correctly rounded, NumPy's is) can exceed the harness's element-wise
    1e-5 check of ``scale_model_input`` although every step's relative error stays ~1e-6.
    """
    return (0.9 * x + 0.1 * np.sin(x * 0.7 + float(t) / 300.0)).astype(np.float32)
