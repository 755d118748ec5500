"""The `qmor` command and the names it takes: subcommands, the aliases of transformers, TRL and LLaMA-Factory in
flags and config files, one-line errors for unknown or doubled names, and `qmor plan` on the training flags.
Nothing here trains."""

import json
import tomllib
from pathlib import Path

import pytest
import torch

from qmor import cli
from qmor.adapters.config import AdapterConfig
from qmor.commands import app as app_command
from qmor.commands import plan as plan_command
from qmor.commands.options import parse
from qmor.commands.train import build_config, parser
from qmor.flags import FLAGS
from qmor.plan import estimate, geometry, load_config
from qmor.training.config import TrainConfig
from qmor.training.loop import cosine_schedule, make_schedule

ROOT = Path(__file__).resolve().parents[1]


def config(*argv):
    return build_config(parse(parser(), list(argv)))


def test_the_console_script_is_declared_and_dispatches(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"qmor": "qmor.cli:main"}
    assert cli.main([]) == 2
    shown = capsys.readouterr().out
    assert all(f"  {name} " in shown for name in cli.COMMANDS)
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err == "error: unknown command 'trian'; did you mean qmor train?\n"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "usage: qmor train" in capsys.readouterr().out


def test_qmor_app_without_gradio_says_how_to_install(monkeypatch, capsys):
    real = app_command.importlib.util.find_spec
    monkeypatch.setattr(app_command.importlib.util, "find_spec", lambda name: None if name == "gradio" else real(name))
    assert cli.main(["app"]) == 2
    err = capsys.readouterr().err
    assert err == 'error: the app needs gradio: pip install "qmor[app]" (in a checkout: pip install -e ".[app]")\n'


ALIASED = [(f, alias) for f in FLAGS for alias in f.aliases]


@pytest.mark.parametrize("flag,alias", ALIASED, ids=[a for _, a in ALIASED])
def test_every_alias_sets_what_its_flag_sets(flag, alias):
    default = 4 if flag.default is None else flag.default  # an auto option: any valid value
    value = {"model": "smollm2", "output": "runs/x", "targets": "q_proj,v_proj"}.get(flag.key) or str(
        flag.kind(default) * 2 if flag.kind in (int, float) else default)
    for spelling in (alias, alias.replace("-", "_").replace("__", "--")):  # --lora-r and --lora_r
        assert config(spelling, value) == config(flag.name, value), spelling


def test_the_names_people_know_are_aliases():
    names = {n for f in FLAGS for n in (f.name, *f.aliases)}
    known = ["learning-rate", "num-train-epochs", "per-device-train-batch-size", "gradient-accumulation-steps",
             "max-length", "cutoff-len", "output-dir", "model-name-or-path", "logging-steps", "save-total-limit",
             "lora-r", "lora-rank", "lora-alpha", "lora-dropout", "lora-target", "warmup-ratio", "weight-decay",
             "max-grad-norm", "save-steps", "eval-steps", "seed", "max-steps", "lr-scheduler-type", "report-to",
             "attn-implementation"]
    assert {f"--{n}" for n in known} <= names


def test_a_recipe_in_transformers_and_llama_factory_names(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: smollm2\noutput_dir: runs/r\nlearning_rate: 1e-4\nnum_train_epochs: 2\n"
                      "per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\ncutoff_len: 512\n"
                      "logging_steps: 5\nsave_total_limit: 3\nlora_rank: 16\nlora_alpha: 32\nlora_dropout: 0.05\n"
                      "lora_target: all\nwarmup_ratio: 0.1\nweight_decay: 0.01\nmax_grad_norm: 0.5\nsave_steps: 50\n"
                      "eval_steps: 25\nseed: 3\nmax_steps: 0\nlr_scheduler_type: linear\nreport_to: none\n"
                      "attn_implementation: sdpa\nadapter:\n  family: lora\n")
    cfg = config("--config", str(recipe))
    assert (cfg.model, cfg.output, cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum) == (
        "smollm2", "runs/r", 1e-4, 2.0, 2, 8)  # YAML reads 1e-4 as text: it is read as the number
    assert (cfg.data.max_len, cfg.log_steps, cfg.keep_checkpoints, cfg.adapter.r, cfg.adapter.alpha) == (
        512, 5, 3, 16, 32.0)
    assert (cfg.adapter.dropout, cfg.adapter.targets, cfg.warmup_ratio, cfg.weight_decay, cfg.max_grad_norm) == (
        0.05, "all-linear", 0.1, 0.01, 0.5)
    assert (cfg.save_steps, cfg.eval_steps, cfg.seed, cfg.max_steps, cfg.lr_scheduler_type) == (50, 25, 3, 0, "linear")
    assert cfg.attn_implementation == "sdpa"
    assert config("--config", str(recipe), "--lora-r", "4").adapter.r == 4  # a flag still wins over the file


@pytest.mark.parametrize("text,message", [
    ("learning_rat: 1e-4\n", "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    ("lr: 1e-4\nlearning_rate: 2e-4\n", "sets lr twice, as 'lr' and 'learning_rate'; keep one"),
    ("adapter:\n  r: 8\nlora_r: 16\n", "sets adapter.r twice, as 'adapter: r' and 'lora_r'; keep one"),
    ("cutoff_len: 64\nmax_length: 128\n", "sets data.max_len twice, as 'cutoff_len' and 'max_length'"),
    ("lr_scheduler_type: cosine_warmup\n", "lr_scheduler_type must be one of"),
])
def test_bad_config_keys_are_one_line(text, message, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert cli.main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("argv,message", [
    (["--lr", "1e-3", "--learning-rate", "2e-3"], "--lr and --learning-rate set the same option; give it once"),
    (["--lora_r", "4", "--rank", "8"], "--lora-r and --rank set the same option; give it once"),
    (["--learning-rat", "1e-3"], "unknown argument --learning-rat; did you mean --learning-rate?"),
    (["--batch", "2"], "unknown argument --batch; did you mean --batch-size?"),
    (["--report-to", "tensorbord"], "did you mean tensorboard?"),
    (["--lr-scheduler-type", "cosin"], "did you mean cosine?"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_plan_takes_the_training_names_and_config(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps({"model": str(tiny_dir), "adapter": {"family": "mora", "r": 8, "targets":
                                  ["q_proj", "v_proj"]}, "per_device_train_batch_size": 4, "cutoff_len": 256}))
    assert cli.main(["plan", "--config", str(recipe), "--json", "--no-gradient-checkpointing"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = estimate(geometry(load_config(str(tiny_dir)), ["q_proj", "v_proj"]), 256, 4,
                        AdapterConfig(family="mora", r=8, targets=["q_proj", "v_proj"]), checkpointing=False,
                        param_dtype_bytes=2)
    assert shown["total_bytes"] == expected.total_bytes and (shown["seq_len"], shown["batch"]) == (256, 4)
    # the same options as flags, with the training names and their aliases; the plan's own defaults otherwise
    argv = ["plan", "--model", str(tiny_dir), "--family", "mora", "--lora-r", "8", "--targets", "q_proj,v_proj",
            "--batch-size", "4", "--max-length", "256", "--no-gradient-checkpointing", "--json"]
    assert cli.main(argv) == 0 and json.loads(capsys.readouterr().out)["total_bytes"] == expected.total_bytes
    assert cli.main(["plan", "--model", str(tiny_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == plan_command.DEFAULTS["max_len"]
    assert cli.main(["plan", "--model", str(tiny_dir), "--seq", "512"]) == 2
    assert capsys.readouterr().err == "error: --seq is now --max-len, the name training uses for it\n"
    eager = ["plan", "--model", str(tiny_dir), "--attn-implementation", "eager", "--json"]
    assert cli.main(eager) == 0 and json.loads(capsys.readouterr().out)["total_bytes"] > shown["total_bytes"]


def test_cosine_is_unchanged_and_other_schedules_are_transformers():
    from transformers import get_scheduler

    def lrs(schedule, steps=20):
        out = []
        for _ in range(steps):
            out.append(schedule.get_last_lr()[0])
            schedule.optimizer.step()
            schedule.step()
        return out

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    cfg = TrainConfig(warmup_ratio=0.1)
    assert lrs(make_schedule(optimizer(), cfg, 20)) == lrs(cosine_schedule(optimizer(), 20, 0.1))
    for name in ("linear", "constant_with_warmup", "polynomial"):
        cfg = TrainConfig(warmup_ratio=0.1, lr_scheduler_type=name)
        expected = lrs(get_scheduler(name, optimizer(), num_warmup_steps=2, num_training_steps=20))
        assert lrs(make_schedule(optimizer(), cfg, 20)) == expected and len(set(expected)) > 2
