import os

# Eight fake CPU devices for the multi-device tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if os.environ["JAX_PLATFORMS"] != "cpu":
    # The tolerance table (tests/tolerances.py) assumes float32 arithmetic in the fast paths and
    # the references alike. GPUs and TPUs run float32 matrix products at reduced precision by
    # default (TF32 or bf16 passes, about 1e-3 relative), far outside those tolerances, so the
    # suite pins full precision there. effseq itself leaves JAX's default (or the user's) alone.
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
