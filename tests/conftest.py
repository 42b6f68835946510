import os
import shutil
import tempfile

# Eight fake CPU devices for the multi-device tests; must be set before JAX initialises.
# EFFSEQ_TEST_DEVICES=1 gives one, as on a one-GPU host: the tests marked ``devices(n)`` then
# skip, which is how a CPU checks that `make test-gpu` on one GPU skips them cleanly.
_FAKE = os.environ.get("EFFSEQ_TEST_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_FAKE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Much of the suite's time on a CPU is XLA compiling small programs. JAX's switch for tests
# turns LLVM's optimisation passes off (the HLO passes, fusion included, still run): 22 model
# tests went from 114 s to 82 s in one run each (2-core EPYC, jax 0.10.2); the
# programs compute the same values up to float rounding, which the tolerance table covers,
# and bitwise comparisons compare two runs compiled alike. Inherited by the subprocesses the
# tests start (CLI runs, notebooks). EFFSEQ_TEST_OPTIMIZED=1 compiles as users do.
if os.environ["JAX_PLATFORMS"] == "cpu" and os.environ.get("EFFSEQ_TEST_OPTIMIZED") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "devices(n): needs n JAX devices; skipped where fewer are visible (one GPU)"
    )
    # One persistent compilation cache per test session, shared by the xdist workers and the
    # subprocesses tests start (they inherit the environment): the suite compiles the same
    # small programs many times over (the tiny training config of tests/train in ~20 runs,
    # CLI subprocesses), and a hit skips XLA. tests/train/test_loop.py + test_workdir.py went
    # from 130 s to 91 s (-n 2, one run each, 2-core EPYC, jax 0.10.2). It starts empty, so
    # no run depends on an earlier one; the controller removes it at the end.
    if not hasattr(config, "workerinput") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        config._effseq_jax_cache = tempfile.mkdtemp(prefix="effseq-test-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._effseq_jax_cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
    cache = getattr(config, "_effseq_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


if os.environ["JAX_PLATFORMS"] != "cpu":
    # The tolerance table (tests/tolerances.py) assumes float32 arithmetic in the fast paths and
    # the references alike. GPUs and TPUs run float32 matrix products at reduced precision by
    # default (TF32 or bf16 passes, about 1e-3 relative), far outside those tolerances, so the
    # suite pins full precision there; the tests of the precision users get by default
    # (tests/test_gpu_precision.py, the "tf32" tier) set it back around themselves.
    # effseq itself leaves JAX's default (or the user's) alone.
    # The CLI and notebook tests start JAX in subprocesses beside this one: with JAX's default
    # of taking 75% of the GPU's memory up front, the second process would find too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("devices")
    if marker is not None:
        import jax

        need, have = marker.args[0], jax.device_count()
        if have < need:
            import pytest

            pytest.skip(f"needs {need} devices, {have} visible")


# The longest test files first. `make test` hands whole files to two workers as they free up
# (pytest-xdist --dist loadfile); collected in name order, the slowest ones (tests/train/)
# came last, and one worker ran them alone while the other sat idle for a minute or more.
_LONGEST_FIRST = (
    "tests/conformance/test_conformance.py",
    "tests/test_notebooks.py",
    "tests/compare/test_run.py",
    "tests/train/test_loop.py",
    "tests/train/test_workdir.py",
    "tests/train/test_preemption.py",
    "tests/models/test_models.py",
    "tests/benchmarks/",
    "tests/train/",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        for i, prefix in enumerate(_LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
