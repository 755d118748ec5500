import pytest
import torch
from transformers.utils import logging as hf_logging

from qmor import AdapterConfig, AdapterMeta, attach, save_adapter
from qmor.model.load import load_4bit
from qmor.model.quant import bnb
from qmor.model.tiny import make_tiny

# transformers binds its log handler to sys.stderr on first use; made inside a test under capsys, it would write to
# that test's closed capture afterwards ("--- Logging error ---" in a later test's output)
hf_logging.get_logger("transformers")


class Repacked(AssertionError):
    """bitsandbytes was about to rewrite a 4-bit weight into its CPU inference layout."""


def _refuse_repack(*args, **kwargs):
    raise Repacked("a 4-bit weight would be repacked in place; call qmor.model.quant.keep_plain_layout on the model")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer on disk, built in code (no network)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0, hidden=64, layers=2)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the registry package, in a cache of this session's own (QMOR_CACHE), so
    every run of the session finds it (tests marked real_model)."""
    from qmor.model.files import expand_builtin

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QMOR_CACHE", str(tmp_path_factory.mktemp("qmor-cache")))
        yield expand_builtin("smollm2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def as_on_avx512_bf16(monkeypatch):
    """Every 4-bit layer built in a test believes it runs on a CPU with AVX512-BF16, where bitsandbytes repacks its
    weight in place on an eval forward without grad; the repack raises, so on AMD and Intel alike a test fails
    wherever qmor would let that happen. bitsandbytes before 0.49 has no such repack, so nothing to guard there."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True, raising=False)
    monkeypatch.setattr(bnb.nn.modules, "_convert_weight_packed_for_cpu", _refuse_repack, raising=False)


def perturb(model, seed=1, size=0.05):
    """Stand-in for training: non-zero adapter weights, so comparisons see the adapters, not just the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * size)


def perturbed_lora(base_dir, folder, **meta):
    """A saved LoRA r4 adapter on the base in `base_dir`, its weights perturbed (not zero), in `folder`; `meta`:
    further AdapterMeta fields (chat_template)."""
    model = load_4bit(str(base_dir))
    cfg = AdapterConfig(family="lora", r=4, alpha=8.0)
    attach(model, cfg)
    perturb(model)
    return save_adapter(model, folder, AdapterMeta(adapter=cfg, base_model=str(base_dir), **meta))


# The quick tier (`pytest -m "not slow"`) for the edit loop leaves out what starts servers, browsers, several
# processes, llama.cpp's converter or a real model; CI runs everything.
SLOW_FILES = {"test_app_api.py", "test_app_browser.py", "test_app_eval.py", "test_ddp.py", "test_fsdp.py",
              "test_gpu_check.py", "test_experiments.py", "test_bench_train.py"}
SLOW_TESTS = {"test_every_printed_hint_runs_as_printed", "test_cli_on_a_local_config_and_a_missing_path",  # commands
              "test_smollm2_gguf_reads_through_the_installed_gguf_module",  # converts a real model
              # each starts a child process: the export script, a run stopped by SIGTERM, a run's notices, the app
              # refusing to start, every module imported afresh
              "test_bf16_export_and_script", "test_sigterm_leaves_a_resumable_checkpoint",
              "test_a_run_offline_prints_no_hub_kernel_notice", "test_app_refuses_to_start_exposed_without_password",
              "test_every_module_imports_in_a_fresh_interpreter"}


def pytest_collection_modifyitems(items):
    for item in items:
        slow = item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS or "subprocess" in item.name
        if slow or item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.slow)
